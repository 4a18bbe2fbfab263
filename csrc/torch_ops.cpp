// torch.ops.mgpp: the op schemas and their CPU implementations, a thin adapter from tensors to
// the torch-free kernels of csrc/cpu. This is the only C++ file of the CPU build that includes
// torch headers.
#include <Python.h>

#include <cmath>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/mgpp_cpu.h"

namespace mgpp {
namespace {

using at::Tensor;
using cpu::DType;

DType to_kernel_dtype(at::ScalarType type, const char* what) {
  switch (type) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default:
      TORCH_CHECK(false, "mgpp: ", what, " must be float32, bfloat16 or float16, got ", type);
  }
}

void check_cpu_contiguous(const Tensor& t, const char* what, size_t index) {
  TORCH_CHECK(t.device().is_cpu(), "mgpp: ", what, "[", index, "] is on ", t.device(),
              "; the CPU kernels take CPU tensors");
  TORCH_CHECK(t.is_contiguous(), "mgpp: ", what, "[", index, "] must be contiguous");
}

int64_t packed_mask_bytes(int64_t numel) { return (numel + 7) / 8; }

void check_mask(const Tensor& mask, const Tensor& values, size_t index) {
  check_cpu_contiguous(mask, "keep_masks", index);
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.numel() == packed_mask_bytes(values.numel()),
              "mgpp: keep_masks[", index, "] must be uint8 with ceil(numel/8) = ",
              packed_mask_bytes(values.numel()), " elements, got ", mask.scalar_type(), " with ",
              mask.numel());
}

Tensor checked_histogram(const Tensor& histogram, uint32_t bins) {
  TORCH_CHECK(histogram.device().is_cpu() && histogram.scalar_type() == at::kLong &&
                  histogram.is_contiguous() && histogram.numel() == bins,
              "mgpp: histogram must be a contiguous CPU int64 tensor of ", bins, " counters");
  return histogram;
}

int64_t* selection_data(const Tensor& selection) {
  TORCH_CHECK(selection.device().is_cpu() && selection.scalar_type() == at::kLong &&
                  selection.is_contiguous() && selection.numel() == 3,
              "mgpp: selection must be a contiguous CPU int64 tensor of 3 elements");
  return selection.data_ptr<int64_t>();
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList state_steps,
                    at::TensorList keep_masks, const Tensor& scalars,
                    const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& histogram) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  state_steps.size() == n && (keep_masks.empty() || keep_masks.size() == n),
              "mgpp: fused_step_ takes lists of equal length (keep_masks may be empty)");
  TORCH_CHECK(scalars.device().is_cpu() && scalars.scalar_type() == at::kDouble &&
                  scalars.is_contiguous() && scalars.numel() == kNumStepScalars,
              "mgpp: scalars must be a contiguous CPU float64 tensor of ", kNumStepScalars,
              " elements");
  const double* s = scalars.data_ptr<double>();

  cpu::StepOptions options{};
  options.prior_on = s[kPriorOn] != 0.0;
  options.prior = prior_constants(s);
  options.inv_grad_scale = 1.0f;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1, "mgpp: grad_scale must hold one value");
    options.inv_grad_scale = 1.0f / grad_scale->to(at::kFloat).item<float>();
  }
  options.num_threads = at::get_num_threads();
  int64_t* hist = nullptr;
  if (histogram.has_value()) {
    hist = checked_histogram(*histogram, kHistHighBins).data_ptr<int64_t>();
  }

  // The kernels take one (parameter dtype, state dtype) pair per call.
  std::map<std::pair<DType, DType>, std::vector<cpu::StepTensor>> by_dtype;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_cpu_contiguous(p, "params", i);
    to_kernel_dtype(p.scalar_type(), "params");
    check_cpu_contiguous(grads[i], "grads", i);
    check_cpu_contiguous(exp_avgs[i], "exp_avgs", i);
    check_cpu_contiguous(exp_avg_sqs[i], "exp_avg_sqs", i);
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
    TORCH_CHECK(state_steps[i].numel() == 1 && state_steps[i].device().is_cpu() &&
                    state_steps[i].is_floating_point(),
                "mgpp: state_steps[", i, "] must be a one-element floating CPU tensor");
    if (!keep_masks.empty()) check_mask(keep_masks[i], p, i);
  }
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    Tensor step = state_steps[i];
    step.add_(1);
    cpu::StepTensor t{};
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.keep_mask = keep_masks.empty() ? nullptr : keep_masks[i].data_ptr<uint8_t>();
    t.numel = p.numel();
    t.adamw = adamw_scalars(s, step.item<double>());
    const DType param_dtype = to_kernel_dtype(p.scalar_type(), "params");
    const DType state_dtype = to_kernel_dtype(exp_avgs[i].scalar_type(), "exp_avgs");
    by_dtype[{param_dtype, state_dtype}].push_back(t);
  }
  for (auto& [dtypes, tensors] : by_dtype) {
    options.param_dtype = dtypes.first;
    options.state_dtype = dtypes.second;
    cpu::fused_step(tensors.data(), static_cast<int64_t>(tensors.size()), options, hist);
  }
}

std::map<DType, std::vector<size_t>> indices_by_dtype(at::TensorList tensors, const char* what) {
  std::map<DType, std::vector<size_t>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_cpu_contiguous(tensors[i], what, i);
    groups[to_kernel_dtype(tensors[i].scalar_type(), what)].push_back(i);
  }
  return groups;
}

void abs_histogram_cpu(at::TensorList tensors, const Tensor& histogram, const Tensor& selection,
                       int64_t level) {
  TORCH_CHECK(level == 0 || level == 1, "mgpp: level must be 0 or 1, got ", level);
  int64_t* hist =
      checked_histogram(histogram, level == 0 ? kHistHighBins : kHistLowBins).data_ptr<int64_t>();
  const uint32_t high_bin = key_high_bin(static_cast<uint32_t>(selection_data(selection)[kSelKey]));
  for (const auto& [dtype, indices] : indices_by_dtype(tensors, "tensors")) {
    std::vector<cpu::ValueTensor> views;
    for (size_t i : indices) views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
    cpu::count_histogram(views.data(), static_cast<int64_t>(views.size()), dtype,
                         static_cast<int>(level), high_bin, hist, at::get_num_threads());
  }
}

void radix_select_cpu(const Tensor& histogram, const Tensor& selection, int64_t level) {
  TORCH_CHECK(level == 0 || level == 1, "mgpp: level must be 0 or 1, got ", level);
  const Tensor hist = checked_histogram(histogram, level == 0 ? kHistHighBins : kHistLowBins);
  select_bin(hist.data_ptr<int64_t>(), static_cast<int>(level), selection_data(selection));
}

void apply_threshold_cpu(at::TensorList tensors, at::TensorList keep_masks,
                         const Tensor& selection) {
  TORCH_CHECK(keep_masks.empty() || keep_masks.size() == tensors.size(),
              "mgpp: keep_masks must be empty or one per tensor");
  const uint32_t tau_key = static_cast<uint32_t>(selection_data(selection)[kSelKey]);
  for (size_t i = 0; i < keep_masks.size(); ++i) check_mask(keep_masks[i], tensors[i], i);
  for (const auto& [dtype, indices] : indices_by_dtype(tensors, "tensors")) {
    std::vector<cpu::ValueTensor> views;
    std::vector<uint8_t*> masks;
    for (size_t i : indices) {
      views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
      if (!keep_masks.empty()) masks.push_back(keep_masks[i].data_ptr<uint8_t>());
    }
    cpu::apply_threshold(views.data(), keep_masks.empty() ? nullptr : masks.data(),
                         static_cast<int64_t>(views.size()), dtype, tau_key,
                         at::get_num_threads());
  }
}

std::string build_info() {
  std::string isa = "x86-64";
#if defined(__AVX512F__)
  isa = "AVX-512";
#elif defined(__AVX2__)
  isa = "AVX2";
#elif defined(__aarch64__)
  isa = "aarch64";
#endif
#if defined(__F16C__)
  isa += " F16C";
#endif
  return "cpu kernels: " + isa + ", OpenMP " + std::to_string(_OPENMP) + ", compiler " + __VERSION__;
}

}  // namespace

TORCH_LIBRARY(mgpp, m) {
  m.def("build_info() -> str", &build_info);
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, Tensor[] keep_masks, Tensor scalars, "
      "Tensor? grad_scale, Tensor(e!)? histogram) -> ()");
  m.def("abs_histogram_(Tensor[] tensors, Tensor(a!) histogram, Tensor selection, int level) -> ()");
  m.def("radix_select_(Tensor histogram, Tensor(a!) selection, int level) -> ()");
  m.def("apply_threshold_(Tensor(a!)[] tensors, Tensor(b!)[] keep_masks, Tensor selection) -> ()");
}

TORCH_LIBRARY_IMPL(mgpp, CPU, m) {
  m.impl("fused_step_", &fused_step_cpu);
  m.impl("abs_histogram_", &abs_histogram_cpu);
  m.impl("radix_select_", &radix_select_cpu);
  m.impl("apply_threshold_", &apply_threshold_cpu);
}

}  // namespace mgpp

// Importing mgpp_kernels._C runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
