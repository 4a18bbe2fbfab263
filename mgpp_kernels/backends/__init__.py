"""The registry of backends: one implementation of an MGPP step each (a module of this package
exporting BACKEND), all with the same inputs and results (mgpp_kernels.backends.types).

The optimizer gathers a step's tensors into UpdateGroups and, for each pool that prunes, a
PruneEvent; a backend updates every group (counting the ranking histogram of candidate groups on
an event step, per pool), then for each event selects τ over its pool's candidates and zeroes the
magnitudes below it.
"""
from __future__ import annotations

import importlib
import warnings
from typing import ClassVar, Protocol

import torch

from .device_schedule import DeviceSchedule
from .types import PruneEvent, Threshold, UpdateGroup


class Backend(Protocol):
    """The interface every backend implements."""

    name: str
    # The optimizer keeps step counts on the parameters' device (else on the CPU, as torch does).
    steps_on_device: ClassVar[bool]
    # PruneEvent.process_group is supported: τ ranks the shards of every rank.
    ranks_across_processes: ClassVar[bool]
    # step() takes a DeviceSchedule: the schedule position and found_inf are read on the device.
    schedules_on_device: ClassVar[bool]
    # PruneEvent.pattern may be N:M (docs/spec.md §5).
    ranks_nm_pools: ClassVar[bool]

    def check_params(self, params: list[torch.Tensor]) -> None:
        """Raises ValueError when this backend cannot run on these parameters."""

    def step(self, groups: list[UpdateGroup], events: list[PruneEvent],
             grad_scale: torch.Tensor | None,
             schedule: DeviceSchedule | None = None) -> list[Threshold] | None:
        """Updates every group in place, then prunes each event's pool; returns the events'
        thresholds, in order.

        Without `schedule`, the host has planned the step (the groups' λ_t, the events' k).
        With one (started; schedules_on_device only), t, λ_t's c1, each event's k and the
        freeze are read on the device from its pool's buffers (schedule.pools, in the order of
        the events), nothing moves when its found_inf is nonzero, and the thresholds stay in the
        buffers (None is returned).
        """

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        """τ over the tensors without changing them (0-dim float32)."""


BACKENDS = ("reference", "cpu", "triton", "cuda")
# Fastest first, per device type: what "auto" picks among the backends that are built.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here."""


_BUILD_HINTS = {
    "cpu": "the cpu backend needs the compiled extension mgpp_kernels._C: run "
           "`pip install --no-build-isolation -e .` in the repository (or `make run`)",
    "cuda": "the cuda backend needs a CUDA device and mgpp_kernels._C built with its CUDA kernels: "
            "a CUDA build of torch and nvcc (set CUDA_HOME to the toolkit), then "
            "`pip install --no-build-isolation -e .` (the build prints why it skips CUDA)",
    "triton": "the triton backend needs the `triton` package (`pip install triton`); it runs on "
              "CUDA tensors, or on CPU tensors through the interpreter when TRITON_INTERPRET=1 "
              "is set before triton is imported",
}


def load_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as error:
        raise BackendUnavailableError(
            f"backend {name!r} is not built ({error}); {_BUILD_HINTS.get(name, '')}") from error
    return module.BACKEND


def available_backends() -> list[str]:
    names = []
    for name in BACKENDS:
        try:
            load_backend(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def auto_backend(device: torch.device) -> Backend:
    skipped = []
    for name in AUTO_ORDER.get(device.type, ()):
        try:
            backend = load_backend(name)
        except BackendUnavailableError as error:
            skipped.append(str(error))
            continue
        if skipped:
            warnings.warn(f"MGPP backend 'auto' falls back to {name!r}: " + "; ".join(skipped),
                          stacklevel=3)
        return backend
    raise BackendUnavailableError(f"no MGPP backend runs on {device.type} tensors")
