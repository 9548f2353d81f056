"""RoPE scaling (linear, dynamic, yarn, llama3) in LLaMA, Mistral, Qwen2 and Qwen3 checkpoints, Qwen3's query/key
norms, and Phi-3 (fused projections, partial rotary, LongRoPE), against transformers itself.

Each case is a tiny random transformers model (GQA, odd head sizes, non-default theta, eps and scaling factors) whose
original context is short (8 positions) so that the scaling changes the angles of the 16-24 token inputs and of the
greedy continuations: logits on right- and left-padded batches, 20 greedy tokens against ``generate`` (7-token prompts,
so the dynamic scheme grows its base step by step past the original length), and ``to_hf(from_hf(x))`` reloaded by
transformers. Refusals are pinned by the field their message names.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import formerkit  # noqa: E402
from formerkit import InteropError  # noqa: E402

VOCAB, WIDTH, HEADS, LAYERS = 97, 64, 4, 2


def _sizes(**overrides):
    sizes = dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=32, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    return {**sizes, **overrides}


# case -> (transformers model class, its config class, config fields, input length).
CASES = {
    # Llama 3.1's rule, 5.x spelling: wavelengths over 8 positions interpolated 8x, those between 2 and 8 blended.
    "llama3-factor-8": ("LlamaForCausalLM", "LlamaConfig", _sizes(
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8}), 20),
    # Position interpolation, 4.x spelling (rope_scaling + rope_theta), tied, head_dim != width / heads.
    "llama-linear-tied-head-dim": ("LlamaForCausalLM", "LlamaConfig", _sizes(
        rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.5}, tie_word_embeddings=True, head_dim=24,
        num_key_value_heads=1), 16),
    # Dynamic NTK: max_position_embeddings (8) is the original length; inputs and generation go past it.
    "mistral-dynamic": ("MistralForCausalLM", "MistralConfig", _sizes(
        max_position_embeddings=8, sliding_window=None,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 30000.0, "factor": 4.0}), 24),
    # YaRN with non-default ramp bounds and its default table scale 0.1 ln(4) + 1.
    "qwen2-yarn": ("Qwen2ForCausalLM", "Qwen2Config", _sizes(
        rope_parameters={"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0, "beta_fast": 8.0,
                         "beta_slow": 2.0, "original_max_position_embeddings": 8}), 24),
    # YaRN as DeepSeek spells its table scale: (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1), read into
    # formerkit's attention factor; no beta_fast/beta_slow (32 and 1).
    "llama-yarn-mscale": ("LlamaForCausalLM", "LlamaConfig", _sizes(
        rope_parameters={"rope_type": "yarn", "rope_theta": 30000.0, "factor": 3.0, "mscale": 1.5,
                         "mscale_all_dim": 0.5, "original_max_position_embeddings": 8}), 20),
    # Qwen3: query/key RMSNorm per head, head_dim 24 (width / heads is 16), GQA, untied.
    "qwen3-qk-norm-head-dim": ("Qwen3ForCausalLM", "Qwen3Config", _sizes(
        head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 40000.0}), 16),
    # Qwen3 with biases, a window on layer 1, tied, and YaRN with an explicit attention factor.
    "qwen3-bias-window-yarn-tied": ("Qwen3ForCausalLM", "Qwen3Config", _sizes(
        head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=5, max_window_layers=1,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "attention_factor": 1.3,
                         "original_max_position_embeddings": 8}), 20),
    # Phi-3: fused qkv_proj and gate_up_proj, half the channels rotated, a sliding window on every layer.
    "phi3-partial-rotary-window": ("Phi3ForCausalLM", "Phi3Config", _sizes(
        partial_rotary_factor=0.5, sliding_window=6, rope_theta=15000.0, rms_norm_eps=3e-6, pad_token_id=None), 16),
    # Phi-3 128k's LongRoPE, 4.x spelling: a factor per rotated pair (12 of 16 channels rotate), short within the
    # original 8 positions, long beyond; no factor, so the table scale comes from 32 / 8.
    "phi3-longrope-partial": ("Phi3ForCausalLM", "Phi3Config", _sizes(
        partial_rotary_factor=0.75, original_max_position_embeddings=8, pad_token_id=None,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
                      "long_factor": [1.2, 1.9, 3.1, 4.4, 6.5, 9.0]}), 20),
    "phi3-tied-mha": ("Phi3ForCausalLM", "Phi3Config", _sizes(num_key_value_heads=4, tie_word_embeddings=True,
                                                              pad_token_id=None), 16),
}


def _positions(inputs):
    """The positions transformers' generate gives left-padded rows (counting real tokens), for its plain forward."""
    return (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def models(parity, tmp_path_factory):
    built = {}

    def get(case):
        if case not in built:
            architecture, config_class, fields, _ = CASES[case]
            directory = tmp_path_factory.mktemp(case)
            theirs = parity.save(architecture, config_class, fields, directory, seed=3)
            built[case] = theirs, formerkit.from_hf(directory), directory
        return built[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_logits_match_transformers_on_padded_batches(case, models, parity):
    theirs, ours, _ = models(case)
    length = CASES[case][3]
    for padding in ("right", "left"):
        inputs = parity.tokens(VOCAB, length, batch=3, padding=padding)
        expected = theirs(**inputs, position_ids=_positions(inputs)).logits
        parity.assert_logits(ours(inputs["input_ids"], attention_mask=inputs["attention_mask"]), expected, inputs)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_is_token_identical_to_transformers(case, models, parity):
    theirs, ours, _ = models(case)
    parity.assert_greedy(theirs, ours, VOCAB, 20, prompt_length=7)


@pytest.mark.parametrize("case", ["mistral-dynamic", "phi3-longrope-partial", "qwen2-yarn"])
def test_greedy_generation_after_prompts_longer_than_the_original_length(case, models, parity):
    """Prompts of 12 tokens (left-padded to fewer in two rows) already pass the original 8 positions in the
    prefill. A fresh transformers model: one that has generated keeps dynamic frequencies grown by its last call
    (formerkit computes them per call; see RotaryPositions)."""
    _, ours, directory = models(case)
    parity.assert_greedy(parity.load_hf(directory), ours, VOCAB, 12, prompt_length=12)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_to_hf_round_trip_gives_the_same_logits(case, models, parity, tmp_path):
    _, ours, directory = models(case)
    inputs = parity.tokens(VOCAB, CASES[case][3], batch=3, padding="right")
    # A fresh transformers model: one that has generated keeps dynamic frequencies grown for longer inputs.
    parity.assert_round_trip(ours, tmp_path, inputs, parity.load_hf(directory)(**inputs).logits)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((directory / "config.json").read_text())
    # A Mistral without a window and a Phi-3 rotating every channel are LLaMAs; the other cases keep their class.
    plain = case in ("mistral-dynamic", "phi3-tied-mha")  # phi3-longrope-partial rotates 12 of 16: Phi-3
    assert written["model_type"] == ("llama" if plain else original["model_type"])
    assert written["rope_parameters"]["rope_type"] == original["rope_parameters"]["rope_type"]


def test_scaling_reads_into_the_position_config(models):
    position = models("llama3-factor-8")[1].config.position
    assert (position.rope_scaling, position.rope_factor, position.rope_original_max_len) == ("llama3", 8.0, 8)
    dynamic = models("mistral-dynamic")[1].config
    # dynamic: max_position_embeddings is the original length; formerkit allows factor times as many positions.
    assert (dynamic.position.rope_original_max_len, dynamic.max_seq_len) == (8, 32)
    yarn = models("qwen2-yarn")[1].config.position
    assert (yarn.rope_beta_fast, yarn.rope_beta_slow, yarn.rope_attention_factor) == (8.0, 2.0, None)
    mscale = models("llama-yarn-mscale")[1].config.position
    expected = (0.15 * math.log(3.0) + 1) / (0.05 * math.log(3.0) + 1)
    assert mscale.rope_attention_factor == pytest.approx(expected, rel=1e-12)
    qwen3 = models("qwen3-qk-norm-head-dim")[1].config
    assert qwen3.attention.qk_norm and qwen3.head_dim == 24 and not qwen3.attention.qkv_bias
    assert models("phi3-partial-rotary-window")[1].config.rotary_dim == 8


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mistral-dynamic", "phi3-longrope-partial"])
def test_the_compiled_decode_step_follows_length_dependent_scaling(case, models):
    """Dynamic frequencies and LongRoPE's choice of factors are computed from the step's positions inside the step,
    so the step compiled ahead of time (whose shapes are fixed) follows them at every token as the eager one does;
    LongRoPE's recomputed cache is bound to the compiled step again (~40 s of compiling each)."""
    from formerkit.generation.compiled_step import CompiledDecoder

    _, ours, _ = models(case)
    prompts = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    eager = ours.generate(prompts, 20, temperature=0)
    compiled = ours.generate(prompts, 20, temperature=0, compile=True)
    decoder = CompiledDecoder.for_model(ours)
    assert decoder.ahead and not decoder.ahead_failed, decoder.ahead_error
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("overrides, model_type", [
    ({}, "llama"), ({"attention.qk_norm": True}, "qwen3"), ({"position.rotary_fraction": 0.5}, "phi3"),
    ({"position.rope_scaling": "llama3", "position.rope_factor": 8.0, "position.rope_original_max_len": 8}, "llama"),
    ({"position.rope_scaling": "yarn", "position.rope_factor": 3.0, "position.rope_original_max_len": 8,
      "position.rope_beta_fast": 16.0, "attention.qk_norm": True}, "qwen3"),
    ({"position.rope_scaling": "linear", "position.rope_factor": 0.5}, "llama"),
    ({"position.rope_scaling": "dynamic", "position.rope_factor": 2.0, "position.rope_original_max_len": 16,
      "max_seq_len": 32}, "llama"),
])
@torch.no_grad()
def test_a_formerkit_model_writes_as_the_class_that_holds_it(overrides, model_type, parity, tmp_path):
    """to_hf picks the class by the config: plain LLaMA layout -> llama, query/key norms -> qwen3, partial rotary ->
    phi3; scaling is written as rope_parameters that transformers reads back with the same logits."""
    model = formerkit.create_model("llama_tiny", vocab_size=VOCAB, width=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                                   **{"max_seq_len": 32, **overrides})
    parity.randomize(model, seed=5)
    inputs = parity.tokens(VOCAB, 24, batch=3, padding="right")
    parity.assert_round_trip(model.eval(), tmp_path, inputs, model(inputs["input_ids"],
                                                                   attention_mask=inputs["attention_mask"]))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type


# ----- refusals -----


def _edit_config(directory, changes: dict, drop: tuple[str, ...] = ()) -> None:
    path = directory / "config.json"
    data = {key: value for key, value in json.loads(path.read_text()).items() if key not in drop}
    path.write_text(json.dumps({**data, **changes}))


@pytest.mark.parametrize("case, changes, drop, field", [
    ("llama3-factor-8", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}}, (),
     "rope_parameters.rope_type"),
    ("llama3-factor-8", {"rope_scaling": {"type": "proportional", "factor": 2.0}}, ("rope_parameters",),
     "rope_scaling.type"),
    ("llama3-factor-8", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}},
     (), "rope_parameters"),
    ("qwen2-yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "truncate": False,
                                        "original_max_position_embeddings": 8}}, (), "rope_parameters.truncate"),
    ("llama3-factor-8", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                             "high_freq_factor": 4.0}}, (), "rope_parameters.low_freq_factor"),
    ("llama3-factor-8", {"partial_rotary_factor": 0.5}, (), "partial_rotary_factor"),
    # LLaMA's generation keeps keys rotated by LongRoPE's short factors once the long ones take over (Phi-3's
    # recomputes them, as formerkit does): refused.
    ("llama3-factor-8", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0,
                                             "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                             "original_max_position_embeddings": 8}}, (), "rope_parameters.rope_type"),
    # Phi-3's config class reads plain RoPE and LongRoPE only.
    ("phi3-tied-mha", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, (),
     "rope_parameters.rope_type"),
    ("phi3-longrope-partial", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": "x"}},
     ("rope_parameters",), "rope_scaling.long_factor"),
    ("phi3-tied-mha", {"embd_pdrop": 0.1}, (), "embd_pdrop"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_config_values_formerkit_does_not_reproduce_are_refused_by_name(case, changes, drop, field, models,
                                                                       tmp_path):
    import shutil

    directory = models(case)[2]
    shutil.copytree(directory, tmp_path / "copy")
    _edit_config(tmp_path / "copy", changes, drop)
    with pytest.raises(InteropError, match=rf"config\.json: {re.escape(field)}: expected"):
        formerkit.from_hf(tmp_path / "copy")


def test_longrope_factors_of_the_wrong_length_are_refused_by_name(models, tmp_path):
    import shutil

    shutil.copytree(models("phi3-longrope-partial")[2], tmp_path / "copy")
    _edit_config(tmp_path / "copy", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 8,
                                                      "long_factor": [2.0] * 6}}, ("rope_parameters",))
    with pytest.raises(InteropError, match=r"position\.rope_short_factors.*6 factors"):
        formerkit.from_hf(tmp_path / "copy")
