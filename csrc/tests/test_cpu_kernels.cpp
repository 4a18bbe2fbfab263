// Tests of the CPU kernels (csrc/cpu) against a plain scalar loop over the shared math, and of
// their histograms and thresholds against direct counts, for every storage layout, odd sizes,
// several tensors per call and 1-3 threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"

using namespace mgpp;

namespace {

uint16_t to_storage16(float x, DType dtype) {
  return dtype == DType::BFloat16 ? float_to_bf16_bits(x) : float_to_f16_bits(x);
}
float from_storage16(uint16_t x, DType dtype) {
  return dtype == DType::BFloat16 ? bf16_bits_to_float(x) : f16_bits_to_float(x);
}

// A tensor in any storage dtype, kept as raw bytes.
struct Buffer {
  DType dtype;
  std::vector<uint8_t> bytes;
  Buffer(DType d, const std::vector<float>& values) : dtype(d) {
    const size_t width = d == DType::Float32 ? 4 : 2;
    bytes.resize(values.size() * width);
    for (size_t i = 0; i < values.size(); ++i) set(i, values[i]);
  }
  size_t size() const { return bytes.size() / (dtype == DType::Float32 ? 4 : 2); }
  float get(size_t i) const {
    if (dtype == DType::Float32) {
      float x;
      std::memcpy(&x, &bytes[4 * i], 4);
      return x;
    }
    uint16_t h;
    std::memcpy(&h, &bytes[2 * i], 2);
    return from_storage16(h, dtype);
  }
  void set(size_t i, float x) {
    if (dtype == DType::Float32) {
      std::memcpy(&bytes[4 * i], &x, 4);
    } else {
      const uint16_t h = to_storage16(x, dtype);
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
  void* data() { return bytes.data(); }
};

std::vector<float> random_values(size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

struct Case {
  Buffer param, grad, exp_avg, exp_avg_sq;
  std::vector<uint8_t> mask;
};

void test_fused_step(DType param_dtype, DType state_dtype, bool prior_on, bool with_mask,
                     int threads) {
  std::mt19937 rng(7);
  const std::vector<size_t> sizes = {0, 1, 7, 1023, 1025, 40000, 70001};
  std::vector<Case> cases;
  for (size_t n : sizes) {
    Case c{Buffer(param_dtype, random_values(n, 0.05f, rng)),
           Buffer(param_dtype, random_values(n, 0.01f, rng)),
           Buffer(state_dtype, random_values(n, 0.001f, rng)),
           Buffer(state_dtype, std::vector<float>(n, 1e-6f)), {}};
    for (size_t i = 0; i < n; ++i) c.exp_avg_sq.set(i, std::fabs(c.exp_avg_sq.get(i) + 1e-6f * (i % 5)));
    // Zeros of both signs, and weights near zero (where the spike matters) in every fifth run of
    // 64, so that the kernel's spans take both the full and the slab-only prior.
    for (size_t i = 0; i < n; ++i) {
      if (i % 11 == 0) c.param.set(i, i % 22 == 0 ? 0.0f : -0.0f);
      if ((i / 64) % 5 == 0 && i % 7 == 0) c.param.set(i, c.param.get(i) * 1e-3f);
    }
    c.mask.resize((n + 7) / 8);
    for (auto& b : c.mask) b = static_cast<uint8_t>(rng());
    cases.push_back(std::move(c));
  }
  std::vector<Case> expected = cases;

  const PriorConstants prior{-3.0f, 5e9f, 1.0f / 67349.0f, 1e10f, 20.0f};
  cpu::StepOptions options{param_dtype, state_dtype, prior_on, prior, 0.5f, threads};
  std::vector<cpu::StepTensor> tensors;
  for (size_t t = 0; t < cases.size(); ++t) {
    const AdamWScalars adamw{0.99999f, 0.1f, 0.999f, 0.001f, 1e-3f / (1.0f - 0.9f * t / 10.0f),
                             1.0f / (0.05f + 0.01f * t), 1e-8f};
    tensors.push_back({cases[t].param.data(), cases[t].grad.data(), cases[t].exp_avg.data(),
                       cases[t].exp_avg_sq.data(), with_mask ? cases[t].mask.data() : nullptr,
                       static_cast<int64_t>(sizes[t]), adamw});
  }
  std::vector<int64_t> histogram(kHistHighBins, 0);
  cpu::fused_step(tensors.data(), static_cast<int64_t>(tensors.size()), options, histogram.data());

  std::vector<int64_t> expected_histogram(kHistHighBins, 0);
  for (size_t t = 0; t < expected.size(); ++t) {
    Case& e = expected[t];
    for (size_t i = 0; i < sizes[t]; ++i) {
      float theta = e.param.get(i), m = e.exp_avg.get(i), v = e.exp_avg_sq.get(i);
      float g = e.grad.get(i) * options.inv_grad_scale;
      if (prior_on) g = g + prior_gradient(theta, prior);
      adamw_update(theta, m, v, g, tensors[t].adamw);
      if (with_mask && !((e.mask[i / 8] >> (i % 8)) & 1)) theta = 0.0f;
      e.param.set(i, theta);
      e.exp_avg.set(i, m);
      e.exp_avg_sq.set(i, v);
      ++expected_histogram[key_high_bin(abs_key(e.param.get(i)))];
    }
    const bool same = cases[t].param.bytes == e.param.bytes &&
                      cases[t].exp_avg.bytes == e.exp_avg.bytes &&
                      cases[t].exp_avg_sq.bytes == e.exp_avg_sq.bytes;
    CHECK(same, "fused_step differs from the scalar loop: dtypes %d/%d prior %d mask %d threads "
          "%d size %zu", static_cast<int>(param_dtype), static_cast<int>(state_dtype), prior_on,
          with_mask, threads, sizes[t]);
  }
  CHECK(histogram == expected_histogram, "fused_step histogram differs from a direct count "
        "(dtypes %d/%d, threads %d)", static_cast<int>(param_dtype), static_cast<int>(state_dtype),
        threads);
}

void test_histogram_and_threshold(DType dtype, int threads) {
  std::mt19937 rng(11);
  const std::vector<size_t> sizes = {5, 0, 33000, 1, 70003};
  std::vector<Buffer> buffers;
  for (size_t n : sizes) {
    auto values = random_values(n, 0.02f, rng);
    for (size_t i = 0; i < n; i += 9) values[i] = 0.0f;         // exact zeros
    for (size_t i = 3; i < n; i += 13) values[i] = -0.0125f;    // ties
    buffers.emplace_back(dtype, values);
  }
  std::vector<ValueTensor> views;
  for (size_t t = 0; t < sizes.size(); ++t) views.push_back({buffers[t].data(), static_cast<int64_t>(sizes[t])});

  std::vector<int64_t> high(kHistHighBins, 0), expected_high(kHistHighBins, 0);
  cpu::count_histogram(views.data(), static_cast<int64_t>(views.size()), dtype, 0, 0, high.data(), threads);
  for (auto& b : buffers) for (size_t i = 0; i < b.size(); ++i) ++expected_high[key_high_bin(abs_key(b.get(i)))];
  CHECK(high == expected_high, "level-0 histogram differs from a direct count (dtype %d)", static_cast<int>(dtype));

  const uint32_t tie_key = abs_key(buffers[2].get(3));
  std::vector<int64_t> low(kHistLowBins, 0), expected_low(kHistLowBins, 0);
  cpu::count_histogram(views.data(), static_cast<int64_t>(views.size()), dtype, 1,
                       key_high_bin(tie_key), low.data(), threads);
  for (auto& b : buffers) {
    for (size_t i = 0; i < b.size(); ++i) {
      const uint32_t key = abs_key(b.get(i));
      if (key_high_bin(key) == key_high_bin(tie_key)) ++expected_low[key_low_bin(key)];
    }
  }
  CHECK(low == expected_low, "level-1 histogram differs from a direct count (dtype %d)", static_cast<int>(dtype));

  std::vector<Buffer> expected = buffers;
  std::vector<std::vector<uint8_t>> masks;
  for (size_t n : sizes) masks.emplace_back((n + 7) / 8, 0xAB);
  std::vector<uint8_t*> mask_ptrs;
  for (auto& m : masks) mask_ptrs.push_back(m.data());
  cpu::apply_threshold(views.data(), mask_ptrs.data(), static_cast<int64_t>(views.size()), dtype,
                       tie_key, threads);
  for (size_t t = 0; t < sizes.size(); ++t) {
    std::vector<uint8_t> expected_mask((sizes[t] + 7) / 8, 0);
    for (size_t i = 0; i < sizes[t]; ++i) {
      const bool keep = !(abs_key(expected[t].get(i)) < tie_key);
      if (!keep) expected[t].set(i, 0.0f);
      expected_mask[i / 8] |= static_cast<uint8_t>(keep << (i % 8));
    }
    CHECK(buffers[t].bytes == expected[t].bytes, "apply_threshold values differ (dtype %d, tensor %zu)", static_cast<int>(dtype), t);
    CHECK(masks[t] == expected_mask, "apply_threshold mask differs (dtype %d, tensor %zu)", static_cast<int>(dtype), t);
  }
}

// An unknown dtype code or a state dtype the kernels do not take is an error before any element
// changes, never a silent no-op.
template <typename Call>
bool throws_invalid_argument(Call call) {
  try {
    call();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

void test_unknown_dtypes_are_errors() {
  std::vector<float> values = {0.5f, -0.25f, 1e-6f, 0.0f, 3.0f, -2.0f, 0.125f, 7.0f};
  std::vector<float> grads(values.size(), 0.01f), m(values.size(), 0.0f), v(values.size(), 0.0f);
  const std::vector<float> before = values;
  const DType unknown = static_cast<DType>(3);
  const AdamWScalars adamw{1.0f, 0.1f, 0.999f, 0.001f, 1e-3f, 1.0f, 1e-8f};
  cpu::StepTensor t{values.data(), grads.data(), m.data(), v.data(), nullptr,
                    static_cast<int64_t>(values.size()), adamw};
  const PriorConstants prior{-3.0f, 5e9f, 1e-4f, 1e10f, 20.0f};
  for (const auto& [param, state] :
       {std::pair{unknown, DType::Float32}, std::pair{unknown, unknown},
        std::pair{DType::BFloat16, DType::Float16}, std::pair{DType::Float32, DType::BFloat16}}) {
    const cpu::StepOptions options{param, state, true, prior, 1.0f, 1};
    CHECK(throws_invalid_argument([&] { cpu::fused_step(&t, 1, options, nullptr); }),
          "fused_step with dtypes %d/%d must throw", static_cast<int>(param),
          static_cast<int>(state));
  }
  const ValueTensor view{values.data(), static_cast<int64_t>(values.size())};
  std::vector<int64_t> histogram(kHistHighBins, 0);
  CHECK(throws_invalid_argument([&] {
          cpu::count_histogram(&view, 1, unknown, 0, 0, histogram.data(), 1);
        }), "count_histogram with an unknown dtype must throw");
  uint8_t mask = 0xAB;
  uint8_t* masks[] = {&mask};
  CHECK(throws_invalid_argument([&] {
          cpu::apply_threshold(&view, masks, 1, unknown, 0x3F000000u, 1);
        }), "apply_threshold with an unknown dtype must throw");
  CHECK(values == before && mask == 0xAB && m == std::vector<float>(values.size(), 0.0f),
        "a rejected call changed its tensors");
  CHECK(std::all_of(histogram.begin(), histogram.end(), [](int64_t c) { return c == 0; }),
        "a rejected call counted");
}

}  // namespace

int main() {
  test_unknown_dtypes_are_errors();
  const DType dtypes[] = {DType::Float32, DType::BFloat16, DType::Float16};
  for (int threads : {1, 2, 3}) {
    for (DType p : dtypes) {
      for (DType s : {DType::Float32, p}) {
        for (bool prior : {false, true}) {
          for (bool mask : {false, true}) test_fused_step(p, s, prior, mask, threads);
        }
      }
      test_histogram_and_threshold(p, threads);
    }
  }
  return TEST_MAIN_RESULT();
}
