"""One step of every kernel backend against the reference from the same state, within the
elementwise bounds of docs/spec.md §4: fp32 at every stage (through the optimizer and through the
backend's step() directly), and 16-bit storage against a float64 oracle."""
from __future__ import annotations

import pytest
import torch

from mgpp_kernels import masks, schedule

from compare import (assert_bitwise_equal, assert_fp32_bound, assert_mixed_precision_bound,
                     state_of)
from helpers import (build_optimizer, clone_params, copy_state_into, gradient, make_params,
                     run_steps, with_prior)
from step_inputs import StepTensors, assert_fp32_step_bound, PRIOR

from backends import REFERENCE

BREAKING_SHAPES = [(1,), (7,), (4097,), (0,), (33, 65)]
MANY_SHAPES = [(int(n),) for n in torch.randint(1, 300, (40,),
                                               generator=torch.Generator().manual_seed(7))]

# Schedule positions of SCHEDULE (t_i = 4, events at 4, 7, 14, 21, t_end = 24) where one step is
# compared: prior on without an event, the first event, a cubic event, the freeze, frozen mask.
POINTS = {"dense": 2, "first_event": 4, "cubic_event": 7, "freeze": 24, "frozen": 26}


def one_step(shapes, prune, backend, t, dtypes=torch.float32, kernel_threads=1, **overrides):
    """Runs the reference to schedule step t, copies its state into a reference and a `backend`
    optimizer (on the backend's device) and takes step t in both from the same θ, m, v and
    gradients (the kernel's with `kernel_threads` threads)."""
    params = make_params(shapes, dtypes)
    warm = build_optimizer(params, "reference", prune, **overrides)
    run_steps(warm, params, 0, t)
    before = [(p.detach().clone(), {k: v.clone() for k, v in state_of(warm, p).items()})
              for p in params]
    runs = {}
    for row in (REFERENCE, backend):
        copies = clone_params(params, device=row.device)
        optimizer = copy_state_into(warm, copies, row, prune, **overrides)
        torch.set_num_threads(kernel_threads if row is backend else 1)
        try:
            run_steps(optimizer, copies, t, t + 1)
        finally:
            torch.set_num_threads(1)
        runs[row.name] = (copies, optimizer)
    return before, runs


def assert_one_step_bounds(before, runs, backend, prune, t):
    ref_params, ref_opt = runs["reference"]
    params, optimizer = runs[backend.name]
    point = schedule.schedule_at(ref_opt.config, t)
    beta1, beta2 = 0.9, 0.999
    for i, ((theta_old, state_old), p, r) in enumerate(zip(before, params, ref_params)):
        grad = gradient(t, i, r).float()
        if prune[i] and point.prior_on:
            grad = with_prior(theta_old, grad, ref_opt, point.lambda_t)
        m_old = state_old.get("exp_avg", torch.zeros_like(grad))
        v_old = state_old.get("exp_avg_sq", torch.zeros_like(grad))
        state, ref_state = optimizer.state[p], ref_opt.state[r]
        m, v = ref_state["exp_avg"], ref_state["exp_avg_sq"]
        assert_fp32_bound(p, r, torch.maximum(theta_old.abs(), r.detach().abs()), f"θ[{i}]")
        assert_fp32_bound(state["exp_avg"], m, torch.stack(
            [m.abs(), beta1 * m_old.abs(), (1 - beta1) * grad.abs()]).amax(0), f"m[{i}]")
        assert_fp32_bound(state["exp_avg_sq"], v, torch.stack(
            [v, beta2 * v_old, (1 - beta2) * grad * grad]).amax(0), f"v[{i}]")
        assert_bitwise_equal(state["step"], ref_state["step"], f"step count {i}")
        if prune[i] and (point.prune_to is not None or point.frozen):
            assert_bitwise_equal(p == 0, r == 0, f"param {i}: pruned positions")
        if "keep_mask" in ref_state:
            assert_bitwise_equal(state["keep_mask"], ref_state["keep_mask"], f"keep mask {i}")
    stats, ref_stats = optimizer.stats(), ref_opt.stats()
    assert stats["step"] == ref_stats["step"] == t + 1
    assert stats["pruned"] == ref_stats["pruned"]
    if ref_stats["tau"] is None:
        assert stats["tau"] is None
    else:
        assert stats["tau"] == pytest.approx(ref_stats["tau"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("point", sorted(POINTS))
@pytest.mark.parametrize("layout", ["breaking_shapes", "many_tensors"])
def test_one_step_fp32_within_bounds(kernel_backend, layout, point):
    if layout == "breaking_shapes":
        shapes = BREAKING_SHAPES + [(7,), (4097,), (0,)]
        prune = [True] * len(BREAKING_SHAPES) + [False] * 3
    else:
        shapes = MANY_SHAPES
        prune = [i % 4 != 3 for i in range(len(shapes))]
    t = POINTS[point]
    before, runs = one_step(shapes, prune, kernel_backend, t, weight_decay=0.01)
    assert_one_step_bounds(before, runs, kernel_backend, prune, t)


@pytest.mark.parametrize("point", ["dense", "first_event"])
def test_one_step_with_only_empty_candidates(kernel_backend, point):
    t = POINTS[point]
    before, runs = one_step([(0,), (0, 5), (9,)], [True, True, False], kernel_backend, t)
    assert_one_step_bounds(before, runs, kernel_backend, [True, True, False], t)
    assert runs[kernel_backend.name][1].stats()["tau"] is None


# ---- 16-bit storage against a float64 oracle ---------------------------------------------------

@pytest.mark.parametrize("point", ["dense", "first_event", "frozen"])
@pytest.mark.parametrize("state_dtype", ["fp32", "param"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_step_16bit_against_float64_oracle(kernel_backend, dtype, state_dtype, point):
    """θ (and m, v when they are stored in the parameter's dtype) within 2x the error of the
    reference run in the same dtype, or 1 ulp; float32 state within the fp32 bound of the
    reference run. n = 10⁴ keeps the prior's gradients inside float16's range."""
    shapes = [(1,), (7,), (1031,), (0,), (17, 33), (7,), (300,)]
    prune = [True] * 5 + [False] * 2
    overrides = dict(state_dtype=state_dtype, num_train_examples=10_000, weight_decay=0.01)
    t = POINTS[point]
    params = make_params(shapes, dtype)
    warm = build_optimizer(params, "reference", prune, **overrides)
    run_steps(warm, params, 0, t)
    grads = [gradient(t, i, p) for i, p in enumerate(params)]

    def step(row, param_dtype, state):
        copies = clone_params(params, param_dtype, device=row.device)
        optimizer = copy_state_into(warm, copies, row, prune, **dict(overrides, state_dtype=state))
        for p, g in zip(copies, grads):
            p.grad = g.to(device=p.device, dtype=param_dtype)
        optimizer.step()
        return copies, optimizer

    kernel_params, kernel = step(kernel_backend, dtype, state_dtype)
    ref_params, ref = step(REFERENCE, dtype, state_dtype)
    oracle_params, oracle = step(REFERENCE, torch.float64, "param")
    state_dtype_of = dtype if state_dtype == "param" else torch.float32
    for i, (p, r, o) in enumerate(zip(kernel_params, ref_params, oracle_params)):
        assert p.dtype == dtype and kernel.state[p]["exp_avg"].dtype == state_dtype_of
        assert_mixed_precision_bound(p, r, o, f"θ[{i}]")
        for key in ("exp_avg", "exp_avg_sq"):
            actual, same, exact = kernel.state[p][key], ref.state[r][key], oracle.state[o][key]
            if state_dtype == "param":
                assert_mixed_precision_bound(actual, same, exact, f"{key}[{i}]")
            else:
                assert_fp32_bound(actual, same, torch.maximum(same.abs(), exact.abs().float()),
                                  f"{key}[{i}]")


# ---- the backend's step() directly -------------------------------------------------------------

STEP_SHAPES = [(1,), (7,), (4097,), (0,), (33, 17)]


@pytest.mark.parametrize("case", ["prior", "plain_adamw", "frozen_mask"])
def test_backend_step_fp32_within_bound(kernel_backend, case):
    """Backend.step on UpdateGroups: with the prior and a GradScaler scale of 4, plain AdamW, and
    a frozen mask (whose pruned positions stay zero)."""
    device = kernel_backend.device
    before = StepTensors.make(STEP_SHAPES, torch.float32, torch.float32, seed=1,
                              masked=case == "frozen_mask", spike_runs=True)
    prior = PRIOR if case == "prior" else None
    scale_value = 4.0 if case == "prior" else 1.0
    if case == "prior":
        for g in before.grads:
            g.mul_(scale_value)
    ours, theirs = before.clone(device=device), before.clone()
    grad_scale = torch.tensor(scale_value, device=device) if case == "prior" else None
    assert kernel_backend.load().step([ours.group(prior)], [], grad_scale) == []
    REFERENCE.load().step([theirs.group(prior)], [],
                             None if grad_scale is None else grad_scale.cpu())
    assert_fp32_step_bound(ours, theirs, before, prior, scale_value)
    if case == "frozen_mask":
        for p, mask in zip(ours.params, ours.keep_masks):
            assert not p[~masks.unpack_mask(mask, p)].any()


@pytest.mark.parametrize("dtype,state_dtype", [
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float16, torch.float16)])
def test_backend_step_16bit_storage_bound(kernel_backend, dtype, state_dtype):
    before = StepTensors.make(STEP_SHAPES, dtype, state_dtype, seed=2, spike_runs=True)
    ours, same_dtype = before.clone(device=kernel_backend.device), before.clone()
    oracle = before.clone(torch.float64, torch.float64)
    kernel_backend.load().step([ours.group()], [], None)
    REFERENCE.load().step([same_dtype.group()], [], None)
    REFERENCE.load().step([oracle.group()], [], None)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for i, (actual, ref, exact) in enumerate(zip(getattr(ours, name), getattr(same_dtype, name),
                                                     getattr(oracle, name))):
            assert actual.dtype == ref.dtype
            if actual.dtype == torch.float32:   # fp32 state of 16-bit parameters
                assert_fp32_bound(actual, ref, torch.maximum(ref.abs().double(), exact.abs()),
                                  f"{name}[{i}]")
            else:
                # docs/spec.md §4: error against the float64 oracle <= 2x the reference's error in the
                # same storage dtype, or 1 ulp of the storage dtype.
                assert_mixed_precision_bound(actual, ref, exact, f"{name}[{i}]")

