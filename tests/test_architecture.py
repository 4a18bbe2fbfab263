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
from mgpp_kernels.backends.scalars import step_scalar_values
from mgpp_kernels.backends.types import Prior, UpdateGroup
from mgpp_kernels.ops import layout
from mgpp_kernels.prior import prior_c1, prior_c2
from mgpp_kernels.pools import Pool
from mgpp_kernels.schedule import EventPlan, schedule_at

from compare import assert_bitwise_equal
from helpers import SCHEDULE, make_params

PACKAGE = Path(mgpp_kernels.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# The compiled extension: a module of the package without a .py file.
EXTENSIONS = {"mgpp_kernels._C"}


def _imports(path: Path, modules: set[str]) -> set[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _imports_of_source(path.read_text(), name, package, modules)


def _imports_of_source(source: str, name: str, package: str, modules: set[str]) -> set[str]:
    """The package's modules that module `name` of `package` imports by name (including
    `from . import module`), with the subpackages whose __init__ such an import runs: every
    package between the root and the imported module that `name` is not inside (the root's
    __init__ runs first anyway)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
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
    for module in list(found):
        parts = module.split(".")
        for end in range(2, len(parts)):
            parent = ".".join(parts[:end])
            if not (package + ".").startswith(parent + "."):
                found.add(parent)
    return {m for m in found if m in modules and m != name}


def _import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths} | EXTENSIONS
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    return graph | {module: set() for module in EXTENSIONS}


# The package's units from the bottom up: a module imports only modules of lower layers, type
# checking imports included, so that no import runs back up. A new module takes its place here.
LAYERS = (
    # torch-only leaves: the layout shared with the kernels, the settings, the prior's constants,
    # the packed masks, the data a backend takes and returns
    ("_C", "ops.layout", "config", "prior", "masks", "sharding", "groups", "workloads",
     "machine", "patterns", "integrations"),
    ("ops.checks", "reference", "backends.types", "owl"),   # owl: per-layer targets over groups' candidates
    ("ops",),   # loads the compiled kernels: importing ops.layout runs it
    ("schedule", "backends.scalars"),
    ("backends.device_schedule", "backends.triton.kernels", "pools"),
    ("backends.kernel_ops", "backends.reference", "backends.triton.backend"),
    ("backends.cpu", "backends.cuda", "backends.triton"),
    ("backends",),   # the registry and the Backend protocol: importing backends.types runs it
    ("checkpoint",),
    ("optimizer",),
    ("", "verify", "integrations.export", "integrations.transformers"),
    ("__main__",),
)


def _layer_of() -> dict[str, int]:
    return {f"mgpp_kernels.{name}".rstrip("."): layer
            for layer, names in enumerate(LAYERS) for name in names}


def test_every_import_goes_down_the_layers():
    graph, layer = _import_graph(), _layer_of()
    assert set(graph) == set(layer), "a module is missing from LAYERS, or LAYERS names a gone one"
    upward = sorted((module, target) for module, targets in graph.items() for target in targets
                    if layer[target] >= layer[module])
    assert not upward


def test_an_upward_import_is_seen():
    """What the test above reads: a type-checking import counts, and importing a module of a
    subpackage runs that subpackage's __init__ (the backend registry, for backends.types)."""
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from ..backends.types import UpdateGroup\n")
    found = _imports_of_source(source, "mgpp_kernels.ops.layout", "mgpp_kernels.ops",
                               set(_import_graph()))
    assert found == {"mgpp_kernels.backends.types", "mgpp_kernels.backends"}


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
                        weight_decay=0.125, prior=Prior(0.1, 1e-10, 0.05, 1000), event=0)
    values = dict(zip(layout.STEP_SCALARS, step_scalar_values(group)))
    c1, c2 = prior_c1(0.1, 1e-10, 0.05), prior_c2(1e-10, 0.05)
    assert values == {"lr": 0.25, "beta1": 0.5, "beta2": 0.75, "eps": 1e-3, "weight_decay": 0.125,
                      "prior_on": 1.0, "c1": c1, "c2": c2, "inv_n": 1e-3,
                      "inv_sigma0_sq": 1 / 1e-10, "inv_sigma1_sq": 1 / 0.05}
    assert c2 == pytest.approx(0.5e10 - 10.0)
    scheduled = replace(group, prior=Prior(None, 1e-10, 0.05, 1000))
    values = dict(zip(layout.STEP_SCALARS, step_scalar_values(scheduled)))
    assert values["prior_on"] == 1.0 and values["c1"] == 0.0 and values["c2"] == c2


def param_groups_of_two():
    first, second = make_params([(4, 4), (4,)])
    return [{"params": [first], "prune": True}, {"params": [second]}]


# ---- the schedule's event plan -----------------------------------------------------------------

@pytest.mark.parametrize("t, numel, expected", [
    (0, 1000, None),                                        # dense
    (4, 1000, EventPlan(sparsity=0.3, k=300, freeze=False, numel=1000)),  # t_i: s_i
    (5, 1000, None),                                        # between events
    (4, 3, None),                                           # int(3 · 0.3) = 0: nothing to prune
    (24, 1000, EventPlan(sparsity=0.9, k=900, freeze=True, numel=1000)),  # t_end: the freeze
    (25, 1000, None),                                       # frozen: no more events
])
def test_a_pools_event_is_a_pure_function_of_the_point_and_n(t, numel, expected):
    point = schedule_at(MGPPConfig(**SCHEDULE), t)
    assert Pool(None, 0.3, 0.9).plan(point, numel) == expected


def test_a_pools_event_between_t_i_and_t_end_follows_the_cubic():
    config = MGPPConfig(**SCHEDULE)
    plan = Pool(None, 0.3, 0.9).plan(schedule_at(config, 14), 10**6)
    s = 0.9 + (0.3 - 0.9) * (1 - (14 - 4) / (24 - 4)) ** 3
    assert plan == EventPlan(sparsity=s, k=int(10**6 * s), freeze=False, numel=10**6)


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
