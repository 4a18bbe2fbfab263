"""N:M sparsity patterns (docs/spec.md §5): at most N nonzeros in each group of M consecutive
elements along a candidate's last dimension (the input dimension of a Linear weight, the layout
torch.sparse.to_sparse_semi_structured takes for 2:4)."""
from __future__ import annotations

import re
from dataclasses import dataclass

# The largest group the kernels rank in registers.
MAX_GROUP_SIZE = 16
UNSTRUCTURED = "unstructured"


@dataclass(frozen=True)
class NMPattern:
    n: int   # the elements each group keeps at the final sparsity
    m: int   # the group size

    @property
    def prunable(self) -> int:
        """The candidates of a group: its M − N smallest |θ|."""
        return self.m - self.n

    @property
    def max_sparsity(self) -> float:
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(value) -> NMPattern | None:
    """A param group's `pattern`: "unstructured" (None) or "N:M" with 1 <= N < M <= 16."""
    if value == UNSTRUCTURED:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {value!r}")
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m <= MAX_GROUP_SIZE:
        raise ValueError(f"pattern 'N:M' needs 1 <= N < M <= {MAX_GROUP_SIZE}, got {value!r}")
    return NMPattern(n, m)
