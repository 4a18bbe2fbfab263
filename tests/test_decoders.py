"""Causal language models through the Trainer with the default pruning patterns: a tiny randomly
initialised LLaMA-style and GPT-2-style model pruned to the target sparsity, the mask frozen for
the last steps, exported (mgpp-sparse, compressed-tensors sparse-bitmask, save_pretrained) and
reloaded bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("compressed_tensors")

from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,
                          TrainingArguments)

from mgpp_kernels import MGPP, DEFAULT_PATTERNS, candidate_names, param_groups  # noqa: E402
from mgpp_kernels.integrations.export import (load_compressed_pretrained,  # noqa: E402
                                              load_sparse, save_compressed_pretrained,
                                              save_sparse)
from mgpp_kernels.integrations.transformers import add_mgpp_callback, create_mgpp  # noqa: E402

VOCAB = 48
SEQ = 12
NUM_EXAMPLES = 32
STEPS = 16
FINAL_WARMUP = 4
SPARSITY = 0.8


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=SEQ))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                      n_positions=SEQ))


# The candidates the default patterns must find: every attention and MLP matrix, nothing else.
EXPECTED_CANDIDATES = {
    "llama": [f"model.layers.{i}.{name}.weight" for i in range(2)
              for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
    "gpt2": [f"transformer.h.{i}.{name}.weight" for i in range(2)
             for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")],
}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def token_dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (NUM_EXAMPLES, SEQ), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones(SEQ, dtype=torch.long),
             "labels": row.clone()} for row in ids]


class ZerosRecorder(TrainerCallback):
    """The zero pattern of the candidates after every step."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.zeros: list[list[torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.zeros.append([p.detach() == 0 for p in self.params])


def bit_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[k].contiguous().view(torch.uint8),
                    state_b[k].contiguous().view(torch.uint8)) for k in state_a)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_prunes_freezes_exports_and_reloads(tmp_path, family):
    model = BUILDERS[family]()
    names = candidate_names(model)
    assert names == EXPECTED_CANDIDATES[family]
    params = dict(model.named_parameters())
    candidates = [params[name] for name in names]
    pruned_group = param_groups(model)[0]
    assert pruned_group["prune"] and [id(p) for p in pruned_group["params"]] == [
        id(p) for p in candidates]

    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             max_steps=STEPS, learning_rate=1e-2, weight_decay=0.0,
                             logging_steps=4, report_to="none", save_strategy="no",
                             disable_tqdm=True, use_cpu=True, seed=0)
    optimizer = create_mgpp(model, args, num_train_examples=NUM_EXAMPLES, initial_warmup_steps=2,
                            final_warmup_steps=FINAL_WARMUP, pruning_interval=2,
                            initial_sparsity=0.3, final_sparsity=SPARSITY, backend="cpu")
    recorder = ZerosRecorder(candidates)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(),
                      optimizers=(optimizer, None), callbacks=[recorder])
    add_mgpp_callback(trainer)
    trainer.train()

    assert optimizer.stats()["stage"] == "frozen"
    total = sum(p.numel() for p in candidates)
    zeros = sum(int((p == 0).sum()) for p in candidates)
    # docs/spec.md §2: the weights below τ, the int(N·s)-th smallest magnitude, are zeroed (τ
    # itself stays).
    assert int(total * SPARSITY) - 1 == zeros
    # The mask is frozen from the last pruning event on: the zero pattern of the last
    # FINAL_WARMUP + 1 steps is the same.
    frozen = recorder.zeros[-FINAL_WARMUP - 1:]
    for later in frozen[1:]:
        assert all(torch.equal(a, b) for a, b in zip(frozen[0], later))
    # Embeddings, norms and the head are never pruned.
    others = [p for name, p in model.named_parameters() if name not in names and p.dim() >= 2]
    assert all(float((p == 0).float().mean()) < 0.05 for p in others)

    model.eval()
    batch = {key: torch.stack([row[key] for row in token_dataset()[:4]])
             for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**batch).logits

    def check(reloaded):
        assert bit_equal(model, reloaded)
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(**batch).logits, logits)

    sparse_path = str(tmp_path / "model.mgpp-sparse.safetensors")
    save_sparse(model, sparse_path)
    fresh = BUILDERS[family]()
    load_sparse(fresh, sparse_path)
    check(fresh)

    assert save_compressed_pretrained(model, str(tmp_path / "sparse-bitmask"),
                                      names)["structure"] == "unstructured"
    check(load_compressed_pretrained(str(tmp_path / "sparse-bitmask")))

    model.save_pretrained(str(tmp_path / "dense"))
    check(AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")))


def test_default_patterns_cover_the_decoders():
    assert {"gpt2", "llama"} <= set(DEFAULT_PATTERNS)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_pruned_to_two_four_through_the_trainer_exports_and_reloads(tmp_path, family):
    """docs/spec.md §5: a 2:4 pool ends with at most 2 nonzeros in every group of 4 along each
    candidate's last dimension (a Linear's input dimension; GPT-2's Conv1D stores its output
    dimension last), exactly half of the candidates zero, its mask frozen."""
    model = BUILDERS[family]()
    names = candidate_names(model)
    params = dict(model.named_parameters())
    candidates = [params[name] for name in names]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             max_steps=STEPS, learning_rate=1e-2, weight_decay=0.0,
                             report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=True, seed=0)
    optimizer = MGPP(param_groups(model, weight_decay=0.0, pattern="2:4"), lr=1e-2,
                     num_train_examples=NUM_EXAMPLES, initial_warmup_steps=2,
                     final_warmup_steps=FINAL_WARMUP, pruning_interval=2, initial_sparsity=0.2,
                     backend="cpu")
    recorder = ZerosRecorder(candidates)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(),
                      optimizers=(optimizer, None), callbacks=[recorder])
    add_mgpp_callback(trainer)
    trainer.train()

    stats = optimizer.stats()
    assert stats["stage"] == "frozen"
    assert [pool["pattern"] for pool in stats["pools"]] == ["2:4"]
    for p in candidates:
        assert int((p.detach().reshape(-1, 4) != 0).sum(dim=1).max()) <= 2
    total = sum(p.numel() for p in candidates)
    assert sum(int((p == 0).sum()) for p in candidates) == total // 2
    frozen = recorder.zeros[-FINAL_WARMUP - 1:]
    for later in frozen[1:]:
        assert all(torch.equal(a, b) for a, b in zip(frozen[0], later))

    sparse_path = str(tmp_path / "model.mgpp-sparse.safetensors")
    save_sparse(model, sparse_path)
    fresh = BUILDERS[family]()
    load_sparse(fresh, sparse_path)
    assert bit_equal(model, fresh)
    saved = save_compressed_pretrained(model, str(tmp_path / "sparse-bitmask"), names)
    assert saved["structure"] == "2:4"
    config = json.loads((tmp_path / "sparse-bitmask" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["sparsity_structure"] == "2:4"
    assert bit_equal(model, load_compressed_pretrained(str(tmp_path / "sparse-bitmask")))
