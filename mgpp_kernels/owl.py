"""Per-layer sparsity targets by OWL, outlier weighed layerwise sparsity (Yin et al.,
"Outlier Weighed Layerwise Sparsity (OWL)", arXiv 2310.05175): a transformer block whose weights
meet more outlier activations is pruned less. The targets are ready for
``mgpp_kernels.param_groups(model, sparsity=...)``."""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, Iterable

import torch

from .groups import candidate_names


def block_of(name: str) -> str:
    """The transformer block a parameter belongs to: its name up to its first numeric component,
    the index into the model's list of blocks (``model.layers.3``, ``bert.encoder.layer.3``,
    ``transformer.h.3``, T5's ``encoder.block.3``: the numbers nested deeper, T5's
    ``layer.0`` or a mixture's ``experts.5``, stay inside the block). A parameter outside any
    numbered list is a block of its own, its module."""
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:index + 1])
    return ".".join(parts[:-1])


def _input_dim(name: str, module: torch.nn.Module) -> int:
    """The dimension of the module's weight that indexes its input features: 1 for a
    ``torch.nn.Linear`` ([out, in]), 0 for transformers' ``Conv1D`` (GPT-2's [in, out])."""
    # A model can hold a Conv1D only once transformers is imported: no import of it here.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None and isinstance(module, conv1d):
        return 0
    if isinstance(module, torch.nn.Linear):
        return 1
    raise ValueError(f"the candidate {name!r} belongs to a module of type "
                     f"{type(module).__name__}: owl_sparsity scores the weights of "
                     f"torch.nn.Linear and transformers' Conv1D modules; pass patterns=[...] "
                     f"that match only theirs")


def _check_arguments(target: float, outlier_threshold: float, half_range: float) -> None:
    if not 0 <= target < 1:
        raise ValueError(f"target is {target}; a sparsity must be in [0, 1)")
    if not (0 < outlier_threshold < math.inf):
        raise ValueError(f"outlier_threshold is {outlier_threshold}; it must be a finite number "
                         f"above 0 (OWL's M, 5 by default)")
    if not (0 <= half_range < math.inf):
        raise ValueError(f"half_range is {half_range}; it must be a finite number ≥ 0 (OWL's λ, "
                         f"0.08 by default)")


def _run_batch(model: torch.nn.Module, batch: Any, device: torch.device) -> None:
    if isinstance(batch, Mapping):
        model(**{key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in batch.items()})
    elif isinstance(batch, torch.Tensor):
        model(batch.to(device))
    else:
        raise ValueError(f"a batch is a {type(batch).__name__}; each batch must be a dict of model "
                         f"inputs or a tensor")


def owl_sparsity(model: torch.nn.Module, batches: Iterable[Mapping[str, Any] | torch.Tensor],
                 target: float, *, patterns: Iterable[str] | None = None,
                 outlier_threshold: float = 5.0, half_range: float = 0.08) -> dict[str, float]:
    """OWL's sparsity for each pruning candidate, from a few calibration batches.

    ``batches`` is an iterable of batches, each a dict of model inputs (``model(**batch)``, as a
    DataLoader of tokenized examples gives) or a tensor (``model(batch)``); tensors are moved to
    the device of the model's first parameter. The model runs them in eval mode under
    ``torch.no_grad()``, with a forward pre-hook on the module of every candidate
    (:func:`mgpp_kernels.candidate_names` with ``patterns``) that adds up the squares of each
    input feature j over every position of the batches (padding included): ‖X_j‖₂. Afterwards the
    hooks are gone and every module is in the training mode it had, also when a batch fails.

    The score of a weight is ``|W_ij|·‖X_j‖₂``, j its input feature: the weight's column for a
    ``torch.nn.Linear`` ([out, in]), its row for transformers' ``Conv1D`` (GPT-2, [in, out]).
    Other modules are a ``ValueError``. The candidates are grouped by block (:func:`block_of`),
    and each block's outlier ratio D is the fraction of its scores above ``outlier_threshold``
    times their mean (OWL's M = 5). As OWL's code does, the ratios are scaled to [0, 2λ]
    (λ = ``half_range``, OWL's ``Lamda``: the layers' sparsities span 2λ) and a block's
    sparsity is ``target − (d − mean d)``: more outliers, less sparsity. OWL's code averages
    over blocks, which are equal-sized there; here the mean is weighted by each block's
    candidate elements, which is the same for equal blocks, and for unequal ones (other
    ``patterns``, models whose blocks differ) makes the zeros of all candidates together
    ``target`` of their elements. When every block has the same D, every candidate gets
    ``target``.

    OWL's per-sample averaging of the squared norms scales a block's scores by a constant, which
    D does not see; it is left out.

    Returns each candidate's exact parameter name mapped to its block's sparsity, all in
    [0, 1). ``ValueError`` when ``target`` is not in [0, 1), ``outlier_threshold`` or
    ``half_range`` out of range, no candidate matches, ``batches`` is empty or a single batch,
    a batch is neither a dict nor a tensor, a candidate's module never ran, a block's scores
    are not finite, or a block's sparsity would leave [0, 1) (the message gives the largest
    ``half_range`` that fits). The argument checks come before the model runs.
    """
    _check_arguments(target, outlier_threshold, half_range)
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise ValueError("batches is a single batch; pass an iterable of batches, [batch] for "
                         "one")
    names = candidate_names(model, patterns)
    if not names:
        raise ValueError("no parameter of the model matches the pruning patterns; pass "
                         "patterns=[...] with regular expressions for its weight matrices")
    params = dict(model.named_parameters())
    modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in names}
    input_dims = {name: _input_dim(name, modules[name]) for name in names}
    batch_iterator = iter(batches)
    first_batch = next(batch_iterator, None)
    if first_batch is None:
        raise ValueError("batches is empty; OWL needs calibration batches")

    # Per module, as several candidates could share one: the sums of squares and the calls.
    squares: dict[torch.nn.Module, torch.Tensor] = {}
    calls: dict[torch.nn.Module, int] = {module: 0 for module in modules.values()}

    def accumulate(module: torch.nn.Module, args: tuple) -> None:
        inputs = args[0].detach()
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        batch_squares = flat.square().sum(dim=0).double()
        squares[module] = squares[module] + batch_squares if module in squares else batch_squares
        calls[module] += 1

    training_modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(accumulate) for module in calls]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            _run_batch(model, first_batch, device)
            for batch in batch_iterator:
                _run_batch(model, batch, device)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_modes.items():
            module.training = training
    silent = [name for name in names if calls[modules[name]] == 0]
    if silent:
        raise ValueError(f"the modules of {', '.join(silent)} never ran on the batches; their "
                         f"outliers cannot be counted")

    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_of(name), []).append(name)
    with torch.no_grad():
        outlier_ratios = {block: _outlier_ratio(block, [
            (params[name].detach(), squares[modules[name]].sqrt(), input_dims[name])
            for name in members], outlier_threshold) for block, members in blocks.items()}
    block_numels = {block: sum(params[name].numel() for name in members)
                    for block, members in blocks.items()}
    block_sparsities = _spread_targets(outlier_ratios, block_numels, target, half_range)
    return {name: block_sparsities[block_of(name)] for name in names}


def _outlier_ratio(block: str, weights: list[tuple[torch.Tensor, torch.Tensor, int]],
                   outlier_threshold: float) -> float:
    """The fraction of a block's scores |W|·‖X‖ above outlier_threshold times their mean; each
    weight with its input features' norms and the dimension they index. Scores are float64 and
    made one weight at a time (no block-sized temporary)."""
    def scores(weight: torch.Tensor, norms: torch.Tensor, input_dim: int) -> torch.Tensor:
        shape = [1, 1]
        shape[input_dim] = -1
        return weight.abs().double() * norms.to(weight.device).view(shape)

    total = sum(float(scores(*weight).sum()) for weight in weights)
    if not math.isfinite(total):
        raise ValueError(f"the scores of block {block!r} sum to {total}: its weights or their "
                         f"inputs on the batches are not finite")
    count = sum(weight.numel() for weight, _, _ in weights)
    bound = outlier_threshold * total / count
    outliers = sum(int((scores(*weight) > bound).sum()) for weight in weights)
    return outliers / count


def _spread_targets(outlier_ratios: dict[str, float], numels: dict[str, int], target: float,
                    half_range: float) -> dict[str, float]:
    """Each block's sparsity: the outlier ratios scaled to [0, 2·half_range], centred on their
    element-weighted mean, subtracted from target."""
    low, high = min(outlier_ratios.values()), max(outlier_ratios.values())
    if high == low:
        return {block: target for block in outlier_ratios}
    # Unit shares in [0, 2]: the deviations are half_range times these, centred.
    shares = {block: 2 * (ratio - low) / (high - low) for block, ratio in outlier_ratios.items()}
    total = sum(numels.values())
    mean_share = sum(shares[block] * numels[block] for block in shares) / total
    centred = {block: share - mean_share for block, share in shares.items()}
    sparsities = {block: target - half_range * deviation for block, deviation in centred.items()}
    outside = {block: s for block, s in sparsities.items() if not 0 <= s < 1}
    if outside:
        # s = target − half_range·c: s ≥ 0 needs half_range ≤ target/c where c > 0, s < 1
        # needs half_range < (1 − target)/−c where c < 0.
        at_most = min((target / c for c in centred.values() if c > 0), default=math.inf)
        below = min(((1 - target) / -c for c in centred.values() if c < 0), default=math.inf)
        fitting = f"at most {at_most:.6g}" if at_most < below else f"below {below:.6g}"
        block = max(outside, key=lambda b: max(-outside[b], outside[b] - 1))  # the farthest
        sparsity = outside[block]
        raise ValueError(f"with target {target} and half_range {half_range}, the block "
                         f"{block!r} would get sparsity {sparsity:.6g}, outside [0, 1); a "
                         f"half_range {fitting} keeps every block inside")
    return sparsities
