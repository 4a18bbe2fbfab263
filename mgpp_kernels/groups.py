"""Param groups for MGPP: which of a model's parameters are pruning candidates."""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch

# The attention and MLP weight matrices of every block, by architecture (docs/spec.md §1): embeddings,
# LayerNorm, biases, pooler and classifier never match.
DEFAULT_PATTERNS: dict[str, str] = {
    # BERT, RoBERTa, MiniLM, ELECTRA: layer.N.attention.self.{query,key,value},
    # attention.output.dense, intermediate.dense, output.dense
    "bert": r"layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
            r"|intermediate\.dense|output\.dense)\.weight$",
    # DeBERTa(-v2/-v3): {query,key,value}_proj; DeBERTa v1: in_proj
    "deberta": r"layer\.\d+\.attention\.self\.(query_proj|key_proj|value_proj|in_proj)\.weight$",
    # GPT-2: h.N.attn.{c_attn,c_proj}, h.N.mlp.{c_fc,c_proj}
    "gpt2": r"\bh\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))\.weight$",
    # LLaMA, Mistral, Qwen: layers.N.self_attn.{q,k,v,o}_proj, layers.N.mlp.{gate,up,down}_proj
    "llama": r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
             r"|mlp\.(gate_proj|up_proj|down_proj))\.weight$",
}


def candidate_names(model: torch.nn.Module, patterns: Iterable[str] | None = None) -> list[str]:
    """Names of the trainable parameters that match any pattern (re.search on the full name)."""
    compiled = [re.compile(p) for p in (DEFAULT_PATTERNS.values() if patterns is None else patterns)]
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() >= 2 and any(c.search(name) for c in compiled)]


def _sparsity_of(candidates: list[str], sparsity: dict[str, float]) -> dict[str, float]:
    """Each candidate's target from `sparsity`: its exact name's entry, else the one regular
    expression that matches it (re.search); every key must name or match a candidate."""
    targets: dict[str, float] = {}
    used = set()
    for name in candidates:
        if name in sparsity:
            targets[name] = sparsity[name]
            used.add(name)
            continue
        matches = [key for key in sparsity if key not in candidates and re.search(key, name)]
        if len({sparsity[key] for key in matches}) > 1:
            raise ValueError(f"candidate {name!r} matches sparsity keys {matches} with different "
                             f"targets")
        if matches:
            targets[name] = sparsity[matches[0]]
            used.update(matches)
    unused = [key for key in sparsity if key not in used]
    if unused:
        raise ValueError(f"sparsity keys {unused} name or match no pruning candidate")
    return targets


def param_groups(model: torch.nn.Module, patterns: Iterable[str] | None = None,
                 weight_decay: float | None = None, *,
                 sparsity: dict[str, float] | None = None,
                 pattern: str | None = None) -> list[dict[str, Any]]:
    """Param groups for :class:`mgpp_kernels.MGPP`: the candidates with ``prune=True``, the rest
    with ``prune=False``.

    ``patterns`` are regular expressions matched against ``model.named_parameters()`` names;
    the default covers BERT, RoBERTa, DeBERTa(-v3), MiniLM, GPT-2 and LLaMA-style models. When
    ``weight_decay`` is given, candidates and other matrices get it and vectors (biases and
    normalisation weights) get 0, as the transformers Trainer does; otherwise every group uses the
    optimizer's weight_decay.

    ``sparsity`` gives candidates their own final sparsity (docs/spec.md §5): a dict from a
    parameter name, or a regular expression searched in the names, to a target (such as
    :func:`mgpp_kernels.owl_sparsity` returns); the candidates of one target form one group, and
    those it does not match keep the optimizer's. ``pattern`` ("unstructured" or "N:M", such as
    "2:4") is set on every candidate group.
    """
    names = candidate_names(model, patterns)
    if not names:
        raise ValueError("no parameter of the model matches the pruning patterns; pass "
                         "patterns=[...] with regular expressions for its weight matrices")
    targets = _sparsity_of(names, sparsity) if sparsity is not None else {}
    by_target: dict[float | None, list[torch.Tensor]] = {}
    decayed, undecayed = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in names:
            by_target.setdefault(targets.get(name), []).append(p)
        elif weight_decay is not None and p.dim() < 2:
            undecayed.append(p)
        else:
            decayed.append(p)
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = []
    for target, params in by_target.items():
        group = {"params": params, "prune": True, **extra}
        if target is not None:
            group["final_sparsity"] = target
        if pattern is not None:
            group["pattern"] = pattern
        groups.append(group)
    if decayed:
        groups.append({"params": decayed, "prune": False, **extra})
    if undecayed:
        groups.append({"params": undecayed, "prune": False, "weight_decay": 0.0})
    return groups
