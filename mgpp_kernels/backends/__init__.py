"""The backends: one implementation of an MGPP step each, all with the same inputs and results.

The optimizer gathers a step's tensors into UpdateGroups and, on a pruning event, a PruneEvent;
a backend updates every group (counting the ranking histogram of candidate groups on an event
step), then selects τ over all candidates and zeroes the magnitudes below it.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
# Fastest first, per device type: what "auto" picks among the backends that are built.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but is not built or cannot run here."""


@dataclass(frozen=True)
class Prior:
    lambda_t: float
    sigma0_sq: float
    sigma1_sq: float
    num_train_examples: int


@dataclass
class UpdateGroup:
    """Parameters of one dtype-agnostic param group that have a gradient this step."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    state_steps: list[torch.Tensor]
    keep_masks: list[torch.Tensor]   # one per parameter after the freeze, else empty
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    prior: Prior | None              # None: plain AdamW (non-candidates, or after t_end)
    count: bool                      # candidates on an event step: rank their updated values


@dataclass
class PruneEvent:
    params: list[torch.Tensor]       # every candidate, with or without a gradient
    uncounted: list[torch.Tensor]    # candidates in no UpdateGroup (no gradient this step)
    k: int                           # τ is the k-th smallest |θ|, 1 <= k <= N
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # filled at the freeze
    # With a torch.distributed process group, `params` are this rank's shards and τ ranks the
    # shards of every rank (N and k are already global); backends that support this say so with
    # `ranks_across_processes = True`.
    process_group: Any = None


@dataclass(frozen=True)
class Threshold:
    tau: torch.Tensor                # 0-dim float32, on the parameters' device
    below: torch.Tensor              # 0-dim int64: how many candidates had |θ| < τ


class Backend(Protocol):
    name: str

    def check_params(self, params: list[torch.Tensor]) -> None:
        """Raises ValueError when this backend cannot run on these parameters."""

    def step(self, groups: list[UpdateGroup], event: PruneEvent | None,
             grad_scale: torch.Tensor | None) -> Threshold | None:
        """Updates every group in place; on an event, prunes and returns the threshold."""

    def global_threshold(self, tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        """τ over the tensors without changing them (0-dim float32)."""


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
