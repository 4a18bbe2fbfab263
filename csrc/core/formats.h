// The storage formats of parameters and state (float32, bfloat16, float16) and the one dispatch
// from a runtime dtype to them. All math is float32: a format only loads and stores.
#pragma once

#include <stdexcept>
#include <string>

#include "platform.h"

namespace MGPP_NAMESPACE {

// The 16-bit conversions are written out in integer and exact float operations so that every
// compiler, the device and the Triton kernels produce the same bits (round to nearest even).

MGPP_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

MGPP_HD uint16_t float_to_bf16_bits(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);  // one canonical NaN
}

MGPP_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal and inf/NaN inputs: move exponent and mantissa into place and rebias by 2^-112.
  const float normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * bits_to_float(0x07800000u);
  // Subnormal inputs: the mantissa as the low bits of 0.5 · 2^k, minus 0.5.
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(subnormal) : float_to_bits(normal);
  return bits_to_float(sign | magnitude);
}

MGPP_HD uint16_t float_to_f16_bits(float x) {
  // Scale up then down by powers of two so that float rounding does the round-to-nearest-even
  // at float16's precision, including overflow to inf and gradual underflow.
  const float scale_to_inf = bits_to_float(0x77800000u);   // 2^112
  const float scale_to_zero = bits_to_float(0x08800000u);  // 2^-110
  const uint32_t w = float_to_bits(x);
  const float magnitude = bits_to_float(w & 0x7FFFFFFFu);
  float base = (magnitude * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  // NaN: quieted, its payload's high bits kept, as the conversion instructions do (x86
  // vcvtps2ph), so that a vector loop and its scalar remainder give the same bits.
  const uint32_t nan = 0x7E00u | ((w >> 13) & 0x03FFu);
  const uint32_t out = (sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign);
  return static_cast<uint16_t>(out);
}

// The dtypes of the kernel interfaces, X(enumerator, name in layout()), in the order of their codes
// 0, 1, 2. The Triton kernels use the same codes; mgpp_kernels/ops/layout.py's KERNEL_DTYPES
// lists them in this order and is checked against torch.ops.mgpp.layout() at import.
#define MGPP_KERNEL_DTYPES(X) \
  X(Float32, float32)         \
  X(BFloat16, bfloat16)       \
  X(Float16, float16)

}  // namespace MGPP_NAMESPACE
namespace mgpp_abi {  // the same types in every build (csrc/core/platform.h)
#define MGPP_ENUMERATOR(enumerator, name) enumerator,
enum class DType : int { MGPP_KERNEL_DTYPES(MGPP_ENUMERATOR) };
#undef MGPP_ENUMERATOR

// One contiguous tensor of `numel` elements in one format (host or device memory).
struct ValueTensor {
  void* data;
  int64_t numel;
};

// The pattern of a pruning event's pool: N:M, whose candidates are the M − N smallest |x| of each
// group of M consecutive elements (csrc/core/selection.h), or m = 0 for an unstructured pool.
struct Pattern {
  int n;
  int m;
};
}  // namespace mgpp_abi
namespace MGPP_NAMESPACE {
using mgpp_abi::DType;
using mgpp_abi::Pattern;
using mgpp_abi::ValueTensor;

// A format: its storage type T and the exact widening to / rounding from float32.
struct F32 {
  using T = float;
  static MGPP_HD float load(T x) { return x; }
  static MGPP_HD T store(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static MGPP_HD float load(T x) { return bf16_bits_to_float(x); }
  static MGPP_HD T store(float x) { return float_to_bf16_bits(x); }
};
struct F16 {
  using T = uint16_t;
  static MGPP_HD float load(T x) { return f16_bits_to_float(x); }
  static MGPP_HD T store(float x) { return float_to_f16_bits(x); }
};

// Calls fn(Format{}) for the format of `dtype`; an unknown code is an error, never a no-op.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(F32{}); return;
    case DType::BFloat16: fn(BF16{}); return;
    case DType::Float16: fn(F16{}); return;
  }
  throw std::invalid_argument("mgpp: unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

// Calls fn(Param{}, State{}) for a fused step's parameter and state dtypes. The state is float32
// or the parameter's dtype; any other pair is an error.
template <typename Fn>
void dispatch_step_dtypes(DType param_dtype, DType state_dtype, Fn&& fn) {
  if (state_dtype != DType::Float32 && state_dtype != param_dtype) {
    throw std::invalid_argument("mgpp: the state dtype must be float32 or the parameter's dtype");
  }
  dispatch_dtype(param_dtype, [&](auto param_format) {
    if (state_dtype == DType::Float32) {
      fn(param_format, F32{});
    } else {
      fn(param_format, param_format);
    }
  });
}

}  // namespace MGPP_NAMESPACE
