"""MGPP in plain PyTorch, docs/spec.md §2 formula by formula: the oracle every backend is tested against.

Written to be read, not to be fast: it allocates freely and ranks by concatenating every candidate
and calling kthvalue. Math runs in float32 for float32/bfloat16/float16 storage and in float64 for
float64 tensors (the oracle of the mixed-precision bounds in docs/spec.md §4).
"""
from __future__ import annotations

import torch

from .patterns import NMPattern
from .prior import prior_c1, prior_c2

# ---- prior gradient ----------------------------------------------------------------------------


def prior_gradient(theta: torch.Tensor, lambda_t: float, sigma0_sq: float, sigma1_sq: float,
                   n: int) -> torch.Tensor:
    """Gradient of the negative log spike-and-slab prior, scaled by 1/n."""
    c1, c2 = prior_c1(lambda_t, sigma0_sq, sigma1_sq), prior_c2(sigma0_sq, sigma1_sq)
    rho0 = 1 / (1 + torch.exp(c1 + c2 * theta * theta))  # exp overflow -> inf -> rho0 = 0
    return theta / n * (rho0 / sigma0_sq + (1 - rho0) / sigma1_sq)


# ---- AdamW -------------------------------------------------------------------------------------


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, step: int, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's single-tensor update, in place; `step` counts this step."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


# ---- global magnitude pruning ------------------------------------------------------------------


def nm_candidates(param: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """The candidates of an N:M pool's tensor: the M − N smallest |θ| of each group of M
    consecutive elements along the last dimension, the lower index first among equal |θ| (a
    stable sort; NaN sorts last, as in kthvalue)."""
    groups = param.detach().abs().float().reshape(-1, pattern.m)
    order = torch.sort(groups, dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(pattern.m, device=order.device).expand_as(order))
    return (ranks < pattern.prunable).reshape(param.shape)


def candidate_magnitudes(param: torch.Tensor, pattern: NMPattern | None) -> torch.Tensor:
    """|θ| (float32, flat) of the elements of `param` that an event of its pool ranks."""
    magnitudes = param.detach().abs().float()
    if pattern is None:
        return magnitudes.flatten()
    return magnitudes[nm_candidates(param, pattern)]


def global_threshold(params: list[torch.Tensor], k: int,
                     pattern: NMPattern | None = None) -> torch.Tensor:
    """τ: the k-th smallest |θ| over the candidates of all `params`, 1-indexed (float32; exact
    for every dtype)."""
    magnitudes = torch.cat([candidate_magnitudes(p, pattern) for p in params])
    return torch.kthvalue(magnitudes, k).values


def keep_mask(param: torch.Tensor, tau: torch.Tensor,
              pattern: NMPattern | None = None) -> torch.Tensor:
    """The positions that survive a threshold: not |θ| < τ (so NaN survives, as in torch); in
    an N:M pool, not a candidate with |θ| <= τ."""
    magnitudes = param.detach().abs().float()
    if pattern is None:
        return ~(magnitudes < tau)
    return ~(nm_candidates(param, pattern) & (magnitudes <= tau))
