"""The models the suite steps over (candidate matrices only) and their tensors in every storage
combination."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mgpp_kernels.workloads import BertShapes, random_parameters

from .storage import Storage


@dataclass(frozen=True)
class Model:
    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def elements(self) -> int:
        return sum(rows * cols for rows, cols in self.shapes)


def bert(name: str, layers: int, hidden: int) -> Model:
    """Each layer's query, key, value, attention-output, intermediate and output matrices."""
    return Model(name, tuple(BertShapes(layers=layers, hidden=hidden).candidate_shapes()))


def llama(name: str, blocks: int, hidden: int, intermediate: int) -> Model:
    """Each block's q, k, v, o projections and the gate, up and down matrices of its MLP."""
    block = ((hidden, hidden),) * 4 + ((intermediate, hidden),) * 2 + ((hidden, intermediate),)
    return Model(name, block * blocks)


def one_tensor(model: Model) -> Model:
    """A model's candidate elements as one tensor: the layout against which a tensor list is
    judged (the same bytes, no per-tensor work)."""
    return Model(f"one tensor of {model.name}'s size", ((model.elements, 1),))


BERT_BASE = bert("BERT-base L12/H768", 12, 768)
FULL_LADDER = (
    bert("BERT L2/H256", 2, 256),
    bert("BERT-small L4/H512", 4, 512),
    bert("BERT-medium L8/H512", 8, 512),
    BERT_BASE,
    bert("BERT-large L24/H1024", 24, 1024),
    llama("LLaMA-style 7 blocks H2048/F5504", 7, 2048, 5504),
)
QUICK_LADDER = (bert("BERT-tiny L2/H128", 2, 128), llama("LLaMA-style 1 block H128/F344", 1, 128, 344))


class Workload:
    """A model's candidate parameters with gradients, fp32, and 16-bit copies made on first use."""

    def __init__(self, model: Model, device: torch.device, seed: int = 0):
        self.model = model
        # Drawn on the device itself: on a GPU, no model-sized draw on the host and copy.
        generator = torch.Generator(device=device).manual_seed(seed)
        self.fp32 = random_parameters(model.shapes, generator, std=0.04, grad_std=1e-3)
        self._copies: dict[torch.dtype, list[torch.nn.Parameter]] = {}

    def params(self, storage: Storage) -> list[torch.nn.Parameter]:
        dtype = storage.param_dtype
        if dtype == torch.float32:
            return self.fp32
        if dtype not in self._copies:
            self._copies.clear()   # one 16-bit copy at a time
            copies = []
            for p in self.fp32:
                copy = torch.nn.Parameter(p.detach().to(dtype))
                copy.grad = p.grad.to(dtype)
                copies.append(copy)
            self._copies[dtype] = copies
        return self._copies[dtype]
