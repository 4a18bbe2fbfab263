// Input checks shared by the CPU (csrc/ops/cpu.cpp) and CUDA (csrc/ops/cuda.cpp)
// implementations of the torch.ops.mgpp ops, each for the device the op runs on: every op checks
// all of its inputs before it changes anything. mgpp_kernels/ops/checks.py is their Python
// spelling, for the fakes and the triton backend.
#pragma once

#include <map>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../core/formats.h"
#include "../core/layout.h"

namespace mgpp {
namespace op_checks {

inline DType to_kernel_dtype(at::ScalarType type, const char* what) {
  switch (type) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default:
      TORCH_CHECK_VALUE(false, "mgpp: ", what, " must be float32, bfloat16 or float16, got ", type);
  }
}

inline void check_tensor(const at::Tensor& t, const at::Device& device, const char* what,
                         size_t index) {
  TORCH_CHECK_VALUE(t.device() == device, "mgpp: ", what, "[", index, "] is on ", t.device(),
              "; this call's kernels run on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "mgpp: ", what, "[", index, "] must be contiguous");
}

inline void check_mask(const at::Tensor& mask, const at::Tensor& values, const at::Device& device,
                       size_t index) {
  check_tensor(mask, device, "keep_masks", index);
  const int64_t bytes = (values.numel() + 7) / 8;
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kByte && mask.numel() == bytes, "mgpp: keep_masks[", index,
              "] must be uint8 with ceil(numel/8) = ", bytes, " elements, got ",
              mask.scalar_type(), " with ", mask.numel());
}

// The tensor lists of fused_step_: equal lengths, kernel dtypes, matching sizes, all on `device`.
// The state steps' device rules differ by backend and are checked by the caller.
inline void check_step_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList state_steps,
                             at::TensorList keep_masks, const at::Device& device) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  state_steps.size() == n && (keep_masks.empty() || keep_masks.size() == n),
              "mgpp: fused_step_ takes lists of equal length (keep_masks may be empty)");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_tensor(p, device, "params", i);
    to_kernel_dtype(p.scalar_type(), "params");
    check_tensor(grads[i], device, "grads", i);
    check_tensor(exp_avgs[i], device, "exp_avgs", i);
    check_tensor(exp_avg_sqs[i], device, "exp_avg_sqs", i);
    TORCH_CHECK_VALUE(grads[i].scalar_type() == p.scalar_type(),
                "mgpp: grads[", i, "] must have its parameter's dtype ", p.scalar_type());
    TORCH_CHECK_VALUE(exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type(),
                "mgpp: exp_avg_sqs[", i, "] must have the dtype of exp_avgs[", i, "]");
    TORCH_CHECK_VALUE(to_kernel_dtype(exp_avgs[i].scalar_type(), "exp_avgs") == DType::Float32 ||
                    exp_avgs[i].scalar_type() == p.scalar_type(),
                "mgpp: state of params[", i, "] must be float32 or the parameter's dtype");
    TORCH_CHECK_VALUE(grads[i].numel() == p.numel() && exp_avgs[i].numel() == p.numel() &&
                    exp_avg_sqs[i].numel() == p.numel(),
                "mgpp: grads, exp_avgs and exp_avg_sqs [", i, "] must match params[", i,
                "] in size");
    TORCH_CHECK_VALUE(state_steps[i].numel() == 1, "mgpp: state_steps[", i, "] must hold one value");
    if (!keep_masks.empty()) check_mask(keep_masks[i], p, device, i);
  }
}

// The indices of `tensors` grouped by kernel dtype (the kernels take one dtype per call), each
// tensor checked to be on `device`.
inline std::map<DType, std::vector<size_t>> indices_by_dtype(at::TensorList tensors,
                                                             const at::Device& device) {
  std::map<DType, std::vector<size_t>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], device, "tensors", i);
    groups[to_kernel_dtype(tensors[i].scalar_type(), "tensors")].push_back(i);
  }
  return groups;
}

// The step's row of the device schedule (csrc/core/schedule.h) on `device`, where the kernels
// read it.
inline double* current_data(const at::Tensor& current, const at::Device& device) {
  TORCH_CHECK_VALUE(current.device() == device && current.scalar_type() == at::kDouble &&
                        current.is_contiguous() && current.numel() == kNumCurrentSlots,
                    "mgpp: current must be a contiguous float64 tensor of ", kNumCurrentSlots,
                    " elements on ", device, ", got ", current.scalar_type(), " with ",
                    current.numel(), " elements on ", current.device());
  return current.data_ptr<double>();
}

// Null without one: the host schedule.
inline const double* current_data(const std::optional<at::Tensor>& current,
                                  const at::Device& device) {
  return current.has_value() ? current_data(*current, device) : nullptr;
}

// An event op's `pattern` argument: [] (unstructured) or [N, M] with 1 <= N < M <= 16, every
// tensor holding whole groups of M along its last dimension.
inline Pattern to_pattern(at::IntArrayRef pattern, at::TensorList tensors) {
  if (pattern.empty()) return Pattern{0, 0};
  TORCH_CHECK_VALUE(pattern.size() == 2 && 1 <= pattern[0] && pattern[0] < pattern[1] &&
                        pattern[1] <= 16,
                    "mgpp: pattern must be empty or [N, M] with 1 <= N < M <= 16, got ", pattern);
  const int m = static_cast<int>(pattern[1]);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].dim() > 0 && tensors[i].size(-1) % m == 0, "mgpp: tensors[", i,
                      "] of shape ", tensors[i].sizes(), " does not split into groups of ", m,
                      " along its last dimension");
  }
  return Pattern{static_cast<int>(pattern[0]), m};
}

}  // namespace op_checks
}  // namespace mgpp
