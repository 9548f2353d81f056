"""The encoder-decoder families T5 and BART against transformers: tiny random checkpoints read by from_hf compute
transformers' logits on right-padded sources and targets, generate transformers' greedy tokens (from the checkpoint's
own decoder start token), and written back by to_hf load in transformers with the same outputs. Refusals are pinned by
the field their message names."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import formerkit  # noqa: E402
from formerkit import InteropError, ModelConfig  # noqa: E402

VOCAB, SOURCE, TARGET = 97, 16, 14


def _t5(**overrides):
    # d_kv 24 with d_model 64 and 4 heads: head_dim is not width / heads. Buckets 8 up to distance 20 with 16 tokens:
    # the logarithmic buckets are used, and the last one is reached.
    fields = dict(vocab_size=VOCAB, d_model=64, d_kv=24, d_ff=80, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, layer_norm_epsilon=1e-5,
                  dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return {**fields, **overrides}


def _bart(**overrides):
    fields = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=80, decoder_ffn_dim=80, max_position_embeddings=32,
                  dropout=0.0, decoder_start_token_id=2)
    return {**fields, **overrides}


def _untie_t5(directory):
    """Rewrites a tied T5 checkpoint as transformers 4 wrote untied ones (T5 v1.1): its own lm_head.weight.
    (transformers 5 always ties T5's head, keeping "scale_decoder_outputs" apart, but reads such files untied.)"""
    config = json.loads((directory / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(config))
    _add_tensor(directory, "lm_head.weight", "shared.weight", 0.15)


def _bias_bart(directory):
    """A random final_logits_bias: transformers saves the buffer as zeros, which would hide a bias left out."""
    _add_tensor(directory, "final_logits_bias", "final_logits_bias", 0.5)


def _add_tensor(directory, name, like, std):
    tensors = load_file(directory / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    tensors[name] = std * torch.randn(tensors[like].shape, generator=generator)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


# case -> (architecture, config class, fields, a change made to the saved files or None).
CASES = {
    "t5-v1.0-relu-tied-3-decoder-layers": ("T5ForConditionalGeneration", "T5Config",
                                           _t5(feed_forward_proj="relu", num_decoder_layers=3), None),
    "t5-v1.1-gated-gelu-untied": ("T5ForConditionalGeneration", "T5Config",
                                  _t5(feed_forward_proj="gated-gelu"), _untie_t5),
    "t5-gated-gelu-tied": ("T5ForConditionalGeneration", "T5Config", _t5(feed_forward_proj="gated-gelu"), None),
    "t5-model": ("T5Model", "T5Config", _t5(feed_forward_proj="gated-gelu"), None),
    "t5-encoder": ("T5EncoderModel", "T5Config", _t5(), None),
    "bart-2-3-layers": ("BartForConditionalGeneration", "BartConfig", _bart(), _bias_bart),
    "bart-relu-start-5": ("BartForConditionalGeneration", "BartConfig",
                          _bart(activation_function="relu", decoder_layers=2, decoder_start_token_id=5), _bias_bart),
    "bart-model": ("BartModel", "BartConfig", _bart(), None),
    "bart-scaled-embeddings": ("BartForConditionalGeneration", "BartConfig", _bart(scale_embedding=True), _bias_bart),
}
# transformers 5.25's T5 sizes its generation cache by num_layers, so generate fails with more decoder layers: that
# case is compared by logits and round trip only.
GREEDY = ["t5-v1.1-gated-gelu-untied", "t5-gated-gelu-tied", "bart-2-3-layers", "bart-relu-start-5",
          "bart-scaled-embeddings"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, parity):
    """case -> (directory, transformers model) for every case, written once per module."""
    made = {}

    def get(case):
        if case not in made:
            architecture, config_class, fields, change = CASES[case]
            directory = tmp_path_factory.mktemp(case)
            model = parity.save(architecture, config_class, fields, directory)
            if change is not None:
                change(directory)
                model = parity.load_hf(directory)
            made[case] = directory, model
        return made[case]

    return get


def _inputs(parity, encoder_only: bool = False) -> dict:
    source = parity.tokens(VOCAB, SOURCE, batch=3, seed=2)
    if encoder_only:
        return source
    target = parity.tokens(VOCAB, TARGET, batch=3, seed=3)
    return {**source, "decoder_input_ids": target["input_ids"], "decoder_attention_mask": target["attention_mask"]}


@torch.no_grad()
def _compare(ours, theirs, inputs, parity) -> float:
    """Logits (or, without an LM head, the final hidden states) at real tokens."""
    out = theirs(**inputs)
    expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
    got = ours(inputs["input_ids"], attention_mask=inputs["attention_mask"],
               **{key: value for key, value in inputs.items() if key.startswith("decoder_")})
    real = {"attention_mask": inputs.get("decoder_attention_mask", inputs["attention_mask"])}
    return parity.assert_logits(got, expected, real)


@pytest.mark.parametrize("case", CASES)
def test_from_hf_computes_what_transformers_computes(case, checkpoints, parity):
    directory, theirs = checkpoints(case)
    ours = formerkit.from_hf(directory)
    _compare(ours, theirs, _inputs(parity, case == "t5-encoder"), parity)


@pytest.mark.parametrize("case", GREEDY)
def test_greedy_generation_is_token_identical_to_transformers(case, checkpoints, parity):
    directory, theirs = checkpoints(case)
    ours = formerkit.from_hf(directory)
    got = parity.assert_greedy(theirs, ours, VOCAB, 20, encoder_decoder=True)
    # The target starts from the checkpoint's decoder_start_token_id, which generate took from the config.
    assert (got[:, 0] == CASES[case][2]["decoder_start_token_id"]).all()


@pytest.mark.parametrize("case", CASES)
def test_to_hf_of_from_hf_loads_in_transformers_with_the_original_outputs(case, checkpoints, parity, tmp_path):
    directory, theirs = checkpoints(case)
    inputs = _inputs(parity, case == "t5-encoder")
    with torch.no_grad():
        out = theirs(**inputs)
    base = not hasattr(out, "logits")
    expected = out.last_hidden_state if base else out.logits
    parity.assert_round_trip(formerkit.from_hf(directory), tmp_path / "back", inputs, expected,
                             output=(lambda o: o.last_hidden_state) if base else None)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["architectures"] == [CASES[case][0]]


# ----- models built from scratch -----


def _t5_layout(**changes) -> ModelConfig:
    config = ModelConfig(
        arch="encoder_decoder", width=64, num_layers=2, max_seq_len=32, decoder_start_token_id=0,
        attention={"num_heads": 4, "head_dim": 24, "qkv_bias": False, "out_bias": False, "scale": 1.0},
        feedforward={"activation": "geglu_tanh", "hidden_size": 80, "bias": False},
        norm={"kind": "rmsnorm", "eps": 1e-5},
        position={"kind": "relative", "relative_buckets": 8, "relative_max_distance": 20, "separate_decoder": True},
        stem={"kind": "tokens", "vocab_size": VOCAB}, head={"kind": "lm", "tie_embeddings": True, "scale_input": True})
    return config.replace(**changes) if changes else config


def _bart_layout(**changes) -> ModelConfig:
    config = ModelConfig(
        arch="encoder_decoder", width=64, num_layers=2, num_decoder_layers=3, max_seq_len=32, decoder_start_token_id=2,
        attention={"num_heads": 4}, feedforward={"hidden_size": 80}, norm={"placement": "post"},
        position={"kind": "learned", "separate_decoder": True},
        stem={"kind": "tokens", "vocab_size": VOCAB, "embedding_norm": True, "separate_decoder_norm": True},
        head={"kind": "lm", "tie_embeddings": True, "bias": True})
    return config.replace(**changes) if changes else config


@pytest.mark.parametrize("config, model_type", [
    (_t5_layout(), "t5"),
    # Untied with a scaled head input: a combination no T5 release has, which the format still holds
    # (tie_word_embeddings and scale_decoder_outputs are separate fields).
    (_t5_layout(head={"tie_embeddings": False}, **{"feedforward.activation": "relu"}), "t5"),
    (_bart_layout(), "bart"),
])
def test_an_encoder_decoder_built_from_scratch_is_written_as_its_family(config, model_type, parity, randomize,
                                                                        tmp_path):
    torch.manual_seed(0)
    ours = randomize(formerkit.build_model(config), seed=5).eval()
    inputs = _inputs(parity)
    with torch.no_grad():
        expected = ours(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        decoder_input_ids=inputs["decoder_input_ids"],
                        decoder_attention_mask=inputs["decoder_attention_mask"])
    formerkit.to_hf(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == model_type
    back = parity.load_hf(tmp_path / "out")
    with torch.no_grad():
        got = back(**inputs).logits
    parity.assert_logits(got, expected, {"attention_mask": inputs["decoder_attention_mask"]})
    parity.assert_greedy(back, ours, VOCAB, 20, encoder_decoder=True)


# ----- refusals -----


@pytest.mark.parametrize("case, changes, field", [
    ("t5-model", {"feed_forward_proj": "gated-relu"}, "feed_forward_proj"),
    ("t5-model", {"is_decoder": True}, "is_decoder"),
    ("bart-model", {"decoder_attention_heads": 2}, "decoder_attention_heads"),
    ("bart-model", {"decoder_ffn_dim": 96}, "decoder_ffn_dim"),
    ("bart-model", {"activation_function": "gelu_fast"}, "activation_function"),
    ("bart-2-3-layers", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ("bart-model", {"decoder_layerdrop": 0.1}, "decoder_layerdrop"),
])
def test_config_values_formerkit_does_not_reproduce_are_refused_by_name(case, changes, field, checkpoints,
                                                                        tmp_path):
    import shutil

    directory, _ = checkpoints(case)
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(InteropError, match=rf"config.json: {re.escape(field)}: expected"):
        formerkit.from_hf(copy)


@pytest.mark.parametrize("config, field", [
    (_t5_layout(**{"feedforward.activation": "geglu"}), "feedforward.activation"),
    (_t5_layout(**{"attention.qkv_bias": True}), "attention.qkv_bias"),
    (_t5_layout(**{"attention.scale": None}), "attention.scale"),
    (_bart_layout(**{"norm.placement": "pre"}), "norm.placement"),
    (_bart_layout(**{"head.bias": False}), "head.bias"),
    (_bart_layout(**{"head.tie_embeddings": False}), "head.tie_embeddings"),
    (_bart_layout(**{"position.separate_decoder": False}), "position.separate_decoder"),
    (_bart_layout(**{"position.kind": "rope", "position.separate_decoder": False}), "position.kind"),
])
def test_to_hf_refuses_an_encoder_decoder_without_an_exact_equivalent_by_field(config, field, tmp_path):
    with pytest.raises(InteropError, match=rf"to_hf: .*{re.escape(field)}"):
        formerkit.to_hf(formerkit.build_model(config), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("buckets, max_distance", [(32, 128), (8, 20), (16, 40)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_equal_transformers_t5_buckets(buckets, max_distance, bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    from formerkit.nn.positions import relative_buckets

    distance = torch.arange(-600, 601)
    expected = T5Attention._relative_position_bucket(distance, bidirectional=bidirectional, num_buckets=buckets,
                                                     max_distance=max_distance)
    assert torch.equal(relative_buckets(distance, buckets, max_distance, bidirectional), expected)
