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
from . import PruneEvent, Threshold, UpdateGroup

HIGH_BINS = 1 << 16   # csrc/mgpp_math.h: kHistHighBins
LOW_BINS = 1 << 15    # kHistLowBins
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if not torch._C._dispatch_has_kernel_for_dispatch_key("mgpp::fused_step_", "CUDA"):
    raise ImportError("mgpp_kernels._C was built without its CUDA kernels")
if not torch.cuda.is_available():
    raise ImportError("no CUDA device is available")


def device_scalars(group: UpdateGroup, device: torch.device) -> torch.Tensor:
    """The float64 step scalars on the device, copied asynchronously from pinned host memory."""
    return step_scalars(group, torch.device("cpu")).pin_memory().to(device, non_blocking=True)


def select_threshold(tensors: list[torch.Tensor], k: int, high_histogram: torch.Tensor,
                     counted: list[torch.Tensor]) -> torch.Tensor:
    """Radix selection of τ, the k-th smallest |x| over `tensors`, on the device.

    `high_histogram` already counts the first radix level of the `counted` tensors (the update
    pass does that); the rest are counted here. Returns the selection state [rank, key, below].
    """
    device = high_histogram.device
    selection = torch.zeros(3, dtype=torch.int64, device=device)
    selection[:1].fill_(k)   # a fill kernel, not a copy from the host
    counted_ids = {id(t) for t in counted}
    uncounted = [t for t in tensors if id(t) not in counted_ids]
    if uncounted:
        torch.ops.mgpp.abs_histogram_(uncounted, high_histogram, selection, 0)
    torch.ops.mgpp.radix_select_(high_histogram, selection, 0)
    # bfloat16 keys have no bits below the first level: τ is already exact.
    if any(t.dtype != torch.bfloat16 for t in tensors):
        low_histogram = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)
        torch.ops.mgpp.abs_histogram_(tensors, low_histogram, selection, 1)
        torch.ops.mgpp.radix_select_(low_histogram, selection, 1)
    return selection


def tau_of(selection: torch.Tensor) -> torch.Tensor:
    return selection[1:2].to(torch.int32).view(torch.float32)[0]


class CudaBackend:
    name = "cuda"
    # The optimizer keeps each parameter's step count on its device, where the kernels count it.
    steps_on_device = True

    def check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.device.type != "cuda":
                raise ValueError(f"the cuda backend takes CUDA tensors, got a parameter on {p.device}")
            if p.dtype not in KERNEL_DTYPES:
                raise ValueError(f"the cuda backend takes float32, bfloat16 and float16 "
                                 f"parameters, got {p.dtype}")
            if not p.is_contiguous():
                raise ValueError(f"the cuda backend takes contiguous parameters, got one of shape "
                                 f"{tuple(p.shape)} with strides {p.stride()}")

    def step(self, groups: list[UpdateGroup], event: PruneEvent | None,
             grad_scale: torch.Tensor | None) -> Threshold | None:
        tensors = [p for g in groups for p in g.params] + (event.params if event else [])
        if not tensors:
            return None
        device = tensors[0].device
        histogram = (torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
                     if event is not None else None)
        counted = []
        for group in groups:
            count = event is not None and group.count
            torch.ops.mgpp.fused_step_(
                group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.state_steps,
                group.keep_masks, device_scalars(group, device), grad_scale,
                histogram if count else None)
            if count:
                counted.extend(group.params)
        if event is None:
            return None
        selection = select_threshold(event.params, event.k, histogram, counted)
        torch.ops.mgpp.apply_threshold_(event.params, event.keep_masks, selection)
        return Threshold(tau=tau_of(selection), below=selection[2])

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        histogram = torch.zeros(HIGH_BINS, dtype=torch.int64, device=tensors[0].device)
        return tau_of(select_threshold(tensors, k, histogram, counted=[]))


BACKEND = CudaBackend()
