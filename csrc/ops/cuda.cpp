// The CUDA implementations of the torch.ops.mgpp ops (schemas in csrc/ops/schema.cpp): a thin
// adapter from tensors to the launchers of csrc/cuda/launch.h, which hold no torch code. Every op
// checks all of its inputs before it changes anything, queues kernels on the current stream and
// returns: nothing here reads device memory back to the host.
#include <map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/rsub.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../core/layout.h"
#include "../cuda/launch.h"
#include "checks.h"

namespace mgpp {
namespace {

using at::Tensor;
using op_checks::current_data;
using op_checks::indices_by_dtype;
using op_checks::to_kernel_dtype;

// A device-resident int64 buffer of `numel` elements (histogram or selection state).
void check_counters(const Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == numel,
              "mgpp: ", what, " must be a contiguous CUDA int64 tensor of ", numel, " elements, got ",
              t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
}

uint32_t histogram_bins(int64_t level) {
  TORCH_CHECK_VALUE(level == 0 || level == 1, "mgpp: level must be 0 or 1, got ", level);
  return level == 0 ? kHistHighBins : kHistLowBins;
}

void* current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// The launchers pass tensor tables of up to 32 KB as kernel arguments (csrc/cuda/kernels.cuh);
// drivers older than CUDA 12.1 take 4 KB and would fail the launch with a bare error.
void check_driver_takes_large_kernel_arguments() {
  static const int version = cuda::driver_version();
  TORCH_CHECK(version >= cuda::kMinDriverVersion,
              "mgpp: the cuda backend's kernels pass 32 KB kernel argument tables, which need an "
              "NVIDIA driver for CUDA ", cuda::kMinDriverVersion / 1000, ".",
              cuda::kMinDriverVersion % 1000 / 10, " or newer (R530+); this driver supports CUDA ",
              version / 1000, ".", version % 1000 / 10,
              ". Update the driver, or use the triton or cpu backend.");
}

// The CUDA update counts unstructured pools only; an N:M pool's level-0 histogram is counted by
// abs_histogram_ (the cuda backend passes fused_step_ no pattern).
void check_unstructured(at::IntArrayRef pattern) {
  TORCH_CHECK_VALUE(pattern.empty(), "mgpp: the CUDA fused_step_ counts unstructured pools only");
}

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList state_steps,
                     at::TensorList keep_masks, const Tensor& scalars,
                     const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& histogram,
                     const std::optional<Tensor>& current, at::IntArrayRef pattern,
                     at::IntArrayRef window) {
  check_unstructured(pattern);
  TORCH_CHECK_VALUE(window.empty(), "mgpp: the CUDA fused_step_ counts every bin (no window)");
  const size_t n = params.size();
  TORCH_CHECK_VALUE(scalars.is_cuda() && scalars.scalar_type() == at::kDouble && scalars.is_contiguous() &&
                  scalars.numel() == kNumStepScalars,
              "mgpp: scalars must be a contiguous CUDA float64 tensor of ", kNumStepScalars,
              " elements (on the parameters' device), got ", scalars.scalar_type(), " on ",
              scalars.device());
  const at::Device device = scalars.device();
  Tensor scale;
  if (grad_scale.has_value()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->device() == device,
                "mgpp: grad_scale must hold one value on ", device);
    scale = grad_scale->to(at::kFloat).contiguous();
  }
  if (histogram.has_value()) {
    check_counters(*histogram, kHistHighBins, "histogram");
    TORCH_CHECK_VALUE(histogram->device() == device, "mgpp: histogram must be on ", device);
  }
  op_checks::check_step_lists(params, grads, exp_avgs, exp_avg_sqs, state_steps, keep_masks,
                              device);
  const double* row = current_data(current, device);
  // The kernels read each step count on the device, so that no step reads one back to the host.
  for (size_t i = 0; i < n; ++i) {
    const Tensor& step = state_steps[i];
    TORCH_CHECK_VALUE(step.device() == device && step.scalar_type() == at::kFloat,
                      "mgpp: state_steps[", i, "] must be a float32 tensor on ", device,
                      " (the cuda backend keeps its step counts on the device), got ",
                      step.scalar_type(), " on ", step.device());
  }
  check_driver_takes_large_kernel_arguments();

  const c10::cuda::CUDAGuard guard(device);
  if (n > 0) {
    if (row != nullptr) {
      // 1 − skip, on the device: a skipped step leaves the counts where they are.
      at::_foreach_add_(state_steps, at::rsub(current->select(0, kCurrentSkip), 1).to(at::kFloat));
    } else {
      at::_foreach_add_(state_steps, 1);
    }
  }

  // One launcher call (a few launches) per (parameter dtype, state dtype) pair.
  std::map<std::pair<DType, DType>, std::vector<cuda::StepTensor>> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    cuda::StepTensor t{};
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.keep_mask = keep_masks.empty() ? nullptr : keep_masks[i].data_ptr<uint8_t>();
    t.step = state_steps[i].data_ptr<float>();
    t.numel = p.numel();
    by_dtype[{to_kernel_dtype(p.scalar_type(), "params"),
              to_kernel_dtype(exp_avgs[i].scalar_type(), "exp_avgs")}]
        .push_back(t);
  }
  for (auto& [dtypes, tensors] : by_dtype) {
    cuda::StepLaunch launch{};
    launch.param_dtype = dtypes.first;
    launch.state_dtype = dtypes.second;
    launch.scalars = scalars.data_ptr<double>();
    launch.grad_scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
    launch.high_histogram = histogram.has_value() ? histogram->data_ptr<int64_t>() : nullptr;
    launch.current = row;
    launch.stream = current_stream(device);
    cuda::fused_step(tensors.data(), static_cast<int64_t>(tensors.size()), launch);
  }
}

void abs_histogram_cuda(at::TensorList tensors, const Tensor& histogram, const Tensor& selection,
                        int64_t level, const std::optional<Tensor>& current,
                        at::IntArrayRef pattern_sizes) {
  const Pattern pattern = op_checks::to_pattern(pattern_sizes, tensors);
  check_counters(histogram, histogram_bins(level), "histogram");
  check_counters(selection, kNumSelectionSlots, "selection");
  const at::Device device = histogram.device();
  TORCH_CHECK_VALUE(selection.device() == device, "mgpp: selection must be on ", device);
  const double* row = current_data(current, device);
  const auto groups = indices_by_dtype(tensors, device);
  check_driver_takes_large_kernel_arguments();
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, indices] : groups) {
    std::vector<ValueTensor> views;
    for (size_t i : indices) views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
    cuda::abs_histogram(views.data(), static_cast<int64_t>(views.size()), dtype,
                        static_cast<int>(level), selection.data_ptr<int64_t>(),
                        histogram.data_ptr<int64_t>(), row, current_stream(device), pattern);
  }
}

void radix_select_cuda(const Tensor& histogram, const Tensor& selection, int64_t level,
                       const std::optional<Tensor>& current) {
  check_counters(histogram, histogram_bins(level), "histogram");
  check_counters(selection, kNumSelectionSlots, "selection");
  const at::Device device = histogram.device();
  TORCH_CHECK_VALUE(selection.device() == device, "mgpp: selection must be on ", device);
  const double* row = current_data(current, device);
  const c10::cuda::CUDAGuard guard(device);
  cuda::radix_select(histogram.data_ptr<int64_t>(), static_cast<int>(level),
                     selection.data_ptr<int64_t>(), row, current_stream(device));
}

void apply_threshold_cuda(at::TensorList tensors, at::TensorList keep_masks,
                          const Tensor& selection, const std::optional<Tensor>& current,
                          at::IntArrayRef pattern_sizes) {
  const Pattern pattern = op_checks::to_pattern(pattern_sizes, tensors);
  TORCH_CHECK_VALUE(keep_masks.empty() || keep_masks.size() == tensors.size(),
              "mgpp: keep_masks must be empty or one per tensor");
  check_counters(selection, kNumSelectionSlots, "selection");
  const at::Device device = selection.device();
  for (size_t i = 0; i < keep_masks.size(); ++i) op_checks::check_mask(keep_masks[i], tensors[i], device, i);
  const auto groups = indices_by_dtype(tensors, device);
  const double* row = current_data(current, device);
  check_driver_takes_large_kernel_arguments();
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, indices] : groups) {
    std::vector<ValueTensor> views;
    std::vector<uint8_t*> masks;
    for (size_t i : indices) {
      views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
      if (!keep_masks.empty()) masks.push_back(keep_masks[i].data_ptr<uint8_t>());
    }
    cuda::apply_threshold(views.data(), keep_masks.empty() ? nullptr : masks.data(),
                          static_cast<int64_t>(views.size()), dtype, selection.data_ptr<int64_t>(),
                          row, current_stream(device), pattern);
  }
}

void schedule_step_cuda(const Tensor& table, const Tensor& position, const Tensor& current,
                        const std::optional<Tensor>& found_inf) {
  const at::Device device = current.device();
  TORCH_CHECK_VALUE(table.device() == device && table.scalar_type() == at::kDouble &&
                        table.is_contiguous() && table.dim() == 2 && table.size(0) >= 1 &&
                        table.size(1) == kNumScheduleColumns,
                    "mgpp: table must be a contiguous float64 tensor of shape (rows >= 1, ",
                    kNumScheduleColumns, ") on ", device);
  TORCH_CHECK_VALUE(position.device() == device && position.scalar_type() == at::kLong &&
                        position.numel() == 1,
                    "mgpp: position must be an int64 tensor of one element on ", device);
  double* row = current_data(current, device);
  Tensor inf_found;
  if (found_inf.has_value()) {
    TORCH_CHECK_VALUE(found_inf->device() == device && found_inf->numel() == 1 &&
                          found_inf->is_floating_point(),
                      "mgpp: found_inf must be a floating tensor of one element on ", device);
    inf_found = found_inf->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(device);
  cuda::schedule_step(table.data_ptr<double>(), table.size(0), position.data_ptr<int64_t>(),
                      inf_found.defined() ? inf_found.data_ptr<float>() : nullptr, row,
                      current_stream(device));
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpp, CUDA, m) {
  m.impl("fused_step_", &fused_step_cuda);
  m.impl("abs_histogram_", &abs_histogram_cuda);
  m.impl("radix_select_", &radix_select_cuda);
  m.impl("apply_threshold_", &apply_threshold_cuda);
  m.impl("schedule_step_", &schedule_step_cuda);
}

}  // namespace mgpp
