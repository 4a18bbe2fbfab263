"""What is particular to the triton backend (its agreement with the reference, one step, τ, whole
runs, is in the conformance suites over tests/backends.py): its shared math element by element
through the interpreter, its launches, cached tables and the absence of host reads in step(),
its step-list checks, and its kernels compiled for real GPU targets (no GPU needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from mgpp_kernels import MGPP, schedule  # noqa: E402
from mgpp_kernels import optimizer as optimizer_module  # noqa: E402
from mgpp_kernels.backends import load_backend, scalars  # noqa: E402
from mgpp_kernels.backends.triton import backend as triton_backend  # noqa: E402
from mgpp_kernels.backends.triton import kernels  # noqa: E402

from compare import assert_bitwise_equal, assert_within, ulp  # noqa: E402
from helpers import make_params  # noqa: E402
from step_inputs import StepTensors, prune_event  # noqa: E402

TRITON = load_backend("triton")
REFERENCE = load_backend("reference")
interpreted = pytest.mark.skipif(not triton_backend.INTERPRETED,
                                 reason="needs TRITON_INTERPRET=1 (CPU tensors)")
# The prior's exp overflows to +inf on purpose (ρ0 = 0); numpy warns about it.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.slow]


def make_model(shapes, dtype, seed=0):
    return make_params(shapes, dtype, seed=seed, scale=0.02)


# ---- the shared math, element by element ------------------------------------------------------

@triton.jit
def _primitives_kernel(x, bf16_bits, f16_bits, exp, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    valid = offsets < n
    value = tl.load(x + offsets, mask=valid, other=0.0)
    tl.store(bf16_bits + offsets, kernels._f32_to_bf16_bits(value), mask=valid)
    tl.store(f16_bits + offsets, kernels._f32_to_f16_bits(value), mask=valid)
    tl.store(exp + offsets, kernels._exp_for_logistic(value), mask=valid)


def special_floats():
    specials = torch.tensor([
        0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000,   # zeros, denormals, min normal
        0x3F808000, 0x3F818000, 0x3F80C000, 0xBF808001,               # bf16 ties and near-ties
        0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000,               # max, rounds to inf, ±inf
        0x7FC00000, 0xFFC00001, 0x7F800001,                           # NaNs
        0x477FF000, 0x477FEFFF, 0x477FE000,                           # fp16: 65520 -> inf, 65504
        0x33800000, 0x33000000, 0x33000001, 0x387FC000, 0x38800000,   # fp16 denormals and ties
        0x42B17218, 0x42B17217, 0x42B00000, 0xC2AC0000, 0xC2AD0000,   # exp: ln(FLT_MAX), ±86
    ], dtype=torch.int64).to(torch.int32)
    random_bits = torch.randint(-2**31, 2**31, (4000,), generator=torch.Generator().manual_seed(9),
                                dtype=torch.int64).to(torch.int32)
    ranged = torch.linspace(-100.0, 100.0, 4001)
    return torch.cat([specials.view(torch.float32), random_bits.view(torch.float32), ranged])


@interpreted
def test_16bit_rounding_and_exp_match_torch_and_float64():
    x = special_floats()
    n = x.numel()
    bf16_bits = torch.empty(n, dtype=torch.uint16)
    f16_bits = torch.empty(n, dtype=torch.uint16)
    exp = torch.empty(n, dtype=torch.float32)
    _primitives_kernel[(1,)](x, bf16_bits, f16_bits, exp, n, BLOCK=triton.next_power_of_2(n))
    # torch rounds to nearest even too (its NaN payloads vary between its code paths).
    nan = x.isnan()
    for name, ours in (("bfloat16", bf16_bits.view(torch.bfloat16)),
                       ("float16", f16_bits.view(torch.float16))):
        assert_bitwise_equal(ours[~nan], x[~nan].to(ours.dtype), name)
        assert ours[nan].isnan().all(), name
    assert (bf16_bits[nan] == 0x7FC0).all()  # csrc/core/formats.h's canonical NaN
    # exp_for_logistic: within 2.5 ulp of exp (docs/spec.md §4: 2.3 without FMA, as the
    # interpreter rounds tl.fma) for inputs in [-86, ln(FLT_MAX)], +inf above, NaN kept,
    # exp(-86) below.
    finite = x.isfinite()
    exact = torch.exp(x.double().clamp(-86.0, 88.72283935546875))
    inside = finite & (x >= -86.0) & (x < 88.72283935546875)  # exp(ln(FLT_MAX) rounded up) = inf
    assert_within(exp[inside], exact[inside], 2.5 * ulp(exact[inside], torch.float32), "exp")
    assert (exp[finite & (x > 88.72283935546875)] == float("inf")).all()
    assert (exp[x.isnan()].isnan()).all() and exp[x == float("inf")].eq(float("inf")).all()
    assert torch.equal(exp[finite & (x < -86.0)],
                       torch.full_like(exp[finite & (x < -86.0)], exp[x == -86.0][0].item()))


# ---- launches, tables and host synchronisation ------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches through the interpreter, by kernel name."""
    from triton.runtime.interpreter import InterpretedFunction
    counts = []
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counts


# t_end = 8 - 2 - 1 = 5: dense at t = 0, 1, events at 2 and 4, the freeze at 5, frozen at 6, 7.
SHORT_SCHEDULE = dict(num_train_examples=100, initial_warmup_steps=2, total_steps=8,
                      final_warmup_steps=2, pruning_interval=2)


def launches_per_step(num_tensors, launches):
    candidates = make_model([(50,)] * num_tensors, torch.float32, seed=1)
    others = make_model([(9,)] * num_tensors, torch.float32, seed=2)
    optimizer = MGPP([{"params": candidates, "prune": True}, {"params": others, "prune": False}],
                     lr=1e-3, backend="triton", **SHORT_SCHEDULE)
    per_step = []
    for t in range(8):
        for p in candidates + others:
            p.grad = torch.full_like(p, 0.01 * (t + 1))
        before = len(launches)
        optimizer.step()
        per_step.append(launches[before:])
    return per_step


@interpreted
def test_launch_count_does_not_grow_with_the_number_of_tensors(launches):
    few, many = launches_per_step(2, launches), launches_per_step(7, launches)
    assert few == many
    update = ["prepare_kernel", "update_kernel"]
    prune = ["select_kernel", "histogram_kernel", "select_kernel", "threshold_kernel"]
    assert few == [update, update, update + prune, update, update + prune, update + prune,
                   update, update]


@interpreted
def test_tables_are_built_once_while_the_tensors_stay():
    before = StepTensors.make([(7,), (40,)], torch.float32, torch.float32)
    backend = triton_backend.TritonBackend()
    for _ in range(3):
        backend.step([before.group()], [], None)
    assert backend._plans.builds == 1
    before.grads[1] = before.grads[1].clone()  # a new gradient tensor: new addresses, new table
    backend.step([before.group()], [], None)
    assert backend._plans.builds == 2
    assert [s.item() for s in before.steps] == [7.0, 7.0]


@interpreted
def test_the_guard_catches_host_reads(forbid_host_reads):
    from mgpp_kernels.backends import reference as reference_backend
    forbid_host_reads([reference_backend.__file__])
    before = StepTensors.make([(7,)], torch.float32, torch.float32)
    with pytest.raises(AssertionError, match="Tensor.item"):
        REFERENCE.step([before.group()], [], None)


@interpreted
def test_step_never_reads_device_values_on_the_host(forbid_host_reads):
    shapes = [(33,), (7,), (1,), (0,)]
    candidates = make_model(shapes, torch.float32, seed=3)
    others = make_model([(5,)], torch.bfloat16, seed=4)
    optimizer = MGPP([{"params": candidates, "prune": True}, {"params": others, "prune": False}],
                     lr=1e-3, backend="triton", **SHORT_SCHEDULE)
    forbid_host_reads([triton_backend.__file__, kernels.__file__, scalars.__file__,
                       optimizer_module.__file__, schedule.__file__])
    for t in range(8):  # dense, events, the freeze, frozen
        for i, p in enumerate(candidates + others):
            p.grad = None if (t == 4 and i == 0) else torch.full_like(p, 0.01 * (t + 1))
        optimizer.grad_scale = torch.tensor(1.0)
        optimizer.step()
    TRITON.global_threshold(candidates, 3)


# ---- bad input ---------------------------------------------------------------------------------

@interpreted
def test_bad_input_is_rejected_before_anything_changes():
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        TRITON.check_params([torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="contiguous"):
        TRITON.check_params([torch.zeros(4, 3).t()])
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        MGPP([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], backend="triton",
             num_train_examples=1, initial_warmup_steps=1, total_steps=4)

    before = StepTensors.make([(7,), (5,)], torch.float32, torch.float32)
    bad = before.clone()
    bad.grads[1] = bad.grads[1].half()
    with pytest.raises(ValueError, match="grads\\[1\\] must have its parameter's dtype"):
        TRITON.step([bad.group()], [], None)
    bad = before.clone()
    bad.exp_avg_sqs[0] = bad.exp_avg_sqs[0].half()
    with pytest.raises(ValueError,
                       match="exp_avg_sqs\\[0\\] must have the dtype of exp_avgs\\[0\\]"):
        TRITON.step([bad.group()], [], None)
    ok = before.clone()
    with pytest.raises(ValueError, match="k must be in"):
        TRITON.step([ok.group()], [prune_event(ok.params, 13)], None)
    with pytest.raises(ValueError, match="keep_masks\\[0\\] must be uint8"):
        TRITON.step([ok.group()], [prune_event(ok.params, 3, [torch.zeros(2, dtype=torch.uint8)]
                                               * 2)], None)
    ok.assert_equal(before, "after a rejected step")


# ---- compiled for real GPUs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_builds():
    """Every kernel variant compiled for sm_80 and sm_90 by tests/gpu_compile.py. It runs in its
    own process: one that imported triton with TRITON_INTERPRET=1 holds interpreted versions of
    triton.language's library functions and cannot compile kernels."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "gpu_compile.py"), "80", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles_for_sm80_and_sm90(gpu_builds):
    kernel_names = {"schedule_kernel", "prepare_kernel", "update_kernel", "histogram_kernel",
                    "select_kernel", "threshold_kernel"}
    for capability in (80, 90):
        builds = [b for b in gpu_builds if b["capability"] == capability]
        assert {b["name"] for b in builds} == kernel_names
        pairs = {(b["constexprs"]["PARAM_DTYPE"], b["constexprs"]["STATE_DTYPE"])
                 for b in builds if b["name"] == "update_kernel"
                 and not b["constexprs"]["SCHEDULED"]}
        assert pairs == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)}
        for b in builds:
            assert b["target"].startswith(f"sm_{capability}"), b  # sm_90a for 90
            assert not b["approximate_f32_division"], b
            # The per-element math: IEEE division and square root, denormals kept, and the
            # multiply-adds of csrc/core/step.h fused (tl.fma).
            if b["name"] == "update_kernel":
                assert not b["approximate"], b
                assert b["fused_f32"] >= 10, b


@pytest.mark.parametrize("param,state", [(0, 0), (1, 0), (1, 1), (2, 0), (2, 2)])
def test_update_kernel_loads_its_operands_128_bits_at_a_time_on_sm90(gpu_builds, param, state):
    build, = [b for b in gpu_builds if b["capability"] == 90 and b["name"] == "update_kernel"
              and b["constexprs"] == dict(PARAM_DTYPE=param, STATE_DTYPE=state, COUNT=True,
                                          SCHEDULED=False, ALIGNED=True,
                                          BLOCK=triton_backend.GPU_BLOCKS["update"])]
    # A full block is 2048 elements over 128 threads: 16 elements of θ, g, m and v per thread,
    # which is 4 128-bit loads of fp32 data or 2 of 16-bit data for each operand.
    per_operand = {0: 4, 1: 2, 2: 2}
    assert build["v4_loads"] >= sum(per_operand[d] for d in (param, param, state, state))
    assert build["v4_stores"] >= sum(per_operand[d] for d in (param, state, state))
