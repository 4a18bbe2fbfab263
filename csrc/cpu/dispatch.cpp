// The dispatcher of csrc/cpu/dispatch.h, compiled once for the baseline target with the rest of
// the extension. setup.py and CMakeLists.txt define MGPP_CPU_BUILD_<NAME> for each build of the
// kernels they link (namespaces mgpp_baseline, mgpp_avx2, mgpp_avx512, or mgpp_single for the
// one build of a MGPP_CPU_ARCH or non-x86 build), objects of lower capability first: the linker
// keeps the first copy of an inline function that several builds instantiate (a std::vector
// member, say), which is then one that every CPU running a later build can run.
#include "dispatch.h"

#include <cstdlib>
#include <stdexcept>

#if !defined(MGPP_CPU_BUILD_BASELINE) && !defined(MGPP_CPU_BUILD_AVX2) && \
    !defined(MGPP_CPU_BUILD_AVX512) && !defined(MGPP_CPU_BUILD_SINGLE)
#error "define MGPP_CPU_BUILD_<NAME> for each build of csrc/cpu/kernels.cpp linked in"
#endif

#define MGPP_DECLARE_BUILD(ns)                         \
  namespace ns {                                       \
  namespace cpu {                                      \
  extern const mgpp_abi::cpu::KernelTable kernel_table; \
  }                                                    \
  }
#if defined(MGPP_CPU_BUILD_BASELINE)
MGPP_DECLARE_BUILD(mgpp_baseline)
#endif
#if defined(MGPP_CPU_BUILD_AVX2)
MGPP_DECLARE_BUILD(mgpp_avx2)
#endif
#if defined(MGPP_CPU_BUILD_AVX512)
MGPP_DECLARE_BUILD(mgpp_avx512)
#endif
#if defined(MGPP_CPU_BUILD_SINGLE)
MGPP_DECLARE_BUILD(mgpp_single)
#endif
#undef MGPP_DECLARE_BUILD

namespace mgpp {
namespace cpu {
namespace {

const char* const kFeatureNames[] = {
#define MGPP_FEATURE_NAME(enumerator, name) name,
    MGPP_CPU_FEATURES(MGPP_FEATURE_NAME)
#undef MGPP_FEATURE_NAME
};

std::string build_names() {
  std::string names;
  for (const KernelTable* build : kernel_builds()) {
    names += std::string(names.empty() ? "" : ", ") + build->capability + " (-march=" +
             build->march + ")";
  }
  return names;
}

std::string supported_names(uint32_t features) {
  std::string names;
  for (const KernelTable* build : kernel_builds()) {
    if ((build->required_features & ~features) == 0) {
      names += std::string(names.empty() ? "" : ", ") + build->capability;
    }
  }
  return names.empty() ? "none" : names;
}

const char* forced_capability() {
  const char* forced = std::getenv("MGPP_CPU_CAPABILITY");
  return forced != nullptr && forced[0] != '\0' ? forced : nullptr;
}

}  // namespace

uint32_t cpu_features() {
  uint32_t features = 0;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define MGPP_FEATURE_SUPPORTED(enumerator, name) \
  if (__builtin_cpu_supports(name)) features |= mgpp_abi::cpu::enumerator;
  MGPP_CPU_FEATURES(MGPP_FEATURE_SUPPORTED)
#undef MGPP_FEATURE_SUPPORTED
#endif
  return features;
}

std::string feature_names(uint32_t features) {
  std::string names;
  for (int i = 0; i < mgpp_abi::cpu::kNumCpuFeatures; ++i) {
    if (features & (uint32_t{1} << i)) {
      names += std::string(names.empty() ? "" : " ") + kFeatureNames[i];
    }
  }
  return names;
}

const std::vector<const KernelTable*>& kernel_builds() {
  static const std::vector<const KernelTable*> builds = {
#if defined(MGPP_CPU_BUILD_BASELINE)
      &mgpp_baseline::cpu::kernel_table,
#endif
#if defined(MGPP_CPU_BUILD_AVX2)
      &mgpp_avx2::cpu::kernel_table,
#endif
#if defined(MGPP_CPU_BUILD_AVX512)
      &mgpp_avx512::cpu::kernel_table,
#endif
#if defined(MGPP_CPU_BUILD_SINGLE)
      &mgpp_single::cpu::kernel_table,
#endif
  };
  return builds;
}

const KernelTable& choose_kernels(uint32_t features, const char* forced) {
  const auto& builds = kernel_builds();
  if (forced != nullptr && forced[0] != '\0') {
    for (const KernelTable* build : builds) {
      if (std::string(forced) != build->capability) continue;
      const uint32_t missing = build->required_features & ~features;
      if (missing != 0) {
        throw std::runtime_error(
            std::string("mgpp: MGPP_CPU_CAPABILITY=") + forced +
            " forces the CPU kernels built with -march=" + build->march +
            ", but this CPU lacks " + feature_names(missing) + " (it runs: " +
            supported_names(features) + ")");
      }
      return *build;
    }
    throw std::invalid_argument(std::string("mgpp: MGPP_CPU_CAPABILITY=") + forced +
                                " names no build of the CPU kernels; this binary has " +
                                build_names());
  }
  const KernelTable* best = nullptr;
  for (const KernelTable* build : builds) {
    if ((build->required_features & ~features) == 0) best = build;
  }
  if (best == nullptr) {
    const KernelTable& lowest = *builds.front();
    throw std::runtime_error(
        std::string("mgpp: this CPU runs none of the builds of the CPU kernels (") +
        build_names() + "): it lacks " +
        feature_names(lowest.required_features & ~features) + " of -march=" + lowest.march +
        "; rebuild with MGPP_CPU_ARCH set to a target it supports");
  }
  return *best;
}

const KernelTable& kernels() {
  static const KernelTable& chosen = choose_kernels(cpu_features(), forced_capability());
  return chosen;
}

// ---- the kernels.h entry points of namespace mgpp: the chosen build's ---------------------------

void fused_step(const StepTensor* tensors, int64_t count, const StepOptions& options,
                int64_t* high_histogram) {
  kernels().fused_step(tensors, count, options, high_histogram);
}

void count_histogram(const ValueTensor* tensors, int64_t count, DType dtype, int level,
                     uint32_t high_bin, int64_t* histogram, int num_threads, Pattern pattern) {
  kernels().count_histogram(tensors, count, dtype, level, high_bin, histogram, num_threads,
                            pattern);
}

void apply_threshold(const ValueTensor* tensors, uint8_t* const* keep_masks, int64_t count,
                     DType dtype, uint32_t tau_key, int num_threads, Pattern pattern) {
  kernels().apply_threshold(tensors, keep_masks, count, dtype, tau_key, num_threads, pattern);
}

int64_t partition_at_bin(const ValueTensor* tensors, const int64_t* flat_offsets,
                         uint8_t* const* keep_masks, int64_t count, DType dtype, uint32_t high_bin,
                         uint32_t* positions, int64_t capacity, int64_t* low_histogram,
                         int num_threads, Pattern pattern) {
  return kernels().partition_at_bin(tensors, flat_offsets, keep_masks, count, dtype, high_bin,
                                    positions, capacity, low_histogram, num_threads, pattern);
}

void prune_collected(const PrunedTensor* tensors, int64_t count, const uint32_t* positions,
                     int64_t num_positions, uint32_t tau_key, int num_threads, Pattern pattern) {
  kernels().prune_collected(tensors, count, positions, num_positions, tau_key, num_threads,
                            pattern);
}

// "cpu kernels: path <capability> (<how chosen>; built: <capability> (-march=<target>), ...),
// " then the chosen build's own build_info after its "cpu kernels: ".
std::string build_info() {
  const KernelTable& chosen = kernels();
  const std::string how = forced_capability() != nullptr
                              ? "forced by MGPP_CPU_CAPABILITY"
                              : "the best this CPU supports";
  const std::string prefix = "cpu kernels: ";
  std::string info = chosen.build_info();
  if (info.compare(0, prefix.size(), prefix) == 0) info = info.substr(prefix.size());
  return prefix + "path " + chosen.capability + " (" + how + "; built: " + build_names() +
         "), " + info;
}

}  // namespace cpu
}  // namespace mgpp
