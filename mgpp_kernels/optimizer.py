"""MGPP: AdamW with a spike-and-slab prior on the pruning candidates and global magnitude pruning
on a cubic schedule (SPEC §1-2), as a torch.optim.Optimizer."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim import Optimizer

from . import reference
from .backends import (BackendUnavailableError, Prior, PruneEvent, Threshold, UpdateGroup,
                       auto_backend, load_backend)
from .config import MGPPConfig

_CONFIG_KEYS = ("num_train_examples", "initial_warmup_steps", "total_steps", "final_warmup_steps",
                "pruning_interval", "initial_sparsity", "final_sparsity", "sigma0_sq", "sigma1_sq",
                "lambda_mix", "lambda_final_factor", "state_dtype", "backend", "use_prior")
_FP32_NAMES = (torch.float32, "fp32", "float32")


def _check_adamw_hyperparameters(lr, betas, eps, weight_decay) -> None:
    lr_value = float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
    for name, value in (("lr", lr_value), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")


def _packed_mask_bytes(numel: int) -> int:
    return (numel + 7) // 8


class MGPP(Optimizer):
    """Mixture Gaussian prior pruning on top of AdamW.

    Takes torch.optim.AdamW's arguments plus the keywords of SPEC §1. Param groups with
    ``prune=True`` hold the pruning candidates (see :func:`mgpp_kernels.param_groups`); every
    other parameter gets plain AdamW with its group's hyperparameters. ``use_prior=False`` keeps
    the schedule and the pruning but drops the prior: gradual magnitude pruning (GMP).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 num_train_examples: int, initial_warmup_steps: int, total_steps: int | None = None,
                 final_warmup_steps: int = 0, pruning_interval: int = 100,
                 initial_sparsity: float = 0.3, final_sparsity: float = 0.9,
                 sigma0_sq: float = 1e-10, sigma1_sq: float = 0.05, lambda_mix: float = 0.1,
                 lambda_final_factor: float = 1e-3, state_dtype: Any = torch.float32,
                 backend: str = "auto", use_prior: bool = True):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by MGPP (SPEC §2 is AdamW with "
                             "amsgrad=False)")
        if maximize:
            raise ValueError("maximize=True is not supported by MGPP")
        _check_adamw_hyperparameters(lr, betas, eps, weight_decay)
        self.config = MGPPConfig(
            num_train_examples=num_train_examples, initial_warmup_steps=initial_warmup_steps,
            total_steps=total_steps, final_warmup_steps=final_warmup_steps,
            pruning_interval=pruning_interval, initial_sparsity=initial_sparsity,
            final_sparsity=final_sparsity, sigma0_sq=sigma0_sq, sigma1_sq=sigma1_sq,
            lambda_mix=lambda_mix, lambda_final_factor=lambda_final_factor)
        if state_dtype in _FP32_NAMES:
            self._state_dtype = torch.float32
        elif state_dtype == "param" or state_dtype in (torch.bfloat16, torch.float16):
            self._state_dtype = state_dtype
        else:
            raise ValueError(f"state_dtype must be torch.float32 or 'param' (the parameter's "
                             f"dtype), got {state_dtype!r}")
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a string, got {backend!r}")
        if not isinstance(use_prior, bool):
            raise ValueError(f"use_prior must be a bool, got {use_prior!r}")
        # use_prior=False: the same schedule and pruning without the prior, i.e. gradual
        # magnitude pruning (GMP), the baseline MGPP is compared with.
        self.use_prior = use_prior
        self._backend_name = backend
        self._backend = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, prune=False)
        super().__init__(params, defaults)
        self._schedule_step = 0
        self._last_target: float | None = None
        self._last_threshold = None
        self._lambda_t = self.config.lambda_mix

    # ---- parameters ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in _CONFIG_KEYS:
            if key in param_group:
                raise ValueError(f"{key} is optimizer-wide: pass it to MGPP(...), not in a param "
                                 f"group")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if "prune" in param_group and not isinstance(param_group["prune"], bool):
            raise ValueError(f"a param group's prune must be a bool, got {param_group['prune']!r}")
        _check_adamw_hyperparameters(param_group.get("lr", self.defaults["lr"]),
                                     param_group.get("betas", self.defaults["betas"]),
                                     param_group.get("eps", self.defaults["eps"]),
                                     param_group.get("weight_decay", self.defaults["weight_decay"]))
        existing = [p for group in self.param_groups for p in group["params"]]
        self._check_params(existing + params)
        super().add_param_group(param_group)

    def _check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if not isinstance(p, torch.Tensor):
                continue  # torch's add_param_group names the offending type
            if p.is_complex():
                raise ValueError(f"MGPP does not support complex parameters, got {p.dtype}")
            if not p.is_floating_point():
                raise ValueError(f"MGPP optimizes floating-point parameters, got {p.dtype}")
            if isinstance(self._state_dtype, torch.dtype) and self._state_dtype not in (
                    torch.float32, p.dtype):
                raise ValueError(f"state_dtype={self._state_dtype} needs {self._state_dtype} "
                                 f"parameters, got {p.dtype}; use state_dtype='param' for state "
                                 f"in each parameter's own dtype")
        devices = {p.device for p in params if isinstance(p, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(f"MGPP's parameters must all be on one device, got "
                             f"{sorted(str(d) for d in devices)}")
        if devices:
            device = devices.pop()
            if self._backend is None:
                self._backend = (auto_backend(device) if self._backend_name == "auto"
                                 else load_backend(self._backend_name))
            self._backend.check_params(params)

    @property
    def backend(self) -> str:
        """The name of the backend that runs this optimizer's steps."""
        if self._backend is None:
            raise BackendUnavailableError("MGPP has no parameters yet, so no backend is chosen")
        return self._backend.name

    def set_total_steps(self, total_steps: int) -> None:
        """Sets T when it was not known at construction (the transformers callback does this)."""
        self.config = self.config.with_total_steps(total_steps)

    def _candidates(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups if group["prune"] for p in group["params"]]

    def _state_dtype_of(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self._state_dtype is torch.float32 else p.dtype

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        point = reference.schedule_at(self.config, self._schedule_step)
        self._check_grads()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.any()):
            return loss  # a skipped step: nothing moves, the schedule does not advance
        groups = self._update_groups(point)
        candidates = self._candidates()
        event = None
        if point.prune_to is not None:
            k = reference.prune_count(sum(p.numel() for p in candidates), point.prune_to)
            if k > 0:
                in_groups = {id(p) for g in groups if g.count for p in g.params}
                event = PruneEvent(params=candidates,
                                   uncounted=[p for p in candidates if id(p) not in in_groups], k=k)
                if point.freeze:
                    event.keep_masks = [torch.empty(_packed_mask_bytes(p.numel()),
                                                    dtype=torch.uint8, device=p.device)
                                        for p in candidates]
        threshold = self._backend.step(groups, event, grad_scale)
        if event is not None:
            self._last_target = point.prune_to
            self._last_threshold = threshold
            for p, mask in zip(candidates, event.keep_masks):
                self.state[p]["keep_mask"] = mask
        self._lambda_t = point.lambda_t
        self._schedule_step += 1
        return loss

    def _check_grads(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("MGPP does not support sparse gradients")
                if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
                    raise RuntimeError(f"a gradient of dtype {grad.dtype}, shape "
                                       f"{tuple(grad.shape)} on {grad.device} does not match its "
                                       f"parameter ({p.dtype}, {tuple(p.shape)}, {p.device})")

    def _update_groups(self, point: reference.SchedulePoint) -> list[UpdateGroup]:
        config = self.config
        prior = Prior(point.lambda_t, config.sigma0_sq, config.sigma1_sq,
                      config.num_train_examples)
        groups = []
        for group in self.param_groups:
            # Parameters with and without a frozen mask go to separate groups.
            by_mask: dict[bool, list[torch.Tensor]] = {False: [], True: []}
            for p in group["params"]:
                if p.grad is not None:
                    by_mask["keep_mask" in self.state[p]].append(p)
            for masked, params in by_mask.items():
                if not params:
                    continue
                states = [self._init_state(p) for p in params]
                lr = group["lr"]
                groups.append(UpdateGroup(
                    params=params,
                    grads=[p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params],
                    exp_avgs=[s["exp_avg"] for s in states],
                    exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                    state_steps=[s["step"] for s in states],
                    keep_masks=[s["keep_mask"] for s in states] if masked else [],
                    lr=float(lr), beta1=group["betas"][0], beta2=group["betas"][1],
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    prior=prior if group["prune"] and point.prior_on and self.use_prior else None,
                    count=group["prune"]))
        return groups

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            dtype = self._state_dtype_of(p)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                   memory_format=torch.contiguous_format)
        return state

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        threshold = self._last_threshold
        state_dict["mgpp"] = {
            "schedule_step": self._schedule_step,
            "total_steps": self.config.total_steps,
            "lambda_t": self._lambda_t,
            "last_target": self._last_target,
            "last_tau": None if threshold is None else threshold.tau.clone(),
            "last_below": None if threshold is None else threshold.below.clone(),
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "mgpp" not in state_dict:
            raise ValueError("not an MGPP state_dict: it has no 'mgpp' entry")
        saved_groups = state_dict["param_groups"]
        param_of = self._check_layout(saved_groups, state_dict["state"])
        # torch's loader would cast every floating state tensor to its parameter's dtype, which
        # is wrong for float32 state of 16-bit parameters and for the uint8 masks: load it here.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for index, saved in state_dict["state"].items():
            p = param_of[index]
            state = self.state[p]
            for key, value in saved.items():
                if key == "step":
                    state[key] = value.detach().to(torch.float32, copy=True)
                elif key == "keep_mask":
                    state[key] = value.detach().to(device=p.device, dtype=torch.uint8, copy=True)
                else:
                    state[key] = value.detach().to(device=p.device, dtype=self._state_dtype_of(p),
                                                   copy=True)
        extra = state_dict["mgpp"]
        if self.config.total_steps is None and extra["total_steps"] is not None:
            self.set_total_steps(extra["total_steps"])
        self._schedule_step = extra["schedule_step"]
        self._lambda_t = extra["lambda_t"]
        self._last_target = extra["last_target"]
        self._last_threshold = None
        if extra["last_tau"] is not None:
            device = self.param_groups[0]["params"][0].device
            self._last_threshold = Threshold(tau=extra["last_tau"].to(device),
                                             below=extra["last_below"].to(device))

    def _check_layout(self, saved_groups, saved_state) -> dict[int, torch.Tensor]:
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state_dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        param_of = {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {g} has {len(saved['params'])} parameters in the "
                                 f"state_dict, {len(group['params'])} here")
            if saved.get("prune", False) != group["prune"]:
                raise ValueError(f"param group {g} has prune={saved.get('prune', False)} in the "
                                 f"state_dict, prune={group['prune']} here")
            for j, (index, p) in enumerate(zip(saved["params"], group["params"])):
                param_of[index] = p
                for key, value in saved_state.get(index, {}).items():
                    expected = (_packed_mask_bytes(p.numel()),) if key == "keep_mask" else (
                        () if key == "step" else tuple(p.shape))
                    if tuple(value.shape) != expected:
                        raise ValueError(f"param group {g} parameter {j}: state '{key}' has shape "
                                         f"{tuple(value.shape)} in the state_dict, {expected} "
                                         f"expected for a parameter of shape {tuple(p.shape)}")
        return param_of

    # ---- logging -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Pruning progress for logs: stage, target and achieved sparsity, τ and λ_t.

        ``sparsity`` counts the exact zeros among the candidates now (one pass over them), so call
        this when logging, not every step.
        """
        candidates = self._candidates()
        numel = sum(p.numel() for p in candidates)
        zeros = sum(int((p == 0).sum()) for p in candidates)
        last = max(self._schedule_step - 1, 0)
        threshold = self._last_threshold
        return {
            "stage": reference.schedule_at(self.config, last).stage
            if self.config.total_steps is not None else "dense",
            "step": self._schedule_step,
            "target_sparsity": self._last_target or 0.0,
            "sparsity": zeros / numel if numel else 0.0,
            "tau": None if threshold is None else float(threshold.tau),
            "pruned": 0 if threshold is None else int(threshold.below),
            "lambda_t": self._lambda_t,
        }
