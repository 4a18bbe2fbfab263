// Runtime dispatch of the CPU kernels by instruction set, as ATen's CPU_CAPABILITY: one build of
// the extension carries csrc/cpu/kernels.cpp compiled once per capability of
// csrc/compile_flags.txt's [cpu-capabilities] (baseline x86-64, avx2 = x86-64-v3, avx512 =
// x86-64-v4), each in its own namespace mgpp_<capability> with its entry in csrc/cpu/variant.cpp,
// and csrc/cpu/dispatch.cpp runs the best one the CPU supports, chosen once, at the first call.
// MGPP_CPU_CAPABILITY=<capability> forces one (an unknown name, or one the CPU lacks, is an
// error). A build with MGPP_CPU_ARCH set carries one build for that -march (capability: its
// name). The dispatcher defines the mgpp::cpu functions of kernels.h, so that csrc/ops/cpu.cpp
// calls them as before; build_info() names every build and the path taken. Torch-free.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "kernels.h"

namespace mgpp_abi {
namespace cpu {

// The instruction-set extensions a build may be compiled for, as __builtin_cpu_supports names
// them (the list of csrc/cpu/dispatch.cpp's cpu_features).
#define MGPP_CPU_FEATURES(X)  \
  X(kSse3, "sse3")             \
  X(kSsse3, "ssse3")           \
  X(kSse41, "sse4.1")          \
  X(kSse42, "sse4.2")          \
  X(kPopcnt, "popcnt")         \
  X(kAvx, "avx")               \
  X(kAvx2, "avx2")             \
  X(kFma, "fma")               \
  X(kF16c, "f16c")             \
  X(kBmi, "bmi")               \
  X(kBmi2, "bmi2")             \
  X(kAvx512f, "avx512f")       \
  X(kAvx512bw, "avx512bw")     \
  X(kAvx512vl, "avx512vl")     \
  X(kAvx512dq, "avx512dq")     \
  X(kAvx512cd, "avx512cd")     \
  X(kAvx512bf16, "avx512bf16")

#define MGPP_FEATURE_INDEX(enumerator, name) enumerator##Index,
enum CpuFeatureIndex : int { MGPP_CPU_FEATURES(MGPP_FEATURE_INDEX) kNumCpuFeatures };
#undef MGPP_FEATURE_INDEX
#define MGPP_FEATURE_BIT(enumerator, name) \
  constexpr uint32_t enumerator = uint32_t{1} << enumerator##Index;
MGPP_CPU_FEATURES(MGPP_FEATURE_BIT)
#undef MGPP_FEATURE_BIT

// One build of the kernels: its entry points (kernels.h) and what it needs of the CPU. Each is a
// constant-initialised variable (no code of a build runs before the CPU is checked).
struct KernelTable {
  const char* capability;     // "baseline", "avx2", "avx512", or the -march of a one-build build
  const char* march;          // the -march target it is compiled for
  uint32_t required_features; // CpuFeature bits of the predefined macros of its target
  void (*fused_step)(const StepTensor* tensors, int64_t count, const StepOptions& options,
                     int64_t* high_histogram);
  void (*count_histogram)(const ValueTensor* tensors, int64_t count, DType dtype, int level,
                          uint32_t high_bin, int64_t* histogram, int num_threads, Pattern pattern);
  void (*apply_threshold)(const ValueTensor* tensors, uint8_t* const* keep_masks, int64_t count,
                          DType dtype, uint32_t tau_key, int num_threads, Pattern pattern);
  int64_t (*partition_at_bin)(const ValueTensor* tensors, const int64_t* flat_offsets,
                              uint8_t* const* keep_masks, int64_t count, DType dtype,
                              uint32_t high_bin, uint32_t* positions, int64_t capacity,
                              int64_t* low_histogram, int num_threads, Pattern pattern);
  void (*prune_collected)(const PrunedTensor* tensors, int64_t count, const uint32_t* positions,
                          int64_t num_positions, uint32_t tau_key, int num_threads,
                          Pattern pattern);
  std::string (*build_info)();
};

}  // namespace cpu
}  // namespace mgpp_abi

namespace mgpp {
namespace cpu {

using mgpp_abi::cpu::KernelTable;

// The CpuFeature bits this CPU reports (__builtin_cpu_supports; 0 off x86).
uint32_t cpu_features();

// The names of `features`' bits, space-separated ("avx2 fma f16c").
std::string feature_names(uint32_t features);

// Every build of the kernels in this binary, lowest capability first.
const std::vector<const KernelTable*>& kernel_builds();

// The build to run on a CPU with `features`: the one named `forced` (MGPP_CPU_CAPABILITY; null or
// empty: not forced), else the last one the CPU supports. Throws std::invalid_argument when
// `forced` names no build, std::runtime_error when the CPU lacks what the chosen build needs.
const KernelTable& choose_kernels(uint32_t features, const char* forced);

// The build this process runs: choose_kernels(cpu_features(), $MGPP_CPU_CAPABILITY), chosen at
// the first call (an error is thrown again at every call).
const KernelTable& kernels();

}  // namespace cpu
}  // namespace mgpp
