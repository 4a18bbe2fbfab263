"""Run by tests/test_cpu_dispatch.py in a fresh process with MGPP_CPU_CAPABILITY set: prints
build_info, then checks the cpu backend on the path it names against the reference within
docs/spec.md §4 (one fp32 step at every stage of the schedule; fp32 and 16-bit storage in a step
whose blocks mix weights near the spike with others, 16-bit also at an event; events on crowded
and sparse bins, whose passes collect the bin with the path's instructions, at the exact τ;
2 threads) and bit-identical to itself at 1 and 2 threads through a schedule of events, the
freeze and the frozen mask. Prints OK at the end."""
from __future__ import annotations

import torch

import mgpp_kernels  # noqa: F401

import test_cpu_threads
import test_step_bounds
import test_threshold
from backends import BY_NAME


def main() -> None:
    torch.set_num_threads(1)
    print(torch.ops.mgpp.build_info(), flush=True)
    cpu = BY_NAME["cpu"]
    assert cpu.unavailable is None, cpu.unavailable
    shapes = test_step_bounds.BREAKING_SHAPES + [(7,), (4097,), (70_000,)]
    prune = [True] * len(test_step_bounds.BREAKING_SHAPES) + [False] * 3
    for point, t in test_step_bounds.POINTS.items():
        before, runs = test_step_bounds.one_step(shapes, prune, cpu, t, kernel_threads=2,
                                                 weight_decay=0.01)
        test_step_bounds.assert_one_step_bounds(before, runs, cpu, prune, t)
    test_step_bounds.test_backend_step_fp32_within_bound(cpu, "prior")
    for dtype in (torch.bfloat16, torch.float16):
        for state_dtype in ("fp32", "param"):
            test_step_bounds.test_one_step_16bit_against_float64_oracle(
                cpu, dtype, state_dtype, "first_event")
        for state_dtype in (torch.float32, dtype):
            test_step_bounds.test_backend_step_16bit_storage_bound(cpu, dtype, state_dtype)
    for case in test_threshold.EVENT_CASES + ["negative_zeros"]:
        test_threshold.test_pruning_event_without_update_matches_reference(cpu, case)
    test_threshold.test_consecutive_events_after_an_event_prune_at_the_exact_threshold(
        cpu, "one", None)
    test_threshold.test_update_counts_the_histogram_in_a_window("one", None)
    for prediction in test_threshold.PREDICTIONS:
        test_threshold.test_event_step_prunes_at_the_exact_threshold_of_the_updated_values(
            cpu, prediction)
    single = test_cpu_threads.run(1)
    assert single[1].stats()["stage"] == "frozen"
    test_cpu_threads.assert_identical(test_cpu_threads.run(2), single)
    test_cpu_threads.assert_identical(test_cpu_threads.run(2), single)
    print("OK")


if __name__ == "__main__":
    main()
