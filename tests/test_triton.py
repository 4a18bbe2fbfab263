"""The triton backend against the reference (SPEC §4), through the Triton interpreter on CPU
tensors, and its kernels compiled for real GPU targets (no GPU needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from mgpp_kernels import MGPP, reference  # noqa: E402
from mgpp_kernels.masks import pack_mask, unpack_mask  # noqa: E402
from mgpp_kernels.backends.triton import kernels  # noqa: E402
from mgpp_kernels.backends import load_backend  # noqa: E402
from mgpp_kernels.backends.types import Prior, PruneEvent, UpdateGroup  # noqa: E402
from mgpp_kernels.backends.triton import backend as triton_backend  # noqa: E402

TRITON = load_backend("triton")
REFERENCE = load_backend("reference")
interpreted = pytest.mark.skipif(not triton_backend.INTERPRETED,
                                 reason="needs TRITON_INTERPRET=1 (CPU tensors)")
# The prior's exp overflows to +inf on purpose (ρ0 = 0); numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

PRIOR = Prior(lambda_t=0.05, sigma0_sq=1e-10, sigma1_sq=0.05, num_train_examples=1000)
SHAPES = [(1,), (7,), (4097,), (0,), (33, 17)]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_NORMAL_EXPONENT = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


# ---- step inputs ------------------------------------------------------------------------------

@dataclass
class StepTensors:
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    keep_masks: list[torch.Tensor]

    @staticmethod
    def make(shapes, dtype, state_dtype, seed=0, step=3.0, masked=False):
        generator = torch.Generator().manual_seed(seed)

        def randn(shape, scale):
            return torch.randn(shape, generator=generator) * scale

        params = []
        for shape in shapes:
            theta = randn(shape, 0.02)
            # Every fourth value tiny, so the spike weight ρ0 takes values between 0 and 1 (for
            # the others exp overflows and ρ0 = 0), and some exact zeros.
            theta.view(-1)[::4] *= 1e-4
            theta.view(-1)[::11] = 0.0
            params.append(theta.to(dtype))
        return StepTensors(
            params=params,
            grads=[randn(s, 0.01).to(dtype) for s in shapes],
            exp_avgs=[randn(s, 1e-3).to(state_dtype) for s in shapes],
            exp_avg_sqs=[(torch.rand(s, generator=generator) * 1e-5).to(state_dtype)
                         for s in shapes],
            steps=[torch.tensor(step) for _ in shapes],
            keep_masks=[pack_mask(torch.rand(s, generator=generator) > 0.3)
                        for s in shapes] if masked else [])

    def clone(self, dtype=None, state_dtype=None):
        def copy_all(tensors, to):
            return [t.to(to or t.dtype, copy=True) for t in tensors]
        return StepTensors(copy_all(self.params, dtype), copy_all(self.grads, dtype),
                           copy_all(self.exp_avgs, state_dtype),
                           copy_all(self.exp_avg_sqs, state_dtype), copy_all(self.steps, None),
                           copy_all(self.keep_masks, None))

    def group(self, prior=PRIOR, count=True, weight_decay=0.01):
        return UpdateGroup(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
                           self.keep_masks, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                           weight_decay=weight_decay, prior=prior, count=count)


def bits(t):
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    differ = bits(actual) != bits(expected) if actual.is_floating_point() else actual != expected
    assert not differ.any(), f"{what}: {int(differ.sum())} of {differ.numel()} elements differ"


def assert_within(actual, expected, bound, what):
    diff = (actual.double() - expected.double()).abs()
    bad = diff > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements outside the bound, worst diff "
                           f"{diff.max().item():.3e}")


def ulp(values, dtype):
    magnitude = values.double().abs().clamp_min(torch.finfo(dtype).tiny)
    exponent = torch.floor(torch.log2(magnitude)).clamp_min(MIN_NORMAL_EXPONENT[dtype])
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def total_gradient(before: StepTensors, i, prior, grad_scale):
    """g as the update sees it: unscaled, with the prior gradient (fp32, as the reference)."""
    g = before.grads[i].float() / grad_scale
    if prior is not None:
        g = g + reference.prior_gradient(before.params[i].float(), prior.lambda_t,
                                         prior.sigma0_sq, prior.sigma1_sq,
                                         prior.num_train_examples)
    return g


def assert_fp32_step_bound(actual: StepTensors, expected: StepTensors, before: StepTensors,
                           prior, grad_scale):
    """SPEC §4, fp32, one step: |diff| <= 1e-6 + 1e-5·s, s the largest magnitude entering."""
    beta1, beta2 = 0.9, 0.999
    for i in range(len(before.params)):
        g = total_gradient(before, i, prior, grad_scale)
        theta_scale = torch.maximum(expected.params[i].abs(), before.params[i].abs())
        m_scale = torch.maximum(torch.maximum(expected.exp_avgs[i].abs(),
                                              beta1 * before.exp_avgs[i].abs()),
                                (1 - beta1) * g.abs())
        v_scale = torch.maximum(torch.maximum(expected.exp_avg_sqs[i],
                                              beta2 * before.exp_avg_sqs[i]), (1 - beta2) * g * g)
        for name, scale in (("params", theta_scale), ("exp_avgs", m_scale),
                            ("exp_avg_sqs", v_scale)):
            assert_within(getattr(actual, name)[i], getattr(expected, name)[i],
                          1e-6 + 1e-5 * scale.double(), f"{name}[{i}]")
        assert actual.steps[i].item() == expected.steps[i].item()


# ---- one step against the reference -----------------------------------------------------------

@interpreted
@pytest.mark.parametrize("case", ["prior", "plain_adamw", "frozen_mask"])
def test_one_step_fp32_within_bound(case):
    before = StepTensors.make(SHAPES, torch.float32, torch.float32, seed=1,
                              masked=case == "frozen_mask")
    prior = PRIOR if case == "prior" else None
    grad_scale = torch.tensor(4.0) if case == "prior" else None
    scale_value = 4.0 if grad_scale is not None else 1.0
    if grad_scale is not None:
        for g in before.grads:
            g.mul_(scale_value)
    ours, theirs = before.clone(), before.clone()
    assert TRITON.step([ours.group(prior)], None, grad_scale) is None
    REFERENCE.step([theirs.group(prior)], None, grad_scale)
    assert_fp32_step_bound(ours, theirs, before, prior, scale_value)
    if case == "frozen_mask":
        for p, mask in zip(ours.params, ours.keep_masks):
            assert not p[~unpack_mask(mask, p)].any()


@interpreted
@pytest.mark.parametrize("dtype,state_dtype", [
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float16, torch.float16)])
def test_one_step_16bit_storage_bound(dtype, state_dtype):
    before = StepTensors.make(SHAPES, dtype, state_dtype, seed=2)
    ours, same_dtype = before.clone(), before.clone()
    oracle = before.clone(torch.float64, torch.float64)
    TRITON.step([ours.group()], None, None)
    REFERENCE.step([same_dtype.group()], None, None)
    REFERENCE.step([oracle.group()], None, None)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for i, (actual, ref, exact) in enumerate(zip(getattr(ours, name), getattr(same_dtype, name),
                                                     getattr(oracle, name))):
            assert actual.dtype == ref.dtype
            if actual.dtype == torch.float32:   # fp32 state of 16-bit parameters
                bound = 1e-6 + 1e-5 * torch.maximum(ref.abs(), exact.abs()).double()
                assert_within(actual, ref, bound, f"{name}[{i}]")
                continue
            # SPEC §4: error against the float64 oracle <= 2x the reference's error in the same
            # storage dtype, or 1 ulp of the storage dtype.
            bound = torch.maximum(2 * (ref.double() - exact).abs(), ulp(exact, actual.dtype))
            assert_within(actual, exact, bound, f"{name}[{i}]")


def event_step_inputs():
    """Candidates of three dtypes, with a gradient (counted by the update pass) and without
    (counted by histogram_kernel), and non-candidates that must not be ranked."""
    fp32 = StepTensors.make([(4097,), (7,), (0,)], torch.float32, torch.float32, seed=3)
    half = StepTensors.make([(33, 17), (1,)], torch.float16, torch.float32, seed=4)
    others = StepTensors.make([(50,)], torch.float32, torch.float32, seed=5)
    no_grad = StepTensors.make([(300,)], torch.bfloat16, torch.float32, seed=6).params
    groups = [fp32.group(), half.group(), others.group(prior=None, count=False)]
    return groups, fp32.params + half.params + no_grad, no_grad, others.params


@interpreted
def test_event_step_prunes_at_the_exact_threshold_of_the_updated_values():
    groups, candidates, no_grad, others = event_step_inputs()
    numel = sum(p.numel() for p in candidates)
    keep_masks = [torch.empty((p.numel() + 7) // 8, dtype=torch.uint8) for p in candidates]
    event = PruneEvent(params=candidates, k=int(numel * 0.6),
                       keep_masks=keep_masks)
    threshold = TRITON.step(groups, event, None)

    # The same update without an event gives θ_new before pruning (the update does not depend
    # on the counting): τ must be its k-th smallest |θ_new|, bit for bit.
    groups_u, candidates_u, _, others_u = event_step_inputs()
    TRITON.step(groups_u, None, None)
    tau = reference.global_threshold(candidates_u, event.k)
    assert_bitwise_equal(threshold.tau, tau, "tau")
    below = 0
    for i, (pruned, updated, mask) in enumerate(zip(candidates, candidates_u, keep_masks)):
        keep = reference.keep_mask(updated, tau)
        below += int((~keep).sum())
        assert_bitwise_equal(pruned, updated.masked_fill(~keep, 0), f"candidate {i}")
        assert torch.equal(mask, pack_mask(keep)), f"keep mask {i}"
    assert threshold.below.item() == below
    for i, (a, b) in enumerate(zip(others, others_u)):
        assert_bitwise_equal(a, b, f"non-candidate {i}")



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
    # exp_for_logistic: within 2 ulp of exp for inputs in [-86, ln(FLT_MAX)], +inf above, NaN kept,
    # exp(-86) below.
    finite = x.isfinite()
    exact = torch.exp(x.double().clamp(-86.0, 88.72283935546875))
    inside = finite & (x >= -86.0) & (x < 88.72283935546875)  # exp(ln(FLT_MAX) rounded up) = inf
    assert_within(exp[inside], exact[inside], 2 * ulp(exact[inside], torch.float32), "exp")
    assert (exp[finite & (x > 88.72283935546875)] == float("inf")).all()
    assert (exp[x.isnan()].isnan()).all() and exp[x == float("inf")].eq(float("inf")).all()
    assert torch.equal(exp[finite & (x < -86.0)],
                       torch.full_like(exp[finite & (x < -86.0)], exp[x == -86.0][0].item()))


# ---- τ: bit-identical to kthvalue -------------------------------------------------------------

def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


def _tau_case(name):
    generator = torch.Generator().manual_seed(11)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    if name == "ties":
        choice = torch.randint(0, 5, (600,), generator=generator)
        values = torch.tensor([0.1, -0.2, 0.3, 0.2, -0.1])[choice]
        return [values[:400].clone(), values[400:].reshape(20, 10).clone()]
    if name == "many_zeros":
        a = randn(5000)
        a[torch.rand(5000, generator=generator) < 0.7] = 0.0
        a[::13] = -0.0
        return [a, torch.zeros(9), _f32([-0.0, 1e-3])]
    if name == "denormals":
        tiny = torch.randint(1, 1 << 23, (700,), generator=generator,
                             dtype=torch.int32).view(torch.float32)
        return [tiny * torch.sign(randn(700)), _f32([1e-38, -1e-45, 0.0, 1.0]),
                torch.tensor([1e-7, 6e-8, 3e-5], dtype=torch.float16)]
    if name == "all_equal":
        return [torch.full((300,), 0.25), -torch.full((17,), 0.25)]
    if name == "one_element":
        return [_f32([0.5]), _f32([-0.25]), _f32([0.75]), _f32([0.25])]
    if name == "empty_among":
        return [torch.empty(0), randn(7), torch.empty(0, 3), randn(4097), torch.empty(0)]
    if name == "mixed_dtypes":
        base = randn(3000) * 0.05
        # The same values in three formats collide in key space after conversion.
        return [base[:1000], base[1000:2000].to(torch.bfloat16), base[2000:].to(torch.float16),
                base[:500].to(torch.bfloat16), _f32([0.0, -0.0])]
    if name == "bfloat16_only":
        return [(randn(2000) * 0.05).to(torch.bfloat16), (randn(33) * 0.05).to(torch.bfloat16)]
    if name == "inf_and_nan":
        return [_f32([float("inf"), 1.0, -float("inf"), 2.0, 3.0]), randn(50)]
    raise ValueError(name)


TAU_CASES = ["ties", "many_zeros", "denormals", "all_equal", "one_element", "empty_among",
             "mixed_dtypes", "bfloat16_only", "inf_and_nan"]


def _ranks(tensors, name):
    n = sum(t.numel() for t in tensors)
    if name == "inf_and_nan":
        return [1, n - 1, n]
    return sorted({1, 2, n // 3, n // 2, n - 1, n} - {0})


@interpreted
@pytest.mark.parametrize("name", TAU_CASES)
def test_global_threshold_is_kthvalue(name):
    tensors = _tau_case(name)
    before = [t.clone() for t in tensors]
    for k in _ranks(tensors, name):
        tau = TRITON.global_threshold(tensors, k)
        assert tau.dtype == torch.float32 and tau.dim() == 0
        assert_bitwise_equal(tau, reference.global_threshold(tensors, k), f"{name}, k={k}")
    for t, b in zip(tensors, before):
        assert_bitwise_equal(t, b, "global_threshold must not change its inputs")


@interpreted
@pytest.mark.parametrize("name", ["ties", "many_zeros", "denormals", "empty_among",
                                  "mixed_dtypes", "bfloat16_only"])
def test_pruning_event_without_update_matches_reference(name):
    """An event whose candidates have no gradient: τ, the pruned values, the count below τ and
    the packed masks equal the reference's."""
    ours, theirs = _tau_case(name), _tau_case(name)
    k = sum(t.numel() for t in ours) // 2
    masks = [torch.full(((t.numel() + 7) // 8,), 0xAA, dtype=torch.uint8) for t in ours]
    ref_masks = [m.clone() for m in masks]
    threshold = TRITON.step([], PruneEvent(ours, k, masks), None)
    expected = REFERENCE.step([], PruneEvent(theirs, k, ref_masks), None)
    assert_bitwise_equal(threshold.tau, expected.tau, "tau")
    assert threshold.below.item() == expected.below.item()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_bitwise_equal(a, b, f"tensor {i}")
        assert torch.equal(masks[i], ref_masks[i]), f"mask {i}"


# ---- whole runs through the optimizer ---------------------------------------------------------

# t_end = 56 - 6 - 1 = 49: dense for t < 6, events at 6, 8, 16, ..., 48, the freeze at 49, then
# a frozen mask for t = 50..55.
RUN_SCHEDULE = dict(num_train_examples=1000, initial_warmup_steps=6, total_steps=56,
                    final_warmup_steps=6, pruning_interval=8, initial_sparsity=0.3,
                    final_sparsity=0.9)


def make_model(shapes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(dtype))
            for s in shapes]


def run_optimizer(params, prune, backend, steps, state_dtype=torch.float32, **overrides):
    """MGPP over `params` (prune[i]: candidate) for schedule steps 0..steps-1; every fifth step
    the second parameter has no gradient, every seventh comes through a GradScaler scale of 2."""
    groups = [{"params": [p for p, c in zip(params, prune) if c], "prune": True},
              {"params": [p for p, c in zip(params, prune) if not c], "prune": False}]
    kwargs = dict(lr=1e-3, weight_decay=0.01, state_dtype=state_dtype, **RUN_SCHEDULE)
    kwargs.update(overrides)
    optimizer = MGPP([g for g in groups if g["params"]], backend=backend, **kwargs)
    for t in range(steps):
        scaled = t % 7 == 3
        for i, p in enumerate(params):
            generator = torch.Generator().manual_seed(1009 * t + i)
            grad = torch.randn(p.shape, generator=generator) * 0.01 * (2.0 if scaled else 1.0)
            p.grad = None if (t % 5 == 0 and i == 1) else grad.to(p.dtype)
        if scaled:
            optimizer.grad_scale = torch.tensor(2.0)
        optimizer.step()
        if scaled:
            del optimizer.grad_scale
    return optimizer


RUN_SHAPES = [(64, 33), (7,), (1,), (0,), (300,), (33,), (5,)]
RUN_PRUNE = [True, True, True, True, True, False, False]


@interpreted
def test_run_through_every_stage_fp32():
    ours, theirs = make_model(RUN_SHAPES, torch.float32), make_model(RUN_SHAPES, torch.float32)
    optimizer = run_optimizer(ours, RUN_PRUNE, "triton", 56)
    expected = run_optimizer(theirs, RUN_PRUNE, "reference", 56)
    assert optimizer.stats()["stage"] == "frozen" and optimizer.stats()["step"] == 56
    flat = torch.cat([p.detach().flatten() for p in ours])
    flat_ref = torch.cat([p.detach().flatten() for p in theirs])
    assert (flat - flat_ref).norm() <= 1e-4 * flat_ref.norm()
    candidates = [(p, r) for p, r, c in zip(ours, theirs, RUN_PRUNE) if c]
    numel = sum(p.numel() for p, _ in candidates)
    differ = sum(int((unpack_mask(optimizer.state[p]["keep_mask"], p)
                      != unpack_mask(expected.state[r]["keep_mask"], r)).sum())
                 for p, r in candidates)
    assert differ <= 1e-3 * numel
    for p, _ in candidates:  # the frozen mask is re-applied after every update
        assert not p[~unpack_mask(optimizer.state[p]["keep_mask"], p)].any()
    assert optimizer.stats()["pruned"] == expected.stats()["pruned"]


@interpreted
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, "param"),
                                               (torch.float16, torch.float32)])
def test_run_through_every_stage_16bit(dtype, state_dtype):
    shapes = RUN_SHAPES[:3] + RUN_SHAPES[5:]
    prune = RUN_PRUNE[:3] + RUN_PRUNE[5:]
    schedule = dict(initial_warmup_steps=3, total_steps=20, final_warmup_steps=3,
                    pruning_interval=4)
    ours, theirs = make_model(shapes, dtype), make_model(shapes, dtype)
    oracle = [torch.nn.Parameter(p.detach().double()) for p in ours]
    optimizer = run_optimizer(ours, prune, "triton", 20, state_dtype, **schedule)
    run_optimizer(theirs, prune, "reference", 20, state_dtype, **schedule)
    run_optimizer(oracle, prune, "reference", 20, torch.float32 if state_dtype == "param"
                  else state_dtype, **schedule)
    for p in ours:
        assert p.dtype == dtype and optimizer.state[p]["exp_avg"].dtype == (
            dtype if state_dtype == "param" else torch.float32)
    # No elementwise bound holds after pruning decisions diverge in 16 bits: the run must be as
    # close to the float64 oracle as the reference run in the same dtype, with some slack.
    def error(params):
        return (torch.cat([p.detach().double().flatten() for p in params])
                - torch.cat([o.detach().flatten() for o in oracle])).norm()
    assert error(ours) <= 2 * error(theirs) + 1e-3 * torch.cat(
        [o.detach().flatten() for o in oracle]).norm()
    # Every stage ran: the frozen mask holds the positions below the final τ (ties at τ stay, so
    # up to k = int(0.9·N) of them) and is applied.
    candidates = [p for p, c in zip(ours, prune) if c]
    masks = [unpack_mask(optimizer.state[p]["keep_mask"], p) for p in candidates]
    numel = sum(p.numel() for p in candidates)
    assert sum(int((~m).sum()) for m in masks) == optimizer.stats()["pruned"] > 0.85 * numel
    for p, keep in zip(candidates, masks):
        assert not p[~keep].any()


@interpreted
def test_prior_off_without_pruning_is_torch_adamw():
    shapes = [(4097,), (7,), (1,)]
    ours, theirs = make_model(shapes, torch.float32), make_model(shapes, torch.float32)
    optimizer = MGPP([{"params": ours, "prune": False}], lr=1e-3, weight_decay=0.01,
                     backend="triton", num_train_examples=10, initial_warmup_steps=10,
                     total_steps=200)
    adamw = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01)
    for t in range(100):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            generator = torch.Generator().manual_seed(1009 * t + i)
            p.grad = torch.randn(p.shape, generator=generator) * 0.01
            q.grad = p.grad.clone()
        optimizer.step()
        adamw.step()
    for p, q in zip(ours, theirs):
        assert (p - q).abs().max().item() <= 1e-6
        assert (optimizer.state[p]["exp_avg_sq"] - adamw.state[q]["exp_avg_sq"]).abs().max() <= 1e-6


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
        backend.step([before.group()], None, None)
    assert backend._plans.builds == 1
    before.grads[1] = before.grads[1].clone()  # a new gradient tensor: new addresses, new table
    backend.step([before.group()], None, None)
    assert backend._plans.builds == 2
    assert [s.item() for s in before.steps] == [7.0, 7.0]


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Makes every way of reading a tensor's value on the host fail when it is called from the
    files given to the returned function (on a GPU each would synchronise with the device)."""
    def forbid(files):
        watched = {str(Path(f).resolve()) for f in files}

        def guard(name, original):
            def guarded(self, *args, **kwargs):
                caller = str(Path(sys._getframe(1).f_code.co_filename).resolve())
                if caller in watched:
                    raise AssertionError(f"Tensor.{name} called from {caller}")
                return original(self, *args, **kwargs)
            return guarded

        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        original_to = torch.Tensor.to

        def guarded_to(self, *args, **kwargs):
            caller = str(Path(sys._getframe(1).f_code.co_filename).resolve())
            targets = list(args) + list(kwargs.values())
            if caller in watched and any(str(a) == "cpu" for a in targets):
                raise AssertionError(f"Tensor.to(cpu) called from {caller}")
            return original_to(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", guarded_to)
    return forbid


@interpreted
def test_the_guard_catches_host_reads(forbid_host_reads):
    from mgpp_kernels.backends import reference as reference_backend
    forbid_host_reads([reference_backend.__file__])
    before = StepTensors.make([(7,)], torch.float32, torch.float32)
    with pytest.raises(AssertionError, match="Tensor.item"):
        REFERENCE.step([before.group()], None, None)


@interpreted
def test_step_never_reads_device_values_on_the_host(forbid_host_reads):
    from mgpp_kernels.ops import layout
    shapes = [(33,), (7,), (1,), (0,)]
    candidates = make_model(shapes, torch.float32, seed=3)
    others = make_model([(5,)], torch.bfloat16, seed=4)
    optimizer = MGPP([{"params": candidates, "prune": True}, {"params": others, "prune": False}],
                     lr=1e-3, backend="triton", **SHORT_SCHEDULE)
    forbid_host_reads([triton_backend.__file__, kernels.__file__, layout.__file__])
    for t in range(8):  # dense, events, the freeze, frozen
        for i, p in enumerate(candidates + others):
            p.grad = None if (t == 4 and i == 0) else torch.full_like(p, 0.01 * (t + 1))
        optimizer.grad_scale = torch.tensor(1.0)
        optimizer.step()
    TRITON.global_threshold(candidates, 3)


@interpreted
def test_step_counts_kept_on_the_host_give_the_same_results(monkeypatch):
    """With the step counts in CPU tensors next to GPU parameters (the optimizer's default), the
    host increments them and stages them with the scalars: same results as on the device."""
    shapes = [(4097,), (7,), (1,)]
    before = StepTensors.make(shapes, torch.float32, torch.float32, step=9.0)
    on_device, on_host = before.clone(), before.clone()
    TRITON.step([on_device.group()], None, torch.tensor(2.0))
    monkeypatch.setattr(triton_backend, "_steps_on_device", lambda steps, device: False)
    TRITON.step([on_host.group()], None, torch.tensor(2.0))
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for i, (a, b) in enumerate(zip(getattr(on_device, name), getattr(on_host, name))):
            assert_bitwise_equal(a, b, f"{name}[{i}]")
    assert [s.item() for s in on_host.steps] == [10.0] * 3


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
        TRITON.step([bad.group()], None, None)
    bad = before.clone()
    bad.exp_avg_sqs[0] = bad.exp_avg_sqs[0].half()
    with pytest.raises(ValueError, match="exp_avg_sqs\\[0\\] must have the dtype of exp_avgs\\[0\\]"):
        TRITON.step([bad.group()], None, None)
    ok = before.clone()
    with pytest.raises(ValueError, match="k must be in"):
        TRITON.step([ok.group()], PruneEvent(ok.params, 13), None)
    with pytest.raises(ValueError, match="keep_masks\\[0\\] must be uint8"):
        TRITON.step([ok.group()], PruneEvent(ok.params, 3, [torch.zeros(2, dtype=torch.uint8)]
                                             * 2), None)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for i, (a, b) in enumerate(zip(getattr(ok, name), getattr(before, name))):
            assert_bitwise_equal(a, b, f"{name}[{i}] after a rejected step")


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
    kernel_names = {"prepare_kernel", "update_kernel", "histogram_kernel", "select_kernel",
                    "threshold_kernel"}
    for capability in (80, 90):
        builds = [b for b in gpu_builds if b["capability"] == capability]
        assert {b["name"] for b in builds} == kernel_names
        pairs = {(b["constexprs"]["PARAM_DTYPE"], b["constexprs"]["STATE_DTYPE"])
                 for b in builds if b["name"] == "update_kernel"}
        assert pairs == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)}
        for b in builds:
            assert b["target"].startswith(f"sm_{capability}"), b  # sm_90a for 90
            assert not b["approximate_f32_division"], b
            # The per-element math: IEEE division and square root, denormals kept, no FMA.
            if b["name"] == "update_kernel":
                assert not b["approximate"], b


@pytest.mark.parametrize("param,state", [(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)])
def test_update_kernel_loads_its_operands_128_bits_at_a_time_on_sm90(gpu_builds, param, state):
    build, = [b for b in gpu_builds if b["capability"] == 90 and b["name"] == "update_kernel"
              and b["constexprs"] == dict(PARAM_DTYPE=param, STATE_DTYPE=state, COUNT=True,
                                          ALIGNED=True, BLOCK=triton_backend.GPU_BLOCKS["update"])]
    # A full block is 2048 elements over 128 threads: 16 elements of θ, g, m and v per thread,
    # which is 4 128-bit loads of fp32 data or 2 of 16-bit data for each operand.
    per_operand = {0: 4, 1: 2, 2: 2}
    assert build["v4_loads"] >= sum(per_operand[d] for d in (param, param, state, state))
    assert build["v4_stores"] >= sum(per_operand[d] for d in (param, state, state))
