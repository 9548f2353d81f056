"""RoBERTa, DistilBERT, DeiT and OPT checkpoints through from_hf and to_hf, against transformers itself.

Each case is a tiny random-weight transformers model with odd sizes (MLP width not 4x, 3 or 5 labels, non-default
LayerNorm eps where the family has the field, a non-square image, biases off, post-norm, untied heads) saved with
``save_pretrained``; formerkit's import must compute the same outputs (at real tokens of a right-padded batch, and a
left-padded one for OPT), greedy OPT generation must pick transformers' tokens, and ``to_hf`` of the import must load
in transformers with no missing or unexpected weights and give the original's outputs.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import formerkit  # noqa: E402
from formerkit import InteropError  # noqa: E402
from formerkit.interop.distilbert import sinusoidal_table_of_distilbert  # noqa: E402

VOCAB, WIDTH, HEADS, LAYERS, SEQ = 97, 64, 4, 2, 16
# RoBERTa pads with id 1; real tokens are drawn from [2, VOCAB) so that only padding has it.
ROBERTA_PAD = 1


def _tokens(**overrides):
    return {**dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=96,
                   vocab_size=VOCAB), **overrides}


def _roberta(**overrides):
    return _tokens(**{"max_position_embeddings": SEQ + 2, "layer_norm_eps": 1e-6, "type_vocab_size": 1, **overrides})


def _distilbert(**overrides):
    return {**dict(n_layers=LAYERS, dim=WIDTH, n_heads=HEADS, hidden_dim=96, vocab_size=VOCAB,
                   max_position_embeddings=SEQ), **overrides}


def _deit(**overrides):
    return {**dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=96,
                   layer_norm_eps=1e-6, image_size=[24, 40], patch_size=8), **overrides}


def _opt(**overrides):
    return {**dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, ffn_dim=96,
                   vocab_size=VOCAB, max_position_embeddings=32, word_embed_proj_dim=WIDTH), **overrides}


# case -> (transformers class, config class, config fields, the model_type to_hf is asked for).
CASES = {
    # hidden_act relu: RoBERTa's lm_head applies exact GELU whatever the MLP's activation.
    "roberta-masked-lm": ("RobertaForMaskedLM", "RobertaConfig", _roberta(hidden_act="relu"), "roberta"),
    "roberta-sequence-classification": ("RobertaForSequenceClassification", "RobertaConfig",
                                        _roberta(num_labels=3, hidden_act="gelu_new", type_vocab_size=2), "roberta"),
    "roberta-model": ("RobertaModel", "RobertaConfig", _roberta(), "roberta"),
    "distilbert-masked-lm-sinusoidal": ("DistilBertForMaskedLM", "DistilBertConfig",
                                        _distilbert(sinusoidal_pos_embds=True), None),
    "distilbert-masked-lm-untied": ("DistilBertForMaskedLM", "DistilBertConfig",
                                    _distilbert(tie_word_embeddings=False), None),
    "distilbert-sequence-classification": ("DistilBertForSequenceClassification", "DistilBertConfig",
                                           _distilbert(num_labels=3, activation="relu"), None),
    "distilbert-model": ("DistilBertModel", "DistilBertConfig", _distilbert(), None),
    "deit-with-teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", _deit(num_labels=3), None),
    "deit-classification": ("DeiTForImageClassification", "DeiTConfig", _deit(num_labels=5, hidden_act="gelu_new"),
                            None),
    "deit-model": ("DeiTModel", "DeiTConfig", _deit(image_size=32, pooler_act="relu", qkv_bias=False), None),
    "opt-causal-lm": ("OPTForCausalLM", "OPTConfig", _opt(), "opt"),
    "opt-post-norm-no-bias-untied": ("OPTForCausalLM", "OPTConfig",
                                     _opt(do_layer_norm_before=False, enable_bias=False, tie_word_embeddings=False,
                                          activation_function="gelu"), None),
    "opt-model-no-final-norm": ("OPTModel", "OPTConfig", _opt(_remove_final_layer_norm=True), "opt"),
}


def _save(case, directory, parity):
    architecture, config_class, fields, _ = CASES[case]
    model = parity.save(architecture, config_class, fields, directory)
    if fields.get("sinusoidal_pos_embds"):
        # randomize redrew the frozen sinusoidal table too; a DistilBERT file holds transformers' own table.
        table = model.distilbert.embeddings.position_embeddings.weight
        with torch.no_grad():
            table.copy_(sinusoidal_table_of_distilbert(*table.shape))
        model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, parity):
    built = {}

    def get(case):
        if case not in built:
            directory = tmp_path_factory.mktemp(case)
            built[case] = (_save(case, directory, parity), directory)
        return built[case]

    return get


def _inputs(parity, hf_model, padding="right"):
    config = hf_model.config
    if config.model_type == "deit":
        side = config.image_size
        height, width = (side, side) if isinstance(side, int) else side
        return {"pixel_values": torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(2))}
    inputs = parity.tokens(VOCAB, SEQ, batch=3, padding=padding, low=2)
    if config.model_type == "roberta":
        inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, ROBERTA_PAD)
    return inputs


def _theirs(model, inputs):
    out = model(**inputs)
    if "logits" in out:
        return {"logits": out.logits}
    pooled = getattr(out, "pooler_output", None)
    return {"last_hidden_state": out.last_hidden_state, **({"pooled": pooled} if pooled is not None else {})}


def _ours(model, inputs):
    data = inputs.get("input_ids", inputs.get("pixel_values"))
    out = model(data, attention_mask=inputs.get("attention_mask"), return_outputs=True)
    if model.config.head.kind != "none":
        return {"logits": out.logits}
    return {"last_hidden_state": out.last_hidden_state, **({"pooled": out.pooled} if out.pooled is not None else {})}


def _compare(parity, ours, theirs, inputs, what):
    assert set(ours) == set(theirs), (what, set(ours), set(theirs))
    return max(parity.assert_logits(ours[key], theirs[key], inputs, f"{what}: {key}") for key in theirs)


# ----- parity and round trips -----


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_from_hf_computes_what_transformers_computes(case, checkpoints, parity):
    hf_model, directory = checkpoints(case)
    fk = formerkit.from_hf(directory)
    # OPT and RoBERTa number positions by real tokens, as formerkit does, so left padding must match too: at every
    # real token (an encoder's first token is then padding, so what is pooled from it means nothing).
    per_token = not type(hf_model).__name__.endswith("SequenceClassification")
    paddings = ["right", "left"] if hf_model.config.model_type in ("opt", "roberta") and per_token else ["right"]
    for padding in paddings:
        inputs = _inputs(parity, hf_model, padding)
        ours, theirs = _ours(fk, inputs), _theirs(hf_model, inputs)
        if padding == "left":
            ours, theirs = ({key: value for key, value in outputs.items() if value.dim() == 3}
                            for outputs in (ours, theirs))
        _compare(parity, ours, theirs, inputs, f"{case} ({padding} padding)")


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_to_hf_of_from_hf_loads_in_transformers_with_the_original_outputs(case, checkpoints, parity, tmp_path):
    hf_model, directory = checkpoints(case)
    formerkit.to_hf(formerkit.from_hf(directory), tmp_path, model_type=CASES[case][3])
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == (hf_model.config.model_type,
                                                                 [type(hf_model).__name__])
    inputs = _inputs(parity, hf_model)
    _compare(parity, _theirs(parity.load_hf(tmp_path), inputs), _theirs(hf_model, inputs), inputs, case)
    # RoBERTa's and OPT's rows in front of position 0 (read by padding only) are written as zeros.
    leading = {"roberta": ROBERTA_PAD + 1, "opt": 2}.get(written["model_type"])
    if leading:
        table = next(tensor for name, tensor in load_file(tmp_path / "model.safetensors").items()
                     if name.endswith(("position_embeddings.weight", "embed_positions.weight")))
        assert table.shape[0] == formerkit.from_hf(directory).positions.weight.shape[0] + leading
        assert not table[:leading].any()


@pytest.mark.parametrize("case", ["opt-causal-lm", "opt-post-norm-no-bias-untied"])
def test_opt_greedy_generation_is_token_identical_to_transformers(case, checkpoints, parity):
    hf_model, directory = checkpoints(case)
    parity.assert_greedy(hf_model, formerkit.from_hf(directory), VOCAB, 20)


@pytest.mark.parametrize("case, written", [("roberta-model", "bert"), ("opt-causal-lm", "gpt2")])
@torch.no_grad()
def test_without_model_type_to_hf_keeps_writing_what_the_older_family_holds(case, written, checkpoints, parity,
                                                                           tmp_path):
    # A RoBERTa or OPT import that BERT or GPT-2 holds exactly is still written as those (the registry's order); its
    # outputs on a right-padded batch are the original's.
    hf_model, directory = checkpoints(case)
    formerkit.to_hf(formerkit.from_hf(directory), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == written
    inputs = _inputs(parity, hf_model)
    _compare(parity, _theirs(parity.load_hf(tmp_path), inputs), _theirs(hf_model, inputs), inputs, case)


@pytest.mark.parametrize("preset, overrides, written", [
    ("gpt2", {"attention.qkv_bias": False, "attention.out_bias": False, "feedforward.bias": False,
              "feedforward.activation": "relu"}, "OPTForCausalLM"),
    ("gpt2", {"norm.final": False}, "OPTForCausalLM"),
    ("bert_base_mlm", {"feedforward.activation": "relu", "stem.num_token_types": 1}, "RobertaForMaskedLM"),
    ("bert_base", {"stem.num_token_types": 0, "head.kind": "classification", "head.pooler_activation": "relu",
                   "position.kind": "sinusoidal"}, "DistilBertForSequenceClassification"),
    ("vit_tiny_patch16_224", {"stem.distill_token": True}, "DeiTForImageClassificationWithTeacher"),
    ("vit_tiny_patch16_224", {"stem.distill_token": True, "head.distill_head": False}, "DeiTForImageClassification"),
])
@torch.no_grad()
def test_to_hf_picks_the_family_that_holds_what_the_older_one_cannot(preset, overrides, written, tmp_path, parity,
                                                                     randomize):
    sizes = (dict(num_layers=LAYERS, width=WIDTH, num_heads=HEADS, image_size=[24, 40], patch_size=8, num_classes=3)
             if preset.startswith("vit") else dict(num_layers=LAYERS, width=WIDTH, num_heads=HEADS, vocab_size=VOCAB,
                                                   max_seq_len=SEQ))
    if preset == "bert_base":
        sizes["num_classes"] = 3
    torch.manual_seed(0)
    fk = randomize(formerkit.create_model(preset, **sizes, **overrides), seed=1).eval()
    formerkit.to_hf(fk, tmp_path)
    hf_model = parity.load_hf(tmp_path)
    assert type(hf_model).__name__ == written
    inputs = (_inputs(parity, hf_model) if "pixel_values" not in hf_model.forward.__code__.co_varnames
              else {"pixel_values": torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))})
    if hf_model.config.model_type == "roberta":
        inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, ROBERTA_PAD)
    _compare(parity, _ours(fk, inputs), _theirs(hf_model, inputs), inputs, preset)


@torch.no_grad()
def test_the_convert_command_writes_the_family_asked_for(checkpoints, parity, tmp_path, capsys):
    from formerkit.cli import main
    from formerkit.interop import convert

    hf_model, directory = checkpoints("roberta-sequence-classification")
    assert main(["convert", "--from-hf", str(directory), "--out", str(tmp_path / "fk")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "fk"), "--out", str(tmp_path / "hf"), "--model-type",
                 "roberta"]) == 0
    assert "RobertaForSequenceClassification (roberta)" in capsys.readouterr().out
    inputs = _inputs(parity, hf_model)
    _compare(parity, _theirs(parity.load_hf(tmp_path / "hf"), inputs), _theirs(hf_model, inputs), inputs, "convert")
    with pytest.raises(InteropError, match=r"convert: model_type: applies to direction 'to_hf' only"):
        convert(directory, tmp_path / "again", direction="from_hf", model_type="roberta")


# ----- refusals -----


def _edit_config(directory, changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case, changes, field", [
    ("roberta-model", {"pad_token_id": 0}, "pad_token_id"),
    ("distilbert-masked-lm-untied", {"activation": "relu"}, "activation"),
    ("opt-causal-lm", {"word_embed_proj_dim": 32}, "word_embed_proj_dim"),
    ("opt-causal-lm", {"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine"),
    ("opt-causal-lm", {"layerdrop": 0.1}, "layerdrop"),
    ("opt-causal-lm", {"activation_function": "quick_gelu"}, "activation_function"),
    ("deit-with-teacher", {"patch_size": [8, 4]}, "patch_size"),
    ("deit-model", {"pooler_act": "gelu"}, "pooler_act"),
    ("deit-model", {"architectures": ["DeiTForMaskedImageModeling"]}, "architectures"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_config_values_formerkit_does_not_reproduce_are_refused_by_name(case, changes, field, checkpoints, tmp_path):
    import shutil

    directory = shutil.copytree(checkpoints(case)[1], tmp_path / case)
    _edit_config(directory, changes)
    with pytest.raises(InteropError, match=rf"config\.json: {re.escape(field)}: expected"):
        formerkit.from_hf(directory)


def test_a_distilbert_sinusoidal_table_that_is_not_the_formula_is_refused(checkpoints, tmp_path):
    import shutil

    directory = shutil.copytree(checkpoints("distilbert-masked-lm-sinusoidal")[1], tmp_path / "copy")
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors["distilbert.embeddings.position_embeddings.weight"][3, 5] += 1e-3
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"position_embeddings\.weight differs from the table"):
        formerkit.from_hf(directory)


def test_a_sinusoidal_table_transformers_computes_differently_is_read_as_learned():
    # At 512 x 768 (distilbert-base's sizes) numpy's and torch's evaluations of the formula differ in one entry.
    from formerkit.interop.distilbert import DistilBert
    from formerkit.interop.files import Fields

    fields = {"dim": 768, "n_layers": 1, "n_heads": 12, "hidden_dim": 3072, "vocab_size": 10,
              "max_position_embeddings": 512, "sinusoidal_pos_embds": True}
    config = DistilBert().read_config(Fields(fields, "config.json"), "DistilBertModel", False)
    assert config.position.kind == "learned"
    small = DistilBert().read_config(Fields({**fields, "max_position_embeddings": 16, "dim": 64, "n_heads": 4},
                                            "config.json"), "DistilBertModel", False)
    assert small.position.kind == "sinusoidal"


@pytest.mark.parametrize("preset, overrides, model_type, message", [
    ("bert_base", {}, "opt", r"model_type: a 'opt' checkpoint cannot hold"),
    ("bert_base", {}, "t5x", r"model_type: expected one of"),
    ("bert_base", {"stem.num_token_types": 0}, "roberta", r"stem\.num_token_types"),
    # No family holds these; the refusal is the closest family's (fewest differences, the first among equals):
    # GPT-2 differs only by the MLP's biases (OPT by those and its LayerNorm eps); BERT only by the token types
    # (DistilBERT only by its fixed eps, and comes later).
    ("gpt2", {"norm.eps": 1e-6, "feedforward.bias": False}, None,
     r"GPT2LMHeadModel equivalent: feedforward\.bias is False \(a GPT2LMHeadModel checkpoint holds True\)$"),
    ("bert_base", {"stem.num_token_types": 0, "norm.eps": 1e-6}, None, r"stem\.num_token_types: .*BertModel"),
])
def test_to_hf_refuses_what_the_family_asked_for_cannot_hold_by_field(preset, overrides, model_type, message,
                                                                      tmp_path):
    sizes = dict(num_layers=LAYERS, width=WIDTH, num_heads=HEADS, vocab_size=VOCAB, max_seq_len=SEQ)
    model = formerkit.create_model(preset, **sizes, **overrides)
    with pytest.raises(InteropError, match=rf"to_hf: .*{message}"):
        formerkit.to_hf(model, tmp_path / "out", model_type=model_type)
    assert not (tmp_path / "out").exists()
