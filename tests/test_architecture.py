"""The package's structure as a contract: its import graph, the one layout shared with the
compiled kernels, the schedule's event planning as a pure function, and the optimizer's own
arguments beyond AdamW's (its warnings, AdamW's implementation switches, a tensor lr)."""
from __future__ import annotations

import ast
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mgpp_kernels
from mgpp_kernels import MGPP, MGPPConfig, ops, param_groups
from mgpp_kernels.backends.types import Prior, UpdateGroup
from mgpp_kernels.ops import layout
from mgpp_kernels.schedule import EventPlan, plan_event, schedule_at

from compare import assert_bitwise_equal
from helpers import SCHEDULE, make_params

PACKAGE = Path(mgpp_kernels.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports by name (including `from . import module`)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            # `from . import module` loads no more than the module (its package is its parent,
            # loaded first anyway); importing any other name runs the package's own code.
            if len(submodules) < len(node.names):
                found.add(base)
    return {m for m in found if m in modules and m != name}


def _import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def test_no_module_imports_a_module_that_imports_it():
    graph = _import_graph()

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == target:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False

    cycles = [(a, b) for a, deps in graph.items() for b in deps if reaches(b, a)]
    assert not cycles


def test_production_code_never_imports_the_oracle():
    graph = _import_graph()
    importers = {module for module, deps in graph.items() if "mgpp_kernels.reference" in deps}
    assert importers <= {"mgpp_kernels.backends.reference", "mgpp_kernels.verify"}
    assert "mgpp_kernels.backends.reference" in importers


def test_the_import_graph_sees_relative_imports():
    """The graph the two tests above read is not empty by mistake."""
    graph = _import_graph()
    assert "mgpp_kernels.schedule" in graph["mgpp_kernels.optimizer"]
    assert "mgpp_kernels.ops.layout" in graph["mgpp_kernels.backends.kernel_ops"]
    assert "mgpp_kernels.reference" in graph["mgpp_kernels.backends.reference"]


# ---- the layout shared with the compiled kernels ----------------------------------------------

def test_step_scalar_layout_is_the_compiled_one():
    if not ops.BUILT:
        pytest.skip(f"mgpp_kernels._C is not usable: {ops.LOAD_ERROR}")
    assert torch.ops.mgpp.layout() == layout.describe()
    assert layout.describe().startswith("step_scalars=lr,beta1,beta2,eps,weight_decay,prior_on,")
    assert layout.NUM_STEP_SCALARS == 11 and layout.HIGH_BINS == 1 << 16
    assert layout.LOW_BINS == 1 << 15


def test_kernels_of_another_layout_are_refused(monkeypatch):
    if not ops.BUILT:
        pytest.skip(f"mgpp_kernels._C is not usable: {ops.LOAD_ERROR}")
    swapped = list(layout.STEP_SCALARS)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    monkeypatch.setattr(layout, "STEP_SCALARS", tuple(swapped))
    error = ops._load()
    assert isinstance(error, ops.LayoutMismatchError) and "rebuild" in str(error)


def test_step_scalar_values_follow_the_layout():
    group = UpdateGroup([], [], [], [], [], [], lr=0.25, beta1=0.5, beta2=0.75, eps=1e-3,
                        weight_decay=0.125, prior=Prior(0.1, 1e-10, 0.05, 1000), count=True)
    values = dict(zip(layout.STEP_SCALARS, layout.step_scalar_values(group)))
    c1, c2 = layout.prior_c1(0.1, 1e-10, 0.05), layout.prior_c2(1e-10, 0.05)
    assert values == {"lr": 0.25, "beta1": 0.5, "beta2": 0.75, "eps": 1e-3, "weight_decay": 0.125,
                      "prior_on": 1.0, "c1": c1, "c2": c2, "inv_n": 1e-3,
                      "inv_sigma0_sq": 1 / 1e-10, "inv_sigma1_sq": 1 / 0.05}
    assert c2 == pytest.approx(0.5e10 - 10.0)
    scheduled = replace(group, prior=Prior(None, 1e-10, 0.05, 1000))
    values = dict(zip(layout.STEP_SCALARS, layout.step_scalar_values(scheduled)))
    assert values["prior_on"] == 1.0 and values["c1"] == 0.0 and values["c2"] == c2


def param_groups_of_two():
    first, second = make_params([(4, 4), (4,)])
    return [{"params": [first], "prune": True}, {"params": [second]}]


# ---- the schedule's event plan -----------------------------------------------------------------

@pytest.mark.parametrize("t, numel, expected", [
    (0, 1000, None),                                        # dense
    (4, 1000, EventPlan(sparsity=0.3, k=300, freeze=False)),  # t_i: s_i
    (5, 1000, None),                                        # between events
    (4, 3, None),                                           # int(3 · 0.3) = 0: nothing to prune
    (24, 1000, EventPlan(sparsity=0.9, k=900, freeze=True)),  # t_end: s_f and the freeze
    (25, 1000, None),                                       # frozen: no more events
])
def test_plan_event_is_a_pure_function_of_the_point_and_n(t, numel, expected):
    point = schedule_at(MGPPConfig(**SCHEDULE), t)
    assert plan_event(point, numel) == expected


def test_plan_event_between_t_i_and_t_end_follows_the_cubic():
    config = MGPPConfig(**SCHEDULE)
    plan = plan_event(schedule_at(config, 14), 10**6)
    s = 0.9 + (0.3 - 0.9) * (1 - (14 - 4) / (24 - 4)) ** 3
    assert plan == EventPlan(sparsity=s, k=int(10**6 * s), freeze=False)


# ---- the optimizer's arguments beyond AdamW's ----------------------------------------------------

def test_no_candidates_warns_and_names_param_groups():
    params = make_params([(8, 8), (8,)])
    with pytest.warns(UserWarning, match=r"mgpp_kernels\.param_groups\(model\)"):
        MGPP(params, backend="reference", **SCHEDULE)


def test_param_groups_with_candidates_do_not_warn():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MGPP(param_groups(model, patterns=[r"weight$"]), backend="reference", **SCHEDULE)


@pytest.mark.parametrize("switch", [dict(foreach=None), dict(foreach=True), dict(fused=None),
                                    dict(fused=True), dict(capturable=False),
                                    dict(differentiable=False)])
def test_adamw_switches_that_mean_what_mgpp_does_are_accepted(switch):
    MGPP(param_groups_of_two(), backend="reference", **switch, **SCHEDULE)


@pytest.mark.parametrize("switch, message", [
    (dict(foreach=False), "foreach=False"), (dict(fused=False), "fused=False"),
    (dict(capturable=True), "capturable=True"), (dict(differentiable=True), "differentiable=True"),
    (dict(amsgrad=True), "amsgrad"), (dict(maximize=True), "maximize")])
def test_adamw_switches_mgpp_cannot_honour_are_clear_errors(switch, message):
    with pytest.raises(ValueError, match=message):
        MGPP(param_groups_of_two(), backend="reference", **switch, **SCHEDULE)


def test_tensor_lr_is_never_read_on_the_host_in_step(kernel_backend, monkeypatch):
    runs = {}
    device = kernel_backend.device
    # 2^-7 is the same value as a float and as a float32 tensor.
    for kind, lr in (("float", 2.0**-7), ("tensor", torch.tensor(2.0**-7, device=device))):
        params = make_params([(7,), (33,)], device=device)
        optimizer = MGPP([{"params": params, "prune": True}], lr=lr, backend=kernel_backend.name,
                         **SCHEDULE)
        for step in range(6):   # through the event at t_i = 4
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.01 * (i + 1) * (step + 1))
            if kind == "tensor":
                with monkeypatch.context() as guard:
                    for read in ("item", "__float__", "tolist"):
                        guard.setattr(torch.Tensor, read, _forbidden_read)
                    optimizer.step()
            else:
                optimizer.step()
        runs[kind] = [p.detach().clone() for p in params]
    for i, (a, b) in enumerate(zip(runs["float"], runs["tensor"])):
        assert_bitwise_equal(a, b, f"param {i}: tensor lr vs float lr")


def _forbidden_read(*args, **kwargs):
    raise AssertionError("a tensor was read on the host inside step()")
