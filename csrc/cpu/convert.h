// Block conversions between the storage formats and float32 for the CPU kernels: the kernels
// widen a block of 16-bit values into an L1-resident float32 buffer, run the shared per-element
// math on float32 as they do for float32 storage, and narrow the results back.
//
// Each conversion gives the bits of csrc/core/formats.h's scalar functions (round to nearest
// even, overflow to inf, denormals kept, bfloat16 NaN as 0x7FC0 and float16 NaN as sign | 0x7E00)
// whatever the target. Where the build target has conversion instructions, they do the work as in
// ATen's Vectorized: vcvtneps2bf16 (AVX-512 BF16) and vcvtph2ps / vcvtps2ph (F16C, AVX-512F).
// The instructions differ from the scalar recipe in rare lanes only (vcvtneps2bf16 flushes
// denormal inputs to zero and keeps NaN payloads, vcvtps2ph keeps NaN payloads), so those lanes
// are patched, behind a branch that the data almost never takes. The portable path is a
// `#pragma omp simd` loop over the scalar functions. csrc/tests/test_convert.cpp checks every
// path against the scalar functions over all 65,536 16-bit patterns and float32 edge cases.
#pragma once

#include <stdint.h>

// The AVX-512 paths use the BW, DQ and VL subsets (16-bit lanes, vfpclassps, 256-bit masked
// moves) too.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define MGPP_CPU_AVX512 1
#endif
#if defined(MGPP_CPU_AVX512) || defined(__F16C__)
// GCC 12 reports the intrinsics' deliberately undefined pass-through operands as (maybe)
// uninitialized once inlined (a known false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "../core/formats.h"

namespace MGPP_NAMESPACE {
namespace cpu {

// The instruction-set path of each conversion in this build, as build_info reports it.
#if defined(MGPP_CPU_AVX512)
#define MGPP_BF16_WIDEN_PATH "AVX-512F"
#else
#define MGPP_BF16_WIDEN_PATH "portable"
#endif
#if defined(MGPP_CPU_AVX512) && defined(__AVX512BF16__)
#define MGPP_BF16_NARROW_PATH "AVX-512 BF16 vcvtneps2bf16"
#else
#define MGPP_BF16_NARROW_PATH "portable"
#endif
#if defined(MGPP_CPU_AVX512)
#define MGPP_F16_PATH "AVX-512F vcvtph2ps/vcvtps2ph"
#elif defined(__F16C__)
#define MGPP_F16_PATH "F16C vcvtph2ps/vcvtps2ph"
#else
#define MGPP_F16_PATH "portable"
#endif
constexpr const char* kConversionPaths = "bf16->f32 " MGPP_BF16_WIDEN_PATH
                                         ", f32->bf16 " MGPP_BF16_NARROW_PATH
                                         ", f16<->f32 " MGPP_F16_PATH;

// The portable paths, also the tails of the vector ones.
template <typename F>
inline void widen_portable(const typename F::T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = F::load(src[i]);
}

template <typename F>
inline void narrow_portable(const float* __restrict src, typename F::T* __restrict dst,
                            int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = F::store(src[i]);
}

// dst[0, n) = the float32 values of src[0, n).
inline void widen(BF16, const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512)
  // Exact: the 16 bits become the high half of the float32.
  for (; i + 16 <= n; i += 16) {
    const __m512i wide =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(wide, 16));
  }
#endif
  widen_portable<BF16>(src + i, dst + i, n - i);
}

inline void widen(F16, const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  widen_portable<F16>(src + i, dst + i, n - i);
}

// dst[0, n) = src[0, n) rounded to the format.
inline void narrow(BF16, const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512) && defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(src + i);
    __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
    // Denormal inputs (the instruction flushes them) and NaN (it keeps their payload), in one
    // vfpclassps: quiet NaN 0x01, denormal 0x20, signalling NaN 0x80.
    const __mmask16 patch = _mm512_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80);
    if (patch != 0) {
      alignas(32) uint16_t patched[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(patched), h);
      for (int lane = 0; lane < 16; ++lane) {
        if ((patch >> lane) & 1) patched[lane] = float_to_bf16_bits(src[i + lane]);
      }
      h = _mm256_load_si256(reinterpret_cast<const __m256i*>(patched));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#endif
  narrow_portable<BF16>(src + i, dst + i, n - i);
}

inline void narrow(F16, const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512) || defined(__F16C__)
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif
#if defined(MGPP_CPU_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(src + i);
    __m256i h = _mm512_cvtps_ph(x, kRound);
    // NaN lanes: the instruction keeps payload bits that the scalar recipe drops.
    const __mmask16 nan = _mm512_fpclass_ps_mask(x, 0x01 | 0x80);
    if (nan != 0) {
      const __m256i sign = _mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0x8000)));
      const __m256i canonical = _mm256_or_si256(sign, _mm256_set1_epi16(0x7E00));
      h = _mm256_mask_mov_epi16(h, nan, canonical);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    __m128i h = _mm256_cvtps_ph(x, kRound);
    const int nan = _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    if (nan != 0) {
      alignas(16) uint16_t patched[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(patched), h);
      for (int lane = 0; lane < 8; ++lane) {
        if ((nan >> lane) & 1) patched[lane] = float_to_f16_bits(src[i + lane]);
      }
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(patched));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  narrow_portable<F16>(src + i, dst + i, n - i);
}

}  // namespace cpu
}  // namespace MGPP_NAMESPACE
