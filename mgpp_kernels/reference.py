"""MGPP in plain PyTorch, SPEC §2 formula by formula: the oracle every backend is tested against.

Written to be read, not to be fast: it allocates freely and ranks by concatenating every candidate
and calling kthvalue. Math runs in float32 for float32/bfloat16/float16 storage and in float64 for
float64 tensors (the oracle of the mixed-precision bounds in SPEC §4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MGPPConfig

# ---- schedule (a pure function of the schedule position t) -------------------------------------


@dataclass(frozen=True)
class SchedulePoint:
    t: int
    stage: str                   # "dense" before t_i, "pruning" until t_end, "frozen" from t_end on
    prior_on: bool
    lambda_t: float
    prune_to: float | None       # the sparsity of this step's pruning event, None without one
    freeze: bool                 # this step's event freezes the mask (t == t_end)
    frozen: bool                 # the mask is frozen and re-applied after every update (t > t_end)


def lambda_factor(config: MGPPConfig, t: int) -> float:
    """α(t): 1 up to t_i, then linear down to α_f at t_end."""
    t_i, t_end, alpha_f = config.initial_warmup_steps, config.t_end, config.lambda_final_factor
    if t <= t_i:
        return 1.0
    if t >= t_end:
        return alpha_f
    return alpha_f + (1 - alpha_f) * (1 - (t - t_i) / (t_end - t_i))


def target_sparsity(config: MGPPConfig, t: int) -> float | None:
    """The cubic schedule: the sparsity to prune to at step t, or None when t has no event."""
    t_i, t_end = config.initial_warmup_steps, config.t_end
    s_i, s_f = config.initial_sparsity, config.final_sparsity
    if t == t_i:
        return s_i
    if t == t_end:
        return s_f
    if t_i < t < t_end and t % config.pruning_interval == 0:
        return s_f + (s_i - s_f) * (1 - (t - t_i) / (t_end - t_i)) ** 3
    return None


def schedule_at(config: MGPPConfig, t: int) -> SchedulePoint:
    t_end = config.t_end
    stage = "dense" if t < config.initial_warmup_steps else "pruning" if t < t_end else "frozen"
    return SchedulePoint(t=t, stage=stage, prior_on=t <= t_end,
                         lambda_t=config.lambda_mix * lambda_factor(config, t),
                         prune_to=target_sparsity(config, t), freeze=t == t_end, frozen=t > t_end)


# ---- prior gradient ----------------------------------------------------------------------------


def prior_constants(lambda_t: float, sigma0_sq: float, sigma1_sq: float) -> tuple[float, float]:
    """c1 and c2 of SPEC §2, in float64 on the host."""
    c1 = math.log(lambda_t) - math.log(1 - lambda_t) + 0.5 * math.log(sigma0_sq) - 0.5 * math.log(sigma1_sq)
    c2 = 1 / (2 * sigma0_sq) - 1 / (2 * sigma1_sq)
    return c1, c2


def prior_gradient(theta: torch.Tensor, lambda_t: float, sigma0_sq: float, sigma1_sq: float,
                   n: int) -> torch.Tensor:
    """Gradient of the negative log spike-and-slab prior, scaled by 1/n."""
    c1, c2 = prior_constants(lambda_t, sigma0_sq, sigma1_sq)
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


def prune_count(numel: int, sparsity: float) -> int:
    """k = int(N·s): how many of the N candidate elements a pruning event ranks below τ."""
    return int(numel * sparsity)


def global_threshold(params: list[torch.Tensor], k: int) -> torch.Tensor:
    """τ: the k-th smallest |θ| over all candidates, 1-indexed (float32; exact for every dtype)."""
    magnitudes = torch.cat([p.detach().abs().flatten().float() for p in params])
    return torch.kthvalue(magnitudes, k).values


def keep_mask(param: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The positions that survive a threshold: not |θ| < τ (so NaN survives, as in torch)."""
    return ~(param.detach().abs().float() < tau)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Packs a bool mask 1 bit per element: element i is bit i % 8 of byte i // 8."""
    bits = keep.flatten().to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.flatten()[: like.numel()].view(like.shape).bool()
