"""The compressed-tensors sparse-bitmask export (save_compressed_pretrained and
load_compressed_pretrained) on a tiny randomly initialised BERT pruned to 90%: the layout and
config.json that compressed-tensors' BitmaskCompressor writes, a bit-exact reload with the same
logits, the size against the dense checkpoint and mgpp_kernels' own format, and what
transformers' from_pretrained makes of the folder."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
compressed_tensors = pytest.importorskip("compressed_tensors")

from compressed_tensors.config import BitmaskConfig  # noqa: E402
from compressed_tensors.utils import unpack_bitmasks  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (AutoModelForSequenceClassification, BertConfig,  # noqa: E402
                          BertForSequenceClassification)

from mgpp_kernels import candidate_names  # noqa: E402
from mgpp_kernels.integrations.export import (load_compressed_pretrained,  # noqa: E402
                                              load_compressed_state_dict,
                                              save_compressed_pretrained, save_sparse)

WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


def pruned_tiny_bert() -> BertForSequenceClassification:
    """90% of the encoder matrices and of the word embeddings zero, some of them -0.0."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                        num_labels=2)
    model = BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in candidate_names(model) + [WORD_EMBEDDINGS]:
            param = dict(model.named_parameters())[name]
            drop = torch.rand(param.shape, generator=generator) < 0.9
            param[drop] = 0.0
            param[drop & (torch.rand(param.shape, generator=generator) < 0.1)] = -0.0
    return model


def names_of(model) -> list[str]:
    return candidate_names(model) + [WORD_EMBEDDINGS]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                              b.contiguous().view(torch.uint8))


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(0, 512, (4, 16), generator=generator),
            "attention_mask": torch.ones(4, 16, dtype=torch.long)}


def test_layout_and_config_are_compressed_tensors_sparse_bitmask(tmp_path):
    model = pruned_tiny_bert()
    summary = save_compressed_pretrained(model, str(tmp_path), names_of(model))
    config = json.loads((tmp_path / "config.json").read_text())
    compression = config["quantization_config"]
    assert compression["quant_method"] == "compressed-tensors"
    assert compression["version"] == compressed_tensors.__version__
    sparsity_config = BitmaskConfig.model_validate(compression["sparsity_config"])
    assert sparsity_config.format == "sparse-bitmask"
    assert sparsity_config.sparsity_structure == "unstructured"
    assert sorted(sparsity_config.targets) == sorted(n.removesuffix(".weight")
                                                     for n in names_of(model))
    assert config["architectures"] == ["BertForSequenceClassification"]

    stored = load_file(str(tmp_path / "model.safetensors"))
    params = dict(model.named_parameters())
    zeros = numel = 0
    for name in names_of(model):
        dense = params[name].detach()
        prefix = name.removesuffix(".weight")
        assert name not in stored
        keep = dense.view(torch.int32) != 0  # the stored values: nonzero bit patterns
        # compressed-tensors' own unpacking reads our bitmask back to the kept positions.
        assert torch.equal(unpack_bitmasks(stored[prefix + ".bitmask"], list(dense.shape)), keep)
        assert stored[prefix + ".bitmask"].dtype == torch.uint8
        assert stored[prefix + ".bitmask"].shape == (dense.shape[0], -(-dense.shape[1] // 8))
        assert bit_equal(stored[prefix + ".compressed"], dense[keep])
        assert stored[prefix + ".shape"].tolist() == list(dense.shape)
        row_counts = keep.sum(-1)
        assert torch.equal(stored[prefix + ".row_offsets"], torch.cumsum(row_counts, 0) - row_counts)
        zeros += int((dense == 0).sum())
        numel += dense.numel()
    assert summary["sparsity"] == pytest.approx(zeros / numel)
    assert sparsity_config.global_sparsity == pytest.approx(zeros / numel)
    assert bit_equal(stored["classifier.weight"], model.classifier.weight.detach())


def test_reload_is_bit_exact_with_the_same_logits(tmp_path):
    model = pruned_tiny_bert()
    save_compressed_pretrained(model, str(tmp_path), names_of(model))
    state = load_compressed_state_dict(str(tmp_path / "model.safetensors"))
    assert state.keys() == model.state_dict().keys()
    assert all(bit_equal(state[name], tensor) for name, tensor in model.state_dict().items())
    for model_class in (None, AutoModelForSequenceClassification, BertForSequenceClassification):
        reloaded = load_compressed_pretrained(str(tmp_path), model_class)
        assert type(reloaded) is BertForSequenceClassification and not reloaded.training
        assert all(bit_equal(a, b) for a, b in zip(model.state_dict().values(),
                                                   reloaded.state_dict().values()))
        with torch.no_grad():
            assert torch.equal(reloaded(**batch()).logits, model(**batch()).logits)


def test_size_against_dense_and_mgpp_sparse(tmp_path):
    model = pruned_tiny_bert()
    summary = save_compressed_pretrained(model, str(tmp_path / "ct"), names_of(model))
    model.save_pretrained(str(tmp_path / "dense"))
    save_sparse(model, str(tmp_path / "mgpp.safetensors"))
    dense = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    compressed = os.path.getsize(tmp_path / "ct" / "model.safetensors")
    mgpp = os.path.getsize(tmp_path / "mgpp.safetensors")
    assert summary["compressed_bytes"] == compressed
    # Per compressed weight: its stored values at 4 bytes, 1 bit per element padded to whole
    # bytes per row, an int64 row offset per row and the int64 shape; the rest dense.
    params = dict(model.named_parameters())
    expected = sum(int((p.detach().view(torch.int32) != 0).sum()) * 4
                   + p.shape[0] * (-(-p.shape[1] // 8) + 8) + 16
                   for p in (params[n] for n in names_of(model)))
    expected += sum(t.numel() * 4 for n, t in model.state_dict().items()
                    if n not in names_of(model))
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert sum(t.numel() * t.element_size() for t in stored.values()) == expected
    # This tiny model's 32-column rows make the row offsets weigh; MiniLM's have 384 or more.
    assert compressed < 0.45 * dense
    assert mgpp < compressed


def test_from_pretrained_of_the_sparse_folder_does_not_load_the_weights(tmp_path):
    """transformers 5 with compressed-tensors >= 0.15 has no sparse-bitmask decompressor: it
    ignores sparsity_config and initialises the compressed weights at random. If this test
    fails, from_pretrained has learnt to read the format (update examples/README.md)."""
    model = pruned_tiny_bert()
    save_compressed_pretrained(model, str(tmp_path), names_of(model))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert not torch.equal(loaded(**batch()).logits, model(**batch()).logits)
    assert not torch.equal(loaded.bert.encoder.layer[0].attention.self.query.weight,
                           model.bert.encoder.layer[0].attention.self.query.weight)


def test_rejects_what_the_format_cannot_hold(tmp_path):
    model = pruned_tiny_bert()
    with pytest.raises(ValueError, match="compresses module weights"):
        save_compressed_pretrained(model, str(tmp_path), ["classifier.bias"])
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not a sparse-bitmask checkpoint"):
        load_compressed_pretrained(str(tmp_path / "plain"))
