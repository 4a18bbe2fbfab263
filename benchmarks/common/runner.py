"""The suite's run: bandwidth at the start and at the end, then every model of the ladder (its
steps, then τ selection), one row per measurement."""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import statistics
import sys
from dataclasses import dataclass
from platform import python_version

import torch
from tqdm import tqdm

from mgpp_kernels import __version__
from mgpp_kernels.schedule import prune_count

from .machine import triton_version
from .models import Model, Workload, one_tensor
from .peers import (COMPILED_REFERENCE, FUSED_ADAMW, SELECTION_METHODS, StepCase,
                    compiled_reference_math, kernel_backends, selection_function, step_cases)
from .results import COLUMNS, roofline_gbps
from .settings import FINAL_SPARSITY
from .storage import FP32
from .timing import CpuPlatform, CudaPlatform, num_threads


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
                            torch=torch.__version__, triton=triton_version(),
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
                            implementation=name, precision=FP32.label, threads=threads or "",
                            repeats=len(samples), seconds=min(samples), best_seconds=min(samples),
                            bytes_per_element=bytes_per_element)
        del a, b, c
        self.platform.empty_cache()

    def runs_storage(self, model: Model) -> bool:
        """Whether every storage combination runs on the model: the peers model and one tensor
        of its size."""
        return model in (self.peers_model, one_tensor(self.peers_model))

    def measure_model(self, progress, model: Model) -> None:
        workload = Workload(model, self.platform.device)
        peers = model == self.peers_model
        for case in step_cases(self.platform.device, self.platform.thread_counts, peers,
                               self.compile_reference, self.runs_storage(model)):
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
            stepper = case.build(workload.params(case.storage))
            samples, peak = self.platform.time(stepper.step, self.budget, self.max_repeats)
            stepper.close()
        del stepper  # frees the optimizer state (no reference cycles: no gc pass needed)
        self.platform.empty_cache()
        self.record(progress, section="step", model=workload.model.name,
                    elements=workload.model.elements, implementation=case.implementation,
                    precision=case.storage.label, event=case.event, threads=case.threads or "",
                    repeats=len(samples), seconds=statistics.median(samples),
                    best_seconds=min(samples),
                    bytes_per_element=case.storage.step_bytes(case.event),
                    peak_extra_mib="" if peak is None else peak / 2**20, note=note)

    def measure_selection(self, progress, workload: Workload) -> None:
        tensors = workload.fp32
        numel = workload.model.elements
        k = prune_count(numel, FINAL_SPARSITY)
        radix_backend = kernel_backends(self.platform.device)[0]
        taus = {}
        for method in SELECTION_METHODS:
            common = dict(section="selection", model=workload.model.name, elements=numel,
                          implementation=method, precision=FP32.label,
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
        total = 2 * 3 * len(self.platform.thread_counts) + len(self.ladder) * len(SELECTION_METHODS) + sum(
            len(step_cases(self.platform.device, self.platform.thread_counts,
                           model == self.peers_model, self.compile_reference,
                           self.runs_storage(model)))
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
