// The CUDA implementations of the torch.ops.mgpp ops (schemas in csrc/torch_ops.cpp): a thin
// adapter from tensors to the launchers of csrc/cuda/mgpp_cuda.h, which hold no torch code. This
// is the only file of the CUDA build that includes torch headers. Every op checks all of its
// inputs before it changes anything, queues kernels on the current stream and returns: nothing
// here reads device memory back to the host.
#include <map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/mgpp_cuda.h"

namespace mgpp {
namespace {

using at::Tensor;
using cuda::DType;

DType to_kernel_dtype(at::ScalarType type, const char* what) {
  switch (type) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default:
      TORCH_CHECK(false, "mgpp: ", what, " must be float32, bfloat16 or float16, got ", type);
  }
}

void check_on_device(const Tensor& t, const at::Device& device, const char* what, size_t index) {
  TORCH_CHECK(t.device() == device, "mgpp: ", what, "[", index, "] is on ", t.device(),
              "; this call's CUDA kernels run on ", device);
  TORCH_CHECK(t.is_contiguous(), "mgpp: ", what, "[", index, "] must be contiguous");
}

void check_mask(const Tensor& mask, const Tensor& values, const at::Device& device, size_t index) {
  check_on_device(mask, device, "keep_masks", index);
  const int64_t bytes = (values.numel() + 7) / 8;
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.numel() == bytes, "mgpp: keep_masks[", index,
              "] must be uint8 with ceil(numel/8) = ", bytes, " elements, got ", mask.scalar_type(),
              " with ", mask.numel());
}

// A device-resident int64 buffer of `numel` elements (histogram or selection state).
void check_counters(const Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == numel,
              "mgpp: ", what, " must be a contiguous CUDA int64 tensor of ", numel, " elements, got ",
              t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
}

uint32_t histogram_bins(int64_t level) {
  TORCH_CHECK(level == 0 || level == 1, "mgpp: level must be 0 or 1, got ", level);
  return level == 0 ? kHistHighBins : kHistLowBins;
}

void* current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList state_steps,
                     at::TensorList keep_masks, const Tensor& scalars,
                     const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& histogram) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  state_steps.size() == n && (keep_masks.empty() || keep_masks.size() == n),
              "mgpp: fused_step_ takes lists of equal length (keep_masks may be empty)");
  TORCH_CHECK(scalars.is_cuda() && scalars.scalar_type() == at::kDouble && scalars.is_contiguous() &&
                  scalars.numel() == kNumStepScalars,
              "mgpp: scalars must be a contiguous CUDA float64 tensor of ", kNumStepScalars,
              " elements (on the parameters' device), got ", scalars.scalar_type(), " on ",
              scalars.device());
  const at::Device device = scalars.device();
  Tensor scale;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->device() == device,
                "mgpp: grad_scale must hold one value on ", device);
    scale = grad_scale->to(at::kFloat).contiguous();
  }
  if (histogram.has_value()) {
    check_counters(*histogram, kHistHighBins, "histogram");
    TORCH_CHECK(histogram->device() == device, "mgpp: histogram must be on ", device);
  }
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_on_device(p, device, "params", i);
    to_kernel_dtype(p.scalar_type(), "params");
    check_on_device(grads[i], device, "grads", i);
    check_on_device(exp_avgs[i], device, "exp_avgs", i);
    check_on_device(exp_avg_sqs[i], device, "exp_avg_sqs", i);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(),
                "mgpp: grads[", i, "] must have its parameter's dtype ", p.scalar_type());
    TORCH_CHECK(exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type(),
                "mgpp: exp_avg_sqs[", i, "] must have the dtype of exp_avgs[", i, "]");
    TORCH_CHECK(to_kernel_dtype(exp_avgs[i].scalar_type(), "exp_avgs") == DType::Float32 ||
                    exp_avgs[i].scalar_type() == p.scalar_type(),
                "mgpp: state of params[", i, "] must be float32 or the parameter's dtype");
    TORCH_CHECK(grads[i].numel() == p.numel() && exp_avgs[i].numel() == p.numel() &&
                    exp_avg_sqs[i].numel() == p.numel(),
                "mgpp: grads, exp_avgs and exp_avg_sqs [", i, "] must match params[", i,
                "] in size");
    const Tensor& step = state_steps[i];
    // A step count on the device is read by the kernels; one in host memory is read here.
    TORCH_CHECK(step.numel() == 1 && (step.device() == device ? step.scalar_type() == at::kFloat
                                                               : step.is_cpu() && step.is_floating_point()),
                "mgpp: state_steps[", i, "] must be a one-element float32 tensor on ", device,
                " or a one-element floating CPU tensor, got ", step.scalar_type(), " on ", step.device());
    if (!keep_masks.empty()) check_mask(keep_masks[i], p, device, i);
  }

  const c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> device_steps;
  for (const Tensor& step : state_steps) {
    if (step.is_cuda()) device_steps.push_back(step);
  }
  if (!device_steps.empty()) at::_foreach_add_(device_steps, 1);

  // One launcher call (a few launches) per (parameter dtype, state dtype) pair.
  std::map<std::pair<DType, DType>, std::vector<cuda::StepTensor>> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    Tensor step = state_steps[i];
    cuda::StepTensor t{};
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.keep_mask = keep_masks.empty() ? nullptr : keep_masks[i].data_ptr<uint8_t>();
    if (step.is_cuda()) {
      t.step = step.data_ptr<float>();
    } else {
      step.add_(1);
      t.step_value = static_cast<float>(step.item<double>());
    }
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
    launch.stream = current_stream(device);
    cuda::fused_step(tensors.data(), static_cast<int64_t>(tensors.size()), launch);
  }
}

std::map<DType, std::vector<size_t>> indices_by_dtype(at::TensorList tensors, const at::Device& device) {
  std::map<DType, std::vector<size_t>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_on_device(tensors[i], device, "tensors", i);
    groups[to_kernel_dtype(tensors[i].scalar_type(), "tensors")].push_back(i);
  }
  return groups;
}

void abs_histogram_cuda(at::TensorList tensors, const Tensor& histogram, const Tensor& selection,
                        int64_t level) {
  check_counters(histogram, histogram_bins(level), "histogram");
  check_counters(selection, 3, "selection");
  const at::Device device = histogram.device();
  TORCH_CHECK(selection.device() == device, "mgpp: selection must be on ", device);
  const auto groups = indices_by_dtype(tensors, device);
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, indices] : groups) {
    std::vector<cuda::ValueTensor> views;
    for (size_t i : indices) views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
    cuda::abs_histogram(views.data(), static_cast<int64_t>(views.size()), dtype,
                        static_cast<int>(level), selection.data_ptr<int64_t>(),
                        histogram.data_ptr<int64_t>(), current_stream(device));
  }
}

void radix_select_cuda(const Tensor& histogram, const Tensor& selection, int64_t level) {
  check_counters(histogram, histogram_bins(level), "histogram");
  check_counters(selection, 3, "selection");
  const at::Device device = histogram.device();
  TORCH_CHECK(selection.device() == device, "mgpp: selection must be on ", device);
  const c10::cuda::CUDAGuard guard(device);
  cuda::radix_select(histogram.data_ptr<int64_t>(), static_cast<int>(level),
                     selection.data_ptr<int64_t>(), current_stream(device));
}

void apply_threshold_cuda(at::TensorList tensors, at::TensorList keep_masks,
                          const Tensor& selection) {
  TORCH_CHECK(keep_masks.empty() || keep_masks.size() == tensors.size(),
              "mgpp: keep_masks must be empty or one per tensor");
  check_counters(selection, 3, "selection");
  const at::Device device = selection.device();
  for (size_t i = 0; i < keep_masks.size(); ++i) check_mask(keep_masks[i], tensors[i], device, i);
  const auto groups = indices_by_dtype(tensors, device);
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, indices] : groups) {
    std::vector<cuda::ValueTensor> views;
    std::vector<uint8_t*> masks;
    for (size_t i : indices) {
      views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
      if (!keep_masks.empty()) masks.push_back(keep_masks[i].data_ptr<uint8_t>());
    }
    cuda::apply_threshold(views.data(), keep_masks.empty() ? nullptr : masks.data(),
                          static_cast<int64_t>(views.size()), dtype, selection.data_ptr<int64_t>(),
                          current_stream(device));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpp, CUDA, m) {
  m.impl("fused_step_", &fused_step_cuda);
  m.impl("abs_histogram_", &abs_histogram_cuda);
  m.impl("radix_select_", &radix_select_cuda);
  m.impl("apply_threshold_", &apply_threshold_cuda);
}

}  // namespace mgpp
