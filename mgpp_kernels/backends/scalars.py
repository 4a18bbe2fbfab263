"""The float64 step scalars of an UpdateGroup (mgpp_kernels.ops.layout.STEP_SCALARS), and their
way to the device: the kernel backends read lr, the betas and the prior's constants from device
memory, never from launch arguments."""
from __future__ import annotations

import torch

from ..ops.layout import NUM_STEP_SCALARS, STEP_SCALARS
from ..prior import prior_c1, prior_c2
from .types import UpdateGroup

_LR = STEP_SCALARS.index("lr")


def step_scalar_values(group: UpdateGroup) -> list[float]:
    """A group's step scalars in STEP_SCALARS order; 0.0 in the lr slot when lr is a tensor
    (see write_tensor_lrs: it is never read on the host). A prior whose λ_t is None takes λ_t from
    the device schedule: its c1 slot is 0.0 and the kernels read c1 from the step's row."""
    lr = 0.0 if isinstance(group.lr, torch.Tensor) else float(group.lr)
    values = {"lr": lr, "beta1": group.beta1, "beta2": group.beta2, "eps": group.eps,
              "weight_decay": group.weight_decay, "prior_on": 0.0, "c1": 0.0, "c2": 0.0,
              "inv_n": 0.0, "inv_sigma0_sq": 0.0, "inv_sigma1_sq": 0.0}
    prior = group.prior
    if prior is not None:
        c1 = (0.0 if prior.lambda_t is None
              else prior_c1(prior.lambda_t, prior.sigma0_sq, prior.sigma1_sq))
        values.update(prior_on=1.0, c1=c1, c2=prior_c2(prior.sigma0_sq, prior.sigma1_sq),
                      inv_n=1 / prior.num_train_examples, inv_sigma0_sq=1 / prior.sigma0_sq,
                      inv_sigma1_sq=1 / prior.sigma1_sq)
    return [values[name] for name in STEP_SCALARS]


def all_step_scalar_values(groups: list[UpdateGroup]) -> list[float]:
    """Every group's step scalars, one row of NUM_STEP_SCALARS after the other."""
    return [value for group in groups for value in step_scalar_values(group)]


def group_rows(scalars: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The rows (views) of `count` groups in a tensor of all_step_scalar_values."""
    return [scalars[g * NUM_STEP_SCALARS:(g + 1) * NUM_STEP_SCALARS] for g in range(count)]


def write_tensor_lrs(groups: list[UpdateGroup], scalars: torch.Tensor) -> None:
    """Copies each tensor lr into its group's lr slot of `scalars` (on the groups' device), on
    the device: a stream-ordered copy, not a read on the host."""
    for group, row in zip(groups, group_rows(scalars, len(groups))):
        if isinstance(group.lr, torch.Tensor):
            row[_LR].copy_(group.lr.reshape(()))


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without blocking the host (pinned, stream-ordered copy)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def step_scalars(groups: list[UpdateGroup], device: torch.device) -> torch.Tensor:
    """The groups' float64 step scalars on `device`, staged in one copy."""
    scalars = to_device(torch.tensor(all_step_scalar_values(groups), dtype=torch.float64), device)
    write_tensor_lrs(groups, scalars)
    return scalars
