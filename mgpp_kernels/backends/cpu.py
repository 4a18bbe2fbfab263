"""The cpu backend: the fused C++ kernels of csrc/cpu, called through torch.ops.mgpp."""
from __future__ import annotations

import mgpp_kernels._C  # noqa: F401  (registers torch.ops.mgpp)
import mgpp_kernels._fake  # noqa: F401  (their fake implementations, for torch.compile)

from .._scalars import step_scalars
from ._ops import OpsBackend

BACKEND = OpsBackend("cpu", "cpu", step_scalars, steps_on_device=False,
                     ranks_across_processes=True)
