"""What the cpu and cuda backends share: both drive the torch.ops.mgpp kernels, each on its own
device, with the histograms, the radix selection state and τ on that device."""
from __future__ import annotations

import torch

from .. import ops
from ..ops.checks import check_parameter
from ..ops.layout import CURRENT, HIGH_BINS, LOW_BINS, LOW_BITS, SELECTION
from .device_schedule import DeviceSchedule
from .scalars import group_rows, step_scalars
from .types import PruneEvent, Threshold, UpdateGroup

if not ops.BUILT:
    raise ImportError(f"mgpp_kernels._C cannot be used: {ops.LOAD_ERROR}")

_RANK, _KEY, _BELOW = (SELECTION.index(slot) for slot in ("rank", "key", "below"))
_CURRENT_K = CURRENT.index("k")


# +inf's high bin: from it on, τ may be NaN (nothing below it), which the one-pass event cannot
# know before τ is exact.
_INF_HIGH_BIN = 0x7F800000 >> LOW_BITS
# The most elements of τ's bin that the one-pass event collects, as a fraction of the candidates:
# 4-byte positions of at most 1/128 of them stay far below the size of a parameter of a large
# model (τ's bin holds about 1/400 of normally distributed weights). Past it, two passes.
_MAX_COLLECTED_FRACTION = 1 / 128


class _Workspace:
    """The radix histograms of one device, zero between uses, kept so that every step on the
    device schedule uses the same memory."""

    def __init__(self, device: torch.device):
        self.high_histogram = torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
        self.low_histogram = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)

    def zero_(self) -> None:
        self.high_histogram.zero_()
        self.low_histogram.zero_()


class Selection:
    """The radix selection of τ, the k-th smallest |x| over a list of tensors, and the pruning
    that follows it, on the tensors' device (docs/spec.md §3).

    `state` is the int64 selection state [rank, key, below]; `high_histogram` already counts
    the first radix level of the `counted` tensors (the update pass did), the others are counted
    here. With a process group, the tensors are this rank's shards and k ranks over every
    rank's: each level's histogram (512 KB, then 256 KB) is summed over the group before its
    selection, so every rank selects the same τ without sending a weight. `current`: the step's
    row of the device schedule (the ops do nothing when it does not prune), or None.
    """

    def __init__(self, tensors: list[torch.Tensor], state: torch.Tensor, workspace: _Workspace,
                 process_group=None, current: torch.Tensor | None = None):
        self.tensors = tensors
        self.state = state
        self.workspace = workspace
        self.process_group = process_group
        self.current = current

    def first_level(self, counted: list[torch.Tensor]) -> torch.Tensor:
        """Level 0: counts the tensors not in `counted`, sums the histogram over the process
        group and selects τ's high bin. Returns this rank's own level-0 histogram (before the
        sum: a copy with a process group, else the histogram itself)."""
        high_histogram = self.workspace.high_histogram
        counted_ids = {id(t) for t in counted}
        uncounted = [t for t in self.tensors if id(t) not in counted_ids]
        if uncounted:
            ops.abs_histogram_(uncounted, high_histogram, self.state, level=0,
                               current=self.current)
        local_histogram = high_histogram
        if self.process_group is not None:
            local_histogram = high_histogram.clone()
            torch.distributed.all_reduce(high_histogram, group=self.process_group)
        ops.radix_select_(high_histogram, self.state, level=0, current=self.current)
        return local_histogram

    @property
    def needs_second_level(self) -> bool:
        """bfloat16 keys have no bits below the first level: τ is exact after it. Another rank's
        shards may have other dtypes, so a process group always takes the second level (on
        bfloat16 keys it selects low bits 0, the same τ): asking the others would be a
        collective read on the host."""
        return (self.process_group is not None
                or any(t.dtype != torch.bfloat16 for t in self.tensors))

    def second_level(self) -> None:
        """Level 1 over the elements of τ's high bin, counted in a pass over the tensors."""
        low_histogram = self.workspace.low_histogram
        ops.abs_histogram_(self.tensors, low_histogram, self.state, level=1, current=self.current)
        if self.process_group is not None:
            torch.distributed.all_reduce(low_histogram, group=self.process_group)
        ops.radix_select_(low_histogram, self.state, level=1, current=self.current)

    def select(self, counted: list[torch.Tensor]) -> None:
        """τ exact in `state`."""
        self.first_level(counted)
        if self.needs_second_level:
            self.second_level()

    def prune(self, keep_masks: list[torch.Tensor], counted: list[torch.Tensor]) -> None:
        """Selects τ and zeroes every |x| < τ, writing the keep masks when given: two passes
        after the update (level 1, then the threshold)."""
        self.select(counted)
        ops.apply_threshold_(self.tensors, keep_masks, self.state, current=self.current)

    def prune_in_one_pass(self, keep_masks: list[torch.Tensor],
                          counted: list[torch.Tensor]) -> None:
        """`prune` in one pass after the update (CPU, host schedule).

        Once level 0 names τ's high bin, partition_at_bin_ zeroes the lower bins, keeps the
        higher ones and collects the elements of that bin, counting their level-1 histogram;
        that histogram, summed over the process group, gives τ exactly, and prune_collected_
        zeroes the collected elements below it. Where τ's bin is +inf's or above, or holds more
        than _MAX_COLLECTED_FRACTION of the elements, `prune`'s two passes do it instead.
        """
        local_histogram = self.first_level(counted)
        if not self.needs_second_level:
            ops.apply_threshold_(self.tensors, keep_masks, self.state)
            return
        numel = sum(t.numel() for t in self.tensors)
        high_bin = int(self.state[_KEY]) >> LOW_BITS
        collected = int(local_histogram[high_bin])
        if (high_bin >= _INF_HIGH_BIN or numel > 1 << 32
                or collected > max(numel * _MAX_COLLECTED_FRACTION, 1024)):
            self.second_level()
            ops.apply_threshold_(self.tensors, keep_masks, self.state)
            return
        low_histogram = self.workspace.low_histogram
        positions = torch.empty(collected, dtype=torch.int32)
        ops.partition_at_bin_(self.tensors, keep_masks, self.state, low_histogram, positions)
        if self.process_group is not None:
            torch.distributed.all_reduce(low_histogram, group=self.process_group)
        ops.radix_select_(low_histogram, self.state, level=1)
        ops.prune_collected_(self.tensors, keep_masks, positions, self.state)


def tau_of(selection: torch.Tensor) -> torch.Tensor:
    return selection[_KEY:_KEY + 1].to(torch.int32).view(torch.float32)[0]


class OpsBackend:
    """A backend of the torch.ops.mgpp kernels on one device type."""

    schedules_on_device = True   # the ops take the step's row of the device schedule

    def __init__(self, name: str, device_type: str, *, steps_on_device: bool,
                 ranks_across_processes: bool, one_pass_events: bool):
        self.name = name
        self.device_type = device_type
        self.steps_on_device = steps_on_device
        self.ranks_across_processes = ranks_across_processes
        # Whether the device has partition_at_bin_ and prune_collected_ (prune_in_one_pass).
        self.one_pass_events = one_pass_events
        self._workspaces: dict[torch.device, _Workspace] = {}

    def check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.device.type != self.device_type:
                raise ValueError(f"the {self.name} backend takes {self.device_type} tensors, got a "
                                 f"parameter on {p.device}")
            check_parameter(p, self.name)

    def step(self, groups: list[UpdateGroup], event: PruneEvent | None,
             grad_scale: torch.Tensor | None,
             schedule: DeviceSchedule | None = None) -> Threshold | None:
        """The update of every group (counting the level-0 histogram of the candidates on an
        event), then the event's selection and pruning.

        On the device schedule this is one fixed sequence of ops whatever t (what a CUDA graph
        replays): schedule_step_ writes the step's row, then every op reads it on the device (a
        skipped step moves nothing; the event's ops do nothing when it does not prune; masks
        are written at the freeze); with a process group, the histograms are all-reduced at
        every step (zero ones when it does not prune). The step scalars, histograms, selection
        state and τ stay at fixed addresses. On the host schedule the cpu backend prunes in one
        pass after the update (prune_in_one_pass).
        """
        tensors = [p for g in groups for p in g.params] + (event.params if event else [])
        if schedule is None and not tensors:
            return None
        device = schedule.position.device if schedule is not None else tensors[0].device
        current = None
        if schedule is None:
            scalars = step_scalars(groups, device)
        else:
            if event is not None and len(event.keep_masks) != len(event.params):
                raise ValueError("a step on the device schedule needs a keep mask per candidate")
            current = schedule.current
            ops.schedule_step_(schedule.table, schedule.position, current,
                               found_inf=schedule.found_inf)
            scalars = schedule.stage_scalars(groups, device)
        workspace = self._workspace(device)
        try:
            counted = self._update(groups, scalars, grad_scale, workspace, current,
                                   count=event is not None)
            if event is None:
                return None
            if schedule is None:
                state = torch.zeros(len(SELECTION), dtype=torch.int64, device=device)
                state[_RANK].fill_(event.k)   # a fill kernel, not a copy from the host
            else:
                state = schedule.selection
                state[_RANK].copy_(current[_CURRENT_K])
            selection = Selection(event.params, state, workspace, event.process_group, current)
            if schedule is None and self.one_pass_events:
                selection.prune_in_one_pass(event.keep_masks, counted)
            else:
                selection.prune(event.keep_masks, counted)
        finally:
            if event is not None:
                workspace.zero_()
        if schedule is not None:
            schedule.tau.copy_(tau_of(state))
            return None
        return Threshold(tau=tau_of(state), below=state[_BELOW])

    @staticmethod
    def _update(groups: list[UpdateGroup], scalars: torch.Tensor,
                grad_scale: torch.Tensor | None, workspace: _Workspace,
                current: torch.Tensor | None, count: bool) -> list[torch.Tensor]:
        """fused_step_ over each group; on an event (`count`), the candidate groups add their
        level-0 histogram. Returns the tensors counted."""
        counted = []
        for group, row in zip(groups, group_rows(scalars, len(groups))):
            counts = count and group.count
            ops.fused_step_(
                group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.state_steps,
                group.keep_masks, row, grad_scale=grad_scale,
                histogram=workspace.high_histogram if counts else None, current=current)
            if counts:
                counted.extend(group.params)
        return counted

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        device = tensors[0].device
        state = torch.zeros(len(SELECTION), dtype=torch.int64, device=device)
        state[_RANK].fill_(k)
        workspace = self._workspace(device)
        try:
            Selection(tensors, state, workspace).select(counted=[])
        finally:
            workspace.zero_()
        return tau_of(state)

    def _workspace(self, device: torch.device) -> _Workspace:
        workspace = self._workspaces.get(device)
        if workspace is None:
            workspace = self._workspaces[device] = _Workspace(device)
        return workspace
