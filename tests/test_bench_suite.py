"""The benchmarks (benchmarks/) and their library (benchmarks/common/): the suite end to end on
tiny models (every section runs, the CSV has its columns and a row per measurement, every τ
selection method agrees, the plots and summary are written); `python -m mgpp_kernels bench-suite`
and `bench` run the checkout's scripts and say plainly when there is none; the storage table's
bytes, the timers, and the step benchmark's table."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

# benchmarks/ is the repository's, not the package's: importable from the checkout's root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mgpp_kernels.__main__ as cli  # noqa: E402
from benchmarks import bench_arithmetic, bench_step, suite  # noqa: E402
from benchmarks.common import models, peers, report, results, runner, storage, timing  # noqa: E402
from mgpp_kernels import ops  # noqa: E402


def test_quick_suite_writes_consistent_results(tmp_path):
    status = suite.main(["--quick", "--no-compile", "--threads", "1",
                         "--output-dir", str(tmp_path)])
    assert status == 0
    [csv_path] = tmp_path.glob("bench_suite_*.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == results.COLUMNS
        rows = list(reader)
    assert {r["section"] for r in rows} == {"bandwidth", "step", "selection"}
    assert all(float(r["seconds"]) > 0 for r in rows if r["note"] == "" or "backend" in r["note"])

    steps = [r for r in rows if r["section"] == "step"]
    implementations = {r["implementation"] for r in steps}
    assert {"MGPP cpu", "MGPP reference", peers.FUSED_ADAMW, "torch AdamW default",
            "torch AdamW foreach", peers.RECIPE} <= implementations
    assert {(r["precision"], r["event"]) for r in steps if r["implementation"] == "MGPP cpu"} == {
        (precision, event) for precision in ("fp32", "bf16", "bf16, fp32 state", "fp16")
        for event in ("False", "True")}
    # Every storage combination also on one tensor of the peers model's size, beside fused AdamW
    # in its dtype.
    one_tensor = models.one_tensor(models.QUICK_LADDER[0]).name
    assert {r["precision"] for r in steps if r["model"] == one_tensor
            and r["implementation"] == peers.FUSED_ADAMW} == {"fp32", "bf16", "fp16"}
    for r in steps:
        expected = storage.BY_LABEL[r["precision"]].step_bytes(r["event"] == "True")
        assert int(r["bytes_per_element"]) == expected
        assert float(r["gbps"]) == pytest.approx(
            expected * int(r["elements"]) / float(r["seconds"]) / 1e9, rel=1e-4)

    selection = [r for r in rows if r["section"] == "selection"]
    for model in {r["model"] for r in selection}:
        taus = {r["implementation"]: r["tau"] for r in selection if r["model"] == model}
        assert set(taus) == set(peers.SELECTION_METHODS)
        assert len(set(taus.values())) == 1, taus
        assert 0 < float(taus["radix histograms"]) < 1

    assert len(list(tmp_path.glob("*.png"))) == 2
    summary = (tmp_path / "README.md").read_text()
    assert "| MGPP cpu | fp32 | no |" in summary and "## Targets" in summary

    rendered_again = tmp_path / "again"
    assert suite.main(["--from-csv", str(csv_path), "--output-dir", str(rendered_again)]) == 0
    assert (rendered_again / "README.md").read_text() == summary
    assert (rendered_again / csv_path.name).read_text() == csv_path.read_text()


def test_step_bytes_follow_spec():
    by_label = storage.BY_LABEL
    assert by_label["fp32"].step_bytes(False) == 28
    assert by_label["bf16"].step_bytes(False) == 14
    assert by_label["bf16, fp32 state"].step_bytes(False) == 22
    assert by_label["fp16"].step_bytes(False) == 14
    assert by_label["fp32"].step_bytes(True) == 36
    assert by_label["bf16"].step_bytes(True) == 18


def test_adamw_runs_the_storage_of_its_parameter_dtype():
    counterparts = {s.label: storage.adamw_counterpart(s).label for s in storage.STORAGE}
    assert counterparts == {"fp32": "fp32", "bf16": "bf16", "bf16, fp32 state": "bf16",
                            "fp16": "fp16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_mode_without_a_device_says_so_in_one_line(capsys):
    assert suite.main(["--device", "cuda"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "no CUDA device" in captured.err


def test_suite_without_thread_counts_as_on_a_gpu(tmp_path):
    """GPU mode's bookkeeping (no thread counts) on the CPU: tables, bars and plots still come out."""
    platform = timing.CpuPlatform()
    platform.thread_counts = [None]
    platform.bandwidth_elements = 2**16
    quick_suite = runner.Suite(platform=platform, ladder=models.QUICK_LADDER[:1],
                               peers_model=models.QUICK_LADDER[0], budget=0.005, max_repeats=1,
                               compile_reference=False, command="test")
    with timing.num_threads(1):  # two threads on a busy 2-CPU machine wait for cores
        rows = quick_suite.run()
    assert {r["threads"] for r in rows} == {""}
    report.report(rows, models.QUICK_LADDER[0].name, str(tmp_path))
    summary = (tmp_path / "README.md").read_text()
    assert "| MGPP cpu | fp32 | no |" in summary and "thread" not in summary.split("## Scaling")[1]


@pytest.mark.parametrize("command, script, option", [("bench-suite", "suite.py", "--from-csv"),
                                                     ("bench", "bench_step.py", "--repeats")])
def test_cli_runs_the_script_of_the_checkout(command, script, option):
    run = subprocess.run([sys.executable, "-m", "mgpp_kernels", command, "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: benchmarks/{script}") and option in run.stdout


@pytest.mark.parametrize("command", ["bench-suite", "bench"])
def test_cli_without_a_checkout_says_so_in_one_line(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path / "benchmarks")
    assert cli.main([command, "--quick"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "repository checkout" in captured.err


@pytest.mark.skipif(not ops.BUILT, reason="needs the compiled kernels")
def test_arithmetic_benchmark_prints_every_storage_and_regime(capsys):
    threads = torch.get_num_threads()
    assert bench_arithmetic.main(["--elements", "4096", "--calls", "2", "--rounds", "2",
                                 "--copy-repeats", "1"]) == 0
    assert torch.get_num_threads() == threads
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| storage", "| ---"))]
    assert [row.split(" | ")[0][2:] for row in rows] == [s.label for s in storage.STORAGE]
    for row in rows:
        cells = row.strip("| ").split(" | ")[1:]
        memory = float(cells[0])
        assert memory > 0
        for cell in cells[1:]:  # "ns (ratio x)", the ratio against the memory time
            ns, ratio = cell.split(" (")
            assert float(ns) > 0 and float(ratio.rstrip("x)")) == pytest.approx(
                float(ns) / memory, rel=0.02, abs=0.01)


def test_interleaved_steps_take_turns_and_each_gets_its_own_median(monkeypatch):
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    durations = {"a": iter([0, 5, 1, 9]), "b": iter([0, 2, 2, 2])}

    def step(name):
        def run():
            calls.append(name)
            for _ in range(next(durations[name])):
                next(clock)
        return run

    medians = timing.interleaved_median_times({"a": step("a"), "b": step("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # the warm-up round, then three rounds
    # Each timed call lasts its ticks plus the one between its two clock reads.
    assert medians == {"a": 6, "b": 3}


def test_step_table_says_when_peak_memory_is_unknown():
    rows = [dict(name="measured", seconds=0.5, gbps=1.0, vs_fused_adamw=1.0,
                 peak_extra_bytes=3 * 2**20),
            dict(name="unmeasurable", seconds=0.5, gbps=1.0, vs_fused_adamw=1.0,
                 peak_extra_bytes=None),
            dict(name="not a step", seconds=0.5, gbps=1.0, vs_fused_adamw=1.0)]
    measured, unknown, blank = bench_step.format_table(rows).splitlines()[2:]
    assert measured.endswith("|       3.0 |")
    assert unknown.endswith("|   unknown |")
    assert blank.endswith("|           |")


def test_pattern_section_times_both_patterns_with_and_without_an_event(monkeypatch):
    monkeypatch.setattr(bench_step, "interleaved_median_times",
                        lambda steps, repeats: {key: 2.0 if key[0] == "2:4" else 1.0
                                                for key in steps})
    rows, ratios = bench_step.pattern_rows(layers=1, repeats=1)
    assert {(row["pattern"], row["event"]) for row in rows} == {
        ("unstructured", False), ("unstructured", True), ("2:4", False), ("2:4", True)}
    assert ratios == {"2:4_vs_unstructured": 2.0, "2:4_vs_unstructured_event": 2.0}


class FakeDoBench:
    """triton.testing.do_bench's contract: it refuses an unknown return_mode with an
    AssertionError before it calls fn (`all_mode`: whether "all" is known), then calls fn."""

    def __init__(self, all_mode: bool):
        self.all_mode = all_mode
        self.modes = []

    def __call__(self, fn, warmup, rep, return_mode):
        self.modes.append(return_mode)
        assert return_mode != "all" or self.all_mode
        fn()
        return [1.0, 2.0] if return_mode == "all" else 1.5


@pytest.mark.parametrize("all_mode, expected", [(True, [1.0, 2.0]), (False, [1.5])])
def test_do_bench_without_return_mode_all_falls_back_to_the_median(all_mode, expected):
    do_bench = FakeDoBench(all_mode)
    assert timing.do_bench_milliseconds(do_bench, lambda: None, 1, 1) == expected
    assert do_bench.modes == (["all"] if all_mode else ["all", "median"])


@pytest.mark.parametrize("all_mode", [True, False])
def test_do_bench_lets_an_assertion_of_the_measured_function_through(all_mode):
    do_bench = FakeDoBench(all_mode)
    calls = []

    def failing():
        calls.append(1)
        raise AssertionError("the measured step's own check")

    with pytest.raises(AssertionError, match="the measured step's own check"):
        timing.do_bench_milliseconds(do_bench, failing, 1, 1)
    assert len(calls) == 1   # not retried
