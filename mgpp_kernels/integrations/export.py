"""Pruned checkpoints that are really smaller, and per-layer sparsity reports.

:func:`save_sparse` writes a module's state dict to one safetensors file in which every floating
tensor that gets smaller that way is stored as its nonzero values plus a bitmask (element i is
bit i % 8 of byte i // 8, the packing of MGPP's keep masks); the other tensors are stored as
they are. :func:`load_sparse` rebuilds the dense tensors bit for bit and loads them into the
module. Works for any ``torch.nn.Module``, transformers models included.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..groups import candidate_names
from ..masks import pack_mask, unpack_mask

FORMAT = "mgpp-sparse-v1"
VALUES_SUFFIX = "::values"
MASK_SUFFIX = "::mask"
# Integer views with the floats' widths: a value is stored when its bit pattern is not all
# zeros, so -0.0 survives the round trip and the rebuilt tensor is bit-identical.
_BITS_DTYPES = {torch.float64: torch.int64, torch.float32: torch.int32,
                torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _sparse_encoding(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, packed mask) when storing them takes fewer bytes than the dense tensor."""
    if tensor.dtype not in _BITS_DTYPES or tensor.numel() == 0:
        return None
    flat = tensor.contiguous().flatten()
    stored = flat.view(_BITS_DTYPES[tensor.dtype]) != 0
    nonzero = int(stored.sum())
    itemsize = tensor.element_size()
    if nonzero * itemsize + math.ceil(flat.numel() / 8) >= flat.numel() * itemsize:
        return None
    return flat[stored], pack_mask(stored)


def save_sparse(module_or_state_dict: torch.nn.Module | dict[str, torch.Tensor], path: str,
                metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Saves a state dict (or a module's) to ``path`` as safetensors, sparse tensors as nonzero
    values plus a bitmask. Tensors that share memory (tied weights) are stored once.

    Returns a summary: the names stored sparse and dense, and the tied names.
    """
    state = (module_or_state_dict.state_dict() if isinstance(module_or_state_dict, torch.nn.Module)
             else module_or_state_dict)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    tied: dict[str, str] = {}
    first_of_view: dict[tuple, str] = {}
    for name, tensor in state.items():
        if name.endswith((VALUES_SUFFIX, MASK_SUFFIX)):
            raise ValueError(f"state dict key {name!r} ends with a suffix this format reserves")
        tensor = tensor.detach().cpu()
        if tensor.numel():
            view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in first_of_view:
                tied[name] = first_of_view[view]
                continue
            first_of_view[view] = name
        encoding = _sparse_encoding(tensor)
        if encoding is None:
            tensors[name] = tensor.contiguous()
        else:
            tensors[name + VALUES_SUFFIX], tensors[name + MASK_SUFFIX] = encoding
            shapes[name] = list(tensor.shape)
    header = {"format": FORMAT, "sparse_shapes": json.dumps(shapes), "tied": json.dumps(tied)}
    save_file(tensors, path, metadata={**(metadata or {}), **header})
    return {"sparse": sorted(shapes), "dense": sorted(n for n in tensors if n in state),
            "tied": tied}


def load_sparse_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The dense state dict stored by :func:`save_sparse`, bit-identical to the saved one."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file (its format is "
                         f"{metadata.get('format')!r})")
    stored = load_file(path)
    state = {}
    for name, shape in json.loads(metadata["sparse_shapes"]).items():
        values = stored.pop(name + VALUES_SUFFIX)
        keep = unpack_mask(stored.pop(name + MASK_SUFFIX),
                           torch.empty(shape, device="meta")).flatten()
        if int(keep.sum()) != values.numel():
            raise ValueError(f"{path}: the mask of {name!r} marks {int(keep.sum())} values, "
                             f"{values.numel()} are stored")
        dense = torch.zeros(keep.numel(), dtype=values.dtype)
        dense[keep] = values
        state[name] = dense.view(shape)
    state.update(stored)
    for name, target in json.loads(metadata["tied"]).items():
        state[name] = state[target]
    return state


def load_sparse(module: torch.nn.Module, path: str, strict: bool = True):
    """Loads a file written by :func:`save_sparse` into ``module``; returns what
    ``load_state_dict`` returns."""
    return module.load_state_dict(load_sparse_state_dict(path), strict=strict)


def sparsity_report(module: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Exact zeros per pruning candidate (``names``, by default
    :func:`mgpp_kernels.candidate_names`), over all candidates, and over all parameters."""
    params = dict(module.named_parameters())
    names = candidate_names(module) if names is None else list(names)
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"the module has no parameter {', '.join(missing)}")

    def count(tensors: list[torch.Tensor]) -> dict[str, Any]:
        numel = sum(t.numel() for t in tensors)
        zeros = sum(int((t.detach() == 0).sum()) for t in tensors)
        return {"numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}

    layers = [{"name": name, "shape": list(params[name].shape), **count([params[name]])}
              for name in names]
    return {"layers": layers, "candidates": count([params[name] for name in names]),
            "all_parameters": count(list(params.values()))}


def format_sparsity_table(report: dict[str, Any]) -> str:
    """The report of :func:`sparsity_report` as a plain-text table."""
    width = max([len("all parameters")] + [len(layer["name"]) for layer in report["layers"]])
    lines = [f"{'parameter':<{width}}  {'shape':>12}  {'numel':>10}  {'sparsity':>8}"]
    for layer in report["layers"]:
        shape = "x".join(str(d) for d in layer["shape"])
        lines.append(f"{layer['name']:<{width}}  {shape:>12}  {layer['numel']:>10}  "
                     f"{layer['sparsity']:>8.2%}")
    for label, key in (("candidates", "candidates"), ("all parameters", "all_parameters")):
        total = report[key]
        lines.append(f"{label:<{width}}  {'':>12}  {total['numel']:>10}  {total['sparsity']:>8.2%}")
    return "\n".join(lines)
