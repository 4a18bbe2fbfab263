"""Mixed precision on the CPU: torch.autocast (bfloat16) with torch.amp.GradScaler("cpu").

- A power-of-two loss scale changes nothing: the scaled run equals the unscaled one bit for bit.
- An inf or NaN gradient skips the step exactly (SPEC §2): no parameter, moment, step count or
  schedule position moves, at every stage; the run then equals one that never saw that batch.
- bfloat16 parameters keep float32 moments and stay bfloat16.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mgpp_kernels
from mgpp_kernels import MGPP
from mgpp_kernels.masks import unpack_mask

from reliability_helpers import assert_bitwise_equal, assert_unchanged, snapshot, ulp

BACKENDS = [b for b in ("cpu", "reference") if b in mgpp_kernels.available_backends()]
# t_i = 3, events at 3, 4, 8 and the freeze at t_end = 16 - 3 - 1 = 12; frozen from 13 on.
SCHEDULE = dict(num_train_examples=200, initial_warmup_steps=3, total_steps=16,
                final_warmup_steps=3, pruning_interval=4, initial_sparsity=0.3,
                final_sparsity=0.7)
SKIP_AT = {"dense": 1, "first_event": 3, "cubic_event": 8, "freeze": 12, "frozen": 14}


def build(backend: str, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model = model.to(dtype)
    optimizer = MGPP([{"params": [model[0].weight, model[2].weight], "prune": True},
                      {"params": [model[0].bias, model[2].bias], "prune": False}],
                     lr=1e-2, weight_decay=0.01, backend=backend, **SCHEDULE)
    return model, optimizer


def batch(index: int):
    generator = torch.Generator().manual_seed(100 + index)
    return torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def amp_step(model, optimizer, scaler, index: int, corrupt=None) -> None:
    """One iteration under autocast; `corrupt` puts inf or NaN into the first gradient."""
    x, y = batch(index)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
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
        assert_bitwise_equal(p.detach(), q.detach(), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_power_of_two_loss_scale_changes_nothing(backend, dtype):
    scaled, scaled_opt = build(backend, dtype)
    plain, plain_opt = build(backend, dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for index in range(SCHEDULE["total_steps"]):
        amp_step(scaled, scaled_opt, scaler, index)
        amp_step(plain, plain_opt, None, index)
    assert_models_identical(scaled, plain)
    assert scaled_opt.stats()["stage"] == "frozen"
    assert scaled_opt.stats()["sparsity"] == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("corrupt", [float("inf"), float("nan")])
@pytest.mark.parametrize("position", sorted(SKIP_AT))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_skips_the_step_exactly(backend, position, corrupt):
    skip_at = SKIP_AT[position]
    model, optimizer = build(backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
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
    clean_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for index in [i for i in range(SCHEDULE["total_steps"] + 1) if i != skip_at]:
        amp_step(clean, clean_opt, clean_scaler, index)
    assert_models_identical(model, clean)
    assert optimizer.state_dict()["mgpp"]["schedule_step"] == SCHEDULE["total_steps"]
    for p, q in zip(model.parameters(), clean.parameters()):
        for key, value in clean_opt.state[q].items():
            assert_bitwise_equal(optimizer.state[p][key], value, key)


def test_bfloat16_parameters_keep_float32_state():
    """bfloat16 parameters under autocast and GradScaler: θ stays bfloat16, m and v are float32,
    and the cpu backend follows the reference backend (every element within 2 bfloat16 ulps,
    the same frozen mask)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not built")
    runs = {}
    for backend in ("cpu", "reference"):
        model, optimizer = build(backend, torch.bfloat16)
        scaler = torch.amp.GradScaler("cpu")
        for index in range(SCHEDULE["total_steps"]):
            amp_step(model, optimizer, scaler, index)
        for p in model.parameters():
            assert p.dtype == torch.bfloat16
            state = optimizer.state[p]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            assert state["step"].item() == SCHEDULE["total_steps"]
        runs[backend] = (model, optimizer)
    (model, optimizer), (ref_model, ref_optimizer) = runs["cpu"], runs["reference"]
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        diff = (p.detach().double() - r.detach().double()).abs()
        assert bool((diff <= 2 * ulp(r.detach(), torch.bfloat16)).all()), name
    for p, r in zip(model.parameters(), ref_model.parameters()):
        if "keep_mask" in ref_optimizer.state[r]:
            assert torch.equal(unpack_mask(optimizer.state[p]["keep_mask"], p),
                               unpack_mask(ref_optimizer.state[r]["keep_mask"], r))
