"""The cpu backend: the fused C++ kernels of csrc/cpu, called through mgpp_kernels.ops."""
from __future__ import annotations

from .kernel_ops import OpsBackend

BACKEND = OpsBackend("cpu", "cpu", steps_on_device=False, ranks_across_processes=True,
                     one_pass_events=True, ranks_nm_in_update=True,
                     counts_in_window=True)
