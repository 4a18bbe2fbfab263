"""The cuda backend: the C++/CUDA kernels of csrc/cuda, called through mgpp_kernels.ops.

Everything a step needs lives on the parameters' device: the step scalars (copied from pinned
memory without waiting), the step counts, the histograms, the radix selection state and τ. So
step() only queues kernels; it never waits for the GPU.
"""
from __future__ import annotations

import torch

from .kernel_ops import OpsBackend

if not torch._C._dispatch_has_kernel_for_dispatch_key("mgpp::fused_step_", "CUDA"):
    raise ImportError("mgpp_kernels._C was built without its CUDA kernels")
if not torch.cuda.is_available():
    raise ImportError("no CUDA device is available")

BACKEND = OpsBackend("cuda", "cuda", steps_on_device=True, ranks_across_processes=True,
                     one_pass_events=False, ranks_nm_in_update=False,
                     counts_in_window=False)
