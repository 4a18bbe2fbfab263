"""The layout the torch.ops.mgpp kernels and the Triton kernels share with Python, the one Python
copy of csrc's header constants: the order of the float64 step scalars, the radix bins, the
selection slots, the dtype codes and the device schedule's columns. mgpp_kernels.ops checks it
against the compiled kernels' own (mgpp::layout) when it loads them."""
from __future__ import annotations

import torch

# The float64 scalars of one update group, in the order of csrc's StepScalar. prior_on is 1.0 or
# 0.0; c1, c2 are docs/spec.md §2's constants for λ_t; inv_* are reciprocals computed in float64.
STEP_SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay", "prior_on", "c1", "c2", "inv_n",
                "inv_sigma0_sq", "inv_sigma1_sq")
NUM_STEP_SCALARS = len(STEP_SCALARS)

# Radix selection over the float32 bit pattern of |x|: 16 high bits, then the 15 low bits.
LOW_BITS = 15
HIGH_BINS = 1 << 16
LOW_BINS = 1 << LOW_BITS
# The int64 selection state: the rank of τ among the keys still in play, τ's key, the keys below
# τ, and the keys in the bin the last level chose (after the last level: the keys equal to τ).
SELECTION = ("rank", "key", "below", "equal")
NUM_SELECTION_SLOTS = len(SELECTION)

# The parameter and state dtypes the kernels take; a dtype's position is its code in the kernels
# (csrc/core/formats.h's DType, the Triton kernels' constexpr codes).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The schedule on the device (docs/spec.md §2; backends with `schedules_on_device`): one float64
# row per schedule position t = 0 .. t_end + 1, the last row standing for every later t. prior_on
# is 1.0 or 0.0, c1 is λ_t's constant, k the event's rank (0: no event), freeze 1.0 at the event
# that freezes the mask. Each step, the first kernel copies row min(t, rows − 1) into the step's
# row (k = 0 on a skipped step), then its "skip" flag (GradScaler's found_inf), and advances t
# unless the step is skipped.
SCHEDULE_COLUMNS = ("prior_on", "c1", "k", "freeze")
CURRENT = SCHEDULE_COLUMNS + ("skip",)


def describe() -> str:
    """This layout in mgpp::layout()'s format."""
    return (f"step_scalars={','.join(STEP_SCALARS)};high_bins={HIGH_BINS};low_bins={LOW_BINS};"
            f"selection={','.join(SELECTION)};schedule={','.join(SCHEDULE_COLUMNS)}"
            f";dtypes={','.join(str(d).removeprefix('torch.') for d in KERNEL_DTYPES)}")
