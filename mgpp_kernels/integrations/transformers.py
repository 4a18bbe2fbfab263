"""MGPP in the transformers ``Trainer``.

One call builds the optimizer with the pruning candidates chosen by
:func:`mgpp_kernels.param_groups` and AdamW's hyperparameters taken from ``TrainingArguments``::

    optimizer = create_mgpp(model, args, num_train_examples=len(train_set),
                            initial_warmup_steps=1000, final_sparsity=0.9)
    trainer = Trainer(model, args, train_dataset=train_set, optimizers=(optimizer, None),
                      callbacks=[MGPPCallback()])

or, letting the Trainer build it, ``optimizer_cls_and_kwargs=mgpp_optimizer_cls_and_kwargs(...)``.
:class:`MGPPCallback` fills in ``total_steps`` from the Trainer's ``max_steps`` when it was not
given, and adds the pruning stage, sparsity, τ and λ_t to every log.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Iterable

import torch
from transformers import TrainerCallback

from ..config import MGPPConfig
from ..groups import param_groups
from ..optimizer import MGPP

_CONFIG_FIELDS = {field.name for field in dataclasses.fields(MGPPConfig)}
_MGPP_KEYWORDS = set(inspect.signature(MGPP.__init__).parameters) - {"self", "params"}


def adamw_kwargs(args) -> dict[str, Any]:
    """lr, betas, eps and weight_decay from a ``TrainingArguments``, as the Trainer's AdamW gets
    them."""
    return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon, "weight_decay": args.weight_decay}


def mgpp_optimizer_cls_and_kwargs(model: torch.nn.Module, args=None, *,
                                  patterns: Iterable[str] | None = None,
                                  **mgpp_kwargs) -> tuple[type[MGPP], dict[str, Any]]:
    """``(MGPP, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``kwargs`` holds ``params``: the param groups of :func:`mgpp_kernels.param_groups` (the
    candidates by ``patterns``, biases and LayerNorm weights without weight decay as the Trainer
    does), which the Trainer uses instead of its own grouping. AdamW's hyperparameters come from
    ``args`` unless given in ``mgpp_kwargs``; so does ``total_steps`` when ``args.max_steps`` is
    set (otherwise :class:`MGPPCallback` fills it in). The Trainer pops ``params`` from the
    dict, so build a new pair for every Trainer.
    """
    kwargs = {} if args is None else adamw_kwargs(args)
    if args is not None and args.max_steps > 0:
        kwargs["total_steps"] = args.max_steps
    unknown = sorted(set(mgpp_kwargs) - _MGPP_KEYWORDS)
    if unknown:
        raise TypeError(f"MGPP has no keyword {', '.join(unknown)}")
    kwargs.update(mgpp_kwargs)
    # Check the MGPP settings now, not when the Trainer builds the optimizer inside train().
    MGPPConfig(**{key: value for key, value in kwargs.items() if key in _CONFIG_FIELDS})
    groups = param_groups(model, patterns, weight_decay=kwargs.get("weight_decay"))
    return MGPP, {"params": groups, **kwargs}


def create_mgpp(model: torch.nn.Module, args=None, *, patterns: Iterable[str] | None = None,
                **mgpp_kwargs) -> MGPP:
    """An MGPP optimizer for ``model``, for ``Trainer(optimizers=(optimizer, None))``; the
    arguments are those of :func:`mgpp_optimizer_cls_and_kwargs`."""
    optimizer_cls, kwargs = mgpp_optimizer_cls_and_kwargs(model, args, patterns=patterns,
                                                          **mgpp_kwargs)
    return optimizer_cls(kwargs.pop("params"), **kwargs)


def unwrap_mgpp(optimizer) -> MGPP:
    """The MGPP optimizer inside the wrappers the Trainer puts around it (accelerate's)."""
    inner = optimizer
    while not isinstance(inner, MGPP) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, MGPP):
        raise ValueError(f"MGPPCallback needs the Trainer's optimizer to be MGPP, got "
                         f"{type(optimizer).__name__}")
    return inner


class MGPPCallback(TrainerCallback):
    """Connects an MGPP optimizer to the Trainer's schedule and logs.

    At the start of training it sets MGPP's ``total_steps`` to the Trainer's ``max_steps`` when
    the optimizer was built without it. To every log it adds ``{prefix}stage``,
    ``{prefix}sparsity`` (exact zeros among the candidates now), ``{prefix}target_sparsity``,
    ``{prefix}tau`` (from the first pruning event on) and ``{prefix}lambda_t`` (with the prior
    on), in the log history, the progress bar and the printer. The Trainer runs callbacks passed
    as ``callbacks=[...]`` after its reporting integrations; :func:`add_mgpp_callback` puts this
    one first so that TensorBoard and W&B record the values too.
    """

    def __init__(self, prefix: str = "mgpp_"):
        self.prefix = prefix
        self.optimizer: MGPP | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise ValueError("MGPPCallback got no optimizer from the Trainer")
        mgpp = unwrap_mgpp(optimizer)
        if mgpp.config.total_steps is None:
            mgpp.set_total_steps(state.max_steps)
        elif mgpp.config.total_steps != state.max_steps:
            warnings.warn(f"MGPP's total_steps = {mgpp.config.total_steps} differs from the "
                          f"Trainer's max_steps = {state.max_steps}: the pruning schedule does "
                          f"not end with the run", stacklevel=2)
        self.optimizer = mgpp

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.optimizer is None or logs is None:
            return
        entries = self.log_entries()
        logs.update(entries)
        # The Trainer appended its copy of these logs to the history before calling callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def log_entries(self) -> dict[str, Any]:
        stats = self.optimizer.stats()
        entries = {"stage": stats["stage"], "sparsity": stats["sparsity"],
                   "target_sparsity": stats["target_sparsity"]}
        if stats["tau"] is not None:
            entries["tau"] = stats["tau"]
        if self.optimizer.use_prior:
            entries["lambda_t"] = stats["lambda_t"]
        return {self.prefix + key: value for key, value in entries.items()}


def add_mgpp_callback(trainer, callback: MGPPCallback | None = None) -> MGPPCallback:
    """Adds an :class:`MGPPCallback` to ``trainer`` ahead of its other callbacks, so that every
    reporting integration logs the pruning values; returns the callback."""
    callback = MGPPCallback() if callback is None else callback
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
