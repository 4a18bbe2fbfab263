// The CPU kernels built for different -march targets agree within docs/spec.md §4 (csrc/core/step.h's
// mul_add rounds once with FMA and twice without, so the builds are no longer bit-identical):
// builds for plain x86-64 (SSE2, no FMA, the portable conversions), for x86-64-v3 (AVX2, FMA,
// F16C) and for the native target run the same inputs, a grid of the math near the spike (each
// build within the forward error bound of its roundings of a float64 oracle, so the builds within
// twice that of each other) and 20 steps through every stage of a pruning
// schedule (dense, events, the freeze, the frozen mask) in every storage layout (§4's bound for
// runs through every stage). This file includes only the layout's constants; the kernels come
// from the three builds.
#include <algorithm>
#include <array>
#include <cfloat>
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

// ---- the math grid against float64 ------------------------------------------------------------
//
// Each build's math is checked against the same formulas in float64 on the same float32 constants
// (the oracle), within a forward error bound derived from the roundings the float32 code makes:
// every operation rounds to float32 once, at most u·|result| + η (u = 2^-24, η = 2^-150 for the
// subnormal range), and the bound adds each operation's rounding to the errors of its inputs
// propagated through it (first order, with the exact second-order terms where they matter). It
// counts two roundings for every mul_add (the plain x86-64 build; one rounding with FMA is inside
// it), and the approximations of docs/spec.md §4 at their stated errors. So both builds lie within
// the bound of the oracle and within twice the bound of each other: each difference is measured
// against the magnitudes that went into the result, not against the result alone (c1 + c2·θ²
// reaches ~88, where its rounding moves ρ0 by up to ~1e-5 relative: hundreds of ulp of a small
// prior gradient, all of them allowed by the rounding of the exponent's inputs).
constexpr double kU = 0x1p-24, kEta = 0x1p-150;
constexpr double kExpError = 2e-7;         // exp_for_logistic, relative (spec §4)
constexpr double kReciprocalError = 1.4e-7;  // reciprocal_from_one, relative (spec §4)
constexpr double kRhoFlush = 0x1p-125;       // ρ0 flushed to 0 where 1 + e^z >= 2^125

// One rounding of a result of magnitude x.
double rounding(double x) { return kU * std::fabs(x) + kEta; }

// A float64 value with the bound on a float32 build's error in computing it.
struct Bounded {
  double value, error;
};

// exp_for_logistic(z): exp of the clamped input within kExpError; the one float above
// ln(FLT_MAX) below kExpMaxFinite gives a finite value, so the oracle there is FLT_MAX.
Bounded exp_oracle(double z) {
  if (std::isnan(z)) return {z, 0};
  if (z > 88.72283935546875) return {INFINITY, 0};
  const double e = std::min(std::exp(std::max(z, -86.0)), double{FLT_MAX});
  return {e, kExpError * e};
}

// The float32 constants the kernels use (csrc/core/step.h prior_constants, adamw_scalars).
struct MathConstants {
  double c1, c2, inv_n, inv_sigma1_sq, spike_minus_slab;
  double decay, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps;
};

MathConstants math_constants(const std::vector<double>& s, double k) {
  const auto f = [](double x) { return double{static_cast<float>(x)}; };
  return {f(s[mgpp::kPriorC1]), f(s[mgpp::kPriorC2]), f(s[mgpp::kPriorInvN]),
          f(s[mgpp::kPriorInvSigma1Sq]),
          f(f(s[mgpp::kPriorInvSigma0Sq]) - f(s[mgpp::kPriorInvSigma1Sq])),
          f(1.0 - s[mgpp::kLr] * s[mgpp::kWeightDecay]), f(1.0 - s[mgpp::kBeta1]),
          f(s[mgpp::kBeta2]), f(1.0 - s[mgpp::kBeta2]),
          f(s[mgpp::kLr] / (1.0 - std::pow(s[mgpp::kBeta1], k))),
          f(1.0 / std::sqrt(1.0 - std::pow(s[mgpp::kBeta2], k))), f(s[mgpp::kEps])};
}

// prior_gradient(θ) = (θ·inv_n)·(ρ0·(1/σ0² − 1/σ1²) + 1/σ1²), ρ0 = 1/(1 + e^z), z = c1 + (c2·θ)·θ.
Bounded prior_oracle(double theta, const MathConstants& c) {
  const double c2_theta = c.c2 * theta, z = c2_theta * theta + c.c1;
  // c2·θ, its product with θ, the add of c1: three roundings, the first one scaled by |θ|.
  const double z_error = rounding(c2_theta) * std::fabs(theta) + rounding(z - c.c1) + rounding(z);
  double rho = 0, rho_error = kRhoFlush;
  // At z >= 87 both builds get 1 + e^z >= 2^125 (z's error is under 1e-4 there): ρ0 = 0 exactly.
  if (z < 87) {
    const Bounded e = exp_oracle(z);
    // e^z moves by e^z·(e^δz − 1) for the input's error δz: the sensitivity that makes ρ0's
    // relative error (1 − ρ0)·δz.
    const double e_error = e.value * std::expm1(z_error) + e.error;
    const double d = 1 + e.value, d_error = e_error + rounding(d);
    rho = 1 / d;
    rho_error += rho * (d_error / (d - d_error) + kReciprocalError);
  }
  const double product = rho * c.spike_minus_slab, weight = product + c.inv_sigma1_sq;
  const double weight_error = c.spike_minus_slab * rho_error + rounding(product) + rounding(weight);
  const double q = theta * c.inv_n, q_error = rounding(q);
  const double g = q * weight;
  return {g, std::fabs(weight) * q_error + std::fabs(q) * weight_error + q_error * weight_error +
                 rounding(g)};
}

// One step_element<kSpikeAndSlab> (keep true) from θ, m, v and the gradient with
// inv_grad_scale 1: the new θ, m and v.
std::array<Bounded, 3> step_oracle(double theta, double m, double v, double grad,
                                   const MathConstants& c) {
  const Bounded prior = prior_oracle(theta, c);
  const double g = grad + prior.value, g_error = prior.error + rounding(grad) + rounding(g);
  const double decayed = theta * c.decay;
  // torch's lerp from m (1 − β1 < 0.5): m + (1 − β1)·(g − m).
  const double difference = g - m, difference_error = g_error + rounding(difference);
  const double new_m = c.one_minus_beta1 * difference + m;
  const double m_error = c.one_minus_beta1 * difference_error +
                         rounding(c.one_minus_beta1 * difference) + rounding(new_m);
  // v·β2 + (1 − β2)·g²
  const double g_sq = g * g, g_sq_error = 2 * std::fabs(g) * g_error + g_error * g_error +
                                           rounding(g_sq);
  const double scaled = c.one_minus_beta2 * g_sq;
  const double new_v = v * c.beta2 + scaled;
  const double v_error = c.one_minus_beta2 * g_sq_error + rounding(scaled) + rounding(v * c.beta2) +
                         rounding(new_v);
  // √v·c + ε, the division, θ·decay − step_size·ratio
  const double root = std::sqrt(new_v);
  const double root_error = root - std::sqrt(std::max(new_v - v_error, 0.0)) + rounding(root);
  const double denom = root * c.inv_bc2_sqrt + c.eps;
  const double denom_error =
      c.inv_bc2_sqrt * root_error + rounding(root * c.inv_bc2_sqrt) + rounding(denom);
  const double ratio = new_m / denom;
  const double ratio_error =
      (m_error + std::fabs(ratio) * denom_error) / (denom - denom_error) + rounding(ratio);
  const double new_theta = decayed - c.step_size * ratio;
  const double theta_error = c.step_size * ratio_error + rounding(decayed) +
                             rounding(c.step_size * ratio) + rounding(new_theta);
  return {{{new_theta, theta_error}, {new_m, m_error}, {new_v, v_error}}};
}

// A float32 result within its bound of the oracle: NaN where the oracle is NaN, an equal
// infinity where it is infinite, +-inf also where the oracle's bound reaches float32's overflow.
bool within(float result, const Bounded& oracle) {
  const double x = result, o = oracle.value;
  if (std::isnan(o) || std::isnan(x)) return std::isnan(o) && std::isnan(x);
  if (std::isinf(o)) return x == o;
  if (std::isinf(x)) return (x > 0) == (o > 0) && std::fabs(o) + oracle.error >= 0x1.ffffffp127;
  return std::fabs(x - o) <= oracle.error;
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

  // The oracle of each value arch_variant.cpp's math returns: exp_for_logistic(z) for each z,
  // prior_gradient(θ) for each θ, then the new θ, m and v of one step from each θ with m = 1e-5,
  // v = 1e-9, gradient 1e-4, at step 3.
  const MathConstants constants = math_constants(scalars, 3.0);
  std::vector<Bounded> oracle;
  for (float x : z) oracle.push_back(exp_oracle(x));
  for (float t : theta) oracle.push_back(prior_oracle(t, constants));
  for (float t : theta) {
    const std::array<Bounded, 3> step = step_oracle(t, 1e-5f, 1e-9f, 1e-4f, constants);
    oracle.insert(oracle.end(), step.begin(), step.end());
  }
  const std::vector<uint32_t> a = x86_64.math(z, theta, scalars);
  const std::vector<uint32_t> b = native.math(z, theta, scalars);
  CHECK(a.size() == oracle.size() && b.size() == oracle.size(), "math returned %zu and %zu values",
        a.size(), b.size());
  if (a.size() != oracle.size() || b.size() != oracle.size()) return;
  CHECK(a[0] == 0x3F800000u && b[0] == 0x3F800000u, "exp(0) is %a and %a, not 1", from_bits(a[0]),
        from_bits(b[0]));
  // Outside the bound of the oracle in either build; the largest difference between the builds
  // as a fraction of twice the bound (both within it: at most 1).
  size_t outside_a = 0, outside_b = 0, first = a.size();
  double largest = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const bool in_a = within(from_bits(a[i]), oracle[i]), in_b = within(from_bits(b[i]), oracle[i]);
    outside_a += !in_a;
    outside_b += !in_b;
    if (!(in_a && in_b) && first == a.size()) first = i;
    const double x = from_bits(a[i]), y = from_bits(b[i]);
    if (std::isfinite(x) && std::isfinite(y) && x != y) {
      largest = std::max(largest, std::fabs(x - y) / (2 * oracle[i].error));
    }
  }
  std::printf("math grid: %zu values, the builds apart by at most %.3f of twice the bound\n",
              a.size(), largest);
  CHECK(outside_a == 0 && outside_b == 0,
        "%zu and %zu of %zu values of the math outside the bound, first at %zu: %a and %a, "
        "oracle %a within %a",
        outside_a, outside_b, a.size(), first, from_bits(a[first % a.size()]),
        from_bits(b[first % a.size()]), oracle[first % a.size()].value,
        oracle[first % a.size()].error);
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
