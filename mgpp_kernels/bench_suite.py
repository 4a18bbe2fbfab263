"""`python -m mgpp_kernels bench-suite` (also benchmarks/suite.py): the kernel microbenchmarks.

Everything runs in one process on the same tensors, in four sections:

- bandwidth: a copy (a = b), a triad (a = b + s·c) and an in-place add (a += b) with torch on
  large arrays, at every thread count, at the start and at the end of the run. Bytes count the
  traffic of a write-allocate cache: copy 12 B per element (b read, a read for ownership, a
  written), triad 16 B, in-place add 12 B. The roofline is the best of them all: counting the
  read-for-ownership can only raise it, so fractions of it are never flattered.
- step: one optimizer step over a candidate set. On the peers model (BERT-base's 84.9M candidate
  elements) every peer runs: MGPP on every built backend (without and with a pruning event, fp32 and
  bf16), the reference, the reference's per-tensor step math under torch.compile,
  torch.optim.AdamW default / foreach / fused, and the unfused recipe a user would write. On every
  model of the size ladder (1.6M to 354M elements) the kernel backends and fused AdamW run with
  1 thread and with all threads.
- selection: τ, the k-th smallest |θ| (k = 0.9 N), by radix histograms against torch.cat + kthvalue,
  topk and sort (those two only up to sizes where they take seconds, not minutes, on a CPU).

Bytes per step are what SPEC §3 says a step must move, per element: θ, g, m, v read and θ, m, v
written once (fp32: 28 B; bf16 parameters with bf16 state: 14 B; bf16 with fp32 state: 22 B); an
event adds one read of θ for the radix refinement (not for bf16, whose keys need one level) and one
for the zeroing pass. Achieved GB/s = those bytes / step time; the fraction is of the roofline.

Peak memory is how far the process's peak grows above what it holds before the timed steps
(parameters, gradients, the optimizer's state): resident set on a CPU, torch.cuda.max_memory_allocated
on a GPU.

Writes a CSV (one row per measurement, with machine, versions and load), two PNG plots and a
markdown summary to --output-dir.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import os
import re
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from platform import python_version
from typing import Callable

import torch

from . import __version__, reference
from .backends import BackendUnavailableError, available_backends, load_backend
from .bench import _cpu_model, peak_rss_growth
from .optimizer import MGPP

LR, BETAS, EPS, WEIGHT_DECAY = 1e-5, (0.9, 0.999), 1e-8, 0.01
LAMBDA_MIX, SIGMA0_SQ, SIGMA1_SQ, NUM_TRAIN_EXAMPLES = 0.1, 1e-10, 0.05, 67349
FINAL_SPARSITY = 0.9
# Dense stage with the prior on: every step is a step without an event.
NO_EVENT_SCHEDULE = dict(total_steps=2_000_000, initial_warmup_steps=1_000_000)
# Pruning stage from step 0 with an event every step.
EVENT_SCHEDULE = dict(total_steps=1_000_000, initial_warmup_steps=0, pruning_interval=1)

FUSED_ADAMW = "torch AdamW fused"
RECIPE = "unfused recipe"
COMPILED_REFERENCE = "reference, torch.compile"
SELECTION_METHODS = ("radix histograms", "torch kthvalue", "torch topk", "torch sort")


# ---- models: candidate matrix shapes -----------------------------------------------------------

@dataclass(frozen=True)
class Model:
    name: str
    shapes: tuple[tuple[int, int], ...]

    @property
    def elements(self) -> int:
        return sum(rows * cols for rows, cols in self.shapes)


def bert(name: str, layers: int, hidden: int) -> Model:
    """Each layer's query, key, value, attention-output, intermediate and output matrices."""
    layer = ((hidden, hidden),) * 4 + ((4 * hidden, hidden), (hidden, 4 * hidden))
    return Model(name, layer * layers)


def llama(name: str, blocks: int, hidden: int, intermediate: int) -> Model:
    """Each block's q, k, v, o projections and the gate, up and down matrices of its MLP."""
    block = ((hidden, hidden),) * 4 + ((intermediate, hidden),) * 2 + ((hidden, intermediate),)
    return Model(name, block * blocks)


BERT_BASE = bert("BERT-base L12/H768", 12, 768)
FULL_LADDER = (
    bert("BERT L2/H256", 2, 256),
    bert("BERT-small L4/H512", 4, 512),
    bert("BERT-medium L8/H512", 8, 512),
    BERT_BASE,
    bert("BERT-large L24/H1024", 24, 1024),
    llama("LLaMA-style 7 blocks H2048/F5504", 7, 2048, 5504),
)
QUICK_LADDER = (bert("BERT-tiny L2/H128", 2, 128), llama("LLaMA-style 1 block H128/F344", 1, 128, 344))


# ---- the platform: how to time, how to measure memory -------------------------------------------

class CpuPlatform:
    device = torch.device("cpu")
    kind = "cpu"
    bandwidth_elements = 64 * 2**20        # 256 MiB per array, far beyond any cache
    # sort and topk over hundreds of millions of elements take minutes on a CPU
    selection_limits = {"torch topk": 100_000_000, "torch sort": 30_000_000}

    def __init__(self, thread_counts: list[int] | None = None):
        self.machine = f"{_cpu_model()} ({os.cpu_count()} CPUs)"
        self.thread_counts = sorted(set(thread_counts or (1, torch.get_num_threads())))

    def time(self, fn: Callable[[], object], budget: float, max_repeats: int
             ) -> tuple[list[float], int | None]:
        """(seconds of each timed call, peak bytes above the start).

        The first call is a warm-up, unless it alone takes the whole budget: then it is the sample.
        """
        samples: list[float] = []

        def calls():
            samples.append(_seconds(fn))
            if samples[0] < budget:
                repeats = max(1, min(max_repeats, int(budget / max(samples[0], 1e-9))))
                samples[:] = [_seconds(fn) for _ in range(repeats)]

        peak = peak_rss_growth(calls)
        return samples, peak if peak >= 0 else None

    def empty_cache(self) -> None:
        pass


class CudaPlatform:
    device = torch.device("cuda")
    kind = "cuda"
    bandwidth_elements = 256 * 2**20       # 1 GiB per array, far beyond L2
    selection_limits: dict[str, int] = {}
    thread_counts = [None]

    def __init__(self):
        self.machine = torch.cuda.get_device_name()

    def time(self, fn: Callable[[], object], budget: float, max_repeats: int
             ) -> tuple[list[float], int | None]:
        samples = _cuda_samples(fn, budget)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return samples, torch.cuda.max_memory_allocated() - start

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda_samples(fn: Callable[[], object], budget: float) -> list[float]:
    """Seconds per call from CUDA events: triton.testing.do_bench where triton is installed."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        warmup_ms, rep_ms = max(1, int(budget * 250)), max(1, int(budget * 1000))
        try:
            milliseconds = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        except AssertionError:  # a triton without return_mode="all": its median stands for all
            milliseconds = [do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")]
        return [ms / 1e3 for ms in milliseconds]
    fn()
    torch.cuda.synchronize()
    first = _cuda_event_seconds(fn)
    repeats = max(1, min(100, int(budget / max(first, 1e-9))))
    return [_cuda_event_seconds(fn) for _ in range(repeats)]


def _cuda_event_seconds(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@contextmanager
def num_threads(threads: int | None):
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- the tensors of one model --------------------------------------------------------------------

class Workload:
    """A model's candidate parameters with gradients, fp32, and a bf16 copy made on first use."""

    def __init__(self, model: Model, device: torch.device, seed: int = 0):
        self.model = model
        generator = torch.Generator(device=device).manual_seed(seed)
        self.fp32 = []
        for shape in model.shapes:
            param = torch.nn.Parameter(torch.randn(shape, generator=generator, device=device) * 0.04)
            param.grad = torch.randn(shape, generator=generator, device=device) * 1e-3
            self.fp32.append(param)
        self._bf16: list[torch.nn.Parameter] | None = None

    def params(self, precision: str) -> list[torch.nn.Parameter]:
        if precision == "fp32":
            return self.fp32
        if self._bf16 is None:
            self._bf16 = []
            for p in self.fp32:
                copy = torch.nn.Parameter(p.detach().to(torch.bfloat16))
                copy.grad = p.grad.to(torch.bfloat16)
                self._bf16.append(copy)
        return self._bf16


def step_bytes(precision: str, event: bool) -> int:
    """Bytes per element SPEC §3 says a step must move (see the module docstring)."""
    param_bytes, state_bytes = {"fp32": (4, 4), "bf16": (2, 2), "bf16, fp32 state": (2, 4)}[precision]
    update = 3 * param_bytes + 4 * state_bytes   # θ read and written, g read; m, v read and written
    if not event:
        return update
    refinement = param_bytes if param_bytes == 4 else 0
    return update + refinement + param_bytes


# ---- the peers: each builds a step function over a workload ------------------------------------

class Stepper:
    """A step function ready to time, and what to undo afterwards."""

    def __init__(self, step: Callable[[], object], close: Callable[[], None] = lambda: None):
        self.step = step
        self.close = close


def mgpp_stepper(params, backend: str, event: bool, state_dtype) -> Stepper:
    optimizer = MGPP([{"params": params, "prune": True}], lr=LR, betas=BETAS, eps=EPS,
                     weight_decay=WEIGHT_DECAY, backend=backend, state_dtype=state_dtype,
                     num_train_examples=NUM_TRAIN_EXAMPLES, sigma0_sq=SIGMA0_SQ,
                     sigma1_sq=SIGMA1_SQ, lambda_mix=LAMBDA_MIX,
                     **(EVENT_SCHEDULE if event else NO_EVENT_SCHEDULE))
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
    k = reference.prune_count(sum(p.numel() for p in params), FINAL_SPARSITY)
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
    precision: str             # "fp32", "bf16" (bf16 state), "bf16, fp32 state"
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


def step_cases(device: torch.device, thread_counts: list, peers: bool, compile_reference: bool
               ) -> list[StepCase]:
    """In run order: no-event fp32 steps first, since event steps prune the shared tensors."""
    backends = kernel_backends(device)
    kernels = [b for b in backends if b != "reference"]
    all_threads = thread_counts[-1]
    shown = backends if peers else kernels
    cases = []
    for threads in reversed(thread_counts):
        for backend in kernels:
            cases.append(StepCase(f"MGPP {backend}", "fp32", False, threads,
                                  lambda p, b=backend: mgpp_stepper(p, b, False, torch.float32)))
        cases.append(StepCase(FUSED_ADAMW, "fp32", False, threads,
                              lambda p: adamw_stepper(p, fused=True)))
    if peers:
        if "reference" in backends:
            cases.append(StepCase("MGPP reference", "fp32", False, all_threads,
                                  lambda p: mgpp_stepper(p, "reference", False, torch.float32)))
        if compile_reference:
            cases.append(StepCase(COMPILED_REFERENCE, "fp32", False, all_threads,
                                  compiled_reference_stepper))
        cases += [
            StepCase("torch AdamW default", "fp32", False, all_threads, lambda p: adamw_stepper(p)),
            StepCase("torch AdamW foreach", "fp32", False, all_threads,
                     lambda p: adamw_stepper(p, foreach=True)),
            StepCase(RECIPE, "fp32", False, all_threads, lambda p: recipe_stepper(p, False)),
        ]
    for backend in shown:
        cases.append(StepCase(f"MGPP {backend}", "fp32", True, all_threads,
                              lambda p, b=backend: mgpp_stepper(p, b, True, torch.float32)))
    if peers:
        cases.append(StepCase(RECIPE, "fp32", True, all_threads, lambda p: recipe_stepper(p, True)))
    for backend in shown:
        cases.append(StepCase(f"MGPP {backend}", "bf16", False, all_threads,
                              lambda p, b=backend: mgpp_stepper(p, b, False, "param")))
    if peers:
        cases.append(StepCase(FUSED_ADAMW, "bf16", False, all_threads,
                              lambda p: adamw_stepper(p, fused=True)))
        for backend in shown:
            cases.append(StepCase(f"MGPP {backend}", "bf16", True, all_threads,
                                  lambda p, b=backend: mgpp_stepper(p, b, True, "param")))
            cases.append(StepCase(f"MGPP {backend}", "bf16, fp32 state", False, all_threads,
                                  lambda p, b=backend: mgpp_stepper(p, b, False, torch.float32)))
    return cases


# ---- τ selection ---------------------------------------------------------------------------------

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


# ---- the run -------------------------------------------------------------------------------------

COLUMNS = ("machine", "device", "torch", "triton", "mgpp_kernels", "python", "command", "started",
           "load_1min",
           "section", "model", "elements", "implementation", "precision", "event", "threads",
           "repeats", "seconds", "best_seconds", "ns_per_element", "bytes_per_element", "gbps",
           "fraction_of_bandwidth", "vs_fused_adamw", "peak_extra_mib", "tau", "note")


@dataclass
class Suite:
    platform: CpuPlatform | CudaPlatform
    ladder: tuple[Model, ...]
    peers_model: Model
    budget: float
    max_repeats: int
    compile_reference: bool
    command: str
    rows: list[dict] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.context = dict(machine=self.platform.machine, device=self.platform.kind,
                            torch=torch.__version__, triton=_triton_version(),
                            mgpp_kernels=__version__, python=python_version(),
                            command=self.command,
                            started=datetime.datetime.now().isoformat(timespec="seconds"))

    def record(self, progress, **values) -> dict:
        row = {column: "" for column in COLUMNS}
        row.update(self.context, load_1min=round(os.getloadavg()[0], 2), **values)
        if row["seconds"] != "" and row["elements"]:
            row["ns_per_element"] = row["seconds"] / row["elements"] * 1e9
            if row["bytes_per_element"] != "":
                row["gbps"] = row["bytes_per_element"] * row["elements"] / row["seconds"] / 1e9
        self.rows.append(row)
        progress.write(_progress_line(row))
        progress.update(1)
        return row

    def measure_bandwidth(self, progress, when: str) -> None:
        n = self.platform.bandwidth_elements
        device = self.platform.device
        a = torch.empty(n, device=device)
        b = torch.rand(n, device=device)
        c = torch.rand(n, device=device)
        kernels = (("copy", 12, lambda: a.copy_(b)),
                   ("triad", 16, lambda: torch.add(b, c, alpha=3.0, out=a)),
                   ("in-place add", 12, lambda: a.add_(b)))
        for threads in self.platform.thread_counts:
            for name, bytes_per_element, fn in kernels:
                with num_threads(threads):
                    samples, _ = self.platform.time(fn, self.budget, max(self.max_repeats, 5))
                # the best call: what the memory system can do when nothing else intrudes
                self.record(progress, section="bandwidth", model=f"{when} of the run", elements=n,
                            implementation=name, precision="fp32", threads=threads or "",
                            repeats=len(samples), seconds=min(samples), best_seconds=min(samples),
                            bytes_per_element=bytes_per_element)
        del a, b, c
        self.platform.empty_cache()

    def measure_model(self, progress, model: Model) -> None:
        workload = Workload(model, self.platform.device)
        peers = model == self.peers_model
        for case in step_cases(self.platform.device, self.platform.thread_counts, peers,
                               self.compile_reference):
            self.measure_step(progress, workload, case)
        self.measure_selection(progress, workload)
        del workload
        gc.collect()
        self.platform.empty_cache()

    def measure_step(self, progress, workload: Workload, case: StepCase) -> None:
        note = ""
        with num_threads(case.threads):
            if case.implementation == COMPILED_REFERENCE:
                _, compile_seconds = compiled_reference_math(self.platform.device)
                note = f"compiled once in {compile_seconds:.0f} s, not counted"
            stepper = case.build(workload.params(case.precision))
            samples, peak = self.platform.time(stepper.step, self.budget, self.max_repeats)
            stepper.close()
        del stepper  # frees the optimizer state (no reference cycles: no gc pass needed)
        self.platform.empty_cache()
        self.record(progress, section="step", model=workload.model.name,
                    elements=workload.model.elements, implementation=case.implementation,
                    precision=case.precision, event=case.event, threads=case.threads or "",
                    repeats=len(samples), seconds=statistics.median(samples),
                    best_seconds=min(samples),
                    bytes_per_element=step_bytes(case.precision, case.event),
                    peak_extra_mib="" if peak is None else peak / 2**20, note=note)

    def measure_selection(self, progress, workload: Workload) -> None:
        tensors = workload.fp32
        numel = workload.model.elements
        k = reference.prune_count(numel, FINAL_SPARSITY)
        radix_backend = kernel_backends(self.platform.device)[0]
        taus = {}
        for method in SELECTION_METHODS:
            common = dict(section="selection", model=workload.model.name, elements=numel,
                          implementation=method, precision="fp32",
                          threads=self.platform.thread_counts[-1] or "")
            limit = self.platform.selection_limits.get(method)
            if limit is not None and numel > limit:
                self.record(progress, note=f"skipped above {limit / 1e6:.0f}M elements: minutes "
                                           f"on this machine", **common)
                continue
            fn = selection_function(method, radix_backend, tensors, k)
            samples, peak = self.platform.time(fn, self.budget, self.max_repeats)
            tau = fn().item()
            taus[method] = tau
            note = f"{radix_backend} backend" if method == "radix histograms" else ""
            self.record(progress, repeats=len(samples), seconds=statistics.median(samples),
                        best_seconds=min(samples), tau=repr(tau),
                        bytes_per_element=8 if method == "radix histograms" else "",
                        peak_extra_mib="" if peak is None else peak / 2**20, note=note, **common)
        if len(set(taus.values())) > 1:
            raise RuntimeError(f"τ differs between selection methods on {workload.model.name}: {taus}")

    def run(self) -> list[dict]:
        from tqdm import tqdm

        total = 2 * 3 * len(self.platform.thread_counts) + len(self.ladder) * len(SELECTION_METHODS) + sum(
            len(step_cases(self.platform.device, self.platform.thread_counts,
                           model == self.peers_model, self.compile_reference))
            for model in self.ladder)
        # Bandwidth, selection and the peers run with the most threads asked for.
        with num_threads(self.platform.thread_counts[-1]), tqdm(
                total=total, desc="bench-suite", unit="measurement", file=sys.stderr, disable=None,
                dynamic_ncols=True) as progress:
            progress.write(_progress_header())
            self.measure_bandwidth(progress, "start")
            for model in self.ladder:
                progress.set_postfix_str(f"{model.name}, {model.elements / 1e6:.1f}M")
                self.measure_model(progress, model)
            self.measure_bandwidth(progress, "end")
        self.finish()
        return self.rows

    def finish(self) -> None:
        """Fractions of the roofline and ratios to fused AdamW, once every row is in."""
        bandwidth = roofline_gbps(self.rows)
        fused = {(r["model"], r["precision"], r["threads"]): r["seconds"] for r in self.rows
                 if r["section"] == "step" and r["implementation"] == FUSED_ADAMW}
        for row in self.rows:
            if row["gbps"] != "" and row["section"] != "bandwidth":
                row["fraction_of_bandwidth"] = row["gbps"] / bandwidth
            baseline = fused.get((row["model"], row["precision"], row["threads"]))
            if row["section"] == "step" and baseline:
                row["vs_fused_adamw"] = row["seconds"] / baseline


def roofline_gbps(rows: list[dict]) -> float:
    return max(r["gbps"] for r in rows if r["section"] == "bandwidth")


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def _progress_header() -> str:
    return (f"{'section':<9} {'model':<34} {'implementation':<26} {'precision':<16} {'event':<5} "
            f"{'thr':>3} {'ms':>10} {'ns/elem':>8} {'GB/s':>7}")


def _progress_line(row: dict) -> str:
    def number(value, fmt):
        return format(value, fmt) if value != "" else "-"
    event = "yes" if row["event"] is True else ""
    line = (f"{row['section']:<9} {row['model']:<34} {row['implementation']:<26} "
            f"{row['precision']:<16} {event:<5} {str(row['threads']):>3} "
            f"{number(row['seconds'] * 1e3 if row['seconds'] != '' else '', '10.2f'):>10} "
            f"{number(row['ns_per_element'], '8.3f'):>8} {number(row['gbps'], '7.2f'):>7}")
    return line + (f"  {row['note']}" if row["note"] else "")


# ---- bars, tables, plots ------------------------------------------------------------------------

@dataclass
class Bar:
    text: str
    value: str
    met: bool


def evaluate_bars(rows: list[dict], peers_model: str) -> list[Bar]:
    """The issue's bars for every kernel backend in the run (the cpu backend on a CPU), judged on
    median times; the value from each measurement's best call follows in brackets."""
    bandwidth = roofline_gbps(rows)
    steps = [r for r in rows if r["section"] == "step"]
    all_threads = max((r["threads"] for r in steps if r["threads"] != ""), default="")
    main = [r for r in steps if r["threads"] == all_threads]

    def find(implementation, model, precision="fp32", event=False):
        for r in main:
            if (r["implementation"], r["model"], r["precision"], r["event"]) == (
                    implementation, model, precision, event):
                return r
        return None

    kernels = sorted({r["implementation"] for r in main if r["implementation"].startswith("MGPP")
                      and r["implementation"] != "MGPP reference"})
    largest = max((r for r in main if r["implementation"] == FUSED_ADAMW),
                  key=lambda r: r["elements"], default=None)
    bars = []
    for kernel in kernels:
        for model in dict.fromkeys(m for m in (peers_model, largest and largest["model"]) if m):
            row = find(kernel, model)
            if row is None:
                continue
            size = _millions(row["elements"])
            best_fraction = row["bytes_per_element"] * row["elements"] / row["best_seconds"] / 1e9 \
                / bandwidth
            bars.append(Bar(f"{kernel} fp32 no-event at {size} ({model}): >= 80% of bandwidth",
                            f"{row['fraction_of_bandwidth']:.0%} ({best_fraction:.0%})",
                            row["fraction_of_bandwidth"] >= 0.8))
            fused = find(FUSED_ADAMW, model)
            bars.append(Bar(f"{kernel} fp32 no-event at {size}: <= 1.15x {FUSED_ADAMW}",
                            f"{row['vs_fused_adamw']:.2f}x "
                            f"({row['best_seconds'] / fused['best_seconds']:.2f}x)",
                            row["vs_fused_adamw"] <= 1.15))
        ours = find(kernel, peers_model)
        for peer in (RECIPE, COMPILED_REFERENCE):
            theirs = find(peer, peers_model)
            if ours is not None and theirs is not None:
                ratio = theirs["seconds"] / ours["seconds"]
                best_ratio = theirs["best_seconds"] / ours["best_seconds"]
                bars.append(Bar(f"{peer} >= 2x slower than {kernel} (fp32 no-event, "
                                f"{peers_model})", f"{ratio:.1f}x ({best_ratio:.1f}x)", ratio >= 2))
        scaled = [r for r in main if r["implementation"] == kernel and r["precision"] == "fp32"
                  and not r["event"] and r["elements"] >= 10_000_000]
        if len(scaled) >= 2:
            spread = _spread([r["seconds"] / r["elements"] for r in scaled])
            best_spread = _spread([r["best_seconds"] / r["elements"] for r in scaled])
            bars.append(Bar(f"{kernel} fp32 no-event time per element varies < 25% from 10M to "
                            f"{_millions(largest['elements'])}", f"{spread:.0%} ({best_spread:.0%})",
                            spread < 0.25))
    return bars


def _spread(values: list[float]) -> float:
    return max(values) / min(values) - 1


def markdown_tables(rows: list[dict], peers_model: str) -> dict[str, str]:
    steps = [r for r in rows if r["section"] == "step"]
    all_threads = max((r["threads"] for r in steps if r["threads"] != ""), default="")
    peers = [r for r in steps if r["model"] == peers_model and r["threads"] == all_threads]
    lines = ["| implementation | precision | event | ms (best) | ns/element | vs fused AdamW "
             "| GB/s | % of bandwidth | peak extra MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in peers:
        lines.append(f"| {r['implementation']} | {r['precision']} | {'yes' if r['event'] else 'no'} "
                     f"| {r['seconds'] * 1e3:.1f} ({r['best_seconds'] * 1e3:.1f}) "
                     f"| {r['ns_per_element']:.2f} "
                     f"| {_fmt(r['vs_fused_adamw'], '.2f', 'x')} | {r['gbps']:.1f} "
                     f"| {r['fraction_of_bandwidth'] * 100:.0f}% | {_fmt(r['peak_extra_mib'], '.1f')} |")
    tables = {"peers": "\n".join(lines)}

    models = list(dict.fromkeys(r["model"] for r in steps))
    sizes = {r["model"]: r["elements"] for r in steps}
    scaled = list(dict.fromkeys(
        (r["implementation"], r["precision"], r["event"], r["threads"]) for r in steps
        if sum(1 for s in steps if (s["implementation"], s["precision"], s["event"], s["threads"])
               == (r["implementation"], r["precision"], r["event"], r["threads"])) == len(models)))
    header = "| implementation | " + " | ".join(f"{m} ({sizes[m] / 1e6:.1f}M)" for m in models) + " |"
    lines = ["ns per element (% of bandwidth):", "", header, "|---|" + "---:|" * len(models)]
    for key in scaled:
        implementation, precision, event, threads = key
        cells = []
        for m in models:
            r = next(s for s in steps if s["model"] == m and (
                s["implementation"], s["precision"], s["event"], s["threads"]) == key)
            cells.append(f"{r['ns_per_element']:.2f} ({r['fraction_of_bandwidth'] * 100:.0f}%)")
        label = _series_label(implementation, precision, event, threads)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tables["scaling"] = "\n".join(lines)

    selection = [r for r in rows if r["section"] == "selection"]
    models = list(dict.fromkeys(r["model"] for r in selection))
    sizes = {r["model"]: r["elements"] for r in selection}
    lines = ["ms (speed-up of radix over it):", "",
             "| method | " + " | ".join(f"{m} ({sizes[m] / 1e6:.1f}M)" for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    for method in SELECTION_METHODS:
        cells = []
        for m in models:
            r = next(s for s in selection if s["model"] == m and s["implementation"] == method)
            radix = next(s for s in selection if s["model"] == m
                         and s["implementation"] == "radix histograms")
            if r["seconds"] == "":
                cells.append("skipped")
            elif method == "radix histograms":
                cells.append(f"{r['seconds'] * 1e3:.1f}")
            else:
                cells.append(f"{r['seconds'] * 1e3:.1f} ({r['seconds'] / radix['seconds']:.0f}x)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    skipped = dict.fromkeys(f"{r['implementation']}: {r['note']}" for r in selection
                            if r["seconds"] == "")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    tables["selection"] = "\n".join(lines)
    return tables


def _millions(elements: int) -> str:
    return f"{elements / 1e6:.0f}M" if elements >= 10_000_000 else f"{elements / 1e6:.1f}M"


def _fmt(value, fmt: str, suffix: str = "") -> str:
    return "-" if value == "" else format(value, fmt) + suffix


def _series_label(implementation: str, precision: str, event: bool, threads) -> str:
    label = f"{implementation} {precision}" + (" event" if event else "")
    return label + (f", {threads} thread{'s' if threads != 1 else ''}" if threads != "" else "")


def write_plots(rows: list[dict], peers_model: str, output_dir: str, slug: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    steps = [r for r in rows if r["section"] == "step"]
    models = list(dict.fromkeys(r["model"] for r in steps))
    series: dict[str, list[dict]] = {}
    for r in steps:
        series.setdefault(_series_label(r["implementation"], r["precision"], r["event"],
                                        r["threads"]), []).append(r)
    scaled = {label: rs for label, rs in series.items() if len(rs) == len(models) and len(rs) > 1}
    selection: dict[str, list[dict]] = {}
    for r in rows:
        if r["section"] == "selection" and r["seconds"] != "":
            selection.setdefault(r["implementation"], []).append(r)

    paths = []
    figure, (steps_axes, selection_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, rs in scaled.items():
        steps_axes.plot([r["elements"] for r in rs], [r["ns_per_element"] for r in rs], "o-",
                        label=label)
    steps_axes.set(xscale="log", yscale="log", xlabel="candidate elements", ylabel="ns per element",
                   title="optimizer step, time per element")
    if scaled:
        steps_axes.legend(fontsize=7)
    for method, rs in selection.items():
        selection_axes.plot([r["elements"] for r in rs], [r["ns_per_element"] for r in rs], "o-",
                            label=method)
    selection_axes.set(xscale="log", yscale="log", xlabel="candidate elements",
                       ylabel="ns per element", title="τ selection (k = 0.9 N), time per element")
    if selection:
        selection_axes.legend(fontsize=7)
    for axes in (steps_axes, selection_axes):
        axes.xaxis.set_minor_formatter(NullFormatter())
    figure.suptitle(rows[0]["machine"], fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, f"time_vs_size_{slug}.png"))
    figure.savefig(paths[-1], dpi=90)
    plt.close(figure)

    figure, (scaling_axes, peers_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, rs in scaled.items():
        scaling_axes.plot([r["elements"] for r in rs], [r["fraction_of_bandwidth"] for r in rs],
                          "o-", label=label)
    scaling_axes.axhline(0.8, color="grey", linestyle="--", linewidth=0.8)
    scaling_axes.set(xscale="log", xlabel="candidate elements", ylabel="fraction of measured bandwidth",
                     title="achieved / measured bandwidth (SPEC §3 bytes)", ylim=(0, None))
    if scaled:
        scaling_axes.legend(fontsize=7)
    scaling_axes.xaxis.set_minor_formatter(NullFormatter())
    all_threads = max((r["threads"] for r in steps if r["threads"] != ""), default="")
    peers = [r for r in steps if r["model"] == peers_model and r["threads"] == all_threads]
    labels = [_series_label(r["implementation"], r["precision"], r["event"], "") for r in peers]
    fractions = [r["fraction_of_bandwidth"] for r in peers]
    peers_axes.barh(range(len(peers)), fractions)
    for y, fraction in enumerate(fractions):
        peers_axes.annotate(f" {fraction:.0%}", (fraction, y), va="center", fontsize=7)
    peers_axes.set_yticks(range(len(peers)), labels, fontsize=7)
    peers_axes.invert_yaxis()
    peers_axes.axvline(0.8, color="grey", linestyle="--", linewidth=0.8)
    peers_axes.set(xlabel="fraction of measured bandwidth", title=f"every peer, {peers_model}")
    figure.suptitle(rows[0]["machine"], fontsize=9)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, f"bandwidth_{slug}.png"))
    figure.savefig(paths[-1], dpi=90)
    plt.close(figure)
    return paths


def write_markdown(path: str, rows: list[dict], peers_model: str, bars: list[Bar],
                   files: list[str]) -> None:
    context = rows[0]
    command = context["command"]
    quick = "--quick" in command.split()
    bandwidth = [r for r in rows if r["section"] == "bandwidth"]
    loads = [r["load_1min"] for r in rows]
    cpus = os.cpu_count() or 1
    tables = markdown_tables(rows, peers_model)
    versions = f"torch {context['torch']}, mgpp_kernels {context['mgpp_kernels']}" + (
        f", triton {context['triton']}" if context["triton"] else "") + f", Python {context['python']}"
    lines = [
        "# Kernel microbenchmarks: latest results",
        "",
        *(["**A --quick smoke run: tiny models, the bars are meant for the full run.**", ""]
          if quick else []),
        f"Machine: **{context['machine']}** ({context['device']}); {versions}; run started "
        f"{context['started']} with `{command}`.",
        "",
        "Measured bandwidth, GB/s, best call (bytes with write-allocate: copy 12 B, triad 16 B, "
        "in-place add 12 B per element):",
        "",
        "| kernel | threads | start of the run | end of the run |",
        "|---|---:|---:|---:|",
        *[f"| {r['implementation']} | {r['threads']} | {r['gbps']:.1f} | {end['gbps']:.1f} |"
          for r, end in zip(bandwidth[:len(bandwidth) // 2], bandwidth[len(bandwidth) // 2:])],
        "",
        f"The roofline below is the best of these, {roofline_gbps(rows):.1f} GB/s.",
        "",
    ]
    if context["device"] == "cpu":
        high = max(loads) > cpus
        lines += [f"Load average (1 min) during the run: {min(loads):.1f} to {max(loads):.1f} on "
                  f"{cpus} CPUs" + (
                      ": the machine was shared with other jobs, so timings are noisy. Each "
                      "parallel region waits until every thread has a core again, so rows with "
                      "all threads suffer most, and most for peers that open many regions per "
                      "step (torch's per-tensor kernels); the 1-thread rows are the steadier "
                      "ones." if high else "."), ""]
    lines += [
        f"## Every peer on {peers_model} ({next(r['elements'] for r in rows if r['model'] == peers_model) / 1e6:.1f}M "
        "candidate elements), all threads",
        "",
        "One optimizer step over the candidate matrices only. \"event\": a step with a pruning event "
        "(τ selection and zeroing). GB/s counts the bytes SPEC §3 says the step must move (fp32 28 B "
        "per element, +8 B with an event; bf16 with bf16 state 14 B, +2 B; bf16 with fp32 state "
        "22 B), whatever the implementation really moves. Peak extra: growth of the peak "
        + ("resident set" if context["device"] == "cpu" else "allocated CUDA memory")
        + " above parameters, gradients and optimizer state during the timed steps.",
        "",
        f"`{RECIPE}`: torch.optim.AdamW(fused=True) + the prior gradient added to .grad in Python + "
        f"torch.cat/kthvalue masking on an event. `{COMPILED_REFERENCE}`: the reference's per-tensor "
        "step math (prior gradient + AdamW) under torch.compile, compile time excluded.",
        "",
        tables["peers"],
        "",
        "## Bars",
        "",
        "Judged on median times; in brackets, the same from each measurement's fastest call.",
        "",
        "| bar | measured | met |",
        "|---|---:|---|",
        *[f"| {b.text} | {b.value} | {'yes' if b.met else '**no**'} |" for b in bars],
        "",
        "## Scaling",
        "",
        tables["scaling"],
        "",
        "## τ selection (k = 0.9 N, exact; every method gives the same τ)",
        "",
        tables["selection"],
        "",
        "## Files",
        "",
        *[f"- `{os.path.basename(f)}`" for f in files],
        "",
        "Reproduce: `python -m mgpp_kernels bench-suite` (CPU) or `python -m mgpp_kernels "
        "bench-suite --device cuda` on a GPU machine; `--quick` for a seconds-long smoke run.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def read_csv(path: str) -> list[dict]:
    """Rows as write_csv wrote them, with numbers and flags typed again."""
    integers = ("elements", "threads", "repeats", "bytes_per_element")
    floats = ("load_1min", "seconds", "best_seconds", "ns_per_element", "gbps",
              "fraction_of_bandwidth", "vs_fused_adamw", "peak_extra_mib")
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in integers + floats:
                if row[key] != "":
                    row[key] = int(row[key]) if key in integers else float(row[key])
            if row["event"] != "":
                row["event"] = row["event"] == "True"
            rows.append(row)
    return rows


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)  # floats in full: read_csv gets the very same numbers back


def machine_slug(machine: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")


def report(rows: list[dict], peers_model: str, output_dir: str) -> None:
    """The CSV, the plots and README.md in output_dir, and the tables and bars on the terminal."""
    os.makedirs(output_dir, exist_ok=True)
    slug = machine_slug(rows[0]["machine"])
    csv_path = os.path.join(output_dir, f"bench_suite_{slug}.csv")
    write_csv(csv_path, rows)
    files = [csv_path] + write_plots(rows, peers_model, output_dir, slug)
    bars = evaluate_bars(rows, peers_model)
    markdown_path = os.path.join(output_dir, "README.md")
    write_markdown(markdown_path, rows, peers_model, bars, files)

    tables = markdown_tables(rows, peers_model)
    print(f"\n{rows[0]['machine']}: every peer on {peers_model}\n")
    print(tables["peers"])
    print(f"\nScaling\n\n{tables['scaling']}\n\nτ selection\n\n{tables['selection']}\n")
    for bar in bars:
        print(f"[{'met' if bar.met else 'NOT MET'}] {bar.text}: {bar.value}")
    print("\nwrote " + ", ".join(files + [markdown_path]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpp_kernels bench-suite",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, short budgets: a smoke run of a few seconds")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile'd reference (compiling takes ~1 min on 2 cores)")
    parser.add_argument("--threads", type=lambda text: [int(t) for t in text.split(",")],
                        default=None, help="CPU thread counts to compare, e.g. 1,2 (default: 1 and "
                                           "torch.get_num_threads()); the peers use the largest")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per measurement (default 3 on a CPU, 1 on a "
                             "GPU, --quick 0.02)")
    parser.add_argument("--max-repeats", type=int, default=None,
                        help="at most this many timed calls per measurement (default 5)")
    parser.add_argument("--max-elements", type=float, default=None,
                        help="leave out ladder models with more candidate elements (e.g. 1e8 on a "
                             "machine with less than 16 GiB)")
    parser.add_argument("--from-csv", metavar="CSV",
                        help="no measurements: render the plots and README.md again from a CSV "
                             "this suite wrote")
    parser.add_argument("--output-dir", default=os.path.join("benchmarks", "results"),
                        help="where the CSV, plots and README.md go (default benchmarks/results)")
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    if args.from_csv:
        rows = read_csv(args.from_csv)
        recipe_models = [r["model"] for r in rows if r["implementation"] == RECIPE]
        report(rows, recipe_models[0] if recipe_models else next(
            r["model"] for r in rows if r["section"] == "step"), args.output_dir)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-suite --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with a GPU", file=sys.stderr)
        return 1
    if args.threads is not None and min(args.threads) < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    suite_platform = CudaPlatform() if args.device == "cuda" else CpuPlatform(args.threads)
    ladder = tuple(m for m in (QUICK_LADDER if args.quick else FULL_LADDER)
                   if args.max_elements is None or m.elements <= args.max_elements)
    if not ladder:
        parser.error(f"--max-elements {args.max_elements:g} leaves no model to run")
    suite = Suite(platform=suite_platform, ladder=ladder,
                  peers_model=BERT_BASE if BERT_BASE in ladder else ladder[0],
                  budget=args.budget if args.budget is not None else (
                      0.02 if args.quick else 1.0 if args.device == "cuda" else 3.0),
                  max_repeats=args.max_repeats or (2 if args.quick else 5),
                  compile_reference=not args.no_compile,
                  command=" ".join(["python -m mgpp_kernels bench-suite", *arguments]))
    if args.quick:
        suite.platform.bandwidth_elements = 2**20
    started = time.perf_counter()
    rows = suite.run()
    elapsed = time.perf_counter() - started

    report(rows, suite.peers_model.name, args.output_dir)
    print(f"{len(rows)} measurements in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
