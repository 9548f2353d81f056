"""The decoders with parallel attention and MLP and partial rotary positions: GPT-NeoX / Pythia, GPT-J, Phi and
Falcon, against transformers itself (tiny random models saved with ``save_pretrained``; nothing is downloaded).

Each case varies what the conversion must get right: fused query/key/value rows laid out per head (GPT-NeoX, Falcon)
or per key/value group (Falcon's new architecture, with grouped-query and multi-query attention), GPT-J's interleaved
rotary pairs, partial rotary fractions, a norm per branch, one shared norm or sequential blocks, biases on some or all
projections and on the LM head, Phi's query/key LayerNorm, tied and untied heads, non-default bases and epsilons.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

import formerkit  # noqa: E402
from formerkit import InteropError  # noqa: E402
from formerkit.config import ModelConfig  # noqa: E402
from formerkit.interop.engine import Rule, grouped_qkv_order, interleaved_rotary_order  # noqa: E402
from formerkit.interop.gptj import fraction_for  # noqa: E402
from formerkit.models.transformer import build_model  # noqa: E402
from formerkit.nn.positions import RotaryPositions, apply_rotary  # noqa: E402

VOCAB, WIDTH, HEADS, LAYERS, POSITIONS = 97, 64, 4, 2, 32

# case -> (transformers class, config class, fields, the model_type to_hf writes the converted model as).
CASES = {
    "gpt_neox-parallel-untied": (
        "GPTNeoXForCausalLM", "GPTNeoXConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=96,
             vocab_size=VOCAB, max_position_embeddings=POSITIONS, rotary_pct=0.25, rotary_emb_base=5000.0,
             layer_norm_eps=1e-6), "gpt_neox"),
    "gpt_neox-sequential-tied-no-attention-bias": (
        "GPTNeoXForCausalLM", "GPTNeoXConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=80,
             vocab_size=VOCAB, max_position_embeddings=POSITIONS, rotary_pct=0.5, use_parallel_residual=False,
             attention_bias=False, tie_word_embeddings=True, hidden_act="gelu_new"), "gpt_neox"),
    "gptj-partial-untied": (
        "GPTJForCausalLM", "GPTJConfig",
        dict(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, rotary_dim=8, n_inner=96, vocab_size=VOCAB,
             n_positions=POSITIONS, layer_norm_epsilon=1e-6), "gptj"),
    "gptj-full-rotary-tied": (
        "GPTJForCausalLM", "GPTJConfig",
        dict(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, rotary_dim=16, vocab_size=VOCAB, n_positions=POSITIONS,
             tie_word_embeddings=True, activation_function="gelu"), "gptj"),
    "phi-qk-layernorm-gqa-untied": (
        "PhiForCausalLM", "PhiConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=POSITIONS, partial_rotary_factor=0.5,
             rope_theta=20000.0, qk_layernorm=True, layer_norm_eps=1e-6), "phi"),
    "phi-head-dim-mqa-tied": (
        "PhiForCausalLM", "PhiConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=1,
             head_dim=24, intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
             partial_rotary_factor=0.25, tie_word_embeddings=True), "phi"),
    "falcon-new-architecture-gqa": (
        "FalconForCausalLM", "FalconConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, num_kv_heads=2,
             new_decoder_architecture=True, ffn_hidden_size=96, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
             rope_theta=30000.0, layer_norm_epsilon=1e-6), "falcon"),
    "falcon-new-architecture-shared-norm-bias-untied": (
        "FalconForCausalLM", "FalconConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, num_kv_heads=2,
             new_decoder_architecture=True, num_ln_in_parallel_attn=1, bias=True, vocab_size=VOCAB,
             max_position_embeddings=POSITIONS, tie_word_embeddings=False), "falcon"),
    "falcon-7b-style-multi-query": (
        "FalconForCausalLM", "FalconConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, multi_query=True,
             parallel_attn=True, ffn_hidden_size=96, vocab_size=VOCAB, max_position_embeddings=POSITIONS), "falcon"),
    # Sequential blocks with biases and a key/value per head: GPT-NeoX holds that model too, and comes first.
    "falcon-sequential-bias-untied": (
        "FalconForCausalLM", "FalconConfig",
        dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, multi_query=False,
             parallel_attn=False, bias=True, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
             tie_word_embeddings=False), "gpt_neox"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, parity):
    """checkpoints(case) -> (transformers model, its directory), each saved once per module."""
    built = {}

    def get(case: str):
        if case not in built:
            architecture, config_class, fields, _ = CASES[case]
            directory = tmp_path_factory.mktemp(case)
            built[case] = (parity.save(architecture, config_class, fields, directory), directory)
        return built[case]

    return get


def _their_logits(model, inputs):
    """transformers' logits; with left padding, positions count real tokens (as in its generate)."""
    mask = inputs.get("attention_mask")
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    return model(**inputs, position_ids=position_ids).logits


# ----- parity -----


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_from_hf_logits_equal_transformers_on_a_padded_batch(case, padding, checkpoints, parity):
    theirs, directory = checkpoints(case)
    ours = formerkit.from_hf(directory)
    inputs = parity.tokens(VOCAB, 16, batch=3, padding=padding)
    logits = ours(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    parity.assert_logits(logits, _their_logits(theirs, inputs), inputs)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_is_token_identical_to_transformers(case, checkpoints, parity):
    theirs, directory = checkpoints(case)
    parity.assert_greedy(theirs, formerkit.from_hf(directory), VOCAB, 20)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_to_hf_of_from_hf_reloads_with_the_original_logits(case, checkpoints, parity, tmp_path):
    theirs, directory = checkpoints(case)
    inputs = parity.tokens(VOCAB, 16, batch=2, padding="right")
    parity.assert_round_trip(formerkit.from_hf(directory), tmp_path / "out", inputs, _their_logits(theirs, inputs))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == CASES[case][3]


@pytest.mark.parametrize("case, architecture", [
    ("gpt_neox-parallel-untied", "GPTNeoXModel"), ("gptj-partial-untied", "GPTJModel"),
    ("phi-qk-layernorm-gqa-untied", "PhiModel"), ("falcon-new-architecture-gqa", "FalconModel"),
], ids=lambda value: value if value in CASES else None)
@torch.no_grad()
def test_a_base_model_gives_the_final_hidden_states(case, architecture, parity, tmp_path):
    _, config_class, fields, _ = CASES[case]
    theirs = parity.save(architecture, config_class, fields, tmp_path / "hf")
    ours = formerkit.from_hf(tmp_path / "hf")
    inputs = parity.tokens(VOCAB, 12, padding="right")
    hidden = ours(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    parity.assert_logits(hidden, theirs(**inputs).last_hidden_state, inputs, "last_hidden_state")
    parity.assert_round_trip(ours, tmp_path / "out", inputs, hidden, output=lambda out: out.last_hidden_state)


@pytest.mark.parametrize("case, changes", [
    ("gpt_neox-parallel-untied", {"rotary_pct": 0.25, "rotary_emb_base": 5000.0}),
    ("phi-qk-layernorm-gqa-untied", {"partial_rotary_factor": 0.5, "rope_theta": 20000.0}),
    ("falcon-new-architecture-gqa", {"rope_theta": 30000.0}),
], ids=["gpt_neox", "phi", "falcon"])
@torch.no_grad()
def test_transformers_4_config_spellings_read_the_same(case, changes, checkpoints, parity, tmp_path):
    """transformers 4.x writes the rotary base and fraction as fields of their own (Pythia's files: rotary_pct,
    rotary_emb_base), 5.x into rope_parameters."""
    theirs, _ = checkpoints(case)
    ours = formerkit.from_hf(_edited(checkpoints, case, tmp_path, changes, drop=("rope_parameters",)))
    inputs = parity.tokens(VOCAB, 12, padding="right")
    parity.assert_logits(ours(inputs["input_ids"], attention_mask=inputs["attention_mask"]),
                         _their_logits(theirs, inputs), inputs)


@pytest.mark.parametrize("case, buffers", [
    ("gpt_neox-parallel-untied", ["gpt_neox.layers.0.attention.bias", "gpt_neox.layers.0.attention.masked_bias",
                                  "gpt_neox.layers.1.attention.rotary_emb.inv_freq"]),
    ("gptj-partial-untied", ["transformer.h.0.attn.bias", "transformer.h.1.attn.masked_bias"]),
], ids=["gpt_neox", "gptj"])
def test_buffers_older_files_store_are_ignored(case, buffers, checkpoints, tmp_path):
    """Older GPT-NeoX (Pythia) and GPT-J files hold causal-mask tables and rotary frequencies besides the weights."""
    _, directory = checkpoints(case)
    directory = shutil.copytree(directory, tmp_path / case)
    tensors = load_file(directory / "model.safetensors")
    save_file({**tensors, **{name: torch.ones(4) for name in buffers}}, directory / "model.safetensors",
              metadata={"format": "pt"})
    ours, reference = formerkit.from_hf(directory), formerkit.from_hf(checkpoints(case)[1])
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(ours(ids), reference(ids))


# ----- the weight layouts, against the formulas they stand for -----


def test_interleaved_rotary_pairs_equal_half_split_pairs_after_the_channel_permutation():
    """GPT-J rotates pairs (2i, 2i + 1) by angle p / 10000^(2i/r), written out here; formerkit rotates (i, i + r/2)
    by the same angle. On channels permuted by ``interleaved_rotary_order`` the two agree, and the channels past
    rotary_dim pass through both untouched."""
    head_dim, rotary_dim, length = 16, 8, 9
    x = torch.randn(2, 1, length, head_dim, dtype=torch.float64)
    expected = x.clone()
    for p in range(length):
        for i in range(rotary_dim // 2):
            angle = p / 10000 ** (2 * i / rotary_dim)
            a, b = x[:, :, p, 2 * i], x[:, :, p, 2 * i + 1]
            expected[:, :, p, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
            expected[:, :, p, 2 * i + 1] = b * math.cos(angle) + a * math.sin(angle)
    order = interleaved_rotary_order(1, head_dim, rotary_dim)
    cos, sin = RotaryPositions(length, head_dim, 10000.0, rotary_dim).rotary(None, length)
    ours = apply_rotary(x[..., order], cos.double(), sin.double())
    torch.testing.assert_close(ours, expected[..., order], rtol=0, atol=1e-6)
    # The permutation is the same for queries and keys, so their dot products are those of the interleaved layout.
    assert order == [0, 2, 4, 6, 1, 3, 5, 7, *range(8, 16)]


@pytest.mark.parametrize("kv_heads, group", [(2, 2), (4, 1), (1, 4)])
def test_grouped_qkv_order_splits_a_fused_projection_as_falcon_and_gpt_neox_do(kv_heads, group):
    """Rows [kv_heads, group + 2, head_dim] read as Falcon's new architecture (and GPT-NeoX, group 1) read them:
    each group's queries, then its key, then its value; multi-query (one group) is plain [q | k | v]."""
    head_dim = 3
    fused = torch.arange(kv_heads * (group + 2) * head_dim).view(kv_heads, group + 2, head_dim)
    queries, keys, values = fused[:, :group].reshape(-1), fused[:, group].reshape(-1), fused[:, group + 1].reshape(-1)
    reordered = fused.reshape(-1)[grouped_qkv_order(kv_heads, group, head_dim)]
    assert torch.equal(reordered, torch.cat([queries, keys, values]))
    if kv_heads == 1:
        assert torch.equal(reordered, fused.reshape(-1))


def test_a_gptj_rotary_dim_reads_as_a_fraction_rotating_exactly_that_many_channels():
    # 30 / 44 * 44 is 29.999...: the fraction is nudged up to the next float, so int(head_dim * fraction) is 30.
    assert [(head_dim, rotary_dim) for head_dim in range(2, 130, 2) for rotary_dim in range(2, head_dim + 1, 2)
            if int(head_dim * fraction_for(rotary_dim, head_dim)) != rotary_dim] == []


def test_a_permuted_rule_serves_both_directions():
    order = grouped_qkv_order(2, 1, 2)
    rule = Rule("qkv.weight", ("a.weight", "b.weight"), "permuted", (8, 4), tuple(order))
    parts = [torch.randn(8, 5), torch.randn(4, 5)]
    ours = rule.to_ours(parts)
    assert torch.equal(ours, torch.cat(parts)[order])
    back = rule.to_theirs(ours)
    assert torch.equal(back["a.weight"], parts[0]) and torch.equal(back["b.weight"], parts[1])


# ----- refusals -----


def _edited(checkpoints, case, tmp_path, changes: dict, drop: tuple[str, ...] = ()):
    _, directory = checkpoints(case)
    directory = shutil.copytree(directory, tmp_path / case)
    path = directory / "config.json"
    data = {key: value for key, value in json.loads(path.read_text()).items() if key not in drop}
    path.write_text(json.dumps({**data, **changes}))
    return directory


@pytest.mark.parametrize("case, changes, field", [
    ("falcon-7b-style-multi-query", {"alibi": True}, "alibi"),
    ("falcon-new-architecture-gqa", {"parallel_attn": False}, "parallel_attn"),
    ("falcon-sequential-bias-untied", {"num_kv_heads": 2}, "num_kv_heads"),
    ("falcon-7b-style-multi-query", {"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
    ("gptj-partial-untied", {"rotary_dim": 32}, "rotary_dim"),
    ("gpt_neox-parallel-untied", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                                                      "partial_rotary_factor": 0.25}}, "rope_parameters.rope_type"),
    ("phi-qk-layernorm-gqa-untied", {"head_dim": 24}, "head_dim"),
    ("phi-qk-layernorm-gqa-untied", {"hidden_act": "gelu_fast"}, "hidden_act"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_config_values_formerkit_does_not_reproduce_are_refused_by_name(case, changes, field, checkpoints, tmp_path):
    directory = _edited(checkpoints, case, tmp_path, changes)
    with pytest.raises(InteropError, match=rf"config\.json: {re.escape(field)}: expected"):
        formerkit.from_hf(directory)


def _decoder(**changes) -> ModelConfig:
    fields = dict(arch="decoder", width=WIDTH, num_layers=1, max_seq_len=POSITIONS,
                  attention={"num_heads": HEADS}, feedforward={}, norm={"kind": "layernorm"},
                  position={"kind": "rope", "rotary_fraction": 0.5},
                  stem={"kind": "tokens", "vocab_size": VOCAB}, head={"kind": "lm"})
    for key, value in changes.items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
    return ModelConfig(**fields)


@pytest.mark.parametrize("changes, field", [
    # LLaMA's layout but parallel: LLaMA's refusal names the one field it cannot hold.
    (dict(parallel_residual="separate_norms", norm={"kind": "rmsnorm"}, feedforward={"activation": "swiglu"},
          position={"rotary_fraction": 1.0}), "parallel_residual"),
    # GPT-NeoX's layout with an LM head bias: its refusal (one field) comes before LLaMA's (the activation).
    (dict(parallel_residual="separate_norms", head={"bias": True}), "head.bias"),
    # Falcon's layout with a partial rotary: Falcon rotates every channel.
    (dict(parallel_residual="separate_norms", attention={"num_kv_heads": 2, "qkv_bias": False, "out_bias": False},
          feedforward={"bias": False}), "position.rotary_fraction"),
], ids=["rmsnorm", "head-bias", "falcon-partial-rotary"])
def test_to_hf_refuses_a_parallel_model_no_family_holds_by_field(changes, field, tmp_path):
    model = build_model(_decoder(**changes))
    with pytest.raises(InteropError, match=rf"to_hf: .*{re.escape(field)}"):
        formerkit.to_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, model_type", [
    (dict(parallel_residual="separate_norms"), "gpt_neox"),
    (dict(parallel_residual="shared_norm", head={"bias": True}), "phi"),
    # 0.3 of 16 channels rotates 4 (int(4.8)): GPT-J's rotary_dim 4, the same model.
    (dict(parallel_residual="shared_norm", attention={"qkv_bias": False, "out_bias": False}, head={"bias": True},
          position={"rotary_fraction": 0.3}), "gptj"),
    (dict(parallel_residual="shared_norm", attention={"num_kv_heads": 2, "qkv_bias": False, "out_bias": False},
          feedforward={"bias": False}, position={"rotary_fraction": 1.0}), "falcon"),
], ids=["separate-norms", "shared-norm-biases", "shared-norm-interleaved", "shared-norm-gqa-no-bias"])
@torch.no_grad()
def test_to_hf_writes_a_model_built_from_scratch_as_the_family_that_holds_it(changes, model_type, parity, randomize,
                                                                          tmp_path):
    model = randomize(build_model(_decoder(**changes)).eval(), seed=3)
    inputs = parity.tokens(VOCAB, 12, padding="right")
    expected = model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    parity.assert_round_trip(model, tmp_path / "out", inputs, expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == model_type
