"""GPT-2 checkpoints (``gpt2``: GPT2LMHeadModel, GPT2Model) in and out."""

from __future__ import annotations

import re
from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.engine import (
    ACTIVATION_NAMES,
    ACTIVATIONS,
    Family,
    Rule,
    feedforward_hidden_size,
    hf_name,
    lm_head_rules,
    pair,
)
from formerkit.interop.files import Fields

__all__ = ["GPT2"]


class GPT2(Family):
    """GPT-2 (Radford et al., 2019): learned positions, pre-norm LayerNorm, Conv1D projections with biases."""

    model_types = ("gpt2",)
    writes_layout = ("decoder", "tokens", "learned")
    prefix = "transformer."
    # The causal-mask table GPT-2 registers per layer ("attn.bias") and, in older files, "attn.masked_bias".
    buffers = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"GPT2LMHeadModel": "lm", "GPT2Model": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        hf.expect("scale_attn_weights", True, "formerkit always scales attention scores by 1/sqrt(head_dim)")
        hf.expect("scale_attn_by_inverse_layer_idx", False, "formerkit does not scale scores by the layer's depth")
        hf.expect("add_cross_attention", False, "a decoder-only model has no cross-attention")
        width = hf.integer("n_embd")
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", True)}
                if architecture == "GPT2LMHeadModel" else {"kind": "none"})
        # formerkit has one dropout rate for embeddings and residual branches: GPT-2's resid_pdrop.
        return ModelConfig(
            arch="decoder", width=width, num_layers=hf.integer("n_layer"), max_seq_len=hf.integer("n_positions"),
            dropout=hf.number("resid_pdrop", 0.1), init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": hf.integer("n_head"), "dropout": hf.number("attn_pdrop", 0.1)},
            feedforward={"activation": hf.choice("activation_function", ACTIVATIONS, "gelu_new", "the MLP's"),
                         "hidden_size": feedforward_hidden_size(hf.integer("n_inner", None, nullable=True), width)},
            norm={"kind": "layernorm", "placement": "pre", "eps": hf.number("layer_norm_epsilon", 1e-5)},
            position={"kind": "learned"},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "gpt2")
        return {
            **self.header(config, architecture, "gpt2"),
            "vocab_size": config.stem.vocab_size, "n_positions": config.max_seq_len, "n_embd": config.width,
            "n_layer": config.num_layers, "n_head": config.attention.num_heads, "n_inner": config.feedforward_size,
            "activation_function": hf_name(ACTIVATION_NAMES, config.feedforward.activation,
                                           "feedforward.activation", architecture),
            "layer_norm_epsilon": config.norm.eps, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.attention.dropout, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
            "tie_word_embeddings": config.head.tie_embeddings,
        }

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        rules = [Rule("stem.tokens.weight", (f"{base}wte.weight",)),
                 Rule("positions.weight", (f"{base}wpe.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}h.{i}"
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.ln_1")
            # c_attn's output columns are already [q | k | v].
            rules += pair(f"{ours}.attention.qkv", f"{theirs}.attn.c_attn", layout="transposed")
            rules += pair(f"{ours}.attention.out", f"{theirs}.attn.c_proj", layout="transposed")
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.ln_2")
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.mlp.c_fc", layout="transposed")
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.c_proj", layout="transposed")
        return rules + pair("decoder.final_norm", f"{base}ln_f") + lm_head_rules(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}wte.weight"} if config.head.tie_embeddings else {}
