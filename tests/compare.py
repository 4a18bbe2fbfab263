"""The one set of comparison helpers of the tests: bit equality, the elementwise bounds of
docs/spec.md §4 (fp32, and 16-bit storage against a float64 oracle), and "the same non-finite values".

All of them are NaN-safe: a NaN or an infinity where the reference is finite fails, and so does a
NaN bound. (`diff > bound` is False for a NaN diff, so `assert not (diff > bound).any()` passes a
kernel that writes NaN; these helpers test `not (diff <= bound)` on positions that must be
finite, after checking that the non-finite positions agree.) tests/test_compare.py feeds them
NaN and infinities. Tensors on any device are compared on the CPU, so a CUDA run is compared with
the reference run on CPU tensors.
"""
from __future__ import annotations

import torch

from benchmarks.common import agreement
from mgpp_kernels import masks

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}


def _host(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "to_local"):   # a DTensor: this rank's shard
        t = t.to_local()
    return t.cpu()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating tensor (so that -0.0 != 0.0 and NaN == NaN)."""
    return _host(t).contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bits (integer and bool tensors: same values)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.is_floating_point():
        differ = bits(actual) != bits(expected)
    else:
        differ = _host(actual) != _host(expected)
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements differ, "
                              f"first at {differ.flatten().nonzero()[0].item()}")


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor,
                          what: str = "") -> torch.Tensor:
    """NaN, +inf and -inf at the same positions; returns the mask of positions finite in both."""
    a, e = _host(actual).double(), _host(expected).double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = test(a) != test(e)
        assert not differ.any(), (
            f"{what}: {name} at different positions ({int(differ.sum())} of {differ.numel()}, "
            f"first at {differ.flatten().nonzero()[0].item()}: actual "
            f"{a.flatten()[differ.flatten()][0].item()!r}, expected "
            f"{e.flatten()[differ.flatten()][0].item()!r})")
    return a.isfinite()


def _assert_within(actual: torch.Tensor, target: torch.Tensor, bound: torch.Tensor,
                   checked: torch.Tensor, what: str) -> None:
    """|actual - target| <= bound at every `checked` position; a NaN diff or bound fails."""
    diff = (actual - target).abs()
    bad = ~(diff <= bound) & checked
    if not bad.any():
        return
    excess = torch.where(bad, (diff - bound).nan_to_num(nan=torch.inf), -torch.inf).flatten()
    worst = int(torch.argmax(excess))
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; worst at {worst}: "
        f"actual {actual.flatten()[worst].item()!r}, expected {target.flatten()[worst].item()!r}, "
        f"diff {diff.flatten()[worst].item():.3e} > bound {bound.flatten()[worst].item():.3e}")


def fp32_bound(scale: torch.Tensor) -> torch.Tensor:
    """docs/spec.md §4, kernel vs reference, fp32, one step: 1e-6 + 1e-5·s (float64, on the CPU)."""
    return 1e-6 + 1e-5 * _host(scale).double()


def assert_within(actual, expected, bound, what: str = "", where=None) -> None:
    """|actual − expected| ≤ bound elementwise (at `where` only, when given), with the non-finite
    values at the same positions."""
    finite = assert_same_nonfinite(actual, expected, what)
    if where is not None:
        finite &= _host(where).bool()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    bound = _host(bound).double().expand(finite.shape)
    _assert_within(_host(actual).double(), _host(expected).double(), bound, finite, what)


def assert_fp32_bound(actual, expected, scale, what: str = "", where=None) -> None:
    """|actual − expected| ≤ 1e-6 + 1e-5·s elementwise (at `where` only, when given)."""
    assert_within(actual, expected, fp32_bound(scale), what, where)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |values| (float64); the subnormal spacing below the normals
    (benchmarks/common/agreement.py's, which the GPU benchmark's checks share)."""
    return agreement.ulp(_host(values), dtype)


def assert_mixed_precision_bound(actual, reference_same_dtype, oracle, what: str = "",
                                 where=None) -> None:
    """docs/spec.md §4, 16-bit storage: the error against the float64 oracle is at most 2x the error of
    the reference run in the same storage dtype, or 1 ulp of the storage dtype. Non-finite values
    where the same-dtype reference has them; where it is finite, the oracle must be too."""
    assert actual.dtype == reference_same_dtype.dtype, (
        f"{what}: dtype {actual.dtype} != {reference_same_dtype.dtype}")
    finite = assert_same_nonfinite(actual, reference_same_dtype, what)
    if where is not None:
        finite &= _host(where).bool()
    oracle = _host(oracle).double()
    reference = _host(reference_same_dtype).double()
    lost = finite & ~oracle.isfinite()
    assert not lost.any(), (f"{what}: the float64 oracle is not finite at {int(lost.sum())} "
                            f"positions where the run in the storage dtype is")
    bound = torch.maximum(2 * (reference - oracle).abs(), ulp(oracle, actual.dtype))
    _assert_within(_host(actual).double(), oracle, bound, finite, what)


def assert_close_in_norm(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float,
                         what: str = "") -> None:
    """‖actual − expected‖ ≤ rtol·‖expected‖ over the tensors flattened together (NaN fails)."""
    a = torch.cat([_host(t).double().flatten() for t in actual])
    e = torch.cat([_host(t).double().flatten() for t in expected])
    error, size = torch.linalg.vector_norm(a - e), torch.linalg.vector_norm(e)
    assert bool(error <= rtol * size), (f"{what}: ‖diff‖ {error.item():.3e} > "
                                        f"{rtol}·{size.item():.3e}")


# ---- optimizers ----------------------------------------------------------------------------------

def state_of(optimizer, p) -> dict:
    return optimizer.state[p] if p in optimizer.state else {}


def _without_implied_mask(state: dict, other: dict, p: torch.Tensor, what: str) -> dict:
    """`state` less its keep mask when `other` has none and the mask keeps every element: an
    optimizer on the device schedule holds such a mask from its first step (it changes nothing)
    where one on the host's has none before the freeze."""
    if "keep_mask" not in state or "keep_mask" in other:
        return state
    keep_everything = masks.pack_mask(torch.ones(p.numel(), dtype=torch.bool))
    assert torch.equal(_host(state["keep_mask"]), keep_everything), (
        f"{what}: a keep mask that prunes (or has padding bits set), where the other run has none")
    return {key: value for key, value in state.items() if key != "keep_mask"}


def assert_runs_identical(params_a, opt_a, params_b, opt_b) -> None:
    """Parameters and every state tensor bit-identical (a keep mask of all ones standing for
    none), schedule positions equal."""
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        assert_bitwise_equal(a, b, f"param {i}")
        state_a, state_b = state_of(opt_a, a), state_of(opt_b, b)
        state_a, state_b = (_without_implied_mask(state_a, state_b, a, f"param {i}"),
                            _without_implied_mask(state_b, state_a, b, f"param {i}"))
        assert state_a.keys() == state_b.keys(), f"param {i}: state keys differ"
        for key in state_a:
            assert_bitwise_equal(state_a[key], state_b[key], f"param {i} state {key}")
    assert opt_a.stats()["step"] == opt_b.stats()["step"]


def snapshot(optimizer, params: list[torch.Tensor]) -> dict:
    """Clones of the parameters and every state tensor, and the schedule position."""
    state = {i: {k: v.clone() for k, v in optimizer.state[p].items()}
             for i, p in enumerate(params) if p in optimizer.state}
    return {"params": [p.detach().clone() for p in params], "state": state,
            "mgpp": dict(optimizer.state_dict()["mgpp"])}


def assert_unchanged(optimizer, params: list[torch.Tensor], before: dict) -> None:
    """Nothing of `snapshot` moved: parameters and state bit for bit, the schedule."""
    after = snapshot(optimizer, params)
    for i, (a, b) in enumerate(zip(after["params"], before["params"])):
        assert_bitwise_equal(a, b, f"param {i}")
    assert after["state"].keys() == before["state"].keys()
    for i, state in after["state"].items():
        assert state.keys() == before["state"][i].keys()
        for key, value in state.items():
            assert_bitwise_equal(value, before["state"][i][key], f"param {i} state {key}")
    assert_schedule_entries_equal(after["mgpp"], before["mgpp"])


def assert_schedule_entries_equal(a: dict, b: dict) -> None:
    """Two state_dicts' "mgpp" entries are the same: each pool's last τ and pruned count bit
    for bit (on the CPU), everything else equal."""
    a, b = dict(a), dict(b)
    pools_a, pools_b = a.pop("pools"), b.pop("pools")
    assert a == b
    assert len(pools_a) == len(pools_b)
    for i, (pool_a, pool_b) in enumerate(zip(pools_a, pools_b)):
        pool_a, pool_b = dict(pool_a), dict(pool_b)
        for key in ("last_tau", "last_pruned"):
            x, y = pool_a.pop(key), pool_b.pop(key)
            assert (x is None) == (y is None), f"pool {i} {key}"
            if x is not None:
                assert_bitwise_equal(x.cpu(), y.cpu(), f"pool {i} {key}")
        assert pool_a == pool_b, f"pool {i}"
