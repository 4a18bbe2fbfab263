// The host side of the multi-tensor launches of kernels.cuh: the planners split a call's tensors
// into launches whose argument tables hold at most kMaxTensors tensors and 2^31 − 1 blocks. The
// device launchers (launch.cu) and the emulated grid of csrc/tests/test_cuda_emulated.cpp run the
// same plans. Host code only; no CUDA runtime and no torch.
#pragma once

#include <stdint.h>

#include <stdexcept>
#include <vector>

#include "../core/formats.h"
#include "kernels.cuh"
#include "launch.h"

namespace MGPP_NAMESPACE {
namespace cuda {

// Appends one non-empty tensor of `numel` elements to the last launch, or to a new launch (a copy
// of `common`) when the last one's table is full; returns the launch and the tensor's slot.
template <class Args>
Args& add_tensor(std::vector<Args>& launches, const Args& common, int64_t numel, int max_tensors,
                 int32_t* slot) {
  const int64_t blocks = (numel + common.chunk_size - 1) / common.chunk_size;
  const int64_t max_blocks = 0x7FFFFFFF;  // gridDim.x
  if (blocks > max_blocks) throw std::invalid_argument("mgpp: a tensor is too large for the CUDA kernels");
  if (launches.empty() || launches.back().num_tensors == max_tensors ||
      launches.back().first_block[launches.back().num_tensors] + blocks > max_blocks) {
    launches.push_back(common);
    launches.back().num_tensors = 0;
    launches.back().first_block[0] = 0;
  }
  Args& launch = launches.back();
  *slot = launch.num_tensors++;
  launch.numel[*slot] = numel;
  launch.first_block[*slot + 1] = static_cast<int32_t>(launch.first_block[*slot] + blocks);
  return launch;
}

template <class Args>
void check_plan(const Args& common, int max_tensors, bool shared_counters, int unit = 8) {
  if (max_tensors < 1 || max_tensors > Args::kMaxTensors) {
    throw std::invalid_argument("mgpp: max_tensors out of range");
  }
  if (common.chunk_size < unit || common.chunk_size % unit != 0 ||
      (shared_counters && common.chunk_size > 0xFFFF)) {
    throw std::invalid_argument("mgpp: chunk_size must be a positive multiple of 8 and of an N:M "
                                "pattern's group size (below 2^16 with shared counters)");
  }
}

// The chunk of the event kernels under an N:M pattern: kChunkSize cut to whole groups and bytes.
inline int64_t pattern_chunk_size(Pattern pattern) {
  return kChunkSize - kChunkSize % nm_unit(pattern.m);
}

inline std::vector<FusedStepArgs> plan_fused_step(const StepTensor* tensors, int64_t count,
                                                  const StepLaunch& launch, int32_t histogram_mode,
                                                  int64_t chunk_size = kChunkSize,
                                                  int max_tensors = FusedStepArgs::kMaxTensors) {
  FusedStepArgs common{};
  common.histogram_mode = launch.high_histogram != nullptr ? histogram_mode : kNoHistogram;
  common.chunk_size = chunk_size;
  common.scalars = launch.scalars;
  common.grad_scale = launch.grad_scale;
  common.histogram = reinterpret_cast<unsigned long long*>(launch.high_histogram);
  common.current = launch.current;
  check_plan(common, max_tensors, common.histogram_mode == kSharedHistogram);
  std::vector<FusedStepArgs> launches;
  for (int64_t t = 0; t < count; ++t) {
    const StepTensor& tensor = tensors[t];
    if (tensor.numel == 0) continue;
    int32_t s = 0;
    FusedStepArgs& args = add_tensor(launches, common, tensor.numel, max_tensors, &s);
    args.param[s] = tensor.param;
    args.grad[s] = tensor.grad;
    args.exp_avg[s] = tensor.exp_avg;
    args.exp_avg_sq[s] = tensor.exp_avg_sq;
    args.keep_mask[s] = tensor.keep_mask;
    args.step[s] = tensor.step;
  }
  return launches;
}

inline std::vector<HistogramArgs> plan_histogram(const ValueTensor* tensors, int64_t count, int level,
                                                 const int64_t* selection, int64_t* histogram,
                                                 const double* current, int32_t histogram_mode,
                                                 int64_t chunk_size = kChunkSize,
                                                 int max_tensors = HistogramArgs::kMaxTensors,
                                                 Pattern pattern = {}) {
  if (level != 0 && level != 1) throw std::invalid_argument("mgpp: level must be 0 or 1");
  HistogramArgs common{};
  common.histogram_mode = histogram_mode;
  common.level = level;
  common.chunk_size = chunk_size;
  common.selection = selection;
  common.histogram = reinterpret_cast<unsigned long long*>(histogram);
  common.current = current;
  common.pattern = pattern;
  check_plan(common, max_tensors, histogram_mode == kSharedHistogram, nm_unit(pattern.m));
  std::vector<HistogramArgs> launches;
  for (int64_t t = 0; t < count; ++t) {
    if (tensors[t].numel == 0) continue;
    int32_t s = 0;
    add_tensor(launches, common, tensors[t].numel, max_tensors, &s).data[s] = tensors[t].data;
  }
  return launches;
}

inline std::vector<ThresholdArgs> plan_threshold(const ValueTensor* tensors, uint8_t* const* keep_masks,
                                                 int64_t count, const int64_t* selection,
                                                 const double* current,
                                                 int64_t chunk_size = kChunkSize,
                                                 int max_tensors = ThresholdArgs::kMaxTensors,
                                                 Pattern pattern = {}) {
  ThresholdArgs common{};
  common.chunk_size = chunk_size;
  common.selection = selection;
  common.current = current;
  common.pattern = pattern;
  check_plan(common, max_tensors, false, nm_unit(pattern.m));
  std::vector<ThresholdArgs> launches;
  for (int64_t t = 0; t < count; ++t) {
    if (tensors[t].numel == 0) continue;
    int32_t s = 0;
    ThresholdArgs& args = add_tensor(launches, common, tensors[t].numel, max_tensors, &s);
    args.data[s] = tensors[t].data;
    args.keep_mask[s] = keep_masks != nullptr ? keep_masks[t] : nullptr;
  }
  return launches;
}

}  // namespace cuda
}  // namespace MGPP_NAMESPACE
