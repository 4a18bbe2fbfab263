// The CPU kernels of MGPP on raw contiguous buffers: no torch here, so that CMake builds and tests
// them alone and the torch op layer (csrc/ops/cpu.cpp) stays a thin adapter.
#pragma once

#include <stdint.h>

#include <string>

#include "../core/formats.h"
#include "../core/layout.h"
#include "../core/selection.h"
#include "../core/step.h"

// The argument types are the same in every build of the kernels (mgpp_abi, csrc/core/platform.h):
// csrc/cpu/dispatch.h calls the build for each instruction set through one table.
namespace mgpp_abi {
namespace cpu {

// One tensor of a fused step. All pointers address `numel` contiguous elements; `grad` has the
// parameter's dtype, `exp_avg`/`exp_avg_sq` the state dtype.
struct StepTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  const uint8_t* keep_mask;  // frozen mask, bit i%8 of byte i/8 set = keep; null before the freeze
  int64_t numel;
  AdamWScalars adamw;
};

// The level-0 bins a fused step counts one by one. Empty (end == 0, the default): every bin.
// Else 1 <= begin < end < kHistHighBins: the elements below `begin` are counted in bin
// begin − 1 and those at or above `end` in bin `end`, so that a selection from the histogram is
// exact wherever τ's high bin falls inside [begin, end).
struct HighBinWindow {
  uint32_t begin;
  uint32_t end;
};

struct StepOptions {
  DType param_dtype;
  DType state_dtype;  // float32 or param_dtype
  bool prior_on;
  PriorConstants prior;
  float inv_grad_scale;  // gradients are multiplied by this before use (1 without a GradScaler)
  int num_threads;
  Pattern pattern;       // the pool whose level-0 histogram the step counts ({} unstructured)
  HighBinWindow window;  // the bins that histogram counts one by one
};

}  // namespace cpu
}  // namespace mgpp_abi

namespace MGPP_NAMESPACE {
namespace cpu {

using mgpp_abi::cpu::HighBinWindow;
using mgpp_abi::cpu::StepOptions;
using mgpp_abi::cpu::StepTensor;

// Prior gradient + AdamW + frozen mask for every tensor, in one pass over each element. When
// `high_histogram` (kHistHighBins counters) is not null, it also adds the count of every
// key_high_bin(|θ_new|), each group's non-candidates as kNotCandidateKey under an N:M
// options.pattern, those outside a non-empty options.window in its edge bins: the first level
// of the radix selection of τ. Throws
// std::invalid_argument on an unknown dtype or a state dtype the kernels do not take.
void fused_step(const StepTensor* tensors, int64_t count, const StepOptions& options,
                int64_t* high_histogram);

// `pattern` of the event functions below: an N:M pool's (its tensors' sizes multiples of M),
// whose elements outside each group's M − N smallest |x| take kNotCandidateKey and whose
// threshold zeroes the candidates at τ too; {} for an unstructured pool.

// Adds a radix histogram of |x| over the tensors. level 0: kHistHighBins counters indexed by
// key_high_bin, over all elements; level 1: kHistLowBins counters indexed by key_low_bin, over
// the elements whose key_high_bin equals `high_bin`.
void count_histogram(const ValueTensor* tensors, int64_t count, DType dtype, int level,
                     uint32_t high_bin, int64_t* histogram, int num_threads, Pattern pattern = {});

// Sets every element with |x| < τ to zero (elements already +0 are not written, so that the
// cache lines of weights pruned before stay clean). When `keep_masks` is not null, also writes each
// tensor's packed mask of the elements that stay (ceil(numel/8) bytes each).
void apply_threshold(const ValueTensor* tensors, uint8_t* const* keep_masks, int64_t count,
                     DType dtype, uint32_t tau_key, int num_threads, Pattern pattern = {});

// The one-pass pruning of an event (docs/spec.md §3), once the level-0 histogram has chosen τ's
// high bin `high_bin` (< key_high_bin of +inf, so that τ is not NaN): zeroes every element of a
// lower bin, keeps every element of a higher one and collects the elements of the bin itself. It
// writes each collected element's position, its tensor's `flat_offsets` entry plus its index, to
// `positions` (room for `capacity`) and counts its key_low_bin into `low_histogram` (kHistLowBins
// counters). With `keep_masks`, writes each tensor's packed mask with the bin's elements kept.
// Returns how many elements it collected; throws std::length_error past capacity.
int64_t partition_at_bin(const ValueTensor* tensors, const int64_t* flat_offsets,
                         uint8_t* const* keep_masks, int64_t count, DType dtype, uint32_t high_bin,
                         uint32_t* positions, int64_t capacity, int64_t* low_histogram,
                         int num_threads, Pattern pattern = {});

}  // namespace cpu
}  // namespace MGPP_NAMESPACE
namespace mgpp_abi {
namespace cpu {
// One tensor of a pruning event, in any dtype, for prune_collected.
struct PrunedTensor {
  void* data;
  int64_t numel;
  DType dtype;
  uint8_t* keep_mask;   // null without masks
  int64_t flat_offset;  // the position of its first element (ascending over the tensors)
};
}  // namespace cpu
}  // namespace mgpp_abi
namespace MGPP_NAMESPACE {
namespace cpu {
using mgpp_abi::cpu::PrunedTensor;

// Completes partition_at_bin once τ is exact: zeroes the collected elements with |x| < τ (N:M:
// <= τ) and clears their keep-mask bits.
void prune_collected(const PrunedTensor* tensors, int64_t count, const uint32_t* positions,
                     int64_t num_positions, uint32_t tau_key, int num_threads,
                     Pattern pattern = {});

// "cpu kernels: -march=<target> (<vector ISA>), OpenMP <version>, compiler <version>".
std::string build_info();

}  // namespace cpu
}  // namespace MGPP_NAMESPACE
