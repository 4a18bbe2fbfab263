"""MGPP in the transformers ``Trainer``.

One call builds the optimizer with the pruning candidates chosen by
:func:`mgpp_kernels.param_groups` and AdamW's hyperparameters taken from ``TrainingArguments``::

    optimizer = create_mgpp(model, args, num_train_examples=len(train_set),
                            initial_warmup_steps=1000, final_sparsity=0.9)
    trainer = Trainer(model, args, train_dataset=train_set, optimizers=(optimizer, None),
                      callbacks=[MGPPCallback()])

or, letting the Trainer build it, ``optimizer_cls_and_kwargs=mgpp_optimizer_cls_and_kwargs(...)``.
:class:`MGPPCallback` fills in ``total_steps`` from the Trainer's ``max_steps`` when it was not
given, and adds the pruning stage, the sparsity the last pruning event reached, the fraction of
zeros now, τ and λ_t to every log. :class:`DistillationTrainer` is the Trainer with a teacher's
softened logits mixed into the loss.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

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
                                  sparsity: dict[str, float] | None = None,
                                  pattern: str | None = None,
                                  **mgpp_kwargs) -> tuple[type[MGPP], dict[str, Any]]:
    """``(MGPP, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``kwargs`` holds ``params``: the param groups of :func:`mgpp_kernels.param_groups` (the
    candidates by ``patterns``, biases and LayerNorm weights without weight decay as the Trainer
    does; per-candidate targets by ``sparsity`` and an N:M ``pattern``, as it takes them), which
    the Trainer uses instead of its own grouping. AdamW's hyperparameters come from
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
    groups = param_groups(model, patterns, weight_decay=kwargs.get("weight_decay"),
                          sparsity=sparsity, pattern=pattern)
    return MGPP, {"params": groups, **kwargs}


def create_mgpp(model: torch.nn.Module, args=None, *, patterns: Iterable[str] | None = None,
                sparsity: dict[str, float] | None = None, pattern: str | None = None,
                **mgpp_kwargs) -> MGPP:
    """An MGPP optimizer for ``model``, for ``Trainer(optimizers=(optimizer, None))``; the
    arguments are those of :func:`mgpp_optimizer_cls_and_kwargs`."""
    optimizer_cls, kwargs = mgpp_optimizer_cls_and_kwargs(model, args, patterns=patterns,
                                                          sparsity=sparsity, pattern=pattern,
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
    ``{prefix}sparsity`` (the sparsity the last pruning event reached: the candidate elements it
    zeroed over all candidate elements), ``{prefix}zero_fraction`` (the exact zeros among the
    candidates now: in the pruning stage the pruned weights regrow at once, as the paper
    intends, so between events it reads near 0 until the mask freezes),
    ``{prefix}target_sparsity``, ``{prefix}tau`` (from the first pruning event on) and
    ``{prefix}lambda_t`` (with the prior on), and with several pools each pool's
    ``{prefix}pool<i>_sparsity`` and ``{prefix}pool<i>_tau`` (docs/spec.md §5), in the log
    history, the progress bar and the printer. The Trainer runs callbacks passed as
    ``callbacks=[...]`` after its reporting integrations; :func:`add_mgpp_callback` puts this
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
        entries = {"stage": stats["stage"],
                   "sparsity": stats["event_sparsity"],
                   "zero_fraction": stats["sparsity"],
                   "target_sparsity": stats["target_sparsity"]}
        if stats["tau"] is not None:
            entries["tau"] = stats["tau"]
        if len(stats["pools"]) > 1:   # each pool's own, numbered in pool order
            for i, pool in enumerate(stats["pools"]):
                entries[f"pool{i}_sparsity"] = pool["event_sparsity"]
                if pool["tau"] is not None:
                    entries[f"pool{i}_tau"] = pool["tau"]
        if self.optimizer.use_prior:
            entries["lambda_t"] = stats["lambda_t"]
        return {self.prefix + key: value for key, value in entries.items()}


def add_mgpp_callback(trainer, callback: MGPPCallback | None = None) -> MGPPCallback:
    """Adds an :class:`MGPPCallback` to ``trainer`` ahead of its other callbacks, so that every
    reporting integration logs the pruning values; returns the callback."""
    callback = MGPPCallback() if callback is None else callback
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


# Movement pruning (Sanh et al., 2020, examples/research_projects/movement-pruning/
# masked_run_glue.py) mixes alpha_ce = 0.5 of the task loss with alpha_distil = 0.5 of
# T²·KL at temperature T = 2.0; oBERT (Kurtic et al., 2022, sparseml's DistillationModifier) uses
# the same loss as (1 − hardness)·task + hardness·T²·KL with hardness 1.0 and T = 5.5 on GLUE.
# The defaults are movement pruning's, which keep the task loss in the mix.
DEFAULT_DISTILLATION_TEMPERATURE = 2.0
DEFAULT_DISTILLATION_WEIGHT = 0.5


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), summed over the classes (the last
    dimension) and averaged over the other positions (the batch, and the tokens of a language
    model), only over those where ``mask`` is true when given (padding left out)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"the student's logits have shape {tuple(student_logits.shape)}, the "
                         f"teacher's {tuple(teacher_logits.shape)}")
    classes = student_logits.shape[-1]
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student_log_probs.reshape(-1, classes),
                            teacher_log_probs.reshape(-1, classes), reduction="none",
                            log_target=True).sum(-1)
    if mask is None:
        mean = per_position.mean()
    else:
        keep = mask.reshape(-1).to(per_position.dtype)
        mean = (per_position * keep).sum() / keep.sum().clamp_min(1)
    return temperature ** 2 * mean


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose training loss is
    ``(1 − distillation_weight)·task loss + distillation_weight·T²·KL(teacher ‖ student)`` on
    the logits softened by ``T = distillation_temperature`` (:func:`distillation_kl`).

    ``teacher_model`` is any module that takes the student's inputs and returns logits of the
    same shape (the dense fine-tuned model, typically); it is moved to the training device, put
    in eval mode and run under ``torch.no_grad``, and it is not part of the optimizer, the
    checkpoints or the student's state. Everything else is the Trainer's (with MGPP from
    :func:`create_mgpp` and :class:`MGPPCallback` as usual); evaluation reports the same mixed
    loss. For a language model the KL is averaged over the tokens the ``attention_mask`` keeps.
    The KL is a mean over each batch the Trainer passes, as a classifier's task loss is; with
    gradient accumulation a causal LM's task loss is normalised over the whole accumulated batch
    instead, so there the KL weighs more than ``distillation_weight`` says.
    """

    def __init__(self, *args, teacher_model: torch.nn.Module,
                 distillation_temperature: float = DEFAULT_DISTILLATION_TEMPERATURE,
                 distillation_weight: float = DEFAULT_DISTILLATION_WEIGHT, **kwargs):
        if not distillation_temperature > 0:
            raise ValueError(f"distillation_temperature must be > 0, got "
                             f"{distillation_temperature}")
        if not 0 <= distillation_weight <= 1:
            raise ValueError(f"distillation_weight must be in [0, 1], got {distillation_weight}")
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.args.device).eval()
        self.teacher_model.requires_grad_(False)
        self.distillation_temperature = distillation_temperature
        self.distillation_weight = distillation_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                  num_items_in_batch=num_items_in_batch)
        teacher_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with torch.no_grad():
            teacher_logits = self.teacher_model(**teacher_inputs).logits
        student_logits = outputs["logits"]
        mask = inputs.get("attention_mask") if student_logits.dim() > 2 else None
        kl = distillation_kl(student_logits, teacher_logits, self.distillation_temperature, mask)
        loss = (1 - self.distillation_weight) * task_loss + self.distillation_weight * kl
        return (loss, outputs) if return_outputs else loss
