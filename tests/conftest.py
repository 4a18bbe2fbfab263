"""Shared helpers of the MGPP tests: parameter and gradient builders, a step driver, bit-level
comparisons and the elementwise bounds of SPEC §4."""
import os

# The Triton backend's tests run its kernels on the CPU through the interpreter; it must be set
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import mgpp_kernels  # noqa: E402
from mgpp_kernels import MGPP, reference  # noqa: E402
from mgpp_kernels.masks import unpack_mask  # noqa: E402

# Backends checked against the reference on CPU tensors.
KERNEL_BACKENDS = ["cpu"]
ALL_BACKENDS = ["reference", *KERNEL_BACKENDS]

# A small schedule with every stage: dense for t < 4, events at t = 4 (s_i), 7, 14, 21 (multiples
# of 7) and t_end = 30 - 5 - 1 = 24 (s_f and the freeze), the frozen mask from t = 25 on.
SCHEDULE = dict(num_train_examples=1000, initial_warmup_steps=4, total_steps=30,
                final_warmup_steps=5, pruning_interval=7, initial_sparsity=0.3,
                final_sparsity=0.9)

# The tensors here are small: one intra-op thread keeps the suite fast on shared cores, where an
# OpenMP barrier can wait milliseconds for a descheduled sibling. Tests of the multi-threaded
# paths (several chunks, merged histograms) take the `all_threads` fixture.
MACHINE_THREADS = torch.get_num_threads()
torch.set_num_threads(1)

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_NORMAL_EXPONENT = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    if request.param not in mgpp_kernels.available_backends():
        pytest.skip(f"backend {request.param!r} is not built")
    return request.param


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    if request.param not in mgpp_kernels.available_backends():
        pytest.skip(f"backend {request.param!r} is not built")
    return request.param


@pytest.fixture
def all_threads():
    threads = max(2, MACHINE_THREADS)
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(1)


# ---- parameters, gradients, optimizers --------------------------------------------------------


def make_params(shapes, dtypes=torch.float32, seed=0, scale=0.02):
    """Parameters with normal(0, scale) values; `dtypes` is one dtype or one per shape."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=generator) * scale).to(dtype))
            for shape, dtype in zip(shapes, dtypes)]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True)) for p in params]


def gradient(step, index, like, seed=0, scale=0.01):
    """A deterministic gradient for parameter `index` at schedule step `step`."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + index)
    return (torch.randn(like.shape, generator=generator) * scale).to(like.dtype)


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
    return MGPP(groups, backend=backend, **kwargs)


def run_steps(optimizer, params, start, stop, seed=0, has_grad=None, grad_scale=None):
    """Calls step() for schedule steps start..stop-1 with gradient(t, i); `has_grad(t, i)` False
    leaves parameter i without a gradient in step t; `grad_scale` multiplies the gradients and is
    handed to the optimizer as torch.amp.GradScaler does."""
    for t in range(start, stop):
        for i, p in enumerate(params):
            if has_grad is not None and not has_grad(t, i):
                p.grad = None
                continue
            grad = gradient(t, i, p, seed)
            p.grad = grad if grad_scale is None else (grad.float() * grad_scale).to(p.dtype)
        if grad_scale is not None:
            optimizer.grad_scale = torch.tensor(float(grad_scale))
            optimizer.found_inf = torch.tensor(0.0)
        optimizer.step()
        if grad_scale is not None:
            del optimizer.grad_scale, optimizer.found_inf


def copy_state_into(source, params, backend, prune, **overrides):
    """A fresh optimizer on `backend` over `params` carrying `source`'s state (a deep copy)."""
    optimizer = build_optimizer(params, backend, prune, **overrides)
    optimizer.load_state_dict(copy.deepcopy(source.state_dict()))
    return optimizer


def state_of(optimizer, p):
    return optimizer.state[p] if p in optimizer.state else {}


# ---- comparisons ------------------------------------------------------------------------------


def bits(t):
    """The bit patterns of a floating tensor (so that -0.0 != 0.0 and NaN == NaN)."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(actual, expected, what=""):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.is_floating_point():
        differ = bits(actual) != bits(expected)
    else:
        differ = actual != expected
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ, "
                              f"first at {differ.flatten().nonzero()[0].item()}")


def assert_runs_identical(params_a, opt_a, params_b, opt_b):
    """Parameters and every state tensor bit-identical, schedule positions equal."""
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert_bitwise_equal(a, b, f"param {i}")
        state_a, state_b = state_of(opt_a, a), state_of(opt_b, b)
        assert state_a.keys() == state_b.keys(), f"param {i}: state keys differ"
        for key in state_a:
            assert_bitwise_equal(state_a[key], state_b[key], f"param {i} state {key}")
    assert opt_a.stats()["step"] == opt_b.stats()["step"]


def _report(bad, diff, bound, what):
    worst = int(torch.argmax((diff - bound).flatten()))
    return (f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; worst at "
            f"{worst}: diff {diff.flatten()[worst].item():.3e} > bound "
            f"{bound.flatten()[worst].item():.3e}")


def assert_fp32_bound(actual, expected, scale, what):
    """SPEC §4, kernel vs reference, fp32, one step: |diff| <= 1e-6 + 1e-5·s elementwise."""
    diff = (actual.double() - expected.double()).abs()
    bound = 1e-6 + 1e-5 * scale.double()
    bad = diff > bound
    assert not bad.any(), _report(bad, diff, bound, what)


def ulp(values, dtype):
    """The spacing of `dtype` at |values| (float64); the subnormal spacing below the normals."""
    magnitude = values.double().abs().clamp_min(torch.finfo(dtype).tiny)
    exponent = torch.floor(torch.log2(magnitude)).clamp_min(MIN_NORMAL_EXPONENT[dtype])
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def assert_mixed_precision_bound(actual, reference_same_dtype, oracle, what):
    """SPEC §4, 16-bit storage: the error against the float64 oracle is at most 2x the error of
    the reference run in the same storage dtype, or 1 ulp of the storage dtype."""
    assert actual.dtype == reference_same_dtype.dtype
    oracle = oracle.double()
    diff = (actual.double() - oracle).abs()
    bound = torch.maximum(2 * (reference_same_dtype.double() - oracle).abs(),
                          ulp(oracle, actual.dtype))
    bad = diff > bound
    assert not bad.any(), _report(bad, diff, bound, what)


def with_prior(theta, grad, optimizer, lambda_t):
    """g with the prior gradient of the optimizer's config at λ_t added (fp32, as the reference)."""
    config = optimizer.config
    return grad.float() + reference.prior_gradient(theta.detach().float(), lambda_t,
                                                   config.sigma0_sq, config.sigma1_sq,
                                                   config.num_train_examples)


def unpacked_keep_masks(optimizer, params):
    return [unpack_mask(optimizer.state[p]["keep_mask"], p) for p in params]
