"""One rounding recipe (csrc/core/step.h): the Triton kernels, run by the interpreter on CPU
tensors, give the cpu backend's bits, step after step through every stage of the schedule, on
weights near the spike. The comparison treats a NaN against a finite value as a difference."""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import mgpp_kernels
from mgpp_kernels import MGPP

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(not {"cpu", "triton"} <= set(mgpp_kernels.available_backends()),
                       reason="needs the cpu backend (the extension) and the triton backend"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 (the kernels on CPU tensors)"),
]

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SHAPES = [(1,), (7,), (4097,)]
# Every stage in 20 steps: dense for t < 3, events at t = 3 (s_i), 4, 8 and 12, the freeze at
# t_end = 20 - 4 - 1 = 15, the frozen mask after it.
SCHEDULE = dict(num_train_examples=67349, initial_warmup_steps=3, total_steps=20,
                final_warmup_steps=4, pruning_interval=4, initial_sparsity=0.3,
                final_sparsity=0.8, sigma0_sq=1e-10, sigma1_sq=0.05, lambda_mix=0.1)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-identical, except that two NaNs match whatever their payloads (they follow the
    hardware); a NaN against a finite value, or -0.0 against 0.0, is a difference."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if not actual.is_floating_point():
        differ = actual != expected
    else:
        differ = actual.view(INT_VIEW[actual.dtype]) != expected.view(INT_VIEW[expected.dtype])
        differ &= ~(actual.isnan() & expected.isnan())
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ, "
                              f"first at {differ.flatten().nonzero()[0].item()}")


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


def assert_runs_bit_identical(cpu_run, triton_run, what):
    for i, (a, b) in enumerate(zip(triton_run[0], cpu_run[0])):
        assert_same_bits(a.detach(), b.detach(), f"{what}: param {i}")
        state_a, state_b = triton_run[1].state[a], cpu_run[1].state[b]
        assert state_a.keys() == state_b.keys(), f"{what}: param {i} state keys"
        for key in state_a:
            assert_same_bits(state_a[key], state_b[key], f"{what}: param {i} {key}")


@pytest.mark.parametrize("grad_scale,weight_decay", [(None, 0.01), (1024.0, 0.0)])
def test_triton_steps_as_the_cpu_backend_bit_for_bit_in_fp32(grad_scale, weight_decay):
    weights = near_spike_weights(SHAPES, seed=1)
    cpu_run = optimizer_for("cpu", weights, torch.float32, torch.float32, weight_decay=weight_decay)
    triton_run = optimizer_for("triton", weights, torch.float32, torch.float32,
                               weight_decay=weight_decay)
    for t in range(SCHEDULE["total_steps"]):
        step_both([cpu_run, triton_run], gradients(t, weights, seed=2), grad_scale)
        assert_runs_bit_identical(cpu_run, triton_run, f"step {t}")
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
def test_triton_steps_as_the_cpu_backend_bit_for_bit_in_16_bit_storage(dtype, state_dtype):
    weights = near_spike_weights(SHAPES, seed=3)
    cpu_run = optimizer_for("cpu", weights, dtype, state_dtype)
    triton_run = optimizer_for("triton", weights, dtype, state_dtype)
    for t in range(5):  # dense, then the first two events
        step_both([cpu_run, triton_run], gradients(t, weights, seed=4), None)
        assert_runs_bit_identical(cpu_run, triton_run, f"step {t}")


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
        step_both([cpu_run, triton_run], grads, None)
    assert_runs_bit_identical(cpu_run, triton_run, "one step with NaNs")
    updated = triton_run[0]
    assert int(updated[2].isnan().sum()) == int(weights[2].isnan().sum()) == 43
    assert updated[1].isnan().tolist() == [False, False, False, True, False, False, False]
    assert updated[0].isfinite().all()


def test_the_bit_comparison_fails_on_a_nan_where_the_other_is_finite():
    expected = torch.tensor([0.5, -1e-6, 3.0])
    assert_same_bits(expected.clone(), expected, "equal")
    nan_where_finite = expected.clone()
    nan_where_finite[1] = float("nan")
    with pytest.raises(AssertionError, match="1 of 3 elements differ, first at 1"):
        assert_same_bits(nan_where_finite, expected, "NaN against a finite value")
    with pytest.raises(AssertionError, match="1 of 3 elements differ, first at 1"):
        assert_same_bits(expected, nan_where_finite, "a finite value against NaN")
    signed_zero = torch.tensor([0.5, -0.0, 3.0])
    with pytest.raises(AssertionError, match="1 of 3"):
        assert_same_bits(signed_zero, torch.tensor([0.5, 0.0, 3.0]), "-0.0 against 0.0")
