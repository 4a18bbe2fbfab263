// The CPU kernels built for different -march targets agree within docs/spec.md §4 (csrc/core/step.h's
// mul_add rounds once with FMA and twice without, so the builds are no longer bit-identical):
// builds for plain x86-64 (SSE2, no FMA, the portable conversions), for x86-64-v3 (AVX2, FMA,
// F16C) and for the native target run the same inputs, a grid of the math near the spike (within
// a few ulp: the same math, other roundings) and 20 steps through every stage of a pruning
// schedule (dense, events, the freeze, the frozen mask) in every storage layout (§4's bound for
// runs through every stage). This file includes only the layout's constants; the kernels come
// from the three builds.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "arch_variant.h"
#include "check.h"
#include "core/layout.h"

namespace {

// The authors' GLUE setting: σ0² = 1e-10, σ1² = 0.05, λ = 0.1, n = 67349 (SST-2).
constexpr double kSigma0Sq = 1e-10, kSigma1Sq = 0.05, kLambda = 0.1, kTrainExamples = 67349;
constexpr double kLr = 1e-3, kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8, kWeightDecay = 0.01;

// The step scalars at slab weight λ_t as the Python side builds them (prior ones 0 while it is off).
std::vector<double> step_scalars(double lambda_t, bool prior_on) {
  std::vector<double> s(mgpp::kNumStepScalars, 0.0);
  s[mgpp::kLr] = kLr;
  s[mgpp::kBeta1] = kBeta1;
  s[mgpp::kBeta2] = kBeta2;
  s[mgpp::kEps] = kEps;
  s[mgpp::kWeightDecay] = kWeightDecay;
  if (prior_on) {
    s[mgpp::kPriorOn] = 1.0;
    s[mgpp::kPriorC1] = std::log(lambda_t) - std::log(1 - lambda_t) + 0.5 * std::log(kSigma0Sq) -
                        0.5 * std::log(kSigma1Sq);
    s[mgpp::kPriorC2] = 1 / (2 * kSigma0Sq) - 1 / (2 * kSigma1Sq);
    s[mgpp::kPriorInvN] = 1 / kTrainExamples;
    s[mgpp::kPriorInvSigma0Sq] = 1 / kSigma0Sq;
    s[mgpp::kPriorInvSigma1Sq] = 1 / kSigma1Sq;
  }
  return s;
}

float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Weights near the spike: |θ| log-uniform in [1e-6, 1e-3], either sign.
float near_spike(std::mt19937& rng) {
  std::uniform_real_distribution<float> exponent(-6.0f, -3.0f);
  return (rng() % 2 ? -1.0f : 1.0f) * std::pow(10.0f, exponent(rng));
}

// One step's math on two targets: at most this many float32 ulp apart at the larger magnitude
// (measured: 4 for the exponential, FMA against none).
constexpr double kMathUlps = 8;

// Values more than kMathUlps apart, or NaN in one only, or infinities that differ.
size_t count_differences(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  size_t differ = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = from_bits(a[i]), y = from_bits(b[i]);
    if (std::isnan(x) || std::isnan(y) || std::isinf(x) || std::isinf(y)) {
      differ += !((std::isnan(x) && std::isnan(y)) || x == y);
      continue;
    }
    const float larger = static_cast<float>(std::max(std::fabs(x), std::fabs(y)));
    const double ulp = std::ldexp(1.0, std::max(std::ilogb(std::max(larger, 1e-38f)), -126) - 23);
    differ += std::fabs(x - y) > kMathUlps * ulp;
  }
  return differ;
}

// A stored value (DType code 0: float32, 1: bfloat16, 2: float16) as a double.
double stored_value(const std::vector<uint8_t>& bytes, int dtype, size_t i) {
  if (dtype == 0) {
    uint32_t u;
    std::memcpy(&u, &bytes[4 * i], 4);
    return from_bits(u);
  }
  uint16_t h;
  std::memcpy(&h, &bytes[2 * i], 2);
  if (dtype == 1) return from_bits(static_cast<uint32_t>(h) << 16);
  const int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  const double sign = h & 0x8000 ? -1.0 : 1.0;
  if (exponent == 0x1F) return mantissa ? std::nan("") : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

void test_builds(const ArchVariant& x86_64, const ArchVariant& x86_64_v3,
                 const ArchVariant& native) {
  CHECK(x86_64.build_info.find("-march=x86-64 (SSE2;") != std::string::npos,
        "the x86-64 build reports %s", x86_64.build_info.c_str());
  CHECK(x86_64_v3.build_info.find("-march=x86-64-v3 (AVX2 FMA F16C;") != std::string::npos,
        "the x86-64-v3 build reports %s", x86_64_v3.build_info.c_str());
  CHECK(native.build_info.find("-march=native") != std::string::npos, "the native build reports %s",
        native.build_info.c_str());
  std::printf("comparing\n  %s\n  %s\n  %s\n", x86_64.build_info.c_str(),
              x86_64_v3.build_info.c_str(), native.build_info.c_str());
  if (native.build_info.find(" FMA") == std::string::npos) {
    std::printf("note: the native target has no FMA; the builds differ less than on FMA hosts\n");
  }
}

void test_math_grid(const ArchVariant& x86_64, const ArchVariant& native) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> z = {0.0f, -0.0f, -86.0f, -86.5f, 88.72283935546875f, 88.7228394f, 100.0f,
                          -1e30f, 1e30f, inf, -inf, std::nanf(""), -std::nanf(""), 1e-40f};
  for (int i = 0; i <= 200000; ++i) z.push_back(-100.0f + static_cast<float>(i) / 1000.0f);
  std::mt19937 rng(1);
  for (int i = 0; i < 100000; ++i) z.push_back(from_bits(static_cast<uint32_t>(rng())));

  std::vector<float> theta = {0.0f, -0.0f, inf, -inf, std::nanf(""), 1e-45f, -1e-38f, 3e38f};
  for (int i = 0; i < 200000; ++i) theta.push_back(near_spike(rng));
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (int i = 0; i < 20000; ++i) theta.push_back(normal(rng));

  const std::vector<double> scalars = step_scalars(kLambda, true);
  // The grid covers the spike: ρ0 strictly between 0 and 1 where c1 + c2·θ² < ln(FLT_MAX).
  int in_spike = 0;
  for (float t : theta) {
    const double z_t = scalars[mgpp::kPriorC1] + scalars[mgpp::kPriorC2] * double{t} * t;
    in_spike += t != 0.0f && z_t < 88.0;
  }
  CHECK(in_spike > 100000, "only %d grid weights are where the spike matters", in_spike);

  const std::vector<uint32_t> a = x86_64.math(z, theta, scalars);
  const std::vector<uint32_t> b = native.math(z, theta, scalars);
  CHECK(a.size() == z.size() + 4 * theta.size(), "math returned %zu values", a.size());
  CHECK(a[0] == 0x3F800000u, "exp(0) is %a, not 1", from_bits(a[0]));
  const size_t differ = count_differences(a, b);
  CHECK(differ == 0, "%zu of %zu values of the math differ by more than %g ulp between the builds",
        differ, a.size(), kMathUlps);
}

ScheduleRun schedule(int param_dtype, int state_dtype) {
  // T = 20 steps: dense for t < 3; events at t_i = 3 (s_i = 0.3), at 4, 8 and 12 (ΔT = 4) and at
  // t_end = 15 (s_f = 0.8, the freeze); the frozen mask, prior off, from t = 16 on.
  const int steps = 20, t_i = 3, t_end = 15, interval = 4;
  const double s_i = 0.3, s_f = 0.8, alpha_f = 1e-3;
  const std::vector<size_t> sizes = {1, 7, 4097, 70001};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  ScheduleRun run{param_dtype, state_dtype, 2, {}, {}, {}, {}, t_end};
  size_t numel = 0;
  for (size_t n : sizes) {
    std::vector<float> p(n);
    for (size_t i = 0; i < n; ++i) {
      p[i] = i % 13 == 0 ? 0.0f : (i % 5 < 3 ? near_spike(rng) : normal(rng));
    }
    run.params.push_back(p);
    numel += n;
  }
  std::normal_distribution<float> gradient(0.0f, 1e-3f);
  for (int t = 0; t < steps; ++t) {
    std::vector<std::vector<float>> grads;
    for (size_t n : sizes) {
      std::vector<float> g(n);
      for (auto& x : g) x = gradient(rng);
      grads.push_back(g);
    }
    run.grads.push_back(grads);
    const double progress = static_cast<double>(t - t_i) / (t_end - t_i);
    const double alpha = t <= t_i    ? 1.0
                         : t >= t_end ? alpha_f
                                      : alpha_f + (1 - alpha_f) * (1 - progress);
    run.scalars.push_back(step_scalars(kLambda * alpha, t <= t_end));
    double sparsity = 0.0;
    if (t == t_i) sparsity = s_i;
    if (t > t_i && t < t_end && t % interval == 0) {
      sparsity = s_f + (s_i - s_f) * std::pow(1 - progress, 3);
    }
    if (t == t_end) sparsity = s_f;
    run.prune_k.push_back(static_cast<int64_t>(static_cast<double>(numel) * sparsity));
  }
  return run;
}

void test_schedule(const ArchVariant& x86_64, const ArchVariant& native) {
  const int pairs[][2] = {{0, 0}, {1, 0}, {1, 1}, {2, 0}, {2, 2}};
  for (const auto& pair : pairs) {
    const ScheduleRun run = schedule(pair[0], pair[1]);
    const ScheduleResult a = x86_64.run(run);
    const ScheduleResult b = native.run(run);
    CHECK(a.tau_keys.size() == 5 && b.tau_keys.size() == 5, "dtypes %d/%d: %zu and %zu events",
          pair[0], pair[1], a.tau_keys.size(), b.tau_keys.size());
    // docs/spec.md §4, runs through every stage: θ within 1e-4 relative in norm where both masks
    // keep the weight, the masks apart in at most 0.1% of the elements.
    int64_t pruned = 0, numel = 0, masks_differ = 0;
    double diff_sq = 0, norm_sq = 0;
    for (size_t i = 0; i < run.params.size(); ++i) {
      numel += static_cast<int64_t>(run.params[i].size());
      for (size_t e = 0; e < run.params[i].size(); ++e) {
        const bool keep_a = (a.keep_masks[i][e / 8] >> (e % 8)) & 1;
        const bool keep_b = (b.keep_masks[i][e / 8] >> (e % 8)) & 1;
        pruned += !keep_a;
        masks_differ += keep_a != keep_b;
        if (keep_a && keep_b) {
          const double x = stored_value(a.params[i], pair[0], e);
          const double y = stored_value(b.params[i], pair[0], e);
          diff_sq += (x - y) * (x - y);
          norm_sq += y * y;
        }
      }
    }
    CHECK(std::sqrt(diff_sq) <= 1e-4 * std::sqrt(norm_sq),
          "dtypes %d/%d: θ differs by %g relative in norm between the builds after 20 steps",
          pair[0], pair[1], std::sqrt(diff_sq / norm_sq));
    CHECK(masks_differ * 1000 <= numel, "dtypes %d/%d: the masks differ in %lld of %lld", pair[0],
          pair[1], static_cast<long long>(masks_differ), static_cast<long long>(numel));
    // The freeze pruned the weights below τ, at most k = int(0.8·N) of them.
    CHECK(pruned > numel / 2 && pruned <= run.prune_k[run.freeze_step],
          "dtypes %d/%d: the frozen mask prunes %lld of %lld", pair[0], pair[1],
          static_cast<long long>(pruned), static_cast<long long>(numel));
  }
}

}  // namespace

int main() {
  const ArchVariant x86_64 = mgpp_x86_64::arch_variant();
  const ArchVariant x86_64_v3 = mgpp_x86_64_v3::arch_variant();
  const ArchVariant native = mgpp_native::arch_variant();
  test_builds(x86_64, x86_64_v3, native);
  // The portable build against the AVX2 / F16C one and against the native one (AVX-512 and its
  // BF16 conversions where the host has them).
  for (const ArchVariant* other : {&x86_64_v3, &native}) {
    test_math_grid(x86_64, *other);
    test_schedule(x86_64, *other);
  }
  return TEST_MAIN_RESULT();
}
