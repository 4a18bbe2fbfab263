"""Mixed precision on every backend: optimizer.grad_scale / found_inf as torch.amp.GradScaler
sets them, and torch.autocast (bfloat16) with a real GradScaler on the backend's device.

- A power-of-two loss scale changes nothing: the scaled run equals the unscaled one bit for bit.
- A scale that is not a power of two stays within the fp32 bound of the reference.
- An inf or NaN gradient skips the step exactly (docs/spec.md §2): no parameter, moment, step count or
  schedule position moves, at every stage; the run then equals one that never saw that batch.
- bfloat16 parameters keep float32 moments and stay bfloat16.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mgpp_kernels import MGPP, masks

from compare import (assert_bitwise_equal, assert_fp32_bound, assert_runs_identical,
                     assert_unchanged, snapshot, ulp)
from helpers import build_optimizer, clone_params, make_params, run_steps

import backends
from backends import REFERENCE

# ---- optimizer.grad_scale and found_inf, set by hand -------------------------------------------


def test_grad_scale_power_of_two_is_exact(any_backend):
    """Gradients scaled by 2^10 and optimizer.grad_scale = 2^10 give the unscaled run's bits,
    through every stage."""
    shapes, prune = [(33, 65), (7,), (1,), (13,)], [True, True, True, False]
    params = make_params(shapes, device=any_backend.device)
    scaled = clone_params(params)
    optimizer = build_optimizer(params, any_backend, prune)
    scaled_opt = build_optimizer(scaled, any_backend, prune)
    run_steps(optimizer, params, 0, 30)
    run_steps(scaled_opt, scaled, 0, 30, grad_scale=1024.0)
    assert_runs_identical(scaled, scaled_opt, params, optimizer)


def test_grad_scale_not_a_power_of_two(kernel_backend):
    shapes, prune = [(33, 65), (7,), (13,)], [True, True, False]
    runs = []
    for row in (REFERENCE, kernel_backend):
        params = make_params(shapes, device=row.device)
        optimizer = build_optimizer(params, row, prune)
        run_steps(optimizer, params, 0, 3, grad_scale=1000.0)
        runs.append(params)
    for p, r in zip(*runs[::-1]):
        assert_fp32_bound(p, r, r.detach().abs(), "θ with grad_scale = 1000")


@pytest.mark.parametrize("backend,t", backends.over(backends.ROWS, [3, 4, 23, 24, 26],
                                                    small_cases=[4, 24]))
def test_found_inf_skips_the_step(backend, t):
    """found_inf != 0: no parameter, moment, step count or schedule position moves, so the run
    continues exactly as if the step had not been called (t: before/at an event, the freeze)."""
    shapes, prune = [(33, 65), (7,), (13,)], [True, True, False]
    params = make_params(shapes, device=backend.device)
    uninterrupted = clone_params(params)
    optimizer = build_optimizer(params, backend, prune)
    expected_opt = build_optimizer(uninterrupted, backend, prune)
    run_steps(optimizer, params, 0, t)
    run_steps(expected_opt, uninterrupted, 0, t)
    saved = copy.deepcopy(optimizer.state_dict())
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    optimizer.grad_scale = torch.tensor(65536.0, device=backend.device)
    optimizer.found_inf = torch.tensor(1.0, device=backend.device)
    assert optimizer.step(lambda: 7.0) == 7.0
    del optimizer.grad_scale, optimizer.found_inf
    assert_runs_identical(params, optimizer, uninterrupted, expected_opt)
    after = optimizer.state_dict()
    assert after["mgpp"]["schedule_step"] == saved["mgpp"]["schedule_step"] == t
    run_steps(optimizer, params, t, 30)
    run_steps(expected_opt, uninterrupted, t, 30)
    assert_runs_identical(params, optimizer, uninterrupted, expected_opt)


# ---- torch.amp.GradScaler ----------------------------------------------------------------------

def _scaler_run(backend, scaler, skip_at, unscale_first=False):
    """A tiny model trained for 8 iterations; with a scaler, an inf is injected into a gradient
    at iteration `skip_at`; without one, that iteration is left out."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).to(backend.device)
    optimizer = MGPP([{"params": [model[0].weight, model[2].weight], "prune": True},
                      {"params": [model[0].bias, model[2].bias]}], lr=1e-2, backend=backend.name,
                     num_train_examples=100, initial_warmup_steps=2, total_steps=8,
                     final_warmup_steps=1, pruning_interval=2)
    inputs = torch.randn(8, 8, 16, generator=torch.Generator().manual_seed(1)).to(backend.device)
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
    scaler = torch.amp.GradScaler(any_backend.device, init_scale=2.0 ** 12, growth_interval=1000)
    params, optimizer = _scaler_run(any_backend, scaler, skip_at=3, unscale_first=unscale_first)
    assert scaler.get_scale() == 2.0 ** 11  # the inf halved the scale once
    assert optimizer.stats()["step"] == 7  # one of 8 iterations was skipped
    expected_params, expected = _scaler_run(any_backend, None, skip_at=3)
    assert_runs_identical(params, optimizer, expected_params, expected)
    assert optimizer.stats()["stage"] == "frozen"
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")


# ---- torch.autocast (bfloat16) with GradScaler --------------------------------------------------

# t_i = 3, events at 3, 4, 8 and the freeze at t_end = 16 - 3 - 1 = 12; frozen from 13 on.
SCHEDULE = dict(num_train_examples=200, initial_warmup_steps=3, total_steps=16,
                final_warmup_steps=3, pruning_interval=4, initial_sparsity=0.3,
                final_sparsity=0.7)
SKIP_AT = {"dense": 1, "first_event": 3, "cubic_event": 8, "freeze": 12, "frozen": 14}


def build(backend, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model = model.to(device=backend.device, dtype=dtype)
    optimizer = MGPP([{"params": [model[0].weight, model[2].weight], "prune": True},
                      {"params": [model[0].bias, model[2].bias], "prune": False}],
                     lr=1e-2, weight_decay=0.01, backend=backend.name, **SCHEDULE)
    return model, optimizer


def batch(index: int, device):
    generator = torch.Generator().manual_seed(100 + index)
    x = torch.randn(8, 16, generator=generator)
    y = torch.randint(0, 4, (8,), generator=generator)
    return x.to(device), y.to(device)


def amp_step(model, optimizer, scaler, index: int, corrupt=None) -> None:
    """One iteration under autocast; `corrupt` puts inf or NaN into the first gradient."""
    device = model[0].weight.device
    x, y = batch(index, device)
    optimizer.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.to(model[0].weight.dtype)), y)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if corrupt is not None:
        model[0].weight.grad[0, 0] = corrupt
    scaler.step(optimizer)
    scaler.update()


def assert_models_identical(a, b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_bitwise_equal(p, q, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_of_two_loss_scale_changes_nothing(any_backend, dtype):
    scaled, scaled_opt = build(any_backend, dtype)
    plain, plain_opt = build(any_backend, dtype)
    scaler = torch.amp.GradScaler(any_backend.device, init_scale=2.0 ** 16)
    for index in range(SCHEDULE["total_steps"]):
        amp_step(scaled, scaled_opt, scaler, index)
        amp_step(plain, plain_opt, None, index)
    assert_models_identical(scaled, plain)
    assert scaled_opt.stats()["stage"] == "frozen"
    assert scaled_opt.stats()["sparsity"] == pytest.approx(0.7, abs=0.01)


CORRUPTIONS = [(position, corrupt) for position in sorted(SKIP_AT)
               for corrupt in (float("inf"), float("nan"))]


@pytest.mark.parametrize("backend,position,corrupt", backends.over(
    backends.ROWS, CORRUPTIONS,
    small_cases=[("first_event", float("nan")), ("freeze", float("inf")),
                 ("frozen", float("nan"))]))
def test_nonfinite_gradient_skips_the_step_exactly(backend, position, corrupt):
    skip_at = SKIP_AT[position]
    model, optimizer = build(backend)
    scaler = torch.amp.GradScaler(backend.device, init_scale=2.0 ** 16)
    for index in range(skip_at):
        amp_step(model, optimizer, scaler, index)
    params = list(model.parameters())
    before = snapshot(optimizer, params)
    assert before["mgpp"]["schedule_step"] == skip_at
    amp_step(model, optimizer, scaler, skip_at, corrupt=corrupt)
    assert_unchanged(optimizer, params, before)
    assert optimizer.state_dict()["mgpp"]["schedule_step"] == skip_at
    assert scaler.get_scale() == 2.0 ** 15   # the scaler saw the inf and backed off
    # The rest of the run equals a run that never saw the skipped batch.
    for index in range(skip_at + 1, SCHEDULE["total_steps"] + 1):
        amp_step(model, optimizer, scaler, index)
    clean, clean_opt = build(backend)
    clean_scaler = torch.amp.GradScaler(backend.device, init_scale=2.0 ** 16)
    for index in [i for i in range(SCHEDULE["total_steps"] + 1) if i != skip_at]:
        amp_step(clean, clean_opt, clean_scaler, index)
    assert_models_identical(model, clean)
    assert optimizer.state_dict()["mgpp"]["schedule_step"] == SCHEDULE["total_steps"]
    for p, q in zip(model.parameters(), clean.parameters()):
        for key, value in clean_opt.state[q].items():
            assert_bitwise_equal(optimizer.state[p][key], value, key)


def test_bfloat16_parameters_keep_float32_state(kernel_backend):
    """bfloat16 parameters under autocast and GradScaler: θ stays bfloat16, m and v are float32,
    and the kernel backend follows the reference backend (every element within 2 bfloat16 ulps,
    the same frozen mask)."""
    runs = {}
    for row in (kernel_backend, REFERENCE):
        model, optimizer = build(row, torch.bfloat16)
        scaler = torch.amp.GradScaler(row.device)
        for index in range(SCHEDULE["total_steps"]):
            amp_step(model, optimizer, scaler, index)
        for p in model.parameters():
            assert p.dtype == torch.bfloat16
            state = optimizer.state[p]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            assert state["step"].item() == SCHEDULE["total_steps"]
        runs[row.name] = (model, optimizer)
    (model, optimizer), (ref_model, ref_optimizer) = runs[kernel_backend.name], runs["reference"]
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        diff = (p.detach().cpu().double() - r.detach().double()).abs()
        assert bool((diff <= 2 * ulp(r.detach(), torch.bfloat16)).all()), name
    for p, r in zip(model.parameters(), ref_model.parameters()):
        if "keep_mask" in ref_optimizer.state[r]:
            assert torch.equal(masks.unpack_mask(optimizer.state[p]["keep_mask"], p).cpu(),
                               masks.unpack_mask(ref_optimizer.state[r]["keep_mask"], r))
