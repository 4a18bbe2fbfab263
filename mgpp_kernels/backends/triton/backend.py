"""The triton backend: the MGPP step as Triton kernels (mgpp_kernels/backends/triton/kernels.py).

A step is a fixed, short sequence of launches whatever the number of tensors, in four parts
(`_stage`, `_update`, `_select`, `_threshold`):

0. On the device schedule, ``schedule_kernel`` (1 launch per pool) writes each pool's row of the
   step (below).
1. ``prepare_kernel`` (1 launch): every tensor's step count k += 1, and its float32 AdamW scalars
   (bias corrections in float64) and prior constants into a per-tensor row.
2. ``update_kernel`` (1 launch per (parameter dtype, state dtype) pair): prior gradient + AdamW +
   frozen mask for all tensors of the pair; on an event step it also counts the candidates'
   |θ_new| of each unstructured pool into that pool's level-0 histogram ([pools × bins]).
3. For each pool's event (PruneEvent), one after the other: ``histogram_kernel`` level 0 for the
   candidates the update did not count (1 per dtype, only when there are any: those without a
   gradient, and every candidate of an N:M pool, whose ranking keys need whole groups),
   ``select_kernel`` level 0, ``histogram_kernel`` level 1 (1 per dtype; skipped when every
   candidate is bfloat16, whose keys have no low bits, and there is no process group) and
   ``select_kernel`` level 1, then ``threshold_kernel`` (1 per dtype), which also writes the keep
   masks at the freeze. An N:M pool's kernels rank each group of M in registers
   (csrc/core/selection.h keep_candidate_keys) and zero its candidates at τ too. With
   ``process_group=``, each level's histogram is all-reduced on the device before its selection
   (weights never leave the rank).

The kernels find their tensors through device-side tables of addresses and sizes (one int64 row
per tensor, one int32 row per block). A table is built on the host once and cached while the
tensors' addresses, sizes and dtypes stay the same (the key is those values, so a cached table
never points at memory that moved).

What a CUDA graph needs, and where each piece comes from:
- No device value is read on the host: no ``.item()``, ``.cpu()``, ``.tolist()`` or Python branch
  on a tensor's value. τ is chosen on the device by ``select_kernel`` and read from device memory
  by ``threshold_kernel``; the pruned count stays a device tensor.
- Every value that changes from step to step reaches the kernels through device memory, not as
  a launch argument: the step scalars (lr, betas, eps, weight decay, the prior's constants; a
  tensor lr is copied into them on the device), the step counts (incremented on the device, in
  the optimizer's state tensors, as torch.optim.AdamW(capturable=True) keeps them), the
  GradScaler's scale and each pool's rank k.
- A step given a DeviceSchedule (the optimizer's, with capturable=True or once a GradScaler
  hands it found_inf): ``schedule_kernel`` first reads t and found_inf on the device and writes
  each pool's row of the step (prior on/off, λ_t's c1, its k, freeze, skip) from the pool's table
  of every t; every later kernel reads its pool's row (the update, the first pool's, but each
  tensor's pool's for its k), so the event kernels run at every step and return at once when
  their pool does not prune, a skipped step writes nothing and advances neither k nor t, and
  the candidates' masks (all ones until the freeze writes them) apply at every step. The step
  scalars live in the schedule's persistent buffer, copied from pinned memory only when a host
  value changes. So every step launches the same kernels with the same arguments on the same
  memory (the tables are cached by address), which a captured graph replays for any t.
Limits: a step on the host schedule chooses its launches by t on the host and stages its
scalars in a fresh buffer, so a graph of it replays one t only; a graph replays the set of
tensors with a gradient it captured, as torch's capturable optimizers do.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from ...ops.checks import (check_kernel_dtype, check_mask, check_parameter, check_step_lists,
                           check_tensor)
from ...ops.layout import KERNEL_DTYPES, NUM_SELECTION_SLOTS
from ...patterns import NMPattern
from ..device_schedule import DeviceSchedule, pruned_count
from ..scalars import all_step_scalar_values, to_device, write_tensor_lrs
from ..types import PruneEvent, Threshold, UpdateGroup
from . import kernels

INTERPRETED = isinstance(kernels.update_kernel, InterpretedFunction)
DTYPE_CODES = {dtype: code for code, dtype in enumerate(KERNEL_DTYPES)}

# Elements (tensors for prepare, bins for select) per program; "ranking": the comparisons of an
# N:M block's ranking, [groups × lane × lane] (lanes: M rounded up to a power of two), which set
# its groups per program. On a GPU: 16 elements per thread of 4 warps in the update, 4 vector
# loads per operand, and 64 comparisons per thread in the ranking. The interpreter pays per
# program instance and per operation, not per element (an update program costs about 25 ms), so
# it gets larger blocks (4096 still splits a 4097-element tensor into a full and a tail block).
GPU_BLOCKS = {"update": 2048, "value": 4096, "prepare": 128, "select": 4096, "ranking": 8192}
INTERPRETER_BLOCKS = {"update": 4096, "value": 4096, "prepare": 1024, "select": 1 << 16,
                      "ranking": 1 << 16}
BLOCKS = INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS
UPDATE_BLOCK, VALUE_BLOCK = BLOCKS["update"], BLOCKS["value"]
PREPARE_BLOCK, SELECT_CHUNK = BLOCKS["prepare"], BLOCKS["select"]
# Triton's defaults, multiply-add fusion included (docs/spec.md §4 allows it; kernels.py writes
# the multiply-adds of csrc/core/step.h out as tl.fma).
LAUNCH_OPTIONS: dict = {}
TABLE_CACHE_SIZE = 16


def _block_table(numels: list[int], block: int) -> tuple[torch.Tensor, int]:
    """int32 rows (tensor index, block index within the tensor), one per program."""
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    tensor_ids = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    within = torch.arange(tensor_ids.numel()) - torch.repeat_interleave(first_block, counts)
    return torch.stack([tensor_ids, within], dim=1).to(torch.int32), tensor_ids.numel()


def _aligned(addresses) -> bool:
    return all(address % 16 == 0 for address in addresses)


def pattern_constexprs(pattern: NMPattern | None) -> dict:
    """histogram_kernel's and threshold_kernel's constexprs for a pool's pattern: BLOCK elements
    per program and, for N:M, the group size M, its lanes (M rounded up to a power of two) and
    the candidates per group. An N:M block is a power of two of whole groups, at least 8 so that
    it covers whole keep-mask bytes (csrc/cpu/kernels.cpp block_length)."""
    if pattern is None:
        return dict(BLOCK=VALUE_BLOCK, GROUP_SIZE=0, GROUP_TILE=1, PRUNABLE=0)
    lanes = triton.next_power_of_2(pattern.m)
    groups = max(8, BLOCKS["ranking"] // (lanes * lanes))
    return dict(BLOCK=groups * pattern.m, GROUP_SIZE=pattern.m, GROUP_TILE=lanes,
                PRUNABLE=pattern.prunable)


@dataclass
class _Launch:
    """The tables of one launch over the tensors of one dtype (pair)."""
    dtypes: tuple[int, ...]
    table: torch.Tensor    # int64, one row per tensor
    blocks: torch.Tensor   # int32 (tensor, block), one row per program
    num_blocks: int
    aligned: bool          # every address 16-byte aligned: 128-bit loads


@dataclass
class _StepPlan:
    prepare_table: torch.Tensor  # int64 (step address, group), one row per tensor of the step
    rows: torch.Tensor           # float32 per-tensor scalars written by prepare_kernel
    num_tensors: int
    launches: list[_Launch]


@dataclass
class _Workspace:
    """Per device: the radix histograms, a pair per pool ([pools × bins]), all zero between uses
    (select_kernel re-zeroes them)."""
    high_histograms: torch.Tensor
    low_histograms: torch.Tensor

    @property
    def pools(self) -> int:
        return self.high_histograms.shape[0]


class _LruCache:
    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.builds = 0

    def get(self, key, build: Callable):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = build()
        self.builds += 1
        self.entries[key] = value
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


@dataclass
class _Entry:
    group: int
    pool: int    # the event whose level-0 histogram the update counts it into, -1: none
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    keep_mask: torch.Tensor | None
    step: torch.Tensor


class TritonBackend:
    name = "triton"
    # The optimizer keeps step counts on the parameters' device, so a GPU step is capturable.
    steps_on_device = True
    ranks_across_processes = True
    schedules_on_device = True
    ranks_nm_pools = True   # PruneEvent.pattern may be N:M

    def __init__(self):
        self._plans = _LruCache(TABLE_CACHE_SIZE)
        self._value_tables = _LruCache(TABLE_CACHE_SIZE)
        self._workspaces: dict[torch.device, _Workspace] = {}

    # ---- checks ---------------------------------------------------------------------------------

    def check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            self._check_device_type(p.device, "parameter")
            check_parameter(p, self.name)

    @staticmethod
    def _check_device_type(device: torch.device, what: str) -> None:
        if INTERPRETED:
            if device.type != "cpu":
                raise ValueError(f"the triton backend runs through the Triton interpreter "
                                 f"(TRITON_INTERPRET=1), which takes CPU tensors; got a {what} on "
                                 f"{device}")
        elif device.type != "cuda":
            raise ValueError(f"the triton backend takes CUDA tensors, got a {what} on {device} "
                             f"(set TRITON_INTERPRET=1 before importing triton to run it on CPU "
                             f"tensors through the interpreter)")

    def _entries(self, groups: list[UpdateGroup], events: list[PruneEvent],
                 device: torch.device) -> list[_Entry]:
        entries = []
        for g, group in enumerate(groups):
            check_step_lists(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs,
                             group.state_steps, group.keep_masks, device)
            if group.event is not None and not 0 <= group.event < len(events):
                raise ValueError(f"UpdateGroup.event {group.event} names none of the step's "
                                 f"{len(events)} events")
            # An N:M pool counts its ranking keys in histogram_kernel, whole groups at a time.
            counted = group.event is not None and events[group.event].pattern is None
            for i, p in enumerate(group.params):
                step = group.state_steps[i]
                if step.dtype != torch.float32 or step.device != device:
                    raise ValueError(f"mgpp: state_steps[{i}] must be a float32 tensor on "
                                     f"{device}, got {step.dtype} on {step.device}")
                entries.append(_Entry(g, group.event if counted else -1, p, group.grads[i],
                                      group.exp_avgs[i], group.exp_avg_sqs[i],
                                      group.keep_masks[i] if group.keep_masks else None, step))
        return entries

    def _check_event(self, event: PruneEvent, device: torch.device,
                     schedule: DeviceSchedule | None = None) -> None:
        pattern = event.pattern
        for i, p in enumerate(event.params):
            check_tensor(p, device, "candidates", i)
            check_kernel_dtype(p.dtype, "candidates")
            if pattern is not None and (p.dim() == 0 or p.shape[-1] % pattern.m != 0):
                raise ValueError(f"mgpp: candidates[{i}] of shape {tuple(p.shape)} does not "
                                 f"split into groups of {pattern.m} along its last dimension")
        if (event.k is None) != (schedule is not None):
            raise ValueError("a step on the device schedule takes its k from the schedule "
                             "(PruneEvent.k None), any other step an int k")
        if schedule is not None and len(event.keep_masks) != len(event.params):
            raise ValueError("a step on the device schedule needs a keep mask per candidate")
        # With a process group, k ranks every rank's shards (the optimizer checks it against N).
        numel = sum(p.numel() for p in event.params)
        if pattern is not None:
            numel = numel // pattern.m * pattern.prunable
        if event.process_group is None and event.k is not None and not 1 <= event.k <= numel:
            raise ValueError(f"k must be in [1, {numel}] (the number of candidate elements), got "
                             f"{event.k}")
        if event.keep_masks:
            if len(event.keep_masks) != len(event.params):
                raise ValueError("mgpp: keep_masks must be empty or one per tensor")
            for i, (mask, p) in enumerate(zip(event.keep_masks, event.params)):
                check_mask(mask, p, device, i)

    @staticmethod
    def _device_of(groups: list[UpdateGroup], events: list[PruneEvent]) -> torch.device | None:
        """The device of the step's first tensor; every other tensor is checked against it."""
        for params in [group.params for group in groups] + [event.params for event in events]:
            if params:
                return params[0].device
        return None

    # ---- the step -------------------------------------------------------------------------------

    def step(self, groups: list[UpdateGroup], events: list[PruneEvent],
             grad_scale: torch.Tensor | None,
             schedule: DeviceSchedule | None = None) -> list[Threshold] | None:
        device = self._device_of(groups, events)
        if device is None and schedule is not None:
            device = schedule.position.device   # no tensor this step: t still advances
        if device is None:
            return []
        self._check_device_type(device, "tensor")
        entries = self._entries(groups, events, device)
        for event in events:
            self._check_event(event, device, schedule)
        if schedule is not None and events and len(events) != len(schedule.pools):
            raise ValueError(f"a step on the device schedule takes one event per pool of the "
                             f"schedule ({len(schedule.pools)}), got {len(events)}")
        for name, value in (("grad_scale", grad_scale),
                            ("found_inf", schedule.found_inf if schedule else None)):
            if value is not None and (value.numel() != 1 or value.device != device
                                      or not value.is_floating_point()):
                raise ValueError(f"{name} must be a one-element floating tensor on {device}")
        scheduled = schedule is not None
        thresholds = []
        with self._on(device):
            try:
                scalars, currents, event_rows, ranks = self._stage(groups, events, schedule,
                                                                   device)
                workspace = self._workspace(device, len(events))
                if entries:
                    self._update(entries, scalars, grad_scale, workspace, currents, scheduled)
                for j, event in enumerate(events):
                    if scheduled:
                        selection, tau = schedule.pools[j].selection, schedule.pools[j].tau
                    else:
                        selection = torch.empty(NUM_SELECTION_SLOTS, dtype=torch.int64,
                                                device=device)
                        tau = torch.empty((), dtype=torch.float32, device=device)
                    counted = {id(e.param) for e in entries if e.pool == j}
                    uncounted = [p for p in event.params if id(p) not in counted]
                    self._select(event.params, uncounted, event.keep_masks, ranks[j], selection,
                                 tau, workspace.high_histograms[j], workspace.low_histograms[j],
                                 event_rows[j], scheduled, event.process_group, event.pattern)
                    self._threshold(event, selection, event_rows[j], scheduled)
                    if not scheduled:
                        thresholds.append(Threshold(
                            tau=tau, pruned=pruned_count(selection, event.pattern is not None)))
            except BaseException:
                # A failed launch may leave counts in the histograms: start clean next time.
                self._workspaces.pop(device, None)
                raise
        return None if scheduled else thresholds

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        event = PruneEvent(params=tensors, k=k)
        device = self._device_of([], [event])
        if device is None:
            raise ValueError("k must be in [1, 0] (the number of candidate elements): no tensors")
        self._check_device_type(device, "tensor")
        self._check_event(event, device)
        with self._on(device):
            try:
                rank = to_device(torch.tensor([float(k)], dtype=torch.float64), device)
                selection = torch.empty(NUM_SELECTION_SLOTS, dtype=torch.int64, device=device)
                tau = torch.empty((), dtype=torch.float32, device=device)
                workspace = self._workspace(device, 1)
                self._select(tensors, tensors, [], rank, selection, tau,
                             workspace.high_histograms[0], workspace.low_histograms[0], rank,
                             scheduled=False)
            except BaseException:
                self._workspaces.pop(device, None)
                raise
        return tau

    # ---- pieces ---------------------------------------------------------------------------------

    @staticmethod
    def _on(device: torch.device):
        if device.type == "cuda":
            return torch.cuda.device(device)
        # The interpreter runs the kernels in numpy, which warns where the float math overflows
        # on purpose (exp of the prior to +inf) as the kernels on a GPU do silently.
        return numpy.errstate(over="ignore", invalid="ignore", divide="ignore")

    def _workspace(self, device: torch.device, pools: int) -> _Workspace:
        """The device's histograms for at least `pools` pools (one at least)."""
        workspace = self._workspaces.get(device)
        if workspace is None or workspace.pools < pools:
            high, low = (torch.zeros((max(pools, 1), bins.value), dtype=torch.int64,
                                     device=device)
                         for bins in (kernels.HIGH_BINS, kernels.LOW_BINS))
            workspace = self._workspaces[device] = _Workspace(high_histograms=high,
                                                              low_histograms=low)
        return workspace

    @staticmethod
    def _stage(groups: list[UpdateGroup], events: list[PruneEvent],
               schedule: DeviceSchedule | None, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The step's values on the device: (the groups' step scalars, the step's rows
        `currents`, each event's row, each event's float64 k that ranks τ). On the host schedule
        the scalars and the ks are staged in one copy, and the rows, which the kernels then never
        read, are the scalars. On the device schedule the scalars are the schedule's persistent
        buffer and schedule_kernel writes each pool's row (schedule.currents), k included."""
        if schedule is None:
            values = all_step_scalar_values(groups)
            first_k = len(values)
            values += [float(event.k) for event in events]
            scalars = to_device(torch.tensor(values, dtype=torch.float64), device)
            write_tensor_lrs(groups, scalars)
            ranks = [scalars[first_k + j:first_k + j + 1] for j in range(len(events))]
            return scalars, scalars, [scalars] * len(events), ranks
        scalars = schedule.stage_scalars(groups, device)
        for pool in schedule.pools:
            kernels.schedule_kernel[(1,)](
                pool.table, pool.table.shape[0], pool.position,
                schedule.found_inf if schedule.found_inf is not None else pool.current,
                pool.current, HAS_FOUND_INF=schedule.found_inf is not None, **LAUNCH_OPTIONS)
        rows = [pool.current for pool in schedule.pools[:len(events)]]
        return scalars, schedule.currents, rows, [row[kernels.C_K.value:] for row in rows]

    def _update(self, entries: list[_Entry], scalars: torch.Tensor,
                grad_scale: torch.Tensor | None, workspace: _Workspace, currents: torch.Tensor,
                scheduled: bool) -> None:
        device = entries[0].param.device
        key = (device, tuple(
            (e.group, e.pool, e.param.data_ptr(), e.grad.data_ptr(), e.exp_avg.data_ptr(),
             e.exp_avg_sq.data_ptr(), 0 if e.keep_mask is None else e.keep_mask.data_ptr(),
             e.step.data_ptr(), e.param.numel(), e.param.dtype, e.exp_avg.dtype)
            for e in entries))
        plan = self._plans.get(key, lambda: self._build_plan(entries, device))
        kernels.prepare_kernel[(triton.cdiv(plan.num_tensors, PREPARE_BLOCK),)](
            plan.prepare_table, scalars, grad_scale if grad_scale is not None else scalars,
            plan.rows, plan.num_tensors, currents, HAS_GRAD_SCALE=grad_scale is not None,
            SCHEDULED=scheduled, BLOCK=PREPARE_BLOCK, **LAUNCH_OPTIONS)
        counts = any(e.pool >= 0 for e in entries)
        for launch in plan.launches:
            kernels.update_kernel[(launch.num_blocks,)](
                launch.table, launch.blocks, plan.rows, workspace.high_histograms, currents,
                PARAM_DTYPE=launch.dtypes[0], STATE_DTYPE=launch.dtypes[1], COUNT=counts,
                SCHEDULED=scheduled, ALIGNED=launch.aligned, BLOCK=UPDATE_BLOCK,
                **LAUNCH_OPTIONS)

    @staticmethod
    def _build_plan(entries: list[_Entry], device: torch.device) -> _StepPlan:
        prepare = [[e.step.data_ptr(), e.group] for e in entries]
        by_dtypes: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(entries):
            pair = (DTYPE_CODES[e.param.dtype], DTYPE_CODES[e.exp_avg.dtype])
            by_dtypes.setdefault(pair, []).append(i)
        launches = []
        for pair, indices in by_dtypes.items():
            rows = []
            for i in indices:
                e = entries[i]
                rows.append([e.param.data_ptr(), e.grad.data_ptr(), e.exp_avg.data_ptr(),
                             e.exp_avg_sq.data_ptr(),
                             0 if e.keep_mask is None else e.keep_mask.data_ptr(),
                             e.param.numel(), i, e.pool])
            blocks, num_blocks = _block_table([row[kernels.U_NUMEL.value] for row in rows],
                                              UPDATE_BLOCK)
            if num_blocks == 0:
                continue  # only empty tensors: their step counts still advance in prepare_kernel
            addresses = [address for row in rows for address in row[:kernels.U_KEEP_MASK.value]]
            launches.append(_Launch(pair, to_device(torch.tensor(rows, dtype=torch.int64), device),
                                    to_device(blocks, device), num_blocks, _aligned(addresses)))
        return _StepPlan(
            prepare_table=to_device(torch.tensor(prepare, dtype=torch.int64), device),
            rows=torch.empty((len(entries), kernels.ROW_WIDTH.value), dtype=torch.float32,
                             device=device),
            num_tensors=len(entries), launches=launches)

    def _threshold(self, event: PruneEvent, selection: torch.Tensor, current: torch.Tensor,
                   scheduled: bool) -> None:
        """Zeroes the candidates below τ (N:M: at τ too), writing their keep masks when the
        event has them."""
        constexprs = pattern_constexprs(event.pattern)
        for launch in self._value_launches(event.params, event.keep_masks, constexprs["BLOCK"]):
            kernels.threshold_kernel[(launch.num_blocks,)](
                launch.table, launch.blocks, selection, current, DTYPE=launch.dtypes[0],
                WRITE_MASKS=bool(event.keep_masks), SCHEDULED=scheduled, ALIGNED=launch.aligned,
                **constexprs, **LAUNCH_OPTIONS)

    def _value_launches(self, tensors: list[torch.Tensor], keep_masks: list[torch.Tensor],
                        block: int) -> list[_Launch]:
        """Launches of histogram_kernel / threshold_kernel over `tensors`, one per dtype, in
        blocks of `block` elements."""
        masks = [m.data_ptr() for m in keep_masks] if keep_masks else [0] * len(tensors)
        key = (block, tuple((t.device, t.data_ptr(), t.numel(), t.dtype, mask)
                            for t, mask in zip(tensors, masks)))

        def build() -> list[_Launch]:
            by_dtype: dict[int, list[list[int]]] = {}
            for t, mask in zip(tensors, masks):
                by_dtype.setdefault(DTYPE_CODES[t.dtype], []).append(
                    [t.data_ptr(), t.numel(), mask])
            launches = []
            for code, rows in by_dtype.items():
                blocks, num_blocks = _block_table([row[kernels.V_NUMEL.value] for row in rows],
                                                  block)
                if num_blocks == 0:
                    continue
                device = tensors[0].device
                launches.append(_Launch(
                    (code,), to_device(torch.tensor(rows, dtype=torch.int64), device),
                    to_device(blocks, device), num_blocks,
                    _aligned(row[kernels.V_DATA.value] for row in rows)))
            return launches

        return self._value_tables.get(key, build)

    def _select(self, tensors: list[torch.Tensor], uncounted: list[torch.Tensor],
                keep_masks: list[torch.Tensor], rank: torch.Tensor, selection: torch.Tensor,
                tau: torch.Tensor, high_histogram: torch.Tensor, low_histogram: torch.Tensor,
                current: torch.Tensor, scheduled: bool, process_group=None,
                pattern: NMPattern | None = None) -> None:
        """Radix selection of τ, the rank[0]-th smallest |x| over `tensors` (N:M: over each
        group's candidates), on the device, into `selection` ([rank, key, below, equal]) and
        `tau` (0-dim float32), with the pool's histograms.

        The level-0 histogram already counts every tensor not in `uncounted` (the update pass
        did). `scheduled`: only when `current` says this step prunes. With a process group,
        `tensors` are this rank's shards and rank[0] ranks over every rank's: each level's
        histogram is summed over the group (an all-reduce on the device, with any
        torch.distributed backend) before its selection, so every rank selects the same τ and
        the same global `below` without sending a weight. On the device schedule the all-reduces
        run at every step (on zero histograms when it does not prune): the launch sequence stays
        the same.
        """
        constexprs = pattern_constexprs(pattern)
        for launch in self._value_launches(uncounted, [], constexprs["BLOCK"]):
            kernels.histogram_kernel[(launch.num_blocks,)](
                launch.table, launch.blocks, high_histogram, selection, current,
                DTYPE=launch.dtypes[0], LEVEL=0, SCHEDULED=scheduled, ALIGNED=launch.aligned,
                **constexprs, **LAUNCH_OPTIONS)
        if process_group is not None:
            torch.distributed.all_reduce(high_histogram, group=process_group)
        kernels.select_kernel[(1,)](high_histogram, selection, rank, tau, current,
                                    LEVEL=0, SCHEDULED=scheduled, BINS=kernels.HIGH_BINS.value,
                                    CHUNK=SELECT_CHUNK, **LAUNCH_OPTIONS)
        # bfloat16 keys have no bits below the first level: τ is already exact. Another rank's
        # shards may have other dtypes, so a process group always takes the second level (on
        # bfloat16 keys it selects low bits 0, the same τ).
        if process_group is not None or any(t.dtype != torch.bfloat16 for t in tensors):
            for launch in self._value_launches(tensors, keep_masks, constexprs["BLOCK"]):
                kernels.histogram_kernel[(launch.num_blocks,)](
                    launch.table, launch.blocks, low_histogram, selection, current,
                    DTYPE=launch.dtypes[0], LEVEL=1, SCHEDULED=scheduled, ALIGNED=launch.aligned,
                    **constexprs, **LAUNCH_OPTIONS)
            if process_group is not None:
                torch.distributed.all_reduce(low_histogram, group=process_group)
            kernels.select_kernel[(1,)](low_histogram, selection, rank, tau, current,
                                        LEVEL=1, SCHEDULED=scheduled,
                                        BINS=kernels.LOW_BINS.value,
                                        CHUNK=min(SELECT_CHUNK, kernels.LOW_BINS.value),
                                        **LAUNCH_OPTIONS)


BACKEND = TritonBackend()
