"""Phi-3 checkpoints in and out (``phi3``: Phi3ForCausalLM, Phi3Model).

Phi-3 (Abdin et al., 2024, "Phi-3 Technical Report") is a LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query
attention, no biases) whose checkpoints fuse the query, key and value projections into one ``qkv_proj`` stacked
[q | k | v] and the MLP's gate and up projections into one ``gate_up_proj`` stacked [gate | up]: formerkit's own
``qkv`` and ``fc_in`` layouts, so the tensors are copied as they are. It may rotate only the first
``partial_rotary_factor`` of each head's channels, limit every layer to a ``sliding_window``, and extend its context
with LongRoPE (Phi-3 128k: ``rope_scaling`` with short and long factors per channel pair).
"""

from __future__ import annotations

import re
from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.engine import (
    GATED_ACTIVATION_NAMES,
    GATED_ACTIVATIONS,
    Family,
    Rule,
    hf_name,
    lm_head_rules,
    pair,
    windowed_layers,
)
from formerkit.interop.files import Fields
from formerkit.interop.rope import rope_fields, rope_position

__all__ = ["Phi3"]


class Phi3(Family):
    model_types = ("phi3",)
    writes_layout = ("decoder", "tokens", "rope")
    prefix = "model."
    buffers = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"Phi3ForCausalLM": "lm", "Phi3Model": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width, heads, layers = hf.integer("hidden_size"), hf.integer("num_attention_heads"), hf.integer(
            "num_hidden_layers")
        kv_heads = hf.integer("num_key_value_heads", None, nullable=True) or heads
        head_dim = hf.integer("head_dim", None, nullable=True) or width // heads
        # Phi-3's config class reads plain RoPE and LongRoPE only (its "su" and "yarn" are LongRoPE, Phi-3 128k), and
        # the original length from its own top-level field (default 4096) whatever the scaling dict says.
        position, max_seq_len = rope_position(hf, hf.integer("max_position_embeddings", 4096),
                                              kinds=("default", "longrope"),
                                              aliases={"su": "longrope", "yarn": "longrope"}, original_default=4096)
        window = hf.integer("sliding_window", None, nullable=True)
        if window is not None and window > max_seq_len:  # a window longer than any input limits nothing
            window = None
        # formerkit has one dropout rate for embeddings and residual branches.
        residual, embedding = hf.number("resid_pdrop", 0.0), hf.number("embd_pdrop", 0.0)
        if residual != embedding:
            hf.fail("embd_pdrop", f"resid_pdrop's value ({residual})", embedding,
                    hint="formerkit uses one dropout rate for embeddings and residual branches")
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", False)}
                if architecture.endswith("ForCausalLM") else {"kind": "none"})
        return ModelConfig(
            arch="decoder", width=width, num_layers=layers, max_seq_len=max_seq_len, dropout=residual,
            init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": heads, "num_kv_heads": kv_heads if kv_heads != heads else None,
                       "head_dim": head_dim if head_dim != width // heads else None, "qkv_bias": False,
                       "out_bias": False, "dropout": hf.number("attention_dropout", 0.0), "sliding_window": window},
            feedforward={"activation": hf.choice("hidden_act", GATED_ACTIVATIONS, "silu",
                                                 "the activation of the MLP's gate"),
                         "hidden_size": hf.integer("intermediate_size", 8192), "bias": False},
            norm={"kind": "rmsnorm", "placement": "pre", "eps": hf.number("rms_norm_eps", 1e-5)},
            position=position,
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size", 32064)},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        attention = config.attention
        architecture = self.architecture_for(config, "phi3")
        windowed = windowed_layers(config)
        data = {
            **self.header(config, architecture, "phi3"),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "intermediate_size": config.feedforward_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": attention.num_heads, "num_key_value_heads": attention.kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": hf_name(GATED_ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "rms_norm_eps": config.norm.eps, **rope_fields(config),
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attention_dropout": attention.dropout,
            # Phi-3 windows every layer or none; the round-trip check names a model windowing only some.
            "sliding_window": attention.sliding_window if windowed else None,
            "tie_word_embeddings": config.head.tie_embeddings,
        }
        return data

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        rules = [Rule("stem.tokens.weight", (f"{base}embed_tokens.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}layers.{i}"
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.input_layernorm", bias=False)
            rules += pair(f"{ours}.attention.qkv", f"{theirs}.self_attn.qkv_proj", bias=False)
            rules += pair(f"{ours}.attention.out", f"{theirs}.self_attn.o_proj", bias=False)
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.post_attention_layernorm", bias=False)
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.mlp.gate_up_proj", bias=False)
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.down_proj", bias=False)
        return rules + pair("decoder.final_norm", f"{base}norm", bias=False) + lm_head_rules(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}embed_tokens.weight"} if config.head.tie_embeddings else {}
