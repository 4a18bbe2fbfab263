"""The float64 scalars tensor of mgpp::fused_step_, in the order of csrc/mgpp_math.h's StepScalar."""
from __future__ import annotations

import torch

from . import reference
from .backends import UpdateGroup

NUM_STEP_SCALARS = 11


def step_scalar_values(group: UpdateGroup) -> list[float]:
    if group.prior is None:
        prior = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    else:
        p = group.prior
        c1, c2 = reference.prior_constants(p.lambda_t, p.sigma0_sq, p.sigma1_sq)
        prior = [1.0, c1, c2, 1 / p.num_train_examples, 1 / p.sigma0_sq, 1 / p.sigma1_sq]
    return [group.lr, group.beta1, group.beta2, group.eps, group.weight_decay, *prior]


def step_scalars(group: UpdateGroup, device: torch.device) -> torch.Tensor:
    return torch.tensor(step_scalar_values(group), dtype=torch.float64, device=device)
