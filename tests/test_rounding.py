"""The same math on two backends (csrc/core/step.h; docs/spec.md §4, "Across targets"): the
Triton kernels, run by the interpreter on CPU tensors, agree with the cpu backend within a few ulp
of the stored dtype, step after step through every stage of the schedule, on weights near the
spike. Each step starts both runs from the cpu run's values, so that the bound is one step's. The
interpreter rounds tl.fma twice where a native cpu build fuses it, so the results are not
bit-identical. The comparison treats a NaN against a finite value as a difference."""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import mgpp_kernels
from compare import ulp
from mgpp_kernels import MGPP

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(not {"cpu", "triton"} <= set(mgpp_kernels.available_backends()),
                       reason="needs the cpu backend (the extension) and the triton backend"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 (the kernels on CPU tensors)"),
]

SHAPES = [(1,), (7,), (4097,)]
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


def near_spike_weights(shapes, seed: int) -> list[torch.Tensor]:
    """Half of the weights with |θ| log-uniform in [1e-6, 1e-3] (the spike's range for
    σ0² = 1e-10), the rest normal(0, 0.02), every 13th exactly zero."""
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
    generator = torch.Generator().manual_seed(seed * 1009 + step)
    return [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]


def optimizer_for(backend: str, weights, dtype, state_dtype, **overrides):
    params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in weights]
    kwargs = dict(lr=1e-3, weight_decay=0.01, state_dtype=state_dtype, **SCHEDULE)
    kwargs.update(overrides)
    return params, MGPP([{"params": params, "prune": True}], backend=backend, **kwargs)


def step_both(runs, grads, grad_scale):
    for params, optimizer in runs:
        for p, g in zip(params, grads):
            p.grad = (g * (grad_scale or 1.0)).to(p.dtype)
        if grad_scale is not None:
            optimizer.grad_scale = torch.tensor(grad_scale)
        optimizer.step()


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, what: str,
                       scale: torch.Tensor | None = None) -> None:
    """|actual − expected| ≤ ULPS ulp of the dtype at the larger magnitude (or at `scale`, the
    largest magnitude that went into the value, where larger), NaN where the other is NaN (and
    nowhere else); integer tensors (masks, step counts) equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    a, b = actual.double(), expected.double()
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN at different places"
    finite = ~a.isnan()
    magnitude = torch.maximum(a.abs(), b.abs())
    if scale is not None:
        magnitude = torch.maximum(magnitude, scale.double().reshape(magnitude.shape))
    bound = ULPS[actual.dtype] * ulp(magnitude, actual.dtype)
    differ = finite & ~((a - b).abs() <= bound)
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements beyond "
                              f"{ULPS[actual.dtype]} ulp, first at "
                              f"{differ.flatten().nonzero()[0].item()}")


def input_scales(run, grads, grad_scale) -> list[dict[str, torch.Tensor]]:
    """For each parameter before a step, the largest magnitudes that go into its new θ, m and v
    (docs/spec.md §4's s): the update subtracts up to a few lr from θ, and the gradient includes
    the prior's term, at most (|θ|/n)·(ρ0/σ0² + 1/σ1²) with ρ0 at the smallest λ_t."""
    params, optimizer = run
    n, s0, s1 = SCHEDULE["num_train_examples"], SCHEDULE["sigma0_sq"], SCHEDULE["sigma1_sq"]
    lam = SCHEDULE["lambda_mix"] * 1e-3  # λ·α_f, the largest ρ0
    c1 = math.log(lam) - math.log(1 - lam) + 0.5 * math.log(s0) - 0.5 * math.log(s1)
    c2 = 1 / (2 * s0) - 1 / (2 * s1)
    scales = []
    for p, g in zip(params, grads):
        theta = p.detach().double()
        rho0 = torch.sigmoid(-(c1 + c2 * theta * theta))
        g_in = (g * (grad_scale or 1.0)).to(p.dtype).double().abs() / (grad_scale or 1.0)
        g_in = g_in + theta.abs() / n * (rho0 / s0 + 1 / s1)
        state = optimizer.state[p] if p in optimizer.state else {}
        m_old = state["exp_avg"].double().abs() if "exp_avg" in state else 0 * theta
        v_old = state["exp_avg_sq"].double() if "exp_avg_sq" in state else 0 * theta
        scales.append({"param": torch.maximum(theta.abs(), torch.full_like(theta, 4e-3)),
                       "exp_avg": torch.maximum(m_old, 0.1 * g_in),
                       "exp_avg_sq": torch.maximum(v_old, 1e-3 * g_in * g_in)})
    return scales


def assert_runs_within_ulps(cpu_run, triton_run, what, scales=None):
    """The triton run within ULPS of the cpu run, then set to the cpu run's values, so that the
    next step starts both from the same state."""
    for i, (a, b) in enumerate(zip(triton_run[0], cpu_run[0])):
        scale = scales[i] if scales else {}
        assert_within_ulps(a.detach(), b.detach(), f"{what}: param {i}", scale.get("param"))
        state_a, state_b = triton_run[1].state[a], cpu_run[1].state[b]
        assert state_a.keys() == state_b.keys(), f"{what}: param {i} state keys"
        for key in state_a:
            assert_within_ulps(state_a[key], state_b[key], f"{what}: param {i} {key}",
                               scale.get(key))
            state_a[key].copy_(state_b[key])
        with torch.no_grad():
            a.copy_(b)


@pytest.mark.parametrize("grad_scale,weight_decay", [(None, 0.01), (1024.0, 0.0)])
def test_triton_steps_as_the_cpu_backend_within_ulps_in_fp32(grad_scale, weight_decay):
    weights = near_spike_weights(SHAPES, seed=1)
    cpu_run = optimizer_for("cpu", weights, torch.float32, torch.float32, weight_decay=weight_decay)
    triton_run = optimizer_for("triton", weights, torch.float32, torch.float32,
                               weight_decay=weight_decay)
    for t in range(SCHEDULE["total_steps"]):
        grads = gradients(t, weights, seed=2)
        scales = input_scales(cpu_run, grads, grad_scale)
        step_both([cpu_run, triton_run], grads, grad_scale)
        assert_runs_within_ulps(cpu_run, triton_run, f"step {t}", scales)
    params, optimizer = cpu_run
    # The run went through every stage: the freeze left masks pruning 0.8 of the weights (ties
    # at exact zeros aside), and the prior moved weights near the spike.
    masks = [optimizer.state[p]["keep_mask"] for p in params]
    assert all(m.dtype == torch.uint8 for m in masks)
    assert optimizer.stats()["step"] == SCHEDULE["total_steps"]
    zeros = sum(int((p == 0).sum()) for p in params)
    numel = sum(p.numel() for p in params)
    assert 0.79 * numel <= zeros <= int(0.8 * numel)


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.bfloat16, "param"),
                                               (torch.float16, "param")])
def test_triton_steps_as_the_cpu_backend_within_ulps_in_16_bit_storage(dtype, state_dtype):
    weights = near_spike_weights(SHAPES, seed=3)
    cpu_run = optimizer_for("cpu", weights, dtype, state_dtype)
    triton_run = optimizer_for("triton", weights, dtype, state_dtype)
    for t in range(5):  # dense, then the first two events
        grads = gradients(t, weights, seed=4)
        scales = input_scales(cpu_run, grads, None)
        step_both([cpu_run, triton_run], grads, None)
        assert_runs_within_ulps(cpu_run, triton_run, f"step {t}", scales)


def test_nan_weights_and_gradients_give_nan_at_the_same_places():
    weights = near_spike_weights(SHAPES, seed=5)
    weights[2].view(-1)[1::97] = float("nan")
    cpu_run = optimizer_for("cpu", weights, torch.float32, torch.float32)
    triton_run = optimizer_for("triton", weights, torch.float32, torch.float32)
    grads = gradients(0, weights, seed=6)
    grads[1][3] = float("nan")
    with warnings.catch_warnings():
        # A NaN θ is never converted to an integer (the exponential clamps it first).
        warnings.filterwarnings("error", message=".*cast", category=RuntimeWarning)
        scales = input_scales(cpu_run, grads, None)
        step_both([cpu_run, triton_run], grads, None)
    assert_runs_within_ulps(cpu_run, triton_run, "one step with NaNs", scales)
    updated = triton_run[0]
    assert int(updated[2].isnan().sum()) == int(weights[2].isnan().sum()) == 43
    assert updated[1].isnan().tolist() == [False, False, False, True, False, False, False]
    assert updated[0].isfinite().all()


def test_the_ulp_comparison_fails_on_a_nan_where_the_other_is_finite_or_beyond_the_ulps():
    expected = torch.tensor([0.5, -1e-6, 3.0])
    assert_within_ulps(expected.clone(), expected, "equal")
    nan_where_finite = expected.clone()
    nan_where_finite[1] = float("nan")
    with pytest.raises(AssertionError, match="NaN at different places"):
        assert_within_ulps(nan_where_finite, expected, "NaN against a finite value")
    with pytest.raises(AssertionError, match="NaN at different places"):
        assert_within_ulps(expected, nan_where_finite, "a finite value against NaN")
    near = expected.clone()
    near[2] = torch.nextafter(torch.tensor(3.0), torch.tensor(4.0))
    assert_within_ulps(near, expected, "one ulp")
    far = expected.clone()
    far[2] = 3.0 * (1 + 2.0 ** -23 * (ULPS[torch.float32] + 1))
    with pytest.raises(AssertionError, match="1 of 3 elements beyond 32 ulp, first at 2"):
        assert_within_ulps(far, expected, "beyond the bound")
