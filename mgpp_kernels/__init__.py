"""mgpp-kernels: fused kernels for mixture Gaussian prior pruning (MGPP) on top of AdamW."""
from .backends import BackendUnavailableError, available_backends
from .config import MGPPConfig
from .groups import DEFAULT_PATTERNS, candidate_names, param_groups
from .optimizer import MGPP
from .owl import owl_sparsity

__version__ = "0.1.0"

__all__ = ["MGPP", "MGPPConfig", "param_groups", "candidate_names", "DEFAULT_PATTERNS",
           "owl_sparsity", "available_backends", "BackendUnavailableError", "__version__"]
