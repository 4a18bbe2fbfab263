"""The pruning schedule of docs/spec.md §2: a pure function of the schedule position t.

The optimizer asks :func:`schedule_at` where step t stands (stage, λ_t, whether it prunes) and
:func:`plan_event` how many of the N candidate elements that step's event ranks below τ; on a
backend that keeps t on the device, :func:`device_schedule_rows` tabulates both for every t.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import MGPPConfig
from .ops.layout import SCHEDULE_COLUMNS
from .prior import prior_c1


@dataclass(frozen=True)
class SchedulePoint:
    t: int
    stage: str                   # "dense" before t_i, "pruning" until t_end, "frozen" from t_end on
    prior_on: bool
    lambda_t: float
    prune_to: float | None       # the sparsity of this step's pruning event, None without one
    freeze: bool                 # this step's event freezes the mask (t == t_end)
    frozen: bool                 # the mask is frozen and re-applied after every update (t > t_end)


@dataclass(frozen=True)
class EventPlan:
    """A pruning event: zero the candidates whose |θ| is below τ, the k-th smallest of N."""

    sparsity: float
    k: int                       # 1 <= k <= N
    freeze: bool                 # keep the mask from now on
    numel: int                   # N: the candidate elements, over every rank


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


def prune_count(numel: int, sparsity: float) -> int:
    """k = int(N·s): how many of the N candidate elements a pruning event ranks below τ."""
    return int(numel * sparsity)


def plan_event(point: SchedulePoint, numel: int) -> EventPlan | None:
    """The event of step `point` over N = `numel` candidate elements, or None when it prunes
    nothing (no event at t, or int(N·s) = 0)."""
    if point.prune_to is None:
        return None
    k = prune_count(numel, point.prune_to)
    if k == 0:
        return None
    return EventPlan(sparsity=point.prune_to, k=k, freeze=point.freeze, numel=numel)


def device_schedule_rows(config: MGPPConfig, numel: int) -> list[list[float]]:
    """The device schedule's table (mgpp_kernels.ops.layout.SCHEDULE_COLUMNS) over N = `numel`
    candidate elements: the row of t for t = 0 .. t_end + 1, the last standing for every later t
    (no event, no prior, the mask frozen). Values in float64, as the host computes them."""
    rows = []
    for t in range(config.t_end + 2):
        point = schedule_at(config, t)
        plan = plan_event(point, numel)
        values = {"prior_on": float(point.prior_on),
                  "c1": prior_c1(point.lambda_t, config.sigma0_sq, config.sigma1_sq)
                  if point.prior_on else 0.0,
                  "k": float(plan.k) if plan is not None else 0.0,
                  "freeze": float(plan is not None and plan.freeze)}
        rows.append([values[name] for name in SCHEDULE_COLUMNS])
    return rows
