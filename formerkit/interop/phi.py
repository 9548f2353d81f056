"""Phi checkpoints (``phi``: PhiForCausalLM, PhiModel; Phi-1, Phi-1.5 and Phi-2) in and out."""

from __future__ import annotations

import re
from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.engine import ACTIVATION_NAMES, ACTIVATIONS, Family, Rule, hf_name, lm_head_rules, pair, stack
from formerkit.interop.files import Fields
from formerkit.interop.rope import rope_base, rotary_fraction

__all__ = ["Phi"]


class Phi(Family):
    """Phi (Gunasekar et al., 2023; Li et al., 2023): attention and MLP in parallel from one LayerNorm (GPT-J's
    block), partial rotary positions (``partial_rotary_factor``, 1/2 by default), biases on every projection and on
    the LM head, optionally a LayerNorm over each head's queries and keys (``qk_layernorm``: formerkit's
    attention.qk_norm with LayerNorm) and grouped-query attention."""

    model_types = ("phi",)
    writes_layout = ("decoder", "tokens", "rope")
    prefix = "model."
    buffers = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"PhiForCausalLM": "lm", "PhiModel": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width, heads = hf.integer("hidden_size"), hf.integer("num_attention_heads")
        kv_heads = hf.integer("num_key_value_heads", None, nullable=True) or heads
        head_dim = hf.integer("head_dim", None, nullable=True) or width // heads
        qk_norm = hf.flag("qk_layernorm", False)
        if qk_norm and head_dim != width // heads:
            # Phi sizes its query/key LayerNorms hidden_size / num_attention_heads whatever the head width.
            hf.fail("head_dim", f"hidden_size / num_attention_heads ({width // heads}) with qk_layernorm", head_dim)
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", False), "bias": True}
                if architecture == "PhiForCausalLM" else {"kind": "none"})
        # One dropout rate for embeddings and residual branches: Phi's resid_pdrop (as for GPT-2).
        return ModelConfig(
            arch="decoder", width=width, num_layers=hf.integer("num_hidden_layers"),
            max_seq_len=hf.integer("max_position_embeddings"), dropout=hf.number("resid_pdrop", 0.0),
            init_std=hf.number("initializer_range", 0.02), parallel_residual="shared_norm",
            attention={"num_heads": heads, "num_kv_heads": kv_heads if kv_heads != heads else None,
                       "head_dim": head_dim if head_dim != width // heads else None, "qkv_bias": True,
                       "out_bias": True, "qk_norm": qk_norm,
                       "dropout": hf.number("attention_dropout", 0.0, nullable=True) or 0.0},
            feedforward={"activation": hf.choice("hidden_act", ACTIVATIONS, "gelu_new", "the MLP's"),
                         "hidden_size": hf.integer("intermediate_size"), "bias": True},
            norm={"kind": "layernorm", "placement": "pre", "eps": hf.number("layer_norm_eps", 1e-5)},
            position={"kind": "rope", "rope_base": rope_base(hf, partial=True),
                      "rotary_fraction": rotary_fraction(hf, "partial_rotary_factor", 0.5)},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "phi")
        attention, base, fraction = config.attention, config.position.rope_base, config.position.rotary_fraction
        return {
            **self.header(config, architecture, "phi"),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "intermediate_size": config.feedforward_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": attention.num_heads, "num_key_value_heads": attention.kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": hf_name(ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "max_position_embeddings": config.max_seq_len, "layer_norm_eps": config.norm.eps,
            # transformers 4.x reads rope_theta and partial_rotary_factor, 5.x rope_parameters.
            "rope_theta": base, "partial_rotary_factor": fraction,
            "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": fraction},
            "qk_layernorm": attention.qk_norm, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attention_dropout": attention.dropout, "tie_word_embeddings": config.head.tie_embeddings,
        }

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        attention = config.attention
        q_rows, kv_rows = attention.num_heads * config.head_dim, attention.kv_heads * config.head_dim
        rules = [Rule("stem.tokens.weight", (f"{base}embed_tokens.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}layers.{i}"
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.input_layernorm")
            rules += stack(f"{ours}.attention.qkv", [f"{theirs}.self_attn.{p}_proj" for p in "qkv"],
                           (q_rows, kv_rows, kv_rows), bias=True)
            rules += pair(f"{ours}.attention.out", f"{theirs}.self_attn.dense")
            if attention.qk_norm:
                rules += pair(f"{ours}.attention.q_norm", f"{theirs}.self_attn.q_layernorm")
                rules += pair(f"{ours}.attention.k_norm", f"{theirs}.self_attn.k_layernorm")
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.mlp.fc1")
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.fc2")
        return rules + pair("decoder.final_norm", f"{base}final_layernorm") + lm_head_rules(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}embed_tokens.weight"} if config.head.tie_embeddings else {}
