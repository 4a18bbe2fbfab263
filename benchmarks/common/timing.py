"""How the suite times a call and measures its memory, on a CPU and on a CUDA device."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable

import torch

from mgpp_kernels.bench import cpu_model, peak_rss_growth


class CpuPlatform:
    device = torch.device("cpu")
    kind = "cpu"
    bandwidth_elements = 64 * 2**20        # 256 MiB per array, far beyond any cache
    # sort and topk over hundreds of millions of elements take minutes on a CPU
    selection_limits = {"torch topk": 100_000_000, "torch sort": 30_000_000}

    def __init__(self, thread_counts: list[int] | None = None):
        self.machine = f"{cpu_model()} ({os.cpu_count()} CPUs)"
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
