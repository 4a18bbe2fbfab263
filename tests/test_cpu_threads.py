"""The cpu backend's threads: the same inputs give bit-identical parameters, moments, masks and τ
at 1 and 2 threads, and from one run to the next, and a multi-threaded step stays within docs/spec.md §4
of the reference. The tensors span several 32768-element chunks, so that with 2 threads both
threads update, count their own histograms (merged for τ) and apply the masks."""
from __future__ import annotations

import pytest
import torch

from mgpp_kernels import MGPP

from compare import assert_bitwise_equal
from test_step_bounds import POINTS, assert_one_step_bounds, one_step

from backends import BY_NAME

CPU = BY_NAME["cpu"]
pytestmark = pytest.mark.skipif(CPU.unavailable is not None,
                                reason=f"the cpu backend does not run here: {CPU.unavailable}")

SHAPES = [(100_003,), (300, 257), (40_000,), (7,), (0,), (1,), (5_000,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32,
          torch.bfloat16, torch.float32]
PRUNE = [True, True, True, True, True, True, False]
# Events at t = 3, 5, 10 and the freeze at t_end = 16 - 3 - 1 = 12; frozen after.
SCHEDULE = dict(num_train_examples=10_000, initial_warmup_steps=3, total_steps=16,
                final_warmup_steps=3, pruning_interval=5, initial_sparsity=0.3,
                final_sparsity=0.8)


def run(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.05).to(dtype))
                  for shape, dtype in zip(SHAPES, DTYPES)]
        optimizer = MGPP([{"params": [p for p, c in zip(params, PRUNE) if c], "prune": True},
                          {"params": [p for p, c in zip(params, PRUNE) if not c]}],
                         lr=1e-3, weight_decay=0.01, backend="cpu", **SCHEDULE)
        taus = []
        for t in range(SCHEDULE["total_steps"]):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=generator) * 0.01).to(p.dtype)
            optimizer.step()
            taus.append(optimizer.stats()["tau"])
        return params, optimizer, taus
    finally:
        torch.set_num_threads(previous)


def assert_identical(run_a, run_b) -> None:
    (params_a, opt_a, taus_a), (params_b, opt_b, taus_b) = run_a, run_b
    assert taus_a == taus_b
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert_bitwise_equal(a.detach(), b.detach(), f"param {i}")
        assert opt_a.state[a].keys() == opt_b.state[b].keys()
        for key, value in opt_a.state[a].items():
            assert_bitwise_equal(value, opt_b.state[b][key], f"param {i} {key}")


def test_one_and_two_threads_are_bit_identical():
    single = run(1)
    assert single[1].stats()["stage"] == "frozen"
    assert all("keep_mask" in single[1].state[p] for p, c in zip(single[0], PRUNE) if c)
    assert_identical(run(2), single)


def test_two_threads_are_bit_identical_run_to_run():
    assert_identical(run(2), run(2))


@pytest.mark.parametrize("point", ["dense", "first_event", "frozen"])
def test_one_step_multithreaded(point, all_threads):
    """Tensors of several chunks, so every thread updates, counts its own histogram (merged for
    τ) and applies masks."""
    shapes, prune = [(70000,), (257, 130), (7,), (40000,)], [True, True, True, False]
    t = POINTS[point]
    before, runs = one_step(shapes, prune, CPU, t, kernel_threads=all_threads)
    assert_one_step_bounds(before, runs, CPU, prune, t)
