"""The layout the torch.ops.mgpp kernels and the Triton kernels share with Python, the one Python
copy of csrc's header constants: the order of the float64 step scalars, the radix bins and the
selection slots. mgpp_kernels.ops checks it against the compiled kernels' own (mgpp::layout) when
it loads them."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..backends.types import UpdateGroup

# The float64 scalars of one update group, in the order of csrc's StepScalar. prior_on is 1.0 or
# 0.0; c1, c2 are docs/spec.md §2's constants for λ_t; inv_* are reciprocals computed in float64.
STEP_SCALARS = ("lr", "beta1", "beta2", "eps", "weight_decay", "prior_on", "c1", "c2", "inv_n",
                "inv_sigma0_sq", "inv_sigma1_sq")
NUM_STEP_SCALARS = len(STEP_SCALARS)
LR = STEP_SCALARS.index("lr")

# Radix selection over the float32 bit pattern of |x|: 16 high bits, then the 15 low bits.
LOW_BITS = 15
HIGH_BINS = 1 << 16
LOW_BINS = 1 << LOW_BITS
# The int64 selection state: the rank of τ among the keys still in play, τ's key, keys below τ.
SELECTION = ("rank", "key", "below")

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
            f"selection={','.join(SELECTION)};schedule={','.join(SCHEDULE_COLUMNS)}")


def prior_c1(lambda_t: float, sigma0_sq: float, sigma1_sq: float) -> float:
    """c1 of docs/spec.md §2 (it changes with λ_t), in float64."""
    return (math.log(lambda_t) - math.log(1 - lambda_t)
            + 0.5 * math.log(sigma0_sq) - 0.5 * math.log(sigma1_sq))


def prior_c2(sigma0_sq: float, sigma1_sq: float) -> float:
    """c2 of docs/spec.md §2, in float64."""
    return 1 / (2 * sigma0_sq) - 1 / (2 * sigma1_sq)


def step_scalar_values(group: UpdateGroup) -> list[float]:
    """A group's step scalars in STEP_SCALARS order; 0.0 in the lr slot when lr is a tensor
    (see write_tensor_lr: it is never read on the host). A prior whose λ_t is None takes λ_t from
    the device schedule: its c1 slot is 0.0 and the kernels read c1 from the step's row."""
    lr = 0.0 if isinstance(group.lr, torch.Tensor) else float(group.lr)
    values = {"lr": lr, "beta1": group.beta1, "beta2": group.beta2, "eps": group.eps,
              "weight_decay": group.weight_decay, "prior_on": 0.0, "c1": 0.0, "c2": 0.0,
              "inv_n": 0.0, "inv_sigma0_sq": 0.0, "inv_sigma1_sq": 0.0}
    prior = group.prior
    if prior is not None:
        c1 = (0.0 if prior.lambda_t is None
              else prior_c1(prior.lambda_t, prior.sigma0_sq, prior.sigma1_sq))
        values.update(prior_on=1.0, c1=c1, c2=prior_c2(prior.sigma0_sq, prior.sigma1_sq), inv_n=1 / prior.num_train_examples,
                      inv_sigma0_sq=1 / prior.sigma0_sq, inv_sigma1_sq=1 / prior.sigma1_sq)
    return [values[name] for name in STEP_SCALARS]


def write_tensor_lr(group: UpdateGroup, scalars: torch.Tensor) -> None:
    """Copies a tensor lr into the lr slot of `scalars` (a group's row, on its device), on the
    device: a stream-ordered copy, not a read on the host."""
    if isinstance(group.lr, torch.Tensor):
        scalars[LR].copy_(group.lr.reshape(()))


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without blocking the host (pinned, stream-ordered copy)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def step_scalars(group: UpdateGroup, device: torch.device) -> torch.Tensor:
    """The group's float64 step scalars on `device`."""
    scalars = to_device(torch.tensor(step_scalar_values(group), dtype=torch.float64), device)
    write_tensor_lr(group, scalars)
    return scalars
