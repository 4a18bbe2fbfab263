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


def _is_dtensor(t: torch.Tensor) -> bool:
    # FSDP2 (fully_shard) parameters are DTensors. torch.distributed.tensor is imported only when
    # a tensor subclass shows up, which keeps `import mgpp_kernels` light.
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view the kernels update in place); other tensors as is."""
    return t.to_local() if _is_dtensor(t) else t


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
                 backend: str = "auto", process_group: Any = None, use_prior: bool = True):
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
        # The group over which τ is ranked: None for one process; set by process_group=, or by the
        # device mesh of DTensor candidates (FSDP2), whose shards then rank as one model.
        self._process_group = process_group
        self._sharded_by_mesh = False
        self._dtensor_candidates: bool | None = None
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
        if isinstance(params, set):
            raise TypeError("a param group's params must be an ordered collection (a set's order "
                            "changes between runs, which breaks state_dict); use a list")
        # A generator (model.parameters()) can be read only once: keep the list for torch.
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group["params"] = params
        if "prune" in param_group and not isinstance(param_group["prune"], bool):
            raise ValueError(f"a param group's prune must be a bool, got {param_group['prune']!r}")
        _check_adamw_hyperparameters(param_group.get("lr", self.defaults["lr"]),
                                     param_group.get("betas", self.defaults["betas"]),
                                     param_group.get("eps", self.defaults["eps"]),
                                     param_group.get("weight_decay", self.defaults["weight_decay"]))
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a param group lists the same parameter more than once")
        existing = [p for group in self.param_groups for p in group["params"]]
        self._check_params(existing + params)
        sharding = (self._sharding_with(params) if param_group.get("prune", self.defaults["prune"])
                    else (self._dtensor_candidates, self._process_group, self._sharded_by_mesh))
        if sharding[1] is not None and self._backend is not None and not getattr(
                self._backend, "ranks_across_processes", False):
            raise ValueError(f"the {self._backend.name} backend cannot rank candidates across "
                             f"processes (process_group=); use 'cpu' or 'reference'")
        super().add_param_group(param_group)
        self._dtensor_candidates, self._process_group, self._sharded_by_mesh = sharding

    def _sharding_with(self, candidates: list[torch.Tensor]) -> tuple[bool | None, Any, bool]:
        """(candidates are DTensors, the ranking group, whether it is their mesh's) once these
        candidates join. Candidates are all DTensors (FSDP2) or none; without process_group=,
        DTensor candidates must be shards on one 1-D device mesh, whose group then ranks them."""
        dtensors, group, by_mesh = (self._dtensor_candidates, self._process_group,
                                    self._sharded_by_mesh)
        kinds = {_is_dtensor(p) for p in candidates}
        if len(kinds) > 1 or (kinds and dtensors not in (None, *kinds)):
            raise ValueError("MGPP's candidates must be all DTensors (FSDP2) or none")
        if kinds:
            dtensors = kinds.pop()
        if not dtensors or (group is not None and not by_mesh):
            return dtensors, group, by_mesh
        from torch.distributed.tensor import Shard
        for p in candidates:
            if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard):
                raise ValueError(f"MGPP ranks DTensor candidates sharded on a 1-D device mesh "
                                 f"(fully_shard); got placements {p.placements} on a "
                                 f"{p.device_mesh.ndim}-D mesh: pass process_group= with the "
                                 f"group whose ranks hold disjoint shards")
            mesh_group = p.device_mesh.get_group()
            if group not in (None, mesh_group):
                raise ValueError("MGPP's DTensor candidates must share one device mesh")
            group, by_mesh = mesh_group, True
        return dtensors, group, by_mesh

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
            self._backend.check_params([_local(p) for p in params])

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

    def _step_device(self, p: torch.Tensor) -> torch.device:
        # Kernels that count steps on the device (the cuda backend) keep them there, so that
        # reading one never waits for the GPU; the others keep them on the host, as torch does.
        return p.device if getattr(self._backend, "steps_on_device", False) else torch.device("cpu")

    def _state_dtype_of(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if self._state_dtype is torch.float32 else p.dtype

    # ---- the step ------------------------------------------------------------------------------

    # Under torch.compile the step runs eagerly: Dynamo does not carry the schedule position (a
    # Python attribute) out of a compiled optimizer step, and the fused kernels gain nothing.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        point = reference.schedule_at(self.config, self._schedule_step)
        self._check_grads()
        for group in self.param_groups:  # LR schedulers and users change these between steps
            _check_adamw_hyperparameters(group["lr"], group["betas"], group["eps"],
                                         group["weight_decay"])
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.any()):
            return loss  # a skipped step: nothing moves, the schedule does not advance
        # Each parameter's local tensor, made once: a backend tells the candidates it updated
        # from the others by identity (DTensor.to_local() returns a new object on every call).
        local_of = {id(p): _local(p) for group in self.param_groups for p in group["params"]}
        groups = self._update_groups(point, local_of)
        candidates = self._candidates()
        local_candidates = [local_of[id(p)] for p in candidates]
        event = None
        if point.prune_to is not None:
            k = reference.prune_count(self._global_numel(local_candidates), point.prune_to)
            if k > 0:
                in_groups = {id(p) for g in groups if g.count for p in g.params}
                uncounted = [p for p in local_candidates if id(p) not in in_groups]
                event = PruneEvent(params=local_candidates, uncounted=uncounted, k=k,
                                   process_group=self._process_group)
                if point.freeze:
                    event.keep_masks = [torch.empty(_packed_mask_bytes(p.numel()),
                                                    dtype=torch.uint8, device=p.device)
                                        for p in local_candidates]
        threshold = self._backend.step(groups, event, grad_scale)
        if event is not None:
            self._last_target = point.prune_to
            self._last_threshold = threshold
            for p, mask in zip(candidates, event.keep_masks):
                self.state[p]["keep_mask"] = mask
        self._lambda_t = point.lambda_t
        self._schedule_step += 1
        return loss

    def _global_numel(self, local_candidates: list[torch.Tensor]) -> int:
        """N: the candidates' element count, summed over the process group's shards."""
        numel = sum(p.numel() for p in local_candidates)
        if self._process_group is None:
            return numel
        total = torch.tensor([numel], dtype=torch.int64)
        torch.distributed.all_reduce(total, group=self._process_group)
        return int(total)

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

    def _update_groups(self, point: reference.SchedulePoint,
                       local_of: dict[int, torch.Tensor]) -> list[UpdateGroup]:
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
                grads = [_local(p.grad) for p in params]
                lr = group["lr"]
                groups.append(UpdateGroup(
                    params=[local_of[id(p)] for p in params],
                    grads=[g if g.is_contiguous() else g.contiguous() for g in grads],
                    exp_avgs=[_local(s["exp_avg"]) for s in states],
                    exp_avg_sqs=[_local(s["exp_avg_sq"]) for s in states],
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
            state["step"] = torch.zeros((), dtype=torch.float32, device=self._step_device(p))
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
                    state[key] = value.detach().to(device=self._step_device(p), dtype=torch.float32,
                                                   copy=True)
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
                    expected = ((_packed_mask_bytes(_local(p).numel()),) if key == "keep_mask"
                                else () if key == "step" else tuple(p.shape))
                    if tuple(value.shape) != expected:
                        raise ValueError(f"param group {g} parameter {j}: state '{key}' has shape "
                                         f"{tuple(value.shape)} in the state_dict, {expected} "
                                         f"expected for a parameter of shape {tuple(p.shape)}")
        return param_of

    # ---- copying and pickling ------------------------------------------------------------------

    _PICKLED = ("config", "_state_dtype", "_backend_name", "_schedule_step", "_last_target",
                "_last_threshold", "_lambda_t", "_process_group", "_sharded_by_mesh",
                "_dtensor_candidates", "use_prior")

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and param_groups; the schedule position and
        # settings must survive copy.deepcopy and torch.save of the optimizer object too.
        if self._process_group is not None:
            raise TypeError("an MGPP optimizer with a process group cannot be copied or pickled "
                            "(a process group cannot): save and load its state_dict() instead")
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in self._PICKLED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        params = [p for group in self.param_groups for p in group["params"]]
        self._backend = (auto_backend(params[0].device) if self._backend_name == "auto"
                         else load_backend(self._backend_name))

    # ---- logging -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Pruning progress for logs: stage, target and achieved sparsity, τ and λ_t.

        ``sparsity`` counts the exact zeros among the candidates now (one pass over them), so call
        this when logging, not every step; with a process group, among this rank's shards.
        """
        candidates = [_local(p) for p in self._candidates()]
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
