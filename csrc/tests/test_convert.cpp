// The block conversions of csrc/cpu/convert.h against the scalar functions of csrc/core/formats.h,
// bit for bit: widening over all 65,536 patterns of bfloat16 and of float16, narrowing to float16
// over the float32 edge cases (ties at both formats' rounding bit, NaN payloads of either sign, ±0,
// denormals, overflow to inf) and random patterns, at every block length and offset that reaches
// the vector bodies and their scalar tails. CMake builds this test for the native target (the
// AVX-512 paths where the host has them), for x86-64-v3 (AVX2 and F16C) and for
// x86-64 (the portable path).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/convert.h"

using namespace mgpp;

namespace {

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

template <typename F>
void check_widen(const char* name) {
  std::vector<uint16_t> patterns(1 << 16);
  for (uint32_t h = 0; h < patterns.size(); ++h) patterns[h] = static_cast<uint16_t>(h);
  // Every pattern through the whole-array call, then short calls at every offset for the tails.
  std::vector<float> out(patterns.size());
  cpu::widen(F{}, patterns.data(), out.data(), static_cast<int64_t>(patterns.size()));
  int wrong = 0;
  for (uint32_t h = 0; h < patterns.size(); ++h) {
    const uint32_t expected = bits(F::load(patterns[h]));
    if (bits(out[h]) != expected && ++wrong <= 5) {
      CHECK(false, "%s widen 0x%04X: 0x%08X, scalar 0x%08X", name, h, bits(out[h]), expected);
    }
  }
  CHECK(wrong == 0, "%s widen: %d of 65536 patterns differ", name, wrong);
  for (int64_t length = 1; length <= 40; ++length) {
    for (int64_t offset = 0; offset < 3; ++offset) {
      std::vector<float> part(length);
      const int64_t start = 0x7C00 - 20 + offset;  // around float16's inf and NaNs
      cpu::widen(F{}, patterns.data() + start, part.data(), length);
      for (int64_t i = 0; i < length; ++i) {
        CHECK(bits(part[i]) == bits(F::load(patterns[start + i])), "%s widen, length %lld",
              name, static_cast<long long>(length));
      }
    }
  }
}

// float32 inputs that exercise the rounding of both 16-bit formats.
std::vector<float> narrowing_inputs() {
  std::vector<uint32_t> low = {0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2FFF,
                               0x3000, 0x3001, 0x5000, 0x7000, 0x7FFF, 0x8000, 0x8001, 0x9000,
                               0xBFFF, 0xC000, 0xE000, 0xF000, 0xFFFF};
  std::vector<float> inputs;
  // Every sign, exponent and 7 high mantissa bits (the bfloat16 patterns) with low halves at
  // and around both formats' ties: denormals, ±0, inf, NaNs of every high payload included.
  for (uint32_t high = 0; high < (1u << 16); ++high) {
    for (uint32_t l : low) inputs.push_back(from_bits(high << 16 | l));
  }
  // float16's range edges: its largest finite, the overflow tie, its smallest denormal.
  for (uint32_t u : {0x477FE000u, 0x477FEFFFu, 0x477FF000u, 0x477FF001u, 0x47800000u, 0x33800000u,
                     0x33000000u, 0x33000001u, 0x337FFFFFu, 0x38800000u, 0x387FFFFFu, 0x7F7FFFFFu,
                     0x7F7F8000u, 0x7F7F7FFFu, 0x00000001u, 0x007FFFFFu, 0x7F800001u,
                     0x7FBFFFFFu, 0x7FC00001u, 0xFFFFFFFFu, 0xFF800001u}) {
    inputs.push_back(from_bits(u));
    inputs.push_back(from_bits(u ^ 0x80000000u));
  }
  std::mt19937 rng(3);
  for (int i = 0; i < (1 << 22); ++i) inputs.push_back(from_bits(static_cast<uint32_t>(rng())));
  return inputs;
}

template <typename F>
void check_narrow(const char* name, const std::vector<float>& inputs) {
  std::vector<uint16_t> out(inputs.size());
  cpu::narrow(F{}, inputs.data(), out.data(), static_cast<int64_t>(inputs.size()));
  int wrong = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const uint16_t expected = F::store(inputs[i]);
    if (out[i] != expected && ++wrong <= 5) {
      CHECK(false, "%s narrow 0x%08X: 0x%04X, scalar 0x%04X", name, bits(inputs[i]), out[i],
            expected);
    }
  }
  CHECK(wrong == 0, "%s narrow: %d of %zu inputs differ", name, wrong, inputs.size());
  // Short calls: NaN and denormal lanes at every position of a vector and in the tails.
  std::vector<float> mixed = {from_bits(0x7F800001u), 1.0f, from_bits(0x00000001u), -0.0f,
                              from_bits(0xFFC12345u), 65520.0f, from_bits(0x80700000u), 3.0e38f};
  for (int64_t length = 1; length <= 40; ++length) {
    for (int64_t offset = 0; offset < 8; ++offset) {
      std::vector<float> in(length);
      for (int64_t i = 0; i < length; ++i) in[i] = mixed[(i + offset) % mixed.size()];
      std::vector<uint16_t> part(length);
      cpu::narrow(F{}, in.data(), part.data(), length);
      for (int64_t i = 0; i < length; ++i) {
        CHECK(part[i] == F::store(in[i]), "%s narrow of 0x%08X, length %lld", name, bits(in[i]),
              static_cast<long long>(length));
      }
    }
  }
}

// The scalar recipe itself at a few points where the answer is known.
void check_known_values() {
  CHECK(float_to_bf16_bits(from_bits(0x3F808000u)) == 0x3F80, "bf16 tie rounds to even (down)");
  CHECK(float_to_bf16_bits(from_bits(0x3F818000u)) == 0x3F82, "bf16 tie rounds to even (up)");
  CHECK(float_to_bf16_bits(from_bits(0xFF812345u)) == 0x7FC0, "bf16 NaN is canonical");
  CHECK(float_to_bf16_bits(from_bits(0x00018000u)) == 0x0002, "bf16 keeps denormals");
  CHECK(float_to_bf16_bits(from_bits(0x7F7FFFFFu)) == 0x7F80, "bf16 overflows to inf");
  CHECK(float_to_f16_bits(65520.0f) == 0x7C00, "f16 overflow tie goes to inf");
  CHECK(float_to_f16_bits(65519.0f) == 0x7BFF, "f16 largest finite");
  CHECK(float_to_f16_bits(from_bits(0x33000000u)) == 0x0000, "f16 tie at half its denormal");
  CHECK(float_to_f16_bits(from_bits(0x33000001u)) == 0x0001, "f16 smallest denormal");
  CHECK(float_to_f16_bits(from_bits(0xFFC12345u)) == 0xFE09, "f16 NaN keeps its sign and payload");
  CHECK(float_to_f16_bits(from_bits(0x7F812345u)) == 0x7E09, "f16 signaling NaN is quieted");
}

}  // namespace

int main() {
  std::printf("conversion paths: %s\n", cpu::kConversionPaths);
  check_known_values();
  check_widen<BF16>("bf16");
  check_widen<F16>("f16");
  const std::vector<float> inputs = narrowing_inputs();
  check_narrow<F16>("f16", inputs);
  return TEST_MAIN_RESULT();
}
