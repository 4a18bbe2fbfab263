"""param_groups(): the candidates are exactly the attention and MLP weight matrices of every block
(docs/spec.md §1), on tiny modules named like the transformers implementations of each architecture."""
import re

import pytest
import torch

from mgpp_kernels import MGPP, candidate_names, param_groups

from helpers import SCHEDULE

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 8, 16, 11, 2


def module_with(parameters):
    """A tree of nn.Modules whose named_parameters() are `parameters` (name -> shape), in order."""
    root = torch.nn.Module()
    generator = torch.Generator().manual_seed(0)
    for name, shape in parameters.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, generator=generator)))
    return root


def _linear(name, out_features, in_features, bias=True):
    entries = {f"{name}.weight": (out_features, in_features)}
    if bias:
        entries[f"{name}.bias"] = (out_features,)
    return entries


def _layer_norm(name):
    return {f"{name}.weight": (HIDDEN,), f"{name}.bias": (HIDDEN,)}


def bert_like(prefix="bert", query_key_value=("query", "key", "value"), pooler=True):
    """BERT / RoBERTa / MiniLM / ELECTRA / DeBERTa-v2-v3 encoders (names of transformers)."""
    parameters = {f"{prefix}.embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
                  f"{prefix}.embeddings.position_embeddings.weight": (VOCAB, HIDDEN),
                  f"{prefix}.embeddings.token_type_embeddings.weight": (2, HIDDEN),
                  **_layer_norm(f"{prefix}.embeddings.LayerNorm")}
    candidates = []
    for i in range(LAYERS):
        layer = f"{prefix}.encoder.layer.{i}"
        matrices = [f"{layer}.attention.self.{name}" for name in query_key_value]
        matrices += [f"{layer}.attention.output.dense"]
        for name in matrices:
            parameters.update(_linear(name, HIDDEN, HIDDEN))
        parameters.update(_layer_norm(f"{layer}.attention.output.LayerNorm"))
        parameters.update(_linear(f"{layer}.intermediate.dense", INTERMEDIATE, HIDDEN))
        parameters.update(_linear(f"{layer}.output.dense", HIDDEN, INTERMEDIATE))
        parameters.update(_layer_norm(f"{layer}.output.LayerNorm"))
        candidates += [f"{name}.weight" for name in matrices]
        candidates += [f"{layer}.intermediate.dense.weight", f"{layer}.output.dense.weight"]
    if pooler:
        parameters.update(_linear(f"{prefix}.pooler.dense", HIDDEN, HIDDEN))
    return parameters, candidates


def bert():
    parameters, candidates = bert_like("bert")
    parameters.update(_linear("classifier", 3, HIDDEN))
    return parameters, candidates


def bert_masked_lm():
    parameters, candidates = bert_like("bert", pooler=False)
    parameters.update({"cls.predictions.bias": (VOCAB,),
                       **_linear("cls.predictions.transform.dense", HIDDEN, HIDDEN),
                       **_layer_norm("cls.predictions.transform.LayerNorm")})
    return parameters, candidates


def roberta():
    parameters, candidates = bert_like("roberta", pooler=False)
    parameters.update({**_linear("classifier.dense", HIDDEN, HIDDEN),
                       **_linear("classifier.out_proj", 2, HIDDEN)})
    return parameters, candidates


def deberta_v3():
    parameters, candidates = bert_like("deberta", ("query_proj", "key_proj", "value_proj"),
                                       pooler=False)
    parameters.update({"deberta.encoder.rel_embeddings.weight": (2 * VOCAB, HIDDEN),
                       **_layer_norm("deberta.encoder.LayerNorm"),
                       **_linear("pooler.dense", HIDDEN, HIDDEN), **_linear("classifier", 2, HIDDEN)})
    return parameters, candidates


def deberta_v1():
    """DeBERTa v1: one in_proj for q, k, v with separate q/v biases, relative-position
    projections (not among docs/spec.md §1's matrices)."""
    parameters = {"deberta.embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
                  **_layer_norm("deberta.embeddings.LayerNorm")}
    candidates = []
    for i in range(LAYERS):
        layer = f"deberta.encoder.layer.{i}"
        parameters.update({f"{layer}.attention.self.in_proj.weight": (3 * HIDDEN, HIDDEN),
                           f"{layer}.attention.self.q_bias": (HIDDEN,),
                           f"{layer}.attention.self.v_bias": (HIDDEN,),
                           f"{layer}.attention.self.pos_proj.weight": (HIDDEN, HIDDEN),
                           **_linear(f"{layer}.attention.self.pos_q_proj", HIDDEN, HIDDEN),
                           **_linear(f"{layer}.attention.output.dense", HIDDEN, HIDDEN),
                           **_layer_norm(f"{layer}.attention.output.LayerNorm"),
                           **_linear(f"{layer}.intermediate.dense", INTERMEDIATE, HIDDEN),
                           **_linear(f"{layer}.output.dense", HIDDEN, INTERMEDIATE),
                           **_layer_norm(f"{layer}.output.LayerNorm")})
        candidates += [f"{layer}.attention.self.in_proj.weight",
                       f"{layer}.attention.output.dense.weight",
                       f"{layer}.intermediate.dense.weight", f"{layer}.output.dense.weight"]
    parameters.update({"deberta.encoder.rel_embeddings.weight": (2 * VOCAB, HIDDEN),
                       **_linear("pooler.dense", HIDDEN, HIDDEN), **_linear("classifier", 2, HIDDEN)})
    return parameters, candidates


def gpt2():
    """GPT-2: Conv1D weights are stored (in, out); the LM head is tied to wte."""
    parameters = {"transformer.wte.weight": (VOCAB, HIDDEN), "transformer.wpe.weight": (VOCAB, HIDDEN)}
    candidates = []
    for i in range(LAYERS):
        block = f"transformer.h.{i}"
        parameters.update({**_layer_norm(f"{block}.ln_1"),
                           f"{block}.attn.c_attn.weight": (HIDDEN, 3 * HIDDEN),
                           f"{block}.attn.c_attn.bias": (3 * HIDDEN,),
                           f"{block}.attn.c_proj.weight": (HIDDEN, HIDDEN),
                           f"{block}.attn.c_proj.bias": (HIDDEN,),
                           **_layer_norm(f"{block}.ln_2"),
                           f"{block}.mlp.c_fc.weight": (HIDDEN, INTERMEDIATE),
                           f"{block}.mlp.c_fc.bias": (INTERMEDIATE,),
                           f"{block}.mlp.c_proj.weight": (INTERMEDIATE, HIDDEN),
                           f"{block}.mlp.c_proj.bias": (HIDDEN,)})
        candidates += [f"{block}.{name}.weight"
                       for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    parameters.update({**_layer_norm("transformer.ln_f"), "score.weight": (2, HIDDEN)})
    return parameters, candidates


def llama(qkv_bias=False):
    """LLaMA / Mistral (and Qwen2 with q/k/v biases)."""
    parameters = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    candidates = []
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = qkv_bias and name != "o_proj"
            parameters.update(_linear(f"{layer}.self_attn.{name}", HIDDEN, HIDDEN, bias))
            candidates.append(f"{layer}.self_attn.{name}.weight")
        for name, shape in (("gate_proj", (INTERMEDIATE, HIDDEN)),
                            ("up_proj", (INTERMEDIATE, HIDDEN)),
                            ("down_proj", (HIDDEN, INTERMEDIATE))):
            parameters[f"{layer}.mlp.{name}.weight"] = shape
            candidates.append(f"{layer}.mlp.{name}.weight")
        parameters[f"{layer}.input_layernorm.weight"] = (HIDDEN,)
        parameters[f"{layer}.post_attention_layernorm.weight"] = (HIDDEN,)
    parameters.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return parameters, candidates


ARCHITECTURES = {"bert": bert, "bert_masked_lm": bert_masked_lm, "roberta": roberta,
                 "deberta_v3": deberta_v3, "deberta_v1": deberta_v1, "gpt2": gpt2,
                 "llama": llama, "qwen2": lambda: llama(qkv_bias=True)}

# Normalisation weights and every bias, by architecture: what weight_decay=... leaves undecayed.
NORMS = re.compile(r"(LayerNorm|layernorm|ln_\d|ln_f|norm)\.weight$|bias$")


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_candidates_are_the_attention_and_mlp_matrices(architecture):
    parameters, expected = ARCHITECTURES[architecture]()
    model = module_with(parameters)
    assert candidate_names(model) == expected
    per_block = len(expected) // LAYERS
    assert per_block in (4, 6, 7)
    named = dict(model.named_parameters())
    groups = param_groups(model)
    assert groups[0]["prune"] is True
    assert [id(p) for p in groups[0]["params"]] == [id(named[n]) for n in expected]
    others = [p for g in groups[1:] for p in g["params"]]
    assert all(g["prune"] is False for g in groups[1:])
    assert sorted(id(p) for p in others) == sorted(
        id(p) for n, p in named.items() if n not in set(expected))
    assert all("weight_decay" not in g for g in groups)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_weight_decay_spares_biases_and_normalisation_weights(architecture):
    parameters, expected = ARCHITECTURES[architecture]()
    model = module_with(parameters)
    groups = param_groups(model, weight_decay=0.01)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        wanted = 0.0 if NORMS.search(name) else 0.01
        assert decay_of[id(p)] == wanted, f"{name}: weight_decay {decay_of[id(p)]}"
    assert groups[0]["prune"] is True and groups[0]["weight_decay"] == 0.01


def test_frozen_parameters_are_left_out():
    parameters, expected = bert()
    model = module_with(parameters)
    named = dict(model.named_parameters())
    named["bert.embeddings.word_embeddings.weight"].requires_grad_(False)
    named["bert.encoder.layer.0.attention.self.query.weight"].requires_grad_(False)
    names = candidate_names(model)
    assert names == [n for n in expected if n != "bert.encoder.layer.0.attention.self.query.weight"]
    in_groups = {id(p) for g in param_groups(model) for p in g["params"]}
    assert id(model.bert.embeddings.word_embeddings.weight) not in in_groups
    assert len(in_groups) == sum(p.requires_grad for p in model.parameters())


def test_custom_patterns():
    parameters, _ = bert()
    model = module_with(parameters)
    only_queries = [r"attention\.self\.query\.weight$", r"^classifier\.weight$"]
    assert candidate_names(model, only_queries) == [
        f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(LAYERS)
    ] + ["classifier.weight"]
    groups = param_groups(model, patterns=only_queries)
    assert len(groups[0]["params"]) == LAYERS + 1


def test_custom_patterns_for_a_plain_mlp():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert candidate_names(model, [r"^\d+\.weight$"]) == ["0.weight", "2.weight"]
    groups = param_groups(model, patterns=[r"^0\.weight$"])
    assert groups[0]["params"] == [model[0].weight]
    assert {id(p) for p in groups[1]["params"]} == {id(model[0].bias), id(model[2].weight),
                                                    id(model[2].bias)}


@pytest.mark.parametrize("patterns", [None, [r"nothing_matches"], [r"bias$"], []],
                         ids=["defaults", "no_name", "vectors_only", "empty_list"])
def test_no_match_raises(patterns):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="patterns"):
        param_groups(model, patterns=patterns)


def test_groups_drive_an_optimizer_that_prunes_only_the_candidates():
    parameters, expected = llama()
    model = module_with(parameters)
    optimizer = MGPP(param_groups(model, weight_decay=0.01), lr=1e-2, backend="cpu",
                     **dict(SCHEDULE, initial_warmup_steps=0))
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    candidates = sum(named[n].numel() for n in expected)
    zeros = sum(int((named[n] == 0).sum()) for n in expected)
    assert zeros == int(candidates * 0.3) - 1  # s_i = 0.3; τ itself survives
    assert all(int((p == 0).sum()) == 0 for n, p in named.items() if n not in expected)
