// The bodies of the CUDA kernels, written once for the device and for the host-side emulated grid
// of csrc/tests/test_cuda_emulated.cpp. No CUDA runtime and no torch here: nvcc and g++ both
// compile this header.
//
// Multi-tensor apply, as PyTorch's MultiTensorApply.cuh and apex do: a launch carries a table of
// up to kMaxTensors tensors in its kernel arguments, and every block runs one chunk of one tensor.
// Blocks find their tensor by binary search over the table's first-block offsets, so the number
// of blocks per launch is not bounded by the argument size, and a step launches once per
// kMaxTensors tensors of one dtype pair (plan.h fills the tables). The tables take up to 32 KiB of
// kernel arguments, which needs CUDA 12.1 or newer (toolkit and driver) on sm_70 or newer.
//
// A kernel is a struct with `Args` (the kernel argument), `BlockState` (a __shared__ struct),
// kPhases and kMaxThreads, and a `phase(p, thread, args, state)` function template: the device
// runs the phases in order with a __syncthreads() between them; the emulator runs phase p of
// every thread of a block before phase p + 1. `Thread` supplies the block and thread indices and
// the few operations that differ between the device and the host:
//   int64_t block() const; int thread() const; int block_dim() const;
//   uint32_t* shared_words() const;                     // the block's dynamic shared memory
//   void atomic_add_shared(uint32_t* word, uint32_t value) const;
//   void atomic_add_global(unsigned long long* counter, unsigned long long value) const;
//   Bytes16 load16(const void* address) const;          // 128-bit, address 16-byte aligned
//   void store16(void* address, const Bytes16& value) const;
#pragma once

#include <math.h>
#include <stdint.h>

#include "../core/formats.h"
#include "../core/layout.h"
#include "../core/schedule.h"
#include "../core/selection.h"
#include "../core/step.h"

// Unrolled loops keep the lanes of a Vector in registers (nvcc otherwise may put them on the stack).
// Only in the device pass: the host compiler of nvcc's host pass does not know the pragma.
#if defined(__CUDA_ARCH__)
#define MGPP_UNROLL _Pragma("unroll")
#else
#define MGPP_UNROLL
#endif

namespace MGPP_NAMESPACE {
namespace cuda {

// Elements per block. Below 2^16 so that a block's uint16 shared counters cannot overflow, and a
// multiple of 8 so that a byte of a packed mask and a 16-byte vector never straddle two blocks.
constexpr int64_t kChunkSize = 32768;
constexpr int kBlockThreads = 512;
constexpr int kSelectThreads = 1024;
// The largest kernel argument CUDA 12.1+ accepts; the tables below stay under it.
constexpr size_t kMaxArgBytes = 32764;

// Where a kernel counts its histogram: nowhere; in uint16 counters in shared memory merged into
// the global int64 counters by atomics at the end of the block; or with global atomics directly
// (on devices whose shared memory per block cannot hold the counters).
enum HistogramMode : int32_t { kNoHistogram = 0, kSharedHistogram = 1, kGlobalHistogram = 2 };

constexpr size_t shared_histogram_bytes(uint32_t bins) { return bins * sizeof(uint16_t); }

struct alignas(16) Bytes16 {
  uint32_t word[4];
};

// ---- 128-bit vectors ------------------------------------------------------------------------------

// N elements of a 4- or 2-byte storage type, moved with 128-bit loads and stores.
template <typename T, int N>
struct Vector {
  static_assert(N * sizeof(T) % 16 == 0, "a Vector is a whole number of 16-byte words");
  static constexpr int kWords = static_cast<int>(N * sizeof(T) / 16);
  Bytes16 words[kWords];

  template <class Thread>
  MGPP_HD void load(const Thread& th, const T* address) {
    MGPP_UNROLL for (int w = 0; w < kWords; ++w) words[w] = th.load16(address + w * (16 / sizeof(T)));
  }
  template <class Thread>
  MGPP_HD void store(const Thread& th, T* address) const {
    MGPP_UNROLL for (int w = 0; w < kWords; ++w) th.store16(address + w * (16 / sizeof(T)), words[w]);
  }
  MGPP_HD T get(int j) const {
    if constexpr (sizeof(T) == 4) {
      return bits_to_float(words[j / 4].word[j % 4]);
    } else {
      return static_cast<T>(words[j / 8].word[(j / 2) % 4] >> ((j % 2) * 16));
    }
  }
  MGPP_HD void set(int j, T x) {
    if constexpr (sizeof(T) == 4) {
      words[j / 4].word[j % 4] = float_to_bits(x);
    } else {
      uint32_t& word = words[j / 8].word[(j / 2) % 4];
      const int shift = (j % 2) * 16;
      word = (word & ~(0xFFFFu << shift)) | (static_cast<uint32_t>(x) << shift);
    }
  }
};

template <typename T>
MGPP_HD bool aligned16(const T* address) {
  return (reinterpret_cast<uintptr_t>(address) & 15u) == 0;
}

// ---- block → (tensor, chunk) ---------------------------------------------------------------------

struct ChunkRange {
  int32_t slot;  // the tensor's index in the launch's table
  int64_t begin;
  int64_t end;
};

// first_block[s] is the first block of table slot s; slots hold no empty tensors, so the offsets
// increase strictly and the block's slot is the last one whose offset is <= block.
MGPP_HD ChunkRange locate_chunk(const int32_t* first_block, const int64_t* numel, int32_t count,
                                int64_t chunk_size, int64_t block) {
  int32_t low = 0;
  int32_t high = count - 1;
  while (low < high) {
    const int32_t mid = (low + high + 1) / 2;
    if (first_block[mid] <= block) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  const int64_t begin = (block - first_block[low]) * chunk_size;
  const int64_t end = begin + chunk_size < numel[low] ? begin + chunk_size : numel[low];
  return ChunkRange{low, begin, end};
}

// ---- histogram counters ----------------------------------------------------------------------------
// Shared counters are uint16, two per 32-bit word (bin b in the low half of word b/2 when b is
// even): a block counts at most kChunkSize < 2^16 elements, so they cannot overflow.

template <class Thread>
MGPP_HD void zero_shared_histogram(const Thread& th, uint32_t bins) {
  uint32_t* words = th.shared_words();
  for (uint32_t w = static_cast<uint32_t>(th.thread()); w < bins / 2;
       w += static_cast<uint32_t>(th.block_dim())) {
    words[w] = 0u;
  }
}

template <class Thread>
MGPP_HD void count_bin(const Thread& th, int32_t mode, unsigned long long* histogram, uint32_t bin) {
  if (mode == kSharedHistogram) {
    th.atomic_add_shared(th.shared_words() + bin / 2, 1u << ((bin % 2) * 16));
  } else {
    th.atomic_add_global(histogram + bin, 1ull);
  }
}

template <class Thread>
MGPP_HD void merge_shared_histogram(const Thread& th, uint32_t bins, unsigned long long* histogram) {
  const uint32_t* words = th.shared_words();
  for (uint32_t w = static_cast<uint32_t>(th.thread()); w < bins / 2;
       w += static_cast<uint32_t>(th.block_dim())) {
    const uint32_t pair = words[w];
    if ((pair & 0xFFFFu) != 0) th.atomic_add_global(histogram + 2 * w, pair & 0xFFFFu);
    if ((pair >> 16) != 0) th.atomic_add_global(histogram + 2 * w + 1, pair >> 16);
  }
}

// ---- fused step --------------------------------------------------------------------------------

struct FusedStepArgs {
  static constexpr int kMaxTensors = 384;
  int32_t num_tensors;
  int32_t histogram_mode;
  int64_t chunk_size;
  const double* scalars;
  const float* grad_scale;
  unsigned long long* histogram;  // kHistHighBins int64 counters
  const double* current;          // the step's row of the device schedule, or null
  int32_t first_block[kMaxTensors + 1];
  int64_t numel[kMaxTensors];
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  const uint8_t* keep_mask[kMaxTensors];
  const float* step[kMaxTensors];
};
static_assert(sizeof(FusedStepArgs) <= kMaxArgBytes, "FusedStepArgs exceeds the argument limit");

struct FusedStepBlock {
  AdamWScalars adamw;
  PriorConstants prior;
  float inv_grad_scale;
  int32_t prior_on;
  int32_t skip;   // a skipped step on the device schedule: the block writes nothing
  int32_t count;  // the block adds its updated |θ| to the histogram
  ChunkRange chunk;
};

template <class P, class S>
struct FusedStepKernel {
  using Args = FusedStepArgs;
  using BlockState = FusedStepBlock;
  using PT = typename P::T;
  using ST = typename S::T;
  static constexpr int kPhases = 3;
  static constexpr int kMaxThreads = kBlockThreads;
  // Elements per vector step: 16 bytes of the narrower of the parameter and state types.
  static constexpr int kVector = static_cast<int>(16 / (sizeof(PT) < sizeof(ST) ? sizeof(PT) : sizeof(ST)));

  template <class Thread>
  static MGPP_HD void phase(int p, const Thread& th, const Args& a, BlockState& st) {
    if (p == 0) {
      prepare(th, a, st);
    } else if (p == 1) {
      update(th, a, st);
    } else if (a.histogram_mode == kSharedHistogram) {
      merge_shared_histogram(th, kHistHighBins, a.histogram);
    }
  }

  // Thread 0 reads the block's tensor and the step's constants from device memory.
  template <class Thread>
  static MGPP_HD void prepare(const Thread& th, const Args& a, BlockState& st) {
    if (a.histogram_mode == kSharedHistogram) zero_shared_histogram(th, kHistHighBins);
    if (th.thread() != 0) return;
    st.chunk = locate_chunk(a.first_block, a.numel, a.num_tensors, a.chunk_size, th.block());
    st.skip = step_skipped(a.current);
    st.count = a.histogram_mode != kNoHistogram && step_prunes(a.current);
    if (st.skip) return;
    st.adamw = adamw_scalars(a.scalars, static_cast<double>(*a.step[st.chunk.slot]));
    st.prior = step_prior(a.scalars, a.current);
    st.prior_on = step_prior_on(a.scalars, a.current);
    st.inv_grad_scale = a.grad_scale != nullptr ? 1.0f / *a.grad_scale : 1.0f;
  }

  // The per-element step of the CPU kernel (csrc/core/step.h), on this block's constants.
  static MGPP_HD void update_element(PT& param, PT grad, ST& exp_avg, ST& exp_avg_sq, bool keep,
                                     const BlockState& st) {
    float theta = P::load(param);
    float m = S::load(exp_avg);
    float v = S::load(exp_avg_sq);
    if (st.prior_on) {
      step_element<PriorTerm::kSpikeAndSlab>(theta, m, v, P::load(grad), keep, st.inv_grad_scale,
                                             st.prior, st.adamw);
    } else {
      step_element<PriorTerm::kNone>(theta, m, v, P::load(grad), keep, st.inv_grad_scale, st.prior,
                                     st.adamw);
    }
    param = P::store(theta);
    exp_avg = S::store(m);
    exp_avg_sq = S::store(v);
  }

  static MGPP_HD bool keep_bit(const uint8_t* mask, int64_t i) {
    return mask == nullptr || ((mask[i >> 3] >> (i & 7)) & 1) != 0;
  }

  template <class Thread>
  static MGPP_HD void update(const Thread& th, const Args& a, const BlockState& st) {
    if (st.skip) return;
    const int32_t slot = st.chunk.slot;
    const int64_t begin = st.chunk.begin;
    const int64_t end = st.chunk.end;
    PT* param = static_cast<PT*>(a.param[slot]);
    const PT* grad = static_cast<const PT*>(a.grad[slot]);
    ST* exp_avg = static_cast<ST*>(a.exp_avg[slot]);
    ST* exp_avg_sq = static_cast<ST*>(a.exp_avg_sq[slot]);
    const uint8_t* mask = a.keep_mask[slot];
    const bool count = st.count != 0;
    // 128-bit accesses when all four arrays are 16-byte aligned at the chunk's start (chunk sizes
    // are multiples of 16 bytes, so then every vector is aligned); a scalar loop does the rest.
    const bool aligned = aligned16(param + begin) && aligned16(grad + begin) &&
                         aligned16(exp_avg + begin) && aligned16(exp_avg_sq + begin);
    const int64_t vector_end = aligned ? begin + (end - begin) / kVector * kVector : begin;
    const int64_t threads = th.block_dim();
    for (int64_t i = begin + th.thread() * int64_t{kVector}; i < vector_end; i += threads * kVector) {
      Vector<PT, kVector> p, g;
      Vector<ST, kVector> m, v;
      p.load(th, param + i);
      g.load(th, grad + i);
      m.load(th, exp_avg + i);
      v.load(th, exp_avg_sq + i);
      MGPP_UNROLL for (int j = 0; j < kVector; ++j) {
        PT pj = p.get(j);
        ST mj = m.get(j);
        ST vj = v.get(j);
        update_element(pj, g.get(j), mj, vj, keep_bit(mask, i + j), st);
        p.set(j, pj);
        m.set(j, mj);
        v.set(j, vj);
        if (count) count_bin(th, a.histogram_mode, a.histogram, key_high_bin(abs_key(P::load(pj))));
      }
      p.store(th, param + i);
      m.store(th, exp_avg + i);
      v.store(th, exp_avg_sq + i);
    }
    for (int64_t i = vector_end + th.thread(); i < end; i += threads) {
      PT p = param[i];
      ST m = exp_avg[i];
      ST v = exp_avg_sq[i];
      update_element(p, grad[i], m, v, keep_bit(mask, i), st);
      param[i] = p;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      if (count) count_bin(th, a.histogram_mode, a.histogram, key_high_bin(abs_key(P::load(p))));
    }
  }
};

// ---- |x| histogram (radix levels 0 and 1) ------------------------------------------------------

struct HistogramArgs {
  static constexpr int kMaxTensors = 1024;
  int32_t num_tensors;
  int32_t histogram_mode;
  int32_t level;
  int64_t chunk_size;
  const int64_t* selection;       // level 1 counts the high bin of selection[kSelKey]
  unsigned long long* histogram;  // kHistHighBins (level 0) or kHistLowBins (level 1) counters
  const double* current;          // the step's row of the device schedule, or null
  Pattern pattern;                // N:M: each group's candidates only (m = 0: every element)
  int32_t first_block[kMaxTensors + 1];
  int64_t numel[kMaxTensors];
  const void* data[kMaxTensors];
};
static_assert(sizeof(HistogramArgs) <= kMaxArgBytes, "HistogramArgs exceeds the argument limit");

struct HistogramBlock {
  ChunkRange chunk;
  uint32_t high_bin;
};

template <class P>
struct HistogramKernel {
  using Args = HistogramArgs;
  using BlockState = HistogramBlock;
  using T = typename P::T;
  static constexpr int kPhases = 3;
  static constexpr int kMaxThreads = kBlockThreads;
  static constexpr int kVector = static_cast<int>(16 / sizeof(T));

  static MGPP_HD uint32_t bins(int32_t level) { return level == 0 ? kHistHighBins : kHistLowBins; }

  template <class Thread>
  static MGPP_HD void phase(int p, const Thread& th, const Args& a, BlockState& st) {
    if (!step_prunes(a.current)) return;  // every thread of every phase: no event this step
    if (p == 0) {
      if (a.histogram_mode == kSharedHistogram) zero_shared_histogram(th, bins(a.level));
      if (th.thread() == 0) {
        st.chunk = locate_chunk(a.first_block, a.numel, a.num_tensors, a.chunk_size, th.block());
        st.high_bin = a.level == 0 ? 0u : key_high_bin(static_cast<uint32_t>(a.selection[kSelKey]));
      }
    } else if (p == 1) {
      count(th, a, st);
    } else if (a.histogram_mode == kSharedHistogram) {
      merge_shared_histogram(th, bins(a.level), a.histogram);
    }
  }

  template <class Thread>
  static MGPP_HD void count_key(const Thread& th, const Args& a, uint32_t high_bin, uint32_t key) {
    if (a.level == 0) {
      count_bin(th, a.histogram_mode, a.histogram, key_high_bin(key));
    } else if (key_high_bin(key) == high_bin) {
      count_bin(th, a.histogram_mode, a.histogram, key_low_bin(key));
    }
  }

  // N:M: each thread takes whole groups (a chunk holds whole groups), ranks them in registers
  // and counts the candidates' keys, the others' as kNotCandidateKey.
  template <class Thread>
  static MGPP_HD void count_groups(const Thread& th, const Args& a, const BlockState& st) {
    const T* data = static_cast<const T*>(a.data[st.chunk.slot]);
    const int m = a.pattern.m;
    for (int64_t g = st.chunk.begin + int64_t{m} * th.thread(); g < st.chunk.end;
         g += int64_t{m} * th.block_dim()) {
      uint32_t keys[16];
      for (int j = 0; j < m; ++j) keys[j] = abs_key(P::load(data[g + j]));
      keep_candidate_keys(keys, m, m - a.pattern.n);
      for (int j = 0; j < m; ++j) count_key(th, a, st.high_bin, keys[j]);
    }
  }

  template <class Thread>
  static MGPP_HD void count(const Thread& th, const Args& a, const BlockState& st) {
    if (a.pattern.m != 0) {
      count_groups(th, a, st);
      return;
    }
    const T* data = static_cast<const T*>(a.data[st.chunk.slot]);
    const int64_t begin = st.chunk.begin;
    const int64_t end = st.chunk.end;
    const int64_t vector_end = aligned16(data + begin) ? begin + (end - begin) / kVector * kVector : begin;
    const int64_t threads = th.block_dim();
    for (int64_t i = begin + th.thread() * int64_t{kVector}; i < vector_end; i += threads * kVector) {
      Vector<T, kVector> x;
      x.load(th, data + i);
      MGPP_UNROLL for (int j = 0; j < kVector; ++j) count_key(th, a, st.high_bin, abs_key(P::load(x.get(j))));
    }
    for (int64_t i = vector_end + th.thread(); i < end; i += threads) {
      count_key(th, a, st.high_bin, abs_key(P::load(data[i])));
    }
  }
};

// ---- threshold ---------------------------------------------------------------------------------

struct ThresholdArgs {
  static constexpr int kMaxTensors = 1024;
  int32_t num_tensors;
  int64_t chunk_size;
  const int64_t* selection;  // τ's key is selection[kSelKey]
  const double* current;     // the step's row of the device schedule, or null
  Pattern pattern;           // N:M: zero each group's candidates at or below τ (m = 0: below τ)
  int32_t first_block[kMaxTensors + 1];
  int64_t numel[kMaxTensors];
  void* data[kMaxTensors];
  uint8_t* keep_mask[kMaxTensors];  // null: no mask to write
};
static_assert(sizeof(ThresholdArgs) <= kMaxArgBytes, "ThresholdArgs exceeds the argument limit");

struct ThresholdBlock {
  ChunkRange chunk;
  uint32_t tau_key;
  int32_t write_mask;  // on the device schedule, masks are written at the freeze only
};

template <class P>
struct ThresholdKernel {
  using Args = ThresholdArgs;
  using BlockState = ThresholdBlock;
  using T = typename P::T;
  static constexpr int kPhases = 2;
  static constexpr int kMaxThreads = kBlockThreads;

  template <class Thread>
  static MGPP_HD void phase(int p, const Thread& th, const Args& a, BlockState& st) {
    if (!step_prunes(a.current)) return;
    if (p == 0) {
      if (th.thread() == 0) {
        st.chunk = locate_chunk(a.first_block, a.numel, a.num_tensors, a.chunk_size, th.block());
        st.tau_key = static_cast<uint32_t>(a.selection[kSelKey]);
        st.write_mask = step_freezes(a.current);
      }
    } else {
      apply(th, a, st);
    }
  }

  // N:M: each thread takes nm_unit(M) elements, whole groups and whole mask bytes (a chunk holds
  // whole units), ranks each group in registers and zeroes its candidates at or below τ.
  template <class Thread>
  static MGPP_HD void apply_groups(const Thread& th, const Args& a, const BlockState& st) {
    T* data = static_cast<T*>(a.data[st.chunk.slot]);
    uint8_t* mask = st.write_mask ? a.keep_mask[st.chunk.slot] : nullptr;
    const int m = a.pattern.m;
    const int unit = nm_unit(m);
    const int64_t end = st.chunk.end;
    for (int64_t i = st.chunk.begin + int64_t{unit} * th.thread(); i < end;
         i += int64_t{unit} * th.block_dim()) {
      uint8_t keep_bytes[16] = {};
      for (int g = 0; g < unit && i + g < end; g += m) {
        uint32_t keys[16];
        for (int j = 0; j < m; ++j) keys[j] = abs_key(P::load(data[i + g + j]));
        keep_candidate_keys(keys, m, m - a.pattern.n);
        for (int j = 0; j < m; ++j) {
          const bool below = below_threshold(keys[j], st.tau_key, true);
          if (below) data[i + g + j] = P::store(0.0f);
          keep_bytes[(g + j) / 8] |= static_cast<uint8_t>(!below << ((g + j) % 8));
        }
      }
      if (mask == nullptr) continue;
      for (int b = 0; b < unit / 8 && i + 8 * b < end; ++b) mask[(i >> 3) + b] = keep_bytes[b];
    }
  }

  // Each thread takes groups of 8 elements: one byte of the packed mask. A group is rewritten
  // only when one of its elements is zeroed.
  template <class Thread>
  static MGPP_HD void apply(const Thread& th, const Args& a, const BlockState& st) {
    if (a.pattern.m != 0) {
      apply_groups(th, a, st);
      return;
    }
    T* data = static_cast<T*>(a.data[st.chunk.slot]);
    uint8_t* mask = st.write_mask ? a.keep_mask[st.chunk.slot] : nullptr;
    const int64_t begin = st.chunk.begin;
    const int64_t end = st.chunk.end;
    const bool aligned = aligned16(data + begin);
    const uint32_t tau_key = st.tau_key;
    for (int64_t i = begin + 8 * int64_t{th.thread()}; i < end; i += 8 * int64_t{th.block_dim()}) {
      uint32_t keep_bits = 0;
      if (aligned && i + 8 <= end) {
        Vector<T, 8> x;
        x.load(th, data + i);
        bool changed = false;
        MGPP_UNROLL for (int j = 0; j < 8; ++j) {
          const bool below = below_threshold(abs_key(P::load(x.get(j))), tau_key);
          if (below) x.set(j, P::store(0.0f));
          changed = changed || below;
          keep_bits |= static_cast<uint32_t>(!below) << j;
        }
        if (changed) x.store(th, data + i);
      } else {
        for (int j = 0; j < 8 && i + j < end; ++j) {
          const bool below = below_threshold(abs_key(P::load(data[i + j])), tau_key);
          if (below) data[i + j] = P::store(0.0f);
          keep_bits |= static_cast<uint32_t>(!below) << j;
        }
      }
      if (mask != nullptr) mask[i >> 3] = static_cast<uint8_t>(keep_bits);
    }
  }
};

// ---- radix selection -----------------------------------------------------------------------------

struct SelectArgs {
  const int64_t* histogram;
  int64_t* selection;
  int32_t level;
  const double* current;  // the step's row of the device schedule, or null
};

struct SelectBlock {
  int64_t segment_sum[kSelectThreads];
};

// select_bin (csrc/core/selection.h) with one block: each thread sums a segment of bins, then thread
// 0 walks the segment sums and scans only the segment that holds the rank. The result is
// select_bin's, bin for bin (csrc/tests/test_cuda_emulated.cpp checks it); one thread walking
// all 65536 bins of global memory would take milliseconds.
struct SelectKernel {
  using Args = SelectArgs;
  using BlockState = SelectBlock;
  static constexpr int kPhases = 2;
  static constexpr int kMaxThreads = kSelectThreads;

  template <class Thread>
  static MGPP_HD void phase(int p, const Thread& th, const Args& a, BlockState& st) {
    if (!step_prunes(a.current)) return;
    const uint32_t bins = a.level == 0 ? kHistHighBins : kHistLowBins;
    const uint32_t segments = static_cast<uint32_t>(th.block_dim());  // a power of two <= 1024
    const uint32_t segment_bins = bins / segments;
    if (p == 0) {
      const uint32_t first = static_cast<uint32_t>(th.thread()) * segment_bins;
      int64_t sum = 0;
      for (uint32_t b = first; b < first + segment_bins; ++b) sum += a.histogram[b];
      st.segment_sum[th.thread()] = sum;
      return;
    }
    if (th.thread() != 0) return;
    int64_t* selection = a.selection;
    const int64_t rank = selection[kSelRank];
    int64_t before = 0;
    uint32_t segment = 0;
    for (; segment + 1 < segments; ++segment) {
      if (before + st.segment_sum[segment] >= rank) break;
      before += st.segment_sum[segment];
    }
    uint32_t bin = segment * segment_bins;
    const uint32_t segment_end = bin + segment_bins;
    for (; bin + 1 < segment_end; ++bin) {
      if (before + a.histogram[bin] >= rank) break;
      before += a.histogram[bin];
    }
    record_bin(a.level, bin, before, a.histogram[bin], selection);
  }
};

// ---- the device schedule's step row -------------------------------------------------------------

struct ScheduleArgs {
  const double* table;  // rows × kNumScheduleColumns
  int64_t rows;
  int64_t* position;    // t
  const float* found_inf;  // null without a GradScaler
  double* current;      // kNumCurrentSlots
};

struct ScheduleBlock {};

// One thread: write_step_row (csrc/core/schedule.h), before every other kernel of the step.
struct ScheduleKernel {
  using Args = ScheduleArgs;
  using BlockState = ScheduleBlock;
  static constexpr int kPhases = 1;
  static constexpr int kMaxThreads = 1;

  template <class Thread>
  static MGPP_HD void phase(int, const Thread& th, const Args& a, BlockState&) {
    if (th.thread() == 0) write_step_row(a.table, a.rows, a.position, a.found_inf, a.current);
  }
};

}  // namespace cuda
}  // namespace MGPP_NAMESPACE
