"""The backends the conformance suites run over: one row per backend, with what it can do.

The backend-agnostic suites (one-step bounds, every stage, τ, state_dict, resume, AMP, bad input,
schedule, fuzz, AdamW equivalence, ...) take their backends from ROWS, through the fixtures
`any_backend` / `kernel_backend` of conftest.py or through `over(...)` below. Adding a backend is
one row here; a row that cannot run here, or lacks a capability a suite needs, is skipped with
its reason, never silently left out. tests/test_backend_table.py checks the rows against the
package (every backend has a row; the declared flags agree).

Capabilities of a row:
- device: where its tests put the tensors ("cpu", or "cuda"). The reference backend, the
  oracle, always runs on CPU tensors; results on a GPU are compared on the CPU.
- dtypes: the parameter dtypes it takes.
- ranks_across_processes: it takes process_group= and sharded DTensors (one τ over all ranks).
- exact_resume: a run resumed from a state_dict equals the uninterrupted run bit for bit.
- ranks_nm_pools: it takes param groups with an N:M `pattern` (docs/spec.md §5).
- schedules_on_device: capturable=True; its kernels read the schedule position and GradScaler's
  found_inf on the device (tests/test_device_schedule.py).
- slow: its kernels run through the Triton interpreter (about 25 ms per program instance), so
  suites give it small shapes and fewer cases (`row.pick(all_cases, small_cases)`); also the
  `slow` marker, so `pytest -m "not slow"` leaves it out.
- unavailable: why it cannot run here (None when it can).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from mgpp_kernels.backends import BackendUnavailableError, load_backend
from mgpp_kernels.ops.layout import KERNEL_DTYPES


@dataclass(frozen=True)
class Row:
    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]
    ranks_across_processes: bool
    exact_resume: bool
    schedules_on_device: bool
    ranks_nm_pools: bool
    slow: bool
    unavailable: str | None

    @property
    def is_reference(self) -> bool:
        return self.name == "reference"

    def load(self):
        """The backend object (mgpp_kernels.backends.load_backend)."""
        return load_backend(self.name)

    def pick(self, cases, small_cases):
        """`small_cases` on a slow row, else `cases`."""
        return small_cases if self.slow else cases

    def missing(self, capability: str) -> str | None:
        """Why this row cannot run a suite that needs `capability` (None: it can)."""
        if getattr(self, capability):
            return None
        return f"backend {self.name!r} has no {capability}: {NOT_YET[capability]}"

    def marks(self, requires: tuple[str, ...] = ()) -> list:
        marks = []
        if self.device == "cuda":
            marks.append(pytest.mark.gpu)
        if self.slow:
            marks.append(pytest.mark.slow)
        reasons = [f"backend {self.name!r} does not run here: {self.unavailable}"
                   if self.unavailable else None] + [self.missing(c) for c in requires]
        reasons = [r for r in reasons if r]
        if reasons:
            marks.append(pytest.mark.skip(reason="; ".join(reasons)))
        return marks

    def __str__(self) -> str:
        return self.name


# What a row without a capability lacks, in words (the skip reason).
NOT_YET = {
    "ranks_across_processes": "process_group= and sharded DTensors need a backend that ranks "
                              "candidates across processes (not supported yet on this backend)",
    "exact_resume": "a resumed run is not bit-identical to the uninterrupted one",
    "ranks_nm_pools": "its kernels rank unstructured pools only (N:M not supported yet on this "
                      "backend)",
    "schedules_on_device": "the oracle follows the schedule on the host (capturable=True is an "
                           "error there)",
}


def _unavailable(name: str) -> str | None:
    try:
        load_backend(name)
    except BackendUnavailableError as error:
        return str(error).split(";")[0]   # the build hint after ";" is for users, not for -rs
    return None


def _triton_device() -> tuple[str, str | None]:
    """The triton backend runs on CPU tensors through the interpreter (TRITON_INTERPRET=1, set
    by conftest.py unless the environment says otherwise), else on a CUDA device."""
    reason = _unavailable("triton")
    if reason is not None:
        return "cpu", reason
    from mgpp_kernels.backends.triton import backend
    if backend.INTERPRETED:
        return "cpu", None
    if not torch.cuda.is_available():
        return "cuda", (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} and no CUDA "
                        "device: the compiled kernels need a GPU")
    return "cuda", None


def _rows() -> tuple[Row, ...]:
    triton_device, triton_unavailable = _triton_device()
    return (
        Row("reference", device="cpu", dtypes=KERNEL_DTYPES + (torch.float64,),
            ranks_across_processes=True, exact_resume=True, schedules_on_device=False,
            ranks_nm_pools=True, slow=False, unavailable=None),
        Row("cpu", device="cpu", dtypes=KERNEL_DTYPES, ranks_across_processes=True,
            exact_resume=True, schedules_on_device=True, ranks_nm_pools=True, slow=False,
            unavailable=_unavailable("cpu")),
        Row("triton", device=triton_device, dtypes=KERNEL_DTYPES, ranks_across_processes=True,
            exact_resume=True, schedules_on_device=True, ranks_nm_pools=True,
            slow=triton_device == "cpu",
            unavailable=triton_unavailable),
        Row("cuda", device="cuda", dtypes=KERNEL_DTYPES, ranks_across_processes=True,
            exact_resume=True, schedules_on_device=True, ranks_nm_pools=True, slow=False,
            unavailable=_unavailable("cuda")),
    )


ROWS = _rows()
BY_NAME = {row.name: row for row in ROWS}
REFERENCE = BY_NAME["reference"]
KERNELS = tuple(row for row in ROWS if not row.is_reference)


def params(rows=ROWS, requires: tuple[str, ...] = ()) -> list:
    """One pytest.param per row (id: its name), with its gpu/slow markers and skip reason."""
    return [pytest.param(row, id=row.name, marks=row.marks(requires)) for row in rows]


def over(rows, cases, small_cases=None, requires: tuple[str, ...] = (), ids=None) -> list:
    """pytest.params of (row, *case) for every row and case; a slow row takes `small_cases`
    (when given) instead of `cases`. A case is a value or a tuple of values."""
    out = []
    for row in rows:
        chosen = row.pick(cases, cases if small_cases is None else small_cases)
        for case in chosen:
            values = case if isinstance(case, tuple) else (case,)
            label = ids(case) if ids else "-".join(_id(v) for v in values)
            out.append(pytest.param(row, *values, id=f"{row.name}-{label}",
                                    marks=row.marks(requires)))
    return out


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return str(value)
