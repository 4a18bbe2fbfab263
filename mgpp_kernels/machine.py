"""What `python -m mgpp_kernels info` and the benchmarks say about the CPU: its model and the
instruction-set features the kernels can use."""
from __future__ import annotations

import platform

# The features that decide which code paths the CPU kernels compile to (x86 and Arm).
KERNEL_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                   "asimd", "sve")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_features() -> list[str]:
    """The KERNEL_FEATURES this CPU has (Linux; empty where /proc/cpuinfo cannot tell)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in KERNEL_FEATURES if f in flags]
    except OSError:
        pass
    return []
