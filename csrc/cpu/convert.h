// Block conversions between the 16-bit storage formats and float32 for the CPU kernels: the
// update loop widens float16 blocks into an L1-resident float32 buffer, runs the shared math and
// narrows the results back; the histogram, threshold and partition passes widen bfloat16 and
// float16 blocks. (bfloat16 is rounded in the update loop itself: its scalar recipe vectorises
// into a few integer operations, and staging it through a buffer, with vcvtneps2bf16, measured
// 1.3-1.7x slower on tensors larger than the caches.)
//
// Each conversion gives the bits of csrc/core/formats.h's scalar functions (round to nearest
// even, overflow to inf, denormals kept, a float16 NaN quieted with its payload's high bits)
// whatever the target. Where the build target has them, the conversion instructions do the work
// as in ATen's Vectorized: vcvtph2ps / vcvtps2ph (AVX-512F, or F16C), whose NaN the scalar recipe
// follows: checking NaN lanes to give one canonical NaN instead cost a step 6% (fp16 BERT-base
// lists against fused AdamW in fp16, Intel Xeon, one thread: 1.57-1.63x -> 1.46-1.52x without;
// 2 threads 1.54-1.61x -> 1.47-1.56x). The portable path is a `#pragma omp simd` loop over the
// scalar functions. csrc/tests/test_convert.cpp checks every path against the scalar functions
// over all 65,536 16-bit patterns and float32 edge cases.
#pragma once

#include <stdint.h>

#include "../core/formats.h"
#include "isa.h"

namespace MGPP_NAMESPACE {
namespace cpu {

// The instruction-set path of each conversion in this build, as build_info reports it.
#if defined(MGPP_CPU_AVX512)
#define MGPP_BF16_WIDEN_PATH "AVX-512F"
#else
#define MGPP_BF16_WIDEN_PATH "portable"
#endif
#if defined(MGPP_CPU_AVX512)
#define MGPP_F16_PATH "AVX-512F vcvtph2ps/vcvtps2ph"
#elif defined(__F16C__)
#define MGPP_F16_PATH "F16C vcvtph2ps/vcvtps2ph"
#else
#define MGPP_F16_PATH "portable"
#endif
// bfloat16 is rounded inside the update loop by the scalar recipe, which the compiler vectorises.
constexpr const char* kConversionPaths = "bf16->f32 " MGPP_BF16_WIDEN_PATH
                                         ", f32->bf16 in-loop recipe, f16<->f32 " MGPP_F16_PATH;

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

// dst[0, n) = src[0, n) rounded to float16.
inline void narrow(F16, const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512) || defined(__F16C__)
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif
#if defined(MGPP_CPU_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kRound);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  narrow_portable<F16>(src + i, dst + i, n - i);
}

}  // namespace cpu
}  // namespace MGPP_NAMESPACE
