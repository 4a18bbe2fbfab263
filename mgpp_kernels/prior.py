"""The constants of docs/spec.md §2's spike-and-slab prior gradient, in float64 on the host: the
kernels, the device schedule's table and the oracle all take them from here."""
from __future__ import annotations

import math


def prior_c1(lambda_t: float, sigma0_sq: float, sigma1_sq: float) -> float:
    """c1 = log(λ_t / (1 − λ_t)) + ½·log(σ0² / σ1²): it changes with λ_t."""
    return (math.log(lambda_t) - math.log(1 - lambda_t)
            + 0.5 * math.log(sigma0_sq) - 0.5 * math.log(sigma1_sq))


def prior_c2(sigma0_sq: float, sigma1_sq: float) -> float:
    """c2 = 1/(2σ0²) − 1/(2σ1²)."""
    return 1 / (2 * sigma0_sq) - 1 / (2 * sigma1_sq)
