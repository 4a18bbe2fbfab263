"""What the optimizer hands a backend and gets back: one module of data types, and the interface
every backend implements."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch


@dataclass(frozen=True)
class Prior:
    lambda_t: float | None           # None: λ_t comes from the device schedule (DeviceSchedule)
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
    count: bool                      # candidates on an event step: rank their updated values


@dataclass
class PruneEvent:
    params: list[torch.Tensor]       # every candidate, with or without a gradient
    k: int | None                    # τ is the k-th smallest |θ|, 1 <= k <= N; None: the
                                     # device schedule's k of this step (0: no event)
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # filled at the freeze
    # With a torch.distributed process group, `params` are this rank's shards and τ ranks the
    # shards of every rank (N and k are already global); only backends that declare
    # `ranks_across_processes` get one.
    process_group: Any = None


@dataclass(frozen=True)
class Threshold:
    tau: torch.Tensor                # 0-dim float32, on the parameters' device
    below: torch.Tensor              # 0-dim int64: how many candidates had |θ| < τ


@dataclass
class DeviceSchedule:
    """One optimizer's schedule on the device (docs/spec.md §2), for the backends that declare
    `schedules_on_device`: the host never learns t, so a step reads no device value (GradScaler's
    found_inf included) and its launches and buffers are the same at every step, which a CUDA
    graph can replay. Layout of `table` and `current`: mgpp_kernels.ops.layout.SCHEDULE_COLUMNS
    and CURRENT."""

    table: torch.Tensor              # float64 (rows, SCHEDULE_COLUMNS): row t, the last for t >= rows − 1
    position: torch.Tensor           # int64 0-dim: t, advanced on the device by unskipped steps
    current: torch.Tensor            # float64 (CURRENT,): this step's row and skip flag
    selection: torch.Tensor          # int64 (3,): the last event's selection state (τ's key, below)
    tau: torch.Tensor                # float32 0-dim: the last event's τ
    found_inf: torch.Tensor | None = None   # this step's GradScaler found_inf (skip when != 0)
    # The step scalars in one persistent device buffer, refreshed from the host only when their
    # host values change (a graph replays its copy from `staged_host`, kept alive here).
    scalars: torch.Tensor | None = None
    staged_values: tuple[float, ...] = ()
    staged_host: torch.Tensor | None = None

    def stage_scalars(self, host_values: list[float], device: torch.device) -> torch.Tensor:
        """The step scalars in `scalars`, the persistent device buffer: copied from a pinned
        host buffer only when their values change, so that the buffer's address, and what a
        captured graph's copy reads, stay fixed while the hyperparameters do (a tensor lr is
        written into it on the device by the backend)."""
        values = tuple(host_values)
        if self.scalars is None or self.scalars.numel() != len(values):
            self.scalars = torch.empty(len(values), dtype=torch.float64, device=device)
            self.staged_values = ()
        if values != self.staged_values:
            staged = torch.tensor(values, dtype=torch.float64)
            self.staged_host = staged.pin_memory() if device.type != "cpu" else staged
            self.scalars.copy_(self.staged_host, non_blocking=True)
            self.staged_values = values
        return self.scalars


class Backend(Protocol):
    name: str
    # The optimizer keeps step counts on the parameters' device (else on the CPU, as torch does).
    steps_on_device: ClassVar[bool]
    # PruneEvent.process_group is supported: τ ranks the shards of every rank.
    ranks_across_processes: ClassVar[bool]
    # scheduled_step is supported: the schedule position and found_inf are read on the device.
    schedules_on_device: ClassVar[bool]

    def check_params(self, params: list[torch.Tensor]) -> None:
        """Raises ValueError when this backend cannot run on these parameters."""

    def step(self, groups: list[UpdateGroup], event: PruneEvent | None,
             grad_scale: torch.Tensor | None) -> Threshold | None:
        """Updates every group in place; on an event, prunes and returns the threshold."""

    def scheduled_step(self, groups: list[UpdateGroup], event: PruneEvent | None,
                       grad_scale: torch.Tensor | None, schedule: DeviceSchedule) -> None:
        """`step` with t, λ_t's c1, the event's k and the freeze taken from `schedule` on the
        device, and nothing moved when its found_inf is nonzero (schedules_on_device only)."""

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        """τ over the tensors without changing them (0-dim float32)."""
