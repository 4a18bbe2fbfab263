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
  const std::vector<size_t> sizes = {0, 1, 7, 100, 1023, 1025, 40000, 70001};
  std::vector<Case> cases;
  for (size_t n : sizes) {
    Case c{Buffer(param_dtype, random_values(n, 0.05f, rng)),
           Buffer(param_dtype, random_values(n, 0.01f, rng)),
           Buffer(state_dtype, random_values(n, 0.001f, rng)),
           Buffer(state_dtype, std::vector<float>(n, 1e-6f)), {}};
    for (size_t i = 0; i < n; ++i) c.exp_avg_sq.set(i, std::fabs(c.exp_avg_sq.get(i) + 1e-6f * (i % 5)));
    // Zeros of both signs, and weights near zero (where the spike matters) in every fifth run of
    // 64, so that the kernel's spans take both the full and the slab-only prior; and in every
    // third block of 1024, every fifth weight but those of one span, so that the float32 kernel
    // takes such a block whole, that span included.
    for (size_t i = 0; i < n; ++i) {
      if (i % 11 == 0) c.param.set(i, i % 22 == 0 ? 0.0f : -0.0f);
      const bool crowded_block = (i / 1024) % 3 == 1 && i % 5 == 0 && (i % 1024) / 32 != 20;
      if (((i / 64) % 5 == 0 && i % 7 == 0) || crowded_block) {
        c.param.set(i, c.param.get(i) * 1e-3f);
      }
    }
    c.mask.resize((n + 7) / 8);
    for (auto& b : c.mask) b = static_cast<uint8_t>(rng());
    cases.push_back(std::move(c));
  }
  std::vector<Case> expected = cases;

  const PriorConstants prior{-3.0f, 5e9f, 1.0f / 67349.0f, 1e10f, 20.0f};
  cpu::StepOptions options{param_dtype, state_dtype, prior_on, prior, 0.5f, threads, Pattern{},
                           cpu::HighBinWindow{}};
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

// The one-pass event (level 0, partition_at_bin, level 1 over the collected elements,
// prune_collected) against the two-pass one (level 0, a level-1 pass, apply_threshold) and a sort
// of the keys: the same τ, values and masks, for the τ cases of docs/spec.md §4.
void test_one_pass_event(DType dtype, int threads) {
  std::mt19937 rng(5);
  const float denormal = 1e-40f;
  struct EventCase {
    const char* name;
    std::vector<std::vector<float>> tensors;
    std::vector<int64_t> ks;  // 0 stands for N - 1
  };
  auto normal_with = [&](size_t n, auto&& edit) {
    std::vector<float> v = random_values(n, 0.02f, rng);
    for (size_t i = 0; i < n; ++i) edit(v, i);
    return v;
  };
  std::vector<EventCase> cases = {
      {"ties and zeros", {normal_with(70003, [](auto& v, size_t i) {
                            if (i % 9 == 0) v[i] = 0.0f;
                            if (i % 13 == 3) v[i] = -0.0125f;
                          }), {}, {0.5f}, normal_with(33000, [](auto& v, size_t i) {
                            if (i % 4 == 0) v[i] = i % 8 ? -0.0f : 0.0f;
                          })},
       {1, 2, 9000, 30000, 51000, 0}},
      {"mostly zeros", {normal_with(50000, [](auto& v, size_t i) { if (i % 10) v[i] = 0.0f; })},
       {1, 20000, 44999, 45000, 45001, 0}},
      {"denormals", {normal_with(40000, [&](auto& v, size_t i) {
                       if (i % 3 == 0) v[i] = denormal * static_cast<float>(i % 17);
                     })},
       {1, 5000, 13000, 20000, 0}},
      {"all equal", {std::vector<float>(9000, 0.75f), std::vector<float>(1, -0.75f)}, {1, 4000, 0}},
      {"one element", {{}, {-3.0f}, {}}, {1}},
  };
  for (const EventCase& c : cases) {
    std::vector<Buffer> base;
    int64_t numel = 0;
    std::vector<int64_t> offsets;
    for (const auto& values : c.tensors) {
      offsets.push_back(numel);
      base.emplace_back(dtype, values);
      numel += static_cast<int64_t>(values.size());
    }
    std::vector<uint32_t> sorted_keys;
    for (auto& b : base) for (size_t i = 0; i < b.size(); ++i) sorted_keys.push_back(abs_key(b.get(i)));
    std::sort(sorted_keys.begin(), sorted_keys.end());
    for (int64_t k : c.ks) {
      if (k == 0) k = numel - 1;
      std::vector<Buffer> one = base, two = base;
      std::vector<std::vector<uint8_t>> one_masks, two_masks;
      std::vector<ValueTensor> one_views, two_views;
      std::vector<uint8_t*> one_mask_ptrs, two_mask_ptrs;
      std::vector<cpu::PrunedTensor> pruned;
      for (size_t t = 0; t < base.size(); ++t) {
        one_masks.emplace_back((base[t].size() + 7) / 8, 0xAB);
        two_masks.emplace_back((base[t].size() + 7) / 8, 0xCD);
      }
      for (size_t t = 0; t < base.size(); ++t) {
        const int64_t n = static_cast<int64_t>(base[t].size());
        one_views.push_back({one[t].data(), n});
        two_views.push_back({two[t].data(), n});
        one_mask_ptrs.push_back(one_masks[t].data());
        two_mask_ptrs.push_back(two_masks[t].data());
        pruned.push_back({one[t].data(), n, dtype, one_masks[t].data(), offsets[t]});
      }
      const int64_t count = static_cast<int64_t>(base.size());
      std::vector<int64_t> high(kHistHighBins, 0);
      cpu::count_histogram(one_views.data(), count, dtype, 0, 0, high.data(), threads);
      int64_t one_selection[kNumSelectionSlots] = {k, 0, 0};
      select_bin(high.data(), 0, one_selection);
      int64_t two_selection[kNumSelectionSlots] = {one_selection[0], one_selection[1],
                                                   one_selection[2]};
      const uint32_t high_bin = key_high_bin(static_cast<uint32_t>(one_selection[kSelKey]));
      std::vector<uint32_t> positions(static_cast<size_t>(high[high_bin]));
      std::vector<int64_t> low(kHistLowBins, 0);
      const int64_t collected = cpu::partition_at_bin(
          one_views.data(), offsets.data(), one_mask_ptrs.data(), count, dtype, high_bin,
          positions.data(), static_cast<int64_t>(positions.size()), low.data(), threads);
      CHECK(collected == high[high_bin], "%s, k=%lld: collected %lld of the bin's %lld", c.name,
            static_cast<long long>(k), static_cast<long long>(collected),
            static_cast<long long>(high[high_bin]));
      select_bin(low.data(), 1, one_selection);
      const uint32_t tau_key = static_cast<uint32_t>(one_selection[kSelKey]);
      cpu::prune_collected(pruned.data(), count, positions.data(), collected, tau_key, threads);

      std::vector<int64_t> two_low(kHistLowBins, 0);
      cpu::count_histogram(two_views.data(), count, dtype, 1, high_bin, two_low.data(), threads);
      select_bin(two_low.data(), 1, two_selection);
      cpu::apply_threshold(two_views.data(), two_mask_ptrs.data(), count, dtype,
                           static_cast<uint32_t>(two_selection[kSelKey]), threads);

      CHECK(tau_key == sorted_keys[static_cast<size_t>(k - 1)],
            "%s, k=%lld (dtype %d): τ key 0x%08X, the k-th smallest is 0x%08X", c.name,
            static_cast<long long>(k), static_cast<int>(dtype), tau_key,
            sorted_keys[static_cast<size_t>(k - 1)]);
      CHECK(std::equal(one_selection, one_selection + kNumSelectionSlots, two_selection),
            "%s, k=%lld: the selection differs from the two-pass one", c.name,
            static_cast<long long>(k));
      for (size_t t = 0; t < base.size(); ++t) {
        CHECK(one[t].bytes == two[t].bytes && one_masks[t] == two_masks[t],
              "%s, k=%lld (dtype %d, %d threads): tensor %zu differs from the two-pass event",
              c.name, static_cast<long long>(k), static_cast<int>(dtype), threads, t);
      }
    }
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
    const cpu::StepOptions options{param, state, true, prior, 1.0f, 1, Pattern{},
                                   cpu::HighBinWindow{}};
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
      test_one_pass_event(p, threads);
    }
  }
  return TEST_MAIN_RESULT();
}
