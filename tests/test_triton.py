"""What is particular to the triton backend (its agreement with the reference, one step, τ, whole
runs, is in the conformance suites over tests/backends.py): its shared math element by element
through the interpreter, pools and N:M patterns in one step, its launches, cached tables and the
absence of host reads in step(), its step-list checks, and its kernels compiled for real GPU
targets (no GPU needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from mgpp_kernels import MGPP, masks, reference, schedule  # noqa: E402
from mgpp_kernels import optimizer as optimizer_module  # noqa: E402
from mgpp_kernels.backends import load_backend, scalars  # noqa: E402
from mgpp_kernels.backends.device_schedule import DeviceSchedule  # noqa: E402
from mgpp_kernels.backends.types import Prior, PruneEvent  # noqa: E402
from mgpp_kernels.ops.layout import SCHEDULE_COLUMNS  # noqa: E402
from mgpp_kernels.patterns import NMPattern  # noqa: E402
from mgpp_kernels.prior import prior_c1  # noqa: E402
from mgpp_kernels.backends.triton import backend as triton_backend  # noqa: E402
from mgpp_kernels.backends.triton import kernels  # noqa: E402

from compare import assert_bitwise_equal, assert_within, ulp  # noqa: E402
from helpers import make_params  # noqa: E402
from step_inputs import PRIOR, StepTensors, prune_event  # noqa: E402

TRITON = load_backend("triton")
REFERENCE = load_backend("reference")
interpreted = pytest.mark.skipif(not triton_backend.INTERPRETED,
                                 reason="needs TRITON_INTERPRET=1 (CPU tensors)")
# The prior's exp overflows to +inf on purpose (ρ0 = 0); numpy warns about it.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.slow]


def make_model(shapes, dtype, seed=0):
    return make_params(shapes, dtype, seed=seed, scale=0.02)


# ---- the shared math, element by element ------------------------------------------------------

@triton.jit
def _primitives_kernel(x, bf16_bits, f16_bits, exp, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    valid = offsets < n
    value = tl.load(x + offsets, mask=valid, other=0.0)
    tl.store(bf16_bits + offsets, kernels._f32_to_bf16_bits(value), mask=valid)
    tl.store(f16_bits + offsets, kernels._f32_to_f16_bits(value), mask=valid)
    tl.store(exp + offsets, kernels._exp_for_logistic(value), mask=valid)


def special_floats():
    specials = torch.tensor([
        0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000,   # zeros, denormals, min normal
        0x3F808000, 0x3F818000, 0x3F80C000, 0xBF808001,               # bf16 ties and near-ties
        0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000,               # max, rounds to inf, ±inf
        0x7FC00000, 0xFFC00001, 0x7F800001,                           # NaNs
        0x477FF000, 0x477FEFFF, 0x477FE000,                           # fp16: 65520 -> inf, 65504
        0x33800000, 0x33000000, 0x33000001, 0x387FC000, 0x38800000,   # fp16 denormals and ties
        0x42B17218, 0x42B17217, 0x42B00000, 0xC2AC0000, 0xC2AD0000,   # exp: ln(FLT_MAX), ±86
    ], dtype=torch.int64).to(torch.int32)
    random_bits = torch.randint(-2**31, 2**31, (4000,), generator=torch.Generator().manual_seed(9),
                                dtype=torch.int64).to(torch.int32)
    ranged = torch.linspace(-100.0, 100.0, 4001)
    return torch.cat([specials.view(torch.float32), random_bits.view(torch.float32), ranged])


@interpreted
def test_16bit_rounding_and_exp_match_torch_and_float64():
    x = special_floats()
    n = x.numel()
    bf16_bits = torch.empty(n, dtype=torch.uint16)
    f16_bits = torch.empty(n, dtype=torch.uint16)
    exp = torch.empty(n, dtype=torch.float32)
    _primitives_kernel[(1,)](x, bf16_bits, f16_bits, exp, n, BLOCK=triton.next_power_of_2(n))
    # torch rounds to nearest even too (its NaN payloads vary between its code paths).
    nan = x.isnan()
    for name, ours in (("bfloat16", bf16_bits.view(torch.bfloat16)),
                       ("float16", f16_bits.view(torch.float16))):
        assert_bitwise_equal(ours[~nan], x[~nan].to(ours.dtype), name)
        assert ours[nan].isnan().all(), name
    assert (bf16_bits[nan] == 0x7FC0).all()  # csrc/core/formats.h's canonical NaN
    # float16 NaN: quieted, sign and the payload's high bits kept (formats.h, as vcvtps2ph).
    w = x[nan].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    expected = ((w >> 16) & 0x8000) | 0x7E00 | ((w >> 13) & 0x3FF)
    assert torch.equal(f16_bits[nan].to(torch.int64), expected)
    # exp_for_logistic: within 2.5 ulp of exp (docs/spec.md §4: 2.3 without FMA, as the
    # interpreter rounds tl.fma) for inputs in [-86, ln(FLT_MAX)], +inf above, NaN kept,
    # exp(-86) below.
    finite = x.isfinite()
    exact = torch.exp(x.double().clamp(-86.0, 88.72283935546875))
    inside = finite & (x >= -86.0) & (x < 88.72283935546875)  # exp(ln(FLT_MAX) rounded up) = inf
    assert_within(exp[inside], exact[inside], 2.5 * ulp(exact[inside], torch.float32), "exp")
    assert (exp[finite & (x > 88.72283935546875)] == float("inf")).all()
    assert (exp[x.isnan()].isnan()).all() and exp[x == float("inf")].eq(float("inf")).all()
    assert torch.equal(exp[finite & (x < -86.0)],
                       torch.full_like(exp[finite & (x < -86.0)], exp[x == -86.0][0].item()))


# ---- pools and N:M patterns -------------------------------------------------------------------

# One step over four pools, their candidates of mixed dtypes: two unstructured pools, a 2:4 pool
# and a 2:6 pool (M not a power of two: its groups are padded to 8 lanes), with candidates
# without a gradient, beside a group outside every pool. Pools 1 and 3 are bfloat16 only (one
# radix level); 0 and 2 mix fp32 with fp16.
PATTERNS = [None, None, NMPattern(2, 4), NMPattern(2, 6)]
SPARSITIES = [0.5, 0.9, 0.75, 0.6]   # of each pool's candidates
POOL_GROUPS = [  # (dtype, shapes, event)
    (torch.float32, [(1, 4), (3, 4)], 0),
    (torch.float16, [(7, 12)], 0),
    (torch.bfloat16, [(5, 16)], 1),
    (torch.float16, [(5, 16)], 2),
    (torch.float32, [(7, 12)], 2),
    (torch.bfloat16, [(7, 12), (3, 6)], 3),
    (torch.float32, [(3, 4)], None),
]
WITHOUT_GRADIENT = [(torch.bfloat16, (1, 4), 1), (torch.float32, (3, 4), 2)]


def pool_step_inputs(masked):
    """The groups' tensors, and each pool's candidates (the groups' then those without a
    gradient), made alike at every call; `masked`: every candidate carries an all-ones keep mask,
    as on the device schedule before the freeze."""
    tensors = []
    for i, (dtype, shapes, event) in enumerate(POOL_GROUPS):
        group = StepTensors.make(shapes, dtype, torch.float32, seed=10 + i)
        if masked and event is not None:
            group.keep_masks = [masks.pack_mask(torch.ones(shape, dtype=torch.bool))
                                for shape in shapes]
        tensors.append(group)
    candidates = [[p for (_, _, event), group in zip(POOL_GROUPS, tensors) if event == j
                   for p in group.params] for j in range(len(PATTERNS))]
    for i, (dtype, shape, event) in enumerate(WITHOUT_GRADIENT):
        candidates[event].append(make_model([shape], dtype, seed=30 + i)[0].detach())
    return tensors, candidates


def pool_ks(candidates):
    ks = []
    for params, pattern, sparsity in zip(candidates, PATTERNS, SPARSITIES):
        numel = sum(p.numel() for p in params)
        if pattern is not None:
            numel = numel // pattern.m * pattern.prunable
        ks.append(int(numel * sparsity))
    return ks


def updated_without_event():
    """Every candidate after the same update on a step without an event."""
    tensors, candidates = pool_step_inputs(masked=False)
    groups = [group.group(prior=None if event is None else PRIOR, event=None)
              for (_, _, event), group in zip(POOL_GROUPS, tensors)]
    assert TRITON.step(groups, [], None) == []
    return candidates


def assert_pools_pruned_as_the_reference(candidates, keep_masks, taus, pruned):
    """Each pool's τ is the k-th smallest |θ| of its candidates in the update without an event,
    bit for bit; its tensors are those values with exactly reference.keep_mask's zeros, its keep
    masks that mask, its pruned count theirs."""
    updated = updated_without_event()
    for j, (pattern, k) in enumerate(zip(PATTERNS, pool_ks(updated))):
        tau = reference.global_threshold(updated[j], k, pattern)
        assert tau > 0, f"pool {j}"
        assert_bitwise_equal(taus[j], tau, f"pool {j}: tau")
        zeroed = 0
        for i, (param, before, mask) in enumerate(zip(candidates[j], updated[j], keep_masks[j])):
            keep = reference.keep_mask(before, tau, pattern)
            zeroed += int((~keep).sum())
            assert_bitwise_equal(param, before.masked_fill(~keep, 0), f"pool {j}, tensor {i}")
            assert_bitwise_equal(mask, masks.pack_mask(keep), f"pool {j}, keep mask {i}")
        assert zeroed > 0 and int(pruned[j]) == zeroed, f"pool {j}: pruned {int(pruned[j])}"


@interpreted
def test_pools_and_nm_patterns_prune_at_each_pools_exact_threshold_on_the_host_schedule():
    tensors, candidates = pool_step_inputs(masked=False)
    ks = pool_ks(candidates)
    groups = [group.group(prior=None if event is None else PRIOR, event=event)
              for (_, _, event), group in zip(POOL_GROUPS, tensors)]
    keep_masks = [[torch.full((masks.packed_mask_bytes(p.numel()),), 0xA5, dtype=torch.uint8)
                   for p in params] for params in candidates]
    events = [PruneEvent(params, k, pool_masks, pattern=pattern)
              for params, k, pool_masks, pattern in zip(candidates, ks, keep_masks, PATTERNS)]
    thresholds = TRITON.step(groups, events, None)
    assert len(thresholds) == len(events)
    assert_pools_pruned_as_the_reference(candidates, keep_masks,
                                         [threshold.tau for threshold in thresholds],
                                         [threshold.pruned for threshold in thresholds])
    # The group outside every pool is updated as on a step without events.
    outside, = (group for (_, _, event), group in zip(POOL_GROUPS, tensors) if event is None)
    expected, = (group for (_, _, event), group in zip(POOL_GROUPS, pool_step_inputs(False)[0])
                 if event is None)
    TRITON.step([expected.group(prior=None, event=None)], [], None)
    outside.assert_equal(expected, "the group outside every pool")


@interpreted
def test_pools_and_nm_patterns_prune_at_each_pools_exact_threshold_on_the_device_schedule():
    """The same step with the schedule on the device, started by hand as the optimizer does: a
    table per pool whose row t = 0 prunes to its k and freezes (writing the keep masks), and
    after which nothing prunes; λ_t's c1 comes from the row. A second step prunes nothing and
    keeps each pool's τ and pruned count."""
    tensors, candidates = pool_step_inputs(masked=True)
    c1 = prior_c1(PRIOR.lambda_t, PRIOR.sigma0_sq, PRIOR.sigma1_sq)
    rows = [[dict(prior_on=1.0, c1=c1, k=float(k), freeze=1.0),
             dict(prior_on=0.0, c1=0.0, k=0.0, freeze=1.0)] for k in pool_ks(candidates)]
    tables = [[[row[name] for name in SCHEDULE_COLUMNS] for row in pool] for pool in rows]
    schedule = DeviceSchedule(on=True)
    schedule.start(tables, [sum(p.numel() for p in params) for params in candidates],
                   [pattern is not None for pattern in PATTERNS], t=0,
                   last_thresholds=[None] * len(PATTERNS), device=torch.device("cpu"))
    device_prior = Prior(None, PRIOR.sigma0_sq, PRIOR.sigma1_sq, PRIOR.num_train_examples)
    groups = [group.group(prior=None if event is None else device_prior, event=event)
              for (_, _, event), group in zip(POOL_GROUPS, tensors)]
    by_param = {id(p): mask for group in tensors for p, mask in zip(group.params,
                                                                      group.keep_masks)}
    keep_masks = [[by_param[id(p)] if id(p) in by_param
                   else masks.pack_mask(torch.ones(p.shape, dtype=torch.bool)) for p in params]
                  for params in candidates]
    events = [PruneEvent(params, None, pool_masks, pattern=pattern)
              for params, pool_masks, pattern in zip(candidates, keep_masks, PATTERNS)]
    assert TRITON.step(groups, events, None, schedule) is None
    thresholds = [pool.threshold() for pool in schedule.pools]
    assert_pools_pruned_as_the_reference(candidates, keep_masks,
                                         [threshold.tau for threshold in thresholds],
                                         [threshold.pruned for threshold in thresholds])
    before = [threshold.tau.clone() for threshold in thresholds]
    TRITON.step(groups, events, None, schedule)
    assert int(schedule.position) == 2
    for j, pool in enumerate(schedule.pools):
        assert_bitwise_equal(pool.tau, before[j], f"pool {j}: tau after a step without event")
        assert int(pool.threshold().pruned) == int(thresholds[j].pruned)


@interpreted
def test_nm_ranking_takes_the_lower_index_first_among_equal_magnitudes():
    """csrc/core/selection.h keep_candidate_keys' ties, against reference.nm_candidates: groups
    of equal |θ| (±, zeros), a group already sparse, rows of exactly M, M = 16 and M = 3."""
    for pattern, rows in ((NMPattern(2, 4), [[0.5, -0.5, 0.5, 0.5], [0.0, 0.0, 0.25, -0.0],
                                             [1.0, 2.0, 2.0, 1.0], [0.5, 0.25, 0.25, 0.125]]),
                          (NMPattern(1, 3), [[0.25, 0.25, 0.25], [0.5, -0.5, 0.125],
                                             [0.0, 0.5, 0.0]]),
                          (NMPattern(5, 16), [[0.25] * 8 + [-0.25] * 8,
                                              [float(i % 5) for i in range(16)]])):
        for dtype in (torch.float32, torch.bfloat16):
            values = torch.tensor(rows, dtype=dtype)
            ours, theirs = values.clone(), values.clone()
            numel = values.numel() // pattern.m * pattern.prunable
            for k in (1, numel // 2, numel):
                ours.copy_(values)
                theirs.copy_(values)
                mask = torch.zeros(masks.packed_mask_bytes(values.numel()), dtype=torch.uint8)
                threshold, = TRITON.step([], [PruneEvent([ours], k, [mask], pattern=pattern)],
                                         None)
                expected, = REFERENCE.step([], [PruneEvent([theirs], k, [], pattern=pattern)],
                                           None)
                what = f"{pattern} {dtype} k={k}"
                assert_bitwise_equal(threshold.tau, expected.tau, what)
                assert_bitwise_equal(ours, theirs, what)
                assert_bitwise_equal(mask, masks.pack_mask(reference.keep_mask(values,
                                                                               expected.tau,
                                                                               pattern)), what)
                assert int(threshold.pruned) == int(expected.pruned), what


# ---- launches, tables and host synchronisation ------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches through the interpreter, by kernel name."""
    from triton.runtime.interpreter import InterpretedFunction
    counts = []
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts


# t_end = 8 - 2 - 1 = 5: dense at t = 0, 1, events at 2 and 4, the freeze at 5, frozen at 6, 7.
SHORT_SCHEDULE = dict(num_train_examples=100, initial_warmup_steps=2, total_steps=8,
                      final_warmup_steps=2, pruning_interval=2)


def launches_per_step(num_tensors, launches):
    candidates = make_model([(50,)] * num_tensors, torch.float32, seed=1)
    others = make_model([(9,)] * num_tensors, torch.float32, seed=2)
    optimizer = MGPP([{"params": candidates, "prune": True}, {"params": others, "prune": False}],
                     lr=1e-3, backend="triton", **SHORT_SCHEDULE)
    per_step = []
    for t in range(8):
        for p in candidates + others:
            p.grad = torch.full_like(p, 0.01 * (t + 1))
        before = len(launches)
        optimizer.step()
        per_step.append(launches[before:])
    return per_step


@interpreted
def test_launch_count_does_not_grow_with_the_number_of_tensors(launches):
    few, many = launches_per_step(2, launches), launches_per_step(7, launches)
    assert few == many
    update = ["prepare_kernel", "update_kernel"]
    prune = ["select_kernel", "histogram_kernel", "select_kernel", "threshold_kernel"]
    assert few == [update, update, update + prune, update, update + prune, update + prune,
                   update, update]


@interpreted
def test_tables_are_built_once_while_the_tensors_stay():
    before = StepTensors.make([(7,), (40,)], torch.float32, torch.float32)
    backend = triton_backend.TritonBackend()
    for _ in range(3):
        backend.step([before.group()], [], None)
    assert backend._plans.builds == 1
    before.grads[1] = before.grads[1].clone()  # a new gradient tensor: new addresses, new table
    backend.step([before.group()], [], None)
    assert backend._plans.builds == 2
    assert [s.item() for s in before.steps] == [7.0, 7.0]


@interpreted
def test_the_guard_catches_host_reads(forbid_host_reads):
    from mgpp_kernels.backends import reference as reference_backend
    forbid_host_reads([reference_backend.__file__])
    before = StepTensors.make([(7,)], torch.float32, torch.float32)
    with pytest.raises(AssertionError, match="Tensor.item"):
        REFERENCE.step([before.group()], [], None)


@interpreted
def test_step_never_reads_device_values_on_the_host(forbid_host_reads):
    shapes = [(33,), (7,), (1,), (0,)]
    candidates = make_model(shapes, torch.float32, seed=3)
    others = make_model([(5,)], torch.bfloat16, seed=4)
    optimizer = MGPP([{"params": candidates, "prune": True}, {"params": others, "prune": False}],
                     lr=1e-3, backend="triton", **SHORT_SCHEDULE)
    forbid_host_reads([triton_backend.__file__, kernels.__file__, scalars.__file__,
                       optimizer_module.__file__, schedule.__file__])
    for t in range(8):  # dense, events, the freeze, frozen
        for i, p in enumerate(candidates + others):
            p.grad = None if (t == 4 and i == 0) else torch.full_like(p, 0.01 * (t + 1))
        optimizer.grad_scale = torch.tensor(1.0)
        optimizer.step()
    TRITON.global_threshold(candidates, 3)


# ---- bad input ---------------------------------------------------------------------------------

@interpreted
def test_bad_input_is_rejected_before_anything_changes():
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        TRITON.check_params([torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="contiguous"):
        TRITON.check_params([torch.zeros(4, 3).t()])
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        MGPP([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], backend="triton",
             num_train_examples=1, initial_warmup_steps=1, total_steps=4)

    before = StepTensors.make([(7,), (5,)], torch.float32, torch.float32)
    bad = before.clone()
    bad.grads[1] = bad.grads[1].half()
    with pytest.raises(ValueError, match="grads\\[1\\] must have its parameter's dtype"):
        TRITON.step([bad.group()], [], None)
    bad = before.clone()
    bad.exp_avg_sqs[0] = bad.exp_avg_sqs[0].half()
    with pytest.raises(ValueError,
                       match="exp_avg_sqs\\[0\\] must have the dtype of exp_avgs\\[0\\]"):
        TRITON.step([bad.group()], [], None)
    ok = before.clone()
    with pytest.raises(ValueError, match="k must be in"):
        TRITON.step([ok.group()], [prune_event(ok.params, 13)], None)
    with pytest.raises(ValueError, match="keep_masks\\[0\\] must be uint8"):
        TRITON.step([ok.group()],
                    [prune_event(ok.params, 3, [torch.zeros(2, dtype=torch.uint8)] * 2)], None)
    ok.assert_equal(before, "after a rejected step")


# ---- compiled for real GPUs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_builds():
    """Every kernel variant compiled for sm_80 and sm_90 by tests/gpu_compile.py. It runs in its
    own process: one that imported triton with TRITON_INTERPRET=1 holds interpreted versions of
    triton.language's library functions and cannot compile kernels."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "gpu_compile.py"), "80", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles_for_sm80_and_sm90(gpu_builds):
    kernel_names = {"schedule_kernel", "prepare_kernel", "update_kernel", "histogram_kernel",
                    "select_kernel", "threshold_kernel"}
    for capability in (80, 90):
        builds = [b for b in gpu_builds if b["capability"] == capability]
        assert {b["name"] for b in builds} == kernel_names
        pairs = {(b["constexprs"]["PARAM_DTYPE"], b["constexprs"]["STATE_DTYPE"])
                 for b in builds if b["name"] == "update_kernel"
                 and not b["constexprs"]["SCHEDULED"]}
        assert pairs == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)}
        for b in builds:
            assert b["target"].startswith(f"sm_{capability}"), b  # sm_90a for 90
            assert not b["approximate_f32_division"], b
            # The per-element math: IEEE division and square root, denormals kept, and the
            # multiply-adds of csrc/core/step.h fused (tl.fma).
            if b["name"] == "update_kernel":
                assert not b["approximate"], b
                assert b["fused_f32"] >= 10, b


@pytest.mark.parametrize("param,state", [(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)])
def test_update_kernel_loads_its_operands_128_bits_at_a_time_on_sm90(gpu_builds, param, state):
    build, = [b for b in gpu_builds if b["capability"] == 90 and b["name"] == "update_kernel"
              and b["constexprs"] == dict(PARAM_DTYPE=param, STATE_DTYPE=state, COUNT=True,
                                          SCHEDULED=False, ALIGNED=True,
                                          BLOCK=triton_backend.GPU_BLOCKS["update"])]
    # A full block is 2048 elements over 128 threads: 16 elements of θ, g, m and v per thread,
    # which is 4 128-bit loads of fp32 data or 2 of 16-bit data for each operand.
    per_operand = {0: 4, 1: 2, 2: 2}
    assert build["v4_loads"] >= sum(per_operand[d] for d in (param, param, state, state))
    assert build["v4_stores"] >= sum(per_operand[d] for d in (param, state, state))
