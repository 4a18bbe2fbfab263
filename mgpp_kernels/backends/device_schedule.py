"""The schedule on the device (docs/spec.md §2) of one optimizer, for the backends that declare
`schedules_on_device`: t and each pool's table, last selection state and τ live in device
buffers, and the step's first kernels read t (and GradScaler's found_inf) there. So a step reads
no device value on the host and launches the same kernels on the same memory at every t, which a
CUDA graph can replay. Layout of `table` and `current`: mgpp_kernels.ops.layout.SCHEDULE_COLUMNS and CURRENT."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.layout import CURRENT, SCHEDULE_COLUMNS, SELECTION
from .scalars import all_step_scalar_values, to_device, write_tensor_lrs
from .types import Threshold, UpdateGroup

_KEY, _BELOW, _EQUAL = (SELECTION.index(slot) for slot in ("key", "below", "equal"))
_NAN_KEY_FLOOR = 0x7F800001


def pruned_count(selection: torch.Tensor, at_tau: bool) -> torch.Tensor:
    """The candidates an event zeroed, from its final selection state (on its device): those
    below τ, and where the event zeroes those at τ too (N:M), those at a τ that is not NaN."""
    if not at_tau:
        return selection[_BELOW]
    return selection[_BELOW] + selection[_EQUAL] * (selection[_KEY] < _NAN_KEY_FLOOR)


@dataclass
class PoolSchedule:
    """One pool's buffers. Every pool has its own table (its events' k) and its own copy of t,
    which all advance together (each step runs every pool's schedule_step_ with the same
    found_inf), so that the kernels of a pool read one row."""

    table: torch.Tensor       # float64 (rows, SCHEDULE_COLUMNS): row t
    position: torch.Tensor    # int64 0-dim: t, advanced on the device
    current: torch.Tensor     # float64 (CURRENT,): the step's row, skip flag included
    selection: torch.Tensor   # int64 (SELECTION,): the last event's
    tau: torch.Tensor         # float32 0-dim: the last event's τ
    numel: int                # N, over every rank, that k ranks
    inclusive: bool           # N:M: the event zeroes the candidates at τ too

    def threshold(self) -> Threshold:
        """The last event's threshold, read from the buffers."""
        return Threshold(tau=self.tau, pruned=pruned_count(self.selection, self.inclusive))



class DeviceSchedule:
    """Whether an optimizer's schedule is on the device, and its buffers once started.

    `on` from construction with capturable=True, or from the first GradScaler found_inf on a
    backend whose step counts live on the device (`switch_on`). The buffers are made by `start`
    from the host's position, read back by `read` (for stats() and state_dict(), never in a
    step) and dropped by `discard` when N or T change (the next step starts them anew).
    """

    def __init__(self, on: bool):
        self.on = on
        self.found_inf: torch.Tensor | None = None   # this step's; skip it when nonzero
        # One per pool of candidates, in pool order; with no candidates, one whose k is always 0
        # (it still moves t and carries the skip flag and the prior's row).
        self.pools: list[PoolSchedule] = []
        # Every pool's `current` row, one after the other (a kernel over several pools indexes it).
        self.currents: torch.Tensor | None = None
        # The step scalars in one persistent device buffer, refreshed from the host only when
        # their host values change (a graph replays its copy from `_staged_host`, kept alive).
        self.scalars: torch.Tensor | None = None
        self._staged_values: tuple[float, ...] = ()
        self._staged_host: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) keeps whether the schedule is on the device; its first step
        # starts the buffers from the optimizer's progress, read back before copying.
        return {"on": self.on}

    def __setstate__(self, state: dict) -> None:
        self.__init__(on=state["on"])

    def switch_on(self) -> None:
        """Moves the schedule to the device for good: GradScaler hands the step a found_inf,
        which only the device can read without waiting for it."""
        self.on = True

    @property
    def started(self) -> bool:
        return bool(self.pools)

    @property
    def position(self) -> torch.Tensor:
        return self.pools[0].position

    @property
    def current(self) -> torch.Tensor:
        """The step's row of the first pool: what the kernels of groups outside every pool
        read (the skip flag and the prior's row are every pool's)."""
        return self.pools[0].current

    def start(self, tables: list[list[list[float]]], numels: list[int], inclusive: list[bool],
              t: int, last_thresholds: list[Threshold | None], device: torch.device) -> None:
        """The buffers of each pool: its table of rows (mgpp_kernels.schedule.
        device_schedule_rows over its N = `numels` elements), whether its events zero the
        candidates at τ, the position t and its last event's threshold."""
        self.pools = []
        self.currents = torch.zeros((len(tables), len(CURRENT)), dtype=torch.float64,
                                    device=device)
        for i, (rows, numel, at_tau, last) in enumerate(
                zip(tables, numels, inclusive, last_thresholds, strict=True)):
            pool = PoolSchedule(
                table=to_device(torch.tensor(rows, dtype=torch.float64), device),
                position=to_device(torch.tensor(t, dtype=torch.int64), device),
                current=self.currents[i],
                selection=torch.zeros(len(SELECTION), dtype=torch.int64, device=device),
                tau=torch.zeros((), dtype=torch.float32, device=device),
                numel=numel, inclusive=at_tau)
            if last is not None:
                pool.tau.copy_(last.tau)
                pool.selection[_KEY].copy_(pool.tau.view(torch.int32))
                # The pruned count as `below`, none `equal`: threshold() reads it back as saved.
                pool.selection[_BELOW].copy_(last.pruned)
            self.pools.append(pool)

    def read(self) -> tuple[int, list[int | None]]:
        """(t, for each pool the position of its last event before t, None without one), read
        on the host."""
        t = int(self.position)
        last_events = []
        for pool in self.pools:
            k = pool.table[:t, SCHEDULE_COLUMNS.index("k")].cpu()
            events = torch.nonzero(k).flatten().tolist()
            last_events.append(events[-1] if events else None)
        return t, last_events

    def discard(self) -> None:
        self.pools, self.currents = [], None
        self.scalars, self._staged_values, self._staged_host = None, (), None

    def stage_scalars(self, groups: list[UpdateGroup], device: torch.device) -> torch.Tensor:
        """The groups' step scalars in the persistent device buffer, copied from a pinned host
        buffer only when their values change, so that the buffer's address, and what a captured
        graph's copy reads, stay fixed while the hyperparameters do; tensor lrs are copied into
        it on the device."""
        values = tuple(all_step_scalar_values(groups))
        if self.scalars is None or self.scalars.numel() != len(values):
            self.scalars = torch.empty(len(values), dtype=torch.float64, device=device)
            self._staged_values = ()
        if values != self._staged_values:
            staged = torch.tensor(values, dtype=torch.float64)
            self._staged_host = staged.pin_memory() if device.type != "cpu" else staged
            self.scalars.copy_(self._staged_host, non_blocking=True)
            self._staged_values = values
        write_tensor_lrs(groups, self.scalars)
        return self.scalars
