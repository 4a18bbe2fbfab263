"""Bad input beyond the per-keyword errors of tests/test_config.py and the layouts of
tests/test_state_dict.py: every rejected call is a no-op. After a clear error from step(),
load_state_dict(), add_param_group() or set_total_steps(), the optimizer holds bit for bit what it
held, and runs on exactly like an untouched twin. Also: hyperparameters made non-finite between
steps (as an LR scheduler or a user can), a generator of parameters in a group, a backend that
cannot rank across processes given a process group."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import mgpp_kernels
from mgpp_kernels import MGPP

from compare import assert_bitwise_equal, assert_unchanged, snapshot

import backends
# t_i = 2, events at 2, 3, 6 and the freeze at t_end = 12 - 2 - 1 = 9.
SCHEDULE = dict(num_train_examples=100, initial_warmup_steps=2, total_steps=12,
                final_warmup_steps=2, pruning_interval=3)
STOP = 4   # where the rejected call comes: past t_i, with moments and an event behind


def make_params(seed: int = 0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.1).to(device))
            for shape in ((8, 5), (13,), (5,))]


def build(params, backend, **overrides):
    return MGPP([{"params": params[:2], "prune": True}, {"params": params[2:], "prune": False}],
                lr=1e-2, backend=backend.name, **dict(SCHEDULE, **overrides))


def run(optimizer, params, start, stop):
    for t in range(start, stop):
        generator = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) * 0.01).to(p.device)
        optimizer.step()


@pytest.fixture(params=backends.params(backends.ROWS))
def backend(request):
    return request.param


def frozen_state_dict(backend):
    """A valid checkpoint of the same layout, taken after the freeze (it has keep masks)."""
    params = make_params(seed=1, device=backend.device)
    optimizer = build(params, backend)
    run(optimizer, params, 0, SCHEDULE["total_steps"] - 1)
    return copy.deepcopy(optimizer.state_dict())


def reject_sparse_gradient(optimizer, params, backend):
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    params[1].grad = params[1].grad.to_sparse()
    optimizer.step()


def reject_nan_lr_set_between_steps(optimizer, params, backend):
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    saved = optimizer.param_groups[1]["lr"]
    optimizer.param_groups[1]["lr"] = math.nan
    try:
        optimizer.step()
    finally:
        optimizer.param_groups[1]["lr"] = saved


def reject_inf_beta_set_between_steps(optimizer, params, backend):
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    saved = optimizer.param_groups[0]["betas"]
    optimizer.param_groups[0]["betas"] = (0.9, math.inf)
    try:
        optimizer.step()
    finally:
        optimizer.param_groups[0]["betas"] = saved


def reject_mask_of_another_size(optimizer, params, backend):
    state_dict = frozen_state_dict(backend)
    first = state_dict["param_groups"][0]["params"][0]
    state_dict["state"][first]["keep_mask"] = torch.zeros(4, dtype=torch.uint8,
                                                          device=backend.device)
    optimizer.load_state_dict(state_dict)


def reject_parameters_in_another_order(optimizer, params, backend):
    state_dict = frozen_state_dict(backend)   # (8, 5) and (13,) trade places
    state_dict["param_groups"][0]["params"] = state_dict["param_groups"][0]["params"][::-1]
    optimizer.load_state_dict(state_dict)


def reject_state_dict_without_mgpp_entry(optimizer, params, backend):
    state_dict = frozen_state_dict(backend)
    del state_dict["mgpp"]
    optimizer.load_state_dict(state_dict)


def reject_group_with_a_known_parameter(optimizer, params, backend):
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, device=backend.device)),
                                          params[0]]})


def reject_group_with_a_complex_parameter(optimizer, params, backend):
    optimizer.add_param_group({"params": [torch.nn.Parameter(
        torch.zeros(2, dtype=torch.cfloat, device=backend.device))]})


def reject_group_with_an_integer_parameter(optimizer, params, backend):
    optimizer.add_param_group({"params": [torch.zeros(2, dtype=torch.int64, device=backend.device)],
                               "prune": True})


def reject_group_on_the_meta_device(optimizer, params, backend):
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]})


def reject_group_with_infinite_eps(optimizer, params, backend):
    fresh = torch.nn.Parameter(torch.zeros(2, device=backend.device))
    optimizer.add_param_group({"params": [fresh], "eps": math.inf})


def reject_total_steps_too_small(optimizer, params, backend):
    optimizer.set_total_steps(3)   # t_end = 3 - 2 - 1 = 0 < t_i = 2


REJECTED = {  # call -> (exception type, message pattern)
    reject_sparse_gradient: (RuntimeError, "sparse gradients"),
    reject_nan_lr_set_between_steps: (ValueError, "lr must be a finite number"),
    reject_inf_beta_set_between_steps: (ValueError, r"betas\[1\]"),
    reject_mask_of_another_size: (ValueError, "keep_mask"),
    reject_parameters_in_another_order: (ValueError, "shape"),
    reject_state_dict_without_mgpp_entry: (ValueError, "not an MGPP state_dict"),
    reject_group_with_a_known_parameter: (ValueError, "more than one"),
    reject_group_with_a_complex_parameter: (ValueError, "complex"),
    reject_group_with_an_integer_parameter: (ValueError, "floating-point"),
    reject_group_on_the_meta_device: (ValueError, "one device"),
    reject_group_with_infinite_eps: (ValueError, "eps must be a finite number"),
    reject_total_steps_too_small: (ValueError, "initial_warmup_steps must be < t_end"),
}


# The Triton interpreter's row: one rejection of each kind (step, state_dict, param group,
# schedule).
SMALL_REJECTED = [reject_sparse_gradient, reject_nan_lr_set_between_steps,
                  reject_mask_of_another_size, reject_group_with_a_known_parameter,
                  reject_total_steps_too_small]


@pytest.mark.parametrize("backend,reject", backends.over(
    backends.ROWS, list(REJECTED), small_cases=SMALL_REJECTED,
    ids=lambda f: f.__name__[len("reject_"):]))
def test_a_rejected_call_changes_nothing(backend, reject):
    error, message = REJECTED[reject]
    params = make_params(device=backend.device)
    optimizer = build(params, backend)
    run(optimizer, params, 0, STOP)
    before = snapshot(optimizer, params)
    groups_before = [dict(g, params=list(g["params"])) for g in optimizer.param_groups]
    with pytest.raises(error, match=message):
        reject(optimizer, params, backend)
    assert_unchanged(optimizer, params, before)
    assert optimizer.param_groups == groups_before
    assert optimizer.config.total_steps == SCHEDULE["total_steps"]
    twin_params = make_params(device=backend.device)
    twin = build(twin_params, backend)
    run(twin, twin_params, 0, STOP)
    run(optimizer, params, STOP, SCHEDULE["total_steps"])
    run(twin, twin_params, STOP, SCHEDULE["total_steps"])
    for i, (p, q) in enumerate(zip(params, twin_params)):
        assert_bitwise_equal(p.detach(), q.detach(), f"param {i}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay", "beta1", "beta2"])
def test_non_finite_hyperparameter_in_a_param_group_is_rejected(name, value):
    if name.startswith("beta"):
        index = int(name == "beta2")
        kwargs = {"betas": (0.9, 0.999)[:index] + (value,) + (0.9, 0.999)[index + 1:]}
        pattern = rf"betas\[{index}\]"
    else:
        kwargs, pattern = {name: value}, name
    with pytest.raises(ValueError, match=pattern):
        MGPP([{"params": [torch.nn.Parameter(torch.randn(4))], **kwargs}], backend="reference",
             **SCHEDULE)


@pytest.mark.parametrize("lr", [math.nan, math.inf])
def test_non_finite_tensor_lr_is_rejected(lr):
    with pytest.raises(ValueError, match="lr"):
        MGPP([torch.nn.Parameter(torch.randn(4))], lr=torch.tensor(lr), backend="reference",
             **SCHEDULE)


def test_generator_of_parameters_in_a_group_is_kept(backend):
    """A dict group may hold model.parameters() (read once): every parameter is in the group.
    A set has no stable order (state_dict indices would change between runs): a TypeError."""
    model = torch.nn.Linear(4, 3).to(backend.device)
    optimizer = MGPP([{"params": model.parameters(), "prune": True}], backend=backend.name,
                     **SCHEDULE)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == \
           [id(p) for p in model.parameters()]
    with pytest.raises(TypeError, match="ordered"):
        MGPP([{"params": set(model.parameters())}], backend=backend.name, **SCHEDULE)


def test_no_backend_for_the_device_is_an_error():
    with pytest.raises(mgpp_kernels.BackendUnavailableError, match="meta"):
        MGPP([torch.nn.Parameter(torch.empty(4, device="meta"))], backend="auto", **SCHEDULE)


@pytest.mark.filterwarnings("ignore:MGPP. no param group has prune=True")
def test_backend_that_cannot_rank_across_processes_refuses_a_process_group(monkeypatch):
    """Only backends with ranks_across_processes take process_group= (the group object is not
    used before the refusal). Every backend of the table ranks across processes today
    (tests/test_distributed.py runs them with a process group), so the refusal is shown on the
    reference backend with the capability taken away."""
    from mgpp_kernels.backends.reference import ReferenceBackend
    monkeypatch.setattr(ReferenceBackend, "ranks_across_processes", False)
    MGPP([torch.nn.Parameter(torch.randn(4))], backend="reference", **SCHEDULE)
    with pytest.raises(ValueError, match="cannot rank candidates across processes"):
        MGPP([{"params": [torch.nn.Parameter(torch.randn(4))], "prune": True}],
             backend="reference", process_group=object(), **SCHEDULE)
