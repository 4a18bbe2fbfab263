"""The optimizer-wide MGPP settings of docs/spec.md §1, AdamW's arguments, and their validation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _require_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def require_sparsity(name: str, value) -> None:
    _require_finite(name, value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class MGPPConfig:
    """Prior and schedule settings (docs/spec.md §1). Every value is checked when the config is built."""

    num_train_examples: int
    initial_warmup_steps: int
    total_steps: int | None = None
    final_warmup_steps: int = 0
    pruning_interval: int = 100
    initial_sparsity: float = 0.3
    final_sparsity: float = 0.9
    sigma0_sq: float = 1e-10
    sigma1_sq: float = 0.05
    lambda_mix: float = 0.1
    lambda_final_factor: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("initial_sparsity", "final_sparsity", "sigma0_sq", "sigma1_sq", "lambda_mix",
                     "lambda_final_factor"):
            _require_finite(name, getattr(self, name))
        if not self.sigma0_sq > 0:
            raise ValueError(f"sigma0_sq must be > 0, got {self.sigma0_sq}")
        if not self.sigma1_sq > self.sigma0_sq:
            raise ValueError(f"sigma1_sq must be > sigma0_sq = {self.sigma0_sq}, got {self.sigma1_sq}")
        if not 0 < self.lambda_mix < 1:
            raise ValueError(f"lambda_mix must be in (0, 1), got {self.lambda_mix}")
        if not 0 < self.lambda_final_factor <= 1:
            raise ValueError(f"lambda_final_factor must be in (0, 1], got {self.lambda_final_factor}")
        require_sparsity("final_sparsity", self.final_sparsity)
        if not 0 <= self.initial_sparsity <= self.final_sparsity:
            raise ValueError(f"initial_sparsity must be in [0, final_sparsity = {self.final_sparsity}], "
                             f"got {self.initial_sparsity}")
        _require_int("num_train_examples", self.num_train_examples, 1)
        _require_int("initial_warmup_steps", self.initial_warmup_steps, 0)
        _require_int("final_warmup_steps", self.final_warmup_steps, 0)
        _require_int("pruning_interval", self.pruning_interval, 1)
        if self.total_steps is not None:
            _require_int("total_steps", self.total_steps, 2)
            if not self.initial_warmup_steps < self.t_end:
                raise ValueError(
                    f"initial_warmup_steps must be < t_end = total_steps - final_warmup_steps - 1 = "
                    f"{self.total_steps} - {self.final_warmup_steps} - 1 = {self.t_end}, "
                    f"got {self.initial_warmup_steps}")

    @property
    def t_end(self) -> int:
        """The step of the last pruning event, which freezes the mask."""
        if self.total_steps is None:
            raise RuntimeError("total_steps is not set: pass total_steps= to MGPP, or let the "
                               "transformers callback fill it in from the Trainer's max_steps")
        return self.total_steps - self.final_warmup_steps - 1

    def with_total_steps(self, total_steps: int) -> "MGPPConfig":
        return dataclasses.replace(self, total_steps=total_steps)


def check_adamw_hyperparameters(lr, betas, eps, weight_decay, *, read_tensor_lr: bool = True) -> None:
    """AdamW's own arguments, as torch.optim.AdamW takes them: lr may be a one-element tensor,
    whose value is checked only when `read_tensor_lr` (never inside step(): that would be a read
    of the device on the host)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"a tensor lr must be one floating-point value, got {lr.dtype} of "
                             f"shape {tuple(lr.shape)}")
        lr = float(lr) if read_tensor_lr else 0.0
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        _require_finite(name, value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, Real) or not 0 <= beta < 1:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
