"""What the cpu and cuda backends share: both drive the torch.ops.mgpp kernels, each on its own
device, with the histograms, the radix selection state and τ on that device."""
from __future__ import annotations

import torch

from .. import ops
from ..ops.checks import check_parameter
from ..ops.layout import CURRENT, HIGH_BINS, LOW_BINS, LOW_BITS, SELECTION
from ..patterns import NMPattern
from .device_schedule import DeviceSchedule, pruned_count
from .scalars import group_rows, step_scalars
from .types import PruneEvent, Threshold, UpdateGroup

if not ops.BUILT:
    raise ImportError(f"mgpp_kernels._C cannot be used: {ops.LOAD_ERROR}")

_RANK, _KEY = (SELECTION.index(slot) for slot in ("rank", "key"))
_CURRENT_K = CURRENT.index("k")


# +inf's high bin: from it on, τ may be NaN (nothing below it), which the one-pass event cannot
# know before τ is exact.
_INF_HIGH_BIN = 0x7F800000 >> LOW_BITS
# The most elements of τ's bin that the one-pass event collects, as a fraction of the candidates:
# 4-byte positions of at most 1/128 of them stay far below the size of a parameter of a large
# model (τ's bin holds about 1/400 of normally distributed weights). Past it, two passes.
_MAX_COLLECTED_FRACTION = 1 / 128
# The high bins each side of the pool's last τ's that the cpu update counts one by one at an
# event: at least a quarter of an octave of |θ| (256 high bins to an octave), and
# _WINDOW_PER_MOVE times as far as τ's bin moved between the pool's last two events. Between the
# events of a schedule τ moves little; in the regrowth regime (events every step after a regrowth,
# BERT-base lists) 18-1300 bins, and where τ falls outside, a pass of its own counts every bin.
# Past _WINDOW_MAX_HALF_WIDTH the update counts every bin: a window that wide holds most of the
# elements, so it saves less than its compares cost (bf16 regrowth, events every step: 1.45x ->
# 1.50-1.55x a plain step with no limit).
_WINDOW_MIN_HALF_WIDTH = 64
_WINDOW_PER_MOVE = 4
_WINDOW_MAX_HALF_WIDTH = 256


def _high_bin(tau: torch.Tensor) -> int:
    return (int(tau.view(torch.int32)) & 0x7FFFFFFF) >> LOW_BITS


def _window(recent_taus: tuple[torch.Tensor, ...]) -> tuple[int, int] | None:
    """fused_step_'s window around the last τ (PruneEvent.recent_taus), None (every bin)
    before a pool's first event and after τ moved far."""
    if not recent_taus:
        return None
    bins = [_high_bin(tau) for tau in recent_taus[:2]]
    half_width = max(_WINDOW_MIN_HALF_WIDTH, _WINDOW_PER_MOVE * (max(bins) - min(bins)))
    if half_width > _WINDOW_MAX_HALF_WIDTH:
        return None
    begin = max(bins[0] - half_width, 1)
    end = min(bins[0] + half_width + 1, HIGH_BINS - 1)
    return (begin, end) if begin < end else None


class _Workspace:
    """The radix histograms of one device, a pair per pool ([pools × bins]), zero between uses,
    kept so that every step on the device schedule uses the same memory."""

    def __init__(self, device: torch.device, pools: int):
        self.high_histograms = torch.zeros((pools, HIGH_BINS), dtype=torch.int64, device=device)
        self.low_histograms = torch.zeros((pools, LOW_BINS), dtype=torch.int64, device=device)

    @property
    def pools(self) -> int:
        return self.high_histograms.shape[0]

    def zero_(self) -> None:
        self.high_histograms.zero_()
        self.low_histograms.zero_()


class Selection:
    """The radix selection of τ, the k-th smallest |x| over a list of tensors, and the pruning
    that follows it, on the tensors' device (docs/spec.md §3).

    `state` is the int64 selection state [rank, key, below, equal]; the pool's level-0
    histogram already counts the first radix level of the `counted` tensors (the update pass
    did), the others are counted here. With an N:M `pattern`, only each group's candidates are
    ranked and those at τ are zeroed too. With a process group, the tensors are this rank's
    shards and k ranks over every rank's: each level's histogram (512 KB, then 256 KB) is summed
    over the group before its selection, so every rank selects the same τ without sending a
    weight. `current`: the step's
    row of the device schedule (the ops do nothing when it does not prune), or None.
    """

    def __init__(self, tensors: list[torch.Tensor], state: torch.Tensor,
                 high_histogram: torch.Tensor, low_histogram: torch.Tensor,
                 process_group=None, current: torch.Tensor | None = None,
                 pattern: NMPattern | None = None, window: tuple[int, int] | None = None):
        self.tensors = tensors
        self.state = state
        self.high_histogram = high_histogram
        self.low_histogram = low_histogram
        self.process_group = process_group
        self.current = current
        self.pattern = pattern
        # The high bins that the update counted one by one (fused_step_'s window), None: every
        # bin.
        self.window = window

    def first_level(self, counted: list[torch.Tensor]) -> torch.Tensor:
        """Level 0: counts the tensors not in `counted`, sums the histogram over the process
        group and selects τ's high bin; where that bin is outside the window the update counted
        (the same on every rank), counts every bin of every tensor and selects again. Returns
        this rank's own level-0 histogram (before the sum: a copy with a process group, else the
        histogram itself)."""
        counted_ids = {id(t) for t in counted}
        uncounted = [t for t in self.tensors if id(t) not in counted_ids]
        if self.window is None:
            return self._select_high_bin(uncounted)
        state_before = self.state.clone()
        local_histogram = self._select_high_bin(uncounted)
        begin, end = self.window
        if begin <= int(self.state[_KEY]) >> LOW_BITS < end:
            return local_histogram
        self.high_histogram.zero_()
        self.state.copy_(state_before)
        return self._select_high_bin(self.tensors)

    def _select_high_bin(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Adds the level-0 histogram of `tensors`, sums it over the process group and selects
        τ's high bin; returns this rank's histogram."""
        high_histogram = self.high_histogram
        if tensors:
            ops.abs_histogram_(tensors, high_histogram, self.state, level=0,
                               current=self.current, pattern=self.pattern)
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
        low_histogram = self.low_histogram
        ops.abs_histogram_(self.tensors, low_histogram, self.state, level=1, current=self.current,
                           pattern=self.pattern)
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
        ops.apply_threshold_(self.tensors, keep_masks, self.state, current=self.current,
                             pattern=self.pattern)

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
            ops.apply_threshold_(self.tensors, keep_masks, self.state, pattern=self.pattern)
            return
        numel = sum(t.numel() for t in self.tensors)
        high_bin = int(self.state[_KEY]) >> LOW_BITS
        collected = int(local_histogram[high_bin])
        if (high_bin >= _INF_HIGH_BIN or numel > 1 << 32
                or collected > max(numel * _MAX_COLLECTED_FRACTION, 1024)):
            self.second_level()
            ops.apply_threshold_(self.tensors, keep_masks, self.state, pattern=self.pattern)
            return
        low_histogram = self.low_histogram
        positions = torch.empty(collected, dtype=torch.int32)
        ops.partition_at_bin_(self.tensors, keep_masks, self.state, low_histogram, positions,
                              pattern=self.pattern)
        if self.process_group is not None:
            torch.distributed.all_reduce(low_histogram, group=self.process_group)
        ops.radix_select_(low_histogram, self.state, level=1)
        ops.prune_collected_(self.tensors, keep_masks, positions, self.state,
                             pattern=self.pattern)


def tau_of(selection: torch.Tensor) -> torch.Tensor:
    return selection[_KEY:_KEY + 1].to(torch.int32).view(torch.float32)[0]


class OpsBackend:
    """A backend of the torch.ops.mgpp kernels on one device type."""

    schedules_on_device = True   # the ops take the step's row of the device schedule

    ranks_nm_pools = True   # the event ops take a pattern

    def __init__(self, name: str, device_type: str, *, steps_on_device: bool,
                 ranks_across_processes: bool, one_pass_events: bool, ranks_nm_in_update: bool,
                 counts_in_window: bool):
        self.name = name
        self.device_type = device_type
        self.steps_on_device = steps_on_device
        self.ranks_across_processes = ranks_across_processes
        # fused_step_ counts an N:M pool's histogram (else abs_histogram_ does, in a pass of its
        # own).
        self.ranks_nm_in_update = ranks_nm_in_update
        # Whether the device has partition_at_bin_ and prune_collected_ (prune_in_one_pass).
        self.one_pass_events = one_pass_events
        # Whether fused_step_ takes a window: on the host schedule, an event with recent τs then
        # counts its bins around them first (Selection.first_level).
        self.counts_in_window = counts_in_window
        self._workspaces: dict[torch.device, _Workspace] = {}

    def check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.device.type != self.device_type:
                raise ValueError(f"the {self.name} backend takes {self.device_type} tensors, got a "
                                 f"parameter on {p.device}")
            check_parameter(p, self.name)

    def step(self, groups: list[UpdateGroup], events: list[PruneEvent],
             grad_scale: torch.Tensor | None,
             schedule: DeviceSchedule | None = None) -> list[Threshold] | None:
        """The update of every group (counting the level-0 histogram of each pool's candidates
        on an event), then each event's selection and pruning, one pool after the other.

        On the device schedule this is one fixed sequence of ops whatever t (what a CUDA graph
        replays): schedule_step_ writes each pool's row of the step, then every op reads its
        pool's row on the device (a skipped step moves nothing; the event's ops do nothing when
        it does not prune; masks are written at the freeze); with a process group, the
        histograms are all-reduced at every step (zero ones when it does not prune). The step
        scalars, histograms, selection states and τ stay at fixed addresses. On the host
        schedule the cpu backend prunes in one pass after the update (prune_in_one_pass).
        """
        tensors = [p for g in groups for p in g.params] + [p for e in events for p in e.params]
        if schedule is None and not tensors:
            return []
        device = schedule.position.device if schedule is not None else tensors[0].device
        currents: list[torch.Tensor | None] = [None] * len(events)
        if schedule is None:
            scalars = step_scalars(groups, device)
        else:
            if any(len(e.keep_masks) != len(e.params) for e in events):
                raise ValueError("a step on the device schedule needs a keep mask per candidate")
            for pool in schedule.pools:
                ops.schedule_step_(pool.table, pool.position, pool.current,
                                   found_inf=schedule.found_inf)
            currents = [pool.current for pool in schedule.pools[:len(events)]]
            scalars = schedule.stage_scalars(groups, device)
        workspace = self._workspace(device, len(events))
        windows = [_window(e.recent_taus) if schedule is None and self.counts_in_window
                   else None for e in events]
        thresholds = []
        try:
            counted = self._update(groups, scalars, grad_scale, workspace, events, windows,
                                   currents, None if schedule is None else schedule.current)
            for j, event in enumerate(events):
                if schedule is None:
                    state = torch.zeros(len(SELECTION), dtype=torch.int64, device=device)
                    state[_RANK].fill_(event.k)   # a fill kernel, not a copy from the host
                else:
                    state = schedule.pools[j].selection
                    state[_RANK].copy_(currents[j][_CURRENT_K])
                selection = Selection(event.params, state, workspace.high_histograms[j],
                                      workspace.low_histograms[j], event.process_group,
                                      currents[j], event.pattern, windows[j])
                if schedule is None and self.one_pass_events:
                    selection.prune_in_one_pass(event.keep_masks, counted[j])
                else:
                    selection.prune(event.keep_masks, counted[j])
                if schedule is None:
                    pruned = pruned_count(state, at_tau=event.pattern is not None)
                    thresholds.append(Threshold(tau=tau_of(state), pruned=pruned))
                else:
                    schedule.pools[j].tau.copy_(tau_of(state))
        finally:
            if events:
                workspace.zero_()
        return None if schedule is not None else thresholds

    def _update(self, groups: list[UpdateGroup], scalars: torch.Tensor,
                grad_scale: torch.Tensor | None, workspace: _Workspace,
                events: list[PruneEvent], windows: list[tuple[int, int] | None],
                currents: list[torch.Tensor | None],
                shared_current: torch.Tensor | None) -> list[list[torch.Tensor]]:
        """fused_step_ over each group; a group of candidates of an event's pool adds the
        level-0 histogram of its updated values (N:M: of each group's candidates, where the
        device's update ranks them) to that pool's, in the pool's window where it has one.
        `shared_current`: the device schedule's row for the groups outside the events' pools.
        Returns each event's tensors counted."""
        counted: list[list[torch.Tensor]] = [[] for _ in events]
        for group, row in zip(groups, group_rows(scalars, len(groups))):
            event = group.event
            counts = event is not None and (events[event].pattern is None
                                            or self.ranks_nm_in_update)
            ops.fused_step_(
                group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.state_steps,
                group.keep_masks, row, grad_scale=grad_scale,
                histogram=workspace.high_histograms[event] if counts else None,
                current=shared_current if event is None else currents[event],
                pattern=events[event].pattern if counts else None,
                window=windows[event] if counts else None)
            if counts:
                counted[event].extend(group.params)
        return counted

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        device = tensors[0].device
        state = torch.zeros(len(SELECTION), dtype=torch.int64, device=device)
        state[_RANK].fill_(k)
        workspace = self._workspace(device, 1)
        try:
            Selection(tensors, state, workspace.high_histograms[0],
                      workspace.low_histograms[0]).select(counted=[])
        finally:
            workspace.zero_()
        return tau_of(state)

    def _workspace(self, device: torch.device, pools: int) -> _Workspace:
        """The device's histograms for at least `pools` pools (one at least)."""
        workspace = self._workspaces.get(device)
        if workspace is None or workspace.pools < pools:
            workspace = self._workspaces[device] = _Workspace(device, max(pools, 1))
        return workspace
