// The per-element math of one MGPP step (docs/spec.md §2), shared by the CPU and CUDA kernels, and the
// order of operations that mgpp_kernels/backends/triton/kernels.py follows.
//
// One rounding recipe on every target: each float32 operation below rounds once, in the order
// written. No fused multiply-add anywhere (the builds pass -ffp-contract=off and --fmad=false,
// and the Triton kernels launch with enable_fp_fusion=False); division and square root are
// IEEE; rounding to an integer adds and subtracts 1.5·2^23, as the Triton kernels do, rather
// than calling rintf. So a CPU build gives the same bits whatever its -march, the CUDA kernels
// the CPU's bits, and the Triton kernels those too (csrc/tests/test_cpu_arch.cpp,
// tests/test_rounding.py). NaN results are NaN everywhere; their payload bits follow the hardware.
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

// exp(x), within 1 ulp, for the one use below: 1 / (1 + exp(x)). Overflow gives +inf (so the
// spike weight becomes exactly 0) and NaN stays NaN. Inputs below -86 return exp(-86) ≈ 4e-38,
// which leaves 1 + exp(x) == 1 exactly, as the true value does.
MGPP_HD float exp_for_logistic(float x) {
  // NaN fails both comparisons and is clamped to -86, so that the integer conversion below is
  // defined for every input; the last line returns NaN for it.
  const float clamped = x >= -86.0f ? (x <= kExpMaxFinite ? x : kExpMaxFinite) : -86.0f;
  const float n = (clamped * 1.44269504088896341f + kRoundToInteger) - kRoundToInteger;
  // r = x - n·ln2 with ln2 split in two (Cody-Waite) so r keeps full precision.
  float r = n * -0.693359375f + clamped;
  r = n * 2.12194440e-4f + r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = (p * (r * r) + r) + 1.0f;
  // 2^n as two factors so that n = 128 (exp(88.72) < FLT_MAX) does not overflow the exponent.
  const int32_t ni = static_cast<int32_t>(n);
  const float half_scale = bits_to_float(static_cast<uint32_t>(ni + 126) << 23);
  const float result = (e_r * half_scale) * 2.0f;
  return x > kExpMaxFinite ? bits_to_float(0x7F800000u) : (x == x ? result : x);
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

// Gradient of −log prior / n at θ: (θ/n)·(ρ0/σ0² + (1 − ρ0)/σ1²), ρ0 the spike's posterior weight.
MGPP_HD float prior_gradient(float theta, const PriorConstants& prior) {
  // (c2·θ)·θ in the reference's order: z reaches ~90, where one rounding moves ρ0 by ~1e-5.
  const float rho0 = 1.0f / (1.0f + exp_for_logistic(prior.c1 + (prior.c2 * theta) * theta));
  // ρ0/σ0² + (1 − ρ0)/σ1², rearranged to one multiply and one add.
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

// ---- one element of the fused step ------------------------------------------------------------

// The prior term step_element adds: none (the prior is off), the spike-and-slab gradient, or the
// slab's alone (equal to it where prior_uses_spike is false: the CPU kernel's fast path).
enum class PriorTerm { kNone, kSpikeAndSlab, kSlab };

// The first half of a fused step: the gradient AdamW sees, unscaled with the prior term added.
template <PriorTerm kPrior>
MGPP_HD float step_gradient(float theta, float grad, float inv_grad_scale,
                            const PriorConstants& prior) {
  float g = grad * inv_grad_scale;
  if constexpr (kPrior == PriorTerm::kSpikeAndSlab) g = g + prior_gradient(theta, prior);
  if constexpr (kPrior == PriorTerm::kSlab) g = g + slab_prior_gradient(theta, prior);
  return g;
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
