"""The storage combinations the benchmarks measure: the one table of each combination's parameter
dtype, MGPP's state_dtype, and the bytes a step must move per element (docs/spec.md §3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Storage:
    """A storage combination. Its label names the parameter dtype, and the state's where that is
    not the parameter's; it is the `precision` column of the suite's CSV."""

    label: str
    param_dtype: torch.dtype
    state_dtype: torch.dtype | str   # MGPP's state_dtype argument: a dtype, or "param"

    @property
    def param_bytes(self) -> int:
        return torch.finfo(self.param_dtype).bits // 8

    @property
    def moment_dtype(self) -> torch.dtype:
        """The dtype of m and v."""
        return self.param_dtype if self.state_dtype == "param" else self.state_dtype

    @property
    def state_bytes(self) -> int:
        return torch.finfo(self.moment_dtype).bits // 8

    @property
    def runs_on_adamw(self) -> bool:
        """Whether torch.optim.AdamW runs it too: AdamW keeps its state in the parameter dtype."""
        return self.state_bytes == self.param_bytes

    def step_bytes(self, event: bool = False) -> int:
        """Bytes per element a step must move: θ read and written, g read, m and v read and
        written; an event reads and writes θ once more (the pass that zeroes below τ's bin)."""
        update = 3 * self.param_bytes + 4 * self.state_bytes
        return update + 2 * self.param_bytes if event else update


FP32 = Storage("fp32", torch.float32, torch.float32)
BF16 = Storage("bf16", torch.bfloat16, "param")
STORAGE = (FP32, BF16, Storage("bf16, fp32 state", torch.bfloat16, torch.float32),
           Storage("fp16", torch.float16, "param"))
BY_LABEL = {storage.label: storage for storage in STORAGE}


def adamw_counterpart(storage: Storage) -> Storage:
    """The combination torch.optim.AdamW runs on the same parameters (its state in their dtype)."""
    return next(s for s in STORAGE if s.param_dtype == storage.param_dtype and s.runs_on_adamw)
