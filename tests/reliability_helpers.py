"""Helpers of the reliability tests (fuzzing, resume, AMP, bad input, distributed, determinism,
compile): bit-level comparisons, the elementwise bounds of SPEC §4, snapshots of an optimizer,
and running a helper script of this directory in a fresh Python process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_NORMAL_EXPONENT = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating tensor (so that -0.0 != 0.0 and NaN == NaN)."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    differ = bits(actual) != bits(expected) if actual.is_floating_point() else actual != expected
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ, "
                              f"first at {differ.flatten().nonzero()[0].item()}")


def _report(bad, diff, bound, what):
    worst = int(torch.argmax(torch.where(bad, diff - bound, -torch.inf).flatten()))
    return (f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; worst at "
            f"{worst}: diff {diff.flatten()[worst].item():.3e} > bound "
            f"{bound.flatten()[worst].item():.3e}")


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str) -> torch.Tensor:
    """NaN and ±inf at the same positions; returns the mask of positions finite in both."""
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN at different positions"
    assert torch.equal(a.isposinf(), e.isposinf()) and torch.equal(a.isneginf(), e.isneginf()), \
        f"{what}: infinities at different positions"
    return a.isfinite()


def fp32_bound(scale: torch.Tensor) -> torch.Tensor:
    """SPEC §4, kernel vs reference, fp32, one step: 1e-6 + 1e-5·s."""
    return 1e-6 + 1e-5 * scale.double()


def assert_fp32_bound(actual, expected, scale, what, where=None):
    """|actual − expected| ≤ 1e-6 + 1e-5·s elementwise (at `where` only, when given)."""
    finite = assert_same_nonfinite(actual, expected, what)
    if where is not None:
        finite &= where
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bound = fp32_bound(scale)
    bad = (diff > bound) & finite
    assert not bad.any(), _report(bad, diff, bound, what)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |values| (float64); the subnormal spacing below the normals."""
    magnitude = values.double().abs().clamp_min(torch.finfo(dtype).tiny)
    exponent = torch.floor(torch.log2(magnitude)).clamp_min(MIN_NORMAL_EXPONENT[dtype])
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def assert_mixed_precision_bound(actual, reference_same_dtype, oracle, what, where=None):
    """SPEC §4, 16-bit storage: the error against the float64 oracle is at most 2x the error of
    the reference run in the same storage dtype, or 1 ulp of the storage dtype."""
    assert actual.dtype == reference_same_dtype.dtype
    finite = assert_same_nonfinite(actual, reference_same_dtype, what)
    if where is not None:
        finite &= where
    oracle = oracle.detach().double()
    diff = (actual.detach().double() - oracle).abs()
    bound = torch.maximum(2 * (reference_same_dtype.detach().double() - oracle).abs(),
                          ulp(oracle, actual.dtype))
    bad = (diff > bound) & finite & oracle.isfinite()
    assert not bad.any(), _report(bad, diff, bound, what)


def snapshot(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """Clones of the parameters and every state tensor, and the schedule position."""
    state = {i: {k: v.clone() for k, v in optimizer.state[p].items()}
             for i, p in enumerate(params) if p in optimizer.state}
    return {"params": [p.detach().clone() for p in params], "state": state,
            "mgpp": dict(optimizer.state_dict()["mgpp"])}


def assert_unchanged(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], before: dict):
    """Nothing of `snapshot` moved: parameters and state bit for bit, the schedule."""
    after = snapshot(optimizer, params)
    for i, (a, b) in enumerate(zip(after["params"], before["params"])):
        assert_bitwise_equal(a, b, f"param {i}")
    assert after["state"].keys() == before["state"].keys()
    for i, state in after["state"].items():
        assert state.keys() == before["state"][i].keys()
        for key, value in state.items():
            assert_bitwise_equal(value, before["state"][i][key], f"param {i} state {key}")
    mgpp_after, mgpp_before = after["mgpp"], before["mgpp"]
    for key in ("last_tau", "last_below"):
        a, b = mgpp_after.pop(key), mgpp_before.pop(key)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), key
    assert mgpp_after == mgpp_before


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs tests/<script> in a fresh Python process that imports this checkout's mgpp_kernels."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(TESTS_DIR / script), *args], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{script} {' '.join(args)} exited {result.returncode}:\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result
