"""Fake (meta) implementations of the torch.ops.mgpp ops, so that torch.compile, FakeTensor and
torch.library.opcheck can trace through them without running a kernel.

Every op mutates its arguments in place and returns nothing, so a fake implementation only checks
what it can check without data (list lengths, sizes, dtypes) and returns None: the mutated
tensors keep their metadata. Imported by the backends that load mgpp_kernels._C.
"""
from __future__ import annotations

import torch

import mgpp_kernels._C  # noqa: F401  (defines the ops this module adds fake implementations to)

from ._scalars import NUM_STEP_SCALARS
from .backends._ops import HIGH_BINS, KERNEL_DTYPES, LOW_BINS


def _check_histogram(histogram: torch.Tensor, bins: int) -> None:
    torch._check(histogram.dtype == torch.int64 and histogram.numel() == bins,
                 lambda: f"mgpp: histogram must be an int64 tensor of {bins} counters")


def _check_selection(selection: torch.Tensor) -> None:
    torch._check(selection.dtype == torch.int64 and selection.numel() == 3,
                 lambda: "mgpp: selection must be an int64 tensor of 3 elements")


def _check_level(level: int) -> int:
    torch._check(level in (0, 1), lambda: f"mgpp: level must be 0 or 1, got {level}")
    return HIGH_BINS if level == 0 else LOW_BINS


@torch.library.register_fake("mgpp::fused_step_")
def _fused_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, keep_masks, scalars,
                     grad_scale, histogram):
    n = len(params)
    torch._check(len(grads) == n and len(exp_avgs) == n and len(exp_avg_sqs) == n
                 and len(state_steps) == n and len(keep_masks) in (0, n),
                 lambda: "mgpp: fused_step_ takes lists of equal length (keep_masks may be empty)")
    torch._check(scalars.dtype == torch.float64 and scalars.numel() == NUM_STEP_SCALARS,
                 lambda: f"mgpp: scalars must be a float64 tensor of {NUM_STEP_SCALARS} elements")
    for i, p in enumerate(params):
        torch._check(p.dtype in KERNEL_DTYPES and grads[i].dtype == p.dtype,
                     lambda: f"mgpp: params[{i}] and grads[{i}] must share a float32, bfloat16 "
                             f"or float16 dtype")
        torch._check(grads[i].numel() == p.numel() and exp_avgs[i].numel() == p.numel()
                     and exp_avg_sqs[i].numel() == p.numel(),
                     lambda: f"mgpp: grads, exp_avgs and exp_avg_sqs [{i}] must match params[{i}]")
        if keep_masks:
            torch._check(keep_masks[i].dtype == torch.uint8
                         and keep_masks[i].numel() == (p.numel() + 7) // 8,
                         lambda: f"mgpp: keep_masks[{i}] must be uint8 with ceil(numel/8) bytes")
    if histogram is not None:
        _check_histogram(histogram, HIGH_BINS)


@torch.library.register_fake("mgpp::abs_histogram_")
def _abs_histogram_fake(tensors, histogram, selection, level):
    _check_histogram(histogram, _check_level(level))
    _check_selection(selection)


@torch.library.register_fake("mgpp::radix_select_")
def _radix_select_fake(histogram, selection, level):
    _check_histogram(histogram, _check_level(level))
    _check_selection(selection)


@torch.library.register_fake("mgpp::apply_threshold_")
def _apply_threshold_fake(tensors, keep_masks, selection):
    torch._check(len(keep_masks) in (0, len(tensors)),
                 lambda: "mgpp: keep_masks must be empty or one per tensor")
    _check_selection(selection)
