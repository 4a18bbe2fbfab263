"""Loading a damaged or mismatched checkpoint, as a new user would: load_sparse and
load_compressed_pretrained raise a ValueError that names the file and the tensor (or the field),
and load_sparse checks everything before it copies anything, so that the model it was given is
unchanged bit for bit. Every field read from a file is data: names that would be paths, dtypes
torch does not have as float dtypes and model classes transformers does not list are refused."""
from __future__ import annotations

import json
import struct

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification  # noqa: E402

from mgpp_kernels import candidate_names  # noqa: E402
from mgpp_kernels.integrations.export import (load_compressed_pretrained,  # noqa: E402
                                              load_sparse, save_compressed_pretrained,
                                              save_sparse)

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
INTERMEDIATE = "bert.encoder.layer.0.intermediate.dense.weight"
DECODER = "cls.predictions.decoder.weight"          # tied to the word embeddings
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
NOT_A_KEY = "is not a state-dict key"


def tiny_bert(seed: int, model_class=BertForMaskedLM, **config) -> torch.nn.Module:
    """A BERT with 90% of its candidate matrices zero; `config` overrides its sizes."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=16)
    model = model_class(BertConfig(**{**settings, **config})).eval()
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in candidate_names(model):
            params[name].masked_fill_(torch.rand(params[name].shape, generator=generator) < 0.9,
                                      0.0)
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model holds the bits it held before (compared as bytes, so a NaN or a
    -0.0 counts too), with the same shape and dtype."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and tensor.shape == before[name].shape, name
        assert torch.equal(tensor.contiguous().view(torch.uint8),
                           before[name].contiguous().view(torch.uint8)), name


def assert_names(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


# ---- load_sparse ------------------------------------------------------------------------------

@pytest.fixture
def sparse_file(tmp_path):
    path = tmp_path / "model.mgpp-sparse.safetensors"
    summary = save_sparse(tiny_bert(seed=0), str(path))
    assert QUERY in summary["sparse"] and summary["tied"][DECODER] == WORD_EMBEDDINGS
    return path


@pytest.mark.parametrize("model_class, config, dtype, names", [
    pytest.param(BertForMaskedLM, dict(intermediate_size=24), torch.float32,
                 [INTERMEDIATE, "[32, 16]", "[24, 16]"], id="other-intermediate-size"),
    pytest.param(BertForSequenceClassification, {}, torch.float32, ["classifier.weight", DECODER],
                 id="other-head"),
    pytest.param(BertForMaskedLM, {}, torch.bfloat16, ["torch.float32", "torch.bfloat16"],
                 id="other-dtype"),
])
def test_a_checkpoint_that_does_not_fit_leaves_every_tensor_unchanged(sparse_file, model_class,
                                                                      config, dtype, names):
    """Most tensors fit (the embeddings, the attention): none of them may be copied."""
    model = tiny_bert(seed=1, model_class=model_class, **config).to(dtype)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        load_sparse(model, str(sparse_file))
    assert_names(error, str(sparse_file), *names)
    assert_unchanged(model, before)


def test_strict_false_still_checks_shapes_first(sparse_file):
    model = tiny_bert(seed=1, intermediate_size=24)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        load_sparse(model, str(sparse_file), strict=False)
    assert_names(error, str(sparse_file), INTERMEDIATE)
    assert_unchanged(model, before)


def test_save_sparse_refuses_a_name_that_load_sparse_would(tmp_path):
    path = tmp_path / "model.mgpp-sparse.safetensors"
    with pytest.raises(ValueError) as error:
        save_sparse({"../weight": torch.zeros(3)}, str(path))
    assert_names(error, str(path), "'../weight'", NOT_A_KEY)
    assert not path.exists()


def rewritten(source, target, tensors=None, metadata=None):
    """`source` saved again as `target` after `tensors(stored)` and `metadata(fields)` edit its
    tensors and its metadata in place."""
    with safe_open(str(source), framework="pt") as handle:
        fields = dict(handle.metadata())
    stored = load_file(str(source))
    if tensors is not None:
        tensors(stored)
    if metadata is not None:
        metadata(fields)
    save_file(stored, str(target), metadata=fields)
    return target


def edit_json(field: str, edit):
    def metadata(fields):
        value = json.loads(fields[field])
        edit(value)
        fields[field] = json.dumps(value)
    return metadata


def rename(old: str, new: str):
    def tensors(stored):
        stored[new] = stored.pop(old)
    return tensors


def values_as_integers(stored):
    stored[QUERY + "::values"] = stored[QUERY + "::values"].view(torch.int32)


DAMAGED_SPARSE = {
    "shape-vs-values": (dict(metadata=edit_json("sparse_shapes", lambda s: s.update(
        {QUERY: [128, 256]}))), [QUERY, "[128, 256]"]),
    "broken-tied": (dict(metadata=edit_json("tied", lambda t: t.update(
        {DECODER: "bert.embeddings.word_embedding.weight"}))), [DECODER]),
    "tied-to-a-list": (dict(metadata=edit_json("tied", lambda t: t.update(
        {DECODER: [WORD_EMBEDDINGS]}))), [DECODER]),
    "unparsable-metadata": (dict(metadata=lambda fields: fields.update(
        sparse_shapes=fields["sparse_shapes"][:40])), ["sparse_shapes", "not valid JSON"]),
    "values-of-an-integer-dtype": (dict(tensors=values_as_integers), [QUERY, "torch.int32"]),
    "name-with-dots": (dict(tensors=rename(WORD_EMBEDDINGS, "../../" + WORD_EMBEDDINGS)),
                       ["'../../" + WORD_EMBEDDINGS, NOT_A_KEY]),
    "absolute-path-name": (dict(tensors=rename(WORD_EMBEDDINGS, "/etc/passwd")),
                           ["'/etc/passwd'", NOT_A_KEY]),
    "tied-name-outside": (dict(metadata=edit_json("tied", lambda t: t.update(
        {"../" + DECODER: WORD_EMBEDDINGS}))), ["'../" + DECODER, NOT_A_KEY]),
    "sparse-name-outside": (dict(metadata=edit_json("sparse_shapes", lambda s: s.update(
        {"/tmp/" + QUERY: s.pop(QUERY)}))), ["'/tmp/" + QUERY, NOT_A_KEY]),
}


@pytest.mark.parametrize("case", DAMAGED_SPARSE)
def test_a_damaged_sparse_file_is_a_value_error_and_loads_nothing(sparse_file, tmp_path, case):
    edits, names = DAMAGED_SPARSE[case]
    damaged = rewritten(sparse_file, tmp_path / "damaged.safetensors", **edits)
    model = tiny_bert(seed=1)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        load_sparse(model, str(damaged))
    assert_names(error, str(damaged), *names)
    assert_unchanged(model, before)


def test_an_unknown_dtype_in_the_header_is_a_value_error(sparse_file, tmp_path):
    """safetensors knows its dtypes by name: an unknown one is refused while parsing, never
    looked up."""
    raw = sparse_file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    header[WORD_EMBEDDINGS]["dtype"] = "os"
    encoded = json.dumps(header).encode()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])
    model = tiny_bert(seed=1)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        load_sparse(model, str(damaged))
    assert_names(error, str(damaged), "not a readable safetensors file", "`os`")
    assert_unchanged(model, before)


# ---- load_compressed_pretrained ---------------------------------------------------------------

@pytest.fixture
def compressed_folder(tmp_path):
    folder = tmp_path / "sparse-bitmask"
    save_compressed_pretrained(tiny_bert(seed=0), str(folder))
    return folder


def edit_config(folder, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_the_sound_folder_loads(compressed_folder):
    """The control of the cases below: the folder they damage loads, bit for bit."""
    reloaded = load_compressed_pretrained(str(compressed_folder))
    assert_unchanged(reloaded, snapshot(tiny_bert(seed=0)))


def test_a_config_of_other_shapes_is_a_value_error(compressed_folder):
    edit_config(compressed_folder, lambda config: config.update(intermediate_size=24))
    with pytest.raises(ValueError) as error:
        load_compressed_pretrained(str(compressed_folder))
    assert_names(error, str(compressed_folder / "model.safetensors"), INTERMEDIATE, "[32, 16]",
                 "[24, 16]")


def damage_stored(edit):
    def damage(folder):
        path = folder / "model.safetensors"
        rewritten(path, path, tensors=edit)
    return damage


def config_edit(edit):
    return lambda folder: edit_config(folder, edit)


QUERY_PREFIX = QUERY.removesuffix(".weight")
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
DAMAGED_FOLDER = {
    "shape-vs-values": (damage_stored(lambda stored: stored.update(
        {QUERY_PREFIX + ".shape": torch.tensor([128, 256])})), MODEL_FILE, [QUERY, "[128, 256]"]),
    "bitmask-missing": (damage_stored(lambda stored: stored.pop(QUERY_PREFIX + ".bitmask")),
                        MODEL_FILE, [QUERY_PREFIX + ".compressed"]),
    "row-offsets-missing": (damage_stored(lambda stored: stored.pop(
        QUERY_PREFIX + ".row_offsets")), MODEL_FILE, [QUERY_PREFIX + ".row_offsets"]),
    "values-of-an-integer-dtype": (damage_stored(lambda stored: stored.update(
        {QUERY_PREFIX + ".compressed": stored[QUERY_PREFIX + ".compressed"].view(torch.int32)})),
        MODEL_FILE, [QUERY, "torch.int32"]),
    # The file holds tied weights once; a config that unties them leaves the decoder unloaded.
    "broken-tied": (config_edit(lambda config: config.update(tie_word_embeddings=False)),
                    MODEL_FILE, [DECODER]),
    "unparsable-config": (lambda folder: (folder / CONFIG_FILE).write_text(
        (folder / CONFIG_FILE).read_text()[:50]), CONFIG_FILE, ["not valid JSON"]),
    "unknown-dtype": (config_edit(lambda config: config.update(dtype="os")), CONFIG_FILE,
                      ["dtype", "'os'"]),
    "dtype-with-module-prefix": (config_edit(lambda config: config.update(torch_dtype="torch.float32")),
                        CONFIG_FILE, ["torch_dtype", "'torch.float32'"]),
    "architecture-not-a-model": (config_edit(lambda config: config.update(
        architectures=["AutoTokenizer"])), CONFIG_FILE, ["'AutoTokenizer'"]),
    "name-outside": (damage_stored(rename(WORD_EMBEDDINGS, "../" + WORD_EMBEDDINGS)), MODEL_FILE,
                     ["'../" + WORD_EMBEDDINGS, NOT_A_KEY]),
    "absolute-path-name": (damage_stored(rename(QUERY_PREFIX + ".bitmask", "/etc/passwd.bitmask")),
                           MODEL_FILE, ["'/etc/passwd.bitmask'", NOT_A_KEY]),
}


@pytest.mark.parametrize("case", DAMAGED_FOLDER)
def test_a_damaged_folder_is_a_value_error(compressed_folder, case):
    damage, file_name, names = DAMAGED_FOLDER[case]
    damage(compressed_folder)
    with pytest.raises(ValueError) as error:
        load_compressed_pretrained(str(compressed_folder))
    assert_names(error, str(compressed_folder / file_name), *names)
