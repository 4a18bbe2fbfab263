"""The schedule on the device (docs/spec.md §2) of one optimizer, for the backends that declare
`schedules_on_device`: t, the last event's selection state and τ live in device buffers, and the
step's first kernel reads t (and GradScaler's found_inf) there. So a step reads no device value
on the host and launches the same kernels on the same memory at every t, which a CUDA graph can
replay. Layout of `table` and `current`: mgpp_kernels.ops.layout.SCHEDULE_COLUMNS and CURRENT."""
from __future__ import annotations

import torch

from ..ops.layout import CURRENT, SCHEDULE_COLUMNS, SELECTION
from .scalars import all_step_scalar_values, to_device, write_tensor_lrs
from .types import Threshold, UpdateGroup

_KEY, _BELOW = SELECTION.index("key"), SELECTION.index("below")


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
        self.table: torch.Tensor | None = None       # float64 (rows, SCHEDULE_COLUMNS): row t
        self.position: torch.Tensor | None = None    # int64 0-dim: t, advanced on the device
        self.current: torch.Tensor | None = None     # float64 (CURRENT,): the step's row, skip
        self.selection: torch.Tensor | None = None   # int64 (SELECTION,): the last event's
        self.tau: torch.Tensor | None = None         # float32 0-dim: the last event's τ
        self.numel: int | None = None                # N, over every rank, that k ranks
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
        return self.position is not None

    def start(self, rows: list[list[float]], numel: int, t: int,
              last_threshold: Threshold | None, device: torch.device) -> None:
        """The buffers: the table of `rows` (mgpp_kernels.schedule.device_schedule_rows over
        N = `numel` candidate elements), the position t and the last event's threshold."""
        self.numel = numel
        self.table = to_device(torch.tensor(rows, dtype=torch.float64), device)
        self.position = to_device(torch.tensor(t, dtype=torch.int64), device)
        self.current = torch.zeros(len(CURRENT), dtype=torch.float64, device=device)
        self.selection = torch.zeros(len(SELECTION), dtype=torch.int64, device=device)
        self.tau = torch.zeros((), dtype=torch.float32, device=device)
        if last_threshold is not None:
            self.tau.copy_(last_threshold.tau)
            self.selection[_KEY].copy_(self.tau.view(torch.int32))
            self.selection[_BELOW].copy_(last_threshold.below)

    def read(self) -> tuple[int, int | None]:
        """(t, the position of the last event before t, None without one), read on the host."""
        t = int(self.position)
        k = self.table[:t, SCHEDULE_COLUMNS.index("k")].cpu()
        events = torch.nonzero(k).flatten().tolist()
        return t, events[-1] if events else None

    def threshold(self) -> Threshold:
        """The last event's threshold, views of the buffers."""
        return Threshold(tau=self.tau, below=self.selection[_BELOW])

    def discard(self) -> None:
        self.table = self.position = self.current = self.selection = self.tau = None
        self.numel = None
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
