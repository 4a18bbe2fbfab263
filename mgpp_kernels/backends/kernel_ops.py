"""What the cpu and cuda backends share: both drive the torch.ops.mgpp kernels, each on its own
device, with the histograms, the radix selection state and τ on that device."""
from __future__ import annotations

import torch

from .. import ops
from ..ops.checks import check_parameter
from ..ops.layout import (CURRENT, HIGH_BINS, LOW_BINS, LOW_BITS, NUM_STEP_SCALARS, SELECTION,
                          step_scalar_values, step_scalars, write_tensor_lr)
from .types import DeviceSchedule, PruneEvent, Threshold, UpdateGroup

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


def _select_first_level(tensors, k, high_histogram, counted, process_group):
    """Level 0 of the radix selection: counts the tensors the update pass did not count, sums the
    histogram over the process group and selects τ's high bin. Returns the selection state, this
    rank's own level-0 histogram (before the sum) and whether τ needs level 1."""
    device = high_histogram.device
    selection = torch.zeros(len(SELECTION), dtype=torch.int64, device=device)
    selection[_RANK].fill_(k)  # a fill kernel, not a copy from the host
    counted_ids = {id(t) for t in counted}
    uncounted = [t for t in tensors if id(t) not in counted_ids]
    if uncounted:
        ops.abs_histogram_(uncounted, high_histogram, selection, level=0)
    needs_low_level = _needs_low_level(tensors, process_group)
    local_histogram = high_histogram
    if process_group is not None:
        local_histogram = high_histogram.clone()
        torch.distributed.all_reduce(high_histogram, group=process_group)
    ops.radix_select_(high_histogram, selection, level=0)
    return selection, local_histogram, needs_low_level


def _needs_low_level(tensors, process_group) -> bool:
    """bfloat16 keys have no bits below the first level: τ is exact after it. Another rank's
    shards may have other dtypes, so a process group always takes the second level (on bfloat16
    keys it selects low bits 0, the same τ): asking the others would be a collective read on the
    host."""
    return process_group is not None or any(t.dtype != torch.bfloat16 for t in tensors)


def _select_second_level(tensors, selection, process_group, low_histogram=None, current=None):
    """Level 1 over the elements of τ's high bin, counted in a pass over the tensors (into
    `low_histogram`, zero, when given)."""
    if low_histogram is None:
        low_histogram = torch.zeros(LOW_BINS, dtype=torch.int64, device=selection.device)
    ops.abs_histogram_(tensors, low_histogram, selection, level=1, current=current)
    if process_group is not None:
        torch.distributed.all_reduce(low_histogram, group=process_group)
    ops.radix_select_(low_histogram, selection, level=1, current=current)


def select_threshold(tensors: list[torch.Tensor], k: int, high_histogram: torch.Tensor,
                     counted: list[torch.Tensor], process_group=None) -> torch.Tensor:
    """Radix selection of τ, the k-th smallest |x| over `tensors`, 1 <= k <= total numel.

    `high_histogram` already counts the first radix level of the `counted` tensors (the update
    pass does that); the rest are counted here. Returns the selection state [rank, key, below],
    on the histogram's device. With a process group, `tensors` are this rank's shards and k ranks
    over every rank's: each level's histogram (512 KB, then 256 KB) is summed over the group
    before its selection, so every rank selects the same τ without sending a weight.
    """
    selection, _, needs_low_level = _select_first_level(tensors, k, high_histogram, counted,
                                                        process_group)
    if needs_low_level:
        _select_second_level(tensors, selection, process_group)
    return selection


def prune_in_one_pass(tensors: list[torch.Tensor], keep_masks: list[torch.Tensor], k: int,
                      high_histogram: torch.Tensor, counted: list[torch.Tensor],
                      process_group=None) -> torch.Tensor:
    """Selects τ as select_threshold does and zeroes every |x| < τ (writing the keep masks when
    given) in one pass over the tensors after the update pass (CPU, docs/spec.md §3).

    Once level 0 names τ's high bin, partition_at_bin_ zeroes the lower bins, keeps the higher
    ones and collects the elements of that bin, counting their level-1 histogram; that histogram,
    summed over the process group, gives τ exactly, and prune_collected_ zeroes the collected
    elements below it. Where τ's bin is +inf's or above, or holds more than
    _MAX_COLLECTED_FRACTION of the elements, a level-1 pass and a threshold pass do it instead.
    Returns the selection state.
    """
    selection, local_histogram, needs_low_level = _select_first_level(
        tensors, k, high_histogram, counted, process_group)
    if not needs_low_level:
        ops.apply_threshold_(tensors, keep_masks, selection)
        return selection
    numel = sum(t.numel() for t in tensors)
    high_bin = int(selection[_KEY]) >> LOW_BITS
    collected = int(local_histogram[high_bin])
    if (high_bin >= _INF_HIGH_BIN or numel > 1 << 32
            or collected > max(numel * _MAX_COLLECTED_FRACTION, 1024)):
        _select_second_level(tensors, selection, process_group)
        ops.apply_threshold_(tensors, keep_masks, selection)
        return selection
    low_histogram = torch.zeros(LOW_BINS, dtype=torch.int64)
    positions = torch.empty(collected, dtype=torch.int32)
    ops.partition_at_bin_(tensors, keep_masks, selection, low_histogram, positions)
    if process_group is not None:
        torch.distributed.all_reduce(low_histogram, group=process_group)
    ops.radix_select_(low_histogram, selection, level=1)
    ops.prune_collected_(tensors, keep_masks, positions, selection)
    return selection


def tau_of(selection: torch.Tensor) -> torch.Tensor:
    return selection[_KEY:_KEY + 1].to(torch.int32).view(torch.float32)[0]


class _Workspace:
    """The radix histograms of the device-schedule steps on one device, kept so that every step
    uses the same memory (zeroed before each use)."""

    def __init__(self, device: torch.device):
        self.high_histogram = torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
        self.low_histogram = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)


class OpsBackend:
    """A backend of the torch.ops.mgpp kernels on one device type."""

    def __init__(self, name: str, device_type: str, *, steps_on_device: bool,
                 ranks_across_processes: bool, one_pass_events: bool):
        self.name = name
        self.device_type = device_type
        self.steps_on_device = steps_on_device
        self.ranks_across_processes = ranks_across_processes
        # scheduled_step: the ops take the step's row of the device schedule.
        self.schedules_on_device = True
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
             grad_scale: torch.Tensor | None) -> Threshold | None:
        tensors = [p for g in groups for p in g.params] + (event.params if event else [])
        if not tensors:
            return None
        device = tensors[0].device
        histogram = (torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
                     if event is not None else None)
        counted = []
        for group in groups:
            count = event is not None and group.count
            ops.fused_step_(
                group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.state_steps,
                group.keep_masks, step_scalars(group, device), grad_scale=grad_scale,
                histogram=histogram if count else None)
            if count:
                counted.extend(group.params)
        if event is None:
            return None
        if self.one_pass_events:
            selection = prune_in_one_pass(event.params, event.keep_masks, event.k, histogram,
                                          counted, event.process_group)
        else:
            selection = select_threshold(event.params, event.k, histogram, counted,
                                         event.process_group)
            ops.apply_threshold_(event.params, event.keep_masks, selection)
        return Threshold(tau=tau_of(selection), below=selection[_BELOW])

    def scheduled_step(self, groups: list[UpdateGroup], event: PruneEvent | None,
                       grad_scale: torch.Tensor | None, schedule: DeviceSchedule) -> None:
        """`step` on the device schedule, one fixed sequence of ops whatever t (what a CUDA
        graph replays): schedule_step_ writes the step's row, then every op reads it on the
        device (a skipped step moves nothing; the event's ops do nothing when it does not prune;
        masks are written at the freeze). An event is the level-0 histogram of the candidates
        without a gradient, the level-0 selection, the level-1 histogram and selection (unless
        every candidate is bfloat16 and there is no process group) and the threshold; with a
        process group, the histograms are all-reduced at every step (zero ones when it does not
        prune). The step scalars, histograms, selection state and τ stay at fixed addresses."""
        if event is not None and len(event.keep_masks) != len(event.params):
            raise ValueError("a step on the device schedule needs a keep mask per candidate")
        device = schedule.position.device
        current = schedule.current
        ops.schedule_step_(schedule.table, schedule.position, current,
                           found_inf=schedule.found_inf)
        host_values = [v for group in groups for v in step_scalar_values(group)]
        scalars = schedule.stage_scalars(host_values, device)
        workspace = self._workspaces.get(device)
        if workspace is None:
            workspace = self._workspaces[device] = _Workspace(device)
        high_histogram = workspace.high_histogram
        if event is not None:
            high_histogram.zero_()
        counted = []
        for g, group in enumerate(groups):
            row = scalars[g * NUM_STEP_SCALARS:(g + 1) * NUM_STEP_SCALARS]
            write_tensor_lr(group, row)
            count = event is not None and group.count
            ops.fused_step_(
                group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.state_steps,
                group.keep_masks, row, grad_scale=grad_scale,
                histogram=high_histogram if count else None, current=current)
            if count:
                counted.extend(group.params)
        if event is None:
            return
        selection = schedule.selection
        selection[_RANK].copy_(current[_CURRENT_K])
        counted_ids = {id(t) for t in counted}
        uncounted = [t for t in event.params if id(t) not in counted_ids]
        if uncounted:
            ops.abs_histogram_(uncounted, high_histogram, selection, level=0, current=current)
        if event.process_group is not None:
            torch.distributed.all_reduce(high_histogram, group=event.process_group)
        ops.radix_select_(high_histogram, selection, level=0, current=current)
        if _needs_low_level(event.params, event.process_group):
            workspace.low_histogram.zero_()
            _select_second_level(event.params, selection, event.process_group,
                                 workspace.low_histogram, current)
        ops.apply_threshold_(event.params, event.keep_masks, selection, current=current)
        schedule.tau.copy_(tau_of(selection))

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        histogram = torch.zeros(HIGH_BINS, dtype=torch.int64, device=tensors[0].device)
        return tau_of(select_threshold(tensors, k, histogram, counted=[]))
