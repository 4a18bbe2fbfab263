// The CPU implementations of the torch.ops.mgpp ops (schemas in csrc/ops/schema.cpp): a thin
// adapter from tensors to the torch-free kernels of csrc/cpu.
#include <map>
#include <stdexcept>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../core/schedule.h"
#include "../cpu/kernels.h"
#include "checks.h"

namespace mgpp {
namespace {

using at::Tensor;
using op_checks::check_tensor;
using op_checks::current_data;
using op_checks::indices_by_dtype;
using op_checks::to_kernel_dtype;

const at::Device kCpu(at::kCPU);

Tensor checked_histogram(const Tensor& histogram, uint32_t bins) {
  TORCH_CHECK_VALUE(histogram.device().is_cpu() && histogram.scalar_type() == at::kLong &&
                  histogram.is_contiguous() && histogram.numel() == bins,
              "mgpp: histogram must be a contiguous CPU int64 tensor of ", bins, " counters");
  return histogram;
}

int64_t* selection_data(const Tensor& selection) {
  TORCH_CHECK_VALUE(selection.device().is_cpu() && selection.scalar_type() == at::kLong &&
                  selection.is_contiguous() && selection.numel() == kNumSelectionSlots,
              "mgpp: selection must be a contiguous CPU int64 tensor of ", kNumSelectionSlots,
              " elements");
  return selection.data_ptr<int64_t>();
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList state_steps,
                    at::TensorList keep_masks, const Tensor& scalars,
                    const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& histogram,
                    const std::optional<Tensor>& current, at::IntArrayRef pattern,
                    at::IntArrayRef window) {
  const size_t n = params.size();
  op_checks::check_step_lists(params, grads, exp_avgs, exp_avg_sqs, state_steps, keep_masks, kCpu);
  const Pattern histogram_pattern = op_checks::to_pattern(pattern, params);
  TORCH_CHECK_VALUE(window.empty() || (window.size() == 2 && histogram.has_value() &&
                                       1 <= window[0] && window[0] < window[1] &&
                                       window[1] < static_cast<int64_t>(kHistHighBins)),
                    "mgpp: window must be empty or [begin, end) with 1 <= begin < end < ",
                    kHistHighBins, ", with a histogram, got ", window);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(state_steps[i].device().is_cpu() && state_steps[i].is_floating_point(),
                "mgpp: state_steps[", i, "] must be a floating CPU tensor");
  }
  TORCH_CHECK_VALUE(scalars.device().is_cpu() && scalars.scalar_type() == at::kDouble &&
                  scalars.is_contiguous() && scalars.numel() == kNumStepScalars,
              "mgpp: scalars must be a contiguous CPU float64 tensor of ", kNumStepScalars,
              " elements");
  const double* s = scalars.data_ptr<double>();
  const double* row = current_data(current, kCpu);
  TORCH_CHECK_VALUE(!grad_scale.has_value() || grad_scale->numel() == 1,
                    "mgpp: grad_scale must hold one value");
  int64_t* hist = nullptr;
  if (histogram.has_value()) {
    hist = checked_histogram(*histogram, kHistHighBins).data_ptr<int64_t>();
  }
  if (step_skipped(row)) return;
  if (!step_prunes(row)) hist = nullptr;

  cpu::StepOptions options{};
  options.prior_on = step_prior_on(s, row);
  options.prior = step_prior(s, row);
  options.inv_grad_scale =
      grad_scale.has_value() ? 1.0f / grad_scale->to(at::kFloat).item<float>() : 1.0f;
  options.num_threads = at::get_num_threads();
  options.pattern = histogram_pattern;
  if (!window.empty()) {
    options.window = {static_cast<uint32_t>(window[0]), static_cast<uint32_t>(window[1])};
  }

  // The kernels take one (parameter dtype, state dtype) pair per call.
  std::map<std::pair<DType, DType>, std::vector<cpu::StepTensor>> by_dtype;
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

void abs_histogram_cpu(at::TensorList tensors, const Tensor& histogram, const Tensor& selection,
                       int64_t level, const std::optional<Tensor>& current,
                       at::IntArrayRef pattern_sizes) {
  const Pattern pattern = op_checks::to_pattern(pattern_sizes, tensors);
  TORCH_CHECK_VALUE(level == 0 || level == 1, "mgpp: level must be 0 or 1, got ", level);
  int64_t* hist =
      checked_histogram(histogram, level == 0 ? kHistHighBins : kHistLowBins).data_ptr<int64_t>();
  const uint32_t high_bin = key_high_bin(static_cast<uint32_t>(selection_data(selection)[kSelKey]));
  const auto groups = indices_by_dtype(tensors, kCpu);
  if (!step_prunes(current_data(current, kCpu))) return;
  for (const auto& [dtype, indices] : groups) {
    std::vector<ValueTensor> views;
    for (size_t i : indices) views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
    cpu::count_histogram(views.data(), static_cast<int64_t>(views.size()), dtype,
                         static_cast<int>(level), high_bin, hist, at::get_num_threads(), pattern);
  }
}

void radix_select_cpu(const Tensor& histogram, const Tensor& selection, int64_t level,
                      const std::optional<Tensor>& current) {
  TORCH_CHECK_VALUE(level == 0 || level == 1, "mgpp: level must be 0 or 1, got ", level);
  const Tensor hist = checked_histogram(histogram, level == 0 ? kHistHighBins : kHistLowBins);
  int64_t* state = selection_data(selection);
  if (!step_prunes(current_data(current, kCpu))) return;
  select_bin(hist.data_ptr<int64_t>(), static_cast<int>(level), state);
}

void check_masks(at::TensorList tensors, at::TensorList keep_masks) {
  TORCH_CHECK_VALUE(keep_masks.empty() || keep_masks.size() == tensors.size(),
                    "mgpp: keep_masks must be empty or one per tensor");
  for (size_t i = 0; i < keep_masks.size(); ++i) {
    op_checks::check_mask(keep_masks[i], tensors[i], kCpu, i);
  }
}

void apply_threshold_cpu(at::TensorList tensors, at::TensorList keep_masks,
                         const Tensor& selection, const std::optional<Tensor>& current,
                         at::IntArrayRef pattern_sizes) {
  check_masks(tensors, keep_masks);
  const Pattern pattern = op_checks::to_pattern(pattern_sizes, tensors);
  const uint32_t tau_key = static_cast<uint32_t>(selection_data(selection)[kSelKey]);
  const auto groups = indices_by_dtype(tensors, kCpu);
  const double* row = current_data(current, kCpu);
  if (!step_prunes(row)) return;
  const bool write_masks = !keep_masks.empty() && step_freezes(row);
  for (const auto& [dtype, indices] : groups) {
    std::vector<ValueTensor> views;
    std::vector<uint8_t*> masks;
    for (size_t i : indices) {
      views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
      if (write_masks) masks.push_back(keep_masks[i].data_ptr<uint8_t>());
    }
    cpu::apply_threshold(views.data(), write_masks ? masks.data() : nullptr,
                         static_cast<int64_t>(views.size()), dtype, tau_key,
                         at::get_num_threads(), pattern);
  }
}

// The flat position of each tensor's first element over the list, as partition_at_bin_ numbers
// the elements it collects.
std::vector<int64_t> flat_offsets(at::TensorList tensors) {
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (const Tensor& t : tensors) {
    offsets.push_back(total);
    total += t.numel();
  }
  TORCH_CHECK_VALUE(total <= int64_t{1} << 32,
                    "mgpp: partition_at_bin_ numbers at most 2^32 elements, got ", total);
  return offsets;
}

uint32_t* positions_data(const Tensor& positions) {
  TORCH_CHECK_VALUE(positions.device().is_cpu() && positions.scalar_type() == at::kInt &&
                        positions.is_contiguous(),
                    "mgpp: positions must be a contiguous CPU int32 tensor");
  return reinterpret_cast<uint32_t*>(positions.data_ptr<int32_t>());
}

void partition_at_bin_cpu(at::TensorList tensors, at::TensorList keep_masks,
                          const Tensor& selection, const Tensor& low_histogram,
                          const Tensor& positions, at::IntArrayRef pattern_sizes) {
  check_masks(tensors, keep_masks);
  const Pattern pattern = op_checks::to_pattern(pattern_sizes, tensors);
  int64_t* hist = checked_histogram(low_histogram, kHistLowBins).data_ptr<int64_t>();
  const uint32_t high_bin = key_high_bin(static_cast<uint32_t>(selection_data(selection)[kSelKey]));
  TORCH_CHECK_VALUE(high_bin < key_high_bin(0x7F800000u),
                    "mgpp: partition_at_bin_ takes a bin below +inf's (τ must not be NaN)");
  const std::vector<int64_t> offsets = flat_offsets(tensors);
  uint32_t* out = positions_data(positions);
  int64_t collected = 0;
  for (const auto& [dtype, indices] : indices_by_dtype(tensors, kCpu)) {
    std::vector<ValueTensor> views;
    std::vector<int64_t> view_offsets;
    std::vector<uint8_t*> masks;
    for (size_t i : indices) {
      views.push_back({tensors[i].data_ptr(), tensors[i].numel()});
      view_offsets.push_back(offsets[i]);
      if (!keep_masks.empty()) masks.push_back(keep_masks[i].data_ptr<uint8_t>());
    }
    try {
      collected += cpu::partition_at_bin(views.data(), view_offsets.data(),
                                         keep_masks.empty() ? nullptr : masks.data(),
                                         static_cast<int64_t>(views.size()), dtype, high_bin,
                                         out + collected, positions.numel() - collected, hist,
                                         at::get_num_threads(), pattern);
    } catch (const std::length_error& error) {
      TORCH_CHECK_VALUE(false, error.what());
    }
  }
  TORCH_CHECK_VALUE(collected == positions.numel(), "mgpp: τ's bin holds ", collected,
                    " elements here, but positions has room for ", positions.numel());
}

void prune_collected_cpu(at::TensorList tensors, at::TensorList keep_masks,
                         const Tensor& positions, const Tensor& selection,
                         at::IntArrayRef pattern_sizes) {
  check_masks(tensors, keep_masks);
  const Pattern pattern = op_checks::to_pattern(pattern_sizes, tensors);
  const uint32_t tau_key = static_cast<uint32_t>(selection_data(selection)[kSelKey]);
  const std::vector<int64_t> offsets = flat_offsets(tensors);
  std::vector<cpu::PrunedTensor> pruned;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], kCpu, "tensors", i);
    pruned.push_back({tensors[i].data_ptr(), tensors[i].numel(),
                      to_kernel_dtype(tensors[i].scalar_type(), "tensors"),
                      keep_masks.empty() ? nullptr : keep_masks[i].data_ptr<uint8_t>(),
                      offsets[i]});
  }
  cpu::prune_collected(pruned.data(), static_cast<int64_t>(pruned.size()),
                       positions_data(positions), positions.numel(), tau_key,
                       at::get_num_threads(), pattern);
}

void schedule_step_cpu(const Tensor& table, const Tensor& position, const Tensor& current,
                       const std::optional<Tensor>& found_inf) {
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.scalar_type() == at::kDouble &&
                        table.is_contiguous() && table.dim() == 2 && table.size(0) >= 1 &&
                        table.size(1) == kNumScheduleColumns,
                    "mgpp: table must be a contiguous CPU float64 tensor of shape (rows >= 1, ",
                    kNumScheduleColumns, ")");
  TORCH_CHECK_VALUE(position.device().is_cpu() && position.scalar_type() == at::kLong &&
                        position.numel() == 1,
                    "mgpp: position must be a CPU int64 tensor of one element");
  double* row = current_data(current, kCpu);
  float inf_found = 0.0f;
  if (found_inf.has_value()) {
    TORCH_CHECK_VALUE(found_inf->device().is_cpu() && found_inf->numel() == 1 &&
                          found_inf->is_floating_point(),
                      "mgpp: found_inf must be a floating CPU tensor of one element");
    inf_found = found_inf->to(at::kFloat).item<float>();
  }
  write_step_row(table.data_ptr<double>(), table.size(0), position.data_ptr<int64_t>(),
                 found_inf.has_value() ? &inf_found : nullptr, row);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpp, CPU, m) {
  m.impl("fused_step_", &fused_step_cpu);
  m.impl("abs_histogram_", &abs_histogram_cpu);
  m.impl("radix_select_", &radix_select_cpu);
  m.impl("apply_threshold_", &apply_threshold_cpu);
  m.impl("schedule_step_", &schedule_step_cpu);
  m.impl("partition_at_bin_", &partition_at_bin_cpu);
  m.impl("prune_collected_", &prune_collected_cpu);
}

}  // namespace mgpp
