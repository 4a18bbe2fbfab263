"""The arithmetic of one cpu fused step against the memory time its bytes need.

The fused step streams θ, g, m and v once, so it is at the memory roofline only while its
arithmetic per element takes less time than moving the element's bytes. This script measures both
on one thread, side by side in one run:

- arithmetic: ns per element of torch.ops.mgpp.fused_step_ on tensors that stay in the core's
  caches, in three regimes: the prior off (AdamW alone), the slab-only prior (every weight far from
  zero) and the spike path (every weight near zero, as the pruned weights are between events);
- memory: the element's bytes at the single-thread copy bandwidth of arrays far larger than the
  caches (the copy counts 12 B per float32 element: read, read for ownership, write).

A regime whose arithmetic is near or above the memory time cannot run at the roofline however the
streams are arranged. Run with --help for the options.
"""
from __future__ import annotations

import argparse
import os
import sys

# Run as a script, this folder is on sys.path, not the checkout: put the checkout first, so that
# the script finds benchmarks.common and measures the mgpp_kernels beside it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mgpp_kernels import ops  # noqa: E402
from mgpp_kernels.backends.scalars import step_scalars  # noqa: E402
from mgpp_kernels.backends.types import Prior, UpdateGroup  # noqa: E402

from benchmarks.common.settings import (BETAS, EPS, LAMBDA_MIX, LR,  # noqa: E402
                                        NUM_TRAIN_EXAMPLES, SIGMA0_SQ, SIGMA1_SQ)
from benchmarks.common.storage import STORAGE, Storage  # noqa: E402
from benchmarks.common.timing import call_seconds, copy_bandwidth  # noqa: E402

REGIMES = ("prior off", "slab only", "spike path")


def regime_scalars(prior_on: bool) -> torch.Tensor:
    """The float64 step scalars of the benchmarks' settings without weight decay, as the kernel
    backends build them for a group with the prior (candidates) or without (the others)."""
    prior = Prior(LAMBDA_MIX, SIGMA0_SQ, SIGMA1_SQ, NUM_TRAIN_EXAMPLES) if prior_on else None
    group = UpdateGroup([], [], [], [], [], [], lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                        weight_decay=0.0, prior=prior, event=None)
    return step_scalars([group], torch.device("cpu"))


def fused_step_call(regime: str, storage: Storage, elements: int):
    """One fused_step_ call over `elements` elements (8 tensors) in the regime, as a function."""
    param_dtype, state_dtype = storage.param_dtype, storage.moment_dtype
    generator = torch.Generator().manual_seed(0)
    sizes = [elements // 8] * 8
    magnitude = 1e-5 if regime == "spike path" else 0.04
    # The slab-only regime keeps every |θ| ≥ 0.01, where the spike's weight underflows to 0.
    params = [((torch.rand(n, generator=generator) + 0.25) * magnitude).to(param_dtype)
              for n in sizes]
    grads = [(torch.randn(n, generator=generator) * 1e-3).to(param_dtype) for n in sizes]
    exp_avgs = [torch.zeros(n, dtype=state_dtype) for n in sizes]
    exp_avg_sqs = [torch.zeros(n, dtype=state_dtype) for n in sizes]
    steps = [torch.zeros((), dtype=torch.float32) for _ in sizes]
    scalars = regime_scalars(prior_on=regime != "prior off")
    return lambda: ops.fused_step_(params, grads, exp_avgs, exp_avg_sqs, steps, [], scalars)


def best_ns_per_element(call, elements: int, calls: int) -> float:
    return min(call_seconds(call) for _ in range(calls)) / elements * 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_arithmetic.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=1 << 18,
                        help="elements per call, few enough to stay in the caches")
    parser.add_argument("--calls", type=int, default=30, help="calls per cell and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every cell (best)")
    parser.add_argument("--copy-repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if not ops.BUILT:
        print(f"the compiled kernels are not usable: {ops.LOAD_ERROR}", file=sys.stderr)
        return 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bandwidth = copy_bandwidth(args.copy_repeats)
        print(f"one thread; copy bandwidth {bandwidth:.1f} GB/s; {args.elements} elements per "
              f"call, best of {args.rounds} rounds of {args.calls} calls\n")
        print("| storage | memory ns/element | " + " | ".join(
            f"{regime} ns/element (vs memory)" for regime in REGIMES) + " |")
        print("| --- | --- |" + " --- |" * len(REGIMES))
        elements = args.elements // 8 * 8
        cells = {(storage.label, regime): fused_step_call(regime, storage, elements)
                 for storage in STORAGE for regime in REGIMES}
        # Every cell once per round, the best over the rounds: a slow spell of a shared machine
        # then spoils a round, not a cell.
        best = {cell: float("inf") for cell in cells}
        for _ in range(args.rounds):
            for cell, call in cells.items():
                best[cell] = min(best[cell], best_ns_per_element(call, elements, args.calls))
        for storage in STORAGE:
            memory = storage.step_bytes() / bandwidth
            ns = [best[storage.label, regime] for regime in REGIMES]
            row = [f"{cell:.2f} ({cell / memory:.2f}x)" for cell in ns]
            print(f"| {storage.label} | {memory:.2f} | " + " | ".join(row) + " |", flush=True)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
