// Tests of the shared per-element math (csrc/core) against values computed in double and
// against exhaustive enumerations of the 16-bit formats.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "core/formats.h"
#include "core/selection.h"
#include "core/step.h"

using namespace mgpp;

namespace {

double ulp_distance(float a, double exact) {
  const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(exact)) - 23);
  return std::fabs(a - exact) / ulp;
}

void test_exp_for_logistic() {
  double worst_ulp = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -86.0f + (88.72f + 86.0f) * static_cast<float>(i) / 2000000.0f;
    worst_ulp = std::max(worst_ulp, ulp_distance(exp_for_logistic(x), std::exp(static_cast<double>(x))));
  }
  // docs/spec.md §4, "Approximations": 2.1 ulp with FMA, 2.3 without.
  CHECK(worst_ulp <= 2.5, "exp_for_logistic worst error %.3f ulp over [-86, 88.72]", worst_ulp);
  // The logistic's reciprocal: relative error below 1.4e-7 on [1, 2^125).
  double worst_reciprocal = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float d = std::ldexp(1.0f + static_cast<float>(i % 8192) / 8192.0f, i % 125);
    worst_reciprocal = std::max(worst_reciprocal, std::fabs(reciprocal_from_one(d) * double{d} - 1));
  }
  CHECK(worst_reciprocal < 1.4e-7, "reciprocal_from_one worst relative error %.3g", worst_reciprocal);
  CHECK(std::isnan(reciprocal_from_one(std::nanf(""))), "the reciprocal of NaN must be NaN");
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(exp_for_logistic(88.75f) == inf, "exp(88.75) must overflow to inf");
  CHECK(exp_for_logistic(1e30f) == inf, "exp(1e30) must be inf");
  CHECK(exp_for_logistic(inf) == inf, "exp(inf) must be inf");
  CHECK(exp_for_logistic(88.7f) < inf, "exp(88.7) is finite");
  CHECK(1.0f + exp_for_logistic(-1e30f) == 1.0f, "1 + exp(-1e30) must be 1");
  CHECK(1.0f + exp_for_logistic(-inf) == 1.0f, "1 + exp(-inf) must be 1");
  CHECK(std::isnan(exp_for_logistic(std::nanf(""))), "exp(NaN) must be NaN");
  CHECK(std::isnan(exp_for_logistic(-std::nanf(""))), "exp(-NaN) must be NaN");

  // Adding and subtracting 1.5·2^23 rounds to an integer exactly as rintf does (ties to even)
  // over the range exp_for_logistic uses it in, |x·log2 e| <= 128, and far beyond.
  int rint_differences = 0;
  for (float v : {0.5f, 1.5f, 2.5f, -0.5f, -2.5f, 127.5f, -124.5f, 4194303.5f, -4194303.5f}) {
    rint_differences += (v + kRoundToInteger) - kRoundToInteger != rintf(v);
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-4194304.0f, 4194304.0f);
  for (int i = 0; i < 1000000; ++i) {
    const float v = i % 2 ? uniform(rng) : uniform(rng) * 3.1e-5f;
    rint_differences += (v + kRoundToInteger) - kRoundToInteger != rintf(v);
  }
  CHECK(rint_differences == 0, "%d values round differently from rintf", rint_differences);
}

void test_prior_gradient() {
  const double lambda = 0.1, s0 = 1e-10, s1 = 0.05, n = 67349;
  const double c1 = std::log(lambda) - std::log(1 - lambda) + 0.5 * std::log(s0) - 0.5 * std::log(s1);
  const double c2 = 1 / (2 * s0) - 1 / (2 * s1);
  const PriorConstants prior{static_cast<float>(c1), static_cast<float>(c2), static_cast<float>(1 / n),
                             static_cast<float>(1 / s0), static_cast<float>(1 / s1)};
  double worst = 0;
  for (int e = -300; e <= 0; ++e) {
    for (int sign = -1; sign <= 1; sign += 2) {
      const float theta = sign * static_cast<float>(std::pow(10.0, e / 50.0));
      const double t = theta;
      const double rho0 = 1 / (1 + std::exp(c1 + c2 * t * t));
      const double exact = t / n * (rho0 / s0 + (1 - rho0) / s1);
      const float got = prior_gradient(theta, prior);
      CHECK(!std::isnan(got), "prior_gradient(%g) is NaN", theta);
      worst = std::max(worst, std::fabs(got - exact) / std::fabs(exact));
    }
  }
  // The float32 constants c1, c2 carry ~1e-7 relative error each; near the spike/slab boundary
  // c2·θ² ≈ 20 amplifies that to a few 1e-6 in ρ0.
  CHECK(worst < 2e-5, "prior_gradient worst relative error %.3g", worst);
  CHECK(prior_gradient(0.0f, prior) == 0.0f, "prior_gradient(0) must be 0");
  // Where the spike cannot matter, the CPU kernel's slab-only path is the same to the bit.
  int slab_only = 0;
  for (int e = -600; e <= 600; ++e) {
    for (float sign : {-1.0f, 1.0f}) {
      const float theta = sign * static_cast<float>(std::pow(10.0, e / 100.0));
      for (float t : {theta, std::nextafter(theta, 0.0f), sign * 0.0f}) {
        if (prior_uses_spike(t, prior)) continue;
        ++slab_only;
        const float full = prior_gradient(t, prior), slab = slab_prior_gradient(t, prior);
        CHECK(std::memcmp(&full, &slab, sizeof(float)) == 0,
              "slab_prior_gradient(%g) = %g, prior_gradient = %g", t, slab, full);
      }
    }
  }
  CHECK(slab_only > 2000, "only %d values took the slab-only path", slab_only);
  CHECK(prior_uses_spike(1e-6f, prior) && prior_uses_spike(std::nanf(""), prior) &&
        !prior_uses_spike(1e-2f, prior), "prior_uses_spike misjudges the spike's range");
  CHECK(prior_gradient(3e38f, prior) > 0, "prior_gradient at huge theta must stay finite-positive");
  CHECK(std::isnan(prior_gradient(std::nanf(""), prior)), "prior_gradient(NaN) must be NaN");
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(prior_gradient(inf, prior) == inf && prior_gradient(-inf, prior) == -inf,
        "prior_gradient(±inf) must be ±inf (the slab's term)");
}

void test_adamw_update() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.01;
  double worst = 0;
  for (int step = 1; step <= 50; step += 7) {
    const double bc1 = 1 - std::pow(beta1, step), bc2 = 1 - std::pow(beta2, step);
    const AdamWScalars s{static_cast<float>(1 - lr * wd), static_cast<float>(1 - beta1),
                         static_cast<float>(beta2), static_cast<float>(1 - beta2), static_cast<float>(lr / bc1),
                         static_cast<float>(1 / std::sqrt(bc2)), static_cast<float>(eps)};
    for (int i = 0; i < 10000; ++i) {
      float theta = normal(rng) * 0.05f, m = normal(rng) * 0.01f, v = std::fabs(normal(rng)) * 1e-4f;
      const float g = normal(rng) * 0.01f;
      double dt = theta, dm = m, dv = v;
      dt *= 1 - lr * wd;
      dm = beta1 * dm + (1 - beta1) * g;
      dv = beta2 * dv + (1 - beta2) * static_cast<double>(g) * g;
      dt -= lr / bc1 * dm / (std::sqrt(dv) / std::sqrt(bc2) + eps);
      adamw_update(theta, m, v, g, s);
      worst = std::max({worst, std::fabs(theta - dt) / (1e-6 + 1e-5 * std::fabs(dt)),
                        std::fabs(m - dm) / (1e-6 + 1e-5 * std::fabs(dm)),
                        std::fabs(v - dv) / (1e-6 + 1e-5 * dv)});
    }
  }
  CHECK(worst <= 1.0, "adamw_update worst error %.3g of the docs/spec.md §4 bound", worst);
}

// step_element is the prior term, AdamW and the mask in that order; the slab's term where the
// spike cannot matter; a cleared keep bit gives +0 with the moments still updated.
void test_step_element() {
  const PriorConstants prior{-3.0f, 5e9f, 1.0f / 67349.0f, 1e10f, 20.0f};
  const AdamWScalars adamw{0.99999f, 0.1f, 0.999f, 0.001f, 2e-3f, 1.5f, 1e-8f};
  const float inv_grad_scale = 0.25f;
  int slab_cases = 0;
  for (float theta0 : {0.0f, -0.0f, 1e-6f, -3e-5f, 2e-4f, 1e-3f, -0.02f, 0.5f}) {
    for (float grad : {0.0f, 4e-3f, -1e-2f}) {
      const float m0 = 1e-4f, v0 = 2e-7f;
      float theta = theta0, m = m0, v = v0;
      step_element<PriorTerm::kSpikeAndSlab>(theta, m, v, grad, true, inv_grad_scale, prior, adamw);
      float et = theta0, em = m0, ev = v0;
      adamw_update(et, em, ev, grad * inv_grad_scale + prior_gradient(theta0, prior), adamw);
      CHECK(float_to_bits(theta) == float_to_bits(et) && float_to_bits(m) == float_to_bits(em) &&
                float_to_bits(v) == float_to_bits(ev),
            "step_element(%g, %g) differs from the prior gradient and adamw_update", theta0, grad);
      if (!prior_uses_spike(theta0, prior)) {
        ++slab_cases;
        float st = theta0, sm = m0, sv = v0;
        step_element<PriorTerm::kSlab>(st, sm, sv, grad, true, inv_grad_scale, prior, adamw);
        CHECK(float_to_bits(st) == float_to_bits(theta), "the slab term differs at %g", theta0);
      }
      float nt = theta0, nm = m0, nv = v0;
      step_element<PriorTerm::kNone>(nt, nm, nv, grad, true, inv_grad_scale, prior, adamw);
      float pt = theta0, pm = m0, pv = v0;
      adamw_update(pt, pm, pv, grad * inv_grad_scale, adamw);
      CHECK(float_to_bits(nt) == float_to_bits(pt), "step_element without the prior is not AdamW");
      float mt = theta0, mm = m0, mv = v0;
      step_element<PriorTerm::kSpikeAndSlab>(mt, mm, mv, grad, false, inv_grad_scale, prior, adamw);
      CHECK(float_to_bits(mt) == 0u && float_to_bits(mm) == float_to_bits(em) &&
                float_to_bits(mv) == float_to_bits(ev),
            "a masked element must become +0 with its moments updated (theta %g)", theta0);
    }
  }
  CHECK(slab_cases == 18, "%d cases took the slab term, expected 18", slab_cases);
}

uint16_t nearest_even(float x, double (*to_double)(uint16_t), uint16_t below) {
  // The two candidates around x are `below` and below + 1 (same sign, magnitude order).
  const double lo = to_double(below), hi = to_double(static_cast<uint16_t>(below + 1));
  const double dlo = std::fabs(x - lo), dhi = std::fabs(x - hi);
  if (dlo < dhi) return below;
  if (dhi < dlo) return static_cast<uint16_t>(below + 1);
  return (below & 1) ? static_cast<uint16_t>(below + 1) : below;
}

double bf16_as_double(uint16_t h) { return bf16_bits_to_float(h); }

void test_bfloat16() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float x = bf16_bits_to_float(static_cast<uint16_t>(h));
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    CHECK(bits == h << 16, "bf16 %04x widens exactly", h);
    const uint16_t back = float_to_bf16_bits(x);
    CHECK(std::isnan(x) ? back == 0x7FC0 : back == h, "bf16 %04x round trip gives %04x", h, back);
  }
  std::mt19937 rng(2);
  for (int i = 0; i < 1000000; ++i) {
    uint32_t bits = rng();
    float x;
    std::memcpy(&x, &bits, 4);
    if (!std::isfinite(x) || std::fabs(x) >= 3.38e38f) continue;
    const uint16_t truncated = static_cast<uint16_t>(bits >> 16);
    const uint16_t expected = nearest_even(x, bf16_as_double, truncated);
    CHECK(float_to_bf16_bits(x) == expected, "bf16(%a) = %04x, expected %04x", x,
          float_to_bf16_bits(x), expected);
  }
}

void test_float16() {
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 half;
    const uint16_t h16 = static_cast<uint16_t>(h);
    std::memcpy(&half, &h16, 2);
    const float expected = static_cast<float>(half);
    const float got = f16_bits_to_float(h16);
    CHECK((std::isnan(expected) && std::isnan(got)) || std::memcmp(&expected, &got, 4) == 0,
          "f16 %04x widens to %a, expected %a", h, got, expected);
    // A NaN comes back quieted (bit 9 set), as vcvtps2ph gives it.
    const uint16_t back = std::isnan(got) ? static_cast<uint16_t>(h16 | 0x0200u) : h16;
    CHECK(float_to_f16_bits(got) == back, "f16 %04x round trip gives %04x", h,
          float_to_f16_bits(got));
  }
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> exponent(-30.0f, 17.0f);
  for (int i = 0; i < 1000000; ++i) {
    const float x = (i % 2 ? -1.0f : 1.0f) * std::exp2(exponent(rng));
    const _Float16 half = static_cast<_Float16>(x);
    uint16_t expected;
    std::memcpy(&expected, &half, 2);
    CHECK(float_to_f16_bits(x) == expected, "f16(%a) = %04x, expected %04x", x,
          float_to_f16_bits(x), expected);
  }
}

void test_keys_and_selection() {
  std::mt19937 rng(4);
  std::vector<float> values;
  for (int i = 0; i < 100000; ++i) values.push_back(std::fabs(std::ldexp(static_cast<float>(rng()) / 4294967296.0f, -(static_cast<int>(rng() % 140)))));
  values.push_back(0.0f);
  values.push_back(std::numeric_limits<float>::denorm_min());
  values.push_back(std::numeric_limits<float>::infinity());
  std::sort(values.begin(), values.end());
  for (size_t i = 1; i < values.size(); ++i) {
    CHECK(abs_key(values[i - 1]) <= abs_key(values[i]), "keys must order like values at %zu", i);
  }
  CHECK(abs_key(-0.0f) == 0u && abs_key(-2.5f) == abs_key(2.5f), "the key ignores the sign");
  CHECK(abs_key(std::nanf("")) >= kNaNKeyFloor, "NaN keys sort above inf");
  CHECK(!below_threshold(0u, 0x7FC00000u), "nothing is below a NaN threshold");

  // Radix selection over the values above equals sorting.
  std::vector<int64_t> high(kHistHighBins, 0), low(kHistLowBins, 0);
  for (float v : values) ++high[key_high_bin(abs_key(v))];
  for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{5000}, int64_t{99999},
                    static_cast<int64_t>(values.size())}) {
    int64_t selection[kNumSelectionSlots] = {k, 0, 0, 0};
    select_bin(high.data(), 0, selection);
    std::fill(low.begin(), low.end(), 0);
    for (float v : values) {
      if (key_high_bin(abs_key(v)) == key_high_bin(static_cast<uint32_t>(selection[kSelKey]))) {
        ++low[key_low_bin(abs_key(v))];
      }
    }
    select_bin(low.data(), 1, selection);
    const uint32_t expected_key = abs_key(values[k - 1]);
    CHECK(static_cast<uint32_t>(selection[kSelKey]) == expected_key,
          "k=%lld: key %llx, expected %x", static_cast<long long>(k),
          static_cast<long long>(selection[kSelKey]), expected_key);
    const int64_t below = std::lower_bound(values.begin(), values.end(), values[k - 1]) - values.begin();
    CHECK(selection[kSelBelow] == below, "k=%lld: below %lld, expected %lld",
          static_cast<long long>(k), static_cast<long long>(selection[kSelBelow]),
          static_cast<long long>(below));
    const int64_t equal =
        std::upper_bound(values.begin(), values.end(), values[k - 1]) - values.begin() - below;
    CHECK(selection[kSelEqual] == equal, "k=%lld: equal %lld, expected %lld",
          static_cast<long long>(k), static_cast<long long>(selection[kSelEqual]),
          static_cast<long long>(equal));
  }
}

// keep_candidate_keys against a stable sort of each group (the lower index first among equal
// keys), on groups of every size with many ties; below_threshold's N:M rule keeps τ's ties out.
void test_nm_candidates() {
  std::mt19937 generator(11);
  for (int m = 2; m <= 16; ++m) {
    for (int prunable = 1; prunable < m; ++prunable) {
      for (int trial = 0; trial < 200; ++trial) {
        uint32_t keys[16], expected[16];
        for (int i = 0; i < m; ++i) keys[i] = expected[i] = generator() % 4;  // many ties
        int order[16];
        for (int i = 0; i < m; ++i) order[i] = i;
        std::stable_sort(order, order + m, [&](int a, int b) { return keys[a] < keys[b]; });
        for (int r = prunable; r < m; ++r) expected[order[r]] = kNotCandidateKey;
        keep_candidate_keys(keys, m, prunable);
        CHECK(std::equal(keys, keys + m, expected), "M=%d, M-N=%d, trial %d", m, prunable, trial);
      }
    }
  }
  CHECK(below_threshold(5u, 5u, true) && !below_threshold(5u, 5u, false), "N:M zeroes τ's ties");
  CHECK(below_threshold(0x7F800000u, 0x7F800000u, true), "an N:M pool zeroes +inf at τ = +inf");
  CHECK(!below_threshold(kNotCandidateKey, 0x7F800000u, true), "a non-candidate is never pruned");
  CHECK(!below_threshold(0u, 0x7FC00000u, true), "nothing is at or below a NaN threshold");
}

}  // namespace

int main() {
  test_exp_for_logistic();
  test_prior_gradient();
  test_adamw_update();
  test_step_element();
  test_bfloat16();
  test_float16();
  test_keys_and_selection();
  test_nm_candidates();
  return TEST_MAIN_RESULT();
}
