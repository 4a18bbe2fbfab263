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


@pytest.mark.parametrize("prune_embeddings", [False, True])
def test_prune_sst2_runs_end_to_end(tmp_path, prune_embeddings):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    output = tmp_path / "out"
    command = [sys.executable, os.path.join(ROOT, "examples", "prune_sst2.py"), "--quick",
               "--model", tiny_model_folder(tmp_path / "model"),
               "--data-dir", tiny_sst2_folder(tmp_path / "data"), "--output-dir", str(output),
               "--steps", "12", "--batch-size", "8", "--sparsities", "0.5", "0.9",
               "--pruning-interval", "2", "--final-warmup-fraction", "0.25",
               "--timing-rounds", "1", "--timing-steps", "2"]
    if prune_embeddings:
        command.append("--prune-embeddings")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "SST-2 dev accuracy" in completed.stdout

    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["steps"] == 12 and results["settings"]["final_warmup_fraction"] == 0.25
    kinds = [(run["kind"], run["target_sparsity"]) for run in results["runs"]]
    assert kinds == [("dense", 0.0), ("gmp", 0.5), ("mgpp", 0.5), ("gmp", 0.9), ("mgpp", 0.9)]
    for run in results["runs"]:
        assert 0.0 <= run["dev_accuracy"] <= 1.0
        if run["kind"] != "dense":  # the dense run's zeros are the embeddings' padding row
            assert abs(run["sparsity"] - run["target_sparsity"]) < 1e-3

    export = results["export"]
    assert export["bit_exact_reload"] and export["same_logits"]
    assert export["sparse_checkpoint_bytes"] < export["dense_checkpoint_bytes"]
    report = json.loads((output / "export" / "sparsity_report.json").read_text())
    names = [layer["name"] for layer in report["layers"]]
    assert ("bert.embeddings.word_embeddings.weight" in names) == prune_embeddings
    assert len(names) == 12 + prune_embeddings
    assert abs(report["candidates"]["sparsity"] - 0.9) < 1e-3

    assert [row["optimizer"] for row in results["timing"]] == [
        "torch AdamW(fused=True)", "MGPP reference", "MGPP cpu"]
    assert all(row["step_ms"] > 0 for row in results["timing"])
    assert (output / "accuracy_vs_sparsity.png").stat().st_size > 0
