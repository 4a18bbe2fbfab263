"""The checks of a step's tensor lists: the Python spelling of csrc/ops/checks.h, used by the fake
implementations of the ops and by the triton backend, so that every backend refuses the same
inputs with the same words before it changes anything."""
from __future__ import annotations

from typing import Sequence

import torch

from ..masks import packed_mask_bytes
from .layout import KERNEL_DTYPES, NUM_SELECTION_SLOTS


def check_tensor(t: torch.Tensor, device: torch.device, what: str, index: int) -> None:
    if t.device != device:
        raise ValueError(f"mgpp: {what}[{index}] is on {t.device}; this call's kernels run on "
                         f"{device}")
    if not t.is_contiguous():
        raise ValueError(f"mgpp: {what}[{index}] must be contiguous")


def check_kernel_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"mgpp: {what} must be float32, bfloat16 or float16, got {dtype}")


def check_parameter(p: torch.Tensor, backend: str) -> None:
    """What every kernel backend needs of a parameter, whatever its device: a kernel dtype and
    contiguous storage."""
    if p.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the {backend} backend takes float32, bfloat16 and float16 parameters, "
                         f"got {p.dtype}")
    if not p.is_contiguous():
        raise ValueError(f"the {backend} backend takes contiguous parameters, got one of shape "
                         f"{tuple(p.shape)} with strides {p.stride()}")


def check_mask(mask: torch.Tensor, values: torch.Tensor, device: torch.device, index: int) -> None:
    check_tensor(mask, device, "keep_masks", index)
    size = packed_mask_bytes(values.numel())
    if mask.dtype != torch.uint8 or mask.numel() != size:
        raise ValueError(f"mgpp: keep_masks[{index}] must be uint8 with ceil(numel/8) = {size} "
                         f"elements, got {mask.dtype} with {mask.numel()}")


def check_step_lists(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                     exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                     state_steps: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor],
                     device: torch.device) -> None:
    """fused_step_'s lists: equal lengths, kernel dtypes, matching sizes, all on `device`. Where
    the state steps live is each backend's rule, checked by the caller."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n
            and len(keep_masks) in (0, n)):
        raise ValueError("mgpp: fused_step_ takes lists of equal length (keep_masks may be empty)")
    for i, p in enumerate(params):
        check_tensor(p, device, "params", i)
        check_kernel_dtype(p.dtype, "params")
        for what, t in (("grads", grads[i]), ("exp_avgs", exp_avgs[i]),
                        ("exp_avg_sqs", exp_avg_sqs[i])):
            check_tensor(t, device, what, i)
        if grads[i].dtype != p.dtype:
            raise ValueError(f"mgpp: grads[{i}] must have its parameter's dtype {p.dtype}")
        if exp_avg_sqs[i].dtype != exp_avgs[i].dtype:
            raise ValueError(f"mgpp: exp_avg_sqs[{i}] must have the dtype of exp_avgs[{i}]")
        check_kernel_dtype(exp_avgs[i].dtype, "exp_avgs")
        if exp_avgs[i].dtype not in (torch.float32, p.dtype):
            raise ValueError(f"mgpp: state of params[{i}] must be float32 or the parameter's dtype")
        if not grads[i].numel() == exp_avgs[i].numel() == exp_avg_sqs[i].numel() == p.numel():
            raise ValueError(f"mgpp: grads, exp_avgs and exp_avg_sqs [{i}] must match params[{i}] "
                             f"in size")
        if state_steps[i].numel() != 1:
            raise ValueError(f"mgpp: state_steps[{i}] must hold one value")
        if keep_masks:
            check_mask(keep_masks[i], p, device, i)


def check_histogram(histogram: torch.Tensor, bins: int) -> None:
    if histogram.dtype != torch.int64 or histogram.numel() != bins:
        raise ValueError(f"mgpp: histogram must be an int64 tensor of {bins} counters")


def check_selection(selection: torch.Tensor) -> None:
    if selection.dtype != torch.int64 or selection.numel() != NUM_SELECTION_SLOTS:
        raise ValueError(f"mgpp: selection must be an int64 tensor of {NUM_SELECTION_SLOTS} "
                         f"elements")
