// The dispatcher of csrc/cpu/dispatch.h: each build's requirements follow its -march target, the
// CPU's features are what __builtin_cpu_supports reports, the chosen build is the last one those
// features allow (or the one MGPP_CPU_CAPABILITY forces), an unknown or unsupported capability is
// an error that names it, and every build this CPU runs takes a step through the table.
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "cpu/dispatch.h"

using namespace mgpp;
namespace abi = mgpp_abi::cpu;

namespace {

constexpr uint32_t kAvx2Set = abi::kAvx | abi::kAvx2 | abi::kFma | abi::kF16c | abi::kBmi |
                              abi::kBmi2;
constexpr uint32_t kAvx512Set = abi::kAvx512f | abi::kAvx512bw | abi::kAvx512vl | abi::kAvx512dq;

const cpu::KernelTable* find(const std::string& capability) {
  for (const cpu::KernelTable* build : cpu::kernel_builds()) {
    if (capability == build->capability) return build;
  }
  return nullptr;
}

bool runs_on(const cpu::KernelTable& build, uint32_t features) {
  return (build.required_features & ~features) == 0;
}

// What the CPU reports, asked here directly.
uint32_t features_asked_here() {
  uint32_t f = 0;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) f |= abi::kAvx2;
  if (__builtin_cpu_supports("fma")) f |= abi::kFma;
  if (__builtin_cpu_supports("f16c")) f |= abi::kF16c;
  if (__builtin_cpu_supports("avx512f")) f |= abi::kAvx512f;
  if (__builtin_cpu_supports("avx512bw")) f |= abi::kAvx512bw;
  if (__builtin_cpu_supports("avx512vl")) f |= abi::kAvx512vl;
  if (__builtin_cpu_supports("avx512dq")) f |= abi::kAvx512dq;
  if (__builtin_cpu_supports("avx512bf16")) f |= abi::kAvx512bf16;
#endif
  return f;
}

void test_builds_require_their_targets() {
  const auto& builds = cpu::kernel_builds();
  CHECK(!builds.empty(), "no build of the kernels");
  for (const cpu::KernelTable* build : builds) {
    std::printf("build %s: -march=%s, needs [%s]\n", build->capability, build->march,
                cpu::feature_names(build->required_features).c_str());
    CHECK(build->build_info().find(std::string("-march=") + build->march + " (") !=
              std::string::npos,
          "%s reports %s", build->capability, build->build_info().c_str());
  }
  if (const cpu::KernelTable* b = find("baseline")) {
    CHECK(b == builds.front(), "baseline is not the first build");
    CHECK((b->required_features & (kAvx2Set | kAvx512Set)) == 0, "baseline needs %s",
          cpu::feature_names(b->required_features).c_str());
  }
  if (const cpu::KernelTable* b = find("avx2")) {
    CHECK((b->required_features & kAvx2Set) == kAvx2Set, "avx2 needs %s",
          cpu::feature_names(b->required_features).c_str());
    CHECK((b->required_features & kAvx512Set) == 0, "avx2 needs %s",
          cpu::feature_names(b->required_features).c_str());
  }
  if (const cpu::KernelTable* b = find("avx512")) {
    CHECK((b->required_features & (kAvx2Set | kAvx512Set)) == (kAvx2Set | kAvx512Set),
          "avx512 needs %s", cpu::feature_names(b->required_features).c_str());
    CHECK(b == builds.back(), "avx512 is not the last build");
  }
}

void test_choice_follows_the_features() {
  const uint32_t here = cpu::cpu_features();
  const uint32_t asked = features_asked_here();
  const uint32_t compared = kAvx2Set & ~(abi::kAvx | abi::kBmi | abi::kBmi2);
  const uint32_t mask = compared | kAvx512Set | abi::kAvx512bf16;
  CHECK((here & mask) == asked, "cpu_features() = [%s], __builtin_cpu_supports: [%s]",
        cpu::feature_names(here & mask).c_str(), cpu::feature_names(asked).c_str());
  std::printf("this CPU: [%s]\n", cpu::feature_names(here).c_str());

  // The last build that the features allow, for the CPU's and for synthetic feature sets.
  const uint32_t all = ~uint32_t{0};
  for (uint32_t features : {here, uint32_t{0}, all, all & ~kAvx512Set, all & ~abi::kFma,
                            all & ~abi::kAvx512bw}) {
    const cpu::KernelTable* expected = nullptr;
    for (const cpu::KernelTable* build : cpu::kernel_builds()) {
      if (runs_on(*build, features)) expected = build;
    }
    try {
      const cpu::KernelTable& chosen = cpu::choose_kernels(features, nullptr);
      CHECK(&chosen == expected, "features [%s]: chose %s", cpu::feature_names(features).c_str(),
            chosen.capability);
    } catch (const std::runtime_error& error) {
      CHECK(expected == nullptr, "features [%s]: %s", cpu::feature_names(features).c_str(),
            error.what());
    }
  }
  if (const cpu::KernelTable* b = find("avx2")) {
    CHECK(&cpu::choose_kernels(all & ~kAvx512Set, nullptr) == b, "no AVX-512: not avx2");
  }
  if (const cpu::KernelTable* b = find("baseline")) {
    CHECK(&cpu::choose_kernels(0, nullptr) == b, "no extension: not baseline");
    CHECK(&cpu::choose_kernels(all & ~abi::kFma, nullptr) == b, "no FMA: not baseline");
  }
  const char* forced = std::getenv("MGPP_CPU_CAPABILITY");
  CHECK(&cpu::kernels() == &cpu::choose_kernels(here, forced), "kernels() is not the choice");
  const std::string info = cpu::build_info();
  CHECK(info.rfind(std::string("cpu kernels: path ") + cpu::kernels().capability + " (", 0) == 0,
        "build_info: %s", info.c_str());
  std::printf("%s\n", info.c_str());
}

void test_forcing() {
  for (const cpu::KernelTable* build : cpu::kernel_builds()) {
    const uint32_t all = ~uint32_t{0};
    CHECK(&cpu::choose_kernels(all, build->capability) == build, "forcing %s", build->capability);
    if (build->required_features == 0) continue;
    try {
      cpu::choose_kernels(0, build->capability);
      CHECK(false, "forcing %s on a CPU without its features is no error", build->capability);
    } catch (const std::runtime_error& error) {
      const std::string what = error.what();
      CHECK(what.find(std::string("MGPP_CPU_CAPABILITY=") + build->capability) !=
                    std::string::npos &&
                what.find("lacks") != std::string::npos,
            "the error says %s", error.what());
    }
  }
  try {
    cpu::choose_kernels(~uint32_t{0}, "sse9");
    CHECK(false, "an unknown capability is no error");
  } catch (const std::invalid_argument& error) {
    CHECK(std::string(error.what()).find("MGPP_CPU_CAPABILITY=sse9 names no build") !=
              std::string::npos,
          "the error says %s", error.what());
  }
}

// One float32 step of 100 elements through each build the CPU runs: the table calls the build.
void test_every_runnable_build_steps() {
  for (const cpu::KernelTable* build : cpu::kernel_builds()) {
    if (!runs_on(*build, cpu::cpu_features())) continue;
    std::vector<float> param(100, 0.5f), grad(100, 0.25f), m(100, 0.0f), v(100, 0.0f);
    cpu::StepTensor t{param.data(), grad.data(), m.data(), v.data(), nullptr, 100,
                      AdamWScalars{1.0f, 0.1f, 0.999f, 0.001f, 0.01f, 1.0f, 1e-8f}};
    cpu::StepOptions options{DType::Float32, DType::Float32, false, PriorConstants{}, 1.0f, 2,
                             Pattern{}, cpu::HighBinWindow{}};
    build->fused_step(&t, 1, options, nullptr);
    CHECK(param[99] < 0.5f && m[0] > 0.0f, "%s: no step (θ = %g)", build->capability, param[99]);
  }
}

}  // namespace

int main() {
  test_builds_require_their_targets();
  test_choice_follows_the_features();
  test_forcing();
  test_every_runnable_build_steps();
  return TEST_MAIN_RESULT();
}
