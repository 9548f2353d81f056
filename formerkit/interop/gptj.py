"""GPT-J checkpoints (``gptj``: GPTJForCausalLM, GPTJModel) in and out."""

from __future__ import annotations

import math
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
    interleaved_rotary_order,
    lm_head_rules,
    pair,
    permuted,
)
from formerkit.interop.files import Fields

__all__ = ["GPTJ"]

# GPT-J's rotary base is not a config field: 10,000, as in RoFormer.
_GPTJ_ROPE_BASE = 10000.0


def fraction_for(rotary_dim: int, head_dim: int) -> float:
    """The rotary_fraction whose int(head_dim * fraction) is ``rotary_dim``: rotary_dim / head_dim, or the next float
    up when rounding makes the product fall just short (30 / 44 * 44 is 29.999...)."""
    fraction = rotary_dim / head_dim
    return fraction if int(head_dim * fraction) == rotary_dim else math.nextafter(fraction, 1.0)


class GPTJ(Family):
    """GPT-J (Wang and Komatsuzaki, 2021): attention and MLP in parallel from one LayerNorm, rotary positions on the
    first ``rotary_dim`` channels of each head with RoFormer's interleaved pairs (2i, 2i + 1), no attention biases,
    an MLP and an LM head with biases.

    formerkit rotates the half-split pairs (i, i + rotary_dim/2) instead; the two are the same rotation after a fixed
    permutation of each head's query and key channels, which the weight rules apply to q_proj's and k_proj's rows
    (``interleaved_rotary_order``), so the converted model computes the same attention scores."""

    model_types = ("gptj",)
    writes_layout = ("decoder", "tokens", "rope")
    prefix = "transformer."
    buffers = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"GPTJForCausalLM": "lm", "GPTJModel": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width, heads = hf.integer("n_embd"), hf.integer("n_head")
        if width % heads:
            hf.fail("n_head", f"a divisor of n_embd ({width})", heads)
        head_dim = width // heads
        # Without rotary_dim GPT-J builds its table over all n_embd channels, which fits a head only when there is one.
        rotary_dim = hf.integer("rotary_dim", 64, nullable=True) or width
        if rotary_dim > head_dim or rotary_dim % 2:
            hf.fail("rotary_dim", f"an even number of channels <= the head width n_embd / n_head ({head_dim})",
                    hf.value("rotary_dim", 64))
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", False), "bias": True}
                if architecture == "GPTJForCausalLM" else {"kind": "none"})
        # One dropout rate for embeddings and residual branches: GPT-J's resid_pdrop (as for GPT-2).
        return ModelConfig(
            arch="decoder", width=width, num_layers=hf.integer("n_layer"), max_seq_len=hf.integer("n_positions"),
            dropout=hf.number("resid_pdrop", 0.0), init_std=hf.number("initializer_range", 0.02),
            parallel_residual="shared_norm",
            attention={"num_heads": heads, "qkv_bias": False, "out_bias": False,
                       "dropout": hf.number("attn_pdrop", 0.0)},
            feedforward={"activation": hf.choice("activation_function", ACTIVATIONS, "gelu_new", "the MLP's"),
                         "hidden_size": feedforward_hidden_size(hf.integer("n_inner", None, nullable=True), width),
                         "bias": True},
            norm={"kind": "layernorm", "placement": "pre", "eps": hf.number("layer_norm_epsilon", 1e-5)},
            position={"kind": "rope", "rope_base": _GPTJ_ROPE_BASE,
                      "rotary_fraction": fraction_for(rotary_dim, head_dim)},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "gptj")
        return {
            **self.header(config, architecture, "gptj"),
            "vocab_size": config.stem.vocab_size, "n_positions": config.max_seq_len, "n_embd": config.width,
            "n_layer": config.num_layers, "n_head": config.attention.num_heads, "n_inner": config.feedforward_size,
            "rotary_dim": config.rotary_dim,
            "activation_function": hf_name(ACTIVATION_NAMES, config.feedforward.activation,
                                           "feedforward.activation", architecture),
            "layer_norm_epsilon": config.norm.eps, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.attention.dropout, "tie_word_embeddings": config.head.tie_embeddings,
        }

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        heads, head_dim = config.attention.num_heads, config.head_dim
        rows = heads * head_dim
        rotary = interleaved_rotary_order(heads, head_dim, config.rotary_dim)
        # q_proj and k_proj permuted per head (rotary pairs), v_proj as it is.
        order = rotary + [rows + row for row in rotary] + list(range(2 * rows, 3 * rows))
        rules = [Rule("stem.tokens.weight", (f"{base}wte.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}h.{i}"
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.ln_1")
            rules += permuted(f"{ours}.attention.qkv", [f"{theirs}.attn.{p}_proj" for p in "qkv"], (rows,) * 3,
                              order, bias=False)
            rules += pair(f"{ours}.attention.out", f"{theirs}.attn.out_proj", bias=False)
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.mlp.fc_in")
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.fc_out")
        return rules + pair("decoder.final_norm", f"{base}ln_f") + lm_head_rules(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}wte.weight"} if config.head.tie_embeddings else {}
