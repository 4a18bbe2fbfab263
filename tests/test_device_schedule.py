"""The schedule on the device (docs/spec.md §2; the cpu, cuda and triton backends): with
capturable=True, or (cuda, triton) once a GradScaler hands step() its found_inf, the kernels read
t, λ_t, the event's k and found_inf on the device. Checked here for every backend of the table
that schedules on the device (triton through the interpreter or on a GPU; cpu through the same
torch.ops.mgpp ops as cuda, whose CUDA kernels read the step's row as csrc/tests/
test_cuda_emulated.cpp checks):

- the run equals the host-scheduled run bit for bit through every stage, with skipped steps at an
  event, at the freeze and after it, mixed dtypes and a candidate without a gradient;
- step() reads no device value on the host (optimizer, schedule and backend watched) with a
  skipping torch.amp.GradScaler;
- every step launches the same kernels on the same memory with the same arguments (what a CUDA
  graph captures and replays), events, the freeze and skipped steps included, and the step's row
  the device writes equals the host's schedule in float64;
- a state_dict taken on the device schedule resumes there and on the host exactly.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

from mgpp_kernels import MGPP
from mgpp_kernels.ops import layout
from mgpp_kernels.schedule import device_schedule_rows

import backends
from compare import assert_runs_identical, assert_schedule_entries_equal
from helpers import SCHEDULE, build_optimizer, clone_params, gradient, make_params, run_steps

ROWS = [row for row in backends.KERNELS if row.schedules_on_device]
OVER_ROWS = pytest.mark.parametrize("row", backends.params(ROWS))

# Candidates in three dtypes (4097: a full and a tail block), one non-candidate.
SHAPES = [(33, 65), (7,), (1,), (4097,), (13,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
PRUNE = [True, True, True, True, False]
# Skipped iterations land on t = 4 (the first event), 7 (an event), 24 (the freeze) and 26.
SKIPPED_AT_T = (4, 7, 24, 26)
NO_GRAD = (1, 14)   # (parameter, t): a candidate without a gradient at the event of t = 14


def has_grad(t, i):
    return (i, t) != NO_GRAD


def run_on_device(optimizer, params, stop, start=0, skipped=SKIPPED_AT_T, grads=has_grad,
                  lr_decay=None, on_step=None):
    """Steps t = start..stop-1 through optimizer.grad_scale / found_inf as GradScaler sets them
    (scale 2^10, exact), with one extra skipped step (inf gradients, found_inf = 1) before each t
    in `skipped`; parameter i has a gradient at t where grads(t, i). The gradients, the scale and
    found_inf are written in place, as in a captured graph. Returns the number of step() calls."""
    device = params[0].device
    scale = torch.tensor(1024.0, device=device)
    found_inf = torch.tensor(0.0, device=device)
    calls = 0
    for t in range(start, stop):
        for skip in ((True, False) if t in skipped else (False,)):
            for i, p in enumerate(params):
                if not grads(t, i):
                    p.grad = None
                    continue
                grad = (torch.full_like(p, float("inf")) if skip
                        else (gradient(t, i, p).float() * 1024.0).to(p.dtype))
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.copy_(grad)
            found_inf.fill_(1.0 if skip else 0.0)
            optimizer.grad_scale, optimizer.found_inf = scale, found_inf
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
            calls += 1
            if on_step is not None:
                on_step(t, skip)
        if lr_decay is not None:
            lr_decay()
    return calls


def host_run(row, stop, lr=1e-3):
    params = make_params(SHAPES, DTYPES, seed=5, device=row.device)
    optimizer = build_optimizer(params, row, PRUNE, lr=lr)
    run_steps(optimizer, params, 0, stop, has_grad=has_grad)
    return params, optimizer


def assert_same_schedule_view(a, b):
    assert a.stats() == b.stats()
    assert_schedule_entries_equal(a.state_dict()["mgpp"], b.state_dict()["mgpp"])


@OVER_ROWS
def test_capturable_run_equals_the_host_run_bit_for_bit(row):
    expected_params, expected = host_run(row, SCHEDULE["total_steps"])
    params = make_params(SHAPES, DTYPES, seed=5, device=row.device)
    optimizer = build_optimizer(params, row, PRUNE, capturable=True)
    calls = run_on_device(optimizer, params, SCHEDULE["total_steps"])
    assert calls == SCHEDULE["total_steps"] + len(SKIPPED_AT_T)
    assert_runs_identical(params, optimizer, expected_params, expected)
    assert_same_schedule_view(optimizer, expected)
    assert optimizer.stats()["stage"] == "frozen"


@OVER_ROWS
def test_found_inf_moves_the_schedule_to_the_device_where_steps_live_there(row):
    """Without capturable=True, the first step with found_inf moves t to the device (from the
    host's position) on a backend that keeps its step counts there (reading found_inf on the
    host would wait for the device), and the run goes on exactly as on the host. The cpu backend
    reads found_inf for free and keeps the host schedule."""
    expected_params, expected = host_run(row, SCHEDULE["total_steps"])
    params = make_params(SHAPES, DTYPES, seed=5, device=row.device)
    optimizer = build_optimizer(params, row, PRUNE)
    run_steps(optimizer, params, 0, 10, has_grad=has_grad)
    assert not optimizer._device_schedule.started
    run_on_device(optimizer, params, SCHEDULE["total_steps"], start=10)
    assert optimizer._device_schedule.started == row.load().steps_on_device
    assert_runs_identical(params, optimizer, expected_params, expected)
    assert_same_schedule_view(optimizer, expected)


def _backend_files(row) -> list[str]:
    """The Python files of a backend, which step() runs through."""
    from mgpp_kernels.backends import device_schedule, scalars
    shared = [device_schedule.__file__, scalars.__file__]
    if row.name == "triton":
        from mgpp_kernels.backends.triton import backend, kernels
        return [backend.__file__, kernels.__file__] + shared
    from mgpp_kernels import ops
    from mgpp_kernels.backends import kernel_ops
    module = importlib.import_module(f"mgpp_kernels.backends.{row.name}")
    return [kernel_ops.__file__, module.__file__, ops.__file__] + shared


@OVER_ROWS
def test_step_reads_nothing_on_the_host_with_a_skipping_grad_scaler(row, forbid_host_reads,
                                                                     monkeypatch):
    from mgpp_kernels import config, optimizer as optimizer_module, schedule, sharding
    device = row.device

    def train(with_scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 4)).to(device)
        # The cpu backend takes the device schedule when asked; cuda and triton take it from
        # the GradScaler's first found_inf.
        optimizer = MGPP([{"params": [model[0].weight, model[2].weight], "prune": True},
                          {"params": [model[0].bias, model[2].bias]}], lr=1e-2,
                         backend=row.name, num_train_examples=100, initial_warmup_steps=2,
                         total_steps=10, final_warmup_steps=2, pruning_interval=2,
                         capturable=with_scaler and row.name == "cpu")
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=1000)
        inputs = torch.randn(12, 8, 16, generator=torch.Generator().manual_seed(1)).to(device)
        for iteration in range(12):
            skipped = iteration in (2, 8)   # at t_i = 2 (an event) and at the freeze, t = 7
            if skipped and not with_scaler:
                continue
            optimizer.zero_grad()
            loss = model(inputs[iteration]).square().mean()
            if not with_scaler:
                loss.backward()
                optimizer.step()
                continue
            scaler.scale(loss).backward()
            if skipped:
                model[2].bias.grad[0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
        return model, optimizer

    expected_model, expected = train(with_scaler=False)
    forbid_host_reads([optimizer_module.__file__, schedule.__file__, sharding.__file__,
                       config.__file__, layout.__file__] + _backend_files(row))
    model, optimizer = train(with_scaler=True)
    monkeypatch.undo()   # stats() and state_dict() may read the device
    assert optimizer._device_schedule.started
    assert optimizer.stats()["step"] == 10
    assert_runs_identical(list(model.parameters()), optimizer,
                          list(expected_model.parameters()), expected)


class LaunchRecorder:
    """Wraps every Triton kernel of the backend and records each launch: the kernel, its grid,
    and its arguments, a tensor as (address, dtype, shape)."""

    def __init__(self, monkeypatch):
        from mgpp_kernels.backends.triton import kernels
        self.launches = []
        for name in ("schedule_kernel", "prepare_kernel", "update_kernel", "histogram_kernel",
                     "select_kernel", "threshold_kernel"):
            monkeypatch.setattr(kernels, name, self._recording(name, getattr(kernels, name)))

    def _recording(self, name, kernel):
        recorder = self

        class Recording:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((name, tuple(grid), tuple(map(_recorded, args)),
                                              tuple(sorted((k, _recorded(v))
                                                           for k, v in kwargs.items()))))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Recording()

    def take(self):
        launches, self.launches = self.launches, []
        return launches


class OpsRecorder:
    """Wraps every torch.ops.mgpp wrapper of mgpp_kernels.ops that the cpu and cuda backends
    call and records each call: the op and its arguments, a tensor as (address, dtype, shape)."""

    def __init__(self, monkeypatch):
        from mgpp_kernels import ops
        self.launches = []
        for name in ("schedule_step_", "fused_step_", "abs_histogram_", "radix_select_",
                     "apply_threshold_", "partition_at_bin_", "prune_collected_"):
            monkeypatch.setattr(ops, name, self._recording(name, getattr(ops, name)))

    def _recording(self, name, op):
        def call(*args, **kwargs):
            self.launches.append((name, (), tuple(map(_recorded, args)),
                                  tuple(sorted((k, _recorded(v)) for k, v in kwargs.items()))))
            return op(*args, **kwargs)
        return call

    def take(self):
        launches, self.launches = self.launches, []
        return launches


def _recorded(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), value.dtype, tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return tuple(map(_recorded, value))
    return value


@OVER_ROWS
def test_every_step_launches_the_same_kernels_on_the_same_memory(row, monkeypatch):
    """What a CUDA graph replays: after the first step (which builds the tables), each step's
    launches (Triton kernels, or torch.ops.mgpp ops), grids, addresses and scalar arguments are
    the same, through events, the freeze, the frozen stage and skipped steps, with lr a tensor
    that changes in place. The step's row written on the device equals the host's schedule
    (float64), with the skip flag."""
    triton = row.name == "triton"
    recorder = LaunchRecorder(monkeypatch) if triton else OpsRecorder(monkeypatch)
    params = make_params(SHAPES, DTYPES, seed=5, device=row.device)
    lr = torch.tensor(1e-3, device=row.device)
    optimizer = build_optimizer(params, row, PRUNE, capturable=True, lr=lr)
    pool, = optimizer._pools()[0]
    numel = sum(p.numel() for p in params[:4])
    rows = device_schedule_rows(optimizer.config, lambda point: pool.plan(point, numel))
    sequences, rows_seen = [], []

    def on_step(t, skip):
        sequences.append(recorder.take())
        current = optimizer._device_schedule.current.cpu().tolist()
        expected = list(rows[min(t, len(rows) - 1)]) + [1.0 if skip else 0.0]
        if skip:
            expected[layout.CURRENT.index("k")] = 0.0
        rows_seen.append((current, expected))

    run_on_device(optimizer, params, SCHEDULE["total_steps"], grads=lambda t, i: True,
                  on_step=on_step, lr_decay=lambda: lr.mul_(0.9))
    first, rest = sequences[0], sequences[1:]
    names = [launch[0] for launch in first]
    assert names[:2] == (["schedule_kernel", "prepare_kernel"] if triton
                         else ["schedule_step_", "fused_step_"])
    assert "partition_at_bin_" not in names   # the one-pass event reads its bin on the host
    for index, sequence in enumerate(rest, start=1):
        assert sequence == first, f"step call {index} launches differently"
    for current, expected in rows_seen:
        assert current == expected
    # The step scalars come from the schedule's persistent buffer, staged once.
    scalars = optimizer._device_schedule.scalars
    if triton:
        prepare = next(launch for launch in first if launch[0] == "prepare_kernel")
        assert prepare[2][1] == _recorded(scalars)
    else:
        update = next(launch for launch in first if launch[0] == "fused_step_")
        assert update[2][6][1] == scalars.data_ptr()

    # The same run with the schedule on the host (lr decayed alike, no skipped steps).
    expected_params = make_params(SHAPES, DTYPES, seed=5, device=row.device)
    expected_lr = torch.tensor(1e-3, device=row.device)
    expected = build_optimizer(expected_params, row, PRUNE, lr=expected_lr)
    for t in range(SCHEDULE["total_steps"]):
        run_steps(expected, expected_params, t, t + 1)
        expected_lr.mul_(0.9)
    assert_runs_identical(params, optimizer, expected_params, expected)


@pytest.mark.parametrize("resume_capturable", [True, False], ids=["on_device", "on_host"])
@OVER_ROWS
def test_a_device_schedule_state_dict_resumes_exactly(row, resume_capturable):
    """Saved at t = 20 (after skipped steps, before the freeze; every candidate holds its
    all-ones mask) and loaded into a fresh optimizer with the schedule on the device or on the
    host: the rest of the run equals the uninterrupted one. The step after the resume prunes
    nothing, so its stats() still report the τ of the event at t = 18, carried over."""
    params = make_params(SHAPES, DTYPES, seed=5, device=row.device)
    optimizer = build_optimizer(params, row, PRUNE, capturable=True)
    run_on_device(optimizer, params, 20)
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["mgpp"]["schedule_step"] == 20
    resumed_params = clone_params(params)
    resumed = build_optimizer(resumed_params, row, PRUNE, capturable=resume_capturable)
    resumed.load_state_dict(saved)
    for start, stop in ((20, 21), (21, SCHEDULE["total_steps"])):
        run_on_device(optimizer, params, stop, start=start)
        if resume_capturable:
            run_on_device(resumed, resumed_params, stop, start=start)
        else:
            run_steps(resumed, resumed_params, start, stop, has_grad=has_grad)
        assert resumed.stats()["tau"] > 0
        assert_same_schedule_view(resumed, optimizer)
    assert_runs_identical(resumed_params, resumed, params, optimizer)


def test_capturable_needs_a_backend_with_the_schedule_on_the_device():
    for row in backends.ROWS:
        if row.schedules_on_device:
            continue
        with pytest.raises(ValueError, match="capturable=True needs .*cpu, cuda, triton"):
            build_optimizer(make_params([(4, 4)]), row, [True], capturable=True)
