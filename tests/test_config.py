"""Validation (docs/spec.md §1): a ValueError naming the parameter for every value outside its range,
raised when the optimizer is built, and clear errors for inputs MGPP cannot take, raised before
anything changes."""
import copy
import math
import re
import warnings

import pytest
import torch

import mgpp_kernels
from mgpp_kernels import BackendUnavailableError, MGPP, backends as backends_module

from compare import assert_runs_identical
from helpers import (SCHEDULE, backend_name, build_optimizer, clone_params, device_of,
                     make_params)

import backends

NAN, INF = math.nan, math.inf


def _build(params=None, **overrides):
    kwargs = dict(SCHEDULE, backend="cpu")
    kwargs.update(overrides)
    kwargs["backend"] = backend_name(kwargs["backend"])
    if params is None:
        params = make_params([(4, 3)])
    return MGPP([{"params": params, "prune": True}], **kwargs)


# (keyword, invalid value); SCHEDULE has t_i = 4, T = 30, t_f = 5, s_i = 0.3, s_f = 0.9.
# Each value is outside its keyword's own range whatever the other keywords are, so the error
# must be about this keyword: its message starts with the keyword's name.
OUT_OF_RANGE = [
    ("num_train_examples", 0), ("num_train_examples", -5), ("num_train_examples", 10.5),
    ("num_train_examples", NAN), ("num_train_examples", INF), ("num_train_examples", True),
    ("total_steps", 1), ("total_steps", 0), ("total_steps", 30.5), ("total_steps", NAN),
    ("total_steps", INF),
    ("initial_warmup_steps", -1), ("initial_warmup_steps", 2.5), ("initial_warmup_steps", NAN),
    ("initial_warmup_steps", INF),
    ("final_warmup_steps", -1), ("final_warmup_steps", 1.5), ("final_warmup_steps", NAN),
    ("final_warmup_steps", INF),
    ("pruning_interval", 0), ("pruning_interval", -7), ("pruning_interval", 7.5),
    ("pruning_interval", NAN), ("pruning_interval", INF),
    ("initial_sparsity", -0.1), ("initial_sparsity", NAN), ("initial_sparsity", INF),
    ("initial_sparsity", -INF),
    ("final_sparsity", 1.0), ("final_sparsity", 1.5), ("final_sparsity", NAN),
    ("final_sparsity", INF),
    ("sigma0_sq", 0.0), ("sigma0_sq", -1e-10), ("sigma0_sq", NAN), ("sigma0_sq", INF),
    ("sigma1_sq", 0.0), ("sigma1_sq", -0.05), ("sigma1_sq", NAN), ("sigma1_sq", INF),
    ("lambda_mix", 0.0), ("lambda_mix", 1.0), ("lambda_mix", -0.1), ("lambda_mix", 1.5),
    ("lambda_mix", NAN), ("lambda_mix", INF),
    ("lambda_final_factor", 0.0), ("lambda_final_factor", -0.5), ("lambda_final_factor", 1.0001),
    ("lambda_final_factor", NAN), ("lambda_final_factor", INF),
    ("lr", -1e-3), ("lr", NAN), ("lr", INF), ("lr", "0.1"),
    ("eps", -1e-8), ("eps", NAN), ("eps", INF),
    ("weight_decay", -0.01), ("weight_decay", NAN), ("weight_decay", INF),
    ("betas", (NAN, 0.999)), ("betas", (0.9, NAN)), ("betas", (INF, 0.999)), ("betas", (1.0, 0.999)),
    ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.999)), ("betas", (0.9,)), ("betas", 0.9),
    ("state_dtype", torch.float64), ("state_dtype", torch.int32), ("state_dtype", "fp16"),
    ("state_dtype", None), ("state_dtype", torch.bfloat16),  # bf16 state needs bf16 params
    ("backend", "tpu"), ("backend", 3), ("backend", "Reference"),
]


@pytest.mark.parametrize("keyword,value", OUT_OF_RANGE,
                         ids=[f"{k}={v!r}" for k, v in OUT_OF_RANGE])
def test_out_of_range_value_is_a_value_error_naming_it(keyword, value):
    with pytest.raises(ValueError) as error:
        _build(**{keyword: value})
    assert str(error.value).startswith(keyword), str(error.value)


def test_final_sparsity_below_zero_is_blamed_on_final_sparsity():
    # initial_sparsity = 0 is valid on its own; final_sparsity = -0.1 is not (0 <= s_f < 1).
    with pytest.raises(ValueError) as error:
        _build(initial_sparsity=0.0, final_sparsity=-0.1)
    assert str(error.value).startswith("final_sparsity"), str(error.value)


# Values valid on their own that break a relation with another keyword: the message names
# the keyword passed (it may be phrased in terms of the other one).
RELATIONAL = [
    ("initial_sparsity", 0.95),            # > s_f
    ("sigma0_sq", 0.05),                   # == σ1²
    ("sigma0_sq", 1.0),                    # > σ1²
    ("sigma1_sq", 1e-10),                  # == σ0²
    ("initial_warmup_steps", 24),          # == t_end
    ("initial_warmup_steps", 100),
    ("final_warmup_steps", 26),            # t_end = 3 < t_i
    ("total_steps", 5),                    # t_end = -1
    ("total_steps", 6),                    # t_end = 0 < t_i
]


@pytest.mark.parametrize("keyword,value", RELATIONAL, ids=[f"{k}={v!r}" for k, v in RELATIONAL])
def test_broken_relation_is_a_value_error_naming_the_keyword(keyword, value):
    with pytest.raises(ValueError, match=re.escape(keyword)):
        _build(**{keyword: value})


VALID_EDGES = [
    dict(num_train_examples=1), dict(total_steps=2, initial_warmup_steps=0, final_warmup_steps=0),
    dict(initial_warmup_steps=0), dict(initial_warmup_steps=23), dict(final_warmup_steps=0),
    dict(final_warmup_steps=25, initial_warmup_steps=3), dict(pruning_interval=1),
    dict(initial_sparsity=0.0, final_sparsity=0.0), dict(initial_sparsity=0.5, final_sparsity=0.5),
    dict(final_sparsity=0.999999), dict(lambda_final_factor=1.0), dict(lambda_mix=1e-12),
    dict(sigma0_sq=1e-30, sigma1_sq=1e30), dict(lr=0.0), dict(lr=torch.tensor(1e-3)),
    dict(betas=(0.0, 0.0)), dict(eps=0.0), dict(weight_decay=0.0), dict(state_dtype="param"),
    dict(state_dtype="fp32"), dict(state_dtype="float32"), dict(state_dtype=torch.float32),
    dict(total_steps=None), dict(backend="reference"), dict(backend="auto"),
]


@pytest.mark.parametrize("overrides", VALID_EDGES, ids=[repr(v) for v in VALID_EDGES])
def test_values_at_the_edges_of_their_ranges_are_accepted(overrides):
    optimizer = _build(**overrides)
    for key, value in overrides.items():
        if hasattr(optimizer.config, key):
            assert getattr(optimizer.config, key) == value


def test_total_steps_filled_in_later_is_validated():
    optimizer = _build(total_steps=None)
    with pytest.raises(RuntimeError, match="total_steps"):
        optimizer.step()
    with pytest.raises(ValueError, match="initial_warmup_steps"):
        optimizer.set_total_steps(5)
    optimizer.set_total_steps(30)
    assert optimizer.config.t_end == 24


@pytest.mark.parametrize("keyword", ["amsgrad", "maximize"])
def test_amsgrad_and_maximize_are_refused(keyword):
    with pytest.raises(ValueError, match=keyword):
        _build(**{keyword: True})


# ---- param groups -----------------------------------------------------------------------------

@pytest.mark.parametrize("keyword,value", [("lr", NAN), ("lr", -1.0), ("eps", INF),
                                           ("weight_decay", -1.0), ("betas", (0.9, 1.5)),
                                           ("prune", "yes"), ("prune", 1)])
def test_invalid_group_hyperparameter_is_a_value_error_naming_it(keyword, value):
    params = make_params([(3,), (4,)])
    groups = [{"params": params[:1], "prune": True}, {"params": params[1:], keyword: value}]
    with pytest.raises(ValueError, match=re.escape(keyword)):
        MGPP(groups, backend="cpu", **SCHEDULE)


@pytest.mark.parametrize("keyword,value", [
    ("num_train_examples", 10), ("total_steps", 30), ("initial_warmup_steps", 4),
    ("final_warmup_steps", 0), ("pruning_interval", 5), ("sigma0_sq", 1e-9), ("sigma1_sq", 0.1), ("lambda_mix", 0.2),
    ("lambda_final_factor", 0.5), ("state_dtype", torch.float32), ("backend", "cpu")])
def test_optimizer_wide_keyword_in_a_param_group_is_refused(keyword, value):
    params = make_params([(3,), (4,)])
    with pytest.raises(ValueError, match=re.escape(keyword)):
        MGPP([{"params": params, "prune": True, keyword: value}], backend="cpu", **SCHEDULE)
    optimizer = MGPP([{"params": params[:1], "prune": True}], backend="cpu", **SCHEDULE)
    with pytest.raises(ValueError, match=re.escape(keyword)):
        optimizer.add_param_group({"params": params[1:], keyword: value})
    assert len(optimizer.param_groups) == 1


# ---- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_are_refused(any_backend, dtype):
    with pytest.raises(ValueError, match="complex"):
        _build([torch.nn.Parameter(torch.zeros(3, dtype=dtype, device=any_backend.device))],
               backend=any_backend)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_parameters_are_refused(any_backend, dtype):
    device = any_backend.device
    with pytest.raises(ValueError, match=re.escape(str(dtype))):
        _build([torch.nn.Parameter(torch.zeros(2, device=device)),
                torch.zeros(3, dtype=dtype, device=device)], backend=any_backend)


def test_float64_parameters_are_refused_by_the_kernel_backends(kernel_backend):
    assert torch.float64 not in kernel_backend.dtypes
    with pytest.raises(ValueError, match="float64"):
        _build([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64,
                                               device=kernel_backend.device))],
               backend=kernel_backend)


def test_non_contiguous_parameters_are_refused_by_the_kernel_backends(kernel_backend):
    with pytest.raises(ValueError, match="contiguous"):
        _build([torch.nn.Parameter(torch.zeros(4, 6, device=kernel_backend.device).t())],
               backend=kernel_backend)


@pytest.mark.parametrize("backend", backends.params() + [pytest.param("auto", id="auto")])
def test_parameters_on_different_devices_are_refused(backend):
    on_cpu = torch.nn.Parameter(torch.zeros(3, device=device_of(backend)))
    on_meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="device"):
        _build([on_cpu, on_meta], backend=backend)
    with pytest.raises(ValueError, match="device"):
        MGPP([{"params": [on_cpu], "prune": True}, {"params": [on_meta]}],
             backend=backend_name(backend), **SCHEDULE)
    optimizer = _build([on_cpu], backend=backend)
    with pytest.raises(ValueError, match="device"):
        optimizer.add_param_group({"params": [on_meta]})
    assert len(optimizer.param_groups) == 1


def test_kernel_backends_refuse_parameters_on_another_device(kernel_backend):
    with pytest.raises(ValueError, match="meta"):
        _build([torch.nn.Parameter(torch.zeros(3, device="meta"))], backend=kernel_backend)


def test_the_same_parameter_twice_in_one_group_is_refused(any_backend):
    backend = any_backend
    p = torch.nn.Parameter(torch.zeros(3, device=backend.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch only warns about duplicates within a group
        with pytest.raises(ValueError):
            _build([p, p], backend=backend)


def test_the_same_parameter_in_two_groups_is_refused(any_backend):
    p = torch.nn.Parameter(torch.zeros(3, device=any_backend.device))
    with pytest.raises(ValueError, match="more than one"):
        MGPP([{"params": [p], "prune": True}, {"params": [p]}], backend=any_backend.name,
             **SCHEDULE)


def test_backend_that_is_not_built_says_how_to_build_it(monkeypatch):
    real_import = backends_module.importlib.import_module

    def import_without_cpu(name, *args):
        if name.endswith(".cpu"):
            raise ImportError("No module named 'mgpp_kernels._C'")
        return real_import(name, *args)

    monkeypatch.setattr(backends_module.importlib, "import_module", import_without_cpu)
    with pytest.raises(BackendUnavailableError, match="pip install"):
        _build(backend="cpu")
    available = mgpp_kernels.available_backends()
    assert "cpu" not in available and "reference" in available
    # "auto" falls back to the next backend built for the device, and says so.
    with pytest.warns(UserWarning, match="falls back to 'reference'"):
        assert _build(backend="auto").backend == "reference"


def test_auto_picks_the_cpu_backend_for_cpu_tensors():
    assert _build(backend="auto").backend == "cpu"


# ---- gradients: errors raised before anything changes ------------------------------------------

def _two_steps(backend):
    params = make_params([(5, 3), (7,)], device=backend.device)
    optimizer = build_optimizer(params, backend, [True, False])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return params, optimizer


def _snapshot(params, optimizer):
    """A reference optimizer over CPU copies holding `optimizer`'s state."""
    copies = clone_params(params, device="cpu")
    shadow = build_optimizer(copies, "reference", [True, False])
    shadow.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return copies, shadow


# How to give a parameter a gradient it cannot take (autograd refuses some of these on plain
# assignment; `.data` swaps the payload as a hook or a user's own code can).
def _sparse_gradient(p):
    p.grad = torch.randn_like(p).to_sparse()


def _float64_gradient(p):
    p.grad = torch.randn_like(p)
    p.grad.data = torch.randn(p.shape, dtype=torch.float64, device=p.device)


def _longer_gradient(p):
    p.grad = torch.randn_like(p)
    p.grad.data = torch.randn(p.numel() + 1, device=p.device)


BAD_GRADIENTS = {"sparse": (_sparse_gradient, "sparse"), "dtype": (_float64_gradient, "dtype"),
                 "shape": (_longer_gradient, "shape")}


@pytest.mark.parametrize("kind", sorted(BAD_GRADIENTS))
def test_bad_gradient_raises_before_any_state_changes(any_backend, kind):
    backend = any_backend
    give_bad_gradient, message = BAD_GRADIENTS[kind]
    params, optimizer = _two_steps(backend)
    expected_params, expected = _snapshot(params, optimizer)
    # The bad gradient is on the second parameter, so an optimizer that checks while it updates
    # would already have changed the first.
    params[0].grad = torch.randn_like(params[0])
    give_bad_gradient(params[1])
    with pytest.raises((RuntimeError, ValueError), match=message):
        optimizer.step()
    assert_runs_identical(params, optimizer, expected_params, expected)


def test_sparse_gradient_in_the_first_step_creates_no_state(any_backend):
    device = any_backend.device
    embedding = torch.nn.Embedding(10, 4, sparse=True).to(device)
    linear = torch.nn.Linear(4, 1).to(device)
    optimizer = MGPP([{"params": [linear.weight], "prune": True},
                      {"params": [linear.bias, embedding.weight]}], backend=any_backend.name,
                     **SCHEDULE)
    linear(embedding(torch.tensor([1, 2, 3], device=device))).sum().backward()
    assert embedding.weight.grad.is_sparse
    before = [p.detach().clone() for p in (linear.weight, linear.bias, embedding.weight)]
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        optimizer.step()
    assert len(optimizer.state) == 0
    assert optimizer.stats()["step"] == 0
    for b, p in zip(before, (linear.weight, linear.bias, embedding.weight)):
        assert torch.equal(b, p)
