"""mgpp_kernels.workloads: the BERT shapes are transformers' BertModel, parameter for parameter, and
the random parameters are reproducible on any device."""
from __future__ import annotations

import pytest
import torch

from mgpp_kernels import candidate_names
from mgpp_kernels.workloads import BERT_BASE, SMALL_BERT, BertShapes, bert_base, random_parameters


def test_bert_base_counts():
    # BERT-base: 109,482,240 parameters, of which the 72 attention and MLP matrices are candidates.
    assert BERT_BASE.elements == 109_482_240
    assert BERT_BASE.candidate_elements == 84_934_656
    assert len(BERT_BASE.candidate_shapes()) == 72
    assert bert_base(2) == BertShapes(layers=2, hidden=768)
    assert SMALL_BERT.candidate_shapes()[4:6] == [(256, 64), (64, 256)]


def test_shapes_are_bert_models_in_order():
    transformers = pytest.importorskip("transformers")
    shapes = BertShapes(layers=2, hidden=16, vocab=40, positions=8)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=8)
    model = transformers.BertModel(config)
    candidates = set(candidate_names(model))
    named = list(model.named_parameters())
    assert [tuple(p.shape) for name, p in named if name in candidates] == shapes.candidate_shapes()
    assert [tuple(p.shape) for name, p in named if name not in candidates] == shapes.other_shapes()


def test_random_parameters_are_reproducible_and_typed():
    shapes = [(3, 4), (5,)]
    first = random_parameters(shapes, torch.Generator().manual_seed(0), std=0.04, grad_std=1e-3)
    again = random_parameters(shapes, torch.Generator().manual_seed(0), std=0.04, grad_std=1e-3,
                              dtype=torch.bfloat16)
    assert [tuple(p.shape) for p in first] == shapes
    for p, q in zip(first, again):
        assert isinstance(q, torch.nn.Parameter) and q.dtype == q.grad.dtype == torch.bfloat16
        assert torch.equal(p.detach().to(torch.bfloat16), q.detach())
        assert torch.equal(p.grad.to(torch.bfloat16), q.grad)
    assert random_parameters(shapes, torch.Generator(), std=1.0)[0].grad is None
