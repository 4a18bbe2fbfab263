"""Pools and N:M patterns (docs/spec.md §5) through the optimizer, on every backend of the table
that ranks N:M pools: each pool's τ at every event is torch.kthvalue over that pool's candidates,
its zeros are exactly the ones the rule names, the frozen mask is N:M, stats() reports each pool,
and a state_dict resumes exactly; the param-group keys are checked before anything changes."""
from __future__ import annotations

import copy

import pytest
import torch

from mgpp_kernels import MGPP, param_groups, reference
from mgpp_kernels.backends.types import PruneEvent
from mgpp_kernels.masks import pack_mask
from mgpp_kernels.patterns import NMPattern, parse_pattern
from mgpp_kernels.schedule import prune_count, schedule_at

import backends
from step_inputs import StepTensors

# Events at t_i = 2, at 4, 6, 8, 10, and the freeze at t_end = 11.
SCHEDULE = dict(num_train_examples=100, initial_warmup_steps=2, total_steps=12,
                pruning_interval=2)
TWO_FOUR = NMPattern(2, 4)


def _pools(device, dtypes):
    """Three pools (unstructured to 50%, unstructured to 90%, 2:4) and a 3:6 pool, of mixed
    dtypes and shapes that break kernels (a row of exactly M, one group, M = 16-wide rows), and
    a group that is not pruned. Returns the param groups and, per pool, (params, pattern)."""
    generator = torch.Generator().manual_seed(7)

    def make(*shape, dtype=torch.float32):
        return torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device,
                                                                               dtype=dtype))
    half, other = dtypes
    fifty = [make(7, 16), make(1, 8, dtype=half)]
    ninety = [make(33, 12, dtype=other)]
    two_four = [make(5, 8), make(1, 4, dtype=half), make(17, 16, dtype=other)]
    three_six = [make(4, 6), make(2, 12, dtype=half)]
    dense = [make(10)]
    groups = [{"params": fifty, "prune": True, "final_sparsity": 0.5},
              {"params": ninety, "prune": True, "final_sparsity": 0.9},
              {"params": two_four, "prune": True, "pattern": "2:4"},
              {"params": three_six, "prune": True, "pattern": "3:6", "initial_sparsity": 0.1},
              {"params": dense}]
    pools = [(fifty, None), (ninety, None), (two_four, TWO_FOUR), (three_six, NMPattern(3, 6))]
    return groups, pools


def _set_grads(groups, generator):
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype)


def _expected_event(optimizer, pool_index, before, pattern, t):
    """(τ, each parameter after the event) by the rule, from the values before the step (lr = 0
    and no prior: the update leaves them as they are, on every backend)."""
    pool = optimizer._pools()[0][pool_index]
    point = schedule_at(optimizer.config, t)
    sparsity = pool.target(point)
    if sparsity is None:
        return None
    k = prune_count(sum(p.numel() for p in before), sparsity, pattern)
    if k == 0:
        return None
    tau = reference.global_threshold(before, k, pattern)
    return tau, [b.masked_fill(~reference.keep_mask(b, tau, pattern), 0) for b in before]


@pytest.mark.parametrize("row", backends.params(backends.ROWS, requires=("ranks_nm_pools",)))
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "device"])
def test_every_pool_prunes_to_its_own_exact_threshold(row, capturable):
    if capturable and not row.schedules_on_device:
        pytest.skip(row.missing("schedules_on_device"))
    groups, pools = _pools(row.device, (torch.bfloat16, torch.float16))
    optimizer = MGPP(groups, lr=0.0, weight_decay=0.0, backend=row.name, use_prior=False,
                     capturable=capturable, **SCHEDULE)
    generator = torch.Generator().manual_seed(8)
    events = [0] * len(pools)
    for t in range(SCHEDULE["total_steps"]):
        before = [[p.detach().cpu().clone() for p in params] for params, _ in pools]
        _set_grads(groups, generator)
        optimizer.step()
        stats = optimizer.stats()
        for i, ((params, pattern), values) in enumerate(zip(pools, before)):
            expected = _expected_event(optimizer, i, values, pattern, t)
            if expected is None:
                for p, b in zip(params, values):
                    assert torch.equal(p.detach().cpu(), b), f"t={t} pool {i}: no event here"
                continue
            events[i] += 1
            tau, after = expected
            assert stats["pools"][i]["tau"] == float(tau), f"t={t} pool {i}: τ"
            zeroed = sum(int(((b != 0) | b.isnan()).sum() - ((a != 0) | a.isnan()).sum())
                         for a, b in zip(after, values))
            for j, (p, a) in enumerate(zip(params, after)):
                assert torch.equal(p.detach().cpu().view(torch.uint8), a.view(torch.uint8)), (
                    f"t={t} pool {i} parameter {j}")
            assert stats["pools"][i]["pruned"] >= zeroed
    assert events == [6] * len(pools)
    final = optimizer.stats()
    assert [pool["pattern"] for pool in final["pools"]] == ["unstructured", "unstructured", "2:4",
                                                             "3:6"]
    for params, pattern in pools[2:]:
        for p in params:
            groups_of_m = p.detach().cpu().reshape(-1, pattern.m)
            assert int((groups_of_m != 0).sum(dim=1).max()) <= pattern.n
    assert final["pools"][2]["event_sparsity"] == 0.5
    assert final["pools"][3]["event_sparsity"] == 0.5


def _run(optimizer, groups, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _set_grads(groups, generator)
        optimizer.step()


@pytest.mark.parametrize("row", backends.params(backends.ROWS, requires=("ranks_nm_pools",)))
def test_a_state_dict_with_pools_resumes_exactly(row):
    """Saved after the second event (pools mid-schedule), loaded into a new optimizer, the run
    continues bit for bit as the uninterrupted one, through the freeze."""
    def build():
        groups, _ = _pools(row.device, (torch.bfloat16, torch.float16))
        return groups, MGPP(groups, lr=1e-2, backend=row.name, **SCHEDULE)
    groups, optimizer = build()
    _run(optimizer, groups, 5, seed=1)
    saved = copy.deepcopy(optimizer.state_dict())
    saved_params = [p.detach().clone() for g in groups for p in g["params"]]
    _run(optimizer, groups, 8, seed=2)
    resumed_groups, resumed = build()
    with torch.no_grad():
        for p, value in zip((p for g in resumed_groups for p in g["params"]), saved_params):
            p.copy_(value)
    resumed.load_state_dict(saved)
    _run(resumed, resumed_groups, 8, seed=2)
    for a, b in zip((p for g in groups for p in g["params"]),
                    (p for g in resumed_groups for p in g["params"])):
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8))
    assert resumed.stats() == optimizer.stats()


def test_a_state_dict_of_other_pools_is_refused_before_anything_changes():
    groups, _ = _pools("cpu", (torch.float32, torch.float32))
    optimizer = MGPP(groups, lr=1e-2, backend="reference", **SCHEDULE)
    _run(optimizer, groups, 3, seed=1)
    saved = optimizer.state_dict()
    other_groups, _ = _pools("cpu", (torch.float32, torch.float32))
    other_groups[1]["final_sparsity"] = 0.8
    other = MGPP(other_groups, lr=1e-2, backend="reference", **SCHEDULE)
    saved["mgpp"]["pools"][1]["pool"] = "unstructured 0.3 -> 0.8"
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="pools"):
        other.load_state_dict(saved)
    assert other.state_dict()["mgpp"] == before["mgpp"]
    assert other.param_groups[1]["final_sparsity"] == 0.8


@pytest.mark.filterwarnings("ignore:MGPP. no param group has prune=True")
@pytest.mark.parametrize("group, message", [
    ({"pattern": "2:5"}, "divisible by 5"),
    ({"pattern": "4:4"}, "1 <= N < M <= 16"),
    ({"pattern": "2:17"}, "1 <= N < M <= 16"),
    ({"pattern": "two:four"}, "'N:M'"),
    ({"pattern": "2:4", "final_sparsity": 0.6}, r"at most \(M − N\)/M = 0.5"),
    ({"initial_sparsity": 0.7, "final_sparsity": 0.6}, "initial_sparsity must be <="),
    ({"final_sparsity": 1.0}, r"final_sparsity must be in \[0, 1\)"),
    ({"final_sparsity": float("nan")}, "final_sparsity must be a finite number"),
])
def test_bad_pool_keys_are_refused_naming_the_key(group, message):
    weight = torch.nn.Parameter(torch.randn(3, 8))
    with pytest.raises(ValueError, match=message):
        MGPP([{"params": [weight], "prune": True, **group}], backend="reference", **SCHEDULE)
    optimizer = MGPP([{"params": [torch.nn.Parameter(torch.randn(4))]}], backend="reference",
                     **SCHEDULE)
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [weight], "prune": True, **group})
    assert len(optimizer.param_groups) == 1


def test_pool_keys_without_prune_and_a_shapeless_candidate_are_refused():
    with pytest.raises(ValueError, match="without prune=True"):
        MGPP([{"params": [torch.nn.Parameter(torch.randn(4))], "pattern": "2:4"}],
             backend="reference", **SCHEDULE)
    with pytest.raises(ValueError, match="divisible by 4"):
        MGPP([{"params": [torch.nn.Parameter(torch.randn(()))], "prune": True, "pattern": "2:4"}],
             backend="reference", **SCHEDULE)


def test_pool_defaults_follow_the_pattern_and_the_optimizer():
    weight = torch.nn.Parameter(torch.randn(4, 8))
    optimizer = MGPP([{"params": [weight], "prune": True, "pattern": "3:4"}], backend="reference",
                     initial_sparsity=0.3, final_sparsity=0.9, **SCHEDULE)
    pool, = optimizer._pools()[0]
    assert (pool.pattern, pool.initial_sparsity, pool.final_sparsity) == (NMPattern(3, 4), 0.25,
                                                                          0.25)
    assert parse_pattern("unstructured") is None


def test_nm_k_takes_every_candidate_at_the_pattern_sparsity():
    """k = int(N·s), and every candidate from s = (M − N)/M on, where N·s rounds below it."""
    three = NMPattern(2, 3)
    assert prune_count(300, 1 / 3, three) == 100
    assert prune_count(300, 0.2, three) == 60
    assert prune_count(16, 0.5, TWO_FOUR) == 8


def test_param_groups_take_per_candidate_targets_and_a_pattern():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
    for layer in model.layers:
        layer.self_attn = torch.nn.Module()
        layer.self_attn.q_proj = torch.nn.Linear(8, 8)
        layer.mlp = torch.nn.Module()
        layer.mlp.up_proj = torch.nn.Linear(8, 16)
    groups = param_groups(model, sparsity={"layers.0.self_attn.q_proj.weight": 0.4,
                                           r"mlp\.up_proj": 0.5}, pattern="2:4")
    pruned = [g for g in groups if g["prune"]]
    by_target = {g.get("final_sparsity"): [id(p) for p in g["params"]] for g in pruned}
    assert by_target == {0.4: [id(model.layers[0].self_attn.q_proj.weight)],
                         0.5: [id(model.layers[0].mlp.up_proj.weight),
                               id(model.layers[1].mlp.up_proj.weight)],
                         None: [id(model.layers[1].self_attn.q_proj.weight)]}
    assert all(g["pattern"] == "2:4" for g in pruned)
    with pytest.raises(ValueError, match="match no pruning candidate"):
        param_groups(model, sparsity={"decoder": 0.5})
    with pytest.raises(ValueError, match="different targets"):
        param_groups(model, sparsity={"layers": 0.5, "q_proj": 0.4})


# Large enough for several chunks of the cpu kernels (32768 elements) and many blocks; a group
# size the cpu ranks with code compiled for it (4) and one it ranks generically (6).
LARGE_POOLS = [(NMPattern(2, 4), [(300, 128), (3, 4)], torch.float32),
               (NMPattern(3, 6), [(120, 330), (1, 6)], torch.bfloat16)]
SMALL_POOLS = [(NMPattern(2, 4), [(9, 16), (3, 4)], torch.float32),
               (NMPattern(3, 6), [(4, 18), (1, 6)], torch.bfloat16)]


@pytest.mark.parametrize("row", backends.params(backends.KERNELS, requires=("ranks_nm_pools",)))
def test_nm_events_rank_the_updated_values_of_each_group(row):
    """Backend level, with a real update (lr > 0, the prior on): each N:M pool's τ is kthvalue
    over the candidates of the values the same update gives without an event, bit for bit, and
    the zeros, masks and pruned counts are the rule's."""
    backend = row.load()
    layouts = row.pick(LARGE_POOLS, SMALL_POOLS)

    def inputs():
        return [StepTensors.make(shapes, dtype, torch.float32, seed=30 + i, device=row.device)
                for i, (_, shapes, dtype) in enumerate(layouts)]
    pruned_inputs, plain_inputs = inputs(), inputs()
    backend.step([t.group() for t in plain_inputs], [], None)
    events, expected = [], []
    for (pattern, _, _), pruned, plain in zip(layouts, pruned_inputs, plain_inputs):
        updated = [p.cpu() for p in plain.params]
        candidates = sum(p.numel() for p in updated) // pattern.m * pattern.prunable
        k = candidates * 3 // 4
        masks = [torch.full(((p.numel() + 7) // 8,), 0xA5, dtype=torch.uint8, device=row.device)
                 for p in pruned.params]
        events.append(PruneEvent(params=pruned.params, k=k, keep_masks=masks, pattern=pattern))
        tau = reference.global_threshold(updated, k, pattern)
        keeps = [reference.keep_mask(u, tau, pattern) for u in updated]
        expected.append((tau, updated, keeps))
    thresholds = backend.step([t.group(event=j) for j, t in enumerate(pruned_inputs)], events,
                              None)
    for j, (threshold, event, (tau, updated, keeps)) in enumerate(
            zip(thresholds, events, expected)):
        assert torch.equal(threshold.tau.cpu().view(torch.int32), tau.view(torch.int32)), j
        assert int(threshold.pruned) == sum(int((~keep).sum()) for keep in keeps), j
        for p, u, keep, mask in zip(event.params, updated, keeps, event.keep_masks):
            assert torch.equal(p.cpu().view(torch.uint8), u.masked_fill(~keep, 0).view(torch.uint8))
            assert torch.equal(mask.cpu(), pack_mask(keep))


def test_a_backend_that_does_not_rank_nm_pools_refuses_them(monkeypatch):
    from mgpp_kernels.backends import reference as reference_backend
    monkeypatch.setattr(reference_backend.BACKEND, "ranks_nm_pools", False)
    weight = torch.nn.Parameter(torch.randn(3, 8))
    with pytest.raises(ValueError, match="does not rank N:M pools"):
        MGPP([{"params": [weight], "prune": True, "pattern": "2:4"}], backend="reference",
             **SCHEDULE)


def test_a_state_dict_saved_before_pools_loads_into_its_one_pool():
    """The "mgpp" entry of a state_dict saved before pools held the last event at its top level
    (last_tau, last_below, ...): it loads as the one pool's last event."""
    weight = torch.nn.Parameter(torch.randn(6, 8))
    optimizer = MGPP([{"params": [weight], "prune": True}], backend="reference", **SCHEDULE)
    weight.grad = torch.ones_like(weight)
    for _ in range(3):
        optimizer.step()
    saved = optimizer.state_dict()
    pool, = saved["mgpp"].pop("pools")
    saved["mgpp"].update(last_target=pool["last_target"], last_tau=pool["last_tau"],
                         last_below=pool["last_pruned"], last_numel=pool["last_numel"])
    loaded = MGPP([{"params": [weight], "prune": True}], backend="reference", **SCHEDULE)
    loaded.load_state_dict(saved)
    assert loaded.stats() == optimizer.stats()
    assert loaded.stats()["tau"] is not None
