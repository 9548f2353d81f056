"""Base models (no LM head) of the decoder families: from_hf gives transformers' final hidden states, and to_hf of the
import reloads with them. The causal-LM classes of these families are covered in their own modules."""

from __future__ import annotations

import pytest
import torch

import formerkit

VOCAB = 97
_DECODER = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=32, rms_norm_eps=1e-5)

CASES = {
    "GPT2Model": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32)),
    "LlamaModel": ("LlamaConfig", dict(_DECODER, rope_theta=20000.0)),
    "MistralModel": ("MistralConfig", dict(_DECODER, sliding_window=5)),
    "Qwen2Model": ("Qwen2Config", dict(_DECODER, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "Qwen3Model": ("Qwen3Config", dict(_DECODER, head_dim=24)),
    "Phi3Model": ("Phi3Config", dict(_DECODER, partial_rotary_factor=0.5, pad_token_id=0)),
}


@pytest.mark.parametrize("architecture", CASES)
@torch.no_grad()
def test_a_base_model_gives_transformers_hidden_states_both_ways(architecture, parity, tmp_path):
    config_class, fields = CASES[architecture]
    theirs = parity.save(architecture, config_class, fields, tmp_path / "hf")
    ours = formerkit.from_hf(tmp_path / "hf")
    assert ours.config.head.kind == "none"
    inputs = parity.tokens(VOCAB, 16, batch=3)
    expected = theirs(**inputs).last_hidden_state
    parity.assert_logits(ours(inputs["input_ids"], attention_mask=inputs["attention_mask"]), expected, inputs,
                         "last_hidden_state")
    parity.assert_round_trip(ours, tmp_path / "back", inputs, expected, output=lambda out: out.last_hidden_state)
