"""The prepared GPU run (benchmarks/gpu/run.sh) in its dry run: tiny sizes on the CPU, the triton
backend through the interpreter and cpu in the place of cuda, so that the script a GPU session
spends its few minutes on cannot rot here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_run_dry_run_writes_every_measurement(tmp_path):
    environment = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run.sh"), str(tmp_path), "--dry-run"],
                          env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    steps = {(r["workload"], r["precision"], r["optimizer"], r["event"]) for r in result["steps"]}
    for workload in ("bert-base candidates", "1B elements"):
        for precision in ("fp32", "bf16"):
            assert (workload, precision, "AdamW fused", False) in steps
            for backend in ("cpu", "cpu capturable", "triton", "triton capturable"):
                for event in (False, True):
                    assert (workload, precision, f"MGPP {backend}", event) in steps
    assert all(r["ms"] > 0 and r["vs_fused_adamw"] > 0 for r in result["steps"])
    # The script asserts that every method selects kthvalue's τ; here, that each one ran.
    assert {r["method"] for r in result["selection"]} == {
        "torch.kthvalue", "torch.topk", "radix cpu", "radix triton"}
    # The dry run's stand-in for the graph (eager calls) runs the bookkeeping through the freeze.
    assert [graph["backend"] for graph in result["graph_replay"]] == ["cpu", "triton"]
    for graph in result["graph_replay"]:
        assert graph["identical"] and not graph["captured"]
        assert graph["replayed_stats"]["stage"] == "frozen"
        assert graph["replayed_stats"]["step"] == 12
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| bert-base candidates | bf16 | MGPP triton | yes |" in table
    assert "| bert-base candidates | bf16 | MGPP triton capturable | yes |" in table
