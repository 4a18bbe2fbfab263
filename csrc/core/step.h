// The per-element math of one MGPP step (docs/spec.md §2), shared by the CPU and CUDA kernels, and the
// order of operations that mgpp_kernels/backends/triton/kernels.py follows.
//
// The numerical contract is docs/spec.md §4: bounds against the float64 oracle, and the same bits
// from the same backend, build and machine whatever the thread count, the sharding or a resume.
// Each float32 operation below rounds once, in the order written, except mul_add, which rounds
// once where the target has a fused multiply-add and twice elsewhere: so builds for different
// -march targets, the CUDA kernels and the Triton kernels agree within a few ulp per operation,
// not bit for bit (csrc/tests/test_cpu_arch.cpp, tests/test_rounding.py). The exponential and
// the logistic's reciprocal are approximations whose errors docs/spec.md §4 states; the AdamW
// division and the square root are IEEE. NaN results are NaN everywhere; their payload bits
// follow the hardware.
//
// The code is branch-free scalar float32 so that the host compiler vectorises it inside
// `#pragma omp simd` loops and nvcc compiles it for the device. Never build it with -ffast-math
// or --use_fast_math: the spike posterior relies on exp overflowing to +inf. Host builds use
// -fno-trapping-math, which lets GCC turn the selects into vector blends on AVX2.
#pragma once

#include <math.h>

#include "layout.h"
#include "platform.h"

namespace MGPP_NAMESPACE {

// ---- spike-and-slab prior ---------------------------------------------------------------------

constexpr float kExpMaxFinite = 88.72283935546875f;  // ln(FLT_MAX): exp overflows above it
// Adding and subtracting 1.5·2^23 rounds |v| < 2^22 to an integer, ties to even, as rintf does.
constexpr float kRoundToInteger = 12582912.0f;

// a·b + c, rounded once where the target has a fused multiply-add (every CUDA device, x86 builds
// with FMA: x86-64-v3, native), twice elsewhere (plain x86-64). Written out wherever the math
// wants it, rather than left to the compiler's contraction (the host builds pass
// -ffp-contract=off): the vectorised loop and its scalar remainder then round alike, so a build's
// bits do not depend on where a tensor's chunks and blocks end (thread counts, sharding).
MGPP_HD float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) for the one use below, 1 / (1 + exp(x)): relative error at most 2e-7 (2.1 ulp with FMA,
// 2.3 without; docs/spec.md §4, "Approximations"). Overflow gives +inf (so the spike weight becomes exactly 0)
// and NaN stays NaN. Inputs below -86 return exp(-86) ≈ 4e-38, which leaves 1 + exp(x) == 1
// exactly, as the true value does.
MGPP_HD float exp_for_logistic(float x) {
  // NaN fails both comparisons and is clamped to -86, so that the exponent bits below are
  // defined for every input; the last line returns NaN for it.
  const float clamped = x >= -86.0f ? (x <= kExpMaxFinite ? x : kExpMaxFinite) : -86.0f;
  // shifted = 1.5·2^23 + n, n = x·log2 e rounded to an integer (|n| <= 128): n is in the low bits.
  const float shifted = mul_add(clamped, 1.44269504088896341f, kRoundToInteger);
  const float n = shifted - kRoundToInteger;
  // r = x - n·ln2 with ln2 split in two (Cody-Waite; n·0.693359375 is exact) so r keeps full
  // precision, |r| <= 0.35.
  float r = mul_add(n, -0.693359375f, clamped);
  r = mul_add(n, 2.12194440e-4f, r);
  // exp(r) on |r| <= 0.3496: a degree-5 minimax polynomial with the constant term 1 (relative
  // error 9.9e-8 with these float32 coefficients, before the evaluation's roundings).
  float p = 8.289568126e-3f;
  p = mul_add(p, r, 4.190196842e-2f);
  p = mul_add(p, r, 1.666767001e-1f);
  p = mul_add(p, r, 4.999912083e-1f);
  p = mul_add(p, r, 9.999997020e-1f);
  const float e_r = mul_add(p, r, 1.0f);
  // 2^n built in the exponent bits, as two factors so that n = 128 (exp(88.72) < FLT_MAX) does
  // not overflow the exponent: the bits of `shifted` are those of 1.5·2^23 plus n.
  const uint32_t n_bits = float_to_bits(shifted) - float_to_bits(kRoundToInteger);
  const float half_scale = bits_to_float((n_bits + 126u) << 23);
  const float result = (e_r * half_scale) * 2.0f;
  return x > kExpMaxFinite ? bits_to_float(0x7F800000u) : (x == x ? result : x);
}

// 1/d for 1 <= d < 2^125, relative error below 1.4e-7 (0.8 ulp with FMA, 1.5 without;
// docs/spec.md §4): an estimate
// from the exponent bits (relative error at most 5.1%), one Newton step (2.6e-3) and one
// third-order step (1.7e-8 before rounding). NaN gives NaN. Cheaper than a division on every
// target: the division units of the x86 cores take several times a multiply-add's slot.
MGPP_HD float reciprocal_from_one(float d) {
  float y = bits_to_float(0x7EF311C3u - float_to_bits(d));
  float e = mul_add(-d, y, 1.0f);
  y = mul_add(y, e, y);
  e = mul_add(-d, y, 1.0f);
  return mul_add(y, mul_add(e, e, e), y);
}

// Host-computed constants of the prior gradient at one schedule position (docs/spec.md §2): c1 and c2 in
// float64 on the host, then rounded to float32.
}  // namespace MGPP_NAMESPACE
namespace mgpp_abi {  // the same type in every build (csrc/core/platform.h)
struct PriorConstants {
  float c1;             // ln λ_t − ln(1 − λ_t) + ½ ln σ0² − ½ ln σ1²
  float c2;             // 1/(2σ0²) − 1/(2σ1²)
  float inv_n;          // 1/n
  float inv_sigma0_sq;  // 1/σ0²
  float inv_sigma1_sq;  // 1/σ1²
};
}  // namespace mgpp_abi
namespace MGPP_NAMESPACE {
using mgpp_abi::PriorConstants;

// The factor of θ/n in the gradient of −log prior / n at θ: ρ0/σ0² + (1 − ρ0)/σ1², ρ0 the spike's
// posterior weight.
MGPP_HD float prior_weight(float theta, const PriorConstants& prior) {
  // (c2·θ)·θ in the reference's order: z reaches ~90, where one rounding moves ρ0 by ~1e-5.
  const float denom = 1.0f + exp_for_logistic(mul_add(prior.c2 * theta, theta, prior.c1));
  // ρ0 = 1/denom, flushed to 0 where it is at most 2^-125 (an absolute error under 3e-38):
  // exactly 0 where exp overflows, as the spec requires. NaN stays NaN.
  const float rho0 = denom >= 0x1p125f ? 0.0f : reciprocal_from_one(denom);
  // Rearranged to one multiply-add.
  return mul_add(rho0, prior.inv_sigma0_sq - prior.inv_sigma1_sq, prior.inv_sigma1_sq);
}

// Gradient of −log prior / n at θ: (θ/n)·prior_weight(θ).
MGPP_HD float prior_gradient(float theta, const PriorConstants& prior) {
  const float weight = prior_weight(theta, prior);
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
  return !(theta == 0.0f || mul_add(prior.c2 * theta, theta, prior.c1) > kExpMaxFinite);
}

// ---- AdamW ------------------------------------------------------------------------------------

// Per-tensor scalars of one AdamW step; bias corrections depend on the tensor's own step count.
// 1 − β1 and 1 − β2 are rounded from float64, as torch does: 1 − (float)0.999 is 1.3e-5 off.
}  // namespace MGPP_NAMESPACE
namespace mgpp_abi {  // the same type in every build (csrc/core/platform.h)
struct AdamWScalars {
  float decay;            // 1 − lr·wd
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float step_size;        // lr / (1 − β1^k)
  float inv_bc2_sqrt;     // 1 / √(1 − β2^k)
  float eps;
};
}  // namespace mgpp_abi
namespace MGPP_NAMESPACE {
using mgpp_abi::AdamWScalars;

// torch.optim.AdamW's update (amsgrad=False, maximize=False), in its order of operations except
// that the bias correction of √v is a multiplication by a host-computed reciprocal: a division
// less per element, a difference of at most one rounding. The square root and the division stay
// IEEE: estimates from the exponent bits with Newton steps in their place measured slower (this
// loop alone in L1, Intel Xeon: 0.47 -> 0.68 ns per element on AVX-512, 0.50 -> 1.1 on AVX2;
// they add about 20 dependent operations to each element's chain).
MGPP_HD void adamw_update(float& theta, float& exp_avg, float& exp_avg_sq, float grad,
                          const AdamWScalars& s) {
  theta = theta * s.decay;
  // torch's lerp: from the nearer end, so that β1 = 0 (weight 1) gives m = g exactly.
  const float weight = s.one_minus_beta1;
  const float difference = grad - exp_avg;
  exp_avg = weight < 0.5f ? mul_add(weight, difference, exp_avg)
                          : mul_add(-difference, 1.0f - weight, grad);
  exp_avg_sq = mul_add(exp_avg_sq, s.beta2, s.one_minus_beta2 * (grad * grad));
  const float denom = mul_add(sqrtf(exp_avg_sq), s.inv_bc2_sqrt, s.eps);
  theta = mul_add(-s.step_size, exp_avg / denom, theta);
}

// ---- one element of the fused step ------------------------------------------------------------

// The prior term step_element adds: none (the prior is off), the spike-and-slab gradient, or the
// slab's alone (equal to it where prior_uses_spike is false: the CPU kernel's fast path).
enum class PriorTerm { kNone, kSpikeAndSlab, kSlab };

// step_gradient's spike-and-slab term with prior_weight(θ) computed before (the CPU kernel
// computes it only for the weights where prior_uses_spike is true, and 1/σ1² for the others).
MGPP_HD float weighted_step_gradient(float theta, float grad, float inv_grad_scale, float weight,
                                     const PriorConstants& prior) {
  return mul_add(grad, inv_grad_scale, (theta * prior.inv_n) * weight);
}

// The first half of a fused step: the gradient AdamW sees, unscaled with the prior term added.
template <PriorTerm kPrior>
MGPP_HD float step_gradient(float theta, float grad, float inv_grad_scale,
                            const PriorConstants& prior) {
  if constexpr (kPrior == PriorTerm::kSpikeAndSlab) {
    return mul_add(grad, inv_grad_scale, prior_gradient(theta, prior));
  } else if constexpr (kPrior == PriorTerm::kSlab) {
    return mul_add(grad, inv_grad_scale, slab_prior_gradient(theta, prior));
  } else {
    return grad * inv_grad_scale;
  }
}

// The second half: AdamW with that gradient, then the frozen mask (keep false: θ = 0).
MGPP_HD void step_update(float& theta, float& exp_avg, float& exp_avg_sq, float g, bool keep,
                         const AdamWScalars& adamw) {
  adamw_update(theta, exp_avg, exp_avg_sq, g, adamw);
  theta = keep ? theta : 0.0f;
}

// One element of a fused step (docs/spec.md §2) on its values loaded as float32: the gradient
// unscaled, the prior gradient added, AdamW, then the frozen mask. The CUDA kernels call this, the
// CPU kernels its two halves (for bfloat16 storage, the spike path's in two loops); they differ
// only in how they load, store and count.
template <PriorTerm kPrior>
MGPP_HD void step_element(float& theta, float& exp_avg, float& exp_avg_sq, float grad, bool keep,
                          float inv_grad_scale, const PriorConstants& prior,
                          const AdamWScalars& adamw) {
  step_update(theta, exp_avg, exp_avg_sq, step_gradient<kPrior>(theta, grad, inv_grad_scale, prior),
              keep, adamw);
}

// ---- from the step scalars --------------------------------------------------------------------

// One step's per-tensor AdamW scalars and prior constants from the float64 step scalars
// (StepScalar) and the tensor's step count k, this step included: float64 math, then float32.
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

}  // namespace MGPP_NAMESPACE
