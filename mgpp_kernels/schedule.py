"""The pruning schedule of docs/spec.md §2: a pure function of the schedule position t.

The optimizer asks :func:`schedule_at` where step t stands (stage, λ_t, whether it prunes); each
pool (mgpp_kernels.pools) turns that into its own event, how many of its N candidate elements
rank below τ (:func:`prune_count`); on a backend that keeps t on the device,
:func:`device_schedule_rows` tabulates both for every t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import MGPPConfig
from .ops.layout import SCHEDULE_COLUMNS
from .patterns import NMPattern
from .prior import prior_c1


@dataclass(frozen=True)
class SchedulePoint:
    t: int
    stage: str                   # "dense" before t_i, "pruning" until t_end, "frozen" from t_end on
    prior_on: bool
    lambda_t: float
    # This step's pruning event: the cubic factor (1 − (t − t_i)/(t_end − t_i))³, 1 at t_i and
    # 0 at t_end, and the sparsity it gives for the optimizer's initial and final sparsity;
    # None without an event.
    remaining: float | None
    prune_to: float | None
    freeze: bool                 # this step's event freezes the mask (t == t_end)
    frozen: bool                 # the mask is frozen and re-applied after every update (t > t_end)


@dataclass(frozen=True)
class EventPlan:
    """A pool's pruning event: zero the candidates whose |θ| is below τ, the k-th smallest of
    its N elements' candidates (N:M: at or below)."""

    sparsity: float
    k: int                       # 1 <= k <= N
    freeze: bool                 # keep the mask from now on
    numel: int                   # N: the pool's elements, over every rank


def lambda_factor(config: MGPPConfig, t: int) -> float:
    """α(t): 1 up to t_i, then linear down to α_f at t_end."""
    t_i, t_end, alpha_f = config.initial_warmup_steps, config.t_end, config.lambda_final_factor
    if t <= t_i:
        return 1.0
    if t >= t_end:
        return alpha_f
    return alpha_f + (1 - alpha_f) * (1 - (t - t_i) / (t_end - t_i))


def cubic_remaining(config: MGPPConfig, t: int) -> float | None:
    """The cubic schedule's factor at step t (1 at t_i, 0 at t_end), or None when t has no
    event."""
    t_i, t_end = config.initial_warmup_steps, config.t_end
    if t == t_i:
        return 1.0
    if t == t_end:
        return 0.0
    if t_i < t < t_end and t % config.pruning_interval == 0:
        return (1 - (t - t_i) / (t_end - t_i)) ** 3
    return None


def cubic_sparsity(initial: float, final: float, remaining: float) -> float:
    """s(t) = s_f + (s_i − s_f)·remaining: exactly s_i at t_i and s_f at t_end."""
    if remaining == 1.0:
        return initial
    if remaining == 0.0:
        return final
    return final + (initial - final) * remaining


def target_sparsity(config: MGPPConfig, t: int) -> float | None:
    """The sparsity to prune to at step t for the optimizer's initial and final sparsity, or
    None when t has no event."""
    remaining = cubic_remaining(config, t)
    return (None if remaining is None
            else cubic_sparsity(config.initial_sparsity, config.final_sparsity, remaining))


def schedule_at(config: MGPPConfig, t: int) -> SchedulePoint:
    t_end = config.t_end
    stage = "dense" if t < config.initial_warmup_steps else "pruning" if t < t_end else "frozen"
    return SchedulePoint(t=t, stage=stage, prior_on=t <= t_end,
                         lambda_t=config.lambda_mix * lambda_factor(config, t),
                         remaining=cubic_remaining(config, t),
                         prune_to=target_sparsity(config, t), freeze=t == t_end, frozen=t > t_end)


def prune_count(numel: int, sparsity: float, pattern: NMPattern | None = None) -> int:
    """k = int(N·s): how many of N elements an event ranks below τ. In an N:M pool k counts
    among the N·(M − N)/M candidates, all of them from s = (M − N)/M on."""
    if pattern is None:
        return int(numel * sparsity)
    candidates = numel // pattern.m * pattern.prunable
    return candidates if sparsity >= pattern.max_sparsity else min(int(numel * sparsity), candidates)


def device_schedule_rows(config: MGPPConfig,
                         plan: Callable[[SchedulePoint], EventPlan | None]) -> list[list[float]]:
    """The device schedule's table (mgpp_kernels.ops.layout.SCHEDULE_COLUMNS) of one pool, whose
    event at a point is `plan(point)`: the row of t for t = 0 .. t_end + 1, the last standing
    for every later t (no event, no prior, the mask frozen). Values in float64, as the host
    computes them."""
    rows = []
    for t in range(config.t_end + 2):
        point = schedule_at(config, t)
        event = plan(point)
        values = {"prior_on": float(point.prior_on),
                  "c1": prior_c1(point.lambda_t, config.sigma0_sq, config.sigma1_sq)
                  if point.prior_on else 0.0,
                  "k": float(event.k) if event is not None else 0.0,
                  "freeze": float(event is not None and event.freeze)}
        rows.append([values[name] for name in SCHEDULE_COLUMNS])
    return rows
