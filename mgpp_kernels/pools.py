"""Pools (docs/spec.md §5): the candidate param groups that share a pattern and an initial and
final sparsity. Each pool follows the cubic schedule to its own target with its own exact τ; all
pools share t_i, t_end, ΔT, the freeze and the prior."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import MGPPConfig, require_sparsity
from .patterns import UNSTRUCTURED, NMPattern, parse_pattern
from .schedule import EventPlan, SchedulePoint, cubic_sparsity, prune_count

# The param-group keys of a pool, beside `prune`.
POOL_KEYS = ("pattern", "initial_sparsity", "final_sparsity")


@dataclass(frozen=True)
class Pool:
    pattern: NMPattern | None        # None: unstructured
    initial_sparsity: float
    final_sparsity: float

    def __str__(self) -> str:
        pattern = UNSTRUCTURED if self.pattern is None else str(self.pattern)
        return f"{pattern} {self.initial_sparsity:g} -> {self.final_sparsity:g}"

    def target(self, point: SchedulePoint) -> float | None:
        """The sparsity of this pool's event at `point`, None when the point has no event."""
        if point.remaining is None:
            return None
        return cubic_sparsity(self.initial_sparsity, self.final_sparsity, point.remaining)

    def plan(self, point: SchedulePoint, numel: int) -> EventPlan | None:
        """The pool's event at `point` over its N = `numel` elements, or None when it prunes
        nothing (no event at t, or k = 0)."""
        sparsity = self.target(point)
        if sparsity is None:
            return None
        k = prune_count(numel, sparsity, self.pattern)
        if k == 0:
            return None
        return EventPlan(sparsity=sparsity, k=k, freeze=point.freeze, numel=numel)


def group_pool(group: dict[str, Any], config: MGPPConfig) -> Pool | None:
    """The pool of a param group (None for a group without prune=True), its keys checked: the
    group's pattern, initial_sparsity and final_sparsity, or the optimizer's. An N:M group's
    final_sparsity defaults to (M − N)/M and may be lower, never higher; a group's
    initial_sparsity defaults to the optimizer's, or to its final_sparsity where that is
    lower."""
    if not group.get("prune", False):
        given = [key for key in POOL_KEYS if key in group]
        if given:
            raise ValueError(f"{', '.join(given)} apply to pruning candidates: a param group "
                             f"without prune=True cannot have them")
        return None
    pattern = parse_pattern(group.get("pattern", UNSTRUCTURED))
    final = group.get("final_sparsity",
                      config.final_sparsity if pattern is None else pattern.max_sparsity)
    require_sparsity("final_sparsity", final)
    initial = group.get("initial_sparsity", min(config.initial_sparsity, final))
    require_sparsity("initial_sparsity", initial)
    if pattern is not None and final > pattern.max_sparsity:
        raise ValueError(f"final_sparsity of a {pattern} group must be at most (M − N)/M = "
                         f"{pattern.max_sparsity:g}, got {final}")
    if not initial <= final:
        raise ValueError(f"initial_sparsity must be <= final_sparsity = {final}, got {initial}")
    return Pool(pattern, float(initial), float(final))


def check_pattern_fits(pattern: NMPattern | None, params: list[torch.Tensor],
                       local_params: list[torch.Tensor]) -> None:
    """Every candidate of an N:M group splits into whole groups of M along its last dimension,
    in each rank's shard too."""
    if pattern is None:
        return
    for j, (p, shard) in enumerate(zip(params, local_params)):
        if p.dim() == 0 or p.shape[-1] % pattern.m:
            raise ValueError(f"a {pattern} candidate needs a last dimension divisible by "
                             f"{pattern.m}: parameter {j} of its group has shape {tuple(p.shape)}")
        if shard.dim() == 0 or shard.shape[-1] % pattern.m or shard.numel() % pattern.m:
            raise ValueError(f"a {pattern} candidate's shard must hold whole groups of "
                             f"{pattern.m} along the last dimension: parameter {j} of its group, "
                             f"shape {tuple(p.shape)}, has a shard of shape {tuple(shard.shape)}")


def pools_of(groups: list[dict[str, Any]], config: MGPPConfig) -> tuple[list[Pool], list[int | None]]:
    """The distinct pools of the param groups, in order of first appearance, and each group's
    index among them (None for groups without prune=True)."""
    pools: list[Pool] = []
    indices: list[int | None] = []
    for group in groups:
        pool = group_pool(group, config)
        if pool is None:
            indices.append(None)
            continue
        if pool not in pools:
            pools.append(pool)
        indices.append(pools.index(pool))
    return pools, indices
