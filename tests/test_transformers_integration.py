"""MGPP in the transformers Trainer, the sparse export, and the SST-2 TSV loader.

Every model here is a tiny randomly initialised BERT: nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

from mgpp_kernels import MGPP, candidate_names  # noqa: E402
from mgpp_kernels.integrations.export import (format_sparsity_table, load_sparse,  # noqa: E402
                                              load_sparse_state_dict, save_sparse,
                                              sparsity_report)
from mgpp_kernels.integrations.transformers import (MGPPCallback,  # noqa: E402
                                                    add_mgpp_callback, create_mgpp,
                                                    mgpp_optimizer_cls_and_kwargs, unwrap_mgpp)
from mgpp_kernels import masks  # noqa: E402

import backends  # noqa: E402

# The SST-2 loader is the example's, beside it in examples/ (not part of the package).
EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES_DIR)
from glue import SST2_DIR_ENV, load_sst2, read_glue_tsv  # noqa: E402

NUM_EXAMPLES = 32
BATCH = 8
SEQ = 8


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ, num_labels=2)
    return BertForSequenceClassification(config)


def tiny_dataset(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (NUM_EXAMPLES, SEQ), generator=generator)
    labels = (ids[:, 0] % 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
             "labels": labels[i]} for i in range(NUM_EXAMPLES)]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                    learning_rate=1e-2, weight_decay=0.0, logging_steps=2, report_to="none",
                    save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def candidates_of(model) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    return [params[name] for name in candidate_names(model)]


def candidate_sparsity(model) -> float:
    tensors = candidates_of(model)
    return sum(int((p == 0).sum()) for p in tensors) / sum(p.numel() for p in tensors)


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("backend", backends.params())
def test_trainer_prunes_to_target_and_freezes_the_mask(tmp_path, backend):
    model = tiny_bert().to(backend.device)
    # Epochs, not max_steps: total_steps is unknown until the callback reads the Trainer's.
    args = training_args(tmp_path, num_train_epochs=3, use_cpu=backend.device == "cpu")
    optimizer = create_mgpp(model, args, num_train_examples=NUM_EXAMPLES, initial_warmup_steps=2,
                            final_warmup_steps=3, pruning_interval=2, initial_sparsity=0.3,
                            final_sparsity=0.75, backend=backend.name)
    assert optimizer.config.total_steps is None
    others = [p for p in model.parameters() if all(p is not c for c in candidates_of(model))]
    nonzero_before = [p.detach() != 0 for p in others]
    recorder = LogRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(),
                      optimizers=(optimizer, None), callbacks=[recorder])
    callback = add_mgpp_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    steps = 3 * NUM_EXAMPLES // BATCH
    assert optimizer.config.total_steps == steps
    assert trainer.state.global_step == steps
    assert optimizer.stats()["stage"] == "frozen"
    assert abs(candidate_sparsity(model) - 0.75) <= 1e-3
    # The frozen mask is the zero pattern, and it held through the final fixed-mask steps.
    for p in candidates_of(model):
        keep = masks.unpack_mask(optimizer.state[p]["keep_mask"], p)
        assert torch.equal(keep, p.detach() != 0)
    # Non-candidates are never pruned.
    assert all(bool((p[was_nonzero] != 0).all()) for p, was_nonzero in zip(others, nonzero_before))

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(2, steps + 1, 2))
    # A log at global step s reports the stage of schedule position s - 1.
    assert [entry["mgpp_stage"] for entry in logged] == ["dense"] + ["pruning"] * 3 + ["frozen"] * 2
    numel = sum(p.numel() for p in candidates_of(model))
    assert logged[0]["mgpp_sparsity"] == logged[0]["mgpp_zero_fraction"] == 0.0
    for entry in logged[1:]:
        # docs/spec.md §2: an event zeroes the weights below τ, the int(N·s)-th smallest (τ
        # itself stays).
        # mgpp_sparsity is what the last event reached; the pruned weights regrow at once in the
        # pruning stage (every log here follows a step without an event), so the zeros now are
        # fewer until the freeze, and then the same.
        reached = (int(numel * entry["mgpp_target_sparsity"]) - 1) / numel
        assert entry["mgpp_sparsity"] == reached
        if entry["mgpp_stage"] == "pruning":
            assert entry["mgpp_zero_fraction"] < entry["mgpp_sparsity"]
        else:
            assert entry["mgpp_zero_fraction"] == entry["mgpp_sparsity"]
    assert logged[-1]["mgpp_zero_fraction"] == candidate_sparsity(model)
    assert logged[-1]["mgpp_target_sparsity"] == 0.75
    assert logged[-1]["mgpp_tau"] > 0
    assert logged[0]["mgpp_lambda_t"] == pytest.approx(0.1)
    assert logged[-1]["mgpp_lambda_t"] == pytest.approx(0.1 * 1e-3)
    # The other callbacks saw the entries too: the MGPP callback runs first.
    recorded = [entry for entry in recorder.logs if "loss" in entry]
    assert recorded[-1]["mgpp_stage"] == "frozen"


def test_optimizer_cls_and_kwargs_with_gmp_baseline(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path, max_steps=6, weight_decay=0.01, learning_rate=3e-3,
                         adam_beta2=0.99)
    pair = mgpp_optimizer_cls_and_kwargs(model, args, num_train_examples=NUM_EXAMPLES,
                                         initial_warmup_steps=1, pruning_interval=1,
                                         final_sparsity=0.5, use_prior=False)
    optimizer_cls, kwargs = pair
    assert optimizer_cls is MGPP and kwargs["total_steps"] == 6
    assert kwargs["lr"] == 3e-3 and kwargs["betas"] == (0.9, 0.99)
    groups = kwargs["params"]
    assert [group["prune"] for group in groups] == [True, False, False]
    assert [group["weight_decay"] for group in groups] == [0.01, 0.01, 0.0]
    recorder = LogRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(),
                      optimizer_cls_and_kwargs=pair, callbacks=[MGPPCallback(), recorder])
    trainer.train()
    optimizer = unwrap_mgpp(trainer.optimizer)
    assert not optimizer.use_prior
    assert abs(candidate_sparsity(model) - 0.5) <= 1e-3
    final = [entry for entry in recorder.logs if "loss" in entry][-1]
    assert final["mgpp_stage"] == "frozen" and "mgpp_lambda_t" not in final
    assert final["mgpp_sparsity"] == final["mgpp_zero_fraction"] == candidate_sparsity(model)


def test_builder_checks_settings_before_training(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path, max_steps=6)
    with pytest.raises(ValueError, match="final_sparsity"):
        create_mgpp(model, args, num_train_examples=10, initial_warmup_steps=1,
                    final_sparsity=1.5)
    with pytest.raises(ValueError, match="initial_warmup_steps"):
        mgpp_optimizer_cls_and_kwargs(model, args, num_train_examples=10, initial_warmup_steps=5)
    with pytest.raises(TypeError, match="final_sparcity"):
        mgpp_optimizer_cls_and_kwargs(model, args, num_train_examples=10, initial_warmup_steps=1,
                                      final_sparcity=0.5)
    with pytest.raises(ValueError, match="use_prior"):
        create_mgpp(model, num_train_examples=10, initial_warmup_steps=1, total_steps=6,
                    use_prior=0)


def test_callback_rejects_other_optimizers_and_warns_on_a_short_schedule(tmp_path):
    model = tiny_bert()
    args = training_args(tmp_path, max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(),
                      callbacks=[MGPPCallback()])
    with pytest.raises(ValueError, match="MGPP"):
        trainer.train()
    optimizer = create_mgpp(model, num_train_examples=NUM_EXAMPLES, initial_warmup_steps=1,
                            total_steps=10)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(),
                      optimizers=(optimizer, None), callbacks=[MGPPCallback()])
    with pytest.warns(UserWarning, match="max_steps = 4"):
        trainer.train()


def test_callback_logs_each_pool_when_there_are_several():
    first, second = (torch.nn.Parameter(torch.randn(8, 8)) for _ in range(2))
    optimizer = MGPP([{"params": [first], "prune": True, "pattern": "2:4"},
                      {"params": [second], "prune": True, "final_sparsity": 0.5}],
                     num_train_examples=10, initial_warmup_steps=0, total_steps=4,
                     backend="reference")
    for p in (first, second):
        p.grad = torch.ones_like(p)
    optimizer.step()
    callback = MGPPCallback()
    callback.optimizer = optimizer
    entries = callback.log_entries()
    stats = optimizer.stats()
    assert "mgpp_tau" not in entries
    for i, pool in enumerate(stats["pools"]):
        assert entries[f"mgpp_pool{i}_sparsity"] == pool["event_sparsity"] > 0
        assert entries[f"mgpp_pool{i}_tau"] == pool["tau"]


def test_prior_off_without_pruning_is_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(4097)]
    params = [w.clone().requires_grad_() for w in weights]
    expected = [w.clone().requires_grad_() for w in weights]
    mgpp = MGPP([{"params": params, "prune": True}], lr=1e-2, weight_decay=0.1,
                num_train_examples=3, initial_warmup_steps=0, total_steps=20,
                initial_sparsity=0.0, final_sparsity=0.0, use_prior=False, backend="reference")
    adamw = torch.optim.AdamW(expected, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for p, q, g in zip(params, expected, grads):
            p.grad, q.grad = g.clone(), g.clone()
        mgpp.step()
        adamw.step()
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def pruned_tiny_bert(sparsity: float = 0.9) -> BertForSequenceClassification:
    model = tiny_bert(seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in candidates_of(model):
            p.masked_fill_(torch.rand(p.shape, generator=generator) < sparsity, 0.0)
        first = candidates_of(model)[0]
        first.view(-1)[:3] = torch.tensor([-0.0, 0.0, -0.0])
    return model


def bit_patterns(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.uint8)


def test_export_round_trip_is_bit_exact_and_smaller(tmp_path):
    model = pruned_tiny_bert().eval()
    sparse_path = tmp_path / "model.sparse.safetensors"
    dense_path = tmp_path / "model.safetensors"
    summary = save_sparse(model, str(sparse_path))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_path))
    assert set(candidate_names(model)) <= set(summary["sparse"])

    restored = tiny_bert(seed=2).eval()
    load_sparse(restored, str(sparse_path))
    saved, loaded = model.state_dict(), restored.state_dict()
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(bit_patterns(saved[name]), bit_patterns(loaded[name])), name
    first = candidates_of(restored)[0].view(-1)[:3]
    assert torch.signbit(first).tolist() == [True, False, True]
    inputs = tiny_dataset()[0]
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"][None]).logits
        actual = restored(input_ids=inputs["input_ids"][None]).logits
    assert torch.equal(expected, actual)

    candidate_bytes = sum(p.numel() * 4 for p in candidates_of(model))
    saved_bytes = os.path.getsize(dense_path) - os.path.getsize(sparse_path)
    # Each 90%-sparse candidate keeps ~10% of its values and 1 bit per element.
    assert saved_bytes > 0.8 * candidate_bytes - 4096


def test_export_keeps_tied_dense_and_16_bit_tensors(tmp_path):
    module = torch.nn.Module()
    module.embed = torch.nn.Embedding(11, 6)
    module.head = torch.nn.Linear(6, 11, bias=False)
    module.head.weight = module.embed.weight        # tied
    module.bf16 = torch.nn.Parameter(torch.zeros(4097, dtype=torch.bfloat16))
    module.register_buffer("steps", torch.arange(5))
    with torch.no_grad():
        module.embed.weight[:, 1:] = 0.0
        module.bf16[::100] = 1.5
    summary = save_sparse(module, str(tmp_path / "m.safetensors"))
    assert summary["tied"] == {"head.weight": "embed.weight"}
    assert summary["sparse"] == ["bf16", "embed.weight"] and summary["dense"] == ["steps"]
    state = load_sparse_state_dict(str(tmp_path / "m.safetensors"))
    for name, tensor in module.state_dict().items():
        assert state[name].dtype == tensor.dtype
        assert torch.equal(bit_patterns(state[name]), bit_patterns(tensor)), name

    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an mgpp-sparse-v1 file"):
        load_sparse_state_dict(str(tmp_path / "plain.safetensors"))


def test_sparsity_report(tmp_path):
    model = pruned_tiny_bert(sparsity=0.5)
    report = sparsity_report(model)
    names = candidate_names(model)
    assert [layer["name"] for layer in report["layers"]] == names
    params = dict(model.named_parameters())
    for layer in report["layers"]:
        p = params[layer["name"]]
        assert layer["zeros"] == int((p == 0).sum()) and layer["numel"] == p.numel()
    total = report["candidates"]
    assert total["zeros"] == sum(layer["zeros"] for layer in report["layers"])
    assert 0.4 < total["sparsity"] < 0.6
    assert report["all_parameters"]["numel"] == sum(p.numel() for p in model.parameters())
    table = format_sparsity_table(report)
    assert names[0] in table and "candidates" in table
    assert json.loads(json.dumps(report)) == report
    with pytest.raises(ValueError, match="no parameter nope"):
        sparsity_report(model, ["nope"])


def write_tsv(path, rows, header="sentence\tlabel"):
    path.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")


def test_sst2_from_a_tsv_folder(tmp_path, monkeypatch):
    write_tsv(tmp_path / "train.tsv", ['a " quoted phrase\t1', "dull , dull .\t0"])
    write_tsv(tmp_path / "dev.tsv", ["fine\t1"])
    data = load_sst2(str(tmp_path))
    assert data["train"] == {"sentence": ['a " quoted phrase', "dull , dull ."], "label": [1, 0]}
    assert data["validation"] == {"sentence": ["fine"], "label": [1]}
    monkeypatch.setenv(SST2_DIR_ENV, str(tmp_path))
    assert load_sst2() == data

    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        load_sst2(str(tmp_path))
    write_tsv(tmp_path / "bad.tsv", ["x\t1"], header="text\tlabel")
    with pytest.raises(ValueError, match="header"):
        read_glue_tsv(str(tmp_path / "bad.tsv"))
    write_tsv(tmp_path / "bad.tsv", ["x\tpositive"])
    with pytest.raises(ValueError, match="bad.tsv:2"):
        read_glue_tsv(str(tmp_path / "bad.tsv"))
