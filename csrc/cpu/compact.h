// Compressing and expanding blocks by a per-element test, for csrc/cpu/kernels.cpp: the elements
// of one high bin (the level-1 histogram and the one-pass event: each match's low bin and
// position, in order), the bins inside an event's window, and the weights whose prior gradient
// needs the spike (their θ compressed, their prior weights expanded back). In the regrowth regime
// most of a block falls in the bin, and 10-30% of a pruned model's weights sit near zero at
// random places, so these must cost little per element: the AVX-512 paths compress and expand
// 16 lanes at a time (vpcompressd, vexpandps), the AVX2 paths permute 8 (vpermd, by tables
// indexed by the test's bits), and the portable paths append branch-free. tests/dispatch_worker.py
// runs the kernels on every path against the reference.
#pragma once

#include <stdint.h>

#include "../core/selection.h"
#include "isa.h"

namespace MGPP_NAMESPACE {
namespace cpu {

// The instruction-set path of this build's compression and expansion, as build_info reports it.
#if defined(MGPP_CPU_AVX512)
#define MGPP_COMPRESS_PATH "AVX-512F vpcompress/vexpand"
#elif defined(__AVX2__)
#define MGPP_COMPRESS_PATH "AVX2 vperm by tables"
#else
#define MGPP_COMPRESS_PATH "portable"
#endif

#if defined(__AVX2__) && !defined(MGPP_CPU_AVX512)
// For each 8-bit mask, the lanes whose bit is set, lowest first, as vpermd indices.
struct MatchPermutations {
  alignas(32) uint32_t lanes[256][8];
  constexpr MatchPermutations() : lanes() {
    for (int mask = 0; mask < 256; ++mask) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if ((mask >> lane) & 1) lanes[mask][next++] = static_cast<uint32_t>(lane);
      }
    }
  }
};
inline constexpr MatchPermutations kMatchPermutations{};
#endif

// For each i in [0, n) whose key_high_bin(keys[i]) is high_bin, in order: key_low_bin(keys[i])
// appended to lows and, with kPositions, first + i to positions. Returns how many. lows and
// positions have room for n elements (the vector paths store whole vectors at the end). The
// vector paths skip a vector without a match: outside the regrowth regime τ's bin holds well
// under 1% of the elements. An fp32 event step against a plain one, BERT-base lists, Intel Xeon,
// the passes over θ prefetched, side by side in one process, 2 threads / 1: 1.37x / 1.34x ->
// 1.30x / 1.30x with it (the AVX2 path, 2 threads: 1.15-1.16x -> 1.12-1.13x).
template <bool kPositions>
inline int64_t collect_bin(const uint32_t* __restrict keys, int64_t n, uint32_t high_bin,
                           uint32_t first, uint32_t* __restrict lows,
                           uint32_t* __restrict positions) {
  int64_t m = 0;
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512)
  const __m512i target = _mm512_set1_epi32(static_cast<int>(high_bin));
  const __m512i low_mask = _mm512_set1_epi32(static_cast<int>(kHistLowBins - 1));
  __m512i position = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)),
                                      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                        13, 14, 15));
  for (; i + 16 <= n; i += 16) {
    const __m512i key = _mm512_loadu_si512(keys + i);
    const __mmask16 match =
        _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(key, kHistLowBits), target);
    const __m512i lane_positions = position;
    position = _mm512_add_epi32(position, _mm512_set1_epi32(16));
    if (match == 0) continue;
    _mm512_storeu_si512(lows + m,
                        _mm512_maskz_compress_epi32(match, _mm512_and_si512(key, low_mask)));
    if constexpr (kPositions) {
      _mm512_storeu_si512(positions + m, _mm512_maskz_compress_epi32(match, lane_positions));
    }
    m += __builtin_popcount(match);
  }
#elif defined(__AVX2__)
  const __m256i target = _mm256_set1_epi32(static_cast<int>(high_bin));
  const __m256i low_mask = _mm256_set1_epi32(static_cast<int>(kHistLowBins - 1));
  __m256i position = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (; i + 8 <= n; i += 8) {
    const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    const __m256i match = _mm256_cmpeq_epi32(_mm256_srli_epi32(key, kHistLowBits), target);
    const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(match));
    const __m256i lane_positions = position;
    position = _mm256_add_epi32(position, _mm256_set1_epi32(8));
    if (bits == 0) continue;
    const __m256i lanes =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kMatchPermutations.lanes[bits]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lows + m),
                        _mm256_permutevar8x32_epi32(_mm256_and_si256(key, low_mask), lanes));
    if constexpr (kPositions) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(positions + m),
                          _mm256_permutevar8x32_epi32(lane_positions, lanes));
    }
    m += __builtin_popcount(static_cast<unsigned>(bits));
  }
#else
  // Usually few elements fall in the bin: each group is tested with vector code first, and
  // only the groups that hold a match are appended.
  constexpr int64_t kGroup = 64;
  for (; i + kGroup <= n; i += kGroup) {
    int matches = 0;
#pragma omp simd reduction(+ : matches)
    for (int64_t j = i; j < i + kGroup; ++j) matches += key_high_bin(keys[j]) == high_bin;
    if (matches == 0) continue;
    // Branch-free: when most elements match (say τ falls among many exact zeros), a branch per
    // element would be mispredicted half the time.
    for (int64_t j = i; j < i + kGroup; ++j) {
      lows[m] = key_low_bin(keys[j]);
      if constexpr (kPositions) positions[m] = first + static_cast<uint32_t>(j);
      m += key_high_bin(keys[j]) == high_bin;
    }
  }
#endif
  for (; i < n; ++i) {
    lows[m] = key_low_bin(keys[i]);
    if constexpr (kPositions) positions[m] = first + static_cast<uint32_t>(i);
    m += key_high_bin(keys[i]) == high_bin;
  }
  return m;
}

// The bins in [begin, end) of bins[0, n), in order, appended to inside, and how many lie below
// begin, in one pass (an event's level-0 histogram under a window: the caller counts the inside
// ones one by one and the rest by these counts). Bins are below 2^31. inside has room for n
// elements (the vector paths store whole vectors at the end).
struct WindowCollection {
  int64_t inside;
  int64_t below;
};
inline WindowCollection collect_window(const uint32_t* __restrict bins, int64_t n, uint32_t begin,
                                       uint32_t end, uint32_t* __restrict inside) {
  const uint32_t width = end - begin;
  int64_t m = 0;
  int64_t below = 0;
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512)
  const __m512i first = _mm512_set1_epi32(static_cast<int>(begin));
  const __m512i widths = _mm512_set1_epi32(static_cast<int>(width));
  for (; i + 16 <= n; i += 16) {
    const __m512i bin = _mm512_loadu_si512(bins + i);
    const __mmask16 in = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(bin, first), widths);
    below += __builtin_popcount(_mm512_cmplt_epu32_mask(bin, first));
    _mm512_storeu_si512(inside + m, _mm512_maskz_compress_epi32(in, bin));
    m += __builtin_popcount(in);
  }
#elif defined(__AVX2__)
  // Signed compares: every bin is below 2^31.
  const __m256i first = _mm256_set1_epi32(static_cast<int>(begin));
  const __m256i last = _mm256_set1_epi32(static_cast<int>(end - 1));
  for (; i + 8 <= n; i += 8) {
    const __m256i bin = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bins + i));
    const __m256i under = _mm256_cmpgt_epi32(first, bin);
    const __m256i outside = _mm256_or_si256(under, _mm256_cmpgt_epi32(bin, last));
    const int in = ~_mm256_movemask_ps(_mm256_castsi256_ps(outside)) & 0xFF;
    const int under_bits = _mm256_movemask_ps(_mm256_castsi256_ps(under));
    below += __builtin_popcount(static_cast<unsigned>(under_bits));
    const __m256i lanes =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kMatchPermutations.lanes[in]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(inside + m),
                        _mm256_permutevar8x32_epi32(bin, lanes));
    m += __builtin_popcount(static_cast<unsigned>(in));
  }
#endif
  for (; i < n; ++i) {
    inside[m] = bins[i];
    m += bins[i] - begin < width;
    below += bins[i] < begin;
  }
  return {m, below};
}

#if defined(__AVX2__) && !defined(MGPP_CPU_AVX512)
// For each 8-bit mask, where each lane's element comes from in a compressed vector: the count of
// set bits below the lane.
struct ExpandPermutations {
  alignas(32) uint32_t sources[256][8];
  constexpr ExpandPermutations() : sources() {
    for (int mask = 0; mask < 256; ++mask) {
      uint32_t next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        sources[mask][lane] = next;
        next += (mask >> lane) & 1;
      }
    }
  }
};
inline constexpr ExpandPermutations kExpandPermutations{};
#endif

// out = the x[i] whose flags[i] is set (flags are 0 or -1), in order. out has room for n
// elements.
inline void compress_flagged(const float* __restrict x, const int32_t* __restrict flags,
                             int64_t n, float* __restrict out) {
  int64_t m = 0;
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m512i flag = _mm512_loadu_si512(flags + i);
    const __mmask16 set = _mm512_test_epi32_mask(flag, flag);
    _mm512_storeu_ps(out + m, _mm512_maskz_compress_ps(set, _mm512_loadu_ps(x + i)));
    m += __builtin_popcount(set);
  }
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const int set = _mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(flags + i))));
    const __m256i lanes =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kMatchPermutations.lanes[set]));
    _mm256_storeu_ps(out + m, _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + i), lanes));
    m += __builtin_popcount(static_cast<unsigned>(set));
  }
#endif
  for (; i < n; ++i) {
    out[m] = x[i];
    m += static_cast<uint32_t>(flags[i]) & 1u;
  }
}

// The inverse: out[i] = the next element of in where flags[i] is set, else fill.
inline void expand_flagged(const float* __restrict in, const int32_t* __restrict flags, int64_t n,
                           float fill, float* __restrict out) {
  int64_t m = 0;
  int64_t i = 0;
#if defined(MGPP_CPU_AVX512)
  const __m512 filled = _mm512_set1_ps(fill);
  for (; i + 16 <= n; i += 16) {
    const __m512i flag = _mm512_loadu_si512(flags + i);
    const __mmask16 set = _mm512_test_epi32_mask(flag, flag);
    _mm512_storeu_ps(out + i, _mm512_mask_expand_ps(filled, set, _mm512_loadu_ps(in + m)));
    m += __builtin_popcount(set);
  }
#elif defined(__AVX2__)
  const __m256 filled = _mm256_set1_ps(fill);
  for (; i + 8 <= n; i += 8) {
    const __m256 flag = _mm256_castsi256_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(flags + i)));
    const int set = _mm256_movemask_ps(flag);
    const __m256i sources =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandPermutations.sources[set]));
    const __m256 expanded = _mm256_permutevar8x32_ps(_mm256_loadu_ps(in + m), sources);
    _mm256_storeu_ps(out + i, _mm256_blendv_ps(filled, expanded, flag));
    m += __builtin_popcount(static_cast<unsigned>(set));
  }
#endif
  // Branch-free, selecting bits by the flag (GCC branches on a float select on SSE2, which weights
  // near zero at random places mispredict often); in[m] is always a valid read (m <= i < n).
  for (; i < n; ++i) {
    const uint32_t flag = static_cast<uint32_t>(flags[i]);
    out[i] = bits_to_float((float_to_bits(in[m]) & flag) | (float_to_bits(fill) & ~flag));
    m += flag & 1u;
  }
}

}  // namespace cpu
}  // namespace MGPP_NAMESPACE
