"""The BERT-shaped workloads that `verify`, benchmarks/ and the tests run on: one definition of the
tensors of a BERT encoder and of the number of training examples its prior is scaled by, so that
every check and measurement means the same model and the same prior.

The shapes are those of transformers' BertModel (with its pooler). Per encoder layer, the six
weight matrices that are MGPP's candidates (docs/spec.md §1): query, key, value and attention
output (hidden × hidden), intermediate (4·hidden × hidden) and output (hidden × 4·hidden). The
parameters that are never candidates: per layer, the biases of those six and two LayerNorms; per
model, the word, position and token-type embeddings, the embedding LayerNorm and the pooler.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BertShapes:
    """The parameter shapes of a BERT encoder with `layers` layers of width `hidden`."""

    layers: int
    hidden: int
    vocab: int = 30522
    positions: int = 512
    token_types: int = 2

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden

    def layer_candidate_shapes(self) -> list[Shape]:
        """One layer's query, key, value, attention-output, intermediate and output matrices."""
        hidden, intermediate = self.hidden, self.intermediate
        return [(hidden, hidden)] * 4 + [(intermediate, hidden), (hidden, intermediate)]

    def candidate_shapes(self) -> list[Shape]:
        """Every layer's candidate matrices, layer by layer."""
        return self.layer_candidate_shapes() * self.layers

    def layer_other_shapes(self) -> list[Shape]:
        """One layer's non-candidates in the model's order: the query, key, value and
        attention-output biases, the attention LayerNorm, the intermediate and output biases, the
        output LayerNorm (a LayerNorm is a weight and a bias)."""
        hidden = self.hidden
        return [(hidden,)] * 6 + [(self.intermediate,), (hidden,)] + [(hidden,)] * 2

    def encoder_other_shapes(self) -> list[Shape]:
        """Every layer's non-candidates: the encoder's vectors, without embeddings and pooler."""
        return self.layer_other_shapes() * self.layers

    def embedding_shapes(self) -> list[Shape]:
        """Word, position and token-type embeddings and the embedding LayerNorm."""
        hidden = self.hidden
        return [(self.vocab, hidden), (self.positions, hidden), (self.token_types, hidden),
                (hidden,), (hidden,)]

    def pooler_shapes(self) -> list[Shape]:
        return [(self.hidden, self.hidden), (self.hidden,)]

    def other_shapes(self) -> list[Shape]:
        """Every parameter that is not a candidate, in the model's order."""
        return self.embedding_shapes() + self.encoder_other_shapes() + self.pooler_shapes()

    @property
    def candidate_elements(self) -> int:
        return sum(math.prod(shape) for shape in self.candidate_shapes())

    @property
    def elements(self) -> int:
        return self.candidate_elements + sum(math.prod(shape) for shape in self.other_shapes())


BERT_BASE = BertShapes(layers=12, hidden=768)
# n, the number of training examples that scales the prior (docs/spec.md §1): SST-2's training
# set, the task examples/prune_sst2.py fine-tunes on.
SST2_TRAIN_EXAMPLES = 67_349
# Small enough for the Triton interpreter, which runs every program instance in Python.
SMALL_BERT = BertShapes(layers=2, hidden=64)


def bert_base(layers: int = BERT_BASE.layers) -> BertShapes:
    """BERT-base's width with `layers` encoder layers (12 is the whole model)."""
    return dataclasses.replace(BERT_BASE, layers=layers)


def random_parameters(shapes: Iterable[Shape], generator: torch.Generator, *, std: float,
                      grad_std: float | None = None, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """One parameter ~ N(0, std²) per shape, in order; with `grad_std`, each with a gradient
    ~ N(0, grad_std²) drawn right after it.

    Values are drawn on the generator's device and then moved to `device` (default: the
    generator's) and `dtype`: a CPU generator gives the same values on every device, a CUDA one
    spares the host a model-sized draw.
    """
    source = generator.device
    target = torch.device(device) if device is not None else source
    params = []
    for shape in shapes:
        values = torch.randn(shape, generator=generator, device=source) * std
        param = torch.nn.Parameter(values.to(target, dtype))
        if grad_std is not None:
            grad = torch.randn(shape, generator=generator, device=source) * grad_std
            param.grad = grad.to(target, dtype)
        params.append(param)
    return params

