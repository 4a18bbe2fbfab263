"""The cuda backend: the C++/CUDA kernels of csrc/cuda, called through torch.ops.mgpp.

Everything a step needs lives on the parameters' device: the step scalars (copied from pinned
memory without waiting), the step counts, the histograms, the radix selection state and τ. So
step() only queues kernels; it never waits for the GPU.
"""
from __future__ import annotations

import torch

import mgpp_kernels._C  # noqa: F401  (registers torch.ops.mgpp)
import mgpp_kernels._fake  # noqa: F401  (their fake implementations, for torch.compile)

from .._scalars import step_scalars
from . import UpdateGroup
from ._ops import OpsBackend

if not torch._C._dispatch_has_kernel_for_dispatch_key("mgpp::fused_step_", "CUDA"):
    raise ImportError("mgpp_kernels._C was built without its CUDA kernels")
if not torch.cuda.is_available():
    raise ImportError("no CUDA device is available")


def device_scalars(group: UpdateGroup, device: torch.device) -> torch.Tensor:
    """The float64 step scalars on the device, copied asynchronously from pinned host memory."""
    return step_scalars(group, torch.device("cpu")).pin_memory().to(device, non_blocking=True)


BACKEND = OpsBackend("cuda", "cuda", device_scalars, steps_on_device=True,
                     ranks_across_processes=False)
