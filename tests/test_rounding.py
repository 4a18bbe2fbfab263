"""The same math on two backends (csrc/core/step.h; docs/spec.md §4, "Across targets"): the
Triton kernels (compiled on a CUDA device where there is one, else run by the interpreter on CPU
tensors) and the CUDA kernels (on a GPU) agree with the cpu backend within a few ulp of the stored
dtype, step after step through every stage of the schedule, on weights near the spike. Each step
starts both runs from the cpu run's values, so that the bound is one step's. The interpreter
rounds tl.fma twice where a native cpu build fuses it, so the results are not bit-identical. The
comparison treats a NaN against a finite value as a difference. The bound, schedule, weights and
gradients are benchmarks/common/agreement.py's, which the GPU benchmark's first check shares."""
from __future__ import annotations

import warnings

import pytest
import torch

import backends
import mgpp_kernels
from benchmarks.common.agreement import (SCHEDULE, ULPS, gradients, input_scales,
                                         near_spike_weights)
from compare import ulp
from mgpp_kernels import MGPP

pytestmark = pytest.mark.skipif("cpu" not in mgpp_kernels.available_backends(),
                                reason="needs the cpu backend (the extension)")

SHAPES = [(1,), (7,), (4097,)]


def compared(name: str):
    """The backend's row of tests/backends.py, compared with the cpu backend on the row's device:
    marked gpu on a CUDA device, skipped with its reason where it cannot run here."""
    row = backends.BY_NAME[name]
    marks = [pytest.mark.gpu] if row.device == "cuda" else []
    if row.unavailable:
        marks.append(pytest.mark.skip(reason=f"backend {name!r} does not run here: "
                                             f"{row.unavailable}"))
    return pytest.param(row, id=name, marks=marks)


COMPARED = [compared("triton"), compared("cuda")]


def optimizer_for(backend: str, weights, dtype, state_dtype, device="cpu", **overrides):
    params = [torch.nn.Parameter(w.to(device, dtype, copy=True)) for w in weights]
    kwargs = dict(lr=1e-3, weight_decay=0.01, state_dtype=state_dtype, **SCHEDULE)
    kwargs.update(overrides)
    return params, MGPP([{"params": params, "prune": True}], backend=backend, **kwargs)


def step_both(runs, grads, grad_scale):
    for params, optimizer in runs:
        for p, g in zip(params, grads):
            p.grad = (g * (grad_scale or 1.0)).to(p.device, p.dtype)
        if grad_scale is not None:
            optimizer.grad_scale = torch.tensor(grad_scale, device=params[0].device)
        optimizer.step()


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, what: str,
                       scale: torch.Tensor | None = None) -> None:
    """|actual − expected| ≤ ULPS ulp of the dtype at the larger magnitude (or at `scale`, the
    largest magnitude that went into the value, where larger), NaN where the other is NaN (and
    nowhere else); integer tensors (masks, step counts) equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    actual, expected = actual.cpu(), expected.cpu()
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


def assert_runs_within_ulps(cpu_run, kernel_run, what, scales=None):
    """The kernel backend's run within ULPS of the cpu run, then set to the cpu run's values, so
    that the next step starts both from the same state."""
    for i, (a, b) in enumerate(zip(kernel_run[0], cpu_run[0])):
        scale = scales[i] if scales else {}
        assert_within_ulps(a.detach(), b.detach(), f"{what}: param {i}", scale.get("param"))
        state_a, state_b = kernel_run[1].state[a], cpu_run[1].state[b]
        assert state_a.keys() == state_b.keys(), f"{what}: param {i} state keys"
        for key in state_a:
            assert_within_ulps(state_a[key], state_b[key], f"{what}: param {i} {key}",
                               scale.get(key))
            state_a[key].copy_(state_b[key])
        with torch.no_grad():
            a.copy_(b)


@pytest.mark.parametrize("row", COMPARED)
@pytest.mark.parametrize("grad_scale,weight_decay", [(None, 0.01), (1024.0, 0.0)])
def test_kernels_step_as_the_cpu_backend_within_ulps_in_fp32(row, grad_scale, weight_decay):
    weights = near_spike_weights(SHAPES, seed=1)
    cpu_run = optimizer_for("cpu", weights, torch.float32, torch.float32, weight_decay=weight_decay)
    kernel_run = optimizer_for(row.name, weights, torch.float32, torch.float32, row.device,
                               weight_decay=weight_decay)
    for t in range(SCHEDULE["total_steps"]):
        grads = gradients(t, weights, seed=2)
        scales = input_scales(*cpu_run, grads, grad_scale)
        step_both([cpu_run, kernel_run], grads, grad_scale)
        assert_runs_within_ulps(cpu_run, kernel_run, f"step {t}", scales)
    params, optimizer = cpu_run
    # The run went through every stage: the freeze left masks pruning 0.8 of the weights (ties
    # at exact zeros aside), and the prior moved weights near the spike.
    masks = [optimizer.state[p]["keep_mask"] for p in params]
    assert all(m.dtype == torch.uint8 for m in masks)
    assert optimizer.stats()["step"] == SCHEDULE["total_steps"]
    zeros = sum(int((p == 0).sum()) for p in params)
    numel = sum(p.numel() for p in params)
    assert 0.79 * numel <= zeros <= int(0.8 * numel)


@pytest.mark.parametrize("row", COMPARED)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.bfloat16, "param"),
                                               (torch.float16, "param")])
def test_kernels_step_as_the_cpu_backend_within_ulps_in_16_bit_storage(row, dtype, state_dtype):
    weights = near_spike_weights(SHAPES, seed=3)
    cpu_run = optimizer_for("cpu", weights, dtype, state_dtype)
    kernel_run = optimizer_for(row.name, weights, dtype, state_dtype, row.device)
    for t in range(5):  # dense, then the first two events
        grads = gradients(t, weights, seed=4)
        scales = input_scales(*cpu_run, grads, None)
        step_both([cpu_run, kernel_run], grads, None)
        assert_runs_within_ulps(cpu_run, kernel_run, f"step {t}", scales)


@pytest.mark.parametrize("row", COMPARED)
def test_nan_weights_and_gradients_give_nan_at_the_same_places(row):
    weights = near_spike_weights(SHAPES, seed=5)
    weights[2].view(-1)[1::97] = float("nan")
    cpu_run = optimizer_for("cpu", weights, torch.float32, torch.float32)
    kernel_run = optimizer_for(row.name, weights, torch.float32, torch.float32, row.device)
    grads = gradients(0, weights, seed=6)
    grads[1][3] = float("nan")
    with warnings.catch_warnings():
        # A NaN θ is never converted to an integer (the exponential clamps it first).
        warnings.filterwarnings("error", message=".*cast", category=RuntimeWarning)
        scales = input_scales(*cpu_run, grads, None)
        step_both([cpu_run, kernel_run], grads, None)
    assert_runs_within_ulps(cpu_run, kernel_run, "one step with NaNs", scales)
    updated = [p.detach().cpu() for p in kernel_run[0]]
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
