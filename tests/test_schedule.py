"""The schedule of docs/spec.md §2 at its boundaries, against values computed by hand.

SCHEDULE (tests/helpers.py): t_i = 4, T = 30, t_f = 5 so t_end = 24, ΔT = 7, s_i = 0.3, s_f = 0.9,
λ = 0.1, α_f = 1e-3; t_end - t_i = 20.
"""
import pytest
import torch

from mgpp_kernels import MGPPConfig, masks, reference, schedule
from mgpp_kernels.ops import layout
from mgpp_kernels.pools import Pool
from mgpp_kernels.prior import prior_c1

from helpers import SCHEDULE, build_optimizer, make_params, run_steps

CONFIG = MGPPConfig(**SCHEDULE)

# t: (stage, prior_on, lambda_t, prune_to, freeze, frozen), by hand from docs/spec.md §2:
#   α(t) = α_f + (1 - α_f)·(1 - (t - 4)/20) for 4 < t < 24, s(t) = 0.9 - 0.6·(1 - (t - 4)/20)³.
EXPECTED = {
    0: ("dense", True, 0.1, None, False, False),            # a multiple of ΔT before t_i
    3: ("dense", True, 0.1, None, False, False),            # t_i - 1
    4: ("pruning", True, 0.1, 0.3, False, False),           # t_i: prune to s_i, α = 1
    5: ("pruning", True, 0.1 * 0.95005, None, False, False),   # t_i + 1: α = .001 + .999·.95
    7: ("pruning", True, 0.1 * 0.85015, 0.531525, False, False),   # 0.9 - 0.6·0.85³
    14: ("pruning", True, 0.1 * 0.5005, 0.825, False, False),      # 0.9 - 0.6·0.5³
    21: ("pruning", True, 0.1 * 0.15085, 0.897975, False, False),  # 0.9 - 0.6·0.15³
    23: ("pruning", True, 0.1 * 0.05095, None, False, False),  # t_end - 1
    24: ("frozen", True, 1e-4, 0.9, True, False),             # t_end: prune to s_f, freeze
    25: ("frozen", False, 1e-4, None, False, True),           # t_end + 1: prior off, mask frozen
    28: ("frozen", False, 1e-4, None, False, True),           # a multiple of ΔT after t_end
    29: ("frozen", False, 1e-4, None, False, True),           # the last step, T - 1
}


def test_t_end():
    assert CONFIG.t_end == 24
    assert MGPPConfig(**dict(SCHEDULE, final_warmup_steps=0)).t_end == 29


@pytest.mark.parametrize("t", sorted(EXPECTED))
def test_schedule_point(t):
    stage, prior_on, lambda_t, prune_to, freeze, frozen = EXPECTED[t]
    point = schedule.schedule_at(CONFIG, t)
    assert point.t == t
    assert point.stage == stage
    assert point.prior_on is prior_on
    assert point.lambda_t == pytest.approx(lambda_t, rel=1e-12)
    if prune_to is None:
        assert point.prune_to is None
    else:
        assert point.prune_to == pytest.approx(prune_to, rel=1e-12)
    assert point.freeze is freeze
    assert point.frozen is frozen


def test_events_are_exactly_the_listed_steps():
    events = {t: schedule.target_sparsity(CONFIG, t) for t in range(40)}
    assert sorted(t for t, s in events.items() if s is not None) == [4, 7, 14, 21, 24]


def test_lambda_factor_is_continuous_and_decreasing_through_the_pruning_stage():
    factors = [schedule.lambda_factor(CONFIG, t) for t in range(30)]
    assert factors[:5] == [1.0] * 5
    assert factors[24:] == [1e-3] * 6
    assert all(a > b for a, b in zip(factors[4:25], factors[5:25]))


def test_first_step_prunes_when_t_i_is_zero_and_t_end_is_a_multiple_of_the_interval():
    config = MGPPConfig(num_train_examples=10, initial_warmup_steps=0, total_steps=21,
                        pruning_interval=5, initial_sparsity=0.5, final_sparsity=0.8)
    assert config.t_end == 20
    expected = {0: 0.5, 5: 0.8 - 0.3 * 0.75 ** 3, 10: 0.8 - 0.3 * 0.5 ** 3,
                15: 0.8 - 0.3 * 0.25 ** 3, 20: 0.8}
    events = {t: schedule.target_sparsity(config, t) for t in range(25)}
    assert {t: s for t, s in events.items() if s is not None} == pytest.approx(expected, rel=1e-12)
    assert schedule.schedule_at(config, 20).freeze
    assert schedule.schedule_at(config, 0).lambda_t == 0.1


def test_interval_one_prunes_every_step_of_the_pruning_stage():
    config = MGPPConfig(num_train_examples=10, initial_warmup_steps=2, total_steps=8,
                        pruning_interval=1)
    assert [t for t in range(10) if schedule.target_sparsity(config, t) is not None] == \
        [2, 3, 4, 5, 6, 7]


def test_t_i_just_before_t_end():
    config = MGPPConfig(num_train_examples=10, initial_warmup_steps=5, total_steps=8,
                        final_warmup_steps=1, pruning_interval=3, initial_sparsity=0.2,
                        final_sparsity=0.6)
    assert config.t_end == 6
    assert schedule.target_sparsity(config, 5) == 0.2
    assert schedule.target_sparsity(config, 6) == 0.6
    assert schedule.lambda_factor(config, 6) == config.lambda_final_factor


def _distinct_magnitudes(n, seed):
    """Values with distinct magnitudes around the spike/slab transition (|θ| ≈ 5e-5), where the
    prior gradient depends visibly on λ_t."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.linspace(2e-5, 1.2e-4, n, dtype=torch.float64).float()
    signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    return (magnitudes * signs)[torch.randperm(n, generator=generator)]


def test_optimizer_follows_the_schedule(any_backend):
    """With lr = 0 only pruning changes θ, and with β1 = 0 and zero gradients exp_avg is this
    step's prior gradient: the optimizer's events, λ_t, prior on/off and frozen mask are read off
    the state after every step."""
    values = _distinct_magnitudes(1000, seed=1)
    params = [torch.nn.Parameter(values[:600].clone().view(20, 30).to(any_backend.device)),
              torch.nn.Parameter(values[600:].clone().to(any_backend.device))]
    optimizer = build_optimizer(params, any_backend, [True, True], lr=0.0, betas=(0.0, 0.999))
    numel = 1000
    zeros_before = 0
    for t in range(30):
        point = schedule.schedule_at(CONFIG, t)  # checked against EXPECTED above
        lambda_t = EXPECTED[t][2] if t in EXPECTED else point.lambda_t
        before = [p.detach().cpu().clone() for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()

        zeros = sum(int((p == 0).sum()) for p in params)
        if point.prune_to is not None:
            # distinct magnitudes: τ is the k-th smallest and survives, k - 1 are below it
            assert zeros == int(numel * point.prune_to) - 1, f"t={t}"
        else:
            assert zeros == zeros_before, f"t={t}: pruned without an event"
        zeros_before = zeros
        for b, p in zip(before, params):
            p = p.detach().cpu()
            kept = p != 0
            assert torch.equal(p[kept], b[kept]), f"t={t}: lr=0 moved a weight"

        for b, p in zip(before, params):
            exp_avg = optimizer.state[p]["exp_avg"].cpu()
            if point.prior_on:
                expected = reference.prior_gradient(b, lambda_t, 1e-10, 0.05, 1000)
                torch.testing.assert_close(exp_avg, expected, rtol=1e-5, atol=0,
                                           msg=f"t={t}: prior gradient at λ_t={lambda_t}")
            else:
                assert torch.equal(exp_avg, torch.zeros_like(exp_avg)), f"t={t}: prior is on"

        stats = optimizer.stats()
        assert stats["step"] == t + 1
        assert stats["stage"] == point.stage
        assert stats["lambda_t"] == pytest.approx(lambda_t, rel=1e-12)
        assert stats["sparsity"] == zeros / numel
        if t >= 4:
            last_event = max(e for e in (4, 7, 14, 21, 24) if e <= t)
            assert stats["target_sparsity"] == pytest.approx(
                schedule.target_sparsity(CONFIG, last_event), rel=1e-12)
            assert stats["pruned"] == int(numel * stats["target_sparsity"]) - 1
        else:
            assert stats["target_sparsity"] == 0.0 and stats["tau"] is None
        has_mask = ["keep_mask" in optimizer.state[p] for p in params]
        assert has_mask == [t >= 24] * 2, f"t={t}: keep masks {has_mask}"


def test_frozen_mask_is_reapplied_after_every_update(any_backend):
    """After t_end the positions pruned at the freeze stay zero although their gradients push
    them, and the others keep moving."""
    params = make_params([(500,)], scale=0.05, device=any_backend.device)
    optimizer = build_optimizer(params, any_backend, [True], lr=1e-2)
    run_steps(optimizer, params, 0, 25)
    keep = masks.unpack_mask(optimizer.state[params[0]]["keep_mask"], params[0])
    assert torch.equal(keep, params[0] != 0)
    # k = 450 of 500 at s_f = 0.9: τ itself and its ties (weights regrown from 0 alike) are kept.
    assert 400 <= int((~keep).sum()) == optimizer.stats()["pruned"] <= 449
    for t in range(25, 30):
        before = params[0].detach().clone()
        run_steps(optimizer, params, t, t + 1)
        assert torch.equal(params[0][~keep].cpu(), torch.zeros(int((~keep).sum()))), f"t={t}"
        assert (params[0][keep] != before[keep]).all(), f"t={t}"


def test_device_schedule_rows_are_the_host_schedule():
    """The table a device-scheduled step reads (docs/spec.md §2 per t, over N = 100)."""
    pool = Pool(None, CONFIG.initial_sparsity, CONFIG.final_sparsity)
    rows = schedule.device_schedule_rows(CONFIG, lambda point: pool.plan(point, 100))
    t_end = CONFIG.t_end
    assert len(rows) == t_end + 2
    column = {name: [row[j] for row in rows] for j, name in enumerate(layout.SCHEDULE_COLUMNS)}
    # Events at t_i = 4, the multiples of 7 and t_end = 24 (the freeze); k = int(100 s).
    assert [t for t, k in enumerate(column["k"]) if k] == [4, 7, 14, 21, 24]
    assert column["k"][4] == 30.0 and column["k"][24] == 90.0
    assert [t for t, f in enumerate(column["freeze"]) if f] == [24]
    assert column["prior_on"] == [1.0] * (t_end + 1) + [0.0]
    assert column["c1"][t_end + 1] == 0.0
    for t in (0, 5, 23, 24):
        assert column["c1"][t] == prior_c1(schedule.schedule_at(CONFIG, t).lambda_t,
                                           CONFIG.sigma0_sq, CONFIG.sigma1_sq)
