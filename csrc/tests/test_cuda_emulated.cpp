// The CUDA kernel bodies (csrc/cuda/kernels.cuh) run on the host over an emulated grid: every
// block, every thread, phase by phase as __syncthreads() separates them, through the same launch
// planning as the device launchers. Results are checked bit for bit against the CPU kernels
// (csrc/cpu) and the histograms against direct counts, over the vector and the scalar paths, odd
// sizes, misaligned starts, empty tensors and several tensors (and launches) per call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "cuda/kernels.cuh"
#include "cuda/plan.h"

using namespace mgpp;

namespace {

// The CPU kernels' own tests cover their threading; one thread keeps this test quick.
constexpr int kCpuThreads = 1;

// ---- the emulated grid --------------------------------------------------------------------------

struct AccessStats {
  int64_t vector_accesses = 0;
  int64_t misaligned_vector_accesses = 0;
};

struct HostThread {
  int64_t block_index;
  int thread_index;
  int threads;
  uint32_t* words;
  AccessStats* stats;

  int64_t block() const { return block_index; }
  int thread() const { return thread_index; }
  int block_dim() const { return threads; }
  uint32_t* shared_words() const { return words; }
  void atomic_add_shared(uint32_t* word, uint32_t value) const { *word += value; }
  void atomic_add_global(unsigned long long* counter, unsigned long long value) const {
    *counter += value;
  }
  cuda::Bytes16 load16(const void* address) const {
    note(address);
    cuda::Bytes16 value;
    std::memcpy(&value, address, sizeof(value));
    return value;
  }
  void store16(void* address, const cuda::Bytes16& value) const {
    note(address);
    std::memcpy(address, &value, sizeof(value));
  }
  void note(const void* address) const {
    ++stats->vector_accesses;
    if (reinterpret_cast<uintptr_t>(address) % 16 != 0) ++stats->misaligned_vector_accesses;
  }
};

// Runs one launch: phase p of every thread of a block before phase p + 1. Shared memory and the
// block state start as garbage, as on the device.
template <class Kernel>
void emulate(const typename Kernel::Args& args, int64_t blocks, int threads, size_t shared_bytes,
             AccessStats& stats) {
  std::vector<uint32_t> words(shared_bytes / sizeof(uint32_t) + 1);
  typename Kernel::BlockState state;
  for (int64_t b = 0; b < blocks; ++b) {
    std::fill(words.begin(), words.end(), 0xA5A5A5A5u);
    std::memset(static_cast<void*>(&state), 0xA5, sizeof(state));
    for (int p = 0; p < Kernel::kPhases; ++p) {
      for (int t = 0; t < threads; ++t) {
        Kernel::phase(p, HostThread{b, t, threads, words.data(), &stats}, args, state);
      }
    }
  }
}

template <class Kernel>
void emulate_all(const std::vector<typename Kernel::Args>& launches, int threads,
                 size_t shared_bytes, AccessStats& stats) {
  for (const auto& args : launches) {
    emulate<Kernel>(args, args.first_block[args.num_tensors], threads, shared_bytes, stats);
  }
}

size_t counter_bytes(int32_t mode, uint32_t bins) {
  return mode == cuda::kSharedHistogram ? cuda::shared_histogram_bytes(bins) : 0;
}

// ---- test data ----------------------------------------------------------------------------------

size_t width(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

// A tensor in any storage dtype starting `offset` elements past a 64-byte boundary.
class Buffer {
 public:
  Buffer(DType dtype, const std::vector<float>& values, size_t offset)
      : dtype_(dtype), size_(values.size()), offset_(offset),
        storage_((values.size() + offset) * width(dtype) + 64) {
    for (size_t i = 0; i < size_; ++i) set(i, values[i]);
  }
  // A copy keeps the element offset from a 64-byte boundary, whatever the new storage's address.
  Buffer(const Buffer& other)
      : dtype_(other.dtype_), size_(other.size_), offset_(other.offset_), storage_(other.storage_.size()) {
    std::memcpy(bytes(), other.bytes(), size_ * width(dtype_));
  }
  Buffer(Buffer&&) = default;
  Buffer& operator=(const Buffer&) = delete;
  size_t size() const { return size_; }
  uint8_t* bytes() { return storage_.data() + start(); }
  const uint8_t* bytes() const { return storage_.data() + start(); }
  void* data() { return bytes(); }
  std::vector<uint8_t> content() { return std::vector<uint8_t>(bytes(), bytes() + size_ * width(dtype_)); }
  // The same values bit for bit, NaN matching any NaN: a NaN's sign and payload follow which
  // operand the hardware propagates, which a vectorised loop may order otherwise (docs/spec.md §4).
  bool same_values(Buffer& other) {
    if (other.size_ != size_) return false;
    for (size_t i = 0; i < size_; ++i) {
      const float a = get(i), b = other.get(i);
      if (!(std::isnan(a) && std::isnan(b)) && float_to_bits(a) != float_to_bits(b)) return false;
    }
    return true;
  }
  float get(size_t i) {
    if (dtype_ == DType::Float32) {
      float x;
      std::memcpy(&x, bytes() + 4 * i, 4);
      return x;
    }
    uint16_t h;
    std::memcpy(&h, bytes() + 2 * i, 2);
    return dtype_ == DType::BFloat16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
  }
  void set(size_t i, float x) {
    if (dtype_ == DType::Float32) {
      std::memcpy(bytes() + 4 * i, &x, 4);
    } else {
      const uint16_t h = dtype_ == DType::BFloat16 ? float_to_bf16_bits(x) : float_to_f16_bits(x);
      std::memcpy(bytes() + 2 * i, &h, 2);
    }
  }

 private:
  size_t start() const {
    const uintptr_t raw = reinterpret_cast<uintptr_t>(storage_.data());
    return (64 - raw % 64) % 64 + offset_ * width(dtype_);
  }

  DType dtype_;
  size_t size_;
  size_t offset_;
  std::vector<uint8_t> storage_;
};

// Normal values with the cases that break kernels mixed in: zeros of both signs, ties,
// denormals, values whose prior term overflows exp, and (optionally) inf and NaN.
std::vector<float> test_values(size_t n, float scale, std::mt19937& rng, bool non_finite) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    switch (i % 17) {
      case 3: v[i] = 0.0f; break;
      case 5: v[i] = -0.0f; break;
      case 7: v[i] = -0.0125f; break;
      case 11: v[i] = 1e-39f; break;
      case 13: v[i] = 3.0f; break;
      case 16: v[i] = non_finite ? (i % 2 ? std::numeric_limits<float>::infinity() : std::nanf("")) : 1e-6f; break;
      default: v[i] = normal(rng);
    }
  }
  return v;
}

const char* name(DType dtype) {
  return dtype == DType::Float32 ? "f32" : dtype == DType::BFloat16 ? "bf16" : "f16";
}

// ---- fused step ---------------------------------------------------------------------------------

struct GridConfig {
  int64_t chunk_size;
  int threads;
  int max_tensors;
  int32_t histogram_mode;
};

const GridConfig kGridConfigs[] = {
    {64, 3, cuda::FusedStepArgs::kMaxTensors, cuda::kSharedHistogram},
    {24, 32, 2, cuda::kSharedHistogram},
    {8, 1, 3, cuda::kGlobalHistogram},
    {cuda::kChunkSize, cuda::kBlockThreads, cuda::FusedStepArgs::kMaxTensors, cuda::kNoHistogram},
};

struct StepCase {
  Buffer param, grad, exp_avg, exp_avg_sq;
  std::vector<uint8_t> mask;
};

template <class P, class S>
void test_fused_step(DType param_dtype, DType state_dtype, const GridConfig& grid, bool prior_on,
                     bool masked) {
  std::mt19937 rng(static_cast<unsigned>(grid.chunk_size * 31 + grid.threads + prior_on * 7 + masked));
  const std::vector<size_t> sizes = {7, 0, 1, 8, 9, 63, 64, 65, 200, 4097};
  std::vector<StepCase> cases;
  for (size_t t = 0; t < sizes.size(); ++t) {
    const size_t n = sizes[t];
    // Tensor 1 mod 3 starts one element off alignment; tensor 4 mod 5 has only exp_avg_sq off.
    const size_t offset = t % 3 == 1 ? 1 : 0;
    const size_t sq_offset = t % 5 == 4 ? 1 : offset;
    std::vector<float> sq = test_values(n, 1e-4f, rng, false);
    for (auto& x : sq) x = std::fabs(x);
    StepCase c{Buffer(param_dtype, test_values(n, 0.05f, rng, false), offset),
               Buffer(param_dtype, test_values(n, 0.01f, rng, t == 8), offset),
               Buffer(state_dtype, test_values(n, 0.001f, rng, false), offset),
               Buffer(state_dtype, sq, sq_offset), {}};
    c.mask.resize((n + 7) / 8);
    for (auto& b : c.mask) b = static_cast<uint8_t>(rng());
    cases.push_back(std::move(c));
  }
  std::vector<StepCase> expected = cases;

  const double lambda = 0.1, sigma0_sq = 1e-10, sigma1_sq = 0.05, n_train = 1000.0;
  const double scalars[kNumStepScalars] = {
      1e-3, 0.9, 0.999, 1e-8, 0.01, prior_on ? 1.0 : 0.0,
      std::log(lambda) - std::log(1 - lambda) + 0.5 * std::log(sigma0_sq) - 0.5 * std::log(sigma1_sq),
      1 / (2 * sigma0_sq) - 1 / (2 * sigma1_sq), 1 / n_train, 1 / sigma0_sq, 1 / sigma1_sq};
  const float grad_scale = 512.0f;
  const bool scaled = masked;  // exercise both with and without a GradScaler
  std::vector<float> device_steps(sizes.size());

  for (int step = 1; step <= 2; ++step) {
    std::vector<cuda::StepTensor> tensors;
    std::vector<cpu::StepTensor> cpu_tensors;
    for (size_t t = 0; t < sizes.size(); ++t) {
      const float k = static_cast<float>(step + t);
      device_steps[t] = k;
      const bool with_mask = masked && t % 2 == 1;
      StepCase& c = cases[t];
      tensors.push_back({c.param.data(), c.grad.data(), c.exp_avg.data(), c.exp_avg_sq.data(),
                         with_mask ? c.mask.data() : nullptr, &device_steps[t],
                         static_cast<int64_t>(sizes[t])});
      StepCase& e = expected[t];
      const AdamWScalars adamw = adamw_scalars(scalars, k);
      cpu_tensors.push_back({e.param.data(), e.grad.data(), e.exp_avg.data(), e.exp_avg_sq.data(),
                             with_mask ? e.mask.data() : nullptr, static_cast<int64_t>(sizes[t]), adamw});
    }
    std::vector<int64_t> histogram(kHistHighBins, 0), cpu_histogram(kHistHighBins, 0);
    const cuda::StepLaunch launch{param_dtype, state_dtype, scalars, scaled ? &grad_scale : nullptr,
                                  grid.histogram_mode == cuda::kNoHistogram ? nullptr : histogram.data(),
                                  /*current=*/nullptr, /*stream=*/nullptr};
    const auto launches = cuda::plan_fused_step(tensors.data(), static_cast<int64_t>(tensors.size()),
                                                launch, grid.histogram_mode, grid.chunk_size,
                                                grid.max_tensors);
    const size_t non_empty = sizes.size() - 1;
    CHECK(launches.size() == (non_empty + grid.max_tensors - 1) / grid.max_tensors,
          "%zu launches for %zu tensors at %d per launch", launches.size(), non_empty, grid.max_tensors);
    AccessStats stats;
    emulate_all<cuda::FusedStepKernel<P, S>>(launches, grid.threads,
                                             counter_bytes(grid.histogram_mode, kHistHighBins), stats);

    const cpu::StepOptions options{param_dtype, state_dtype, prior_on, prior_constants(scalars),
                                   scaled ? 1.0f / grad_scale : 1.0f, kCpuThreads, Pattern{},
                                   cpu::HighBinWindow{}};
    cpu::fused_step(cpu_tensors.data(), static_cast<int64_t>(cpu_tensors.size()), options,
                    cpu_histogram.data());

    std::vector<int64_t> direct(kHistHighBins, 0);
    for (size_t t = 0; t < sizes.size(); ++t) {
      const bool same = cases[t].param.same_values(expected[t].param) &&
                        cases[t].exp_avg.same_values(expected[t].exp_avg) &&
                        cases[t].exp_avg_sq.same_values(expected[t].exp_avg_sq);
      CHECK(same, "emulated fused step differs from cpu::fused_step: %s/%s chunk %lld threads %d "
            "prior %d mask %d step %d size %zu", name(param_dtype), name(state_dtype),
            static_cast<long long>(grid.chunk_size), grid.threads, prior_on, masked, step, sizes[t]);
      for (size_t i = 0; i < sizes[t]; ++i) ++direct[key_high_bin(abs_key(cases[t].param.get(i)))];
    }
    if (grid.histogram_mode != cuda::kNoHistogram) {
      CHECK(histogram == direct, "emulated update histogram differs from a direct count (%s/%s, "
            "chunk %lld, mode %d)", name(param_dtype), name(state_dtype),
            static_cast<long long>(grid.chunk_size), grid.histogram_mode);
      CHECK(histogram == cpu_histogram, "emulated update histogram differs from the CPU kernel's");
    }
    CHECK(stats.vector_accesses > 0, "the vector path never ran (%s/%s)", name(param_dtype),
          name(state_dtype));
    CHECK(stats.misaligned_vector_accesses == 0, "%lld misaligned 128-bit accesses",
          static_cast<long long>(stats.misaligned_vector_accesses));
  }
}

template <class P, class S>
void test_fused_step_all(DType param_dtype, DType state_dtype) {
  for (const GridConfig& grid : kGridConfigs) {
    for (bool prior_on : {false, true}) {
      for (bool masked : {false, true}) test_fused_step<P, S>(param_dtype, state_dtype, grid, prior_on, masked);
    }
  }
}

// ---- histogram and threshold ----------------------------------------------------------------------

std::vector<Buffer> value_buffers(DType dtype, std::mt19937& rng) {
  const std::vector<size_t> sizes = {5, 0, 130, 1, 33, 4099};
  std::vector<Buffer> buffers;
  for (size_t t = 0; t < sizes.size(); ++t) {
    buffers.emplace_back(dtype, test_values(sizes[t], 0.02f, rng, true), t % 2 == 0 ? 3 : 0);
  }
  return buffers;
}

std::vector<ValueTensor> views_of(std::vector<Buffer>& buffers) {
  std::vector<ValueTensor> views;
  for (auto& b : buffers) views.push_back({b.data(), static_cast<int64_t>(b.size())});
  return views;
}

// A packed keep mask per buffer, every byte `fill` (a value the kernels would not write, so that a
// byte left unwritten shows), and their data pointers, as the kernels take them.
struct KeepMasks {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<uint8_t*> pointers;
  KeepMasks(const std::vector<Buffer>& buffers, uint8_t fill) {
    for (const auto& b : buffers) bytes.emplace_back((b.size() + 7) / 8, fill);
    for (auto& mask : bytes) pointers.push_back(mask.data());
  }
  KeepMasks(const KeepMasks&) = delete;
  KeepMasks& operator=(const KeepMasks&) = delete;
};

template <class P>
void test_histogram(DType dtype, const GridConfig& grid) {
  std::mt19937 rng(static_cast<unsigned>(grid.chunk_size + grid.threads));
  std::vector<Buffer> buffers = value_buffers(dtype, rng);
  const auto views = views_of(buffers);
  const int64_t count = static_cast<int64_t>(views.size());
  const uint32_t tie_key = abs_key(buffers[2].get(7));
  const int64_t selection[kNumSelectionSlots] = {1, static_cast<int64_t>(tie_key & ~(kHistLowBins - 1u)), 0, 0};
  for (int level : {0, 1}) {
    const uint32_t bins = level == 0 ? kHistHighBins : kHistLowBins;
    std::vector<int64_t> histogram(bins, 0), cpu_histogram(bins, 0), direct(bins, 0);
    const int32_t mode = grid.histogram_mode == cuda::kNoHistogram ? cuda::kGlobalHistogram : grid.histogram_mode;
    AccessStats stats;
    emulate_all<cuda::HistogramKernel<P>>(
        cuda::plan_histogram(views.data(), count, level, selection, histogram.data(), nullptr, mode,
                             grid.chunk_size, std::min(grid.max_tensors, cuda::HistogramArgs::kMaxTensors)),
        grid.threads, counter_bytes(mode, bins), stats);
    cpu::count_histogram(views.data(), count, dtype, level, key_high_bin(tie_key), cpu_histogram.data(), kCpuThreads);
    for (auto& b : buffers) {
      for (size_t i = 0; i < b.size(); ++i) {
        const uint32_t key = abs_key(b.get(i));
        if (level == 0) {
          ++direct[key_high_bin(key)];
        } else if (key_high_bin(key) == key_high_bin(tie_key)) {
          ++direct[key_low_bin(key)];
        }
      }
    }
    CHECK(histogram == direct, "emulated level-%d histogram differs from a direct count (%s, chunk "
          "%lld, mode %d)", level, name(dtype), static_cast<long long>(grid.chunk_size), mode);
    CHECK(histogram == cpu_histogram, "emulated level-%d histogram differs from the CPU kernel's", level);
    CHECK(stats.vector_accesses > 0 && stats.misaligned_vector_accesses == 0,
          "vector accesses: %lld, misaligned %lld", static_cast<long long>(stats.vector_accesses),
          static_cast<long long>(stats.misaligned_vector_accesses));
  }
}

template <class P>
void test_threshold(DType dtype, const GridConfig& grid) {
  std::mt19937 rng(static_cast<unsigned>(grid.chunk_size * 3 + grid.threads));
  const uint32_t nan_key = 0x7FC00000u;
  for (bool with_masks : {true, false}) {
    for (int which : {0, 1, 2}) {
      std::vector<Buffer> buffers = value_buffers(dtype, rng);
      std::vector<Buffer> expected = buffers;
      // τ among ties, τ = 0 (nothing is below), τ = NaN (comparisons are false: nothing zeroed).
      const uint32_t tau_key = which == 0 ? abs_key(buffers[2].get(7)) : which == 1 ? 0u : nan_key;
      const int64_t selection[kNumSelectionSlots] = {0, static_cast<int64_t>(tau_key), 0, 0};
      KeepMasks emulated_masks(buffers, 0xAB), cpu_keep_masks(buffers, 0xCD);
      auto& masks = emulated_masks.bytes;
      auto& cpu_masks = cpu_keep_masks.bytes;
      const auto views = views_of(buffers);
      const auto cpu_views = views_of(expected);
      const int64_t count = static_cast<int64_t>(views.size());
      AccessStats stats;
      emulate_all<cuda::ThresholdKernel<P>>(
          cuda::plan_threshold(views.data(),
                               with_masks ? emulated_masks.pointers.data() : nullptr, count,
                               selection, nullptr, grid.chunk_size,
                               std::min(grid.max_tensors, cuda::ThresholdArgs::kMaxTensors)),
          grid.threads, 0, stats);
      cpu::apply_threshold(cpu_views.data(), cpu_keep_masks.pointers.data(), count, dtype, tau_key,
                           kCpuThreads);
      for (size_t t = 0; t < buffers.size(); ++t) {
        CHECK(buffers[t].content() == expected[t].content(), "emulated threshold values differ (%s, "
              "tensor %zu, tau case %d)", name(dtype), t, which);
        if (with_masks) {
          CHECK(masks[t] == cpu_masks[t], "emulated keep mask differs (%s, tensor %zu, tau case %d)",
                name(dtype), t, which);
        } else {
          CHECK(std::all_of(masks[t].begin(), masks[t].end(), [](uint8_t b) { return b == 0xAB; }),
                "a mask was written without masks requested");
        }
      }
      CHECK(stats.misaligned_vector_accesses == 0, "misaligned 128-bit accesses in the threshold");
    }
  }
}

// N:M pools: the emulated histogram (both levels) and threshold (with masks) against the CPU
// kernels with the same pattern, on group sizes that divide a mask byte (two or three candidates
// of four, one of two), that span several bytes and that do not align with them, and tensors of
// one group, a few groups and several chunks.
template <class P>
void test_nm_events(DType dtype) {
  std::mt19937 rng(static_cast<unsigned>(static_cast<int>(dtype) + 77));
  for (const Pattern pattern :
       {Pattern{2, 4}, Pattern{1, 4}, Pattern{1, 2}, Pattern{3, 6}, Pattern{1, 16}, Pattern{2, 3}}) {
    const int unit = nm_unit(pattern.m);
    std::vector<Buffer> buffers, expected;
    for (size_t groups : {size_t{1}, size_t{5}, static_cast<size_t>(3 * 4096 / pattern.m + 7)}) {
      // Many ties: values from a small set, with the kernels' special cases mixed in.
      std::vector<float> values = test_values(groups * pattern.m, 0.02f, rng, true);
      for (size_t i = 0; i < values.size(); i += 3) values[i] = 0.001f * static_cast<float>(rng() % 4);
      buffers.emplace_back(dtype, values, 0);
      expected.emplace_back(dtype, values, 0);
    }
    const auto views = views_of(buffers);
    const auto cpu_views = views_of(expected);
    const int64_t count = static_cast<int64_t>(views.size());
    const int64_t chunk_size = 4 * unit;   // several chunks per tensor, of whole units
    uint32_t tau_key = 0;
    std::vector<int64_t> level0(kHistHighBins, 0);
    for (int level : {0, 1}) {
      const uint32_t bins = level == 0 ? kHistHighBins : kHistLowBins;
      std::vector<int64_t> histogram(bins, 0), cpu_histogram(bins, 0);
      const int64_t selection[kNumSelectionSlots] = {0, static_cast<int64_t>(tau_key), 0, 0};
      AccessStats stats;
      emulate_all<cuda::HistogramKernel<P>>(
          cuda::plan_histogram(views.data(), count, level, selection, histogram.data(), nullptr,
                               cuda::kSharedHistogram, chunk_size, cuda::HistogramArgs::kMaxTensors,
                               pattern),
          32, counter_bytes(cuda::kSharedHistogram, bins), stats);
      cpu::count_histogram(cpu_views.data(), count, dtype, level, key_high_bin(tau_key),
                           cpu_histogram.data(), kCpuThreads, pattern);
      CHECK(histogram == cpu_histogram, "%d:%d level-%d histogram differs from the CPU kernel's (%s)",
            pattern.n, pattern.m, level, name(dtype));
      if (level == 0) {
        // τ: the candidate key halfway up, whose high bin level 1 counts.
        int64_t candidates = 0;
        for (uint32_t b = 0; b < 0xFFFFu; ++b) candidates += histogram[b];
        int64_t selected[kNumSelectionSlots] = {candidates / 2 + 1, 0, 0, 0};
        select_bin(histogram.data(), 0, selected);
        tau_key = static_cast<uint32_t>(selected[kSelKey]);
      }
    }
    KeepMasks emulated_masks(buffers, 0xAB), cpu_keep_masks(buffers, 0xCD);
    auto& masks = emulated_masks.bytes;
    auto& cpu_masks = cpu_keep_masks.bytes;
    const int64_t selection[kNumSelectionSlots] = {0, static_cast<int64_t>(tau_key), 0, 0};
    AccessStats stats;
    emulate_all<cuda::ThresholdKernel<P>>(
        cuda::plan_threshold(views.data(), emulated_masks.pointers.data(), count, selection,
                             nullptr, chunk_size, cuda::ThresholdArgs::kMaxTensors, pattern),
        32, 0, stats);
    cpu::apply_threshold(cpu_views.data(), cpu_keep_masks.pointers.data(), count, dtype, tau_key,
                         kCpuThreads, pattern);
    bool zeroed = false;
    for (size_t t = 0; t < buffers.size(); ++t) {
      CHECK(buffers[t].content() == expected[t].content(), "%d:%d threshold values differ (%s, "
            "tensor %zu)", pattern.n, pattern.m, name(dtype), t);
      CHECK(masks[t] == cpu_masks[t], "%d:%d keep mask differs (%s, tensor %zu)", pattern.n,
            pattern.m, name(dtype), t);
      for (size_t i = 0; i < buffers[t].size(); ++i) zeroed = zeroed || !((masks[t][i / 8] >> (i % 8)) & 1);
    }
    CHECK(zeroed, "%d:%d: the threshold zeroed nothing", pattern.n, pattern.m);
  }
}

// ---- radix selection ----------------------------------------------------------------------------

void emulate_select(const int64_t* histogram, int level, int64_t* selection, int threads) {
  AccessStats stats;
  emulate<cuda::SelectKernel>(cuda::SelectArgs{histogram, selection, level, nullptr}, 1, threads, 0, stats);
}

void test_select(int threads) {
  std::mt19937 rng(static_cast<unsigned>(threads));
  for (int level : {0, 1}) {
    const uint32_t bins = level == 0 ? kHistHighBins : kHistLowBins;
    for (int shape = 0; shape < 4; ++shape) {
      std::vector<int64_t> histogram(bins, 0);
      if (shape == 0) {                   // sparse counts
        for (int i = 0; i < 300; ++i) histogram[rng() % bins] += 1 + rng() % 5;
      } else if (shape == 1) {            // one bin holds everything
        histogram[bins / 3] = 1000;
      } else if (shape == 2) {            // only the first and the last bin
        histogram[0] = 5;
        histogram[bins - 1] = 7;
      } else {                            // dense
        for (auto& h : histogram) h = rng() % 3;
      }
      int64_t total = 0;
      for (int64_t h : histogram) total += h;
      std::vector<int64_t> ranks = {1, total, total + 1, total > 1 ? total - 1 : 1, 0};
      for (int i = 0; i < 5; ++i) ranks.push_back(1 + static_cast<int64_t>(rng() % static_cast<uint32_t>(total)));
      for (int64_t rank : ranks) {
        // Level 1 continues a level-0 selection: a key prefix and a count below are already set.
        int64_t selection[kNumSelectionSlots] = {rank, level == 0 ? 0 : int64_t{0x1234} << kHistLowBits, level == 0 ? 0 : 17, 0};
        int64_t expected[kNumSelectionSlots] = {selection[0], selection[1], selection[2], selection[3]};
        emulate_select(histogram.data(), level, selection, threads);
        select_bin(histogram.data(), level, expected);
        CHECK(std::equal(selection, selection + kNumSelectionSlots, expected), "select on the grid (%d threads) differs "
              "from select_bin: level %d shape %d rank %lld -> [%lld %lld %lld] vs [%lld %lld %lld]",
              threads, level, shape, static_cast<long long>(rank), static_cast<long long>(selection[0]),
              static_cast<long long>(selection[1]), static_cast<long long>(selection[2]),
              static_cast<long long>(expected[0]), static_cast<long long>(expected[1]),
              static_cast<long long>(expected[2]));
      }
    }
  }
}

// τ over tensors of all three dtypes through the grid's histograms and selections equals the
// k-th smallest key by sorting.
void test_tau_end_to_end() {
  std::mt19937 rng(5);
  std::vector<Buffer> f32 = value_buffers(DType::Float32, rng);
  std::vector<Buffer> bf16 = value_buffers(DType::BFloat16, rng);
  std::vector<Buffer> f16 = value_buffers(DType::Float16, rng);
  std::vector<uint32_t> keys;
  for (auto* group : {&f32, &bf16, &f16}) {
    for (auto& b : *group) {
      for (size_t i = 0; i < b.size(); ++i) keys.push_back(abs_key(b.get(i)));
    }
  }
  std::sort(keys.begin(), keys.end());
  const int64_t n = static_cast<int64_t>(keys.size());
  for (int64_t k : {int64_t{1}, int64_t{2}, n / 3, n / 2, n - 1, n}) {
    int64_t selection[kNumSelectionSlots] = {k, 0, 0, 0};
    for (int level : {0, 1}) {
      std::vector<int64_t> histogram(level == 0 ? kHistHighBins : kHistLowBins, 0);
      AccessStats stats;
      const auto count_group = [&](auto format, std::vector<Buffer>& group) {
        const auto views = views_of(group);
        emulate_all<cuda::HistogramKernel<decltype(format)>>(
            cuda::plan_histogram(views.data(), static_cast<int64_t>(views.size()), level, selection,
                                 histogram.data(), nullptr, cuda::kSharedHistogram, 64),
            16, counter_bytes(cuda::kSharedHistogram, static_cast<uint32_t>(histogram.size())), stats);
      };
      count_group(F32{}, f32);
      count_group(BF16{}, bf16);
      count_group(F16{}, f16);
      emulate_select(histogram.data(), level, selection, cuda::kSelectThreads);
    }
    const uint32_t expected = keys[static_cast<size_t>(k - 1)];
    const int64_t below = std::lower_bound(keys.begin(), keys.end(), expected) - keys.begin();
    CHECK(selection[1] == static_cast<int64_t>(expected) && selection[2] == below,
          "tau for k = %lld: key %llx below %lld, expected %x below %lld", static_cast<long long>(k),
          static_cast<long long>(selection[1]), static_cast<long long>(selection[2]), expected,
          static_cast<long long>(below));
  }
}

// ---- the device schedule ---------------------------------------------------------------------

// The step's row: copied from row min(t, rows − 1), k zeroed and t held on a skipped step.
void test_schedule_kernel() {
  const int64_t rows = 3;
  std::vector<double> table(rows * kNumScheduleColumns);
  for (size_t i = 0; i < table.size(); ++i) table[i] = 10.0 * static_cast<double>(i) + 1.0;
  const float zero = 0.0f, one = 1.0f, nan = std::nanf("");
  struct Case { int64_t t; const float* found_inf; bool skip; };
  for (const Case& c : {Case{0, nullptr, false}, Case{1, &zero, false}, Case{2, nullptr, false},
                        Case{7, nullptr, false}, Case{1, &one, true}, Case{0, &nan, true}}) {
    int64_t position = c.t;
    std::vector<double> current(kNumCurrentSlots, -5.0);
    AccessStats stats;
    emulate<cuda::ScheduleKernel>(cuda::ScheduleArgs{table.data(), rows, &position, c.found_inf,
                                                     current.data()},
                                  1, 1, 0, stats);
    const int64_t row = std::min(c.t, rows - 1);
    for (int j = 0; j < kNumScheduleColumns; ++j) {
      const double expected = j == kScheduleK && c.skip ? 0.0 : table[row * kNumScheduleColumns + j];
      CHECK(current[j] == expected, "schedule row t %lld column %d: %g, expected %g",
            static_cast<long long>(c.t), j, current[j], expected);
    }
    CHECK(current[kCurrentSkip] == (c.skip ? 1.0 : 0.0), "skip flag at t %lld", static_cast<long long>(c.t));
    CHECK(position == (c.skip ? c.t : c.t + 1), "position after t %lld: %lld", static_cast<long long>(c.t),
          static_cast<long long>(position));
  }
}

std::vector<double> step_row(double prior_on, double c1, double k, double freeze, double skip) {
  std::vector<double> row(kNumCurrentSlots);
  row[kSchedulePriorOn] = prior_on;
  row[kScheduleC1] = c1;
  row[kScheduleK] = k;
  row[kScheduleFreeze] = freeze;
  row[kCurrentSkip] = skip;
  return row;
}

// A fused step reading the step's row equals the host-scheduled step whose scalars hold that
// row's prior (c1 and on/off); a skipped step writes nothing; only a step that prunes counts.
void test_scheduled_fused_step() {
  std::mt19937 rng(11);
  const double c1 = -9.5;
  struct Case { std::vector<double> row; bool host_prior_on; bool counts; };
  for (const Case& c : {Case{step_row(1, c1, 0, 0, 0), true, false},
                        Case{step_row(1, c1, 3, 0, 0), true, true},
                        Case{step_row(0, c1, 3, 1, 0), false, true},
                        Case{step_row(1, c1, 0, 0, 1), true, false}}) {
    const bool skip = c.row[kCurrentSkip] != 0.0;
    const size_t n = 4099;
    Buffer param(DType::Float32, test_values(n, 0.01f, rng, false), 0);
    Buffer grad(DType::Float32, test_values(n, 0.01f, rng, false), 0);
    std::vector<float> sq = test_values(n, 1e-4f, rng, false);
    for (auto& x : sq) x = std::fabs(x);
    Buffer exp_avg(DType::Float32, test_values(n, 0.001f, rng, false), 0);
    Buffer exp_avg_sq(DType::Float32, sq, 0);
    Buffer e_param(param), e_grad(grad), e_exp_avg(exp_avg), e_exp_avg_sq(exp_avg_sq);
    const std::vector<uint8_t> before = param.content();
    // The device schedule's scalars: the prior on, 0 in c1's place (the row gives it).
    double scalars[kNumStepScalars] = {1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0, 0.0, 5e9, 1e-3, 1e10, 20.0};
    double host_scalars[kNumStepScalars];
    std::copy(scalars, scalars + kNumStepScalars, host_scalars);
    host_scalars[kPriorOn] = c.host_prior_on ? 1.0 : 0.0;
    host_scalars[kPriorC1] = c1;
    const float step = 3.0f;
    std::vector<int64_t> histogram(kHistHighBins, 0), host_histogram(kHistHighBins, 0);

    const cuda::StepTensor scheduled{param.data(), grad.data(), exp_avg.data(), exp_avg_sq.data(),
                                     nullptr, &step, static_cast<int64_t>(n)};
    const cuda::StepLaunch launch{DType::Float32, DType::Float32, scalars, nullptr, histogram.data(),
                                  c.row.data(), nullptr};
    AccessStats stats;
    emulate_all<cuda::FusedStepKernel<F32, F32>>(
        cuda::plan_fused_step(&scheduled, 1, launch, cuda::kSharedHistogram, 512), 16,
        counter_bytes(cuda::kSharedHistogram, kHistHighBins), stats);
    const cuda::StepTensor host{e_param.data(), e_grad.data(), e_exp_avg.data(), e_exp_avg_sq.data(),
                                nullptr, &step, static_cast<int64_t>(n)};
    const cuda::StepLaunch host_launch{DType::Float32, DType::Float32, host_scalars, nullptr,
                                       host_histogram.data(), nullptr, nullptr};
    emulate_all<cuda::FusedStepKernel<F32, F32>>(
        cuda::plan_fused_step(&host, 1, host_launch, cuda::kSharedHistogram, 512), 16,
        counter_bytes(cuda::kSharedHistogram, kHistHighBins), stats);

    if (skip) {
      CHECK(param.content() == before, "a skipped step changed the parameters");
      CHECK(std::all_of(histogram.begin(), histogram.end(), [](int64_t h) { return h == 0; }),
            "a skipped step counted its histogram");
      continue;
    }
    CHECK(param.content() == e_param.content() && exp_avg.content() == e_exp_avg.content() &&
              exp_avg_sq.content() == e_exp_avg_sq.content(),
          "the step's row (prior_on %g, k %g) gives another update than the host's scalars",
          c.row[kSchedulePriorOn], c.row[kScheduleK]);
    CHECK(param.content() != before, "the update changed nothing");
    const bool counted = std::any_of(histogram.begin(), histogram.end(), [](int64_t h) { return h != 0; });
    CHECK(counted == c.counts, "the histogram was %s counted at k = %g", counted ? "" : "not",
          c.row[kScheduleK]);
    if (c.counts) CHECK(histogram == host_histogram, "the scheduled histogram differs from the host's");
  }
}

// The event kernels do nothing when the step does not prune (k = 0); they prune as the host
// schedule does when it does, and the threshold writes masks at the freeze only.
void test_scheduled_events() {
  std::mt19937 rng(13);
  for (const auto& row : {step_row(1, 0, 0, 0, 0), step_row(1, 0, 40, 0, 0), step_row(1, 0, 40, 1, 0)}) {
    const bool prunes = row[kScheduleK] != 0.0;
    const bool freezes = row[kScheduleFreeze] != 0.0;
    std::vector<Buffer> buffers = value_buffers(DType::Float32, rng);
    std::vector<Buffer> expected = buffers;
    std::vector<Buffer> original = buffers;
    const auto views = views_of(buffers);
    const auto expected_views = views_of(expected);
    const int64_t count = static_cast<int64_t>(views.size());
    KeepMasks scheduled_masks(buffers, 0xFF), host_masks(buffers, 0xFF);
    auto& masks = scheduled_masks.bytes;
    auto& expected_masks = host_masks.bytes;
    int64_t selection[kNumSelectionSlots] = {40, 0, 0, 0};
    int64_t host_selection[kNumSelectionSlots] = {40, 0, 0, 0};
    AccessStats stats;
    for (int level : {0, 1}) {
      std::vector<int64_t> histogram(level == 0 ? kHistHighBins : kHistLowBins, 0);
      std::vector<int64_t> host_histogram(histogram.size(), 0);
      const size_t bytes = counter_bytes(cuda::kSharedHistogram, static_cast<uint32_t>(histogram.size()));
      emulate_all<cuda::HistogramKernel<F32>>(
          cuda::plan_histogram(views.data(), count, level, selection, histogram.data(), row.data(),
                               cuda::kSharedHistogram, 64), 16, bytes, stats);
      emulate_all<cuda::HistogramKernel<F32>>(
          cuda::plan_histogram(expected_views.data(), count, level, host_selection,
                               host_histogram.data(), nullptr, cuda::kSharedHistogram, 64), 16, bytes, stats);
      CHECK(prunes ? histogram == host_histogram
                   : std::all_of(histogram.begin(), histogram.end(), [](int64_t h) { return h == 0; }),
            "level-%d histogram at k = %g", level, row[kScheduleK]);
      emulate<cuda::SelectKernel>(cuda::SelectArgs{histogram.data(), selection, level, row.data()}, 1,
                                  64, 0, stats);
      emulate<cuda::SelectKernel>(cuda::SelectArgs{host_histogram.data(), host_selection, level, nullptr},
                                  1, 64, 0, stats);
    }
    const int64_t untouched[kNumSelectionSlots] = {40, 0, 0, 0};
    CHECK(std::equal(selection, selection + kNumSelectionSlots, prunes ? host_selection : untouched),
          "selection at k = %g", row[kScheduleK]);
    emulate_all<cuda::ThresholdKernel<F32>>(
        cuda::plan_threshold(views.data(), scheduled_masks.pointers.data(), count, selection,
                             row.data(), 64),
        16, 0, stats);
    emulate_all<cuda::ThresholdKernel<F32>>(
        cuda::plan_threshold(expected_views.data(), freezes ? host_masks.pointers.data() : nullptr,
                             count, host_selection, nullptr, 64),
        16, 0, stats);
    for (size_t t = 0; t < buffers.size(); ++t) {
      CHECK(buffers[t].content() == (prunes ? expected[t] : original[t]).content(),
            "scheduled threshold values, tensor %zu (k %g)", t, row[kScheduleK]);
      CHECK(masks[t] == expected_masks[t], "scheduled keep mask, tensor %zu (k %g, freeze %d)", t,
            row[kScheduleK], freezes);
    }
  }
}

}  // namespace

int main() {
  test_fused_step_all<F32, F32>(DType::Float32, DType::Float32);
  test_fused_step_all<BF16, F32>(DType::BFloat16, DType::Float32);
  test_fused_step_all<BF16, BF16>(DType::BFloat16, DType::BFloat16);
  test_fused_step_all<F16, F32>(DType::Float16, DType::Float32);
  test_fused_step_all<F16, F16>(DType::Float16, DType::Float16);
  for (const GridConfig& grid : kGridConfigs) {
    test_histogram<F32>(DType::Float32, grid);
    test_histogram<BF16>(DType::BFloat16, grid);
    test_histogram<F16>(DType::Float16, grid);
    test_threshold<F32>(DType::Float32, grid);
    test_threshold<BF16>(DType::BFloat16, grid);
    test_threshold<F16>(DType::Float16, grid);
  }
  for (int threads : {1, 64, cuda::kSelectThreads}) test_select(threads);
  test_nm_events<F32>(DType::Float32);
  test_nm_events<BF16>(DType::BFloat16);
  test_nm_events<F16>(DType::Float16);
  test_tau_end_to_end();
  test_schedule_kernel();
  test_scheduled_fused_step();
  test_scheduled_events();
  return TEST_MAIN_RESULT();
}
