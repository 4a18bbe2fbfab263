"""What the optimizer hands a backend and gets back: the data types of a step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..patterns import NMPattern


@dataclass(frozen=True)
class Prior:
    lambda_t: float | None           # None: λ_t comes from the device schedule
    sigma0_sq: float
    sigma1_sq: float
    num_train_examples: int


@dataclass
class UpdateGroup:
    """Parameters of one param group that have a gradient this step, and their state."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    state_steps: list[torch.Tensor]
    keep_masks: list[torch.Tensor]   # one per parameter after the freeze, else empty
    lr: float | torch.Tensor         # a tensor lr is never read on the host by a kernel backend
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    prior: Prior | None              # None: plain AdamW (non-candidates, or after t_end)
    event: int | None                # candidates: the index of their pool's PruneEvent among
                                     # the step's, whose ranking counts their updated values


@dataclass
class PruneEvent:
    """The pruning event of one pool (mgpp_kernels.pools)."""

    params: list[torch.Tensor]       # every candidate of the pool, with or without a gradient
    k: int | None                    # τ is the k-th smallest |θ| of the pool's candidates,
                                     # k >= 1; None: the device schedule's k of this step (0: no
                                     # event), with a keep mask per candidate
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # filled at the freeze
    # With a torch.distributed process group, `params` are this rank's shards and τ ranks the
    # shards of every rank (N and k are already global); only backends that declare
    # `ranks_across_processes` get one.
    process_group: Any = None
    # N:M: the candidates are the M − N smallest |θ| of each group of M along the last dimension
    # (ties: the lower index first), and those with |θ| <= τ are zeroed. None: every element is
    # a candidate, and those with |θ| < τ are zeroed.
    pattern: NMPattern | None = None
    # The pool's last τs, the latest first (0-dim float32, on the parameters' device; none
    # before its first event): a backend may count the histogram around them first, the same τ
    # either way.
    recent_taus: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class Threshold:
    tau: torch.Tensor                # 0-dim float32, on the parameters' device
    pruned: torch.Tensor             # 0-dim int64: how many candidates the event zeroed
