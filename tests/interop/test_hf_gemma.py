"""Gemma, Gemma 2 and Gemma 3 (text) checkpoints against transformers: logits on padded batches, greedy generation,
to_hf round trips and refusals by field.

The tiny models keep what makes each generation differ from LLaMA binding: head_dim 32 with width 64 and 4 heads,
grouped- and multi-query attention, soft-caps small enough to bind (scores 5.0, logits 3.0), a
query_pre_attn_scalar other than head_dim, sliding windows of 5 over 16 tokens (the greedy prompts run past them),
and a local RoPE base far from the global one. Left-padded rows get positions counted over their real tokens, as
formerkit gives them and as transformers' generate does.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import formerkit  # noqa: E402
from formerkit import InteropError  # noqa: E402

VOCAB, SEQ = 97, 16


def _sizes(**overrides):
    sizes = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=32, rms_norm_eps=1e-5,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {**sizes, **overrides}


_GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}

# case -> (transformers class, config class, fields).
CASES = {
    "gemma-mqa-tied": ("GemmaForCausalLM", "GemmaConfig", _sizes(num_key_value_heads=1, rope_theta=20000.0)),
    "gemma-gqa-untied-biases": ("GemmaForCausalLM", "GemmaConfig",
                                _sizes(tie_word_embeddings=False, attention_bias=True)),
    "gemma2-softcaps-windows-untied": (
        "Gemma2ForCausalLM", "Gemma2Config",
        _sizes(num_hidden_layers=3, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24,
               sliding_window=5, tie_word_embeddings=False)),
    "gemma2-mqa-tied": ("Gemma2ForCausalLM", "Gemma2Config",
                        _sizes(num_key_value_heads=1, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                               query_pre_attn_scalar=48, sliding_window=5)),
    "gemma3-local-rope": (
        "Gemma3ForCausalLM", "Gemma3TextConfig",
        _sizes(num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=5, rope_parameters=_GEMMA3_ROPE,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # Gemma 3's linear scaling (factor 8) on its global layer only; the window layers share the base but not the
    # scaling, so they keep a table of their own.
    "gemma3-linear-global": (
        "Gemma3ForCausalLM", "Gemma3TextConfig",
        _sizes(num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=5,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}},
               layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma3-logit-softcap-untied": (
        "Gemma3ForCausalLM", "Gemma3TextConfig",
        _sizes(query_pre_attn_scalar=24, sliding_window=5, rope_parameters=_GEMMA3_ROPE,
               final_logit_softcapping=3.0, tie_word_embeddings=False,
               layer_types=["full_attention", "sliding_attention"])),
}
BASE_MODELS = {"gemma": ("GemmaModel", "GemmaConfig", _sizes()),
               "gemma2": ("Gemma2Model", "Gemma2Config",
                          _sizes(attn_logit_softcapping=5.0, query_pre_attn_scalar=24, sliding_window=5)),
               "gemma3": ("Gemma3TextModel", "Gemma3TextConfig",
                          _sizes(query_pre_attn_scalar=24, sliding_window=5, rope_parameters=_GEMMA3_ROPE,
                                 layer_types=["sliding_attention", "full_attention"]))}


@pytest.fixture(scope="module")
def checkpoints(parity, tmp_path_factory):
    """Each case saved once: its directory and the transformers model."""
    root = tmp_path_factory.mktemp("gemma")
    saved = {}
    for case, (architecture, config_class, fields) in {**CASES, **BASE_MODELS}.items():
        saved[case] = (root / case, parity.save(architecture, config_class, fields, root / case))
    return saved


def _with_positions(inputs):
    """transformers' forward numbers positions 0, 1, 2, ... from the first column, padding included; formerkit
    counts real tokens. Explicit positions make the two agree on left-padded rows."""
    return {**inputs, "position_ids": (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_logits_match_transformers_on_a_padded_batch(case, padding, checkpoints, parity):
    directory, theirs = checkpoints[case]
    ours = formerkit.from_hf(directory)
    inputs = parity.tokens(VOCAB, SEQ, padding=padding)
    expected = theirs(**_with_positions(inputs)).logits
    parity.assert_logits(ours(inputs["input_ids"], attention_mask=inputs["attention_mask"]), expected, inputs)


@pytest.mark.parametrize("case", BASE_MODELS)
@torch.no_grad()
def test_base_models_give_transformers_final_hidden_states(case, checkpoints, parity):
    directory, theirs = checkpoints[case]
    ours = formerkit.from_hf(directory)
    assert ours.config.head.kind == "none"
    inputs = parity.tokens(VOCAB, SEQ, padding="left")
    expected = theirs(**_with_positions(inputs)).last_hidden_state
    parity.assert_logits(ours(inputs["input_ids"], attention_mask=inputs["attention_mask"]), expected, inputs,
                         "final hidden states")


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_is_token_identical_to_transformers(case, checkpoints, parity):
    directory, theirs = checkpoints[case]
    parity.assert_greedy(theirs, formerkit.from_hf(directory), VOCAB, 20)


@pytest.mark.parametrize("case", [*CASES, *BASE_MODELS])
@torch.no_grad()
def test_to_hf_of_from_hf_reloads_with_the_original_outputs(case, checkpoints, parity, tmp_path):
    directory, theirs = checkpoints[case]
    ours = formerkit.from_hf(directory)
    inputs = _with_positions(parity.tokens(VOCAB, SEQ, padding="right"))
    base = case in BASE_MODELS
    expected = theirs(**inputs)
    expected = expected.last_hidden_state if base else expected.logits
    written = json.loads((directory / "config.json").read_text())
    parity.assert_round_trip(ours, tmp_path / "out", inputs, expected,
                             output=(lambda out: out.last_hidden_state) if base else None)
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    assert back["model_type"] == written["model_type"]
    assert back["architectures"] == written["architectures"]


def test_a_model_built_from_scratch_with_gemma_parts_writes_as_gemma_and_a_plain_one_as_llama(tmp_path):
    sizes = dict(arch="decoder", width=32, num_layers=1, max_seq_len=16, position={"kind": "rope"},
                 attention={"num_heads": 2, "qkv_bias": False, "out_bias": False},
                 feedforward={"activation": "geglu_tanh", "hidden_size": 48, "bias": False},
                 stem={"kind": "tokens", "vocab_size": 50})
    gemma = formerkit.build_model({**sizes, "norm": {"kind": "rmsnorm", "weight_offset": 1.0},
                                   "stem": {"kind": "tokens", "vocab_size": 50, "scale_embeddings": True}})
    formerkit.to_hf(gemma, tmp_path / "gemma")
    assert json.loads((tmp_path / "gemma" / "config.json").read_text())["model_type"] == "gemma"
    llama = formerkit.build_model({**sizes, "norm": {"kind": "rmsnorm"},
                                   "feedforward": {"activation": "swiglu", "hidden_size": 48, "bias": False}})
    formerkit.to_hf(llama, tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    # Gemma's parts without Gemma's other parts: Gemma's refusal names what it cannot hold.
    odd = formerkit.build_model({**sizes, "norm": {"kind": "rmsnorm", "weight_offset": 1.0}})
    with pytest.raises(InteropError, match=r"stem\.scale_embeddings"):
        formerkit.to_hf(odd, tmp_path / "odd")


def _edited(checkpoints, case, tmp_path, changes=None, drop=()):
    directory = tmp_path / "edited"
    shutil.copytree(checkpoints[case][0], directory)
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes or {})
    for name in drop:
        data.pop(name, None)
    path.write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("case, changes, field", [
    ("gemma3-local-rope", {"rope_parameters": {**_GEMMA3_ROPE, "full_attention": {
        "rope_type": "dynamic", "factor": 8.0, "rope_theta": 50000.0}}}, "rope_parameters.full_attention.rope_type"),
    ("gemma3-local-rope", {"rope_parameters": {**_GEMMA3_ROPE, "sliding_attention": {
        "rope_type": "linear", "factor": 8.0, "rope_theta": 100.0}}}, "rope_parameters.sliding_attention.rope_type"),
    ("gemma3-local-rope", {"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_scaling.rope_type"),
    ("gemma-mqa-tied", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type"),
    ("gemma3-local-rope", {"attn_logit_softcapping": 5.0}, "attn_logit_softcapping"),
    ("gemma2-mqa-tied", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2-mqa-tied", {"hidden_activation": "relu"}, "hidden_activation"),
    ("gemma2-mqa-tied", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ("gemma2-mqa-tied", {"sliding_window": None}, "sliding_window"),
    ("gemma3-local-rope", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]},
     "model_type"),
])
def test_config_values_formerkit_does_not_reproduce_are_refused_by_name(case, changes, field, checkpoints,
                                                                        tmp_path):
    with pytest.raises(InteropError, match=rf"{field.replace('.', r'[.]')}: expected") as error:
        formerkit.from_hf(_edited(checkpoints, case, tmp_path, changes))
    if changes.get("model_type") == "gemma3":
        assert "gemma3_text" in str(error.value) and "Gemma3ForCausalLM" in str(error.value)


@torch.no_grad()
def test_older_config_spellings_read_as_transformers_reads_them(checkpoints, parity, tmp_path):
    """transformers 4.x configs: Gemma 3's rope_theta/rope_local_base_freq and sliding_window_pattern instead of
    rope_parameters and layer_types (every pattern-th layer global), and Gemma's legacy hidden_act "gelu", which
    transformers reads as the tanh approximation."""
    directory = _edited(checkpoints, "gemma3-local-rope", tmp_path,
                        {"rope_theta": 50000.0, "rope_local_base_freq": 100.0, "sliding_window_pattern": 2},
                        drop=("rope_parameters", "layer_types"))
    config = formerkit.from_hf(directory).config
    assert config.attention.sliding_window_layers == (0, 2)
    assert (config.position.rope_base, config.position.rope_local_base) == (50000.0, 100.0)
    # 4.x's rope_scaling: the global layers' linear factor, the window layers on rope_local_base_freq unscaled.
    scaled = _edited(checkpoints, "gemma3-linear-global", tmp_path / "scaled",
                     {"rope_theta": 5000.0, "rope_local_base_freq": 5000.0, "sliding_window_pattern": 2,
                      "rope_scaling": {"type": "linear", "factor": 8.0}}, drop=("rope_parameters", "layer_types"))
    position = formerkit.from_hf(scaled).config.position
    assert (position.rope_scaling, position.rope_factor, position.rope_local_base) == ("linear", 8.0, 5000.0)
    legacy = _edited(checkpoints, "gemma-mqa-tied", tmp_path / "legacy", {"hidden_act": "gelu"})
    assert formerkit.from_hf(legacy).config.feedforward.activation == "geglu_tanh"


@pytest.mark.parametrize("case, field", [
    ("gemma2-softcaps-windows-untied", "attention.softcap"), ("gemma2-softcaps-windows-untied", "head.logit_softcap"),
    ("gemma2-softcaps-windows-untied", "attention.scale"), ("gemma3-local-rope", "position.rope_local_base")])
@torch.no_grad()
def test_the_cases_bind_each_part_the_parity_checks(case, field, checkpoints, parity):
    """The parity cases would not notice a part the tiny model leaves idle: without each soft-cap, with the default
    score scale, or with the global RoPE base on every layer, the same weights give other logits."""
    ours = formerkit.from_hf(checkpoints[case][0])
    other = formerkit.build_model(ours.config.replace(**{field: None}))
    other.load_state_dict(ours.state_dict())
    inputs = parity.tokens(VOCAB, SEQ, padding=None)
    assert (other(inputs["input_ids"]) - ours(inputs["input_ids"])).abs().max() > 1e-2
