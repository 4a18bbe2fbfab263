"""The kernel backends against the reference (SPEC §4): one step from the same state within the
elementwise bounds, 16-bit storage against a float64 oracle, a whole run through every stage,
parameters without gradients, and GradScaler's skipped steps."""
import copy

import pytest
import torch

from mgpp_kernels import MGPP, schedule

from conftest import (MACHINE_THREADS, assert_bitwise_equal, assert_fp32_bound,
                      assert_mixed_precision_bound, assert_runs_identical, build_optimizer,
                      clone_params, copy_state_into, gradient, make_params, run_steps, state_of,
                      unpacked_keep_masks, with_prior)

BREAKING_SHAPES = [(1,), (7,), (4097,), (0,), (33, 65)]
MANY_SHAPES = [(int(n),) for n in torch.randint(1, 300, (40,),
                                               generator=torch.Generator().manual_seed(7))]

# Schedule positions of SCHEDULE (t_i = 4, events at 4, 7, 14, 21, t_end = 24) where one step is
# compared: prior on without an event, the first event, a cubic event, the freeze, frozen mask.
POINTS = {"dense": 2, "first_event": 4, "cubic_event": 7, "freeze": 24, "frozen": 26}


def _one_step(shapes, prune, backend, t, dtypes=torch.float32, kernel_threads=1, **overrides):
    """Runs the reference to schedule step t, copies its state into a reference and a `backend`
    optimizer and takes step t in both from the same θ, m, v and gradients (the kernel's with
    `kernel_threads` threads)."""
    params = make_params(shapes, dtypes)
    warm = build_optimizer(params, "reference", prune, **overrides)
    run_steps(warm, params, 0, t)
    before = [(p.detach().clone(), {k: v.clone() for k, v in state_of(warm, p).items()})
              for p in params]
    runs = {}
    for name in ("reference", backend):
        copies = clone_params(params)
        optimizer = copy_state_into(warm, copies, name, prune, **overrides)
        torch.set_num_threads(kernel_threads if name == backend else 1)
        try:
            run_steps(optimizer, copies, t, t + 1)
        finally:
            torch.set_num_threads(1)
        runs[name] = (copies, optimizer)
    return before, runs


def _assert_one_step_bounds(before, runs, backend, prune, t):
    ref_params, ref_opt = runs["reference"]
    params, optimizer = runs[backend]
    point = schedule.schedule_at(ref_opt.config, t)
    beta1, beta2 = 0.9, 0.999
    for i, ((theta_old, state_old), p, r) in enumerate(zip(before, params, ref_params)):
        grad = gradient(t, i, p).float()
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
        assert torch.equal(state["step"], ref_state["step"])
        if prune[i] and (point.prune_to is not None or point.frozen):
            assert torch.equal(p == 0, r == 0), f"param {i}: pruned positions differ"
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
    before, runs = _one_step(shapes, prune, kernel_backend, t, weight_decay=0.01)
    _assert_one_step_bounds(before, runs, kernel_backend, prune, t)


@pytest.mark.parametrize("point", ["dense", "first_event", "frozen"])
def test_one_step_multithreaded(kernel_backend, point):
    """Tensors of several chunks, so every thread updates, counts its own histogram (merged for
    τ) and applies masks."""
    shapes, prune = [(70000,), (257, 130), (7,), (40000,)], [True, True, True, False]
    t = POINTS[point]
    before, runs = _one_step(shapes, prune, kernel_backend, t,
                             kernel_threads=max(2, MACHINE_THREADS))
    _assert_one_step_bounds(before, runs, kernel_backend, prune, t)


@pytest.mark.parametrize("point", ["dense", "first_event"])
def test_one_step_with_only_empty_candidates(kernel_backend, point):
    t = POINTS[point]
    before, runs = _one_step([(0,), (0, 5), (9,)], [True, True, False], kernel_backend, t)
    _assert_one_step_bounds(before, runs, kernel_backend, [True, True, False], t)
    assert runs[kernel_backend][1].stats()["tau"] is None


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

    def step(name, param_dtype, state):
        copies = clone_params(params, param_dtype)
        optimizer = copy_state_into(warm, copies, name, prune, **dict(overrides, state_dtype=state))
        for p, g in zip(copies, grads):
            p.grad = g.to(param_dtype)
        optimizer.step()
        return copies, optimizer

    kernel_params, kernel = step(kernel_backend, dtype, state_dtype)
    ref_params, ref = step("reference", dtype, state_dtype)
    oracle_params, oracle = step("reference", torch.float64, "param")
    state_dtype_of = dtype if state_dtype == "param" else torch.float32
    for i, (p, r, o) in enumerate(zip(kernel_params, ref_params, oracle_params)):
        assert p.dtype == dtype and kernel.state[p]["exp_avg"].dtype == state_dtype_of
        assert_mixed_precision_bound(p.detach(), r.detach(), o.detach(), f"θ[{i}]")
        for key in ("exp_avg", "exp_avg_sq"):
            actual, same, exact = kernel.state[p][key], ref.state[r][key], oracle.state[o][key]
            if state_dtype == "param":
                assert_mixed_precision_bound(actual, same, exact, f"{key}[{i}]")
            else:
                assert_fp32_bound(actual, same, torch.maximum(same.abs(), exact.abs().float()),
                                  f"{key}[{i}]")


# ---- a whole run ------------------------------------------------------------------------------

LONG_RUN = dict(total_steps=60, initial_warmup_steps=10, final_warmup_steps=10,
                pruning_interval=10, weight_decay=0.01)  # events 10, 20, 30, 40, t_end = 49
LONG_SHAPES = [(48, 64), (7,), (1,), (0,), (300,), (64,), (7,)]
LONG_PRUNE = [True] * 5 + [False] * 2


def _long_run(backend, has_grad=None):
    params = make_params(LONG_SHAPES)
    optimizer = build_optimizer(params, backend, LONG_PRUNE, **LONG_RUN)
    run_steps(optimizer, params, 0, 60, has_grad=has_grad)
    return params, optimizer


def _no_grad_sometimes(t, i):
    """Candidate 1 has no gradient every third step; candidate 4 none before t = 15 (so it is
    ranked at the event t = 10 without any state); non-candidate 6 none in odd steps."""
    return not ((i == 1 and t % 3 == 0) or (i == 4 and t < 15) or (i == 6 and t % 2 == 1))


@pytest.mark.parametrize("has_grad", [None, _no_grad_sometimes], ids=["all_grads", "some_none"])
def test_run_through_every_stage(kernel_backend, has_grad):
    """60 steps, events at 10, 20, 30, 40, the freeze at 49: final θ within 1e-4 relative in
    norm, frozen masks and zero patterns differ in at most 0.1% of the candidates."""
    params, optimizer = _long_run(kernel_backend, has_grad)
    ref_params, ref_opt = _long_run("reference", has_grad)
    flat = torch.cat([p.detach().flatten() for p in params])
    ref_flat = torch.cat([p.detach().flatten() for p in ref_params])
    assert torch.linalg.vector_norm(flat - ref_flat) <= 1e-4 * torch.linalg.vector_norm(ref_flat)
    candidates = [p for p, flag in zip(params, LONG_PRUNE) if flag]
    ref_candidates = [p for p, flag in zip(ref_params, LONG_PRUNE) if flag]
    numel = sum(p.numel() for p in candidates)
    masks = torch.cat([m.flatten() for m in unpacked_keep_masks(optimizer, candidates)])
    ref_masks = torch.cat([m.flatten() for m in unpacked_keep_masks(ref_opt, ref_candidates)])
    assert int((masks != ref_masks).sum()) <= 0.001 * numel
    zeros = torch.cat([(p == 0).flatten() for p in candidates])
    ref_zeros = torch.cat([(p == 0).flatten() for p in ref_candidates])
    assert int((zeros != ref_zeros).sum()) <= 0.001 * numel
    # s_f = 0.9 of the candidates are pruned (fewer only by ties at τ)
    assert 0.89 * numel <= int((~masks).sum()) <= 0.9 * numel
    assert torch.equal(zeros, ~masks)
    for p, r in zip(params, ref_params):
        assert torch.equal(optimizer.state[p]["step"], ref_opt.state[r]["step"])
    if has_grad is not None:
        steps_with_grad = [sum(has_grad(t, i) for t in range(60)) for i in range(len(params))]
        assert steps_with_grad[1] == 40 and steps_with_grad[4] == 45 and steps_with_grad[6] == 30
        for i, p in enumerate(params):
            assert optimizer.state[p]["step"].item() == steps_with_grad[i]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_parameter_without_gradient_is_still_ranked(backend):
    """At the event t = 4 the candidate without a gradient (and without any state yet) is not
    updated but is pruned with the global τ; the non-candidate without one is untouched."""
    params = make_params([(200,), (300,), (50,)])
    prune = [True, True, False]
    optimizer = build_optimizer(params, backend, prune)

    def has_grad(t, i):
        return i == 0

    run_steps(optimizer, params, 0, 4, has_grad=has_grad)
    assert params[1] not in optimizer.state and params[2] not in optimizer.state
    before = [p.detach().clone() for p in params]
    run_steps(optimizer, params, 4, 5, has_grad=has_grad)
    stats = optimizer.stats()
    tau = torch.tensor(stats["tau"], dtype=torch.float32)
    assert stats["pruned"] == int(500 * 0.3) - 1  # distinct magnitudes: τ itself survives
    expected = before[1].masked_fill(before[1].abs() < tau, 0)
    assert torch.equal(params[1], expected)
    assert 30 < int((params[1] == 0).sum()) < 150  # ranked together with the updated candidate
    assert torch.equal(params[2], before[2])
    candidates = torch.cat([params[0].detach(), params[1].detach()]).abs()
    assert int((candidates == 0).sum()) == stats["pruned"]
    assert int(((candidates > 0) & (candidates < tau)).sum()) == 0


def test_parameter_without_gradient_matches_between_backends(kernel_backend):
    params = make_params([(200,), (300,)])
    runs = []
    for backend in ("reference", kernel_backend):
        copies = clone_params(params)
        optimizer = build_optimizer(copies, backend, [True, True])
        run_steps(optimizer, copies, 0, 30, has_grad=lambda t, i: i == 0 or t % 2 == 0)
        runs.append((copies, optimizer))
    (ref_params, ref_opt), (kernel_params, kernel_opt) = runs
    for p, r in zip(kernel_params, ref_params):
        assert torch.linalg.vector_norm(p - r) <= 1e-4 * torch.linalg.vector_norm(r)
        assert torch.equal(kernel_opt.state[p]["keep_mask"], ref_opt.state[r]["keep_mask"])
    assert kernel_opt.state[kernel_params[1]]["step"].item() == 15


# ---- GradScaler ---------------------------------------------------------------------------------

def test_grad_scale_power_of_two_is_exact(any_backend):
    """Gradients scaled by 2^10 and optimizer.grad_scale = 2^10 give the unscaled run's bits,
    through every stage."""
    shapes, prune = [(33, 65), (7,), (1,), (13,)], [True, True, True, False]
    params = make_params(shapes)
    scaled = clone_params(params)
    optimizer = build_optimizer(params, any_backend, prune)
    scaled_opt = build_optimizer(scaled, any_backend, prune)
    run_steps(optimizer, params, 0, 30)
    run_steps(scaled_opt, scaled, 0, 30, grad_scale=1024.0)
    assert_runs_identical(scaled, scaled_opt, params, optimizer)


def test_grad_scale_not_a_power_of_two(kernel_backend):
    shapes, prune = [(33, 65), (7,), (13,)], [True, True, False]
    runs = []
    for backend in ("reference", kernel_backend):
        params = make_params(shapes)
        optimizer = build_optimizer(params, backend, prune)
        run_steps(optimizer, params, 0, 3, grad_scale=1000.0)
        runs.append(params)
    for p, r in zip(*runs[::-1]):
        assert_fp32_bound(p, r, r.detach().abs(), "θ with grad_scale = 1000")


@pytest.mark.parametrize("t", [3, 4, 23, 24, 26])
def test_found_inf_skips_the_step(any_backend, t):
    """found_inf != 0: no parameter, moment, step count or schedule position moves, so the run
    continues exactly as if the step had not been called (t: before/at an event, the freeze)."""
    shapes, prune = [(33, 65), (7,), (13,)], [True, True, False]
    params = make_params(shapes)
    uninterrupted = clone_params(params)
    optimizer = build_optimizer(params, any_backend, prune)
    expected_opt = build_optimizer(uninterrupted, any_backend, prune)
    run_steps(optimizer, params, 0, t)
    run_steps(expected_opt, uninterrupted, 0, t)
    snapshot = copy.deepcopy(optimizer.state_dict())
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    optimizer.grad_scale = torch.tensor(65536.0)
    optimizer.found_inf = torch.tensor(1.0)
    assert optimizer.step(lambda: 7.0) == 7.0
    del optimizer.grad_scale, optimizer.found_inf
    assert_runs_identical(params, optimizer, uninterrupted, expected_opt)
    after = optimizer.state_dict()
    assert after["mgpp"]["schedule_step"] == snapshot["mgpp"]["schedule_step"] == t
    run_steps(optimizer, params, t, 30)
    run_steps(expected_opt, uninterrupted, t, 30)
    assert_runs_identical(params, optimizer, uninterrupted, expected_opt)


def _scaler_run(backend, scaler, skip_at, unscale_first=False):
    """A tiny model trained for 8 iterations; with a scaler, an inf is injected into a gradient
    at iteration `skip_at`; without one, that iteration is left out."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = MGPP([{"params": [model[0].weight, model[2].weight], "prune": True},
                      {"params": [model[0].bias, model[2].bias]}], lr=1e-2, backend=backend,
                     num_train_examples=100, initial_warmup_steps=2, total_steps=8,
                     final_warmup_steps=1, pruning_interval=2)
    inputs = torch.randn(8, 8, 16, generator=torch.Generator().manual_seed(1))
    for iteration in range(8):
        if scaler is None and iteration == skip_at:
            continue
        optimizer.zero_grad()
        loss = model(inputs[iteration]).square().mean()
        if scaler is None:
            loss.backward()
            optimizer.step()
            continue
        scaler.scale(loss).backward()
        if iteration == skip_at:
            model[2].bias.grad[0] = float("inf")
        if unscale_first:
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    return list(model.parameters()), optimizer


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled_first"])
def test_torch_amp_grad_scaler(any_backend, unscale_first):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    params, optimizer = _scaler_run(any_backend, scaler, skip_at=3, unscale_first=unscale_first)
    assert scaler.get_scale() == 2.0 ** 11  # the inf halved the scale once
    assert optimizer.stats()["step"] == 7  # one of 8 iterations was skipped
    expected_params, expected = _scaler_run(any_backend, None, skip_at=3)
    assert_runs_identical(params, optimizer, expected_params, expected)
    assert optimizer.stats()["stage"] == "frozen"
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")
