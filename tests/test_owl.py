"""owl_sparsity, OWL's per-layer targets (arXiv 2310.05175), on tiny randomly initialised LLaMA,
BERT and GPT-2 models: the values of an independent reimplementation of OWL's published code
(its prune_wanda_outlier and WrappedGPT, in float64), the element-weighted average equal to the
target, less sparsity for a block with planted outliers, determinism, the model left as it was
(hooks, training modes), and the errors."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM)
from transformers.pytorch_utils import Conv1D  # noqa: E402

import mgpp_kernels  # noqa: E402
from mgpp_kernels import candidate_names, owl_sparsity  # noqa: E402
from mgpp_kernels.owl import block_of  # noqa: E402

VOCAB = 64
SEQ = 16
TARGET = 0.5
PLANTED_BLOCK = 3
# The block index in each architecture's candidate names, for the reimplementation below.
BLOCK_INDEX = {"llama": r"\bmodel\.layers\.(\d+)\.", "bert": r"\bencoder\.layer\.(\d+)\.",
               "gpt2": r"\btransformer\.h\.(\d+)\."}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=SEQ))


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=SEQ))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4,
                                      n_positions=SEQ, bos_token_id=0,
                                      eos_token_id=0))


def token_batches(count: int = 3, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator),
             "attention_mask": torch.ones(batch_size, SEQ, dtype=torch.long)}
            for _ in range(count)]


def plant_weight_outliers(model, block: int, kind: str) -> None:
    """Multiplies input features 0 and 1 of every candidate Linear of the block by 20 (OWL's
    outliers: a few input features whose products with the weights stand out); then about 4%
    of that block's scores end above 5× their mean, against 0.4-1.7% in the others. The last
    block, so that no candidate downstream sees larger inputs."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in candidate_names(model):
            if int(re.search(BLOCK_INDEX[kind], name).group(1)) == block:
                params[name][:, :2] *= 20


def owl_by_its_published_code(model, batches, target, kind, patterns=None, lamda=0.08,
                              hyper_m=5.0):
    """OWL's lib/prune_all.py (prune_wanda_outlier) and lib/layerwrapper.py (WrappedGPT), in
    float64 and with the blocks' outlier ratios averaged weighted by their candidate elements
    (OWL's blocks are equal-sized, where that is its plain mean): forward hooks keep the running
    per-sample mean of each input feature's squared norm (scaler_row), a block's W_metric is
    |W|·sqrt(scaler_row) of its candidates (Conv1D weights transposed to [out, in] first),
    check_outlier_mean counts W_metric > mean·M in percent, and the ratios are scaled to
    [0, 2λ], centred on 1 − target, and subtracted from 1."""
    names = candidate_names(model, patterns)
    modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in names}
    scaler_rows, nsamples = {}, {}

    def add_batch(name):
        def hook(module, inputs, output):
            inp = inputs[0].detach().double()
            if inp.dim() == 2:
                inp = inp.unsqueeze(0)
            tmp = inp.shape[0]
            inp = inp.reshape(-1, inp.shape[-1]).t()
            count = nsamples.get(name, 0)
            row = scaler_rows.get(name, torch.zeros(inp.shape[0], dtype=torch.float64))
            row = row * (count / (count + tmp))
            count += tmp
            scaler_rows[name] = row + torch.norm(inp, p=2, dim=1) ** 2 / count
            nsamples[name] = count
        return hook

    handles = [modules[name].register_forward_hook(add_batch(name)) for name in names]
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()

    metrics: dict[int, list[torch.Tensor]] = {}
    for name in names:
        weight = modules[name].weight.detach().double()
        if isinstance(modules[name], Conv1D):
            weight = weight.t()
        metric = weight.abs() * torch.sqrt(scaler_rows[name].reshape((1, -1)))
        metrics.setdefault(int(re.search(BLOCK_INDEX[kind], name).group(1)), []).append(metric)
    blocks = sorted(metrics)
    ratios, numels = [], []
    for block in blocks:
        layer_wmetric = torch.cat([torch.flatten(m) for m in metrics[block]])
        max_shred = torch.mean(layer_wmetric) * hyper_m
        ratios.append(float((layer_wmetric > max_shred).sum()) / layer_wmetric.numel() * 100)
        numels.append(layer_wmetric.numel())
    all_layer_ratio = np.array(ratios)
    all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min())
                       * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda * 2))
    all_layer_ratio = (all_layer_ratio - np.average(all_layer_ratio, weights=numels)
                       + (1 - target))
    sparsity_of_block = dict(zip(blocks, 1 - all_layer_ratio))
    return {name: float(sparsity_of_block[int(re.search(BLOCK_INDEX[kind], name).group(1))])
            for name in names}


def element_weighted_mean(model, sparsities: dict[str, float]) -> float:
    params = dict(model.named_parameters())
    numel = sum(params[name].numel() for name in sparsities)
    return sum(params[name].numel() * s for name, s in sparsities.items()) / numel


def assert_valid_targets(model, sparsities: dict[str, float], patterns=None) -> None:
    assert list(sparsities) == candidate_names(model, patterns)
    assert all(isinstance(s, float) and 0 <= s < 1 for s in sparsities.values()), sparsities
    assert element_weighted_mean(model, sparsities) == pytest.approx(TARGET, abs=1e-9)


def block_sparsities(sparsities: dict[str, float], kind: str) -> dict[int, float]:
    """One value per block, after checking that every candidate of a block has it."""
    by_block: dict[int, set[float]] = {}
    for name, sparsity in sparsities.items():
        by_block.setdefault(int(re.search(BLOCK_INDEX[kind], name).group(1)), set()).add(sparsity)
    assert all(len(values) == 1 for values in by_block.values()), by_block
    return {block: values.pop() for block, values in by_block.items()}


BUILDERS = {"llama": tiny_llama, "bert": tiny_bert}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_values_of_the_published_code_averaging_to_the_target(kind):
    model = BUILDERS[kind]()
    plant_weight_outliers(model, PLANTED_BLOCK, kind)
    sparsities = owl_sparsity(model, token_batches(), TARGET)
    assert_valid_targets(model, sparsities)
    expected = owl_by_its_published_code(model, token_batches(), TARGET, kind)
    assert sparsities == pytest.approx(expected, abs=1e-12)
    by_block = block_sparsities(sparsities, kind)
    assert sorted(by_block) == [0, 1, 2, 3]
    # The planted block has the most outliers: scaled to 2λ, it is 2λ − mean below the target.
    others = [s for block, s in by_block.items() if block != PLANTED_BLOCK]
    assert by_block[PLANTED_BLOCK] < min(others)
    assert max(others) - by_block[PLANTED_BLOCK] == pytest.approx(2 * 0.08, abs=1e-12)


def test_gpt2_conv1d_scores_use_the_rows_of_its_in_out_weight():
    """transformers' Conv1D holds [in, out]: the norm of input feature j multiplies row j. A large
    LayerNorm gain on features 0 and 1 of the last block makes rows 0 and 1 of its c_attn and
    c_fc outliers."""
    model = tiny_gpt2()
    with torch.no_grad():
        for norm in (model.transformer.h[3].ln_1, model.transformer.h[3].ln_2):
            norm.weight[:2] = 20.0
    batches = [{"input_ids": b["input_ids"]} for b in token_batches()]
    sparsities = owl_sparsity(model, batches, TARGET)
    assert_valid_targets(model, sparsities)
    assert sparsities == pytest.approx(
        owl_by_its_published_code(model, batches, TARGET, "gpt2"), abs=1e-12)
    by_block = block_sparsities(sparsities, "gpt2")
    assert by_block[3] < min(s for block, s in by_block.items() if block != 3)


def test_unequal_blocks_are_weighted_by_their_elements():
    """Block 0 with q_proj alone (1,024 elements), the others with all seven matrices."""
    model = tiny_llama()
    plant_weight_outliers(model, PLANTED_BLOCK, "llama")
    patterns = [r"layers\.0\.self_attn\.q_proj\.weight$",
                r"layers\.[1-3]\.(self_attn|mlp)\.\w+_proj\.weight$"]
    sparsities = owl_sparsity(model, token_batches(), TARGET, patterns=patterns)
    assert_valid_targets(model, sparsities, patterns)
    assert sparsities == pytest.approx(
        owl_by_its_published_code(model, token_batches(), TARGET, "llama", patterns), abs=1e-12)
    # The plain mean over blocks would miss the target.
    assert np.mean(list(block_sparsities(sparsities, "llama").values())) != pytest.approx(
        TARGET, abs=1e-6)


def test_the_keywords_are_owls_m_and_lambda():
    model = tiny_llama()
    plant_weight_outliers(model, PLANTED_BLOCK, "llama")
    sparsities = owl_sparsity(model, token_batches(), 0.6, outlier_threshold=3.0,
                              half_range=0.05)
    assert sparsities == pytest.approx(owl_by_its_published_code(
        model, token_batches(), 0.6, "llama", lamda=0.05, hyper_m=3.0), abs=1e-12)
    by_block = block_sparsities(sparsities, "llama")
    assert max(by_block.values()) - min(by_block.values()) == pytest.approx(0.1, abs=1e-12)


def test_tensor_batches_equal_dict_batches_and_runs_repeat_exactly():
    model = tiny_llama()
    plant_weight_outliers(model, PLANTED_BLOCK, "llama")
    as_dicts = [{"input_ids": b["input_ids"]} for b in token_batches()]
    first = owl_sparsity(model, as_dicts, TARGET)
    assert owl_sparsity(model, as_dicts, TARGET) == first
    assert owl_sparsity(model, (b["input_ids"] for b in token_batches()), TARGET) == first
    assert len(set(first.values())) == 4


def test_equal_outlier_ratios_give_every_candidate_the_target():
    """One block: nothing to spread."""
    model = tiny_llama()
    patterns = [r"layers\.1\.mlp\.\w+_proj\.weight$"]
    sparsities = owl_sparsity(model, token_batches(), TARGET, patterns=patterns)
    assert sparsities == {f"model.layers.1.mlp.{p}_proj.weight": TARGET
                          for p in ("gate", "up", "down")}


def hooks_of(model) -> list[tuple[str, int, int]]:
    return [(name, len(module._forward_pre_hooks), len(module._forward_hooks))
            for name, module in model.named_modules()]


def training_modes(model) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("failing_batch, error, message", [
    ({"input_ids": torch.full((1, SEQ), VOCAB + 7)}, IndexError, "index out of range"),
    ("not a batch", ValueError, "a batch is a str")])
def test_the_model_is_left_as_it_was_after_a_run_and_after_a_failure(failing_batch, error,
                                                                      message):
    """The failing batch comes second: the hooks have counted the first."""
    model = tiny_llama()
    model.train()
    model.model.layers[1].eval()
    hooks, modes = hooks_of(model), training_modes(model)
    assert not all(modes.values()) and any(modes.values())
    owl_sparsity(model, token_batches(), TARGET)
    assert hooks_of(model) == hooks and training_modes(model) == modes
    with pytest.raises(error, match=message):
        owl_sparsity(model, token_batches(1) + [failing_batch], TARGET)
    assert hooks_of(model) == hooks and training_modes(model) == modes
    assert all(p.grad is None for p in model.parameters())


class TwoLinears(torch.nn.Module):
    """`unused` never runs in forward."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("call, message", [
    (lambda m: owl_sparsity(m, token_batches(), 1.0), r"target is 1\.0"),
    (lambda m: owl_sparsity(m, token_batches(), -0.1), r"target is -0\.1"),
    (lambda m: owl_sparsity(m, token_batches(), math.nan), r"target is nan"),
    (lambda m: owl_sparsity(m, token_batches(), TARGET, outlier_threshold=0.0),
     "outlier_threshold is 0.0"),
    (lambda m: owl_sparsity(m, token_batches(), TARGET, half_range=-0.01), "half_range is -0.01"),
    (lambda m: owl_sparsity(m, [], TARGET), "batches is empty"),
    (lambda m: owl_sparsity(m, token_batches()[0], TARGET), "batches is a single batch"),
    (lambda m: owl_sparsity(m, token_batches()[0]["input_ids"], TARGET),
     "batches is a single batch"),
    (lambda m: owl_sparsity(m, token_batches(), TARGET, patterns=[r"no_such_weight"]),
     "no parameter of the model matches"),
    (lambda m: owl_sparsity(m, token_batches(), TARGET, patterns=[r"embed_tokens\.weight$"]),
     r"'model\.embed_tokens\.weight' belongs to a module of type Embedding"),
    (lambda m: owl_sparsity(m, [[1, 2, 3]], TARGET), "a batch is a list"),
])
def test_bad_input_is_a_value_error_before_the_model_changes(call, message):
    model = tiny_llama()
    model.train()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(model)
    assert model.training and hooks_of(model) == hooks_of(tiny_llama())
    assert all(torch.equal(state[name], t) for name, t in model.state_dict().items())


def test_scores_that_are_not_finite_are_refused():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] = math.nan
    with pytest.raises(ValueError, match=r"the scores of block 'model\.layers\.2' sum to nan"):
        owl_sparsity(model, token_batches(), TARGET)


def test_a_candidate_that_never_ran_is_named():
    model = TwoLinears()
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(3))]
    with pytest.raises(ValueError, match=r"the modules of unused\.weight never ran"):
        owl_sparsity(model, batches, TARGET, patterns=[r"weight$"])


@pytest.mark.parametrize("target, pattern, edge, bound", [
    (0.97, r"the block 'model\.layers\.1' would get sparsity 1\.01\d*", 1.0, "below"),
    (0.05, r"the block 'model\.layers\.3' would get sparsity -0\.06\d*", 0.0, "at most")])
def test_a_spread_that_leaves_0_1_is_refused_with_the_half_range_that_fits(target, pattern, edge,
                                                                           bound):
    """The planted block 3 has the most outliers, block 1 the fewest."""
    model = tiny_llama()
    plant_weight_outliers(model, PLANTED_BLOCK, "llama")
    with pytest.raises(ValueError, match=rf"with target {target} and half_range 0\.08, "
                                         rf"{pattern}, outside \[0, 1\)") as error:
        owl_sparsity(model, token_batches(), target)
    fitting = float(re.search(rf"a half_range {bound} ([0-9.e-]+) keeps", str(error.value))
                    .group(1))
    # Just inside the bound, the block at the edge is just inside [0, 1).
    sparsities = owl_sparsity(model, token_batches(), target, half_range=fitting * (1 - 1e-4))
    nearest = max(sparsities.values()) if edge == 1.0 else min(sparsities.values())
    assert nearest == pytest.approx(edge, abs=1e-4) and 0 <= nearest < 1
    assert element_weighted_mean(model, sparsities) == pytest.approx(target, abs=1e-9)


@pytest.mark.parametrize("name, block", [
    ("model.layers.3.self_attn.q_proj.weight", "model.layers.3"),
    ("bert.encoder.layer.11.attention.self.query.weight", "bert.encoder.layer.11"),
    ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0"),
    ("encoder.block.2.layer.1.DenseReluDense.wi.weight", "encoder.block.2"),
    ("decoder.block.2.layer.0.SelfAttention.q.weight", "decoder.block.2"),
    ("model.layers.5.block_sparse_moe.experts.7.w1.weight", "model.layers.5"),
    ("0.weight", "0"),
    ("lm_head.weight", "lm_head"),
])
def test_block_of_is_the_name_up_to_its_first_index(name, block):
    assert block_of(name) == block


def test_owl_sparsity_is_exported():
    assert mgpp_kernels.owl_sparsity is owl_sparsity and "owl_sparsity" in mgpp_kernels.__all__
