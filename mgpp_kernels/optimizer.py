"""MGPP: AdamW with a spike-and-slab prior on the pruning candidates and global magnitude pruning
on a cubic schedule (docs/spec.md §1-2), as a torch.optim.Optimizer.

The optimizer orchestrates: it validates its arguments (config), asks the schedule what step t
does (schedule) unless the schedule is on the device (backends.device_schedule), gathers the
step's tensors (backends.types) and hands them to the backend bound at construction; sharding and
the checkpoint layout live in their own modules.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
from torch.optim import Optimizer

from . import checkpoint
from .backends import Backend, auto_backend, load_backend
from .backends.device_schedule import DeviceSchedule
from .backends.types import Prior, PruneEvent, Threshold, UpdateGroup
from .config import MGPPConfig, check_adamw_hyperparameters
from .masks import packed_mask_bytes
from .checkpoint import PoolEvent, Progress
from .pools import Pool, check_pattern_fits, group_pool, pools_of
from .schedule import EventPlan, SchedulePoint, device_schedule_rows, schedule_at
from .sharding import Sharding, local

# initial_sparsity and final_sparsity are also a param group's (its pool's).
_CONFIG_KEYS = ("num_train_examples", "initial_warmup_steps", "total_steps", "final_warmup_steps",
                "pruning_interval", "sigma0_sq", "sigma1_sq", "lambda_mix", "lambda_final_factor",
                "state_dtype", "backend", "use_prior")
_FP32_NAMES = (torch.float32, "fp32", "float32")


def _check_adamw_switches(amsgrad, maximize, foreach, fused, capturable, differentiable) -> None:
    """torch.optim.AdamW's implementation switches: accepted where they mean what MGPP does (one
    fused pass over all tensors of a dtype), a ValueError where they ask for something else."""
    if amsgrad:
        raise ValueError("amsgrad=True is not supported by MGPP (docs/spec.md §2 is AdamW with "
                         "amsgrad=False)")
    if maximize:
        raise ValueError("maximize=True is not supported by MGPP")
    if foreach is False or fused is False:
        raise ValueError("MGPP always updates all tensors of a dtype in one fused pass: "
                         "foreach=False and fused=False have no meaning here (leave them unset)")
    if differentiable:
        raise ValueError("differentiable=True is not supported by MGPP (its kernels update in "
                         "place without autograd)")


def _first_device(params) -> torch.device | None:
    for group in params:
        tensors = group["params"] if isinstance(group, dict) else [group]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                return t.device
    return None


def _materialized(params) -> list:
    """The params argument with every generator read into a list: it is read twice, once for
    the device that binds the backend. Sets stay sets, for add_param_group to refuse."""
    def group_params(tensors):
        if isinstance(tensors, torch.Tensor):
            return [tensors]
        return tensors if isinstance(tensors, set) else list(tensors)

    return [dict(group, params=group_params(group["params"])) if isinstance(group, dict)
            else group for group in params]


def _keep_everything_mask(numel: int, device: torch.device) -> torch.Tensor:
    """The packed mask that keeps all `numel` elements, its padding bits zero (masks.pack_mask's
    layout)."""
    mask = torch.full((packed_mask_bytes(numel),), 255, dtype=torch.uint8, device=device)
    if numel % 8:
        mask[-1] = (1 << numel % 8) - 1
    return mask


def _bind_backend(name: Any, device: torch.device | None) -> Backend | None:
    """The backend called `name`, or auto's choice for `device` (None without a device: there
    is no parameter, which torch's Optimizer reports)."""
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {name!r}")
    if name != "auto":
        return load_backend(name)
    return None if device is None else auto_backend(device)


class MGPP(Optimizer):
    """Mixture Gaussian prior pruning on top of AdamW.

    Takes torch.optim.AdamW's arguments plus the keywords of docs/spec.md §1. Param groups with
    ``prune=True`` hold the pruning candidates (see :func:`mgpp_kernels.param_groups`); they may
    carry ``pattern`` ("unstructured" or "N:M" such as "2:4"), ``initial_sparsity`` and
    ``final_sparsity``, and the groups that share all three form a pool, pruned to its own
    targets with its own τ (docs/spec.md §5). Every other parameter gets plain AdamW with its
    group's hyperparameters. ``use_prior=False`` keeps
    the schedule and the pruning but drops the prior: gradual magnitude pruning (GMP).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 num_train_examples: int, initial_warmup_steps: int, total_steps: int | None = None,
                 final_warmup_steps: int = 0, pruning_interval: int = 100,
                 initial_sparsity: float = 0.3, final_sparsity: float = 0.9,
                 sigma0_sq: float = 1e-10, sigma1_sq: float = 0.05, lambda_mix: float = 0.1,
                 lambda_final_factor: float = 1e-3, state_dtype: Any = torch.float32,
                 backend: str = "auto", process_group: Any = None, use_prior: bool = True):
        _check_adamw_switches(amsgrad, maximize, foreach, fused, capturable, differentiable)
        check_adamw_hyperparameters(lr, betas, eps, weight_decay)
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
        if not isinstance(use_prior, bool):
            raise ValueError(f"use_prior must be a bool, got {use_prior!r}")
        # use_prior=False: the same schedule and pruning without the prior, i.e. gradual
        # magnitude pruning (GMP), the baseline MGPP is compared with.
        self.use_prior = use_prior
        params = _materialized(params)
        self._backend_name = backend
        self._backend = _bind_backend(backend, _first_device(params))
        if capturable and self._backend is not None and not self._backend.schedules_on_device:
            raise ValueError(f"capturable=True needs a backend that keeps the schedule and "
                             f"GradScaler's found_inf on the device (cpu, cuda, triton); the "
                             f"{self._backend.name} backend reads them on the host")
        self._sharding = Sharding(group=process_group)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, prune=False)
        super().__init__(params, defaults)
        if self._backend is None:
            raise ValueError("MGPP got no parameters: backend='auto' needs one to choose")
        if not self._candidates():
            warnings.warn("MGPP: no param group has prune=True, so nothing is pruned (this is "
                          "plain AdamW); pass mgpp_kernels.param_groups(model) to mark the "
                          "weight matrices as pruning candidates", UserWarning, stacklevel=2)
        # Where the run stands; while the schedule is on the device, as of the last read-back.
        self._progress = Progress(t=0, lambda_t=self.config.lambda_mix)
        self._device_schedule = DeviceSchedule(on=capturable)

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
        prune = param_group.get("prune", self.defaults["prune"])
        if not isinstance(prune, bool):
            raise ValueError(f"a param group's prune must be a bool, got {prune!r}")
        check_adamw_hyperparameters(param_group.get("lr", self.defaults["lr"]),
                                    param_group.get("betas", self.defaults["betas"]),
                                    param_group.get("eps", self.defaults["eps"]),
                                    param_group.get("weight_decay", self.defaults["weight_decay"]))
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a param group lists the same parameter more than once")
        existing = [p for group in self.param_groups for p in group["params"]]
        self._check_params(existing + params)
        pool = group_pool(param_group, self.config)
        if pool is not None and pool.pattern is not None:
            if self._backend is not None and not self._backend.ranks_nm_pools:
                raise ValueError(f"the {self._backend.name} backend does not rank N:M pools "
                                 f"(pattern={pool.pattern})")
            check_pattern_fits(pool.pattern, params, [local(p) for p in params])
        sharding = self._sharding.with_candidates(params) if prune else self._sharding
        if sharding.group is not None and not self._backend.ranks_across_processes:
            raise ValueError(f"the {self._backend.name} backend cannot rank candidates across "
                             f"processes (process_group=)")
        if prune and hasattr(self, "_device_schedule"):
            self._stop_device_schedule()   # N changes: the next step tabulates the schedule anew
        super().add_param_group(param_group)
        self._sharding = sharding

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
        if self._backend is not None:
            self._backend.check_params([local(p) for p in params if isinstance(p, torch.Tensor)])

    @property
    def backend(self) -> str:
        """The name of the backend that runs this optimizer's steps."""
        return self._backend.name

    def set_total_steps(self, total_steps: int) -> None:
        """Sets T when it was not known at construction (the transformers callback does this)."""
        self.config = self.config.with_total_steps(total_steps)
        self._stop_device_schedule()

    def _candidates(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups if group["prune"] for p in group["params"]]

    def _pools(self) -> tuple[list[Pool], list[int | None], list[list[torch.Tensor]]]:
        """The pools (checked when their groups were added), each param group's pool index
        (None without prune=True) and each pool's candidates."""
        pools, pool_of_group = pools_of(self.param_groups, self.config)
        members: list[list[torch.Tensor]] = [[] for _ in pools]
        for group, index in zip(self.param_groups, pool_of_group):
            if index is not None:
                members[index].extend(group["params"])
        return pools, pool_of_group, members

    def _step_device(self, p: torch.Tensor) -> torch.device:
        # Kernels that count steps on the device keep them there, so that reading one never
        # waits for the GPU; the others keep them on the host, as torch does.
        return p.device if self._backend.steps_on_device else torch.device("cpu")

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
        self._check_grads()
        for group in self.param_groups:  # LR schedulers and users change these between steps
            check_adamw_hyperparameters(group["lr"], group["betas"], group["eps"],
                                        group["weight_decay"], read_tensor_lr=False)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        schedule = self._device_schedule
        # Reading found_inf on the host would wait for the device where the backend keeps its
        # step counts on it (cuda, triton); the cpu backend reads it for free and keeps its
        # host schedule (and one-pass events) unless capturable=True.
        if (found_inf is not None and self._backend.schedules_on_device
                and self._backend.steps_on_device):
            schedule.switch_on()
        # Each parameter's local tensor, made once: a backend tells the candidates it updated
        # from the others by identity (DTensor.to_local() returns a new object on every call).
        local_of = {id(p): local(p) for group in self.param_groups for p in group["params"]}
        pools, pool_of_group, members = self._pools()
        if schedule.on:
            self._start_device_schedule(pools, members, local_of)
            schedule.found_inf = found_inf
            point = plans = None
            # Every pool's event ops run at every step; the device reads whether they prune.
            event_pools = [i for i, candidates in enumerate(members) if candidates]
        else:
            point = schedule_at(self.config, self._progress.t)
            if found_inf is not None and bool(found_inf.any()):
                return loss  # a skipped step: nothing moves, the schedule does not advance
            plans = [self._plan_event(point, pool, [local_of[id(p)] for p in candidates])
                     for pool, candidates in zip(pools, members)]
            event_pools = [i for i, plan in enumerate(plans) if plan is not None]
        event_of_pool = {pool: e for e, pool in enumerate(event_pools)}
        groups = self._update_groups(point, local_of,
                                     [event_of_pool.get(index) for index in pool_of_group])
        events = [self._prune_event(pools[i], None if plans is None else plans[i], members[i],
                                    local_of, on_device=schedule.on,
                                    previous=self._progress.last_event(i)) for i in event_pools]
        thresholds = self._backend.step(groups, events, grad_scale,
                                        schedule if schedule.on else None)
        if point is not None:
            last_events = [self._progress.last_event(i) for i in range(len(pools))]
            for i, event, threshold in zip(event_pools, events, thresholds):
                previous = last_events[i]
                last_events[i] = PoolEvent(target=plans[i].sparsity, threshold=threshold,
                                           numel=plans[i].numel, tau_before=None
                                           if previous is None else previous.threshold.tau)
                for p, mask in zip(members[i], event.keep_masks):
                    self.state[p]["keep_mask"] = mask
            self._progress = replace(self._progress, t=point.t + 1, lambda_t=point.lambda_t,
                                     last_events=tuple(last_events))
        return loss

    def _plan_event(self, point: SchedulePoint, pool: Pool,
                    local_candidates: list[torch.Tensor]) -> EventPlan | None:
        """The event of a pool at host schedule point `point`; N over every rank only where it
        prunes (with a process group, counting N is a collective)."""
        if pool.target(point) is None:
            return None
        return pool.plan(point, self._sharding.global_numel(local_candidates))

    def _prune_event(self, pool: Pool, plan: EventPlan | None, candidates: list[torch.Tensor],
                     local_of: dict[int, torch.Tensor], on_device: bool,
                     previous: PoolEvent | None) -> PruneEvent:
        """A pool's pruning event: on the host schedule, the one `plan` says (fresh keep masks
        at the freeze), with the τs of the pool's `previous` event and of the one before it; on
        the device schedule, one at every step, with the candidates' keep masks, whose k the
        device reads."""
        local_candidates = [local_of[id(p)] for p in candidates]
        if on_device:
            keep_masks = [self.state[p]["keep_mask"] for p in candidates]
        elif plan.freeze:
            keep_masks = [torch.empty(packed_mask_bytes(p.numel()), dtype=torch.uint8,
                                      device=p.device) for p in local_candidates]
        else:
            keep_masks = []
        recent_taus = () if on_device or previous is None else tuple(
            tau for tau in (previous.threshold.tau, previous.tau_before) if tau is not None)
        return PruneEvent(params=local_candidates, k=None if on_device else plan.k,
                          keep_masks=keep_masks, process_group=self._sharding.group,
                          pattern=pool.pattern, recent_taus=recent_taus)

    def _start_device_schedule(self, pools: list[Pool], members: list[list[torch.Tensor]],
                               local_of: dict[int, torch.Tensor]) -> None:
        """Starts the device schedule from the host's progress, unless it runs. Every candidate
        gets a keep mask in its state: all ones (keeping every element) until the freeze, which
        writes it on the device, so that the step's kernels and memory are the same before and
        after the freeze."""
        schedule = self._device_schedule
        if schedule.started:
            return
        device = next(local_of[id(p)].device for g in self.param_groups for p in g["params"])
        # One table per pool that has candidates, in the order of the step's events.
        active = [i for i, candidates in enumerate(members) if candidates]
        tables, numels = [], []
        for i in active:
            numel = self._sharding.global_numel([local_of[id(p)] for p in members[i]])
            tables.append(device_schedule_rows(
                self.config, lambda point, pool=pools[i], numel=numel: pool.plan(point, numel)))
            numels.append(numel)
        last = [self._progress.last_event(i) for i in active]
        inclusive = [pools[i].pattern is not None for i in active]
        if not active:   # t still moves on the device, with the skip flag and the prior's row
            tables = [device_schedule_rows(self.config, lambda point: None)]
            numels, last, inclusive = [0], [None], [False]
        schedule.start(tables, numels, inclusive, self._progress.t,
                       [None if e is None else e.threshold for e in last], device)
        for p in (p for candidates in members for p in candidates):
            if "keep_mask" not in self.state[p]:
                self.state[p]["keep_mask"] = _keep_everything_mask(local_of[id(p)].numel(),
                                                                   device)

    def _read_device_schedule(self) -> None:
        """The host's progress read from the device schedule, when it runs: for stats() and
        state_dict(), never in step()."""
        schedule = self._device_schedule
        if not schedule.started:
            return
        t, last_positions = schedule.read()
        lambda_t = schedule_at(self.config, t - 1).lambda_t if t > 0 else self.config.lambda_mix
        pools, _, members = self._pools()
        active = [i for i, candidates in enumerate(members) if candidates]
        last_events = [self._progress.last_event(i) for i in range(len(pools))]
        for i, pool_schedule, position in zip(active, schedule.pools, last_positions):
            if position is not None:
                last_events[i] = PoolEvent(
                    target=pools[i].target(schedule_at(self.config, position)),
                    threshold=pool_schedule.threshold(), numel=pool_schedule.numel)
        self._progress = replace(self._progress, t=t, lambda_t=lambda_t,
                                 last_events=tuple(last_events))

    def _stop_device_schedule(self) -> None:
        """Reads the device schedule back and drops its buffers (N or T change): the next step
        on the device starts it anew."""
        self._read_device_schedule()
        self._device_schedule.discard()

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

    def _update_groups(self, point: SchedulePoint | None, local_of: dict[int, torch.Tensor],
                       event_of_group: list[int | None]) -> list[UpdateGroup]:
        """The step's UpdateGroups at host schedule point `point`, or on the device schedule
        (point None: λ_t and whether the prior is on come from the device); a param group's
        candidates count into the ranking of its pool's event, `event_of_group` (its index
        among the step's events, None without one)."""
        config = self.config
        prior = Prior(None if point is None else point.lambda_t, config.sigma0_sq,
                      config.sigma1_sq, config.num_train_examples)
        prior_on = point is None or point.prior_on
        groups = []
        for group, event in zip(self.param_groups, event_of_group):
            # Parameters with and without a frozen mask go to separate groups.
            by_mask: dict[bool, list[torch.Tensor]] = {False: [], True: []}
            for p in group["params"]:
                if p.grad is not None:
                    by_mask["keep_mask" in self.state[p]].append(p)
            for masked, params in by_mask.items():
                if not params:
                    continue
                states = [self._init_state(p) for p in params]
                grads = [local(p.grad) for p in params]
                groups.append(UpdateGroup(
                    params=[local_of[id(p)] for p in params],
                    grads=[g if g.is_contiguous() else g.contiguous() for g in grads],
                    exp_avgs=[local(s["exp_avg"]) for s in states],
                    exp_avg_sqs=[local(s["exp_avg_sq"]) for s in states],
                    state_steps=[s["step"] for s in states],
                    keep_masks=[s["keep_mask"] for s in states] if masked else [],
                    lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    prior=prior if group["prune"] and prior_on and self.use_prior else None,
                    event=event))
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
        self._read_device_schedule()
        state_dict = super().state_dict()
        state_dict[checkpoint.KEY] = checkpoint.schedule_entry(
            self._progress, self.config.total_steps, [str(pool) for pool in self._pools()[0]])
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        param_of = checkpoint.check_layout(state_dict, self.param_groups)
        # The saved groups' pools (their keys replace these groups'), checked against this
        # optimizer's parameters and the saved progress before anything changes.
        saved_pools, pool_of_group = pools_of(state_dict["param_groups"], self.config)
        for index, group in zip(pool_of_group, self.param_groups):
            if index is not None:
                check_pattern_fits(saved_pools[index].pattern, group["params"],
                                   [local(p) for p in group["params"]])
        progress = checkpoint.saved_progress(state_dict[checkpoint.KEY],
                                             self.param_groups[0]["params"][0].device,
                                             [str(pool) for pool in saved_pools])
        self._device_schedule.discard()   # the next step on the device starts from the loaded t
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        for index, saved in state_dict["state"].items():
            p = param_of[index]
            self.state[p] = checkpoint.load_state(saved, p, self._step_device(p),
                                                  self._state_dtype_of(p))
        entry = state_dict[checkpoint.KEY]
        if self.config.total_steps is None and entry["total_steps"] is not None:
            self.set_total_steps(entry["total_steps"])
        self._progress = progress

    # ---- copying and pickling ------------------------------------------------------------------

    _PICKLED = ("config", "_state_dtype", "_backend_name", "_progress", "_device_schedule",
                "_sharding", "use_prior")

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and param_groups; the schedule position and
        # settings must survive copy.deepcopy and torch.save of the optimizer object too.
        if self._sharding.group is not None:
            raise TypeError("an MGPP optimizer with a process group cannot be copied or pickled "
                            "(a process group cannot): save and load its state_dict() instead")
        self._read_device_schedule()
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in self._PICKLED})
        # Not views of the device schedule's buffers.
        state["_progress"] = replace(self._progress, last_events=tuple(
            None if event is None else replace(event, threshold=Threshold(
                tau=event.threshold.tau.clone(), pruned=event.threshold.pruned.clone()))
            for event in self._progress.last_events))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._backend = _bind_backend(self._backend_name, _first_device(self.param_groups))

    # ---- logging -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Pruning progress for logs: stage, target and achieved sparsity, τ and λ_t, for all
        candidates and for each pool (``"pools"``).

        ``sparsity`` counts the exact zeros among the candidates now (one pass over them, with no
        temporary the size of a candidate), so call this when logging, not every step; with a
        process group, among this rank's shards. In the pruning stage the pruned weights regrow
        at once (as the paper intends), so between events it reads near 0; ``event_sparsity``
        is the sparsity the last event reached: ``pruned`` (the candidates it zeroed, over every
        rank) over ``numel``, the N elements it ranked (before a pool's first event, this rank's
        elements). For all candidates, the targets and counts are summed over the pools, and
        ``tau`` is the one pool's τ (None with several pools: see each pool's).
        """
        self._read_device_schedule()
        progress = self._progress
        pools, _, members = self._pools()
        pool_stats = []
        for i, (pool, candidates) in enumerate(zip(pools, members)):
            shards = [local(p) for p in candidates]
            numel = sum(p.numel() for p in shards)
            zeros = numel - sum(int(torch.count_nonzero(p)) for p in shards)
            event = progress.last_event(i)
            ranked = event.numel if event is not None and event.numel else numel
            pruned = 0 if event is None else int(event.threshold.pruned)
            pool_stats.append({
                "pattern": "unstructured" if pool.pattern is None else str(pool.pattern),
                "final_sparsity": pool.final_sparsity,
                "target_sparsity": 0.0 if event is None else event.target,
                "sparsity": zeros / numel if numel else 0.0,
                "tau": None if event is None else float(event.threshold.tau),
                "pruned": pruned,
                "numel": ranked,
                "event_sparsity": pruned / ranked if ranked else 0.0,
                "zeros": zeros,
                "local_numel": numel,
            })
        numel = sum(stat.pop("local_numel") for stat in pool_stats)
        zeros = sum(stat.pop("zeros") for stat in pool_stats)
        ranked = sum(stat["numel"] for stat in pool_stats)
        pruned = sum(stat["pruned"] for stat in pool_stats)
        last = max(progress.t - 1, 0)
        return {
            "stage": schedule_at(self.config, last).stage
            if self.config.total_steps is not None else "dense",
            "step": progress.t,
            "target_sparsity": (sum(stat["target_sparsity"] * stat["numel"] for stat in pool_stats)
                                / ranked if ranked else 0.0),
            "sparsity": zeros / numel if numel else 0.0,
            "tau": pool_stats[0]["tau"] if len(pool_stats) == 1 else None,
            "pruned": pruned,
            "event_sparsity": pruned / ranked if ranked else 0.0,
            "lambda_t": progress.lambda_t,
            "pools": pool_stats,
        }
