"""The peers the suite measures, each as a step function over a workload's tensors: MGPP on every
backend, torch.optim.AdamW, the reference's step math under torch.compile and the unfused recipe;
and the ways of selecting τ."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from mgpp_kernels import reference
from mgpp_kernels.schedule import prune_count
from mgpp_kernels.backends import BackendUnavailableError, available_backends, load_backend
from mgpp_kernels.optimizer import MGPP

from .settings import (BETAS, DENSE_SCHEDULE, EPS, EVENT_SCHEDULE, FINAL_SPARSITY, LAMBDA_MIX, LR,
                       NUM_TRAIN_EXAMPLES, SIGMA0_SQ, SIGMA1_SQ)
from .storage import BF16, FP32, STORAGE, Storage

# torch.optim.AdamW's default weight decay, in every peer's step.
WEIGHT_DECAY = 0.01

FUSED_ADAMW = "torch AdamW fused"
RECIPE = "unfused recipe"
COMPILED_REFERENCE = "reference, torch.compile"
SELECTION_METHODS = ("radix histograms", "torch kthvalue", "torch topk", "torch sort")


class Stepper:
    """A step function ready to time, and what to undo afterwards."""

    def __init__(self, step: Callable[[], object], close: Callable[[], None] = lambda: None):
        self.step = step
        self.close = close


def mgpp_stepper(params, backend: str, event: bool, storage: Storage) -> Stepper:
    optimizer = MGPP([{"params": params, "prune": True}], lr=LR, betas=BETAS, eps=EPS,
                     weight_decay=WEIGHT_DECAY, backend=backend, state_dtype=storage.state_dtype,
                     num_train_examples=NUM_TRAIN_EXAMPLES, sigma0_sq=SIGMA0_SQ,
                     sigma1_sq=SIGMA1_SQ, lambda_mix=LAMBDA_MIX,
                     **(EVENT_SCHEDULE if event else DENSE_SCHEDULE))
    optimizer.step()  # allocates the state (and, with events, prunes to s_i)
    return Stepper(optimizer.step)


def adamw_stepper(params, **options) -> Stepper:
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  **options)
    optimizer.step()
    return Stepper(optimizer.step)


def reference_step_math(theta, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float, lambda_t: float,
                        sigma0_sq: float, sigma1_sq: float, num_train_examples: int) -> None:
    """The reference's step of one tensor, in place: prior gradient, then AdamW."""
    grad = grad + reference.prior_gradient(theta, lambda_t, sigma0_sq, sigma1_sq,
                                           num_train_examples)
    reference.adamw_update(theta, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                           weight_decay)


_compiled_math: dict[str, Callable] = {}


def compiled_reference_math(device: torch.device) -> tuple[Callable, float]:
    """reference_step_math under torch.compile (symbolic sizes and step: compiled once), checked
    against eager on a 4097-element tensor; returns it and the compile seconds."""
    if device.type in _compiled_math:
        return _compiled_math[device.type], 0.0
    compiled = torch.compile(reference_step_math, dynamic=True)
    generator = torch.Generator(device=device).manual_seed(1)
    eager_state = [torch.randn(4097, generator=generator, device=device) * 0.04,
                   torch.randn(4097, generator=generator, device=device) * 1e-3,
                   torch.zeros(4097, device=device), torch.zeros(4097, device=device)]
    compiled_state = [t.clone() for t in eager_state]
    start = time.perf_counter()
    with torch.no_grad():
        for step in (1, 2):
            compiled(*compiled_state, step, *_math_scalars())
            reference_step_math(*eager_state, step, *_math_scalars())
    compile_seconds = time.perf_counter() - start
    theta, eager_theta = compiled_state[0], eager_state[0]
    if not torch.allclose(theta, eager_theta, rtol=1e-5, atol=1e-6):
        raise RuntimeError("the torch.compile'd reference step differs from the eager one by "
                           f"{(theta - eager_theta).abs().max().item():.3g}")
    _compiled_math[device.type] = compiled
    return compiled, compile_seconds


def _math_scalars() -> tuple:
    return (LR, BETAS[0], BETAS[1], EPS, WEIGHT_DECAY, LAMBDA_MIX, SIGMA0_SQ, SIGMA1_SQ,
            NUM_TRAIN_EXAMPLES)


def compiled_reference_stepper(params) -> Stepper:
    compiled, _ = compiled_reference_math(params[0].device)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [0]

    @torch.no_grad()
    def step():
        steps[0] += 1
        for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
            # flat views: one symbolic size, so every shape shares the compiled kernel
            compiled(p.detach().view(-1), p.grad.view(-1), m.view(-1), v.view(-1), steps[0],
                     *_math_scalars())

    step()
    return Stepper(step)


def recipe_stepper(params, event: bool) -> Stepper:
    """What a user writes without MGPP's kernels: torch.optim.AdamW(fused=True), the prior gradient
    added to each candidate's .grad in Python (as a gradient hook would), and on an event step τ
    from torch.cat + kthvalue and a masked_fill_ per tensor."""
    adamw = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                              fused=True)
    k = prune_count(sum(p.numel() for p in params), FINAL_SPARSITY)
    saved_grads = [p.grad.clone() for p in params]  # the recipe adds to .grad: undone afterwards

    @torch.no_grad()
    def step():
        for p in params:
            p.grad.add_(reference.prior_gradient(p, LAMBDA_MIX, SIGMA0_SQ, SIGMA1_SQ,
                                                 NUM_TRAIN_EXAMPLES))
        adamw.step()
        if event:
            tau = torch.kthvalue(torch.cat([p.abs().flatten() for p in params]), k).values
            for p in params:
                p.masked_fill_(p.abs() < tau, 0)

    def close():
        for p, grad in zip(params, saved_grads):
            p.grad.copy_(grad)

    step()
    return Stepper(step, close)


@dataclass(frozen=True)
class StepCase:
    implementation: str
    storage: Storage
    event: bool
    threads: int | None
    build: Callable[[list[torch.nn.Parameter]], Stepper]


def kernel_backends(device: torch.device) -> list[str]:
    """The built backends that run on this device, the reference last; the Triton interpreter
    (TRITON_INTERPRET=1 on a CPU) is a test tool, not a benchmark peer."""
    probe = [torch.zeros(1, device=device)]
    names = []
    for name in available_backends():
        if name == "triton" and device.type == "cpu":
            continue
        try:
            load_backend(name).check_params(probe)
        except (ValueError, BackendUnavailableError):
            continue
        names.append(name)
    return sorted(names, key=lambda name: name == "reference")


def step_cases(device: torch.device, thread_counts: list, peers: bool, compile_reference: bool,
               storage: bool = False) -> list[StepCase]:
    """In run order: no-event fp32 steps first, since event steps prune the shared tensors. With
    `storage`, every 16-bit storage combination with and without an event beside fused AdamW in
    its dtype, at every thread count."""
    backends = kernel_backends(device)
    kernels = [b for b in backends if b != "reference"]
    all_threads = thread_counts[-1]
    shown = backends if peers else kernels
    cases = []
    for threads in reversed(thread_counts):
        for backend in kernels:
            cases.append(StepCase(f"MGPP {backend}", FP32, False, threads,
                                  lambda p, b=backend: mgpp_stepper(p, b, False, FP32)))
        cases.append(StepCase(FUSED_ADAMW, FP32, False, threads,
                              lambda p: adamw_stepper(p, fused=True)))
    if peers:
        if "reference" in backends:
            cases.append(StepCase("MGPP reference", FP32, False, all_threads,
                                  lambda p: mgpp_stepper(p, "reference", False, FP32)))
        if compile_reference:
            cases.append(StepCase(COMPILED_REFERENCE, FP32, False, all_threads,
                                  compiled_reference_stepper))
        cases += [
            StepCase("torch AdamW default", FP32, False, all_threads, lambda p: adamw_stepper(p)),
            StepCase("torch AdamW foreach", FP32, False, all_threads,
                     lambda p: adamw_stepper(p, foreach=True)),
            StepCase(RECIPE, FP32, False, all_threads, lambda p: recipe_stepper(p, False)),
        ]
    for backend in shown:
        cases.append(StepCase(f"MGPP {backend}", FP32, True, all_threads,
                              lambda p, b=backend: mgpp_stepper(p, b, True, FP32)))
    if peers:
        cases.append(StepCase(RECIPE, FP32, True, all_threads, lambda p: recipe_stepper(p, True)))
    if not storage:   # the size ladder's bf16 series
        for backend in kernels:
            cases.append(StepCase(f"MGPP {backend}", BF16, False, all_threads,
                                  lambda p, b=backend: mgpp_stepper(p, b, False, BF16)))
    else:
        for threads in reversed(thread_counts):
            for combination in STORAGE:
                if combination == FP32:   # its steps are above
                    continue
                for backend in kernels:
                    for event in (False, True):
                        cases.append(StepCase(
                            f"MGPP {backend}", combination, event, threads,
                            lambda p, b=backend, e=event, s=combination: mgpp_stepper(p, b, e, s)))
                if combination.runs_on_adamw:
                    cases.append(StepCase(FUSED_ADAMW, combination, False, threads,
                                          lambda p: adamw_stepper(p, fused=True)))
    if peers and "reference" in shown:
        cases.append(StepCase("MGPP reference", BF16, False, all_threads,
                              lambda p: mgpp_stepper(p, "reference", False, BF16)))
    return cases


def _magnitudes(tensors) -> torch.Tensor:
    return torch.cat([t.detach().abs().flatten() for t in tensors])


def selection_function(method: str, radix_backend: str, tensors, k: int) -> Callable[[], torch.Tensor]:
    numel = sum(t.numel() for t in tensors)
    if method == "radix histograms":
        backend = load_backend(radix_backend)
        return lambda: backend.global_threshold(tensors, k)
    if method == "torch kthvalue":
        return lambda: torch.kthvalue(_magnitudes(tensors), k).values
    if method == "torch topk":
        # the (N - k + 1) largest: the smaller side of k = 0.9 N
        return lambda: torch.topk(_magnitudes(tensors), numel - k + 1, sorted=False).values.min()
    if method == "torch sort":
        return lambda: torch.sort(_magnitudes(tensors)).values[k - 1]
    raise ValueError(f"unknown selection method {method!r}")
