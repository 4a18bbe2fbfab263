"""Pruned checkpoints that are really smaller, and per-layer sparsity reports.

:func:`save_sparse` writes a module's state dict to one safetensors file in which every floating
tensor that gets smaller that way is stored as its nonzero values plus a bitmask (element i is
bit i % 8 of byte i // 8, the packing of MGPP's keep masks); the other tensors are stored as
they are. :func:`load_sparse` rebuilds the dense tensors bit for bit and loads them into the
module. Works for any ``torch.nn.Module``, transformers models included.

:func:`save_compressed_pretrained` writes a transformers model folder in the compressed-tensors
``sparse-bitmask`` format (the layout of compressed-tensors' ``BitmaskCompressor`` and the
``sparsity_config`` it puts in ``config.json``), and :func:`load_compressed_pretrained` reads it
back. compressed-tensors 0.15 and later (which transformers 5 requires) no longer has that
compressor nor reads ``sparsity_config``: ``from_pretrained`` of such a folder then initialises
the compressed weights at random, with a warning. This module writes the format with the pieces
compressed-tensors still ships (``BitmaskConfig``, ``pack_bitmasks``) and reads it without them.
"""
from __future__ import annotations

import json
import math
import os
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



COMPRESSED_SUFFIXES = ("compressed", "bitmask", "shape", "row_offsets")


def _bitmask_encoding(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' BitmaskTensor of a 2-D weight: the nonzero values in row-major order,
    the mask packed 8 to a byte along each row (little-endian bit order), the dense shape and
    where each row's values start. A value is kept when its bit pattern is not all zeros (the
    compressor tests ``!= 0``), so -0.0 survives and the reload is bit for bit."""
    from compressed_tensors.utils import pack_bitmasks

    weight = weight.detach().cpu().contiguous()
    if weight.dim() != 2 or weight.dtype not in _BITS_DTYPES:
        raise ValueError(f"the sparse-bitmask format stores 2-D floating weights, got "
                         f"{weight.dtype} of shape {tuple(weight.shape)}")
    stored = weight.view(_BITS_DTYPES[weight.dtype]) != 0
    row_counts = stored.sum(dim=-1)
    return {"compressed": weight[stored], "bitmask": pack_bitmasks(stored),
            "shape": torch.tensor(weight.shape), "row_offsets": torch.cumsum(row_counts, 0)
            - row_counts}


def _bitmask_decoding(encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = encoded["shape"].tolist()
    columns = torch.arange(shape[-1])
    keep = ((encoded["bitmask"].to(torch.int32)[:, columns // 8] >> (columns % 8)) & 1).bool()
    values = encoded["compressed"]
    if int(keep.sum()) != values.numel():
        raise ValueError(f"the bitmask marks {int(keep.sum())} values, {values.numel()} are "
                         f"stored")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[keep] = values
    return dense


def save_compressed_pretrained(model, save_directory: str, names: Iterable[str] | None = None,
                               tokenizer=None) -> dict[str, Any]:
    """Saves a transformers model to ``save_directory`` in the compressed-tensors sparse-bitmask
    format: ``config.json`` with ``quantization_config = {"quant_method": "compressed-tensors",
    "sparsity_config": {"format": "sparse-bitmask", ...}}``, one ``model.safetensors`` in which
    each weight ``names`` lists (default: :func:`mgpp_kernels.candidate_names`) is stored as
    ``<module>.compressed``, ``.bitmask``, ``.shape`` and ``.row_offsets``, the other tensors as
    they are, tied weights once; the generation config and ``tokenizer`` when there are.

    Returns the stored names, the sparsity of the compressed weights and the file's bytes.
    """
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig

    names = candidate_names(model) if names is None else list(names)
    state = model.state_dict()
    not_weights = [name for name in names if not name.endswith(".weight") or name not in state]
    if not_weights:
        raise ValueError(f"the sparse-bitmask format compresses module weights; "
                         f"{', '.join(not_weights)} is not one")
    tensors: dict[str, torch.Tensor] = {}
    first_of_view: dict[tuple, str] = {}
    zeros = numel = 0
    for name, tensor in state.items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.dtype)
        if tensor.numel() and view in first_of_view:
            continue  # a tied weight: from_pretrained ties it again
        first_of_view[view] = name
        if name in names:
            prefix = name.removesuffix(".weight")
            for suffix, part in _bitmask_encoding(tensor).items():
                tensors[f"{prefix}.{suffix}"] = part
            zeros += int((tensor == 0).sum())
            numel += tensor.numel()
        else:
            tensors[name] = tensor.detach().cpu().contiguous()
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    sparsity = zeros / numel if numel else 0.0
    sparsity_config = BitmaskConfig(global_sparsity=sparsity, sparsity_structure="unstructured",
                                    targets=sorted(name.removesuffix(".weight")
                                                   for name in names))
    model.config.save_pretrained(save_directory)
    config_path = os.path.join(save_directory, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["architectures"] = [type(model).__name__]  # as save_pretrained records it
    config["quantization_config"] = {"quant_method": "compressed-tensors",
                                     "sparsity_config": sparsity_config.model_dump(),
                                     "version": compressed_tensors.__version__}
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(save_directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return {"compressed": sorted(names), "sparsity": sparsity,
            "compressed_bytes": os.path.getsize(path)}


def load_compressed_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The dense state dict in a sparse-bitmask ``model.safetensors`` (tied weights once)."""
    stored = load_file(path)
    prefixes = {name.rsplit(".", 1)[0] for name in stored if name.endswith(".bitmask")}
    state = {}
    for prefix in prefixes:
        state[prefix + ".weight"] = _bitmask_decoding(
            {suffix: stored.pop(f"{prefix}.{suffix}") for suffix in COMPRESSED_SUFFIXES})
    state.update(stored)
    return state


def load_compressed_pretrained(save_directory: str, model_class=None, **config_kwargs):
    """The model that :func:`save_compressed_pretrained` wrote to ``save_directory`` (or any
    sparse-bitmask folder of one safetensors file), dense, in eval mode, bit for bit.
    ``model_class`` (an ``AutoModel...`` or a model class) defaults to the class the config's
    ``architectures`` names."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(save_directory, **config_kwargs)
    compression = getattr(config, "quantization_config", None) or {}
    sparsity_format = (compression.get("sparsity_config") or {}).get("format")
    if sparsity_format != "sparse-bitmask":
        raise ValueError(f"{save_directory} is not a sparse-bitmask checkpoint (its "
                         f"sparsity_config format is {sparsity_format!r})")
    del config.quantization_config
    if model_class is None:
        model_class = getattr(transformers, config.architectures[0])
    dtype = getattr(config, "dtype", None)
    # Auto classes build from a config with from_config, model classes with _from_config.
    build = getattr(model_class, "from_config", None) or model_class._from_config
    model = build(config, **({} if dtype is None else {"dtype": dtype}))
    state = load_compressed_state_dict(os.path.join(save_directory, "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    loaded = {tensor.data_ptr() for name, tensor in model.state_dict().items() if name in state}
    untied = [name for name in result.missing_keys
              if model.state_dict()[name].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise ValueError(f"{save_directory} does not fit {model_class.__name__}: missing "
                         f"{untied}, unexpected {result.unexpected_keys}")
    return model.eval()
