"""The Python side of the torch.ops.mgpp kernels (csrc/): loads the compiled extension
mgpp_kernels._C, checks that it shares this package's layout, and gives each op a typed wrapper
and a fake implementation (for torch.compile, FakeTensor and torch.library.opcheck).

Every op mutates its arguments in place and returns nothing, so a fake implementation checks what
it can without data (list lengths, sizes, dtypes, devices) and returns None. The C++ library names
this module (set_python_module), so torch imports it whenever it needs the fakes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..patterns import NMPattern
from . import layout
from .checks import check_histogram, check_selection, check_step_lists


class LayoutMismatchError(ImportError):
    """The compiled kernels were built from headers with another layout than this package's."""


def _load() -> ImportError | None:
    """Loads mgpp_kernels._C; why it cannot be used, or None."""
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.mgpp)
    except ImportError as error:
        return error
    # A build older than mgpp::layout has no layout to compare: it is stale all the same.
    compiled = torch.ops.mgpp.layout() if hasattr(torch.ops.mgpp, "layout") else None
    if compiled != layout.describe():
        return LayoutMismatchError(
            f"mgpp_kernels._C was built with the layout {compiled!r}, but this package has "
            f"{layout.describe()!r}: rebuild it (`pip install --no-build-isolation -e .`)")
    return None


# The ops with a CPU kernel only: the one-pass event of the cpu backend (the cuda backend prunes
# with abs_histogram_ and apply_threshold_).
CPU_ONLY_OPS = ("partition_at_bin_", "prune_collected_")

# Why the compiled kernels cannot be used (not built, or built from other headers), or None.
LOAD_ERROR = _load()
BUILT = LOAD_ERROR is None


def _pattern(pattern: NMPattern | None) -> list[int]:
    return [] if pattern is None else [pattern.n, pattern.m]


def _bins(level: int) -> int:
    if level not in (0, 1):
        raise ValueError(f"mgpp: level must be 0 or 1, got {level}")
    return layout.HIGH_BINS if level == 0 else layout.LOW_BINS


# ---- the ops ---------------------------------------------------------------------------------


def build_info() -> str:
    """How the kernels were compiled: CPU target and instruction sets, OpenMP, compiler, CUDA."""
    return torch.ops.mgpp.build_info()


# `pattern`, the keyword of the event ops below: an N:M pool's pattern (None: unstructured), whose
# candidates are the M − N smallest |x| of each group of M consecutive elements along the last
# dimension (the lower index first among equal ones); only they are ranked, and the threshold
# zeroes those at τ too.
# `current`, the keyword of the step's ops below: the step's row of the device schedule
# (float64, len(layout.CURRENT), on the tensors' device; written by schedule_step_), which the
# kernels read there: a skipped step changes nothing (the step counts included), the event ops do
# nothing when its k is 0, apply_threshold_ writes masks only at the freeze, and a group whose
# scalars turn the prior on takes its on/off and c1 from the row. None: the host schedule.


def fused_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                state_steps: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor],
                scalars: torch.Tensor, *, grad_scale: torch.Tensor | None = None,
                histogram: torch.Tensor | None = None,
                current: torch.Tensor | None = None, pattern: NMPattern | None = None,
                window: tuple[int, int] | None = None) -> None:
    """One MGPP step (prior gradient, AdamW, frozen mask) over every tensor of one update group.

    Adds 1 to each `state_steps` entry, then updates params, exp_avgs and exp_avg_sqs in place.
    `scalars` holds the group's float64 step scalars in layout.STEP_SCALARS order; `keep_masks`
    is empty or one packed mask per parameter (mgpp_kernels.masks); gradients are divided by
    `grad_scale` when given. With `histogram` (int64, layout.HIGH_BINS counters), the level-0
    radix histogram of the updated |θ| is added to it (on the device schedule, at events only),
    ranking the candidates of each group under an N:M `pattern` (cpu only). With `window`
    (begin, end) (cpu only, 1 <= begin < end < HIGH_BINS), it counts the bins in [begin, end)
    one by one, the values below in bin begin - 1 and those above in bin end: a selection from
    it is exact where τ's high bin falls inside.
    """
    torch.ops.mgpp.fused_step_(params, grads, exp_avgs, exp_avg_sqs, state_steps, keep_masks,
                               scalars, grad_scale, histogram, current, _pattern(pattern),
                               [] if window is None else list(window))


def abs_histogram_(tensors: Sequence[torch.Tensor], histogram: torch.Tensor,
                   selection: torch.Tensor, *, level: int,
                   current: torch.Tensor | None = None, pattern: NMPattern | None = None) -> None:
    """Adds the radix histogram of |x| over `tensors` at `level` to `histogram`: level 0 counts
    the 16 high key bits (layout.HIGH_BINS counters), level 1 the 15 low bits of the keys in the
    high bin that `selection` has chosen (layout.LOW_BINS counters)."""
    torch.ops.mgpp.abs_histogram_(tensors, histogram, selection, level, current,
                                  _pattern(pattern))


def radix_select_(histogram: torch.Tensor, selection: torch.Tensor, *, level: int,
                  current: torch.Tensor | None = None) -> None:
    """Narrows `selection` (int64 [rank, key, below]) to the bin of `histogram` that holds the
    rank-th smallest key. The histogram is left as it is."""
    torch.ops.mgpp.radix_select_(histogram, selection, level, current)


def apply_threshold_(tensors: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor],
                     selection: torch.Tensor, *, current: torch.Tensor | None = None,
                     pattern: NMPattern | None = None) -> None:
    """Zeroes every element with |x| < τ (τ's key in `selection`; N:M: every candidate with
    |x| <= τ); with keep masks (one per tensor, or none), writes which elements survive."""
    torch.ops.mgpp.apply_threshold_(tensors, keep_masks, selection, current, _pattern(pattern))


def schedule_step_(table: torch.Tensor, position: torch.Tensor, current: torch.Tensor, *,
                   found_inf: torch.Tensor | None = None) -> None:
    """The first op of a step on the device schedule: copies row min(t, rows − 1) of `table`
    (float64, rows × len(layout.SCHEDULE_COLUMNS)) at t = `position` (int64, one element) into
    `current`, with k = 0 and the skip flag set when `found_inf` (GradScaler's, one floating
    element) is nonzero, and advances `position` unless the step is skipped. All on one device,
    read there."""
    torch.ops.mgpp.schedule_step_(table, position, current, found_inf)


def partition_at_bin_(tensors: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor],
                      selection: torch.Tensor, low_histogram: torch.Tensor,
                      positions: torch.Tensor, *, pattern: NMPattern | None = None) -> None:
    """The one pass of an event once level 0 has chosen τ's high bin (CPU; τ's bin below +inf's):
    zeroes every element of a lower bin, keeps every element of a higher one, and collects the
    bin's elements: their positions (flat over `tensors`, in any order) into `positions` (int32
    holding exactly that many) and their level-1 counts into `low_histogram` (layout.LOW_BINS
    counters). With keep masks, writes them with the bin's elements kept."""
    torch.ops.mgpp.partition_at_bin_(tensors, keep_masks, selection, low_histogram, positions,
                                     _pattern(pattern))


def prune_collected_(tensors: Sequence[torch.Tensor], keep_masks: Sequence[torch.Tensor],
                     positions: torch.Tensor, selection: torch.Tensor, *,
                     pattern: NMPattern | None = None) -> None:
    """Completes partition_at_bin_ once `selection` holds the exact τ: zeroes the collected
    elements with |x| < τ (N:M: <= τ) and clears their keep-mask bits."""
    torch.ops.mgpp.prune_collected_(tensors, keep_masks, positions, selection,
                                    _pattern(pattern))


# ---- fake implementations ----------------------------------------------------------------------


def _check_current(current):
    if current is not None and (current.dtype != torch.float64
                                or current.numel() != len(layout.CURRENT)):
        raise ValueError(f"mgpp: current must be a float64 tensor of {len(layout.CURRENT)} "
                         f"elements")


def _fused_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, keep_masks, scalars,
                     grad_scale, histogram, current=None, pattern=(), window=()):
    _check_current(current)
    _check_pattern(pattern)
    if window and (len(window) != 2 or histogram is None
                   or not 1 <= window[0] < window[1] < layout.HIGH_BINS):
        raise ValueError(f"mgpp: window must be empty or [begin, end) with 1 <= begin < end < "
                         f"{layout.HIGH_BINS}, with a histogram")
    if params:
        check_step_lists(params, grads, exp_avgs, exp_avg_sqs, state_steps, keep_masks,
                         params[0].device)
    if scalars.dtype != torch.float64 or scalars.numel() != layout.NUM_STEP_SCALARS:
        raise ValueError(f"mgpp: scalars must be a float64 tensor of {layout.NUM_STEP_SCALARS} "
                         f"elements")
    if histogram is not None:
        check_histogram(histogram, layout.HIGH_BINS)


def _check_pattern(pattern):
    if pattern and (len(pattern) != 2 or not 1 <= pattern[0] < pattern[1] <= 16):
        raise ValueError("mgpp: pattern must be empty or [N, M] with 1 <= N < M <= 16")


def _abs_histogram_fake(tensors, histogram, selection, level, current=None, pattern=()):
    _check_pattern(pattern)
    check_histogram(histogram, _bins(level))
    check_selection(selection)
    _check_current(current)


def _radix_select_fake(histogram, selection, level, current=None):
    check_histogram(histogram, _bins(level))
    check_selection(selection)
    _check_current(current)


def _apply_threshold_fake(tensors, keep_masks, selection, current=None, pattern=()):
    _check_pattern(pattern)
    if len(keep_masks) not in (0, len(tensors)):
        raise ValueError("mgpp: keep_masks must be empty or one per tensor")
    check_selection(selection)
    _check_current(current)


def _schedule_step_fake(table, position, current, found_inf):
    if (table.dtype != torch.float64 or table.dim() != 2 or table.shape[0] < 1
            or table.shape[1] != len(layout.SCHEDULE_COLUMNS)):
        raise ValueError(f"mgpp: table must be a float64 tensor of shape (rows >= 1, "
                         f"{len(layout.SCHEDULE_COLUMNS)})")
    if position.dtype != torch.int64 or position.numel() != 1:
        raise ValueError("mgpp: position must be an int64 tensor of one element")
    _check_current(current)
    if found_inf is not None and (found_inf.numel() != 1 or not found_inf.is_floating_point()):
        raise ValueError("mgpp: found_inf must be a floating tensor of one element")


def _check_positions(positions):
    if positions.dtype != torch.int32:
        raise ValueError("mgpp: positions must be an int32 tensor")


def _partition_at_bin_fake(tensors, keep_masks, selection, low_histogram, positions, pattern=()):
    _check_pattern(pattern)
    _apply_threshold_fake(tensors, keep_masks, selection)
    check_histogram(low_histogram, layout.LOW_BINS)
    _check_positions(positions)


def _prune_collected_fake(tensors, keep_masks, positions, selection, pattern=()):
    _check_pattern(pattern)
    _apply_threshold_fake(tensors, keep_masks, selection)
    _check_positions(positions)


if BUILT:
    for _name, _fake in (("fused_step_", _fused_step_fake), ("abs_histogram_", _abs_histogram_fake),
                         ("radix_select_", _radix_select_fake),
                         ("apply_threshold_", _apply_threshold_fake),
                         ("schedule_step_", _schedule_step_fake),
                         ("partition_at_bin_", _partition_at_bin_fake),
                         ("prune_collected_", _prune_collected_fake)):
        torch.library.register_fake(f"mgpp::{_name}", _fake)
