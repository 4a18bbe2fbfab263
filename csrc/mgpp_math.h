// The per-element math of one MGPP step (SPEC §2), shared by the CPU and CUDA kernels.
//
// Everything here is branch-free scalar code on float32 so that the host compiler vectorises it
// inside `#pragma omp simd` loops and nvcc compiles the same source for the device. It must be
// built without -ffast-math / --use_fast_math: the spike posterior relies on exp overflowing to
// +inf and on IEEE rounding in the float16 conversions. Host builds use -fno-trapping-math, which
// lets GCC turn the selects below into vector blends on targets without mask registers (AVX2).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MGPP_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#include <string.h>
#define MGPP_HD inline
#endif

namespace mgpp {

MGPP_HD uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(uint32_t, x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MGPP_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// ---- storage formats -------------------------------------------------------------------------
// Parameters and state are stored as float32, bfloat16 or float16; all math is float32. The
// 16-bit conversions are written out in integer and exact float operations so that every
// compiler and the Triton interpreter produce the same bits (round to nearest even).

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
  const uint32_t out = (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign);
  return static_cast<uint16_t>(out);
}

// ---- ranking key ------------------------------------------------------------------------------
// For non-negative IEEE floats the bit pattern orders like the value, so |θ| is ranked by its
// float32 bits without the sign. Every storage format converts to float32 exactly, so one key
// space ranks tensors of mixed dtypes. NaN keys sort above +inf, as NaN does in torch.kthvalue.

constexpr int kHistHighBits = 16;  // first radix level: key bits 30..15
constexpr int kHistLowBits = 15;   // second radix level: key bits 14..0
constexpr uint32_t kHistHighBins = 1u << kHistHighBits;
constexpr uint32_t kHistLowBins = 1u << kHistLowBits;
constexpr uint32_t kNaNKeyFloor = 0x7F800001u;

MGPP_HD uint32_t abs_key(float x) { return float_to_bits(x) & 0x7FFFFFFFu; }
MGPP_HD uint32_t key_high_bin(uint32_t key) { return key >> kHistLowBits; }
MGPP_HD uint32_t key_low_bin(uint32_t key) { return key & (kHistLowBins - 1u); }

// |θ| < τ in key space. Comparisons with a NaN τ are false, as in torch.
MGPP_HD bool below_threshold(uint32_t key, uint32_t tau_key) {
  return key < tau_key && tau_key < kNaNKeyFloor;
}

// Radix selection of τ, the k-th smallest key. Its state is three int64 in memory (on the device
// for the GPU backends, so that no step reads it back to the host):
//   [kSelRank]  1-indexed rank of τ among the keys still in play (starts at k),
//   [kSelKey]   τ's key bits fixed so far (after level 1: τ's key),
//   [kSelBelow] number of keys known to be smaller than τ.
// Level 0 narrows to one high bin; level 1 to one low bin inside it. Keys of bfloat16 values have
// zero low bits, so when every candidate is bfloat16, τ is exact after level 0.
constexpr int kSelRank = 0;
constexpr int kSelKey = 1;
constexpr int kSelBelow = 2;

MGPP_HD void select_bin(const int64_t* histogram, int level, int64_t* selection) {
  const uint32_t bins = level == 0 ? kHistHighBins : kHistLowBins;
  const int64_t rank = selection[kSelRank];
  int64_t before = 0;
  uint32_t bin = 0;
  for (; bin + 1 < bins; ++bin) {
    if (before + histogram[bin] >= rank) break;
    before += histogram[bin];
  }
  selection[kSelRank] = rank - before;
  if (level == 0) {
    selection[kSelKey] = static_cast<int64_t>(bin) << kHistLowBits;
    selection[kSelBelow] = before;
  } else {
    selection[kSelKey] |= bin;
    selection[kSelBelow] += before;
  }
}

// ---- spike-and-slab prior ---------------------------------------------------------------------

// a·b + c, fused where the target has FMA (one rounding; fewer instructions in the polynomial).
MGPP_HD float multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

constexpr float kExpMaxFinite = 88.72283935546875f;  // ln(FLT_MAX): exp overflows above it

// exp(x), within 2 ulp, for the one use below: 1 / (1 + exp(x)). Overflow gives +inf (so the
// spike weight becomes exactly 0) and NaN stays NaN. Inputs below -86 return exp(-86) ≈ 4e-38,
// which leaves 1 + exp(x) == 1 exactly, as the true value does.
MGPP_HD float exp_for_logistic(float x) {
  // NaN fails both comparisons and flows through unchanged.
  const float clamped = x < -86.0f ? -86.0f : (x > kExpMaxFinite ? kExpMaxFinite : x);
  const float n = rintf(clamped * 1.44269504088896341f);
  // r = x - n·ln2 with ln2 split in two (Cody-Waite) so r keeps full precision.
  float r = multiply_add(n, -0.693359375f, clamped);
  r = multiply_add(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = multiply_add(p, r, 1.3981999507e-3f);
  p = multiply_add(p, r, 8.3334519073e-3f);
  p = multiply_add(p, r, 4.1665795894e-2f);
  p = multiply_add(p, r, 1.6666665459e-1f);
  p = multiply_add(p, r, 5.0000001201e-1f);
  const float e_r = multiply_add(p, r * r, r) + 1.0f;
  // 2^n as two factors so that n = 128 (exp(88.72) < FLT_MAX) does not overflow the exponent.
  const int32_t ni = static_cast<int32_t>(n);
  const float half_scale = bits_to_float(static_cast<uint32_t>(ni + 126) << 23);
  const float result = (e_r * half_scale) * 2.0f;
  return x > kExpMaxFinite ? bits_to_float(0x7F800000u) : result;
}

// Host-computed constants of the prior gradient at one schedule position (SPEC §2): c1 and c2 in
// float64 on the host, then rounded to float32.
struct PriorConstants {
  float c1;             // ln λ_t − ln(1 − λ_t) + ½ ln σ0² − ½ ln σ1²
  float c2;             // 1/(2σ0²) − 1/(2σ1²)
  float inv_n;          // 1/n
  float inv_sigma0_sq;  // 1/σ0²
  float inv_sigma1_sq;  // 1/σ1²
};

// Gradient of −log prior / n at θ: (θ/n)·(ρ0/σ0² + (1 − ρ0)/σ1²), ρ0 the spike's posterior weight.
MGPP_HD float prior_gradient(float theta, const PriorConstants& prior) {
  // (c2·θ)·θ in the reference's order: z reaches ~90, where one rounding moves ρ0 by ~1e-5.
  const float rho0 = 1.0f / (1.0f + exp_for_logistic(prior.c1 + (prior.c2 * theta) * theta));
  // ρ0/σ0² + (1 − ρ0)/σ1², rearranged to one multiply-add.
  const float weight = prior.inv_sigma1_sq + rho0 * (prior.inv_sigma0_sq - prior.inv_sigma1_sq);
  return (theta * prior.inv_n) * weight;
}

// The slab's term alone, (θ/n)/σ1²: what prior_gradient returns, bit for bit, wherever
// prior_uses_spike is false (given a finite 1/σ0² − 1/σ1²).
MGPP_HD float slab_prior_gradient(float theta, const PriorConstants& prior) {
  return (theta * prior.inv_n) * prior.inv_sigma1_sq;
}

// False where the spike cannot change prior_gradient: θ = ±0 (the gradient is ±0 whatever ρ0 is),
// or exp overflows to +inf so that ρ0 is exactly 0. NaN counts as using the spike. The CPU kernel
// skips the exponential and a division for runs of such weights, usually most of a model.
MGPP_HD bool prior_uses_spike(float theta, const PriorConstants& prior) {
  return !(theta == 0.0f || prior.c1 + (prior.c2 * theta) * theta > kExpMaxFinite);
}

// Layout of the float64 scalars tensor of one fused step. It lives on the parameters' device so
// that GPU kernels read lr and λ_t's constants from memory (mgpp_kernels/_scalars.py mirrors it).
enum StepScalar : int {
  kLr = 0,
  kBeta1,
  kBeta2,
  kEps,
  kWeightDecay,
  kPriorOn,  // 1.0 while the prior is on, else 0.0
  kPriorC1,
  kPriorC2,
  kPriorInvN,
  kPriorInvSigma0Sq,
  kPriorInvSigma1Sq,
  kNumStepScalars
};

// ---- AdamW ------------------------------------------------------------------------------------

// Per-tensor scalars of one AdamW step; bias corrections depend on the tensor's own step count.
// 1 − β1 and 1 − β2 are rounded from float64, as torch does: 1 − (float)0.999 is 1.3e-5 off.
struct AdamWScalars {
  float decay;            // 1 − lr·wd
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float step_size;        // lr / (1 − β1^k)
  float inv_bc2_sqrt;     // 1 / √(1 − β2^k)
  float eps;
};

// torch.optim.AdamW's update (amsgrad=False, maximize=False), in its order of operations except
// that the bias correction of √v is a multiplication by a host-computed reciprocal: a division
// less per element, a difference of at most one rounding.
MGPP_HD void adamw_update(float& theta, float& exp_avg, float& exp_avg_sq, float grad,
                          const AdamWScalars& s) {
  theta = theta * s.decay;
  // torch's lerp: from the nearer end, so that β1 = 0 (weight 1) gives m = g exactly.
  const float weight = s.one_minus_beta1;
  exp_avg = weight < 0.5f ? exp_avg + weight * (grad - exp_avg)
                          : grad - (grad - exp_avg) * (1.0f - weight);
  exp_avg_sq = exp_avg_sq * s.beta2 + s.one_minus_beta2 * (grad * grad);
  const float denom = sqrtf(exp_avg_sq) * s.inv_bc2_sqrt + s.eps;
  theta = theta - s.step_size * (exp_avg / denom);
}

// One step's per-tensor AdamW scalars and prior constants from the float64 step scalars
// (StepScalar) and the tensor's step count k, this step included: float64 math, then float32.
// The CPU op and the CUDA kernels both call these.
MGPP_HD AdamWScalars adamw_scalars(const double* scalars, double k) {
  const double lr = scalars[kLr];
  const double beta1 = scalars[kBeta1];
  const double beta2 = scalars[kBeta2];
  return AdamWScalars{static_cast<float>(1.0 - lr * scalars[kWeightDecay]),
                      static_cast<float>(1.0 - beta1),
                      static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2),
                      static_cast<float>(lr / (1.0 - pow(beta1, k))),
                      static_cast<float>(1.0 / sqrt(1.0 - pow(beta2, k))),
                      static_cast<float>(scalars[kEps])};
}

MGPP_HD PriorConstants prior_constants(const double* scalars) {
  return PriorConstants{static_cast<float>(scalars[kPriorC1]), static_cast<float>(scalars[kPriorC2]),
                        static_cast<float>(scalars[kPriorInvN]),
                        static_cast<float>(scalars[kPriorInvSigma0Sq]),
                        static_cast<float>(scalars[kPriorInvSigma1Sq])};
}

}  // namespace mgpp
