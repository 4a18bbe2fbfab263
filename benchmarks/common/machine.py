"""What the benchmarks record about the machine and the software they ran on. The CPU's model and
features are the package's (`python -m mgpp_kernels info` prints them too)."""
from __future__ import annotations

import os

from mgpp_kernels.machine import cpu_features, cpu_model

__all__ = ["cpu_description", "cpu_features", "cpu_model", "triton_version"]


def cpu_description() -> str:
    """The CPU's model and how many CPUs this process sees, e.g. "AMD EPYC (2 CPUs)"."""
    return f"{cpu_model()} ({os.cpu_count()} CPUs)"


def triton_version() -> str:
    """Triton's version, or "" where it is not installed."""
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__
