// CPU kernels: OpenMP over fixed-size chunks of all tensors together, and inside a chunk a
// `#pragma omp simd` loop over the shared per-element step of csrc/core/step.h (float16 arrays
// are widened into L1 buffers and narrowed back around it by csrc/cpu/convert.h). Histogram
// counting would stop the compiler from vectorising the update, so the update loop writes bin
// indices to a small block buffer and a scalar loop counts them while the block is still in L1.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "compact.h"
#include "convert.h"

// The -march value this file is compiled for, which build_info reports; setup.py and
// CMakeLists.txt pass it with the flags of csrc/compile_flags.txt.
#ifndef MGPP_CPU_ARCH
#error "build with -DMGPP_CPU_ARCH=<the -march value>"
#endif
#define MGPP_STRINGIFY(x) #x
#define MGPP_EXPAND_AND_STRINGIFY(x) MGPP_STRINGIFY(x)

namespace MGPP_NAMESPACE {
namespace cpu {
namespace {

// Chunks are multiples of 8 elements so that one byte of a packed mask belongs to one chunk.
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kBlock = 1024;
// Elements a staged block (float16) updates at a time: g, m and v are widened for the piece, the
// piece updated, θ, m and v narrowed back, so that the DRAM streams of the block overlap its math
// (only θ, which picks the prior's path, is widened for the whole block first). fp16 BERT-base
// lists against fused AdamW in fp16, Intel Xeon, 1 thread / 2: every array widened for the whole
// block, then narrowed, 1.85-1.94x / 1.88-1.99x; pieces of 128 1.57-1.62x / 1.57-1.61x (side by
// side in one process: 64 1.66-1.68x / 1.73x, 256 1.64x / 1.70x, 512 or more 1.9-2.1x).
// g, m and v are staged in buffers of one piece, and each piece asks for its share of the next
// block's θ lines in L1: with buffers of a whole block, and the next block's θ asked for at once
// (which had measured 1.55-1.65x / 1.53-1.57x -> 1.42-1.45x / 1.40-1.42x against none), the
// block's data crowded L1 and the widening of θ waited on its loads (a third of the step's
// samples). Builds in turns, 1 thread / 2: the AVX-512 path 1.39-1.45x / 1.40-1.46x -> 1.27-1.33x
// / 1.29-1.34x, the AVX2 path 1.87-1.91x / 1.83-1.89x -> 1.70x / 1.67-1.69x; also asking for g, m
// and v 256 elements ahead measured the same, and runs of 128 in the compressed route 1.64x at 1
// thread. bfloat16, which the update loop reads as stored, measured slower with its block's m and
// v or the next block's θ and g asked for at the block's start (2 threads: 1.14x -> 1.21-1.35x).
constexpr int64_t kPiece = 128;
// float32 parameters (and state) update kStreamPiece elements at a time, each piece first asking
// for the lines kStreamAhead elements further on in θ, g, m and v (kStreamedLoop): with the spike
// path's arithmetic between its loads, the hardware prefetchers alone kept too few of the four
// streams in flight. BERT-base lists against fused AdamW, Intel Xeon, the AVX-512 path, builds in
// turns, 2 threads / 1: 1.13-1.14x / 1.07-1.09x -> 0.98-1.04x / 0.99-1.00x; a dense model (1% near
// zero), 2 threads, 1.09x -> 0.97x. Side by side in one process: pieces of 64 without the
// prefetch 1.23x where the step was 1.14x; pieces of 32 or 128 slower (1.03x, 1.02-1.05x against
// 1.00-1.01x), of 256 1.17-1.20x; 128 to 1024 elements ahead within the noise of 256. bfloat16
// and float16 measured no faster with it (bf16 1.15-1.24x against 1.18x, fp16 1.46-1.55x against
// 1.48x), so they keep one loop per route.
constexpr int64_t kStreamPiece = 64;
constexpr int64_t kStreamAhead = 256;
// Weights checked together for the spike: long enough for a few vectors, short enough that a
// span of a dense model usually has no weight near zero.
constexpr int64_t kSpikeSpan = 32;
// On the AVX-512 path, float32 parameters check kSpanGroup spans for the spike, then update them,
// group after group: checking all of a block's spans first reads θ from DRAM in a pass of its own,
// which stalls (computing the checks into a byte per weight in one vector pass was no faster). A
// block whose first group needs the spike in every span is taken whole without checking the rest:
// with 10-40% of the weights near zero at random places (the benchmark's regime, and training
// between events) every span needs it. BERT-base lists, Intel Xeon, side by side in one process,
// the step against fused AdamW, 2 threads / 1: that regime 1.22x / 1.19x -> 1.10x / 1.07x, a dense
// model (1% near zero) 1.12x / 1.13x -> 1.09x / 1.09x; tensors in L3, one thread: the spike path
// 1.24-1.26 -> 1.12 ns per element, the slab-only 0.79-0.80 -> 0.76-0.78. bfloat16 parameters take
// such a block whole too, in place of the compressed spike path, whose flag loop reads θ in a pass
// of its own: that regime, 2 threads / 1, bf16 + fp32 state 80-82 / 153 -> 73-74 / 133-137 ms, bf16
// + bf16 state 74-76 / 140-143 -> 71-73 / 137-139 ms; a dense model within 1%. That holds on the
// AVX-512 path only (kWholeSpikeBlocks): with 8 lanes or 4 the spike for every weight costs more
// than the flag loop's pass (float32 there: kCompactSpike). The avx2 path, against fused AdamW in
// bf16 on ATen's avx2 path, side by side: bf16 1 thread / 2 1.89-1.94x / 1.89-1.90x -> 1.75-1.79x /
// 1.77-1.82x, bf16 + fp32 state 1 thread 1.85x -> 1.57x; the portable path, bf16 one thread, 524 ->
// 502 ms. (float16 is staged: its flag loop reads θ from L1, and the compressed path stays 7%
// faster.)
constexpr int64_t kSpanGroup = 4;
constexpr int64_t kGroupElements = kSpanGroup * kSpikeSpan;
// Thread-local counters are uint32; they are flushed to the shared int64 histogram well before
// they could overflow.
constexpr int64_t kFlushEvery = int64_t{1} << 31;

// Each byte value of a packed mask expanded to eight 0/1 bytes, so that the vector loop reads a
// byte per element instead of gathering bits.
struct MaskByteExpansion {
  uint64_t bytes[256];
  constexpr MaskByteExpansion() : bytes() {
    for (int value = 0; value < 256; ++value) {
      for (int bit = 0; bit < 8; ++bit) {
        bytes[value] |= static_cast<uint64_t>((value >> bit) & 1) << (8 * bit);
      }
    }
  }
};
constexpr MaskByteExpansion kMaskByteExpansion{};

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// The elements an event function handles as one block: kBlock, or for an N:M pattern the most
// that is a multiple of both M (whole groups) and 8 (whole mask bytes).
int64_t block_length(Pattern pattern) {
  return kBlock - kBlock % nm_unit(pattern.m);
}

// Chunks of whole blocks.
int64_t chunk_length(Pattern pattern) {
  const int64_t block = block_length(pattern);
  return kChunk - kChunk % block;
}

// Asks for the cache lines of elements [begin, end) of an array in L1.
template <typename T>
void prefetch_lines(const T* data, int64_t begin, int64_t end) {
  constexpr int64_t kLineElements = 64 / sizeof(T);
  for (int64_t e = begin; e < end; e += kLineElements) __builtin_prefetch(data + e, 0, 3);
}

// Asks for the block after [block, block + length) of a chunk's array in L1. An event's passes
// over θ read it as their one stream, which the hardware prefetcher alone keeps too few loads of
// in flight: an fp32 event step against a plain one, BERT-base lists, Intel Xeon, 2 threads,
// side by side in one process, 1.37-1.39x -> 1.32-1.34x with the partition pass prefetched; the
// regrowth regime's events 1.81-1.86x -> 1.70-1.73x with every pass over θ prefetched (bf16
// 1.53x -> 1.48x). Two blocks ahead measured slower than one, into L2 no faster.
template <typename T>
void prefetch_next_block(const T* data, int64_t block, int64_t length, int64_t chunk_end) {
  prefetch_lines(data, block + length, std::min(block + 2 * length, chunk_end));
}

template <typename GetNumel>
std::vector<Chunk> make_chunks(int64_t count, GetNumel numel_of, int64_t length = kChunk) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t numel = numel_of(t);
    for (int64_t begin = 0; begin < numel; begin += length) {
      chunks.push_back({t, begin, std::min(begin + length, numel)});
    }
  }
  return chunks;
}

// Each thread counts into kCopies copies of a histogram (copy c of `bins` counters at
// c·copy_stride(bins)): count_bins adds element i of a run to copy i % kCopies, so that two
// increments of one counter in flight together are rare (each is a chain through memory, and a
// load issued ahead of an older store to its address costs a machine clear).
constexpr int kCopies = 4;

// The distance between two copies of a histogram of `bins` counters: a cache line more than
// `bins`, so that one counter's copies do not lie a multiple of 4 KB apart, which the cores take
// for the same address when they order loads after stores (measured 10-25% slower counting).
constexpr uint32_t copy_stride(uint32_t bins) { return bins + 16; }

// Runs body(chunk, local_histogram) over all chunks in parallel; each thread counts into its own
// kCopies copies of a histogram of `bins` counters (none when bins == 0), summed into `histogram`
// at the end: integer sums, the same for any thread count.
template <typename Body>
void parallel_chunks(const std::vector<Chunk>& chunks, int num_threads, uint32_t bins,
                     int64_t* histogram, Body body) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (n == 0) return;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
#pragma omp parallel num_threads(threads)
  {
    const uint32_t stride = copy_stride(bins);
    std::vector<uint32_t> local(size_t{kCopies} * stride, 0u);
    int64_t counted = 0;
    auto flush = [&]() {
#pragma omp critical(mgpp_histogram_merge)
      for (int c = 0; c < kCopies; ++c) {
        for (uint32_t b = 0; b < bins; ++b) histogram[b] += local[size_t{stride} * c + b];
      }
      std::fill(local.begin(), local.end(), 0u);
      counted = 0;
    };
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n; ++c) {
      body(chunks[c], local.data());
      counted += chunks[c].end - chunks[c].begin;
      if (bins != 0 && counted >= kFlushEvery) flush();
    }
    if (bins != 0) flush();
  }
}

// Adds bins[0, n) to kCopies copies of a histogram, copy c at c·stride, element i to copy
// i % kCopies. Plain scalar increments: sampling the crowded bins of a block (the regrowth regime
// of an event) to count them with vector code, and compacting the others, measured 1.2-2.0x
// slower than these increments on every mix of bins tried and within 10% on a block all in one
// bin (Intel Xeon, AVX-512 and AVX2 builds): the compaction costs about what an increment does.
void count_bins(const uint32_t* __restrict bins, int64_t n, uint32_t* __restrict histogram,
                uint32_t stride) {
  uint32_t* __restrict h0 = histogram;
  uint32_t* __restrict h1 = histogram + stride;
  uint32_t* __restrict h2 = histogram + 2 * size_t{stride};
  uint32_t* __restrict h3 = histogram + 3 * size_t{stride};
  static_assert(kCopies == 4, "count_bins counts into four copies");
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++h0[bins[i]];
    ++h1[bins[i + 1]];
    ++h2[bins[i + 2]];
    ++h3[bins[i + 3]];
  }
  for (; i < n; ++i) ++h0[bins[i]];
}

// count_bins of a block's level-0 bins (n <= kBlock) under a window (HighBinWindow): only the
// elements inside are counted one by one, collected first. Around the previous event's τ they
// are about a tenth of a model's (64 bins each side of τ, BERT-base lists at 30% sparsity). An
// event step against a plain one, BERT-base lists, Intel Xeon, side by side in one process, 1 and
// 2 threads, every bin -> 64 bins each side of the previous τ's: fp32 1.55-1.57x -> 1.43-1.44x,
// bf16 1.27-1.31x -> 1.15-1.20x (32 bins each side measured about the same, 256 saved a third as
// much). They are collected in the pass that tests the window, not from flags written by a pass
// before it: an event step against a plain one, builds in turns, fp32 2 threads / 1 1.40-1.46x /
// 1.39-1.43x -> 1.36-1.37x / 1.33-1.36x, bf16 2 threads 1.23-1.26x -> 1.16-1.22x.
void count_high_bins(const uint32_t* __restrict bins, int64_t n, HighBinWindow window,
                     uint32_t* __restrict histogram) {
  const uint32_t stride = copy_stride(kHistHighBins);
  if (window.end == 0) return count_bins(bins, n, histogram, stride);
  alignas(64) uint32_t inside_bins[kBlock];
  const WindowCollection collected =
      collect_window(bins, n, window.begin, window.end, inside_bins);
  count_bins(inside_bins, collected.inside, histogram, stride);
  histogram[window.begin - 1] += static_cast<uint32_t>(collected.below);
  histogram[window.end] += static_cast<uint32_t>(n - collected.below - collected.inside);
}

template <PriorTerm kTerm>
using Term = std::integral_constant<PriorTerm, kTerm>;
// The spike-and-slab term from prior weights computed before the update loop
// (weighted_step_gradient), where a Term names the term the loop computes itself.
struct WeightedTerm {};
template <typename T>
constexpr PriorTerm kTermOf = T::value;
template <>
constexpr PriorTerm kTermOf<WeightedTerm> = PriorTerm::kSpikeAndSlab;

// One array's block as float32: the array itself when it is stored in float32, else `buffer`
// holding its values widened (csrc/cpu/convert.h).
template <typename F>
float* float32_block(typename F::T* data, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<F, F32>) {
    return data;
  } else {
    widen(F{}, data, buffer, n);
    return buffer;
  }
}

template <typename F>
const float* float32_block(const typename F::T* data, float* buffer, int64_t n) {
  return float32_block<F>(const_cast<typename F::T*>(data), buffer, n);
}

template <int M>
void keep_candidates_of_groups(uint32_t* __restrict keys, int64_t n, int prunable) {
#pragma omp simd
  for (int64_t g = 0; g < n / M; ++g) keep_candidate_keys(keys + g * M, M, prunable);
}

// The ranking keys of a block of n <= kBlock elements (a whole number of groups of an N:M
// pattern): |x|'s key, 16-bit formats widened as float32_block does, or kNotCandidateKey for
// the elements an N:M event does not rank. The usual group sizes get the ranking compiled for
// their M.
template <typename P>
void block_keys(const typename P::T* __restrict data, int64_t n, Pattern pattern,
                uint32_t* __restrict keys) {
  alignas(64) float buffer[kBlock];
  const float* __restrict x = float32_block<P>(data, buffer, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) keys[i] = abs_key(x[i]);
  const int prunable = pattern.m - pattern.n;
  switch (pattern.m) {
    case 0: return;
    case 2: return keep_candidates_of_groups<2>(keys, n, prunable);
    case 4: return keep_candidates_of_groups<4>(keys, n, prunable);
    case 8: return keep_candidates_of_groups<8>(keys, n, prunable);
    case 16: return keep_candidates_of_groups<16>(keys, n, prunable);
    default:
      for (int64_t g = 0; g < n; g += pattern.m) keep_candidate_keys(keys + g, pattern.m, prunable);
  }
}

// The update loop converts bfloat16 and float32 itself: bfloat16's recipe is a shift and a
// rounding add that the compiler vectorises, and staging bfloat16 through a buffer measured 1.3x
// slower on tensors larger than the caches. float16 is staged: widened into a float32 buffer and
// narrowed back by csrc/cpu/convert.h's vcvtph2ps / vcvtps2ph (its scalar recipe vectorises into
// code twice as slow as the step).
template <typename F>
constexpr bool kStaged = std::is_same_v<F, F16>;

// The format the update loop reads and writes an array in.
template <typename F>
using LoopFormat = std::conditional_t<kStaged<F>, F32, F>;

template <typename F>
typename LoopFormat<F>::T* loop_view(typename F::T* data, float* buffer) {
  if constexpr (kStaged<F>) {
    return buffer;
  } else {
    return data;
  }
}

template <typename F>
const typename LoopFormat<F>::T* loop_view(const typename F::T* data, float* buffer) {
  return loop_view<F>(const_cast<typename F::T*>(data), buffer);
}

template <typename F>
void stage_in(const typename F::T* data, float* buffer, int64_t n) {
  if constexpr (kStaged<F>) widen(F{}, data, buffer, n);
}

template <typename F>
void stage_out(const float* buffer, typename F::T* data, int64_t n) {
  if constexpr (kStaged<F>) narrow(F{}, buffer, data, n);
}

// bfloat16 parameters with bfloat16 state: with every array in 16 bits GCC vectorises 32 lanes
// at a time, two vectors per value, and the spike path's loop then spills. Its prior gradient and
// its AdamW update in two loops, with the gradients in an L1 buffer between them, measured 1.4x
// faster on tensors larger than the caches. The other storage combinations keep one loop: split,
// float32 measured 1.2x slower there (likely as each loop then streams only some of the arrays)
// and the rest the same.
template <typename P, typename S>
constexpr bool kSplitSpikePath = std::is_same_v<P, BF16> && std::is_same_v<S, BF16>;

// Which storage updates in pieces with the streams prefetched ahead (kStreamPiece).
template <typename P, typename S>
constexpr bool kStreamedLoop = std::is_same_v<P, F32> && std::is_same_v<S, F32>;

// 16-bit parameters compute the spike's prior weight only for the weights that need it: their θ
// compressed, the weights computed, expanded back (csrc/cpu/compact.h). With 10-40% of the
// weights near zero at random places, every span of kSpikeSpan holds one, so the span route
// computes the spike for all. One step, side by side in one process (Intel Xeon, AVX-512): one
// thread, tensors in L3: bf16 0.88-0.91x, bf16 + float32 state 0.78-0.82x, fp16 0.86-0.89x;
// 2 threads, 16M elements: bf16 0.84-0.94x, fp16 0.83-0.88x (0.95x at 50%). float32 parameters
// keep the span route on the AVX-512 path: 0.83-0.87x in L3 but 1.00-1.10x from DRAM, where the
// step waits on memory and the block's extra passes delay its loads. With 8 lanes or 4 the spike
// for every weight costs more than those passes: float32 takes the compressed route there too,
// kCompactLength elements at a time, its streams prefetched (kStreamedLoop). BERT-base lists
// against fused AdamW on ATen's path of the same instruction set, Intel Xeon, builds in turns:
// the avx2 path, 2 threads / 1, 1.38x / 1.34-1.36x -> 1.14-1.16x / 1.14-1.17x (a dense model,
// 2 threads, 1.15x -> 0.95x); the portable path, 6 layers, one thread, 1.57x -> 1.02x.
#if defined(MGPP_CPU_AVX512)
template <typename P>
constexpr bool kCompactSpike = !std::is_same_v<P, F32>;
#else
template <typename P>
constexpr bool kCompactSpike = true;
#endif

// The elements of a block the compressed route checks, compresses and updates at a time: float32
// reads θ from DRAM in its check, and a short run keeps that read inside the reach of the update
// loop's prefetches (kStreamAhead). The avx2 path against fused AdamW, side by side in one
// process, 2 threads / 1: a whole block 1.37x / 1.37x, runs of 256 1.24x / 1.23x, of 128 1.17x /
// 1.16x, of 64 1.34x / 1.34x. bfloat16 measured slower in runs of 128 (avx2 path, 2 threads:
// 1.80x -> 2.09x), so 16-bit formats take the whole block.
template <typename P>
constexpr int64_t kCompactLength = std::is_same_v<P, F32> ? 128 : kBlock;

// Which parameter formats take a block whose first group of spans all needs the spike whole
// (kSpanGroup): float32 and bfloat16 on the AVX-512 path.
#if defined(MGPP_CPU_AVX512)
template <typename P>
constexpr bool kWholeSpikeBlocks = std::is_same_v<P, F32> || std::is_same_v<P, BF16>;
#else
template <typename P>
constexpr bool kWholeSpikeBlocks = false;
#endif

// Which of the spans [first, end) of a block's θ (in the update loop's format) hold a weight
// where the spike matters, into uses_spike; true if every one does. A constant trip count per
// span, so that each check is a few full vectors. The constants by value: through a reference GCC
// left the loop scalar, branching on each θ == 0 (an event step 3x slower).
template <typename PL>
bool check_spans(const typename PL::T* __restrict theta, int64_t first, int64_t end,
                 const PriorConstants prior, bool* __restrict uses_spike) {
  bool every_span = true;
  for (int64_t span = first; span < end; ++span) {
    int spike_lanes = 0;
#pragma omp simd reduction(+ : spike_lanes)
    for (int64_t j = 0; j < kSpikeSpan; ++j) {
      spike_lanes += prior_uses_spike(PL::load(theta[span * kSpikeSpan + j]), prior) ? 1 : 0;
    }
    uses_spike[span] = spike_lanes != 0;
    every_span = every_span && uses_spike[span];
  }
  return every_span;
}

template <typename P, typename S, bool kPrior, bool kHist, bool kMask>
void update_chunk(const StepTensor& t, const Chunk& chunk, const StepOptions& options,
                  uint32_t* histogram) {
  auto* param = static_cast<typename P::T*>(t.param);
  const auto* grad = static_cast<const typename P::T*>(t.grad);
  auto* exp_avg = static_cast<typename S::T*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<typename S::T*>(t.exp_avg_sq);
  const uint8_t* __restrict keep_mask = t.keep_mask;
  const AdamWScalars adamw = t.adamw;
  const PriorConstants prior = options.prior;
  const float inv_grad_scale = options.inv_grad_scale;
  // The slab-only path is exact only where 0·(1/σ0² − 1/σ1²) is 0 (see slab_prior_gradient).
  const bool slab_path_exact = std::isfinite(prior.inv_sigma0_sq - prior.inv_sigma1_sq);
  using PL = LoopFormat<P>;
  using SL = LoopFormat<S>;
  // The L1-resident buffers of staged arrays (kStaged): θ for the block, g, m and v for a piece.
  alignas(64) float theta_buffer[kBlock], grad_piece[kPiece], m_piece[kPiece], v_piece[kPiece];
  // Per element, from before the update loop: the gradients of the split spike path
  // (kSplitSpikePath), or the prior weights of the compressed one (kCompactSpike).
  alignas(64) float prior_buffer[kBlock];
  // The compressed spike path: θ as float32 (bfloat16, which the loop reads as stored), which
  // weights need the spike, and their θ, then their prior weights, compressed.
  alignas(64) float theta_f32[kBlock], spike_weights[kBlock];
  alignas(64) int32_t spike_flags[kBlock];
  uint32_t bins[kBlock];
  uint8_t keep[kBlock];
  bool uses_spike[kBlock / kSpikeSpan];
  constexpr auto kFullTerm = kPrior ? PriorTerm::kSpikeAndSlab : PriorTerm::kNone;
  // Whole groups of an N:M pattern per block when the histogram ranks them.
  const int64_t length = kHist ? block_length(options.pattern) : kBlock;
  for (int64_t block = chunk.begin; block < chunk.end; block += length) {
    const int64_t n = std::min(block + length, chunk.end) - block;
    stage_in<P>(param + block, theta_buffer, n);
    auto* __restrict theta = loop_view<P>(param + block, theta_buffer);
    // Updates [begin, end) of the block's θ view with the given prior term, g, m and v read from
    // their views at `begin` (a staged array's piece buffer). Never inlined: GCC vectorises the
    // outlined loop, but left some inlined copies scalar (bf16 parameters with float32 state).
    // Everything by value: float stores through theta, m and v could otherwise alias captured
    // references and reload the scalars every iteration.
    const uint8_t* __restrict keep_flags = keep;
    float* __restrict prior_values = prior_buffer;
    auto update_views = [theta, keep_flags, prior_values, inv_grad_scale, prior, adamw](
                            int64_t begin, int64_t end, const typename PL::T* g_at,
                            typename SL::T* m_at, typename SL::T* v_at,
                            auto prior_term) __attribute__((noinline)) {
      constexpr bool kWeighted = std::is_same_v<decltype(prior_term), WeightedTerm>;
      constexpr PriorTerm kTerm = kTermOf<decltype(prior_term)>;
      // The scalars as locals: read through the closure, GCC reloaded and recomputed them in
      // every vector iteration (the float stores might alias the closure's members), 15 of the
      // spike path's 76 instructions per 16 elements (61 now; one thread: fp32 1.28 -> 1.21 ns
      // per element, 16-bit 0-3% less: the loop is bound by its dependency chain, not by issue).
      const PriorConstants local_prior = prior;
      const AdamWScalars local_adamw = adamw;
      const float local_inv_grad_scale = inv_grad_scale;
      auto* __restrict theta_at = theta + begin;
      const auto* __restrict g = g_at;
      auto* __restrict m = m_at;
      auto* __restrict v = v_at;
      const uint8_t* __restrict keep_at = keep_flags + begin;
      float* __restrict prior_at = prior_values + begin;
      const int64_t count = end - begin;
      constexpr bool kSplit =
          !kWeighted && kTerm == PriorTerm::kSpikeAndSlab && kSplitSpikePath<P, S>;
      if constexpr (kSplit) {
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) {
          prior_at[i] = step_gradient<kTerm>(PL::load(theta_at[i]), PL::load(g[i]),
                                             local_inv_grad_scale, local_prior);
        }
      }
      // step_element, with the gradient from the first loop when the path is split.
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        float theta_i = PL::load(theta_at[i]);
        float m_i = SL::load(m[i]);
        float v_i = SL::load(v[i]);
        const float g_i =
            kSplit      ? prior_at[i]
            : kWeighted ? weighted_step_gradient(theta_i, PL::load(g[i]), local_inv_grad_scale,
                                                 prior_at[i], local_prior)
                        : step_gradient<kTerm>(theta_i, PL::load(g[i]), local_inv_grad_scale,
                                               local_prior);
        step_update(theta_i, m_i, v_i, g_i, !kMask || keep_at[i] != 0, local_adamw);
        theta_at[i] = PL::store(theta_i);
        m[i] = SL::store(m_i);
        v[i] = SL::store(v_i);
      }
    };
    // update_views piece by piece with the streams prefetched ahead (kStreamedLoop), or with the
    // staged arrays widened and narrowed around it (kPiece). Each route below updates every element
    // of the block once, so each is narrowed once.
    auto update = [&](int64_t begin, int64_t end, auto prior_term) {
      if constexpr (kStreamedLoop<P, S>) {
        for (int64_t piece = begin; piece < end; piece += kStreamPiece) {
          const int64_t piece_end = std::min(piece + kStreamPiece, end);
          const int64_t ahead_begin = block + piece + kStreamAhead;
          const int64_t ahead_end = std::min(block + piece_end + kStreamAhead, chunk.end);
          prefetch_lines(param, ahead_begin, ahead_end);
          prefetch_lines(grad, ahead_begin, ahead_end);
          prefetch_lines(exp_avg, ahead_begin, ahead_end);
          prefetch_lines(exp_avg_sq, ahead_begin, ahead_end);
          update_views(piece, piece_end, grad + block + piece, exp_avg + block + piece,
                       exp_avg_sq + block + piece, prior_term);
        }
      } else if constexpr (!kStaged<P> && !kStaged<S>) {
        update_views(begin, end, grad + block + begin, exp_avg + block + begin,
                     exp_avg_sq + block + begin, prior_term);
      } else {
        for (int64_t piece = begin; piece < end; piece += kPiece) {
          const int64_t count = std::min(kPiece, end - piece);
          if constexpr (kStaged<P>) {
            const int64_t ahead = block + length + piece;
            prefetch_lines(param, std::min(ahead, chunk.end), std::min(ahead + count, chunk.end));
          }
          const auto* g_at = loop_view<P>(grad + block + piece, grad_piece);
          auto* m_at = loop_view<S>(exp_avg + block + piece, m_piece);
          auto* v_at = loop_view<S>(exp_avg_sq + block + piece, v_piece);
          stage_in<P>(grad + block + piece, grad_piece, count);
          stage_in<S>(exp_avg + block + piece, m_piece, count);
          stage_in<S>(exp_avg_sq + block + piece, v_piece, count);
          update_views(piece, piece + count, g_at, m_at, v_at, prior_term);
          stage_out<P>(theta_buffer + piece, param + block + piece, count);
          stage_out<S>(m_piece, exp_avg + block + piece, count);
          stage_out<S>(v_piece, exp_avg_sq + block + piece, count);
        }
      }
    };
    if (kMask) {
      for (int64_t byte = 0; byte * 8 < n; ++byte) {
        memcpy(&keep[8 * byte], &kMaskByteExpansion.bytes[keep_mask[block / 8 + byte]], 8);
      }
    }
    // float32 and, on the AVX-512 path, bfloat16, whose θ a check of the whole block would read
    // from DRAM in a pass of its own: a block whose first group of spans needs the spike in every
    // span is taken whole (kSpanGroup). The first group's checks stay in uses_spike.
    const bool first_group_checked = kPrior && slab_path_exact && kWholeSpikeBlocks<P> &&
                                     n >= kGroupElements;
    if (first_group_checked && check_spans<PL>(theta, 0, kSpanGroup, prior, uses_spike)) {
      update(0, n, Term<kFullTerm>{});
    } else if (kPrior && slab_path_exact && kCompactSpike<P>) {
      // kCompactLength elements at a time: which weights need the spike; none: the slab's term;
      // most: the whole term in the loop; else their prior weights, computed compressed and
      // expanded into prior_buffer.
      for (int64_t run = 0; run < n; run += kCompactLength<P>) {
        const int64_t run_end = std::min(run + kCompactLength<P>, n);
        int spike_count = 0;
#pragma omp simd reduction(+ : spike_count)
        for (int64_t i = run; i < run_end; ++i) {
          const float x = PL::load(theta[i]);
          const bool spike = prior_uses_spike(x, prior);
          if constexpr (!std::is_same_v<PL, F32>) theta_f32[i] = x;
          spike_flags[i] = spike ? -1 : 0;
          spike_count += spike;
        }
        if (spike_count == 0) {
          update(run, run_end, Term<PriorTerm::kSlab>{});
        } else if (2 * spike_count > run_end - run) {
          update(run, run_end, Term<kFullTerm>{});
        } else {
          // float32 and staged float16 θ are read as they are.
          const float* theta_values;
          if constexpr (std::is_same_v<PL, F32>) {
            theta_values = theta;
          } else {
            theta_values = theta_f32;
          }
          compress_flagged(theta_values + run, spike_flags + run, run_end - run, spike_weights);
#pragma omp simd
          for (int64_t k = 0; k < spike_count; ++k) {
            spike_weights[k] = prior_weight(spike_weights[k], prior);
          }
          expand_flagged(spike_weights, spike_flags + run, run_end - run, prior.inv_sigma1_sq,
                         prior_buffer + run);
          update(run, run_end, WeightedTerm{});
        }
      }
    } else if (kPrior && slab_path_exact) {
      // float32 parameters, in groups of kSpanGroup spans: which spans of the group have a
      // weight where the spike matters, then one update call per run of spans of one kind.
      const int64_t spans = n / kSpikeSpan;
      for (int64_t group = 0; group < spans; group += kSpanGroup) {
        const int64_t group_end = std::min(group + kSpanGroup, spans);
        if (group != 0 || !first_group_checked) {
          check_spans<PL>(theta, group, group_end, prior, uses_spike);
        }
        for (int64_t run = group; run < group_end;) {
          int64_t run_end = run + 1;
          while (run_end < group_end && uses_spike[run_end] == uses_spike[run]) ++run_end;
          uses_spike[run]
              ? update(run * kSpikeSpan, run_end * kSpikeSpan, Term<kFullTerm>{})
              : update(run * kSpikeSpan, run_end * kSpikeSpan, Term<PriorTerm::kSlab>{});
          run = run_end;
        }
      }
      update(spans * kSpikeSpan, n, Term<kFullTerm>{});
    } else {
      update(0, n, Term<kFullTerm>{});
    }
    if (kHist) {
      // The histogram counts |θ| as stored: widen the rounded values back.
      const float* __restrict stored = float32_block<P>(param + block, theta_buffer, n);
      block_keys<F32>(stored, n, options.pattern, bins);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) bins[i] = key_high_bin(bins[i]);
      count_high_bins(bins, n, options.window, histogram);
    }
  }
}

template <typename P, typename S>
void fused_step_typed(const StepTensor* tensors, int64_t count, const StepOptions& options,
                      int64_t* high_histogram) {
  const auto chunks = make_chunks(
      count, [&](int64_t t) { return tensors[t].numel; },
      high_histogram != nullptr ? chunk_length(options.pattern) : kChunk);
  const bool hist = high_histogram != nullptr;
  const uint32_t bins = hist ? kHistHighBins : 0;
  parallel_chunks(chunks, options.num_threads, bins, high_histogram,
                  [&](const Chunk& chunk, uint32_t* local) {
    const StepTensor& t = tensors[chunk.tensor];
    const bool mask = t.keep_mask != nullptr;
    // Instantiate each combination so that the inner loop carries no runtime branch.
    if (options.prior_on) {
      if (hist) {
        mask ? update_chunk<P, S, true, true, true>(t, chunk, options, local)
             : update_chunk<P, S, true, true, false>(t, chunk, options, local);
      } else {
        mask ? update_chunk<P, S, true, false, true>(t, chunk, options, local)
             : update_chunk<P, S, true, false, false>(t, chunk, options, local);
      }
    } else {
      if (hist) {
        mask ? update_chunk<P, S, false, true, true>(t, chunk, options, local)
             : update_chunk<P, S, false, true, false>(t, chunk, options, local);
      } else {
        mask ? update_chunk<P, S, false, false, true>(t, chunk, options, local)
             : update_chunk<P, S, false, false, false>(t, chunk, options, local);
      }
    }
  });
}

template <typename P>
void high_histogram_chunk(const ValueTensor& t, const Chunk& chunk, Pattern pattern,
                          uint32_t* histogram) {
  const auto* __restrict data = static_cast<const typename P::T*>(t.data);
  const int64_t length = block_length(pattern);
  uint32_t bins[kBlock];
  for (int64_t block = chunk.begin; block < chunk.end; block += length) {
    const int64_t n = std::min(block + length, chunk.end) - block;
    prefetch_next_block(data, block, length, chunk.end);
    block_keys<P>(data + block, n, pattern, bins);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) bins[i] = key_high_bin(bins[i]);
    count_bins(bins, n, histogram, copy_stride(kHistHighBins));
  }
}

template <typename P>
void low_histogram_chunk(const ValueTensor& t, const Chunk& chunk, uint32_t high_bin,
                         Pattern pattern, uint32_t* histogram) {
  const auto* __restrict data = static_cast<const typename P::T*>(t.data);
  const int64_t block_size = block_length(pattern);
  uint32_t keys[kBlock];
  uint32_t lows[kBlock];
  for (int64_t block = chunk.begin; block < chunk.end; block += block_size) {
    const int64_t n = std::min(block + block_size, chunk.end) - block;
    prefetch_next_block(data, block, block_size, chunk.end);
    block_keys<P>(data + block, n, pattern, keys);
    const int64_t m = collect_bin<false>(keys, n, high_bin, 0, lows, nullptr);
    count_bins(lows, m, histogram, copy_stride(kHistLowBins));
  }
}

// x = +0 where `below`. The AVX-512 builds store only where x changes, as masked stores, so that
// the cache lines of weights pruned before stay clean. Elsewhere the others are stored back
// unchanged, as GCC vectorises a conditional store there only for 32-bit elements (vpmaskmovd):
// the AVX2 threshold pass then measured 1.3-1.5x faster, float32 included (at an event nearly
// every cache line holds an element that is zeroed).
template <typename P>
void zero_below(typename P::T& x, bool below) {
#if defined(MGPP_CPU_AVX512)
  // -0 becomes +0 too: the bits, not the value, are compared with +0's (all zero in every format).
  bool positive_zero;
  if constexpr (std::is_same_v<P, F32>) {
    positive_zero = float_to_bits(x) == 0u;
  } else {
    positive_zero = x == 0u;
  }
  if (below && !positive_zero) x = P::store(0.0f);
#else
  x = below ? P::store(0.0f) : x;
#endif
}

// Writes the packed keep bits of elements [begin, end) of a chunk (begin a multiple of 8) from
// their kept flags.
void write_mask_bytes(const uint8_t* kept, int64_t begin, int64_t end, uint8_t* keep_mask) {
  for (int64_t byte = begin / 8; byte * 8 < end; ++byte) {
    uint32_t bits = 0;
    for (int64_t bit = 0; bit < 8 && byte * 8 + bit < end; ++bit) {
      bits |= static_cast<uint32_t>(kept[byte * 8 + bit - begin]) << bit;
    }
    keep_mask[byte] = static_cast<uint8_t>(bits);
  }
}

template <typename P>
void threshold_chunk(const ValueTensor& t, uint8_t* keep_mask, const Chunk& chunk,
                     uint32_t tau_key, Pattern pattern) {
  auto* data = static_cast<typename P::T*>(t.data);
  const int64_t length = block_length(pattern);
  const bool at_tau = pattern.m != 0;
  uint32_t keys[kBlock];
  uint8_t kept[kBlock];
  for (int64_t block = chunk.begin; block < chunk.end; block += length) {
    const int64_t n = std::min(block + length, chunk.end) - block;
    prefetch_next_block(data, block, length, chunk.end);
    block_keys<P>(data + block, n, pattern, keys);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const bool below = below_threshold(keys[i], tau_key, at_tau);
      kept[i] = !below;
      zero_below<P>(data[block + i], below);
    }
    if (keep_mask != nullptr) write_mask_bytes(kept, block, block + n, keep_mask);
  }
}

// Where partition_chunk puts the positions it collects, from every thread.
struct Collection {
  uint32_t* positions;
  int64_t capacity;
  std::atomic<int64_t> collected{0};
};

template <typename P>
void partition_chunk(const ValueTensor& t, int64_t flat_offset, uint8_t* keep_mask,
                     const Chunk& chunk, uint32_t high_bin, Pattern pattern,
                     Collection& collection, uint32_t* low_histogram) {
  auto* data = static_cast<typename P::T*>(t.data);
  const int64_t length = block_length(pattern);
  uint32_t keys[kBlock];
  uint8_t kept[kBlock];
  uint32_t found[kBlock];
  uint32_t lows[kBlock];
  for (int64_t block = chunk.begin; block < chunk.end; block += length) {
    const int64_t n = std::min(block + length, chunk.end) - block;
    prefetch_next_block(data, block, length, chunk.end);
    block_keys<P>(data + block, n, pattern, keys);
    // Below τ's bin means below τ (τ is finite or +inf): zeroed. The bin and above: kept for now.
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const bool below = key_high_bin(keys[i]) < high_bin;
      kept[i] = !below;
      zero_below<P>(data[block + i], below);
    }
    if (keep_mask != nullptr) write_mask_bytes(kept, block, block + n, keep_mask);
    const int64_t n_found = collect_bin<true>(keys, n, high_bin,
                                              static_cast<uint32_t>(flat_offset + block), lows,
                                              found);
    count_bins(lows, n_found, low_histogram, copy_stride(kHistLowBins));
    if (n_found == 0) continue;
    const int64_t at = collection.collected.fetch_add(n_found, std::memory_order_relaxed);
    if (at + n_found > collection.capacity) continue;  // reported by partition_at_bin
    memcpy(collection.positions + at, found, static_cast<size_t>(n_found) * sizeof(uint32_t));
  }
}

// |x| of element `index` of a tensor of any dtype, as a key.
uint32_t key_of(const PrunedTensor& t, int64_t index) {
  uint32_t key = 0;
  dispatch_dtype(t.dtype, [&](auto format) {
    using P = decltype(format);
    key = abs_key(P::load(static_cast<const typename P::T*>(t.data)[index]));
  });
  return key;
}

void zero_element(const PrunedTensor& t, int64_t index) {
  dispatch_dtype(t.dtype, [&](auto format) {
    using P = decltype(format);
    static_cast<typename P::T*>(t.data)[index] = P::store(0.0f);
  });
}

}  // namespace

void fused_step(const StepTensor* tensors, int64_t count, const StepOptions& options,
                int64_t* high_histogram) {
  dispatch_step_dtypes(options.param_dtype, options.state_dtype, [&](auto param, auto state) {
    fused_step_typed<decltype(param), decltype(state)>(tensors, count, options, high_histogram);
  });
}

void count_histogram(const ValueTensor* tensors, int64_t count, DType dtype, int level,
                     uint32_t high_bin, int64_t* histogram, int num_threads, Pattern pattern) {
  const auto chunks =
      make_chunks(count, [&](int64_t t) { return tensors[t].numel; }, chunk_length(pattern));
  const uint32_t bins = level == 0 ? kHistHighBins : kHistLowBins;
  dispatch_dtype(dtype, [&](auto tag) {
    using P = decltype(tag);
    parallel_chunks(chunks, num_threads, bins, histogram,
                    [&](const Chunk& chunk, uint32_t* local) {
      if (level == 0) {
        high_histogram_chunk<P>(tensors[chunk.tensor], chunk, pattern, local);
      } else {
        low_histogram_chunk<P>(tensors[chunk.tensor], chunk, high_bin, pattern, local);
      }
    });
  });
}

void apply_threshold(const ValueTensor* tensors, uint8_t* const* keep_masks, int64_t count,
                     DType dtype, uint32_t tau_key, int num_threads, Pattern pattern) {
  const auto chunks =
      make_chunks(count, [&](int64_t t) { return tensors[t].numel; }, chunk_length(pattern));
  dispatch_dtype(dtype, [&](auto tag) {
    using P = decltype(tag);
    parallel_chunks(chunks, num_threads, 0, nullptr, [&](const Chunk& chunk, uint32_t*) {
      uint8_t* mask = keep_masks == nullptr ? nullptr : keep_masks[chunk.tensor];
      threshold_chunk<P>(tensors[chunk.tensor], mask, chunk, tau_key, pattern);
    });
  });
}

int64_t partition_at_bin(const ValueTensor* tensors, const int64_t* flat_offsets,
                         uint8_t* const* keep_masks, int64_t count, DType dtype, uint32_t high_bin,
                         uint32_t* positions, int64_t capacity, int64_t* low_histogram,
                         int num_threads, Pattern pattern) {
  const auto chunks =
      make_chunks(count, [&](int64_t t) { return tensors[t].numel; }, chunk_length(pattern));
  Collection collection{positions, capacity};
  dispatch_dtype(dtype, [&](auto tag) {
    using P = decltype(tag);
    parallel_chunks(chunks, num_threads, kHistLowBins, low_histogram,
                    [&](const Chunk& chunk, uint32_t* local) {
      uint8_t* mask = keep_masks == nullptr ? nullptr : keep_masks[chunk.tensor];
      partition_chunk<P>(tensors[chunk.tensor], flat_offsets[chunk.tensor], mask, chunk, high_bin,
                         pattern, collection, local);
    });
  });
  const int64_t collected = collection.collected.load();
  if (collected > capacity) {
    throw std::length_error("mgpp: τ's bin holds " + std::to_string(collected) +
                            " elements, more than the " + std::to_string(capacity) +
                            " positions given");
  }
  return collected;
}

void prune_collected(const PrunedTensor* tensors, int64_t count, const uint32_t* positions,
                     int64_t num_positions, uint32_t tau_key, int num_threads, Pattern pattern) {
  if (num_positions == 0) return;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(num_threads, num_positions / 4096 + 1)));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < num_positions; ++p) {
    const int64_t position = positions[p];
    // The last tensor starting at or before the position (empty tensors start where the next does).
    const PrunedTensor* t =
        std::upper_bound(tensors, tensors + count, position,
                         [](int64_t at, const PrunedTensor& x) { return at < x.flat_offset; }) - 1;
    const int64_t index = position - t->flat_offset;
    // Every collected element of an N:M pool is a candidate (the others' keys are above τ's bin).
    if (!below_threshold(key_of(*t, index), tau_key, pattern.m != 0)) continue;
    zero_element(*t, index);
    // Two positions of one mask byte may belong to two threads.
    if (t->keep_mask != nullptr) {
      __atomic_fetch_and(&t->keep_mask[index / 8], static_cast<uint8_t>(~(1u << (index % 8))),
                         __ATOMIC_RELAXED);
    }
  }
}

std::string build_info() {
  std::string isa = "SSE2";
#if defined(__AVX512F__)
  isa = "AVX-512";
#elif defined(__AVX2__)
  isa = "AVX2";
#elif defined(__aarch64__)
  isa = "aarch64";
#endif
#if defined(__FMA__)
  isa += " FMA";
#endif
#if defined(__F16C__)
  isa += " F16C";
#endif
  return std::string("cpu kernels: -march=") + MGPP_EXPAND_AND_STRINGIFY(MGPP_CPU_ARCH) + " (" +
         isa + "; conversions " + kConversionPaths + "; compress/expand " + MGPP_COMPRESS_PATH +
         "), OpenMP " + std::to_string(_OPENMP) + ", compiler " + __VERSION__;
}

}  // namespace cpu
}  // namespace MGPP_NAMESPACE
