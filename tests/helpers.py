"""Builders shared by the tests: parameters and gradients on a backend's device, optimizers over
candidate / non-candidate groups, a step driver, and running a helper script of this directory
in a fresh Python process. Comparisons are in tests/compare.py, the backends in tests/backends.py.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

from mgpp_kernels import MGPP, masks

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# A small schedule with every stage: dense for t < 4, events at t = 4 (s_i), 7, 14, 21 (multiples
# of 7) and t_end = 30 - 5 - 1 = 24 (s_f and the freeze), the frozen mask from t = 25 on.
SCHEDULE = dict(num_train_examples=1000, initial_warmup_steps=4, total_steps=30,
                final_warmup_steps=5, pruning_interval=7, initial_sparsity=0.3,
                final_sparsity=0.9)

__all__ = ["SCHEDULE", "TESTS_DIR", "REPO_ROOT", "backend_name",
           "device_of", "make_params", "clone_params", "gradient", "build_optimizer", "run_steps",
           "copy_state_into", "with_prior", "unpacked_keep_masks", "run_script"]


def backend_name(backend) -> str:
    """A row of tests/backends.py or a backend's name: the name MGPP takes."""
    return getattr(backend, "name", backend)


def device_of(backend) -> str:
    """Where `backend`'s tensors live in the tests (a name: "cpu")."""
    return getattr(backend, "device", "cpu")


# ---- parameters, gradients, optimizers --------------------------------------------------------


def make_params(shapes, dtypes=torch.float32, seed=0, scale=0.02, device="cpu"):
    """Parameters with normal(0, scale) values (drawn on the CPU, then moved to `device`);
    `dtypes` is one dtype or one per shape."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=generator) * scale)
                               .to(device=device, dtype=dtype))
            for shape, dtype in zip(shapes, dtypes)]


def clone_params(params, dtype=None, device=None):
    return [torch.nn.Parameter(p.detach().to(device=device or p.device, dtype=dtype or p.dtype,
                                             copy=True)) for p in params]


def gradient(step, index, like, seed=0, scale=0.01):
    """A deterministic gradient for parameter `index` at schedule step `step` (the same values on
    every device)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + index)
    return (torch.randn(like.shape, generator=generator) * scale).to(device=like.device,
                                                                     dtype=like.dtype)


def build_optimizer(params, backend, prune, **overrides):
    """MGPP over `params` with `prune[i]` saying whether params[i] is a candidate; the
    candidates form the first group, the rest a prune=False group."""
    kwargs = dict(lr=1e-3, weight_decay=0.0, **SCHEDULE)
    kwargs.update(overrides)
    candidates = [p for p, flag in zip(params, prune) if flag]
    others = [p for p, flag in zip(params, prune) if not flag]
    groups = []
    if candidates:
        groups.append({"params": candidates, "prune": True})
    if others:
        groups.append({"params": others, "prune": False})
    return MGPP(groups, backend=backend_name(backend), **kwargs)


def run_steps(optimizer, params, start, stop, seed=0, has_grad=None, grad_scale=None):
    """Calls step() for schedule steps start..stop-1 with gradient(t, i); `has_grad(t, i)` False
    leaves parameter i without a gradient in step t; `grad_scale` multiplies the gradients and is
    handed to the optimizer as torch.amp.GradScaler does."""
    for t in range(start, stop):
        device = None
        for i, p in enumerate(params):
            device = p.device
            if has_grad is not None and not has_grad(t, i):
                p.grad = None
                continue
            grad = gradient(t, i, p, seed)
            p.grad = grad if grad_scale is None else (grad.float() * grad_scale).to(p.dtype)
        if grad_scale is not None:
            optimizer.grad_scale = torch.tensor(float(grad_scale), device=device)
            optimizer.found_inf = torch.tensor(0.0, device=device)
        optimizer.step()
        if grad_scale is not None:
            del optimizer.grad_scale, optimizer.found_inf


def copy_state_into(source, params, backend, prune, **overrides):
    """A fresh optimizer on `backend` over `params` carrying `source`'s state (a deep copy)."""
    optimizer = build_optimizer(params, backend, prune, **overrides)
    optimizer.load_state_dict(copy.deepcopy(source.state_dict()))
    return optimizer


def with_prior(theta, grad, optimizer, lambda_t):
    """g with the prior gradient of the optimizer's config at λ_t added (fp32, as the reference)."""
    from mgpp_kernels import reference
    config = optimizer.config
    return grad.float() + reference.prior_gradient(theta.detach().float(), lambda_t,
                                                   config.sigma0_sq, config.sigma1_sq,
                                                   config.num_train_examples)


def unpacked_keep_masks(optimizer, params):
    return [masks.unpack_mask(optimizer.state[p]["keep_mask"], p) for p in params]


# ---- helper scripts in fresh processes ----------------------------------------------------------


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs tests/<script> in a fresh Python process that imports this checkout's mgpp_kernels."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(TESTS_DIR),
                                                      env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(TESTS_DIR / script), *args], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{script} {' '.join(args)} exited {result.returncode}:\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result
