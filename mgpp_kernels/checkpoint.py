"""MGPP's state_dict layout: torch's (state, param_groups) plus an "mgpp" entry with the run's
Progress (the schedule position and the last threshold), and the checks that a saved state fits
this optimizer's parameters before anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .backends.types import Threshold
from .masks import packed_mask_bytes
from .sharding import local

KEY = "mgpp"


@dataclass(frozen=True)
class PoolEvent:
    """A pool's last event: its target sparsity, its threshold and N (the pool's elements it
    ranked, over every rank), and the τ of the pool's event before it, None where unknown (not
    saved: it only sizes the next event's predicted window, see PruneEvent.recent_taus)."""

    target: float
    threshold: Threshold
    numel: int | None
    tau_before: torch.Tensor | None = None


@dataclass(frozen=True)
class Progress:
    """Where a run stands after its last step: t (the steps taken, skipped ones not counted),
    that step's λ_t, and each pool's last event (None before its first), in pool order."""

    t: int
    lambda_t: float
    last_events: tuple[PoolEvent | None, ...] = ()

    def last_event(self, pool: int) -> PoolEvent | None:
        return self.last_events[pool] if pool < len(self.last_events) else None


def schedule_entry(progress: Progress, total_steps: int | None,
                   pool_names: list[str]) -> dict[str, Any]:
    pools = []
    for i, name in enumerate(pool_names):
        event = progress.last_event(i)
        pools.append({
            "pool": name,
            "last_target": None if event is None else event.target,
            "last_tau": None if event is None else event.threshold.tau.clone(),
            "last_pruned": None if event is None else event.threshold.pruned.clone(),
            "last_numel": None if event is None else event.numel,
        })
    return {"schedule_step": progress.t, "total_steps": total_steps,
            "lambda_t": progress.lambda_t, "pools": pools}


def saved_progress(entry: dict[str, Any], device: torch.device,
                   pool_names: list[str]) -> Progress:
    """The Progress of a saved "mgpp" entry, once its pools are known to be this optimizer's."""
    saved_pools = entry.get("pools")
    if saved_pools is None:
        # Saved before pools: one pool's last event, if any, at the entry's top level.
        saved_pools = ([dict(entry, last_pruned=entry["last_below"])]
                       if entry.get("last_tau") is not None
                       else [{"last_tau": None}] * len(pool_names))
    names = [saved.get("pool") for saved in saved_pools]
    if len(saved_pools) != len(pool_names) or any(
            name is not None and name != expected for name, expected in zip(names, pool_names)):
        raise ValueError(f"the state_dict's pools {names} are not this optimizer's {pool_names} "
                         f"(pattern, initial and final sparsity of its pruned param groups)")
    events = []
    for saved in saved_pools:
        if saved["last_tau"] is None:
            events.append(None)
            continue
        # An entry saved before last_numel was recorded has none: N is known again at the next
        # event.
        events.append(PoolEvent(target=saved["last_target"],
                                threshold=Threshold(tau=saved["last_tau"].to(device),
                                                    pruned=saved["last_pruned"].to(device)),
                                numel=saved.get("last_numel")))
    return Progress(t=entry["schedule_step"], lambda_t=entry["lambda_t"],
                    last_events=tuple(events))


def check_layout(state_dict: dict[str, Any],
                 param_groups: list[dict[str, Any]]) -> dict[int, torch.Tensor]:
    """The parameter of every saved state index, once the saved groups, their sizes and every
    state tensor's shape are known to fit `param_groups`; a ValueError naming the first misfit."""
    if KEY not in state_dict:
        raise ValueError("not an MGPP state_dict: it has no 'mgpp' entry")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"the state_dict has {len(saved_groups)} param groups, this optimizer "
                         f"{len(param_groups)}")
    param_of = {}
    for g, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {g} has {len(saved['params'])} parameters in the "
                             f"state_dict, {len(group['params'])} here")
        if saved.get("prune", False) != group["prune"]:
            raise ValueError(f"param group {g} has prune={saved.get('prune', False)} in the "
                             f"state_dict, prune={group['prune']} here")
        for j, (index, p) in enumerate(zip(saved["params"], group["params"])):
            param_of[index] = p
            for key, value in saved_state.get(index, {}).items():
                expected = ((packed_mask_bytes(local(p).numel()),) if key == "keep_mask"
                            else () if key == "step" else tuple(p.shape))
                if tuple(value.shape) != expected:
                    raise ValueError(f"param group {g} parameter {j}: state '{key}' has shape "
                                     f"{tuple(value.shape)} in the state_dict, {expected} "
                                     f"expected for a parameter of shape {tuple(p.shape)}")
    return param_of


def load_state(saved: dict[str, torch.Tensor], p: torch.Tensor, step_device: torch.device,
               state_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One parameter's saved state as this optimizer keeps it. torch's loader would cast every
    floating state tensor to its parameter's dtype, which is wrong for float32 state of 16-bit
    parameters and for the uint8 masks."""
    state = {}
    for key, value in saved.items():
        if key == "step":
            state[key] = value.detach().to(device=step_device, dtype=torch.float32, copy=True)
        elif key == "keep_mask":
            state[key] = value.detach().to(device=p.device, dtype=torch.uint8, copy=True)
        else:
            state[key] = value.detach().to(device=p.device, dtype=state_dtype, copy=True)
    return state
