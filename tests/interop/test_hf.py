"""formerkit.from_hf, to_hf and convert against transformers itself.

Small random-weight checkpoints are written with ``save_pretrained`` into temporary directories (nothing is
downloaded), read by formerkit, written out again and loaded by transformers' Auto classes; outputs are compared in
float32 (max |difference| <= 1e-4). Every refusal is pinned down by its error type and by the field or weight its
message names.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import formerkit  # noqa: E402
from formerkit import InteropError  # noqa: E402
from formerkit.interop import convert  # noqa: E402

TOLERANCE = 1e-4
VOCAB, WIDTH, HEADS, LAYERS, SEQ = 97, 64, 4, 2, 16


def _decoder(**overrides):
    sizes = dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                 rope_theta=50000.0, tie_word_embeddings=False)
    return {**sizes, **overrides}


def _bert(**overrides):
    sizes = dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
                 vocab_size=VOCAB, max_position_embeddings=SEQ)
    return {**sizes, **overrides}


def _vit(**overrides):
    return {**dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=96),
            **overrides}


# case -> (transformers model class, its config class, config fields). Each case varies what the converter must get
# right: grouped-query and multi-query attention, tied and untied heads, rope_theta, biases, an explicit head_dim,
# activations, sliding windows, the BERT heads, image and patch sizes.
CASES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
                  eos_token_id=0)),
    "llama-gqa-untied": ("LlamaForCausalLM", "LlamaConfig", _decoder()),
    "llama-mqa-tied-biases-geglu-head-dim": (
        "LlamaForCausalLM", "LlamaConfig",
        _decoder(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                 hidden_act="gelu", head_dim=32, rope_theta=20000.0)),
    "mistral-sliding-window": ("MistralForCausalLM", "MistralConfig", _decoder(sliding_window=5)),
    "qwen2-window-on-layer-1": ("Qwen2ForCausalLM", "Qwen2Config",
                                _decoder(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "bert-masked-lm": ("BertForMaskedLM", "BertConfig", _bert()),
    "bert-sequence-classification": ("BertForSequenceClassification", "BertConfig",
                                     _bert(num_labels=3, hidden_act="gelu_new", classifier_dropout=0.2)),
    "bert-model": ("BertModel", "BertConfig", _bert()),
    "vit-classification": ("ViTForImageClassification", "ViTConfig", _vit(image_size=40, patch_size=10, num_labels=5)),
    "vit-model": ("ViTModel", "ViTConfig", _vit(image_size=[24, 36], patch_size=6, hidden_act="relu")),
}

# transformers' Auto class for each kind of architecture (a base model loads with AutoModel).
_AUTO = {"ForCausalLM": "AutoModelForCausalLM", "LMHeadModel": "AutoModelForCausalLM",
         "ForMaskedLM": "AutoModelForMaskedLM", "ForSequenceClassification": "AutoModelForSequenceClassification",
         "ForImageClassification": "AutoModelForImageClassification"}


def _build(case: str, randomize) -> torch.nn.Module:
    architecture, config_class, fields = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(getattr(transformers, config_class)(**fields))
    randomize(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, randomize):
    """checkpoints(case) -> (transformers model, directory it was saved to), each built once per module. Tests that
    change files work on a copy (``_copy``)."""
    built = {}

    def get(case: str):
        if case not in built:
            model = _build(case, randomize)
            directory = tmp_path_factory.mktemp(case)
            model.save_pretrained(directory, safe_serialization=True)
            built[case] = (model, directory)
        return built[case]

    return get


def _copy(checkpoints, case, tmp_path):
    model, directory = checkpoints(case)
    return model, shutil.copytree(directory, tmp_path / case)


def _load_hf(directory) -> torch.nn.Module:
    """Loads a written checkpoint with the Auto class its architectures field calls for, checking that transformers
    found every weight it needs and nothing else."""
    architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
    auto = next((name for suffix, name in _AUTO.items() if architecture.endswith(suffix)), "AutoModel")
    model, info = getattr(transformers, auto).from_pretrained(directory, output_loading_info=True)
    assert type(model).__name__ == architecture
    assert {key: value for key, value in info.items() if value} == {}, "transformers reported loading problems"
    return model.eval()


def _inputs(config) -> dict[str, Tensor]:
    """Inputs for a transformers config: images, or token ids (BERT: with token types and a padded second row)."""
    generator = torch.Generator().manual_seed(2)
    if config.model_type == "vit":
        side = config.image_size
        height, width = (side, side) if isinstance(side, int) else side
        return {"pixel_values": torch.randn(2, config.num_channels, height, width, generator=generator)}
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, SEQ), generator=generator)}
    if config.model_type == "bert":
        inputs["token_type_ids"] = torch.randint(0, 2, (2, SEQ), generator=generator)
        inputs["attention_mask"] = (torch.arange(SEQ) < torch.tensor([[SEQ], [9]])).long()
    return inputs


def _theirs(model, inputs) -> dict[str, Tensor]:
    out = model(**inputs)
    if "logits" in out:
        return {"logits": out.logits}
    return {"last_hidden_state": out.last_hidden_state, "pooled": out.pooler_output}


def _ours(model, inputs) -> dict[str, Tensor]:
    data = inputs.get("input_ids", inputs.get("pixel_values"))
    out = model(data, attention_mask=inputs.get("attention_mask"), token_type_ids=inputs.get("token_type_ids"),
                return_outputs=True)
    if model.config.head.kind == "none":
        return {"last_hidden_state": out.last_hidden_state, "pooled": out.pooled}
    return {"logits": out.logits}


def _assert_close(ours: dict[str, Tensor], theirs: dict[str, Tensor], inputs, what: str) -> None:
    """Equal outputs; per-token outputs are compared at real (unpadded) tokens only."""
    assert set(ours) == set(theirs)
    real = inputs.get("attention_mask")
    for key, expected in theirs.items():
        got = ours[key]
        if real is not None and got.dim() == 3:
            got, expected = got[real.bool()], expected[real.bool()]
        assert got.shape == expected.shape, (key, got.shape, expected.shape)
        diff = (got - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{what}: {key} differs by {diff:.3g}"


# ----- parity and round trips -----


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_from_hf_computes_what_transformers_computes(case, checkpoints):
    hf_model, directory = checkpoints(case)
    fk = formerkit.from_hf(directory)
    inputs = _inputs(hf_model.config)
    _assert_close(_ours(fk, inputs), _theirs(hf_model, inputs), inputs, case)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_to_hf_of_from_hf_loads_in_transformers_with_the_original_outputs(case, checkpoints, tmp_path):
    hf_model, directory = checkpoints(case)
    formerkit.to_hf(formerkit.from_hf(directory), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == hf_model.config.model_type
    assert written["architectures"] == [type(hf_model).__name__]
    inputs = _inputs(hf_model.config)
    _assert_close(_theirs(_load_hf(tmp_path), inputs), _theirs(hf_model, inputs), inputs, case)


_SMALL = dict(num_layers=LAYERS, width=WIDTH, num_heads=HEADS)
_TOKENS = dict(_SMALL, vocab_size=VOCAB, max_seq_len=SEQ)
PRESETS = {
    "gpt2": _TOKENS,
    "llama_tiny": dict(_TOKENS, num_kv_heads=2, **{"feedforward.hidden_size": 96}),
    "bert_base": _TOKENS,
    "bert_base_mlm": _TOKENS,
    "vit_tiny_patch16_224": dict(_SMALL, image_size=32, patch_size=8, num_classes=5),
}


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_to_hf_of_a_preset_loads_in_transformers_with_the_same_outputs(preset, tmp_path, randomize):
    torch.manual_seed(0)
    fk = formerkit.create_model(preset, **PRESETS[preset])
    randomize(fk, seed=1)
    fk.eval()
    formerkit.to_hf(fk, tmp_path)
    hf_model = _load_hf(tmp_path)
    inputs = _inputs(hf_model.config)
    _assert_close(_ours(fk, inputs), _theirs(hf_model, inputs), inputs, preset)


@torch.no_grad()
def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path, randomize):
    hf_model = _build("llama-gqa-untied", randomize)
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    inputs = _inputs(hf_model.config)
    _assert_close(_ours(formerkit.from_hf(tmp_path), inputs), _theirs(hf_model, inputs), inputs, "sharded")


@pytest.mark.parametrize("case, buffer", [("gpt2", "transformer.h.0.attn.bias"),
                                          ("llama-gqa-untied", "model.layers.1.self_attn.rotary_emb.inv_freq"),
                                          ("bert-model", "embeddings.position_ids")])
@torch.no_grad()
def test_buffers_transformers_may_store_are_ignored(case, buffer, checkpoints, tmp_path):
    hf_model, directory = _copy(checkpoints, case, tmp_path)
    _edit_weights(directory, lambda tensors: tensors.update({buffer: torch.ones(3)}))
    inputs = _inputs(hf_model.config)
    _assert_close(_ours(formerkit.from_hf(directory), inputs), _theirs(hf_model, inputs), inputs, case)


# ----- refusals: config -----


def _edit_config(directory, changes: dict, drop: tuple[str, ...] = ()) -> None:
    path = directory / "config.json"
    data = {key: value for key, value in json.loads(path.read_text()).items() if key not in drop}
    path.write_text(json.dumps({**data, **changes}))


@pytest.mark.parametrize("case, changes, drop, field", [
    ("gpt2", {"model_type": "mamba"}, (), "model_type"),
    # transformers 4.x spelling, then 5.x's.
    ("llama-gqa-untied", {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "proportional", "factor": 2.0}},
     ("rope_parameters",), "rope_scaling.rope_type"),
    ("llama-gqa-untied", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 4.0}}, (),
     "rope_parameters.rope_type"),
    ("llama-gqa-untied", {"hidden_act": "gelu_pytorch_tanh"}, (), "hidden_act"),
    ("llama-gqa-untied", {"architectures": ["LlamaForSequenceClassification"]}, (), "architectures"),
    ("llama-gqa-untied", {}, ("architectures",), "architectures"),
    ("gpt2", {"scale_attn_weights": False}, (), "scale_attn_weights"),
    ("bert-masked-lm", {"position_embedding_type": "relative_key"}, (), "position_embedding_type"),
    ("bert-masked-lm", {"hidden_act": "relu"}, (), "hidden_act"),
    ("vit-classification", {"patch_size": [10, 5]}, (), "patch_size"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_config_values_formerkit_does_not_reproduce_are_refused_by_name(case, changes, drop, field, checkpoints,
                                                                       tmp_path):
    _, directory = _copy(checkpoints, case, tmp_path)
    _edit_config(directory, changes, drop)
    with pytest.raises(InteropError, match=rf"config\.json: {re.escape(field)}: expected"):
        formerkit.from_hf(directory)


def test_a_formerkit_directory_is_refused_with_a_pointer_to_load(tmp_path):
    formerkit.save(formerkit.create_model("char_gpt", num_layers=1, width=32, num_heads=2), tmp_path)
    with pytest.raises(InteropError, match="formerkit.load"):
        formerkit.from_hf(tmp_path)


# ----- refusals: weights -----


def _edit_weights(directory, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_missing_weight_is_refused_by_name(checkpoints, tmp_path):
    _, directory = _copy(checkpoints, "llama-gqa-untied", tmp_path)
    _edit_weights(directory, lambda tensors: tensors.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(InteropError, match=r"weight 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        formerkit.from_hf(directory)


def test_an_unexpected_weight_is_refused_by_name(checkpoints, tmp_path):
    _, directory = _copy(checkpoints, "llama-gqa-untied", tmp_path)
    _edit_weights(directory, lambda tensors: tensors.update({"model.layers.0.mlp.extra_proj.weight": torch.ones(2)}))
    with pytest.raises(InteropError, match=r"unexpected weight 'model\.layers\.0\.mlp\.extra_proj\.weight'"):
        formerkit.from_hf(directory)


def test_a_weight_of_the_wrong_shape_is_refused_by_name(checkpoints, tmp_path):
    _, directory = _copy(checkpoints, "vit-classification", tmp_path)
    _edit_weights(directory, lambda tensors: tensors.update({"classifier.weight": torch.zeros(7, WIDTH)}))
    with pytest.raises(InteropError, match=r"classifier\.weight has shape \[7, 64\], but config\.json implies \[5, 64"):
        formerkit.from_hf(directory)


def test_a_stored_copy_of_a_tied_weight_must_equal_it(checkpoints, tmp_path):
    hf_model, directory = _copy(checkpoints, "gpt2", tmp_path)
    _edit_weights(directory, lambda tensors: tensors.update({"lm_head.weight": tensors["transformer.wte.weight"]
                                                             .clone()}))
    formerkit.from_hf(directory)  # an equal copy is fine
    _edit_weights(directory, lambda tensors: tensors.update({"lm_head.weight": torch.zeros(VOCAB, WIDTH)}))
    with pytest.raises(InteropError, match=r"lm_head\.weight should equal transformer\.wte\.weight"):
        formerkit.from_hf(directory)


@torch.no_grad()
def test_a_masked_lm_checkpoint_with_pretraining_weights_drops_them_with_a_warning(checkpoints, tmp_path):
    # BERT's pre-training checkpoints declare BertForMaskedLM but also hold the pooler and next-sentence head.
    hf_model, directory = _copy(checkpoints, "bert-masked-lm", tmp_path)
    extra = {"bert.pooler.dense.weight": torch.ones(WIDTH, WIDTH), "bert.pooler.dense.bias": torch.ones(WIDTH),
             "cls.seq_relationship.weight": torch.ones(2, WIDTH), "cls.seq_relationship.bias": torch.ones(2)}
    _edit_weights(directory, lambda tensors: tensors.update(extra))
    with pytest.warns(UserWarning, match=r"dropping bert\.pooler\.dense\.bias, .*cls\.seq_relationship\.weight"):
        fk = formerkit.from_hf(directory)
    inputs = _inputs(hf_model.config)
    _assert_close(_ours(fk, inputs), _theirs(hf_model, inputs), inputs, "bert-masked-lm with pre-training weights")


def _to_pickle(directory) -> None:
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def test_a_pickled_checkpoint_is_refused_without_trust_pickle(checkpoints, tmp_path):
    _, directory = _copy(checkpoints, "gpt2", tmp_path)
    _to_pickle(directory)
    with pytest.raises(InteropError, match=r"pytorch_model\.bin: a pickled PyTorch checkpoint") as error:
        formerkit.from_hf(directory)
    assert "trust_pickle=True" in str(error.value) and "--trust-pickle" in str(error.value)


@torch.no_grad()
def test_a_pickled_checkpoint_loads_with_trust_pickle_and_a_warning(checkpoints, tmp_path):
    hf_model, directory = _copy(checkpoints, "gpt2", tmp_path)
    _to_pickle(directory)
    with pytest.warns(UserWarning, match=r"pickled weights because trust_pickle=True"):
        fk = formerkit.from_hf(directory, trust_pickle=True)
    inputs = _inputs(hf_model.config)
    _assert_close(_ours(fk, inputs), _theirs(hf_model, inputs), inputs, "pickled gpt2")


# ----- refusals: to_hf -----


@pytest.mark.parametrize("preset, overrides, field", [
    ("cct_2_3x2_32", {}, "stem.kind"),
    ("gpt2", {"position.kind": "alibi"}, "position.kind"),
    ("gpt2", {"attention.qk_norm": True}, "attention.qk_norm"),  # (a LLaMA layout with it is a Qwen3)
    ("llama_tiny", {"feedforward.activation": "gelu"}, "feedforward.activation"),
    ("gpt2", {"num_unique_layers": 1}, "num_unique_layers"),
    ("bert_base", {"head.pooler": False, "head.pooling": None}, "head.pooler"),
    ("vit_tiny_patch16_224", {"stem.register_tokens": 2}, "stem.register_tokens"),
])
def test_to_hf_refuses_a_model_without_an_exact_equivalent_by_field(preset, overrides, field, tmp_path):
    sizes = {"cct_2_3x2_32": {}, "vit_tiny_patch16_224": dict(_SMALL, image_size=32, patch_size=8)}.get(preset,
                                                                                                     _TOKENS)
    model = formerkit.create_model(preset, **sizes, **overrides)
    with pytest.raises(InteropError, match=rf"to_hf: .*{re.escape(field)}"):
        formerkit.to_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written for a refused model"


# ----- convert -----


@torch.no_grad()
def test_convert_goes_both_ways_and_reports_what_it_did(checkpoints, tmp_path):
    hf_model, directory = checkpoints("llama-mqa-tied-biases-geglu-head-dim")
    summary = convert(directory, tmp_path / "fk", direction="from_hf")
    parameters = formerkit.load(tmp_path / "fk").num_parameters()
    assert summary == {"direction": "from_hf", "family": "llama", "architecture": "LlamaForCausalLM",
                       "parameters": parameters, "source": str(directory), "out": str(tmp_path / "fk"),
                       "tokenizer": None}
    summary = convert(tmp_path / "fk", tmp_path / "hf", direction="to_hf")
    assert summary["direction"] == "to_hf" and summary["architecture"] == "LlamaForCausalLM"
    assert summary["parameters"] == parameters
    inputs = _inputs(hf_model.config)
    _assert_close(_theirs(_load_hf(tmp_path / "hf"), inputs), _theirs(hf_model, inputs), inputs, "convert")


def test_convert_command_round_trips_and_reports_errors_without_a_traceback(checkpoints, tmp_path, capsys):
    from formerkit.cli import main

    hf_model, directory = checkpoints("gpt2")
    assert main(["convert", "--from-hf", str(directory), "--out", str(tmp_path / "fk")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert main(["convert", "--to-hf", str(tmp_path / "fk"), "--out", str(tmp_path / "hf")]) == 0
    inputs = _inputs(hf_model.config)
    _assert_close(_theirs(_load_hf(tmp_path / "hf"), inputs), _theirs(hf_model, inputs), inputs, "convert command")
    assert main(["convert", "--from-hf", str(directory), "--out", str(tmp_path / "fk")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_convert_refuses_a_non_empty_output_directory_and_an_unknown_direction(checkpoints, tmp_path):
    _, directory = checkpoints("gpt2")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    with pytest.raises(InteropError, match=r"out already exists and is not empty"):
        convert(directory, tmp_path / "out", direction="from_hf")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
    with pytest.raises(InteropError, match=r"direction: expected 'from_hf' or 'to_hf', got 'sideways'"):
        convert(directory, tmp_path / "new", direction="sideways")


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-untied", "llama-mqa-tied-biases-geglu-head-dim"])
def test_greedy_generation_is_token_identical_to_transformers(case, randomize, tmp_path):
    """50 greedy tokens after left-padded prompts of different lengths: formerkit's cached decoding of the imported
    model and transformers' own generate pick the same token at every step."""
    architecture, config_class, fields = CASES[case]
    length_field = "n_positions" if "n_positions" in fields else "max_position_embeddings"
    torch.manual_seed(0)
    theirs = getattr(transformers, architecture)(getattr(transformers, config_class)(**{**fields, length_field: 64}))
    randomize(theirs, seed=3)
    theirs.eval().save_pretrained(tmp_path, safe_serialization=True)
    ours = formerkit.from_hf(tmp_path)
    generator = torch.Generator().manual_seed(4)
    prompts = torch.randint(1, VOCAB, (3, 7), generator=generator)
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0
    mask[2, :6] = 0
    prompts = prompts.masked_fill(mask == 0, 0)
    # No end-of-sequence token: transformers then generates all 50 tokens without suppressing any.
    theirs.generation_config.eos_token_id = None
    expected = theirs.generate(prompts, attention_mask=mask, max_new_tokens=50, do_sample=False, pad_token_id=0)
    got = ours.generate(prompts, 50, attention_mask=mask, temperature=0)
    assert got.shape == expected.shape == (3, 57)
    assert torch.equal(got, expected)
