"""examples/prune_sst2.py end to end, on a tiny randomly initialised BERT and a tiny SST-2 folder:
every run, the accuracy table, the plot, the export and the timing, as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")

from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["good", "great", "fine", "fun", "bad", "dull", "awful", "boring", "the", "movie", "a",
         "plot", "is", "was", "very", "not"]


def tiny_model_folder(path) -> str:
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(path))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                        num_labels=2)
    BertForSequenceClassification(config).save_pretrained(str(path))
    return str(path)


def tiny_sst2_folder(path) -> str:
    generator = torch.Generator().manual_seed(0)
    for name, count in (("train.tsv", 96), ("dev.tsv", 24)):
        lines = ["sentence\tlabel"]
        for _ in range(count):
            picks = torch.randint(0, len(WORDS), (5,), generator=generator).tolist()
            label = int(sum(p < 4 for p in picks) > sum(4 <= p < 8 for p in picks))
            lines.append(" ".join(WORDS[p] for p in picks) + f"\t{label}")
        (path / name).write_text("\n".join(lines) + "\n")
    return str(path)


def run_example(tmp_path, *options: str) -> subprocess.CompletedProcess:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, "examples", "prune_sst2.py"),
               "--model", tiny_model_folder(tmp_path / "model"),
               "--data-dir", tiny_sst2_folder(tmp_path / "data"), *options]
    # As a user runs it: mgpp_kernels from the installed package (make installs the checkout in
    # editable mode), examples/glue.py from beside the script, from any working directory.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)


def check_exports(results: dict, prune_embeddings: bool) -> None:
    """Every run exported: a from_pretrained folder with the trained model's logits, and for a
    pruned run the sparse-bitmask and mgpp-sparse copies, read back bit for bit."""
    assert [os.path.basename(e["folder"]) for e in results["exports"]] == [
        run["run"] for run in results["runs"]]
    for run, export in zip(results["runs"], results["exports"]):
        folder = export["folder"]
        assert export["from_pretrained_same_logits"] and export["from_pretrained_bit_exact"]
        assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
        model = BertForSequenceClassification.from_pretrained(folder)
        assert float((model.classifier.weight == 0).float().mean()) == 0.0
        if run["kind"] == "dense":
            assert not os.path.exists(os.path.join(folder, "sparse-bitmask"))
            continue
        assert export["sparse_bitmask_same_logits"] and export["sparse_bitmask_bit_exact"]
        assert export["mgpp_sparse_same_logits"] and export["mgpp_sparse_bit_exact"]
        assert not export["sparse_bitmask_from_pretrained_same_logits"]
        assert export["mgpp_sparse_bytes"] < export["compressed_bytes"] < export["dense_bytes"]
        assert export["compressed_vs_dense"] == export["compressed_bytes"] / export["dense_bytes"]
        config = json.loads(open(os.path.join(folder, "sparse-bitmask", "config.json")).read())
        assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
        report = json.loads(open(os.path.join(folder, "sparsity_report.json")).read())
        names = [layer["name"] for layer in report["layers"]]
        assert ("bert.embeddings.word_embeddings.weight" in names) == prune_embeddings
        assert len(names) == 12 + prune_embeddings
        assert abs(report["candidates"]["sparsity"] - run["target_sparsity"]) < 1e-3


def test_prune_sst2_runs_end_to_end(tmp_path):
    output = tmp_path / "out"
    completed = run_example(tmp_path, "--quick", "--output-dir", str(output), "--steps", "12",
                            "--batch-size", "8", "--sparsities", "0.5", "0.9",
                            "--pruning-interval", "2", "--final-warmup-fraction", "0.25",
                            "--timing-rounds", "1", "--timing-steps", "2")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "SST-2 dev accuracy" in completed.stdout

    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["steps"] == 12 and results["settings"]["final_warmup_fraction"] == 0.25
    kinds = [(run["kind"], run["target_sparsity"]) for run in results["runs"]]
    assert kinds == [("dense", 0.0), ("gmp", 0.5), ("mgpp", 0.5), ("gmp", 0.9), ("mgpp", 0.9)]
    assert [run["run"] for run in results["runs"]] == ["dense", "gmp_50", "mgpp_50", "gmp_90",
                                                       "mgpp_90"]
    for run in results["runs"]:
        assert 0.0 <= run["dev_accuracy"] <= 1.0
        assert run["train_seconds"] > 0 and run["load_average_before"] >= 0
        if run["kind"] != "dense":  # the dense run's zeros are the embeddings' padding row
            assert abs(run["sparsity"] - run["target_sparsity"]) < 1e-3
    check_exports(results, prune_embeddings=False)

    assert [row["optimizer"] for row in results["timing"]] == [
        "torch AdamW(fused=True)", "MGPP reference", "MGPP cpu"]
    assert all(row["step_ms"] > 0 for row in results["timing"])
    assert (output / "accuracy_vs_sparsity.png").stat().st_size > 0


def test_prune_sst2_prunes_to_two_four(tmp_path):
    output = tmp_path / "out"
    completed = run_example(tmp_path, "--quick", "--output-dir", str(output), "--steps", "8",
                            "--batch-size", "8", "--sparsities", "0.5", "--pattern", "2:4",
                            "--runs", "gmp", "--pruning-interval", "2", "--skip-timing")
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((output / "results.json").read_text())
    run, = results["runs"]
    assert (run["run"], run["pattern"], run["target_sparsity"]) == ("gmp_50_2of4", "2:4", 0.5)
    assert abs(run["sparsity"] - 0.5) < 1e-3
    export, = [e for e in results["exports"] if e["folder"].endswith("gmp_50_2of4")]
    assert export["structure"] == "2:4" and export["mgpp_sparse_bit_exact"]


def test_distilled_runs_with_the_medium_preset(tmp_path):
    output = tmp_path / "out"
    completed = run_example(tmp_path, "--medium", "--output-dir", str(output), "--steps", "12",
                            "--batch-size", "8", "--sparsities", "0.9", "--pruning-interval", "2",
                            "--runs", "dense", "gmp_kd", "mgpp_kd", "--distillation-weight",
                            "0.7", "--prune-embeddings", "--skip-timing")
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((output / "results.json").read_text())
    settings = results["settings"]
    # The medium preset (the setting) with the overrides.
    assert settings["steps"] == 12 and settings["max_length"] == 66
    assert settings["adam_beta2"] == 0.98 and settings["adam_epsilon"] == 1e-6
    assert settings["initial_warmup_fraction"] == settings["final_warmup_fraction"] == 0.1
    assert settings["distillation_weight"] == 0.7 and settings["distillation_temperature"] == 2.0
    assert [run["run"] for run in results["runs"]] == ["dense", "gmp_kd_90", "mgpp_kd_90"]
    for run in results["runs"][1:]:
        assert run["distillation"] == {"temperature": 2.0, "weight": 0.7}
        assert abs(run["sparsity"] - 0.9) < 1e-3
    check_exports(results, prune_embeddings=True)
    assert "MGPP + distillation" in results["accuracy_table"]

    # The exported dense run as the teacher of a later invocation; no teacher is an error.
    teacher = results["exports"][0]["folder"]
    completed = run_example(tmp_path, "--medium", "--output-dir", str(tmp_path / "again"),
                            "--steps", "12", "--batch-size", "8", "--sparsities", "0.9",
                            "--pruning-interval", "2", "--runs", "mgpp_kd", "--teacher", teacher,
                            "--skip-timing")
    assert completed.returncode == 0, completed.stderr[-4000:]
    completed = run_example(tmp_path, "--medium", "--output-dir", str(tmp_path / "none"),
                            "--runs", "gmp_kd", "--skip-timing")
    assert completed.returncode != 0 and "need a teacher" in completed.stderr
