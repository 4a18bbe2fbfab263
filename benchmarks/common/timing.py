"""How the benchmarks time a call, on a CPU and on a CUDA device: one call, the median of several,
calls issued back to back, steps taking turns, the copy and its bandwidth, thread counts, and the
suite's platforms (which also measure each call's peak memory)."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable

import torch

from .machine import cpu_description
from .memory import peak_cuda_growth, peak_rss_growth

CPU = torch.device("cpu")
# Bytes a copy moves per float32 element: a CPU's write-allocate caches read the target before
# they write it; a GPU writes whole lines without reading them.
COPY_BYTES_PER_ELEMENT = {"cpu": 12, "cuda": 8}


def call_seconds(fn: Callable[[], object], device: torch.device = CPU) -> float:
    """Seconds of one call: the wall clock on a CPU, CUDA events around it on a GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_seconds = time.perf_counter()
    fn()
    return time.perf_counter() - start_seconds


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                device: torch.device = CPU) -> float:
    """The median seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(call_seconds(fn, device) for _ in range(repeats))


def back_to_back_seconds(fn: Callable[[], object], calls: int, device: torch.device = CPU
                         ) -> tuple[float, float]:
    """(device seconds, host seconds) per call over `calls` calls of fn issued back to back. On a
    GPU the device's come from CUDA events around all of them (the queue stays full, as in
    training, instead of each sample starting from an idle GPU), the host's from the wall clock
    until the last call returns (what the calls cost the Python thread); on a CPU both are the
    wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host_start = time.perf_counter()
        for _ in range(calls):
            fn()
        host_seconds = time.perf_counter() - host_start
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls, host_seconds / calls
    start_seconds = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = (time.perf_counter() - start_seconds) / calls
    return seconds, seconds


def interleaved_median_times(steps: dict, repeats: int, warmup: int = 1) -> dict:
    """The median time of each of `steps` (name: callable), the steps taking turns, one call each
    per round: a slow spell of a shared machine then falls on all of them alike, and their ratios
    hold where back-to-back blocks of repeats swing with it."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(call_seconds(step))
    return {name: statistics.median(values) for name, values in times.items()}


def copy_call(elements: int, device: torch.device = CPU) -> tuple[Callable[[], object], int]:
    """`target.copy_(source)` on float32 arrays of `elements` elements, and the bytes it moves."""
    source = torch.ones(elements, device=device)
    target = torch.empty(elements, device=device)
    return (lambda: target.copy_(source)), COPY_BYTES_PER_ELEMENT[device.type] * elements


def copy_bandwidth(repeats: int, elements: int = 1 << 26, device: torch.device = CPU) -> float:
    """GB/s of `target.copy_(source)` on float32 arrays far larger than the caches, the median of
    `repeats` calls."""
    copy, copied_bytes = copy_call(elements, device)
    return copied_bytes / median_time(copy, repeats, device=device) / 1e9


@contextmanager
def num_threads(threads: int | None):
    """torch's intra-op threads set to `threads` inside the block (None: left as they are)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CpuPlatform:
    device = CPU
    kind = "cpu"
    bandwidth_elements = 64 * 2**20        # 256 MiB per array, far beyond any cache
    # sort and topk over hundreds of millions of elements take minutes on a CPU
    selection_limits = {"torch topk": 100_000_000, "torch sort": 30_000_000}

    def __init__(self, thread_counts: list[int] | None = None):
        self.machine = cpu_description()
        self.thread_counts = sorted(set(thread_counts or (1, torch.get_num_threads())))

    def time(self, fn: Callable[[], object], budget: float, max_repeats: int
             ) -> tuple[list[float], int | None]:
        """(seconds of each timed call, peak bytes above the start; None where unknown).

        The first call is a warm-up, unless it alone takes the whole budget: then it is the sample.
        """
        samples: list[float] = []

        def calls():
            samples.append(call_seconds(fn))
            if samples[0] < budget:
                repeats = max(1, min(max_repeats, int(budget / max(samples[0], 1e-9))))
                samples[:] = [call_seconds(fn) for _ in range(repeats)]

        peak = peak_rss_growth(calls)
        return samples, peak

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
        return _cuda_samples(fn, budget), peak_cuda_growth(fn)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


def _cuda_samples(fn: Callable[[], object], budget: float) -> list[float]:
    """Seconds per call from CUDA events: triton.testing.do_bench where triton is installed."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        warmup_ms, rep_ms = max(1, int(budget * 250)), max(1, int(budget * 1000))
        return [ms / 1e3 for ms in do_bench_milliseconds(do_bench, fn, warmup_ms, rep_ms)]
    fn()
    torch.cuda.synchronize()
    first = call_seconds(fn, CudaPlatform.device)
    repeats = max(1, min(100, int(budget / max(first, 1e-9))))
    return [call_seconds(fn, CudaPlatform.device) for _ in range(repeats)]


def do_bench_milliseconds(do_bench, fn: Callable[[], object], warmup_ms: int, rep_ms: int
                          ) -> list[float]:
    """Milliseconds of every call do_bench (triton.testing's) times. A triton without
    return_mode="all" refuses it with an AssertionError before it calls fn: then its median
    stands for all. An AssertionError that fn raises is fn's failure, and propagates."""
    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        return fn()

    try:
        return do_bench(counted, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except AssertionError:
        if calls:
            raise
    return [do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")]
