"""The exact global threshold (docs/spec.md §2-4) on every backend: τ bit-identical to torch.kthvalue
over torch.cat of |θ|, and identical masks, on the cases that break radix selection; through
Backend.global_threshold, Backend.step with a PruneEvent, and the optimizer."""
import dataclasses

import pytest
import torch

from mgpp_kernels import MGPP, masks, ops, reference
from mgpp_kernels.backends.scalars import all_step_scalar_values
from mgpp_kernels.ops.layout import HIGH_BINS, LOW_BITS
from mgpp_kernels.ops.layout import KERNEL_DTYPES

from compare import assert_bitwise_equal, bits
from helpers import gradient
from step_inputs import StepTensors, prune_event

import backends
from backends import REFERENCE


def _from_bits(int_bits):
    return torch.tensor(int_bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _random(n, seed, dtype=torch.float32, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=generator) * scale).to(dtype)


def _ties():
    generator = torch.Generator().manual_seed(1)
    levels = torch.tensor([0.0, 0.125, -0.125, 0.3, -0.3, 0.7, 1e-3, -1e-3])
    values = levels[torch.randint(0, len(levels), (3000,), generator=generator)]
    return [values[:1000].view(10, 100), values[1000:2999], values[2999:]]


def _many_zeros():
    values = _random(5000, seed=2)
    values[torch.randperm(5000, generator=torch.Generator().manual_seed(2))[:3500]] = 0.0
    return [values[:2500], values[2500:].view(50, 50)]


def _denormals_fp32():
    generator = torch.Generator().manual_seed(3)
    subnormal = _from_bits(torch.randint(1, 1 << 23, (1500,), generator=generator).tolist())
    signs = torch.randint(0, 2, (1500,), generator=generator) * 2.0 - 1
    smallest_normals = torch.tensor([1.1754944e-38, -1.1754944e-38, 1.4e-45, 0.0])
    return [subnormal * signs, _random(500, seed=3), smallest_normals]


def _denormals_16bit():
    f16 = torch.arange(1, 1024, dtype=torch.int16).view(torch.float16)  # every fp16 subnormal
    bf16 = torch.arange(1, 128, dtype=torch.int16).view(torch.bfloat16)  # bf16 subnormals
    return [f16, bf16, -f16[::3].clone(), _random(200, seed=4, dtype=torch.float16, scale=1e-4)]


def _all_equal():
    return [torch.full((300,), -0.25), torch.full((7,), 0.25), torch.full((1,), 0.25)]


def _distinct():
    return [_random(4097, seed=5), _random(7, seed=6), _random(1, seed=7)]


def _one_element_tensors():
    return [_random(1, seed=10 + i) for i in range(40)]


def _empty_among():
    return [torch.empty(0), _random(50, seed=8), torch.empty(0, 3), _random(13, seed=9),
            torch.empty(0)]


def _mixed_dtypes():
    return [_random(1000, seed=11), _random(777, seed=12, dtype=torch.bfloat16),
            _random(513, seed=13, dtype=torch.float16), _random(1, seed=14, dtype=torch.bfloat16)]


def _negative_zeros():
    values = _random(1000, seed=15)
    values[::4] = -0.0
    values[1::8] = 0.0
    return [values, torch.full((5,), -0.0)]


def _all_bf16():
    return [_random(2000, seed=16, dtype=torch.bfloat16), _random(7, seed=17, dtype=torch.bfloat16),
            _random(1, seed=18, dtype=torch.bfloat16)]


def _one_high_bin():
    # Consecutive float32 values share their 16 high key bits: only the second radix level
    # separates them.
    base = int(torch.tensor(0.75).view(torch.int32))
    values = _from_bits(list(range(base, base + 3000)))
    signs = torch.randint(0, 2, (3000,), generator=torch.Generator().manual_seed(19)) * 2.0 - 1
    permutation = torch.randperm(3000, generator=torch.Generator().manual_seed(19))
    return [(values * signs)[permutation], _random(100, seed=19)]


def _several_chunks():
    # More than one CPU chunk (2^15 elements) per tensor, so several threads count.
    return [_random(70000, seed=20), _random(33000, seed=21, dtype=torch.float16)]


def _with_infinities():
    values = _random(500, seed=22)
    values[:5] = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, float("inf")])
    return [values]


def _regrowth():
    # The regrowth regime of consecutive events: the weights the last event pruned regrow to almost
    # the same |θ|, so 35% of the elements share one high bin (distinct low bits, some ties),
    # below the others: k = N/3 and N/2 fall in or just above that crowded bin. Several CPU chunks
    # and blocks, so that every thread counts many increments of one counter.
    generator = torch.Generator().manual_seed(23)

    def tensor(n, dtype):
        values = torch.randn(n, generator=generator) * 0.02
        crowd = torch.rand(n, generator=generator) < 0.35
        regrown = 1e-5 * (1 + torch.randint(0, 64, (n,), generator=generator) * 2.0**-20)
        values[crowd] = (regrown * torch.sign(values))[crowd]
        return values.to(dtype)

    return [tensor(70000, torch.float32), tensor(3001, torch.float32),
            tensor(5000, torch.float16), tensor(2000, torch.bfloat16)]


def _small_regrowth():
    return [t[:1500].clone() for t in _regrowth()]


# ---- smaller cases (the Triton interpreter's row takes these) -----------------------------------

def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


def _small_generator():
    generator = torch.Generator().manual_seed(11)
    return generator, (lambda *shape: torch.randn(*shape, generator=generator))  # noqa: E731


def _small_ties():
    generator, _ = _small_generator()
    choice = torch.randint(0, 5, (600,), generator=generator)
    values = torch.tensor([0.1, -0.2, 0.3, 0.2, -0.1])[choice]
    return [values[:400].clone(), values[400:].reshape(20, 10).clone()]


def _small_many_zeros():
    generator, randn = _small_generator()
    a = randn(5000)
    a[torch.rand(5000, generator=generator) < 0.7] = 0.0
    a[::13] = -0.0
    return [a, torch.zeros(9), _f32([-0.0, 1e-3])]


def _small_denormals():
    generator, randn = _small_generator()
    tiny = torch.randint(1, 1 << 23, (700,), generator=generator,
                         dtype=torch.int32).view(torch.float32)
    return [tiny * torch.sign(randn(700)), _f32([1e-38, -1e-45, 0.0, 1.0]),
            torch.tensor([1e-7, 6e-8, 3e-5], dtype=torch.float16)]


def _small_all_equal():
    return [torch.full((300,), 0.25), -torch.full((17,), 0.25)]


def _small_one_element():
    return [_f32([0.5]), _f32([-0.25]), _f32([0.75]), _f32([0.25])]


def _small_empty_among():
    _, randn = _small_generator()
    return [torch.empty(0), randn(7), torch.empty(0, 3), randn(4097), torch.empty(0)]


def _small_mixed_dtypes():
    _, randn = _small_generator()
    base = randn(3000) * 0.05
    # The same values in three formats collide in key space after conversion.
    return [base[:1000], base[1000:2000].to(torch.bfloat16), base[2000:].to(torch.float16),
            base[:500].to(torch.bfloat16), _f32([0.0, -0.0])]


def _small_bfloat16_only():
    _, randn = _small_generator()
    return [(randn(2000) * 0.05).to(torch.bfloat16), (randn(33) * 0.05).to(torch.bfloat16)]


def _small_infinities():
    _, randn = _small_generator()
    return [_f32([float("inf"), 1.0, -float("inf"), 2.0, 3.0]), randn(50)]


CASES = {
    "ties": _ties, "many_zeros": _many_zeros, "denormals_fp32": _denormals_fp32,
    "denormals_16bit": _denormals_16bit, "all_equal": _all_equal, "distinct": _distinct,
    "one_element_tensors": _one_element_tensors, "empty_among": _empty_among,
    "mixed_dtypes": _mixed_dtypes, "negative_zeros": _negative_zeros, "all_bf16": _all_bf16,
    "one_high_bin": _one_high_bin, "several_chunks": _several_chunks,
    "infinities": _with_infinities, "regrowth": _regrowth,
    "small_ties": _small_ties, "small_many_zeros": _small_many_zeros,
    "small_denormals": _small_denormals, "small_all_equal": _small_all_equal,
    "small_one_element": _small_one_element, "small_empty_among": _small_empty_among,
    "small_mixed_dtypes": _small_mixed_dtypes, "small_bfloat16_only": _small_bfloat16_only,
    "small_infinities": _small_infinities, "small_regrowth": _small_regrowth,
}
SMALL_CASES = sorted(name for name in CASES if name.startswith("small_")) + ["one_high_bin"]
# Cases with infinities go through the optimizer without gradients only.
NONFINITE_CASES = {"infinities", "small_infinities"}


def _ranks(tensors, few=False):
    """k = 1, 2, N/3, N/2, N - 1, N, the count of exact zeros and one past it (`few`: 1, N/4,
    N - 1 and one past the zeros, for the slow row's runs through the optimizer)."""
    magnitudes = torch.cat([t.abs().flatten().float() for t in tensors])
    numel = magnitudes.numel()
    zeros = int((magnitudes == 0).sum())
    if few:
        ranks = {1, max(numel // 4, 1), numel - 1, zeros + 1}
    else:
        ranks = {1, 2, numel // 3, numel // 2, numel - 1, numel, zeros, zeros + 1}
    return sorted(k for k in ranks if 1 <= k <= numel)


def _on(tensors, device):
    return [t.to(device) for t in tensors]


def _use_threads(row, case, request):
    if row.name == "cpu" and case in ("several_chunks", "regrowth"):
        request.getfixturevalue("all_threads")  # threads count chunks into merged histograms


@pytest.mark.parametrize("backend,case", backends.over(backends.ROWS, sorted(CASES),
                                                       small_cases=SMALL_CASES))
def test_global_threshold_is_kthvalue(backend, case, request):
    _use_threads(backend, case, request)
    tensors = CASES[case]()
    on_device = _on(tensors, backend.device)
    snapshot = [t.clone() for t in on_device]
    select = backend.load().global_threshold
    for k in _ranks(tensors):
        expected = torch.kthvalue(torch.cat([t.abs().flatten().float() for t in tensors]), k).values
        tau = select(on_device, k)
        assert tau.dtype == torch.float32 and tau.dim() == 0
        assert bits(tau) == bits(expected), f"k={k}: τ {tau.item()!r} != {expected.item()!r}"
        assert_bitwise_equal(tau, reference.global_threshold(tensors, k), f"{case}, k={k}")
    for before, after in zip(snapshot, on_device):
        assert_bitwise_equal(after, before, "global_threshold changed its input")


# ---- Backend.step with a PruneEvent --------------------------------------------------------------

EVENT_CASES = ["small_ties", "small_many_zeros", "small_denormals", "small_empty_among",
               "small_mixed_dtypes", "small_bfloat16_only", "small_regrowth"]


@pytest.mark.parametrize("case", EVENT_CASES)
def test_pruning_event_without_update_matches_reference(kernel_backend, case):
    """An event whose candidates have no gradient: τ, the pruned values, the count below τ and
    the packed masks equal the reference's."""
    device = kernel_backend.device
    ours, theirs = _on(CASES[case](), device), CASES[case]()
    k = sum(t.numel() for t in ours) // 2
    keep_masks = [torch.full(((t.numel() + 7) // 8,), 0xAA, dtype=torch.uint8) for t in theirs]
    ref_masks = [m.clone() for m in keep_masks]
    keep_masks = _on(keep_masks, device)
    threshold, = kernel_backend.load().step([], [prune_event(ours, k, keep_masks)], None)
    expected, = REFERENCE.load().step([], [prune_event(theirs, k, ref_masks)], None)
    assert_bitwise_equal(threshold.tau, expected.tau, "tau")
    assert threshold.pruned.item() == expected.pruned.item()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_bitwise_equal(a, b, f"tensor {i}")
        assert_bitwise_equal(keep_masks[i], ref_masks[i], f"mask {i}")


def _event_step_inputs(device):
    """Candidates of three dtypes, with a gradient (counted by the update pass) and without
    (counted by a histogram of their own), and non-candidates that must not be ranked."""
    fp32 = StepTensors.make([(4097,), (7,), (0,)], torch.float32, torch.float32, seed=3,
                            device=device)
    half = StepTensors.make([(33, 17), (1,)], torch.float16, torch.float32, seed=4, device=device)
    others = StepTensors.make([(50,)], torch.float32, torch.float32, seed=5, device=device)
    no_grad = StepTensors.make([(300,)], torch.bfloat16, torch.float32, seed=6,
                               device=device).params
    groups = [fp32.group(event=0), half.group(event=0), others.group(prior=None)]
    return groups, fp32.params + half.params + no_grad, no_grad, others.params


# The pool's recent τs (PruneEvent.recent_taus, the latest first) as a function of the exact τ:
# the cpu update counts the level-0 bins around the latest (τ inside the window: "near", and
# "moving", whose window the move between the two widens; outside: the others, and then a pass
# counts every bin).
PREDICTIONS = {
    "none": lambda tau: (),
    "near": lambda tau: (tau / 1.1,),
    "moving": lambda tau: (tau * 1.25, tau * 1.17),
    "far below": lambda tau: (tau / 4, tau / 4.2),
    "far above": lambda tau: (tau * 4,),
    "zero": lambda tau: (torch.zeros_like(tau),),
    "inf": lambda tau: (torch.full_like(tau, float("inf")),),
}


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_event_step_prunes_at_the_exact_threshold_of_the_updated_values(kernel_backend,
                                                                        prediction):
    device = kernel_backend.device
    backend = kernel_backend.load()
    # The same update without an event gives θ_new before pruning (the update does not depend
    # on the counting): τ must be its k-th smallest |θ_new|, bit for bit, whatever was predicted.
    groups_u, candidates_u, _, others_u = _event_step_inputs(device)
    for group in groups_u:
        group.event = None
    backend.step(groups_u, [], None)
    candidates_u = [p.cpu() for p in candidates_u]
    numel = sum(p.numel() for p in candidates_u)
    k = int(numel * 0.6)
    tau = reference.global_threshold(candidates_u, k)

    groups, candidates, no_grad, others = _event_step_inputs(device)
    keep_masks = [torch.empty((p.numel() + 7) // 8, dtype=torch.uint8, device=device)
                  for p in candidates]
    recent_taus = tuple(t.to(device) for t in PREDICTIONS[prediction](tau))
    event = dataclasses.replace(prune_event(candidates, k, keep_masks), recent_taus=recent_taus)
    threshold, = backend.step(groups, [event], None)
    assert_bitwise_equal(threshold.tau, tau, "tau")
    below = 0
    for i, (pruned, updated, mask) in enumerate(zip(candidates, candidates_u, keep_masks)):
        keep = reference.keep_mask(updated, tau)
        below += int((~keep).sum())
        assert_bitwise_equal(pruned, updated.masked_fill(~keep, 0), f"candidate {i}")
        assert_bitwise_equal(mask, masks.pack_mask(keep), f"keep mask {i}")
    assert threshold.pruned.item() == below
    for i, (a, b) in enumerate(zip(others, others_u)):
        assert_bitwise_equal(a, b, f"non-candidate {i}")


def test_window_around_the_recent_taus():
    """The cpu update's window: 64 high bins each side of the last τ's at least, four times as far
    as τ moved between the last two events, within [1, HIGH_BINS - 1); none (every bin) past 256
    each side."""
    if backends.BY_NAME["cpu"].unavailable is not None:
        pytest.skip(backends.BY_NAME["cpu"].unavailable)
    from mgpp_kernels.backends.kernel_ops import _window

    def tau(high_bin):
        return torch.tensor(high_bin << LOW_BITS, dtype=torch.int32).view(torch.float32)

    assert _window(()) is None
    assert _window((tau(30000),)) == (30000 - 64, 30000 + 65)
    assert _window((tau(30000), tau(30010))) == (30000 - 64, 30000 + 65)
    assert _window((tau(30000), tau(29950))) == (30000 - 200, 30000 + 201)
    assert _window((tau(30000), tau(30064), tau(10))) == (30000 - 256, 30000 + 257)
    assert _window((tau(30000), tau(30065))) is None
    assert _window((-tau(20), tau(40))) == (1, 20 + 81)
    assert _window((tau(HIGH_BINS - 10),)) == (HIGH_BINS - 74, HIGH_BINS - 1)


@pytest.mark.parametrize("threads", ["one", "all"])
def test_update_counts_the_histogram_in_a_window(threads, request):
    """cpu fused_step_ with a window: the bins inside counted one by one, those below in
    begin - 1 and those above in end; the update itself unchanged."""
    if backends.BY_NAME["cpu"].unavailable is not None:
        pytest.skip(backends.BY_NAME["cpu"].unavailable)
    if threads == "all":
        request.getfixturevalue("all_threads")
    tensors = StepTensors.make([(4097,), (1,), (7,), (0,), (40000,)], torch.float32,
                               torch.float32, seed=30)
    half = StepTensors.make([(33, 17)], torch.bfloat16, torch.bfloat16, seed=31)

    def step(window):
        step_tensors = [tensors.clone(), half.clone()]
        histogram = torch.zeros(HIGH_BINS, dtype=torch.int64)
        for t in step_tensors:
            scalars = torch.tensor(all_step_scalar_values([t.group()]), dtype=torch.float64)
            ops.fused_step_(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.steps, [], scalars,
                            histogram=histogram, window=window)
        return step_tensors, histogram

    every_bin_tensors, every_bin = step(None)
    updated = torch.cat([p.float().abs().flatten() for t in every_bin_tensors for p in t.params])
    direct = torch.bincount(updated.view(torch.int32) >> LOW_BITS, minlength=HIGH_BINS)
    assert torch.equal(every_bin, direct), "every bin: not the updated values' direct count"
    median_bin = int((every_bin.cumsum(0) >= every_bin.sum() // 2).nonzero()[0])
    lowest_bin = int(every_bin[1:].nonzero()[0]) + 1
    # Around the median, and from bin 1 (bin 0 below it) to just above the smallest values.
    for begin, end in ((median_bin - 100, median_bin + 30), (1, lowest_bin + 3)):
        step_tensors, histogram = step((begin, end))
        for expected, actual in zip(every_bin_tensors, step_tensors):
            expected.assert_equal(actual, f"the update with window {begin, end}")
        expected = every_bin.clone()
        expected[:begin - 1] = 0
        expected[begin - 1] = every_bin[:begin].sum()
        expected[end] = every_bin[end:].sum()
        expected[end + 1:] = 0
        assert torch.equal(histogram, expected), f"window {begin, end}"
        assert expected[begin:end].sum() > 0 and expected[begin - 1] + expected[end] > 0
    # A window out of range, or without a histogram, is refused before anything moves.
    t = tensors.clone()
    scalars = torch.tensor(all_step_scalar_values([t.group()]), dtype=torch.float64)
    for window, histogram in (((0, 5), torch.zeros(HIGH_BINS, dtype=torch.int64)),
                              ((5, HIGH_BINS), torch.zeros(HIGH_BINS, dtype=torch.int64)),
                              ((5, 6), None)):
        with pytest.raises(ValueError, match="window must be"):
            ops.fused_step_(t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.steps, [], scalars,
                            histogram=histogram, window=window)
    tensors.assert_equal(t, "after a refused window")


@pytest.mark.parametrize("threads", ["one", "all"])
def test_consecutive_events_after_an_event_prune_at_the_exact_threshold(kernel_backend, threads,
                                                                         request):
    """The regrowth regime: an event every step after a first one. The pruned weights regrow by
    lr·g/(|g| + ε), almost the same |θ|, so the next events' τ falls in a high bin that holds far
    more than 1/128 of the candidates (asserted): τ is still the k-th smallest updated |θ| and
    exactly the weights below it are zeroed, with their keep-mask bits cleared."""
    if threads == "all":
        request.getfixturevalue("all_threads")
    device = kernel_backend.device
    backend = kernel_backend.load()
    tensors = StepTensors.make([(70000,), (3001,)], torch.float32, torch.float32, seed=24,
                               step=0.0)
    half = StepTensors.make([(50, 40)], torch.float16, torch.float32, seed=25, step=0.0)
    generator = torch.Generator().manual_seed(26)
    for group in (tensors, half):
        for g, m, v in zip(group.grads, group.exp_avgs, group.exp_avg_sqs):
            magnitude = 0.01 * (1 + 0.5 * torch.rand(g.shape, generator=generator))
            g.copy_(torch.sign(torch.randn(g.shape, generator=generator)) * magnitude)
            m.zero_()
            v.zero_()
    tensors, half = tensors.clone(device=device), half.clone(device=device)
    candidates = tensors.params + half.params
    numel = sum(p.numel() for p in candidates)
    crowded_events = 0
    recent_taus = ()   # as the optimizer gives them: the update counts around them
    for step, sparsity in enumerate((0.5, 0.3, 0.35, 0.3)):
        updated_tensors, updated_half = tensors.clone(), half.clone()
        backend.step([updated_tensors.group(weight_decay=0.0),
                      updated_half.group(weight_decay=0.0)], [], None)
        updated = [p.cpu() for p in updated_tensors.params + updated_half.params]
        keep_masks = [torch.full(((p.numel() + 7) // 8,), 0x5A, dtype=torch.uint8, device=device)
                      for p in candidates]
        k = int(numel * sparsity)
        event = dataclasses.replace(prune_event(candidates, k, keep_masks),
                                    recent_taus=recent_taus)
        threshold, = backend.step([tensors.group(event=0, weight_decay=0.0),
                                   half.group(event=0, weight_decay=0.0)], [event], None)
        recent_taus = (threshold.tau,) + recent_taus[:1]
        tau = reference.global_threshold(updated, k)
        assert_bitwise_equal(threshold.tau, tau, f"step {step}: tau")
        keys = torch.cat([u.abs().float().flatten() for u in updated]).view(torch.int32)
        tau_bin = int(tau.view(torch.int32)) >> 15
        crowded_events += int((keys >> 15 == tau_bin).sum()) > numel / 16
        below = 0
        for i, (p, u, mask) in enumerate(zip(candidates, updated, keep_masks)):
            keep = reference.keep_mask(u, tau)
            below += int((~keep).sum())
            assert_bitwise_equal(p.cpu(), u.masked_fill(~keep, 0), f"step {step}, candidate {i}")
            assert_bitwise_equal(mask.cpu(), masks.pack_mask(keep), f"step {step}, mask {i}")
        assert threshold.pruned.item() == below
    assert crowded_events >= 2, "the events after the first did not fall in a crowded bin"


# ---- through the optimizer -----------------------------------------------------------------------

def _optimizer(params, backend, k, **overrides):
    """t_i = 0 and t_end = 1: step 0 prunes to s_i, step 1 prunes to s_f = s_i and freezes;
    lr = 0 and weight_decay = 0 leave θ unchanged apart from pruning."""
    numel = sum(p.numel() for p in params)
    sparsity = (k + 0.5) / numel  # int(N·s) == k
    kwargs = dict(lr=0.0, weight_decay=0.0, num_train_examples=1000, initial_warmup_steps=0,
                  total_steps=2, initial_sparsity=sparsity, final_sparsity=sparsity)
    kwargs.update(overrides)
    return MGPP([{"params": params, "prune": True}], backend=backend.name, **kwargs)


def _prune_twice(tensors, backend, k, with_gradients):
    params = [torch.nn.Parameter(t.clone().to(backend.device)) for t in tensors]
    optimizer = _optimizer(params, backend, k)
    taus, after = [], []
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = gradient(step, i, p) if with_gradients else None
        optimizer.step()
        stats = optimizer.stats()
        taus.append((stats["tau"], stats["pruned"]))
        after.append([p.detach().cpu().clone() for p in params])
    keep_masks = [optimizer.state[p]["keep_mask"].cpu().clone() for p in params]
    return taus, after, keep_masks


FINITE_CASES = sorted(set(CASES) - NONFINITE_CASES - {"several_chunks"})
SMALL_FINITE_CASES = ["small_ties", "small_many_zeros", "small_denormals", "small_mixed_dtypes",
                      "small_empty_among", "small_one_element", "one_high_bin", "small_regrowth"]


@pytest.mark.parametrize("backend,case,with_gradients", backends.over(
    backends.KERNELS, [(c, g) for c in FINITE_CASES for g in (True, False)],
    small_cases=[(c, g) for c in SMALL_FINITE_CASES for g in (True, False)],
    ids=lambda case: f"{case[0]}-{'updated' if case[1] else 'no_grad'}"))
def test_pruning_steps_match_the_reference(backend, case, with_gradients):
    """Through the optimizer with lr = 0, so θ is the same in both backends: τ, the pruned
    weights and the packed keep masks of the freeze are identical, and equal kthvalue's."""
    tensors = CASES[case]()
    numel = sum(t.numel() for t in tensors)
    for k in sorted({k for k in _ranks(tensors, few=backend.slow) if k < numel}
                    | {max(numel // 4, 1)}):
        expected_tau = reference.global_threshold(tensors, k)
        kernel_taus, kernel_after, kernel_masks = _prune_twice(tensors, backend, k, with_gradients)
        ref_taus, ref_after, ref_masks = _prune_twice(tensors, REFERENCE, k, with_gradients)
        assert kernel_taus == ref_taus, f"k={k}"
        assert bits(torch.tensor(kernel_taus[0][0], dtype=torch.float32)) == bits(expected_tau), \
            f"k={k}"
        for i, (t, c, r) in enumerate(zip(tensors, kernel_after[0], ref_after[0])):
            pruned = t.abs().float() < expected_tau
            expected = t.masked_fill(pruned, 0)
            assert torch.equal(c, expected), f"k={k}, tensor {i}: pruned weights"
            assert_bitwise_equal(c, r, f"k={k}, tensor {i}")
        assert kernel_taus[0][1] == sum(int((t.abs().float() < expected_tau).sum())
                                        for t in tensors)
        for i, (c, r) in enumerate(zip(kernel_after[1], ref_after[1])):
            assert_bitwise_equal(c, r, f"k={k}, tensor {i} after the freeze")
        tau_at_freeze = reference.global_threshold(ref_after[0], k)
        for i, (p, c, r) in enumerate(zip(ref_after[0], kernel_masks, ref_masks)):
            expected_mask = masks.pack_mask(reference.keep_mask(p, tau_at_freeze))
            assert c.dtype == torch.uint8 and c.numel() == (p.numel() + 7) // 8
            assert torch.equal(c, expected_mask), f"k={k}, tensor {i}: {backend} keep mask"
            assert torch.equal(r, expected_mask), f"k={k}, tensor {i}: reference keep mask"


@pytest.mark.parametrize("backend,case", backends.over(
    backends.KERNELS, ["infinities", "several_chunks"], small_cases=["small_infinities"]))
def test_pruning_without_gradients_on_large_and_infinite_values(backend, case, all_threads):
    tensors = CASES[case]()
    numel = sum(t.numel() for t in tensors)
    for k in (1, numel // 2, numel - 1):
        kernel_taus, kernel_after, kernel_masks = _prune_twice(tensors, backend, k,
                                                               with_gradients=False)
        ref_taus, ref_after, ref_masks = _prune_twice(tensors, REFERENCE, k,
                                                      with_gradients=False)
        assert kernel_taus == ref_taus
        assert kernel_taus[0][0] == reference.global_threshold(tensors, k).item()
        for c, r in zip(kernel_after[1] + kernel_masks, ref_after[1] + ref_masks):
            assert_bitwise_equal(c, r, f"k={k}")


FUSED_DTYPES = [(dtype,) for dtype in KERNEL_DTYPES] + [KERNEL_DTYPES]


@pytest.mark.parametrize("backend,dtypes", backends.over(
    backends.KERNELS, [(d,) for d in FUSED_DTYPES], small_cases=[(FUSED_DTYPES[3],)],
    ids=lambda case: "+".join(backends._id(d) for d in case[0])))
def test_threshold_of_the_fused_update_is_exact(backend, dtypes, all_threads):
    """With lr > 0 the event step ranks the updated θ from the histogram counted in the update
    pass: afterwards τ is still the k-th smallest |θ| (counting the zeros it made), nothing
    below τ survives and exactly `pruned` weights were zeroed."""
    shapes = [(64, 650), (7,), (1,), (0,), (30000,)]  # several chunks, so both threads count
    params = [torch.nn.Parameter(_random(torch.Size(s).numel(), seed=30 + i,
                                         dtype=dtypes[i % len(dtypes)]).view(s).to(backend.device))
              for i, s in enumerate(shapes)]
    numel = sum(p.numel() for p in params)
    optimizer = _optimizer(params, backend, numel // 2, lr=1e-2, final_sparsity=0.9)
    for i, p in enumerate(params):
        p.grad = gradient(0, i, p, scale=1.0)
    optimizer.step()
    stats = optimizer.stats()
    tau, pruned = stats["tau"], stats["pruned"]
    magnitudes = torch.cat([p.detach().abs().flatten().float().cpu() for p in params])
    assert tau > 0
    assert int((magnitudes == 0).sum()) == pruned
    assert int((magnitudes < tau).sum()) == pruned
    assert pruned < numel // 2 <= pruned + int((magnitudes == tau).sum())
