"""MGPP's state_dict layout: torch's (state, param_groups) plus an "mgpp" entry with the schedule
position and the last threshold, and the checks that a saved state fits this optimizer's
parameters before anything is loaded."""
from __future__ import annotations

from typing import Any

import torch

from .backends.types import Threshold
from .masks import packed_mask_bytes
from .sharding import local

KEY = "mgpp"


def schedule_entry(schedule_step: int, total_steps: int | None, lambda_t: float,
                   last_target: float | None, last_threshold: Threshold | None) -> dict[str, Any]:
    return {
        "schedule_step": schedule_step,
        "total_steps": total_steps,
        "lambda_t": lambda_t,
        "last_target": last_target,
        "last_tau": None if last_threshold is None else last_threshold.tau.clone(),
        "last_below": None if last_threshold is None else last_threshold.below.clone(),
    }


def saved_threshold(entry: dict[str, Any], device: torch.device) -> Threshold | None:
    if entry["last_tau"] is None:
        return None
    return Threshold(tau=entry["last_tau"].to(device), below=entry["last_below"].to(device))


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
