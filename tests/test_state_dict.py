"""state_dict() / load_state_dict() mid-run continue bit-identically on the same backend (every
row of tests/backends.py), at every stage of the schedule, in memory and through torch.save /
torch.load; a state saved on one backend continues on another within docs/spec.md §4."""
import copy
import functools
import io

import pytest
import torch

from mgpp_kernels import MGPP

from compare import assert_close_in_norm, assert_runs_identical
from helpers import SCHEDULE, build_optimizer, clone_params, make_params, run_steps

import backends
from backends import REFERENCE

SHAPES = [(33, 65), (7,), (1,), (0,), (129,), (13,), (0,)]
PRUNE = [True] * 5 + [False] * 2
# The Triton interpreter pays per tensor and step: its row runs three non-empty tensors.
SMALL_SHAPES = [(33, 65), (1,), (0,), (13,)]
SMALL_PRUNE = [True, True, True, False]
TOTAL = SCHEDULE["total_steps"]


def layout(row):
    """(shapes, prune) of the runs on `row`."""
    return row.pick((SHAPES, PRUNE), (SMALL_SHAPES, SMALL_PRUNE))

# After n step() calls the next schedule step is t = n; SCHEDULE has events at 4, 7, 14, 21 and
# the freeze at t_end = 24.
SAVE_POINTS = {
    "start": 0,
    "dense": 2,
    "before_first_event": 4,
    "after_first_event": 5,
    "between_events": 6,
    "after_cubic_event": 8,
    "before_freeze": 24,
    "after_freeze": 25,
    "frozen": 27,
}


def _has_grad(t, i, prune=PRUNE):
    """The last candidate has no gradient before t = 6 and the last non-candidate none in odd
    steps (candidate 4 and non-candidate 6 of SHAPES), so some saved states lack entries and
    some masks belong to parameters without moments."""
    last_candidate = max(j for j, c in enumerate(prune) if c)
    return not ((i == last_candidate and t < 6) or (i == len(prune) - 1 and t % 2 == 1))


def _in_memory(state_dict):
    return copy.deepcopy(state_dict)


def _through_a_file(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@functools.lru_cache(maxsize=None)
def _uninterrupted(backend):
    shapes, prune = layout(backend)
    has_grad = functools.partial(_has_grad, prune=prune)
    params = make_params(shapes, device=backend.device)
    optimizer = build_optimizer(params, backend, prune)
    run_steps(optimizer, params, 0, TOTAL, has_grad=has_grad)
    return params, optimizer


def _resume(backend, saved_at, transport):
    shapes, prune = layout(backend)
    has_grad = functools.partial(_has_grad, prune=prune)
    params = make_params(shapes, device=backend.device)
    first = build_optimizer(params, backend, prune)
    run_steps(first, params, 0, saved_at, has_grad=has_grad)
    state_dict = transport(first.state_dict())
    stats = first.stats()
    del first
    resumed_params = clone_params(params)
    resumed = build_optimizer(resumed_params, backend, prune)
    resumed.load_state_dict(state_dict)
    assert resumed.stats() == stats
    run_steps(resumed, resumed_params, saved_at, TOTAL, has_grad=has_grad)
    return resumed_params, resumed


# The Triton interpreter's row resumes at fewer points: before t_i, right after the first event,
# right before and after the freeze, frozen.
SMALL_SAVE_POINTS = ["dense", "after_first_event", "before_freeze", "after_freeze", "frozen"]


@pytest.mark.parametrize("backend,point", backends.over(
    backends.ROWS, sorted(SAVE_POINTS, key=SAVE_POINTS.get), small_cases=SMALL_SAVE_POINTS,
    requires=("exact_resume",)))
def test_round_trip_continues_bit_identically(backend, point):
    resumed_params, resumed = _resume(backend, SAVE_POINTS[point], _in_memory)
    params, optimizer = _uninterrupted(backend)
    assert_runs_identical(resumed_params, resumed, params, optimizer)
    assert resumed.stats() == optimizer.stats()


@pytest.mark.parametrize("backend,point", backends.over(
    backends.ROWS, ["dense", "after_first_event", "after_freeze"], small_cases=["after_freeze"],
    requires=("exact_resume",)))
def test_round_trip_through_torch_save(backend, point):
    resumed_params, resumed = _resume(backend, SAVE_POINTS[point], _through_a_file)
    params, optimizer = _uninterrupted(backend)
    assert_runs_identical(resumed_params, resumed, params, optimizer)


def test_loaded_state_is_a_copy(any_backend):
    """Continuing after a load leaves the state_dict as it was, so it can be loaded again."""
    shapes, prune = layout(any_backend)
    params = make_params(shapes, device=any_backend.device)
    optimizer = build_optimizer(params, any_backend, prune)
    run_steps(optimizer, params, 0, 25)
    state_dict = copy.deepcopy(optimizer.state_dict())
    reference_copy = copy.deepcopy(state_dict)
    runs = []
    for _ in range(2):
        copies = clone_params(params)
        resumed = build_optimizer(copies, any_backend, prune)
        resumed.load_state_dict(state_dict)
        run_steps(resumed, copies, 25, TOTAL)
        runs.append((copies, resumed))
    assert_runs_identical(*runs[0], *runs[1])
    for index, entry in reference_copy["state"].items():
        for key, value in entry.items():
            assert torch.equal(state_dict["state"][index][key], value)


def test_total_steps_comes_from_the_state_dict(any_backend):
    shapes, prune = layout(any_backend)
    params = make_params(shapes, device=any_backend.device)
    optimizer = build_optimizer(params, any_backend, prune)
    run_steps(optimizer, params, 0, 10)
    copies = clone_params(params)
    resumed = build_optimizer(copies, any_backend, prune, total_steps=None)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed.config.total_steps == TOTAL
    run_steps(optimizer, params, 10, TOTAL)
    run_steps(resumed, copies, 10, TOTAL)
    assert_runs_identical(copies, resumed, params, optimizer)


@pytest.mark.parametrize("backend,state_dtype,dtype", backends.over(
    backends.ROWS, [(s, d) for s in ("fp32", "param") for d in (torch.bfloat16, torch.float16)],
    small_cases=[("fp32", torch.float16), ("param", torch.bfloat16)]))
def test_16bit_parameters_keep_their_state_dtype(backend, dtype, state_dtype):
    shapes, prune = layout(backend)
    params = make_params(shapes, dtype, device=backend.device)
    optimizer = build_optimizer(params, backend, prune, state_dtype=state_dtype,
                                num_train_examples=10_000)
    run_steps(optimizer, params, 0, 25)
    copies = clone_params(params)
    resumed = build_optimizer(copies, backend, prune, state_dtype=state_dtype,
                              num_train_examples=10_000)
    resumed.load_state_dict(_through_a_file(optimizer.state_dict()))
    expected_dtype = torch.float32 if state_dtype == "fp32" else dtype
    for p in copies:
        state = resumed.state[p]
        if "exp_avg" in state:
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == expected_dtype
            assert state["step"].dtype == torch.float32
        if "keep_mask" in state:
            assert state["keep_mask"].dtype == torch.uint8
    run_steps(optimizer, params, 25, TOTAL)
    run_steps(resumed, copies, 25, TOTAL)
    assert_runs_identical(copies, resumed, params, optimizer)


def _saved(shapes=SHAPES, prune=PRUNE, steps=25):
    params = make_params(shapes)
    optimizer = build_optimizer(params, "reference", prune)
    run_steps(optimizer, params, 0, steps)
    return copy.deepcopy(optimizer.state_dict())


LAYOUTS = {
    "fewer_groups": (SHAPES[:5], PRUNE[:5]),
    "more_groups": None,
    "fewer_params": (SHAPES[:6], PRUNE[:6]),
    "another_shape": ([(65, 33)] + SHAPES[1:], PRUNE),
    "another_numel": ([(33, 64)] + SHAPES[1:], PRUNE),
    "prune_flag": None,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loading_a_different_layout_raises(any_backend, layout):
    state_dict = _saved()
    if layout == "more_groups":
        params = make_params(SHAPES, device=any_backend.device)
        optimizer = build_optimizer(params, any_backend, PRUNE)
        optimizer.add_param_group({"params": make_params([(3,)], device=any_backend.device)})
    elif layout == "prune_flag":
        params = make_params(SHAPES, device=any_backend.device)
        optimizer = MGPP([{"params": params[:5], "prune": False},
                          {"params": params[5:], "prune": True}], backend=any_backend.name,
                         **SCHEDULE)
    else:
        shapes, prune = LAYOUTS[layout]
        params = make_params(shapes, device=any_backend.device)
        optimizer = build_optimizer(params, any_backend, prune)
    run_steps(optimizer, params, 0, 5)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError):
        optimizer.load_state_dict(state_dict)
    _assert_same_state_dict(optimizer.state_dict(), before)


def _assert_same_state_dict(actual, expected):
    assert actual["mgpp"].keys() == expected["mgpp"].keys()
    for key, value in expected["mgpp"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual["mgpp"][key], value), key
        else:
            assert actual["mgpp"][key] == value, key
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert actual["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_working(any_backend, how):
    """copy.deepcopy / pickle of the optimizer object (as some trainers do) keeps the schedule
    position and settings, and the copy continues like the original."""
    shapes, prune = layout(any_backend)
    params = make_params(shapes, device=any_backend.device)
    optimizer = build_optimizer(params, any_backend, prune)
    run_steps(optimizer, params, 0, 10)
    if how == "deepcopy":
        copied = copy.deepcopy(optimizer)
    else:
        buffer = io.BytesIO()
        torch.save(optimizer, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    copied_params = [p for group in copied.param_groups for p in group["params"]]
    original_params = [p for group in optimizer.param_groups for p in group["params"]]
    assert copied.stats() == optimizer.stats()
    run_steps(optimizer, original_params, 10, TOTAL)
    run_steps(copied, copied_params, 10, TOTAL)
    assert_runs_identical(copied_params, copied, original_params, optimizer)


def test_loading_an_adamw_state_dict_raises(any_backend):
    params = make_params(SHAPES, device=any_backend.device)
    adamw = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    adamw.step()
    optimizer = build_optimizer(clone_params(params), any_backend, PRUNE)
    with pytest.raises(ValueError, match="MGPP"):
        optimizer.load_state_dict(adamw.state_dict())


def test_load_across_backends_continues_within_tolerance(kernel_backend):
    """The saved state is the same for every backend: a kernel backend resumes a reference run
    (on its own device)."""
    params = make_params(SHAPES)
    reference_run = build_optimizer(params, REFERENCE, PRUNE)
    run_steps(reference_run, params, 0, 10)
    copies = clone_params(params, device=kernel_backend.device)
    resumed = build_optimizer(copies, kernel_backend, PRUNE)
    resumed.load_state_dict(copy.deepcopy(reference_run.state_dict()))
    run_steps(reference_run, params, 10, TOTAL)
    run_steps(resumed, copies, 10, TOTAL)
    for i, (p, r) in enumerate(zip(copies, params)):
        assert_close_in_norm([p], [r], 1e-4, f"param {i}")
