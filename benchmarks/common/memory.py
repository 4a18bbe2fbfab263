"""Peak memory of a call: how far the process's peak grows above what it holds when the call
starts, on a CPU (resident set) and on a CUDA device (allocated memory)."""
from __future__ import annotations

from typing import Callable

import torch


def peak_rss_growth(fn: Callable[[], object]) -> int | None:
    """Bytes by which the process's peak resident set grows during fn(); None where it cannot be
    measured (it needs Linux's /proc/self/clear_refs)."""
    def read(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = read("VmRSS:")
    fn()
    return read("VmHWM:") - before


def peak_cuda_growth(fn: Callable[[], object]) -> int:
    """Bytes by which the peak of torch's allocated CUDA memory grows during fn()."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start
