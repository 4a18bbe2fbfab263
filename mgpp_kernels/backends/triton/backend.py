"""The triton backend: the MGPP step as Triton kernels (mgpp_kernels/backends/triton/kernels.py).

A step is a fixed, short sequence of launches whatever the number of tensors, in four parts
(`_stage`, `_update`, `_select`, `_threshold`):

0. On the device schedule, ``schedule_kernel`` (1 launch) writes the step's row (below).
1. ``prepare_kernel`` (1 launch): every tensor's step count k += 1, and its float32 AdamW scalars
   (bias corrections in float64) and prior constants into a per-tensor row.
2. ``update_kernel`` (1 launch per (parameter dtype, state dtype) pair): prior gradient + AdamW +
   frozen mask for all tensors of the pair; on an event step it also counts the level-0
   histogram of the candidates' |θ_new|.
3. On an event: ``histogram_kernel`` level 0 for candidates without a gradient (1 per dtype, only
   when there are any), ``select_kernel`` level 0, ``histogram_kernel`` level 1 (1 per dtype;
   skipped when every candidate is bfloat16, whose keys have no low bits, and there is no process
   group) and ``select_kernel`` level 1, then ``threshold_kernel`` (1 per dtype), which also
   writes the keep masks at the freeze. With ``process_group=``, each level's histogram is
   all-reduced on the device before its selection (weights never leave the rank).

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
  GradScaler's scale and the rank k.
- A step given a DeviceSchedule (the optimizer's, with capturable=True or once a GradScaler
  hands it found_inf): ``schedule_kernel`` first reads t and found_inf on the device and writes the
  step's row (prior on/off, λ_t's c1, k, freeze, skip) from a table of every t; every later kernel
  reads that row, so the event kernels run at every step and return at once when it does not
  prune, a skipped step writes nothing and advances neither k nor t, and the candidates' masks
  (all ones until the freeze writes them) apply at every step. The step scalars live in the
  schedule's persistent buffer, copied from pinned memory only when a host value changes. So
  every step launches the same kernels with the same arguments on the same memory (the
  tables are cached by address), which a captured graph replays for any t.
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
from ..device_schedule import DeviceSchedule, pruned_count
from ..scalars import all_step_scalar_values, to_device, write_tensor_lrs
from ..types import PruneEvent, Threshold, UpdateGroup
from . import kernels

INTERPRETED = isinstance(kernels.update_kernel, InterpretedFunction)
DTYPE_CODES = {dtype: code for code, dtype in enumerate(KERNEL_DTYPES)}

# Elements (tensors for prepare, bins for select) per program. On a GPU: 16 elements per thread
# of 4 warps in the update, 4 vector loads per operand. The interpreter pays per program instance
# and per operation, not per element (an update program costs about 25 ms), so it gets larger
# blocks (4096 still splits a 4097-element tensor into a full and a tail block).
GPU_BLOCKS = {"update": 2048, "value": 4096, "prepare": 128, "select": 4096}
INTERPRETER_BLOCKS = {"update": 4096, "value": 4096, "prepare": 1024, "select": 1 << 16}
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
    """Per device: the radix histograms, all zero between uses (select_kernel re-zeroes them)."""
    high_histogram: torch.Tensor
    low_histogram: torch.Tensor


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
    count: bool
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
    # The Triton kernels rank unstructured pools only.
    ranks_nm_pools = False

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

    def _entries(self, groups: list[UpdateGroup], device: torch.device) -> list[_Entry]:
        entries = []
        for g, group in enumerate(groups):
            check_step_lists(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs,
                             group.state_steps, group.keep_masks, device)
            for i, p in enumerate(group.params):
                step = group.state_steps[i]
                if step.dtype != torch.float32 or step.device != device:
                    raise ValueError(f"mgpp: state_steps[{i}] must be a float32 tensor on "
                                     f"{device}, got {step.dtype} on {step.device}")
                entries.append(_Entry(g, group.event == 0, p, group.grads[i], group.exp_avgs[i],
                                      group.exp_avg_sqs[i],
                                      group.keep_masks[i] if group.keep_masks else None, step))
        return entries

    def _check_event(self, event: PruneEvent, device: torch.device,
                     schedule: DeviceSchedule | None = None) -> None:
        for i, p in enumerate(event.params):
            check_tensor(p, device, "candidates", i)
            check_kernel_dtype(p.dtype, "candidates")
        if (event.k is None) != (schedule is not None):
            raise ValueError("a step on the device schedule takes its k from the schedule "
                             "(PruneEvent.k None), any other step an int k")
        if schedule is not None and len(event.keep_masks) != len(event.params):
            raise ValueError("a step on the device schedule needs a keep mask per candidate")
        # With a process group, k ranks every rank's shards (the optimizer checks it against N).
        numel = sum(p.numel() for p in event.params)
        if event.process_group is None and event.k is not None and not 1 <= event.k <= numel:
            raise ValueError(f"k must be in [1, {numel}] (the number of candidate elements), got "
                             f"{event.k}")
        if event.keep_masks:
            if len(event.keep_masks) != len(event.params):
                raise ValueError("mgpp: keep_masks must be empty or one per tensor")
            for i, (mask, p) in enumerate(zip(event.keep_masks, event.params)):
                check_mask(mask, p, device, i)

    @staticmethod
    def _device_of(groups: list[UpdateGroup],
                   events: list[PruneEvent]) -> torch.device | None:
        """The device of the step's first tensor; every other tensor is checked against it."""
        for group in groups:
            if group.params:
                return group.params[0].device
        for event in events:
            if event.params:
                return event.params[0].device
        return None

    # ---- the step -------------------------------------------------------------------------------

    def step(self, groups: list[UpdateGroup], events: list[PruneEvent],
             grad_scale: torch.Tensor | None,
             schedule: DeviceSchedule | None = None) -> list[Threshold] | None:
        """The update, then each event's selection and threshold, one pool after the other.
        The update pass counts the level-0 histogram of the first event's pool; every other
        pool's is counted by histogram_kernel. Event j's buffers on the device schedule are
        schedule.pools[j]'s."""
        if any(event.pattern is not None for event in events):
            raise ValueError("the triton backend ranks unstructured pools only")
        device = self._device_of(groups, events)
        if device is None and schedule is not None:
            device = schedule.position.device   # no tensor this step: t still advances
        if device is None:
            return None if schedule is not None else []
        self._check_device_type(device, "tensor")
        entries = self._entries(groups, device)
        for event in events:
            self._check_event(event, device, schedule)
        for name, value in (("grad_scale", grad_scale),
                            ("found_inf", schedule.found_inf if schedule else None)):
            if value is not None and (value.numel() != 1 or value.device != device
                                      or not value.is_floating_point()):
                raise ValueError(f"{name} must be a one-element floating tensor on {device}")
        scheduled = schedule is not None
        thresholds = []
        with self._on(device):
            try:
                scalars, currents, ranks = self._stage(groups, events, schedule, device)
                workspace = self._workspace(device)
                if entries:
                    self._update(entries, scalars, grad_scale, workspace, currents[0],
                                 count=bool(events), scheduled=scheduled)
                for j, event in enumerate(events):
                    counted = {id(e.param) for e in entries if e.count} if j == 0 else set()
                    uncounted = [p for p in event.params if id(p) not in counted]
                    selection, tau = ((schedule.pools[j].selection, schedule.pools[j].tau)
                                      if scheduled else
                                      (torch.empty(NUM_SELECTION_SLOTS, dtype=torch.int64,
                                                   device=device),
                                       torch.empty((), dtype=torch.float32, device=device)))
                    self._select(event.params, uncounted, event.keep_masks, ranks[j], selection,
                                 tau, workspace, currents[j], scheduled, event.process_group)
                    self._threshold(event, selection, currents[j], scheduled)
                    thresholds.append(Threshold(tau=tau, pruned=pruned_count(selection, False)))
            except BaseException:
                # A failed launch may leave counts in the histograms: start clean next time.
                self._workspaces.pop(device, None)
                raise
        return None if scheduled else thresholds

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        device = self._device_of([], [PruneEvent(params=tensors, k=k)])
        if device is None:
            raise ValueError("k must be in [1, 0] (the number of candidate elements): no tensors")
        self._check_device_type(device, "tensor")
        self._check_event(PruneEvent(params=tensors, k=k), device)
        with self._on(device):
            try:
                rank = to_device(torch.tensor([float(k)], dtype=torch.float64), device)
                selection = torch.empty(NUM_SELECTION_SLOTS, dtype=torch.int64, device=device)
                tau = torch.empty((), dtype=torch.float32, device=device)
                self._select(tensors, tensors, [], rank, selection, tau, self._workspace(device),
                             rank, scheduled=False)
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

    def _workspace(self, device: torch.device) -> _Workspace:
        if device not in self._workspaces:
            high, low = (torch.zeros(bins.value, dtype=torch.int64, device=device)
                         for bins in (kernels.HIGH_BINS, kernels.LOW_BINS))
            self._workspaces[device] = _Workspace(high_histogram=high, low_histogram=low)
        return self._workspaces[device]

    @staticmethod
    def _stage(groups: list[UpdateGroup], events: list[PruneEvent],
               schedule: DeviceSchedule | None, device: torch.device
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The step's values on the device: (the groups' step scalars, each event's row
        `current` (at least one), each event's float64 k that ranks τ). On the host schedule the
        scalars and the ks are staged in one copy, and `current`, which the kernels then never
        read, is the scalars. On the device schedule the scalars are the schedule's persistent
        buffer and schedule_kernel writes each pool's row, k included."""
        if schedule is None:
            values = all_step_scalar_values(groups) + [float(e.k) for e in events]
            scalars = to_device(torch.tensor(values, dtype=torch.float64), device)
            write_tensor_lrs(groups, scalars)
            first_k = scalars.numel() - len(events)
            return scalars, [scalars] * max(len(events), 1), [
                scalars[first_k + j:first_k + j + 1] for j in range(len(events))]
        scalars = schedule.stage_scalars(groups, device)
        for pool in schedule.pools:
            kernels.schedule_kernel[(1,)](
                pool.table, pool.table.shape[0], pool.position,
                schedule.found_inf if schedule.found_inf is not None else pool.current,
                pool.current, HAS_FOUND_INF=schedule.found_inf is not None, **LAUNCH_OPTIONS)
        currents = [pool.current for pool in schedule.pools]
        return scalars, currents, [current[kernels.C_K.value:] for current in currents]

    def _update(self, entries: list[_Entry], scalars: torch.Tensor,
                grad_scale: torch.Tensor | None, workspace: _Workspace, current: torch.Tensor,
                count: bool, scheduled: bool) -> None:
        device = entries[0].param.device
        key = (device, tuple(
            (e.group, e.count, e.param.data_ptr(), e.grad.data_ptr(), e.exp_avg.data_ptr(),
             e.exp_avg_sq.data_ptr(), 0 if e.keep_mask is None else e.keep_mask.data_ptr(),
             e.step.data_ptr(), e.param.numel(), e.param.dtype, e.exp_avg.dtype)
            for e in entries))
        plan = self._plans.get(key, lambda: self._build_plan(entries, device))
        kernels.prepare_kernel[(triton.cdiv(plan.num_tensors, PREPARE_BLOCK),)](
            plan.prepare_table, scalars, grad_scale if grad_scale is not None else scalars,
            plan.rows, plan.num_tensors, current, HAS_GRAD_SCALE=grad_scale is not None,
            SCHEDULED=scheduled, BLOCK=PREPARE_BLOCK, **LAUNCH_OPTIONS)
        for launch in plan.launches:
            kernels.update_kernel[(launch.num_blocks,)](
                launch.table, launch.blocks, plan.rows, workspace.high_histogram, current,
                PARAM_DTYPE=launch.dtypes[0], STATE_DTYPE=launch.dtypes[1], COUNT=count,
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
                             e.param.numel(), i, int(e.count)])
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
        """Zeroes the candidates below τ, writing their keep masks when the event has them."""
        for launch in self._value_launches(event.params, event.keep_masks):
            kernels.threshold_kernel[(launch.num_blocks,)](
                launch.table, launch.blocks, selection, current, DTYPE=launch.dtypes[0],
                WRITE_MASKS=bool(event.keep_masks), SCHEDULED=scheduled, ALIGNED=launch.aligned,
                BLOCK=VALUE_BLOCK, **LAUNCH_OPTIONS)

    def _value_launches(self, tensors: list[torch.Tensor],
                        keep_masks: list[torch.Tensor]) -> list[_Launch]:
        """Launches of histogram_kernel / threshold_kernel over `tensors`, one per dtype."""
        masks = [m.data_ptr() for m in keep_masks] if keep_masks else [0] * len(tensors)
        key = tuple((t.device, t.data_ptr(), t.numel(), t.dtype, mask)
                    for t, mask in zip(tensors, masks))

        def build() -> list[_Launch]:
            by_dtype: dict[int, list[list[int]]] = {}
            for t, mask in zip(tensors, masks):
                by_dtype.setdefault(DTYPE_CODES[t.dtype], []).append(
                    [t.data_ptr(), t.numel(), mask])
            launches = []
            for code, rows in by_dtype.items():
                blocks, num_blocks = _block_table([row[kernels.V_NUMEL.value] for row in rows],
                                                  VALUE_BLOCK)
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
                tau: torch.Tensor, workspace: _Workspace, current: torch.Tensor, scheduled: bool,
                process_group=None) -> None:
        """Radix selection of τ, the rank[0]-th smallest |x| over `tensors`, on the device, into
        `selection` ([rank, key, below]) and `tau` (0-dim float32).

        The level-0 histogram already counts every tensor not in `uncounted` (the update pass
        did). `scheduled`: only when `current` says this step prunes. With a process group,
        `tensors` are this rank's shards and rank[0] ranks over every rank's: each level's
        histogram is summed over the group (an all-reduce on the device, with any
        torch.distributed backend) before its selection, so every rank selects the same τ and
        the same global `below` without sending a weight. On the device schedule the all-reduces
        run at every step (on zero histograms when it does not prune): the launch sequence stays
        the same.
        """
        for launch in self._value_launches(uncounted, []):
            kernels.histogram_kernel[(launch.num_blocks,)](
                launch.table, launch.blocks, workspace.high_histogram, selection, current,
                DTYPE=launch.dtypes[0], LEVEL=0, SCHEDULED=scheduled, ALIGNED=launch.aligned,
                BLOCK=VALUE_BLOCK, **LAUNCH_OPTIONS)
        if process_group is not None:
            torch.distributed.all_reduce(workspace.high_histogram, group=process_group)
        kernels.select_kernel[(1,)](workspace.high_histogram, selection, rank, tau, current,
                                    LEVEL=0, SCHEDULED=scheduled, BINS=kernels.HIGH_BINS.value,
                                    CHUNK=SELECT_CHUNK, **LAUNCH_OPTIONS)
        # bfloat16 keys have no bits below the first level: τ is already exact. Another rank's
        # shards may have other dtypes, so a process group always takes the second level (on
        # bfloat16 keys it selects low bits 0, the same τ).
        if process_group is not None or any(t.dtype != torch.bfloat16 for t in tensors):
            for launch in self._value_launches(tensors, keep_masks):
                kernels.histogram_kernel[(launch.num_blocks,)](
                    launch.table, launch.blocks, workspace.low_histogram, selection, current,
                    DTYPE=launch.dtypes[0], LEVEL=1, SCHEDULED=scheduled, ALIGNED=launch.aligned,
                    BLOCK=VALUE_BLOCK, **LAUNCH_OPTIONS)
            if process_group is not None:
                torch.distributed.all_reduce(workspace.low_histogram, group=process_group)
            kernels.select_kernel[(1,)](workspace.low_histogram, selection, rank, tau, current,
                                        LEVEL=1, SCHEDULED=scheduled,
                                        BINS=kernels.LOW_BINS.value,
                                        CHUNK=min(SELECT_CHUNK, kernels.LOW_BINS.value),
                                        **LAUNCH_OPTIONS)


BACKEND = TritonBackend()
