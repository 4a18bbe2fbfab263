"""2:4 export: a tiny randomly initialised LLaMA whose candidates are made 2:4 by hand (the two
smallest |w| of every group of 4 along each row zeroed) is stored by the sparse checkpoint
formats as it is and reloads bit for bit; to_semi_structured names every weight it cannot convert
and why (on the CPU, in float32, not 2:4, a shape cuSPARSELt does not take, not a Linear) before
changing anything, and on a CUDA GPU turns the candidates into semi-structured sparse tensors
whose Linears compute what the dense ones do."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from mgpp_kernels import candidate_names  # noqa: E402
from mgpp_kernels.integrations.export import (load_compressed_pretrained,  # noqa: E402
                                              load_sparse, save_compressed_pretrained,
                                              save_sparse, to_semi_structured)

VOCAB = 64
SEQ = 16
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: semi-structured kernels run on CUDA only")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Every candidate's rows and columns are multiples of 32 and 64 (cuSPARSELt takes 16 × 16,
    CUTLASS 32 × 64): q and o [64, 64], k and v [32, 64], gate and up [128, 64], down [64, 128]."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=SEQ))


def make_two_four(model) -> None:
    """Zeros the 2 smallest |w| of each group of 4 consecutive elements of every candidate's
    rows."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in candidate_names(model):
            weight = params[name]
            groups = weight.view(weight.shape[0], -1, 4)
            smallest = groups.abs().topk(2, dim=-1, largest=False).indices
            groups.scatter_(-1, smallest, 0.0)


def two_four_llama() -> LlamaForCausalLM:
    model = tiny_llama()
    make_two_four(model)
    return model.eval()


def is_two_four(weight: torch.Tensor) -> bool:
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def test_the_hand_made_mask_is_2_4_with_half_the_candidates_zero():
    model = two_four_llama()
    params = dict(model.named_parameters())
    for name in candidate_names(model):
        zeros = (params[name] == 0).reshape(params[name].shape[0], -1, 4).sum(-1)
        assert bool((zeros == 2).all()), name
    assert not is_two_four(model.lm_head.weight)


# ---- the sparse checkpoint formats store N:M models as they are --------------------------------

def test_save_sparse_reloads_a_2_4_model_bit_for_bit(tmp_path):
    model = two_four_llama()
    summary = save_sparse(model, str(tmp_path / "model.safetensors"))
    assert set(candidate_names(model)) <= set(summary["sparse"])
    reloaded = tiny_llama(seed=1).eval()
    assert not torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    load_sparse(reloaded, str(tmp_path / "model.safetensors"))
    state = reloaded.state_dict()
    assert all(bit_equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert all(is_two_four(dict(reloaded.named_parameters())[name])
               for name in candidate_names(reloaded))
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids()).logits, model(token_ids()).logits)


def test_the_compressed_tensors_folder_reloads_a_2_4_model_bit_for_bit(tmp_path):
    model = two_four_llama()
    summary = save_compressed_pretrained(model, str(tmp_path))
    assert summary["sparsity"] == 0.5
    reloaded = load_compressed_pretrained(str(tmp_path))
    assert type(reloaded) is LlamaForCausalLM
    state = reloaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(bit_equal(state[name], tensor) for name, tensor in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids()).logits, model(token_ids()).logits)


# ---- to_semi_structured: why not, before anything changes --------------------------------------

def convert_and_expect_refusal(model, names=None) -> list[str]:
    """The lines of to_semi_structured's ValueError, after checking the model did not change."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="these cannot be converted") as error:
        to_semi_structured(model, names)
    after = dict(model.named_parameters())
    assert all(type(after[name]) is torch.nn.Parameter and bit_equal(after[name], tensor)
               for name, tensor in before.items())
    return str(error.value).splitlines()[1:]


CPU_REASON = ("it is on cpu: PyTorch's semi-structured sparse kernels (cuSPARSELt, CUTLASS) "
              "run on CUDA only")
FP32_REASON = ("it is torch.float32: the semi-structured matmuls take torch.float16 or "
               "torch.bfloat16 (model.half() or model.to(torch.bfloat16) first)")


def test_weights_on_the_cpu_are_refused_one_line_per_candidate():
    model = two_four_llama().half()
    lines = convert_and_expect_refusal(model)
    assert lines == [f"  {name}: {CPU_REASON}" for name in candidate_names(model)]


def test_float32_weights_are_refused_with_the_dtypes_that_work():
    lines = convert_and_expect_refusal(two_four_llama())
    assert lines == [f"  {name}: {CPU_REASON}; {FP32_REASON}"
                     for name in candidate_names(two_four_llama())]


def test_a_weight_that_is_not_2_4_is_named_with_its_first_dense_group():
    model = two_four_llama().to(torch.bfloat16)
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.mlp.up_proj.weight[5, 12:15] = 0.25   # row 5, columns 12-14 nonzero
        layer.mlp.up_proj.weight[9, 0:4] = 0.5
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "lm_head.weight"]
    lines = convert_and_expect_refusal(model, names)
    not_two_four = ("it is not 2:4 sparse: row {}, columns {}-{} hold {} nonzeros (each group of 4 "
                    "consecutive elements of a row may hold at most 2)")
    assert lines == [
        f"  model.layers.1.mlp.up_proj.weight: {CPU_REASON}; {not_two_four.format(5, 12, 15, 3)}",
        f"  model.layers.1.mlp.down_proj.weight: {CPU_REASON}",
        f"  lm_head.weight: {CPU_REASON}; {not_two_four.format(0, 0, 3, 4)}"]


def test_shapes_that_cusparselt_does_not_take_and_modules_that_are_no_linear_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(32, 48),
                                torch.nn.LayerNorm(48)).half()
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.zero_()
    lines = convert_and_expect_refusal(model, ["0.weight", "1.weight", "1.bias", "2.weight",
                                               "3.weight"])
    assert lines == [
        f"  0.weight: {CPU_REASON}; its shape [40, 24] is not a positive multiple of [16, 16], "
        f"to_sparse_semi_structured's least for float16 and bfloat16",
        f"  1.weight: {CPU_REASON}",
        "  1.bias: not a module's weight",
        "  2.weight: the weight of a LayerNorm, not of a torch.nn.Linear",
        "  3.weight: not a parameter of the model"]


def test_gpt2_conv1d_weights_are_not_linear_weights():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4,
                                       n_positions=SEQ, bos_token_id=0, eos_token_id=0))
    lines = convert_and_expect_refusal(model.half())
    assert lines == [f"  {name}: the weight of a Conv1D, not of a torch.nn.Linear"
                     for name in candidate_names(model)]


def test_every_weight_is_converted_before_the_first_is_replaced(monkeypatch):
    """The replacement on the CPU, with the checks passed by hand and to_sparse_semi_structured
    replaced by a copy that fails at the third weight, then succeeds."""
    from mgpp_kernels.integrations import export

    model = two_four_llama().half()
    names = candidate_names(model)
    originals = dict(model.named_parameters())
    monkeypatch.setattr(export, "_semi_structured_obstacles", lambda weight: [])
    conversions = []

    def failing_at_the_third(weight):
        if len(conversions) == 2:
            raise RuntimeError("the third conversion failed")
        conversions.append(weight)
        return weight.clone()

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", failing_at_the_third)
    with pytest.raises(RuntimeError, match="the third conversion failed"):
        to_semi_structured(model)
    assert all(p is originals[name] for name, p in model.named_parameters())

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda weight: weight.clone())
    assert to_semi_structured(model) == names
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name in names:
            assert param is not originals[name] and not param.requires_grad
            assert bit_equal(param, originals[name])
        else:
            assert param is originals[name]


# ---- on a CUDA GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_converted_linears_compute_what_the_dense_ones_do(dtype, tolerance):
    from torch.sparse import SparseSemiStructuredTensor

    dense = two_four_llama().to("cuda", dtype)
    model = copy.deepcopy(dense)
    names = candidate_names(model)
    assert to_semi_structured(model) == names
    params = dict(model.named_parameters())
    assert all(isinstance(params[name], SparseSemiStructuredTensor)
               and not params[name].requires_grad for name in names)
    assert type(model.lm_head.weight) is torch.nn.Parameter   # not a candidate: left dense
    generator = torch.Generator(device="cuda").manual_seed(2)
    with torch.no_grad():
        for name in names:
            module_name = name.removesuffix(".weight")
            sparse_linear, dense_linear = (m.get_submodule(module_name) for m in (model, dense))
            inputs = torch.randn(3, 8, dense_linear.in_features, generator=generator,
                                 device="cuda", dtype=dtype)
            expected = dense_linear(inputs)
            assert torch.isfinite(expected).all()
            torch.testing.assert_close(sparse_linear(inputs), expected, rtol=tolerance,
                                       atol=tolerance)
        ids = token_ids().cuda()
        expected = dense(ids).logits
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(model(ids).logits, expected, rtol=5 * tolerance,
                                   atol=5 * tolerance)
    with pytest.raises(ValueError, match=rf"\n  {names[0]}: already a semi-structured sparse "
                                         rf"tensor$"):
        to_semi_structured(model, names[:1])


@pytest.mark.gpu
@requires_cuda
def test_a_converted_linear_with_a_bias():
    dense = torch.nn.Linear(64, 32).to("cuda", torch.float16)
    with torch.no_grad():
        dense.weight.view(32, 16, 4)[:, :, 1:3] = 0.0
    sparse = copy.deepcopy(dense)
    assert to_semi_structured(sparse, ["weight"]) == ["weight"]
    inputs = torch.randn(16, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(inputs), dense(inputs), rtol=2e-3, atol=2e-3)
