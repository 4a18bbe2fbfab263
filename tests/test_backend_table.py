"""The table of tests/backends.py agrees with the package: every backend has a row, the rows
that run here are the backends that are built, and each row's capabilities are the ones its
backend declares."""
from __future__ import annotations

import pytest
import torch

import mgpp_kernels
from mgpp_kernels.backends import BACKENDS, load_backend

import backends


def test_every_backend_of_the_package_has_a_row():
    assert tuple(row.name for row in backends.ROWS) == tuple(BACKENDS)


def test_the_rows_that_run_here_are_the_available_backends():
    runnable = [row.name for row in backends.ROWS if row.unavailable is None]
    available = mgpp_kernels.available_backends()
    # triton's kernels may be importable without a device to run them on (no interpreter, no GPU)
    assert set(runnable) <= set(available)
    assert set(available) - set(runnable) <= {"triton"}
    assert backends.REFERENCE.unavailable is None


@pytest.mark.parametrize("row", backends.params(backends.ROWS))
def test_a_row_declares_what_its_backend_declares(row):
    backend = load_backend(row.name)
    assert backend.name == row.name
    assert getattr(backend, "ranks_across_processes", False) == row.ranks_across_processes
    assert backend.schedules_on_device == row.schedules_on_device
    assert backend.ranks_nm_pools == row.ranks_nm_pools
    if row.device == "cuda":
        assert torch.cuda.is_available()
    for dtype in row.dtypes:
        backend.check_params([torch.zeros(3, dtype=dtype, device=row.device)])
    for dtype in {torch.float32, torch.bfloat16, torch.float16, torch.float64} - set(row.dtypes):
        with pytest.raises(ValueError):
            backend.check_params([torch.zeros(3, dtype=dtype, device=row.device)])


def test_skipped_rows_say_why():
    for row in backends.ROWS:
        skips = [m for m in row.marks() if m.name == "skip"]
        assert bool(skips) == (row.unavailable is not None)
        for mark in skips:
            assert row.name in mark.kwargs["reason"] and mark.kwargs["reason"].strip()
    for row in backends.ROWS:
        if not row.ranks_across_processes:
            reasons = [m.kwargs["reason"] for m in row.marks(("ranks_across_processes",))
                       if m.name == "skip"]
            assert any("ranks_across_processes" in r for r in reasons)
