// The interface of csrc/tests/arch_variant.cpp, which CMake compiles with the CPU kernels once per
// -march target, each build in its own namespace (-DMGPP_NAMESPACE=mgpp_x86_64, mgpp_x86_64_v3,
// mgpp_native), so that csrc/tests/test_cpu_arch.cpp links them all and compares their results
// bit for bit. Plain types only: the test's own translation unit includes no kernel header.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// A run of the CPU kernels through the stages of a pruning schedule, as the cpu backend drives
// them: the same inputs for every build.
struct ScheduleRun {
  int param_dtype;  // DType codes (csrc/core/formats.h)
  int state_dtype;
  int threads;
  std::vector<std::vector<float>> params;              // initial values, per tensor
  std::vector<std::vector<std::vector<float>>> grads;  // [step][tensor]
  std::vector<std::vector<double>> scalars;            // [step]: the step scalars, StepScalar order
  std::vector<int64_t> prune_k;                        // [step]: τ's rank, 0 without an event
  int freeze_step;                                     // the event that writes the keep masks
};

// What a run leaves: each tensor's stored bytes and τ's key at each event.
struct ScheduleResult {
  std::vector<std::vector<uint8_t>> params, exp_avgs, exp_avg_sqs, keep_masks;
  std::vector<uint32_t> tau_keys;
};

struct ArchVariant {
  std::string build_info;  // cpu::build_info() of this build
  // The bits of exp_for_logistic(z) for each z, then of prior_gradient(θ) and of one
  // step_element's θ, m and v for each θ, with the prior constants and AdamW scalars (k = 3) of
  // `scalars`.
  std::vector<uint32_t> (*math)(const std::vector<float>& z, const std::vector<float>& theta,
                                const std::vector<double>& scalars);
  ScheduleResult (*run)(const ScheduleRun& run);
};

namespace mgpp_x86_64 {
ArchVariant arch_variant();
}
namespace mgpp_x86_64_v3 {
ArchVariant arch_variant();
}
namespace mgpp_native {
ArchVariant arch_variant();
}
