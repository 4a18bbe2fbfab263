"""How far two kernel backends may differ on one step from the same inputs (docs/spec.md §4,
"Across targets and backends"), the one definition that tests/test_rounding.py asserts and the GPU
benchmark's first check (benchmarks/gpu/bench_gpu.py) measures: the bound in ulp of the stored
dtype at the largest magnitude that goes into each value, the schedule that passes every stage in
20 steps, and the weights near the spike and the gradients both feed the two backends."""
from __future__ import annotations

import math

import torch

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_NORMAL_EXPONENT = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}

# One step's difference between the backends, in ulp of the stored dtype at the largest magnitude
# that goes into the value (docs/spec.md §4's s): the multiply-adds round once on one side and
# twice on the other. Most values are within 2 float32 ulp; the exponent c1 + c2·θ² (up to ~90)
# is one of them, and its ulp (7.6e-6) moves ρ0/σ0² by up to ~1e-6 relative where it is as large
# as 1/σ1², about 16 ulp of the gradient: 32 leaves a margin and stays 2.6x inside §4's 1e-5.
# 16-bit stores round those to at most 1 ulp of the dtype.
ULPS = {torch.float32: 32, torch.bfloat16: 1, torch.float16: 1}
# Every stage in 20 steps: dense for t < 3, events at t = 3 (s_i), 4, 8 and 12, the freeze at
# t_end = 20 - 4 - 1 = 15, the frozen mask after it.
SCHEDULE = dict(num_train_examples=67349, initial_warmup_steps=3, total_steps=20,
                final_warmup_steps=4, pruning_interval=4, initial_sparsity=0.3,
                final_sparsity=0.8, sigma0_sq=1e-10, sigma1_sq=0.05, lambda_mix=0.1)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |values| (float64, on the CPU); the subnormal spacing below the
    normals."""
    magnitude = values.detach().cpu().double().abs().clamp_min(torch.finfo(dtype).tiny)
    exponent = torch.floor(torch.log2(magnitude)).clamp_min(MIN_NORMAL_EXPONENT[dtype])
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def near_spike_weights(shapes, seed: int) -> list[torch.Tensor]:
    """Half of the weights with |θ| log-uniform in [1e-6, 1e-3] (the spike's range for
    σ0² = 1e-10), the rest normal(0, 0.02), every 13th exactly zero (float32, on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for shape in shapes:
        n = math.prod(shape)
        tiny = 10.0 ** (-6 + 3 * torch.rand(n, generator=generator))
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.where(torch.arange(n) % 2 == 0, sign * tiny,
                            torch.randn(n, generator=generator) * 0.02)
        theta[::13] = 0.0
        weights.append(theta.reshape(shape))
    return weights


def gradients(step: int, params, seed: int) -> list[torch.Tensor]:
    """Step `step`'s gradients, normal(0, 1e-3), float32 on the CPU."""
    generator = torch.Generator().manual_seed(seed * 1009 + step)
    return [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]


def input_scales(params, optimizer, grads, grad_scale, schedule=SCHEDULE
                 ) -> list[dict[str, torch.Tensor]]:
    """For each parameter before a step, the largest magnitudes that go into its new θ, m and v
    (docs/spec.md §4's s; float64 on the CPU): the update subtracts up to a few lr from θ, and the
    gradient includes the prior's term, at most (|θ|/n)·(ρ0/σ0² + 1/σ1²) with ρ0 at the
    smallest λ_t."""
    n, s0, s1 = schedule["num_train_examples"], schedule["sigma0_sq"], schedule["sigma1_sq"]
    lam = schedule["lambda_mix"] * 1e-3  # λ·α_f, the largest ρ0
    c1 = math.log(lam) - math.log(1 - lam) + 0.5 * math.log(s0) - 0.5 * math.log(s1)
    c2 = 1 / (2 * s0) - 1 / (2 * s1)
    scales = []
    for p, g in zip(params, grads):
        theta = p.detach().cpu().double()
        rho0 = torch.sigmoid(-(c1 + c2 * theta * theta))
        g_in = (g * (grad_scale or 1.0)).to(p.dtype).cpu().double().abs() / (grad_scale or 1.0)
        g_in = g_in + theta.abs() / n * (rho0 / s0 + 1 / s1)
        state = optimizer.state[p] if p in optimizer.state else {}
        m_old = state["exp_avg"].cpu().double().abs() if "exp_avg" in state else 0 * theta
        v_old = state["exp_avg_sq"].cpu().double() if "exp_avg_sq" in state else 0 * theta
        scales.append({"param": torch.maximum(theta.abs(), torch.full_like(theta, 4e-3)),
                       "exp_avg": torch.maximum(m_old, 0.1 * g_in),
                       "exp_avg_sq": torch.maximum(v_old, 1e-3 * g_in * g_in)})
    return scales


def ulp_bound(actual: torch.Tensor, expected: torch.Tensor,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """ULPS ulp of the dtype at the larger magnitude of the two (or at `scale`, the largest
    magnitude that went into the value, where larger); float64 on the CPU."""
    a, b = actual.detach().cpu().double(), expected.detach().cpu().double()
    magnitude = torch.maximum(a.abs(), b.abs())
    if scale is not None:
        magnitude = torch.maximum(magnitude, scale.cpu().double().reshape(magnitude.shape))
    return ULPS[actual.dtype] * ulp(magnitude, actual.dtype)


def worst_ulp_ratio(actual: torch.Tensor, expected: torch.Tensor,
                    scale: torch.Tensor | None = None, where: torch.Tensor | None = None) -> float:
    """The largest |actual − expected| / ulp_bound over the elements (at `where` only, when
    given): at most 1 within the bound. A NaN on one side only is infinitely far; NaN on both
    sides is equal."""
    a, b = actual.detach().cpu().double(), expected.detach().cpu().double()
    ratio = (a - b).abs() / ulp_bound(actual, expected, scale)
    ratio = torch.where(a.isnan() & b.isnan(), 0.0, torch.where(ratio.isnan(), math.inf, ratio))
    if where is not None:
        ratio = ratio[where.cpu()]
    return float(ratio.max()) if ratio.numel() else 0.0
