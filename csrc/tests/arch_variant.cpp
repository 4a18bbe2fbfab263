// One build of the shared math and the CPU kernels for csrc/tests/test_cpu_arch.cpp (see
// arch_variant.h): what the cpu backend computes, in this build's namespace.
#include "arch_variant.h"

#include <cstring>

#include "cpu/kernels.h"

namespace MGPP_NAMESPACE {
namespace {

uint32_t bits(float x) { return float_to_bits(x); }

std::vector<uint32_t> math(const std::vector<float>& z, const std::vector<float>& theta,
                           const std::vector<double>& scalars) {
  const PriorConstants prior = prior_constants(scalars.data());
  const AdamWScalars adamw = adamw_scalars(scalars.data(), 3.0);
  std::vector<uint32_t> out;
  for (float x : z) out.push_back(bits(exp_for_logistic(x)));
  for (float t : theta) out.push_back(bits(prior_gradient(t, prior)));
  for (float t : theta) {
    float m = 1e-5f, v = 1e-9f;
    step_element<PriorTerm::kSpikeAndSlab>(t, m, v, 1e-4f, true, 1.0f, prior, adamw);
    out.insert(out.end(), {bits(t), bits(m), bits(v)});
  }
  return out;
}

// `values` in the storage format of `dtype`, rounded as the kernels store.
std::vector<uint8_t> stored(DType dtype, const std::vector<float>& values) {
  std::vector<uint8_t> bytes;
  dispatch_dtype(dtype, [&](auto format) {
    using F = decltype(format);
    bytes.resize(values.size() * sizeof(typename F::T));
    for (size_t i = 0; i < values.size(); ++i) {
      const typename F::T x = F::store(values[i]);
      memcpy(&bytes[i * sizeof(x)], &x, sizeof(x));
    }
  });
  return bytes;
}

ScheduleResult run(const ScheduleRun& in) {
  const DType param_dtype = static_cast<DType>(in.param_dtype);
  const DType state_dtype = static_cast<DType>(in.state_dtype);
  const size_t count = in.params.size();
  ScheduleResult out;
  for (const auto& p : in.params) {
    out.params.push_back(stored(param_dtype, p));
    out.exp_avgs.push_back(stored(state_dtype, std::vector<float>(p.size(), 0.0f)));
    out.exp_avg_sqs.push_back(stored(state_dtype, std::vector<float>(p.size(), 0.0f)));
    out.keep_masks.emplace_back((p.size() + 7) / 8, 0);
  }
  std::vector<ValueTensor> views;
  std::vector<uint8_t*> masks;
  for (size_t i = 0; i < count; ++i) {
    views.push_back({out.params[i].data(), static_cast<int64_t>(in.params[i].size())});
    masks.push_back(out.keep_masks[i].data());
  }
  for (size_t t = 0; t < in.scalars.size(); ++t) {
    const double* s = in.scalars[t].data();
    const bool frozen = static_cast<int>(t) > in.freeze_step;
    std::vector<std::vector<uint8_t>> grads;
    std::vector<cpu::StepTensor> tensors;
    for (size_t i = 0; i < count; ++i) {
      grads.push_back(stored(param_dtype, in.grads[t][i]));
      tensors.push_back({out.params[i].data(), grads[i].data(), out.exp_avgs[i].data(),
                         out.exp_avg_sqs[i].data(), frozen ? masks[i] : nullptr,
                         static_cast<int64_t>(in.params[i].size()),
                         adamw_scalars(s, static_cast<double>(t + 1))});
    }
    const cpu::StepOptions options{param_dtype, state_dtype, s[kPriorOn] != 0.0,
                                   prior_constants(s), 1.0f, in.threads, Pattern{},
                                   cpu::HighBinWindow{}};
    const bool event = in.prune_k[t] > 0;
    std::vector<int64_t> high(kHistHighBins, 0), low(kHistLowBins, 0);
    cpu::fused_step(tensors.data(), static_cast<int64_t>(count), options,
                    event ? high.data() : nullptr);
    if (!event) continue;
    // The cpu backend's event: one pass at level 0 for bfloat16, else partition_at_bin, level 1
    // over the collected elements and prune_collected.
    int64_t selection[kNumSelectionSlots] = {in.prune_k[t], 0, 0};
    select_bin(high.data(), 0, selection);
    uint8_t* const* keep_masks = static_cast<int>(t) == in.freeze_step ? masks.data() : nullptr;
    if (param_dtype != DType::BFloat16) {
      const uint32_t high_bin = key_high_bin(static_cast<uint32_t>(selection[kSelKey]));
      std::vector<uint32_t> positions(static_cast<size_t>(high[high_bin]));
      std::vector<int64_t> offsets;
      std::vector<cpu::PrunedTensor> pruned;
      int64_t offset = 0;
      for (size_t i = 0; i < count; ++i) {
        offsets.push_back(offset);
        pruned.push_back({views[i].data, views[i].numel, param_dtype,
                          keep_masks == nullptr ? nullptr : keep_masks[i], offset});
        offset += views[i].numel;
      }
      const int64_t collected = cpu::partition_at_bin(
          views.data(), offsets.data(), keep_masks, static_cast<int64_t>(count), param_dtype,
          high_bin, positions.data(), static_cast<int64_t>(positions.size()), low.data(),
          in.threads);
      select_bin(low.data(), 1, selection);
      cpu::prune_collected(pruned.data(), static_cast<int64_t>(count), positions.data(),
                           collected, static_cast<uint32_t>(selection[kSelKey]), in.threads);
    } else {
      cpu::apply_threshold(views.data(), keep_masks, static_cast<int64_t>(count), param_dtype,
                           static_cast<uint32_t>(selection[kSelKey]), in.threads);
    }
    const uint32_t tau_key = static_cast<uint32_t>(selection[kSelKey]);
    out.tau_keys.push_back(tau_key);
  }
  return out;
}

}  // namespace

ArchVariant arch_variant() { return ArchVariant{cpu::build_info(), &math, &run}; }

}  // namespace MGPP_NAMESPACE
