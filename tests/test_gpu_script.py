"""The prepared GPU run (benchmarks/gpu/run.sh) in its dry run: the same stages, limits and files
as on a GPU, with tiny sizes on the CPU, the triton backend through the interpreter and cpu in the
place of cuda, so that the script a GPU session spends its few minutes on cannot rot here. One run
goes as it should; in another every stage is made to fail (MGPP_GPU_RUN_FAIL=all: the build as if
the CUDA kernels were skipped, smoke and bench in their first section, verify and tests at once),
and each stage's failure is recorded while the stages after it still run and report."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from benchmarks.common.storage import BY_LABEL

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "benchmarks/gpu/run.sh"
STAGES = ["build", "smoke", "bench", "verify", "tests"]
# The run's share of a lease: one command of at most 10 minutes within 15 of device time.
LEASE_SECONDS = 8 * 60
# A lease brings back at most 8 files; one is left for a session's own.
MAX_FILES = 7
FILES = {"summary.txt", "gpu_bench.json", "gpu_bench.md", "run.log", "logs.tar.gz"}
BENCH_SECTIONS = ["smoke", "agreement", "threshold", "nm_pools", "host_syncs", "graph_replay",
                  "steps_bert_base", "steps_1b", "selection", "semi_structured"]


def stage_limits() -> list[tuple[str, int]]:
    done = subprocess.run(["bash", str(RUN_SH), "--stages"], capture_output=True, text=True,
                          check=True)
    return [(name, int(seconds)) for name, seconds in
            (line.split() for line in done.stdout.splitlines())]


def dry_run(out: Path, **environment) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, **environment)
    env.pop("TRITON_INTERPRET", None)   # the script sets it for every stage
    return subprocess.run(["bash", str(RUN_SH), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True,
                          timeout=sum(limit for _, limit in stage_limits()) + 60)


def summary_of(out: Path) -> dict[str, tuple[str, list[str]]]:
    """summary.txt's stages: name -> (status, its key-number lines)."""
    stages, current = {}, None
    for line in (out / "summary.txt").read_text().splitlines():
        words = line.split()
        if words and words[0] in STAGES:
            current = words[0]
            stages[current] = (line[8:21].strip(), [])
        elif line.startswith("        ") and current is not None:
            stages[current][1].append(line.strip())
        else:
            current = None
    return stages


def files_left(out: Path) -> set[str]:
    return {str(path.relative_to(out)) for path in out.rglob("*")}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    done = dry_run(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run_failing")
    done = dry_run(out, MGPP_GPU_RUN_FAIL="all")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_stages_run_in_order_each_under_a_limit_within_8_minutes():
    limits = stage_limits()
    assert [name for name, _ in limits] == STAGES
    assert all(limit > 0 for _, limit in limits)
    assert sum(limit for _, limit in limits) <= LEASE_SECONDS


# ---- the dry run as it should go -----------------------------------------------------------------

def test_the_run_leaves_its_five_files_and_nothing_else(clean_run):
    assert files_left(clean_run) == FILES
    assert len(FILES) <= MAX_FILES
    assert all((clean_run / name).stat().st_size > 0 for name in FILES)


def test_the_summary_is_one_screen_with_every_stage_ok_within_its_limit(clean_run):
    lines = (clean_run / "summary.txt").read_text().splitlines()
    assert len(lines) <= 40
    stages = summary_of(clean_run)
    assert list(stages) == STAGES
    limits = dict(stage_limits())
    for line in lines:
        words = line.split()
        if words and words[0] in STAGES:
            assert words[1] == "ok", line
            assert 0 < float(words[2]) <= limits[words[0]]
    build = stages["build"][1]
    assert any(line.startswith("nvcc: ") for line in build)
    assert "backends built: cpu triton (of cpu triton)" in build
    assert any(line.startswith("cpu kernels: ") for line in build)
    assert any(line.startswith("smoke: cpu ok (θ ") and ", triton ok (θ " in line
               for line in stages["smoke"][1])
    assert any(line.startswith("checks: agreement with cpu 10/10, τ exact 32/32,")
               for line in stages["bench"][1])
    assert "all backends within docs/spec.md §4" in stages["verify"][1]
    assert any(line.startswith('pytest -m "gpu and not slow": ') and "skipped" in line
               for line in stages["tests"][1])


def test_the_archive_holds_the_build_info_the_junit_xml_and_the_verify_output(clean_run):
    with tarfile.open(clean_run / "logs.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
        assert {f"stage_{stage}.log" for stage in STAGES} <= names
        assert {"info.txt", "tests.xml", "verify.txt", "pytest.txt", "stages.tsv"} <= names
        junit = archive.extractfile(next(m for m in archive.getmembers()
                                         if m.name.endswith("tests.xml"))).read()
    suite = ElementTree.fromstring(junit).find("testsuite")
    assert int(suite.get("tests")) > 100 and int(suite.get("failures")) == 0


def test_every_section_of_the_json_ran_without_an_error(clean_run):
    result = json.loads((clean_run / "gpu_bench.json").read_text())
    assert result["dry_run"] and result["backends"] == ["cpu", "triton"]
    assert result["unavailable"] == {}
    assert list(result["sections"]) == BENCH_SECTIONS
    for name, section in result["sections"].items():
        assert section["ok"] and "error" not in section, name
        assert section["rows"], name
        assert all("error" not in row for row in section["rows"]), name
    table = (clean_run / "gpu_bench.md").read_text()
    assert "| bert-base candidates | bf16 | MGPP triton | yes |" in table
    assert "| bert-base candidates | bf16 | MGPP triton capturable | yes |" in table


def test_the_checks_run_every_backend_and_case_within_their_bounds(clean_run):
    sections = json.loads((clean_run / "gpu_bench.json").read_text())["sections"]
    for row in sections["smoke"]["rows"] + sections["agreement"]["rows"]:
        ratios = [row[key] for key in ("theta_of_bound", "m_of_bound", "v_of_bound")]
        assert all(0 <= ratio <= 1 for ratio in ratios), row   # NaN fails
    assert {(r["backend"], r["case"]) for r in sections["agreement"]["rows"]} == {
        (backend, case) for backend in ("cpu", "triton")
        for case in ("fp32", "fp32, GradScaler 1024", "bf16, fp32 state", "bf16", "fp16")}
    assert all(r["ok"] and r["tau"] == r["kthvalue"] for r in sections["threshold"]["rows"])
    assert [(r["backend"], r["pools"], r["same_as_cpu"], r["nm_structure"])
            for r in sections["nm_pools"]["rows"]] == [("cpu", 3, True, True),
                                                        ("triton", 3, True, True)]
    assert sections["semi_structured"]["rows"] == [
        {"skipped": "torch.sparse.to_sparse_semi_structured runs on CUDA only"}]
    # The dry run's stand-in for the graph (eager calls) runs the bookkeeping through the freeze.
    for graph in sections["graph_replay"]["rows"]:
        assert graph["identical"] and graph["stats_equal"] and not graph["captured"]
        assert graph["stage"] == "frozen" and graph["step"] == 13
        assert graph["replayed_steps"] == 10
        assert graph["replay_ms"] > 0 and graph["eager_ms"] > 0
    for row in sections["host_syncs"]["rows"]:
        assert row["schedule_step"] == 5 and row["syncs"] is None


def test_step_rows_count_the_bytes_of_their_own_dtypes(clean_run):
    sections = json.loads((clean_run / "gpu_bench.json").read_text())["sections"]
    rows = sections["steps_bert_base"]["rows"] + sections["steps_1b"]["rows"]
    names = {(r["workload"], r["precision"], r["optimizer"], r["event"]) for r in rows}
    for workload in ("bert-base candidates", "1B elements"):
        suffixes = ("", " capturable") if workload == "bert-base candidates" else ("",)
        for precision in ("fp32", "bf16", "bf16, fp32 state"):
            assert ((workload, precision, "AdamW fused", False) in names) == (
                precision != "bf16, fp32 state")
            assert (workload, precision, "device copy", False) in names
            for backend in ("cpu", "triton"):
                for suffix in suffixes:
                    for event in (False, True):
                        assert (workload, precision, f"MGPP {backend}{suffix}", event) in names
    for row in rows:
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        assert row["gbps"] == pytest.approx(
            row["bytes_per_element"] * row["elements"] / row["ms"] / 1e6, rel=1e-9)
        if row["optimizer"] == "device copy":
            continue
        storage = BY_LABEL[row["precision"]]
        assert row["state_dtype"] == str(storage.moment_dtype).removeprefix("torch.")
        assert row["bytes_per_element"] == storage.step_bytes(row["event"])
        # bf16 MGPP keeps bf16 state beside fused AdamW's: the same bytes, so a ratio; the
        # fp32-state rows move more and have none.
        assert ("vs_fused_adamw" in row) == (row["precision"] != "bf16, fp32 state")
    bf16 = {(r["optimizer"], r["event"]): r["bytes_per_element"] for r in rows
            if r["precision"] == "bf16"}
    assert bf16[("AdamW fused", False)] == bf16[("MGPP triton", False)] == 14
    assert {r["bytes_per_element"] for r in rows if r["precision"] == "bf16, fp32 state"
            and r["optimizer"].startswith("MGPP") and not r["event"]} == {22}


# ---- every stage made to fail --------------------------------------------------------------------

def test_a_failing_run_still_leaves_the_summary_and_the_json(failing_run):
    assert files_left(failing_run) == FILES
    result = json.loads((failing_run / "gpu_bench.json").read_text())
    assert list(result["sections"]) == BENCH_SECTIONS


@pytest.mark.parametrize("stage", STAGES)
def test_a_failed_stage_is_recorded_and_the_next_ones_still_report(failing_run, stage):
    stages = summary_of(failing_run)
    assert list(stages) == STAGES
    status, lines = stages[stage]
    assert status.startswith("FAILED"), (stage, status)
    result = json.loads((failing_run / "gpu_bench.json").read_text())
    sections = result["sections"]
    if stage == "build":
        # The cuda stand-in counts as not built: the triton half runs alone after it.
        assert "backends built: triton (of cpu triton)" in lines
        assert any(line.startswith("failure injected (MGPP_GPU_RUN_FAIL); build info: cpu kernels")
                   for line in lines)
        assert result["backends"] == ["triton"] and list(result["unavailable"]) == ["cpu"]
    elif stage in ("smoke", "bench"):
        first = "smoke" if stage == "smoke" else "agreement"
        assert sections[first]["error"] == (
            f"RuntimeError: failure injected (MGPP_GPU_RUN_FAIL={stage})")
        assert any(line.startswith(f"failed: {first} (RuntimeError: failure injected")
                   for line in lines)
        if stage == "bench":
            # The sections after the failing one ran, with the triton rows only.
            for name in BENCH_SECTIONS[2:]:
                assert sections[name]["ok"], name
                assert sections[name]["rows"], name
            assert {r["optimizer"] for r in sections["steps_1b"]["rows"]} == {
                "AdamW fused", "MGPP triton", "device copy"}
            assert any(line.startswith("checks: τ exact 16/16, ") for line in lines)
    else:
        assert lines == ["failure injected (MGPP_GPU_RUN_FAIL)"]
