"""Property-based tests (hypothesis): random shapes (empty and one-element included), dtypes,
hyperparameters across their valid ranges and schedules short enough that every run crosses t_i,
the cubic events, t_end and the frozen stage. Each kernel backend runs in lockstep with the
reference and is checked after every step against docs/spec.md §4:

- θ, m, v within the fp32 bound (float32 storage) or against a float64 oracle (16-bit storage);
- on a pruning event, the kernel's τ is exactly the k-th smallest |θ| of what it left (which holds
  only if its radix selection is exact), every candidate it kept is ≥ τ, its keep mask is exactly
  the positions it kept; a position pruned by one backend and kept by the other must lie within
  the elementwise bound of the other's τ (the two θ differ within that bound before ranking).

After each step the kernel's state is reset to the reference's, so every step starts from the
same θ, m, v and mask and errors never compound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mgpp_kernels
from mgpp_kernels import MGPP, masks, reference, schedule
from mgpp_kernels.ops.layout import KERNEL_DTYPES

from compare import (assert_bitwise_equal, assert_fp32_bound, assert_mixed_precision_bound,
                     fp32_bound, ulp)


import backends

# Every kernel row of tests/backends.py is fuzzed against the reference.
EXAMPLES_PER_BACKEND = 200

STORAGE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Case:
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    prune: tuple[bool, ...]
    state_dtype: str                 # "fp32" or "param"
    value_scale: float               # initial θ ~ normal(0, value_scale)
    grad_scale_of_data: float        # data gradients ~ normal(0, this)
    tied_values: bool                # θ rounded to a coarse grid: ties and exact zeros
    missing_grad_rate: float         # chance that a parameter has no gradient in a step
    grad_scale: float | None         # GradScaler's scale handed to step(), None without one
    kwargs: dict                     # MGPP's keywords (schedule, prior, AdamW)
    other_lr: float                  # lr of the non-candidate group
    seed: int

    @property
    def steps(self) -> int:
        return self.kwargs["total_steps"] + 2   # beyond t_end: the frozen stage


@st.composite
def cases(draw) -> Case:
    count = draw(st.integers(1, 4))
    shapes = tuple(tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
                   for _ in range(count))
    dtypes = tuple(draw(st.sampled_from(KERNEL_DTYPES)) for _ in range(count))
    prune = tuple(draw(st.booleans()) for _ in range(count))
    state_dtype = draw(st.sampled_from(["fp32", "param"]))
    # The prior's gradient is about θ/(n·σ0²) near 0: keep it (and v ~ g²) inside float16's range
    # when m and v are stored in float16; elsewhere the whole valid range.
    float16_state = state_dtype == "param" and torch.float16 in dtypes
    log_n = draw(st.floats(0, 6))
    lowest_log_sigma0 = max(-12.0, -2.0 - log_n) if float16_state else -12.0
    sigma0_sq = 10 ** draw(st.floats(lowest_log_sigma0, -2))
    total_steps = draw(st.integers(2, 24))
    final_warmup = draw(st.integers(0, total_steps - 2))
    t_end = total_steps - final_warmup - 1
    final_sparsity = draw(st.floats(0, 0.95))
    kwargs = dict(
        lr=10 ** draw(st.floats(-5, -1)),
        betas=(draw(st.floats(0, 0.99)), draw(st.floats(0.5, 0.9999))),
        eps=10 ** draw(st.floats(-10, -6)),
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])),
        num_train_examples=int(10 ** log_n),
        sigma0_sq=sigma0_sq,
        sigma1_sq=sigma0_sq * 10 ** draw(st.floats(0.5, 8)),
        lambda_mix=draw(st.floats(0.01, 0.99)),
        lambda_final_factor=draw(st.floats(1e-4, 1)),
        total_steps=total_steps,
        final_warmup_steps=final_warmup,
        initial_warmup_steps=draw(st.integers(0, t_end - 1)),
        pruning_interval=draw(st.integers(1, 6)),
        initial_sparsity=draw(st.floats(0, final_sparsity)),
        final_sparsity=final_sparsity,
        state_dtype=torch.float32 if state_dtype == "fp32" else "param")
    return Case(shapes=shapes, dtypes=dtypes, prune=prune, state_dtype=state_dtype,
                value_scale=draw(st.sampled_from([1e-3, 0.02, 1.0])),
                grad_scale_of_data=10 ** draw(st.floats(-4, 0)),
                tied_values=draw(st.booleans()),
                missing_grad_rate=draw(st.sampled_from([0.0, 0.3])),
                grad_scale=draw(st.sampled_from([None, 1024.0, 3.0])),
                kwargs=kwargs, other_lr=10 ** draw(st.floats(-5, -1)),
                seed=draw(st.integers(0, 2 ** 16)))


# ---- runs ----------------------------------------------------------------------------------------


def initial_values(case: Case) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(case.seed)
    values = []
    for shape, dtype in zip(case.shapes, case.dtypes):
        value = torch.randn(shape, generator=generator) * case.value_scale
        if case.tied_values:
            grid = case.value_scale / 4
            value = torch.round(value / grid) * grid
        values.append(value.to(dtype))
    return values


def gradients(case: Case, t: int) -> list[torch.Tensor | None]:
    """Step t's gradients as stored in each parameter's dtype (scaled when a GradScaler is on)."""
    generator = torch.Generator().manual_seed(case.seed * 7919 + t)
    grads = []
    for shape, dtype in zip(case.shapes, case.dtypes):
        missing = float(torch.rand((), generator=generator)) < case.missing_grad_rate
        grad = torch.randn(shape, generator=generator) * case.grad_scale_of_data
        if case.grad_scale is not None:
            grad = grad * case.grad_scale
        grads.append(None if missing else grad.to(dtype))
    return grads


def build(case: Case, values: list[torch.Tensor], backend, as_float64: bool = False):
    """The run of `case` on `backend` (a row of tests/backends.py), on its device."""
    params = [torch.nn.Parameter(v.to(torch.float64) if as_float64
                                 else v.to(backend.device, copy=True)) for v in values]
    groups = [{"params": [p for p, c in zip(params, case.prune) if c], "prune": True},
              {"params": [p for p, c in zip(params, case.prune) if not c], "prune": False,
               "lr": case.other_lr}]
    kwargs = dict(case.kwargs, state_dtype="param") if as_float64 else case.kwargs
    return params, MGPP(groups, backend=backend.name, **kwargs)


def step(optimizer: MGPP, params, grads, case: Case) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
    if case.grad_scale is not None:
        device = params[0].device if params else "cpu"
        optimizer.grad_scale = torch.tensor(case.grad_scale, device=device)
        optimizer.found_inf = torch.tensor(0.0, device=device)
    optimizer.step()
    if case.grad_scale is not None:
        del optimizer.grad_scale, optimizer.found_inf


def copy_run(source: MGPP, source_params, target: MGPP, target_params) -> None:
    """Makes the target run's parameters and state equal to the source's (cast to its dtypes)."""
    with torch.no_grad():
        for s, t in zip(source_params, target_params):
            t.copy_(s)
            if s not in source.state:
                continue
            for key, value in source.state[s].items():
                if key not in target.state[t]:
                    # on the parameter's device: step counts too (the cpu backend's are there,
                    # and the device backends keep theirs with the parameters)
                    target.state[t][key] = value.to(t.device, copy=True)
                else:
                    target.state[t][key].copy_(value)


# ---- checks --------------------------------------------------------------------------------------


def threshold_of(optimizer: MGPP) -> float:
    return optimizer.stats()["tau"]


def check_pruning(params, optimizer: MGPP, prune, k: int, what: str) -> float:
    """A backend's own event is exact: τ is the k-th smallest |θ| of what it left, every kept
    candidate is ≥ τ, and at the freeze its keep mask is exactly the positions it kept."""
    candidates = [p for p, c in zip(params, prune) if c]
    on_host = [p.detach().cpu() for p in candidates]
    tau = torch.tensor(threshold_of(optimizer), dtype=torch.float32)
    assert_bitwise_equal(reference.global_threshold(on_host, k), tau, f"{what}: τ")
    for i, (p, value) in enumerate(zip(candidates, on_host)):
        magnitude = value.abs().float()
        assert bool(((magnitude >= tau) | (magnitude == 0) | magnitude.isnan()).all()), \
            f"{what}: candidate {i} keeps a value below τ"
        if "keep_mask" not in optimizer.state[p]:
            continue
        # Before the freeze, a mask (the device schedule's) keeps every element.
        kept = (reference.keep_mask(value, tau) if optimizer.stats()["stage"] == "frozen"
                else torch.ones_like(value, dtype=torch.bool))
        assert_bitwise_equal(optimizer.state[p]["keep_mask"], masks.pack_mask(kept),
                             f"{what}: keep mask of candidate {i}")
    return float(tau)


def element_bound(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bound = fp32_bound(values.abs())
    return bound if dtype == torch.float32 else torch.maximum(bound, 2 * ulp(values, dtype))


def check_disagreements(kernel, ref, dtype, tau_kernel, tau_ref, what) -> torch.Tensor:
    """Positions one backend pruned and the other kept: allowed only within the elementwise
    bound of the pruning backend's τ. Returns the mask of positions where both agree."""
    kernel, ref = kernel.detach().cpu().double(), ref.detach().cpu().double()
    only_kernel_kept = (kernel != 0) & (ref == 0)
    only_ref_kept = (ref != 0) & (kernel == 0)
    for kept, values, tau, name in ((only_kernel_kept, kernel, tau_ref, "kernel"),
                                    (only_ref_kept, ref, tau_kernel, "reference")):
        if kept.any():
            excess = values[kept].abs() - tau
            assert bool((excess <= element_bound(values[kept], dtype)).all()), (
                f"{what}: the {name} kept {values[kept].tolist()[:4]} that the other pruned, "
                f"beyond the bound of τ = {tau}")
    return ~(only_kernel_kept | only_ref_kept)


def check_step(case, t, before, runs, grads):
    """The kernel's step t against the reference's (and the float64 oracle's) from one state."""
    (params, kernel), (ref_params, ref), oracle_run = runs
    config = ref.config
    point = schedule.schedule_at(config, t)
    beta1, beta2 = case.kwargs["betas"]
    assert kernel.stats()["step"] == ref.stats()["step"] == t + 1
    candidates = [p for p, c in zip(ref_params, case.prune) if c]
    k = 0
    if point.prune_to is not None:
        k = schedule.prune_count(sum(p.numel() for p in candidates), point.prune_to)
    tau_kernel = tau_ref = None
    if k > 0:
        tau_kernel = check_pruning(params, kernel, case.prune, k, f"step {t} kernel")
        tau_ref = check_pruning(ref_params, ref, case.prune, k, f"step {t} reference")
    for i, (p, r) in enumerate(zip(params, ref_params)):
        what = f"step {t} tensor {i} {STORAGE_NAMES[p.dtype]} {tuple(p.shape)}"
        theta_old, m_old, v_old = before[i]
        agree = torch.ones(p.shape, dtype=torch.bool)
        if tau_kernel is not None and case.prune[i]:
            agree = check_disagreements(p, r, p.dtype, tau_kernel, tau_ref, what)
        if p.dtype == torch.float32:
            scale = torch.maximum(theta_old.abs().double(), r.detach().abs().double())
            assert_fp32_bound(p, r, scale, f"{what}: θ", where=agree)
        else:
            oracle_params, _ = oracle_run
            assert_mixed_precision_bound(p, r, oracle_params[i], f"{what}: θ", where=agree)
        state, ref_state = kernel.state[p], ref.state[r]
        # A candidate without a gradient so far has no moments (at most a keep mask).
        assert ("step" in state) == ("step" in ref_state), f"{what}: state keys"
        if "step" not in ref_state:
            continue
        assert_bitwise_equal(state["step"], ref_state["step"], f"{what}: step count")
        grad = grads[i]
        if grad is None:   # no update: the state must not move at all
            assert_bitwise_equal(state["exp_avg"], m_old, f"{what}: m")
            assert_bitwise_equal(state["exp_avg_sq"], v_old, f"{what}: v")
            continue
        g = grad.float() / (case.grad_scale or 1.0)
        if case.prune[i] and point.prior_on:
            g = g + reference.prior_gradient(theta_old.float(), point.lambda_t, config.sigma0_sq,
                                             config.sigma1_sq, config.num_train_examples)
        m, v = ref_state["exp_avg"].double(), ref_state["exp_avg_sq"].double()
        g, m_old, v_old = g.double(), m_old.double(), v_old.double()
        if state["exp_avg"].dtype == torch.float32:
            assert_fp32_bound(state["exp_avg"], ref_state["exp_avg"], torch.stack(
                [m.abs(), beta1 * m_old.abs(), (1 - beta1) * g.abs()]).amax(0), f"{what}: m")
            assert_fp32_bound(state["exp_avg_sq"], ref_state["exp_avg_sq"], torch.stack(
                [v, beta2 * v_old, (1 - beta2) * g * g]).amax(0), f"{what}: v")
        else:
            oracle_params, oracle = oracle_run
            oracle_state = oracle.state[oracle_params[i]]
            for key in ("exp_avg", "exp_avg_sq"):
                assert_mixed_precision_bound(state[key], ref_state[key], oracle_state[key],
                                             f"{what}: {key}")


def run_lockstep(case: Case, backend) -> None:
    values = initial_values(case)
    params, kernel = build(case, values, backend)
    ref_params, ref = build(case, values, backends.REFERENCE)
    needs_oracle = any(dtype != torch.float32 for dtype in case.dtypes)
    oracle_run = (build(case, values, backends.REFERENCE, as_float64=True) if needs_oracle
                  else None)
    for t in range(case.steps):
        grads = gradients(case, t)
        before = []   # θ, m, v of each tensor before the step (zeros before its first update)
        for r in ref_params:
            state = ref.state[r]
            before.append((r.detach().clone(), *(state[key].clone() if key in state
                                                 else torch.zeros(r.shape)
                                                 for key in ("exp_avg", "exp_avg_sq"))))
        step(kernel, params, grads, case)
        step(ref, ref_params, grads, case)
        if oracle_run is not None:
            step(oracle_run[1], oracle_run[0], grads, case)
        check_step(case, t, before, ((params, kernel), (ref_params, ref), oracle_run), grads)
        copy_run(ref, ref_params, kernel, params)
        if oracle_run is not None:
            copy_run(ref, ref_params, oracle_run[1], oracle_run[0])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:MGPP. no param group has prune=True")  # cases without any
@pytest.mark.parametrize("backend", backends.params(backends.KERNELS))
def test_backend_matches_reference_on_random_runs(backend):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only add barrier waits on shared cores

    # derandomize and no example database: every run (and CI) checks the same examples.
    @settings(max_examples=EXAMPLES_PER_BACKEND, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases())
    def check(case):
        run_lockstep(case, backend)

    try:
        check()
    finally:
        torch.set_num_threads(threads)


def test_cases_cross_every_schedule_boundary():
    """The strategy's schedules cover each stage: a sample of cases hits t_i, a cubic event,
    t_end and the frozen stage (with total_steps + 2 steps per run)."""
    stages = set()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(case=cases())
    def collect(case):
        config = mgpp_kernels.MGPPConfig(**{k: v for k, v in case.kwargs.items()
                                            if k not in ("lr", "betas", "eps", "weight_decay",
                                                         "state_dtype")})
        for t in range(case.steps):
            point = schedule.schedule_at(config, t)
            if t == config.initial_warmup_steps:
                stages.add("t_i")
            elif point.prune_to is not None and not point.freeze:
                stages.add("cubic")
            if point.freeze:
                stages.add("t_end")
            if point.frozen:
                stages.add("frozen")
        assert math.isfinite(case.kwargs["sigma1_sq"])

    collect()
    assert stages == {"t_i", "cubic", "t_end", "frozen"}
