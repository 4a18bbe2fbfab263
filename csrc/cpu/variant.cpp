// The dispatch table entry of one build of the CPU kernels (csrc/cpu/dispatch.h): compiled with
// csrc/cpu/kernels.cpp, with the same flags, once per capability, each in its own namespace
// (-DMGPP_NAMESPACE=mgpp_<capability>, -DMGPP_CPU_CAPABILITY=<capability>,
// -DMGPP_CPU_ARCH=<-march target>).
#include "dispatch.h"

#if !defined(MGPP_CPU_CAPABILITY) || !defined(MGPP_CPU_ARCH)
#error "build with -DMGPP_CPU_CAPABILITY=<capability> -DMGPP_CPU_ARCH=<the -march value>"
#endif
#define MGPP_VARIANT_STRINGIFY(x) #x
#define MGPP_VARIANT_EXPAND_AND_STRINGIFY(x) MGPP_VARIANT_STRINGIFY(x)

namespace MGPP_NAMESPACE {
namespace cpu {
namespace {

// What this build's target needs of the CPU, from the compiler's predefined macros.
constexpr uint32_t kRequiredFeatures = 0
#if defined(__SSE3__)
    | mgpp_abi::cpu::kSse3
#endif
#if defined(__SSSE3__)
    | mgpp_abi::cpu::kSsse3
#endif
#if defined(__SSE4_1__)
    | mgpp_abi::cpu::kSse41
#endif
#if defined(__SSE4_2__)
    | mgpp_abi::cpu::kSse42
#endif
#if defined(__POPCNT__)
    | mgpp_abi::cpu::kPopcnt
#endif
#if defined(__AVX__)
    | mgpp_abi::cpu::kAvx
#endif
#if defined(__AVX2__)
    | mgpp_abi::cpu::kAvx2
#endif
#if defined(__FMA__)
    | mgpp_abi::cpu::kFma
#endif
#if defined(__F16C__)
    | mgpp_abi::cpu::kF16c
#endif
#if defined(__BMI__)
    | mgpp_abi::cpu::kBmi
#endif
#if defined(__BMI2__)
    | mgpp_abi::cpu::kBmi2
#endif
#if defined(__AVX512F__)
    | mgpp_abi::cpu::kAvx512f
#endif
#if defined(__AVX512BW__)
    | mgpp_abi::cpu::kAvx512bw
#endif
#if defined(__AVX512VL__)
    | mgpp_abi::cpu::kAvx512vl
#endif
#if defined(__AVX512DQ__)
    | mgpp_abi::cpu::kAvx512dq
#endif
#if defined(__AVX512CD__)
    | mgpp_abi::cpu::kAvx512cd
#endif
#if defined(__AVX512BF16__)
    | mgpp_abi::cpu::kAvx512bf16
#endif
    ;

}  // namespace

// Constant-initialised: csrc/cpu/dispatch.cpp reads it before this build may run on the CPU.
extern const mgpp_abi::cpu::KernelTable kernel_table;
const mgpp_abi::cpu::KernelTable kernel_table = {
    MGPP_VARIANT_EXPAND_AND_STRINGIFY(MGPP_CPU_CAPABILITY),
    MGPP_VARIANT_EXPAND_AND_STRINGIFY(MGPP_CPU_ARCH),
    kRequiredFeatures,
    &fused_step,
    &count_histogram,
    &apply_threshold,
    &partition_at_bin,
    &prune_collected,
    &build_info,
};

}  // namespace cpu
}  // namespace MGPP_NAMESPACE
