"""Pruned checkpoints that are really smaller, and per-layer sparsity reports.

:func:`save_sparse` writes a module's state dict to one safetensors file in which every floating
tensor that gets smaller that way is stored as its nonzero values plus a bitmask (element i is
bit i % 8 of byte i // 8, the packing of MGPP's keep masks); the other tensors are stored as
they are. :func:`load_sparse` rebuilds the dense tensors bit for bit and loads them into the
module. Works for any ``torch.nn.Module``, transformers models included.

Loading reads every field of a file as data: names must be state-dict keys (never a path), dtypes
one of the float dtypes by name, and a file that disagrees with itself or with the model is a
``ValueError`` naming the file and the tensor, raised before anything is copied, so that a failed
load leaves the model as it was.

:func:`save_compressed_pretrained` writes a transformers model folder in the compressed-tensors
``sparse-bitmask`` format (the layout of compressed-tensors' ``BitmaskCompressor`` and the
``sparsity_config`` it puts in ``config.json``), and :func:`load_compressed_pretrained` reads it
back. compressed-tensors 0.15 and later (which transformers 5 requires) no longer has that
compressor nor reads ``sparsity_config``: ``from_pretrained`` of such a folder then initialises
the compressed weights at random, with a warning. This module writes the format with the pieces
compressed-tensors still ships (``BitmaskConfig``, ``pack_bitmasks``) and reads it without them.

Both formats store any mask as it is, N:M ones included. :func:`to_semi_structured` turns the
2:4-sparse ``torch.nn.Linear`` weights of a model on a CUDA GPU into PyTorch's semi-structured
sparse tensors, whose matmuls run on the 2:4 sparse tensor cores.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..groups import candidate_names
from ..masks import pack_mask, packed_mask_bytes, unpack_mask

FORMAT = "mgpp-sparse-v1"
VALUES_SUFFIX = "::values"
MASK_SUFFIX = "::mask"
# Integer views with the floats' widths: a value is stored when its bit pattern is not all
# zeros, so -0.0 survives the round trip and the rebuilt tensor is bit-identical.
_BITS_DTYPES = {torch.float64: torch.int64, torch.float32: torch.int32,
                torch.float16: torch.int16, torch.bfloat16: torch.int16}
# The dtypes a config.json may name, by torch's names: a name read from a file is looked up
# here, never with getattr on torch.
_DTYPES_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in _BITS_DTYPES}
_INDEX_DTYPES = (torch.int32, torch.int64)


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


def _check_tensor_name(source: str, name: Any) -> str:
    """A tensor name of the file `source`, written or read: module names joined by dots, none of
    them empty (so no '..'), and not an absolute path."""
    if not isinstance(name, str) or "" in name.split(".") or name.startswith(("/", "\\")):
        raise ValueError(f"{source}: the tensor name {name!r} is not a state-dict key (module "
                         f"names joined by '.', none empty, not a path)")
    return name


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
        _check_tensor_name(path, name)  # load_sparse refuses it
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


def _read_safetensors(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors; a damaged file is a ValueError naming it."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        stored = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    for name in stored:
        _check_tensor_name(path, name)
    return metadata, stored


def _metadata_object(path: str, metadata: dict[str, str], key: str) -> dict[str, Any]:
    """The JSON object that the file's metadata holds under `key`."""
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise ValueError(f"{path}: the metadata has no {key!r}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the metadata {key!r} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the metadata {key!r} is not a JSON object")
    return value


def _check_values(path: str, name: str, values: torch.Tensor) -> None:
    if values.dtype not in _BITS_DTYPES or values.dim() != 1:
        raise ValueError(f"{path}: the values of {name!r} are {values.dtype} of shape "
                         f"{list(values.shape)}, not a 1-D floating tensor")


def _sparse_decoding(path: str, name: str, shape: Any, values: torch.Tensor | None,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """The dense tensor `name` from its values and packed mask, once they agree with `shape`."""
    if (not isinstance(shape, list)
            or not all(type(size) is int and size >= 0 for size in shape)):
        raise ValueError(f"{path}: the recorded shape of {name!r}, {shape!r}, is not a list of "
                         f"sizes")
    for part, suffix in ((values, VALUES_SUFFIX), (mask, MASK_SUFFIX)):
        if part is None:
            raise ValueError(f"{path}: the sparse tensor {name!r} has no {name + suffix!r}")
    numel = math.prod(shape)
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != packed_mask_bytes(numel):
        raise ValueError(f"{path}: the mask of {name!r} is {mask.dtype} of shape "
                         f"{list(mask.shape)}; its recorded shape {shape} needs "
                         f"{packed_mask_bytes(numel)} uint8 bytes")
    _check_values(path, name, values)
    keep = unpack_mask(mask, torch.empty(numel, device="meta"))
    if int(keep.sum()) != values.numel():
        raise ValueError(f"{path}: the mask of {name!r} marks {int(keep.sum())} values, "
                         f"{values.numel()} are stored")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[keep] = values
    return dense.view(shape)


def load_sparse_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The dense state dict stored by :func:`save_sparse`, bit-identical to the saved one."""
    metadata, stored = _read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file (its format is "
                         f"{metadata.get('format')!r})")
    shapes = _metadata_object(path, metadata, "sparse_shapes")
    tied = _metadata_object(path, metadata, "tied")
    state = {}
    for name, shape in shapes.items():
        _check_tensor_name(path, name)
        state[name] = _sparse_decoding(path, name, shape, stored.pop(name + VALUES_SUFFIX, None),
                                       stored.pop(name + MASK_SUFFIX, None))
    for name, tensor in stored.items():
        if name.endswith((VALUES_SUFFIX, MASK_SUFFIX)) or name in state:
            raise ValueError(f"{path}: the tensor {name!r} is not one of the sparse tensors the "
                             f"metadata's sparse_shapes lists")
        state[name] = tensor
    stored_names = set(state)
    for name, target in tied.items():
        if (_check_tensor_name(path, name) in stored_names or not isinstance(target, str)
                or target not in stored_names):
            raise ValueError(f"{path}: the tied tensor {name!r} names {target!r}; it must name a "
                             f"tensor the file stores, and not be stored itself")
        state[name] = state[target]
    return state


def _check_shapes(source: str, model_name: str, model_state: dict[str, torch.Tensor],
                  state: dict[str, torch.Tensor]) -> None:
    """Raises unless every tensor of `state` that the model has takes the model's shape and
    dtype (load_state_dict would cast the dtype, and copy the others before failing on a shape)."""
    for name, tensor in state.items():
        expected = model_state.get(name)
        if expected is not None and (tensor.shape, tensor.dtype) != (expected.shape,
                                                                     expected.dtype):
            raise ValueError(f"{source}: the tensor {name!r} is {tensor.dtype} of shape "
                             f"{list(tensor.shape)}, the {model_name}'s is {expected.dtype} of "
                             f"shape {list(expected.shape)}")


def _check_names(source: str, model_name: str, missing: Iterable[str],
                 unexpected: Iterable[str]) -> None:
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the {model_name}: missing {missing}, "
                         f"unexpected {unexpected}")


def load_sparse(module: torch.nn.Module, path: str, strict: bool = True):
    """Loads a file written by :func:`save_sparse` into ``module``; returns what
    ``load_state_dict`` returns. Shapes and dtypes, and with ``strict`` that the file holds
    exactly the module's tensors, are checked before anything is copied: a failed load is a
    ``ValueError`` and leaves ``module`` as it was."""
    state = load_sparse_state_dict(path)
    model_state = module.state_dict()
    _check_shapes(path, type(module).__name__, model_state, state)
    if strict:
        _check_names(path, type(module).__name__, model_state.keys() - state.keys(),
                     state.keys() - model_state.keys())
    return module.load_state_dict(state, strict=strict)


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


def _bitmask_decoding(path: str, name: str, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight `name` from its compressed-tensors parts, once they agree."""
    shape, bitmask = encoded["shape"], encoded["bitmask"]
    values, row_offsets = encoded["compressed"], encoded["row_offsets"]
    if shape.dtype not in _INDEX_DTYPES or shape.shape != (2,) or bool((shape < 0).any()):
        raise ValueError(f"{path}: the shape of {name!r} is {shape.tolist()}, not two sizes")
    rows, columns = shape.tolist()
    if bitmask.dtype != torch.uint8 or bitmask.shape != (rows, -(-columns // 8)):
        raise ValueError(f"{path}: the bitmask of {name!r} is {bitmask.dtype} of shape "
                         f"{list(bitmask.shape)}; its recorded shape {[rows, columns]} needs "
                         f"uint8 of shape {[rows, -(-columns // 8)]}")
    _check_values(path, name, values)
    column = torch.arange(columns)
    keep = ((bitmask.to(torch.int32)[:, column // 8] >> (column % 8)) & 1).bool()
    row_counts = keep.sum(dim=-1)
    if int(row_counts.sum()) != values.numel():
        raise ValueError(f"{path}: the bitmask of {name!r} marks {int(row_counts.sum())} values, "
                         f"{values.numel()} are stored")
    if (row_offsets.dtype not in _INDEX_DTYPES
            or not torch.equal(row_offsets.long(), torch.cumsum(row_counts, 0) - row_counts)):
        raise ValueError(f"{path}: the row offsets of {name!r} disagree with its bitmask")
    dense = torch.zeros(rows, columns, dtype=values.dtype)
    dense[keep] = values
    return dense


def _is_two_four(tensor: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive elements of the last dimension."""
    if tensor.dim() == 0 or tensor.shape[-1] % 4:
        return False
    return bool(((tensor.detach() != 0).reshape(-1, 4).sum(dim=-1) <= 2).all())


def save_compressed_pretrained(model, save_directory: str, names: Iterable[str] | None = None,
                               tokenizer=None) -> dict[str, Any]:
    """Saves a transformers model to ``save_directory`` in the compressed-tensors sparse-bitmask
    format: ``config.json`` with ``quantization_config = {"quant_method": "compressed-tensors",
    "sparsity_config": {"format": "sparse-bitmask", ...}}``, one ``model.safetensors`` in which
    each weight ``names`` lists (default: :func:`mgpp_kernels.candidate_names`) is stored as
    ``<module>.compressed``, ``.bitmask``, ``.shape`` and ``.row_offsets``, the other tensors as
    they are, tied weights once; the generation config and ``tokenizer`` when there are.

    The sparsity structure recorded is "2:4" when every compressed weight is 2:4 along its last
    dimension, else "unstructured". Returns the stored names, the sparsity of the compressed
    weights, that structure and the file's bytes.
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
    two_four = bool(names)
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
            two_four = two_four and _is_two_four(tensor)
        else:
            tensors[name] = tensor.detach().cpu().contiguous()
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    sparsity = zeros / numel if numel else 0.0
    structure = "2:4" if two_four else "unstructured"
    sparsity_config = BitmaskConfig(global_sparsity=sparsity, sparsity_structure=structure,
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
    return {"compressed": sorted(names), "sparsity": sparsity, "structure": structure,
            "compressed_bytes": os.path.getsize(path)}


def load_compressed_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The dense state dict in a sparse-bitmask ``model.safetensors`` (tied weights once)."""
    _, stored = _read_safetensors(path)
    prefixes = {name.removesuffix(".bitmask") for name in stored if name.endswith(".bitmask")}
    state = {}
    for prefix in sorted(prefixes):
        name = prefix + ".weight"
        parts = {suffix: stored.pop(f"{prefix}.{suffix}", None) for suffix in COMPRESSED_SUFFIXES}
        absent = [f"{prefix}.{suffix}" for suffix, part in parts.items() if part is None]
        if absent or name in stored:
            raise ValueError(f"{path}: the compressed weight {name!r} "
                             + (f"has no {', '.join(absent)}" if absent else "is stored dense too"))
        state[name] = _bitmask_decoding(path, name, parts)
    state.update(stored)
    return state


def _read_config(config_path: str) -> dict[str, Any]:
    """config.json as data, checked before transformers reads it: transformers takes a dtype by
    getattr on torch. Every "dtype" (and the older "torch_dtype"), the sub-models' included,
    must name a float dtype."""
    try:
        with open(config_path) as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    pending = [config]
    while pending:
        fields = pending.pop()
        for key in ("dtype", "torch_dtype"):
            value = fields.get(key)
            if value is not None and (not isinstance(value, str) or value not in _DTYPES_BY_NAME):
                raise ValueError(f"{config_path}: {key} is {value!r}, not one of "
                                 f"{', '.join(_DTYPES_BY_NAME)}")
        pending += [value for value in fields.values()
                    if isinstance(value, dict) and "model_type" in value]  # a sub-model's config
    return config


def _architecture_class(config_path: str, config) -> type:
    """The transformers model class that the config's ``architectures`` names, among the classes
    transformers' auto mappings list for its model type (a name read from a file picks from a
    known list, never an arbitrary attribute)."""
    import transformers
    from transformers.models.auto import modeling_auto

    known = set()
    for attribute in dir(modeling_auto):
        if attribute.startswith("MODEL_") and attribute.endswith("_MAPPING_NAMES"):
            names = getattr(modeling_auto, attribute).get(config.model_type, ())
            known.update((names,) if isinstance(names, str) else names)
    architectures = getattr(config, "architectures", None) or [None]
    if not isinstance(architectures[0], str) or architectures[0] not in known:
        raise ValueError(f"{config_path}: architectures names {architectures[0]!r}, not a "
                         f"transformers model class of model type {config.model_type!r}; pass "
                         f"model_class")
    return getattr(transformers, architectures[0])


def load_compressed_pretrained(save_directory: str, model_class=None, **config_kwargs):
    """The model that :func:`save_compressed_pretrained` wrote to ``save_directory`` (or any
    sparse-bitmask folder of one safetensors file), dense, in eval mode, bit for bit.
    ``model_class`` (an ``AutoModel...`` or a model class) defaults to the class the config's
    ``architectures`` names. A folder that disagrees with itself or with the model is a
    ``ValueError`` naming the file and the tensor."""
    import transformers

    config_path = os.path.join(save_directory, "config.json")
    compression = _read_config(config_path).get("quantization_config")
    sparsity_config = compression.get("sparsity_config") if isinstance(compression, dict) else None
    sparsity_format = sparsity_config.get("format") if isinstance(sparsity_config, dict) else None
    if sparsity_format != "sparse-bitmask":
        raise ValueError(f"{save_directory} is not a sparse-bitmask checkpoint (its "
                         f"sparsity_config format is {sparsity_format!r})")
    config = transformers.AutoConfig.from_pretrained(save_directory, **config_kwargs)
    del config.quantization_config
    if model_class is None:
        model_class = _architecture_class(config_path, config)
    dtype = getattr(config, "dtype", None)
    # Auto classes build from a config with from_config, model classes with _from_config.
    build = getattr(model_class, "from_config", None) or model_class._from_config
    model = build(config, **({} if dtype is None else {"dtype": dtype}))
    path = os.path.join(save_directory, "model.safetensors")
    state = load_compressed_state_dict(path)
    model_state = model.state_dict()
    _check_shapes(path, type(model).__name__, model_state, state)
    # The file holds tied weights once: a weight it leaves out must share the memory of one it
    # holds.
    loaded = {model_state[name].data_ptr() for name in state if name in model_state}
    _check_names(path, type(model).__name__,
                 [name for name, tensor in model_state.items()
                  if name not in state and tensor.data_ptr() not in loaded],
                 state.keys() - model_state.keys())
    model.load_state_dict(state, strict=False)
    return model.eval()


# The dtypes whose Linear matmuls both of PyTorch's semi-structured backends run: cuSPARSELt
# (the default) has no float32, CUTLASS no float8.
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _semi_structured_min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """The (rows, columns) a weight's shape must be a positive multiple of, read from the
    subclass that ``to_sparse_semi_structured`` picks as it picks it (cuSPARSELt: 16 × 16 for
    float16 and bfloat16; CUTLASS when ``_FORCE_CUTLASS`` is set: 32 × 64)."""
    from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                              SparseSemiStructuredTensorCUTLASS)

    subclass = (SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
                else SparseSemiStructuredTensorCUSPARSELT)
    constraints = subclass._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return constraints.sparse_min_rows, constraints.sparse_min_cols


def _semi_structured_obstacles(weight: torch.Tensor) -> list[str]:
    """Why a Linear's weight cannot become a semi-structured sparse tensor; empty if it can."""
    obstacles = []
    if weight.device.type != "cuda":
        obstacles.append(f"it is on {weight.device}: PyTorch's semi-structured sparse kernels "
                         f"(cuSPARSELt, CUTLASS) run on CUDA only")
    elif torch.cuda.get_device_capability(weight.device) < (8, 0):
        capability = ".".join(map(str, torch.cuda.get_device_capability(weight.device)))
        obstacles.append(f"it is on {weight.device}, of compute capability {capability}: 2:4 "
                         f"sparse tensor cores need 8.0 (Ampere) or newer")
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        obstacles.append(f"it is {weight.dtype}: the semi-structured matmuls take torch.float16 "
                         f"or torch.bfloat16 (model.half() or model.to(torch.bfloat16) first)")
    # float16 and bfloat16 share their constraints: a weight of another dtype is measured
    # against the ones it will meet once converted.
    min_rows, min_cols = _semi_structured_min_shape(
        weight.dtype if weight.dtype in SEMI_STRUCTURED_DTYPES else torch.float16)
    rows, columns = weight.shape
    if not rows or not columns or rows % min_rows or columns % min_cols:
        obstacles.append(f"its shape {[rows, columns]} is not a positive multiple of "
                         f"{[min_rows, min_cols]}, to_sparse_semi_structured's least for float16 "
                         f"and bfloat16")
    if columns % 4 == 0:
        nonzeros = (weight.detach() != 0).reshape(rows, columns // 4, 4).sum(dim=-1)
        dense_groups = (nonzeros > 2).nonzero()
        if len(dense_groups):
            row, group = dense_groups[0].tolist()
            obstacles.append(f"it is not 2:4 sparse: row {row}, columns {4 * group}-"
                             f"{4 * group + 3} hold {int(nonzeros[row, group])} nonzeros (each "
                             f"group of 4 consecutive elements of a row may hold at most 2)")
    return obstacles


def to_semi_structured(model: torch.nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Replaces the weight of each ``torch.nn.Linear`` that ``names`` lists (parameter names;
    default: :func:`mgpp_kernels.candidate_names`, the pruning candidates) by a frozen Parameter
    (``requires_grad=False``) wrapping ``torch.sparse.to_sparse_semi_structured(weight)``, as
    PyTorch's semi-structured sparsity tutorial does, so that the Linear's matmul runs on the
    2:4 sparse tensor cores. For inference: the converted weights take no gradient. The Linear
    modules not named stay as they are (a classifier or an LM head left dense, say).

    Every named weight must be convertible: the weight of a ``torch.nn.Linear`` (transformers'
    ``Conv1D`` of GPT-2 holds [in, out] and is not), on a CUDA GPU of compute capability 8.0 or
    newer, float16 or bfloat16, of a shape to_sparse_semi_structured takes (a positive multiple
    of 16 × 16 rows × columns on its default cuSPARSELt backend), and 2:4 sparse along its rows
    (at most 2 nonzeros in each group of 4 consecutive elements of a row, the groups MGPP's
    ``pattern="2:4"`` prunes). Otherwise a ``ValueError`` lists every weight that is not and
    every reason why, before any module changes; the conversion itself also completes for all
    weights before the first one is replaced.

    Returns the converted names.
    """
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    params = dict(model.named_parameters())
    names = candidate_names(model) if names is None else list(names)
    linears: dict[str, torch.nn.Linear] = {}
    problems = []
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name) if name in params else None
        if module is None:
            problems.append(f"{name}: not a parameter of the model")
        elif attribute != "weight":
            problems.append(f"{name}: not a module's weight")
        elif not isinstance(module, torch.nn.Linear):
            problems.append(f"{name}: the weight of a {type(module).__name__}, not of a "
                            f"torch.nn.Linear")
        elif isinstance(params[name], SparseSemiStructuredTensor):
            problems.append(f"{name}: already a semi-structured sparse tensor")
        else:
            obstacles = _semi_structured_obstacles(params[name])
            if obstacles:
                problems.append(f"{name}: {'; '.join(obstacles)}")
            else:
                linears[name] = module
    if problems:
        raise ValueError("to_semi_structured converts 2:4-sparse float16/bfloat16 Linear weights "
                         "on a CUDA GPU; these cannot be converted:\n  " + "\n  ".join(problems))
    converted = {name: to_sparse_semi_structured(module.weight.detach().contiguous())
                 for name, module in linears.items()}
    for name, module in linears.items():
        module.weight = torch.nn.Parameter(converted[name], requires_grad=False)
    return list(converted)
