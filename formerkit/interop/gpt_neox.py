"""GPT-NeoX checkpoints (``gpt_neox``: GPTNeoXForCausalLM, GPTNeoXModel) in and out; the Pythia suite is GPT-NeoX."""

from __future__ import annotations

import re
from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.engine import (
    ACTIVATION_NAMES,
    ACTIVATIONS,
    Family,
    Rule,
    grouped_qkv_order,
    hf_name,
    pair,
    permuted,
)
from formerkit.interop.files import Fields
from formerkit.interop.rope import rope_base, rotary_fraction

__all__ = ["GPTNeoX"]


class GPTNeoX(Family):
    """GPT-NeoX (Black et al., 2022): LayerNorm, partial rotary positions (``rotary_pct`` of each head, 1/4 by
    default), attention and MLP in parallel with a norm each (``use_parallel_residual``; sequential pre-norm without
    it), one fused query/key/value projection laid out per head, an untied output embedding by default."""

    model_types = ("gpt_neox",)
    writes_layout = ("decoder", "tokens", "rope")
    prefix = "gpt_neox."
    # Older files store each layer's causal-mask tables and rotary frequencies.
    buffers = re.compile(r"(^|\.)attention\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"GPTNeoXForCausalLM": "lm", "GPTNeoXModel": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width, heads = hf.integer("hidden_size"), hf.integer("num_attention_heads")
        bias = hf.flag("attention_bias", True)
        base = rope_base(hf, partial=True)
        if "rope_parameters" not in hf.data and "rotary_emb_base" in hf.data:  # transformers 4.x's name
            base = hf.number("rotary_emb_base")
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", False)}
                if architecture == "GPTNeoXForCausalLM" else {"kind": "none"})
        # One dropout rate for embeddings and residual branches: GPT-NeoX's hidden_dropout is both.
        return ModelConfig(
            arch="decoder", width=width, num_layers=hf.integer("num_hidden_layers"),
            max_seq_len=hf.integer("max_position_embeddings"), dropout=hf.number("hidden_dropout", 0.0),
            init_std=hf.number("initializer_range", 0.02),
            parallel_residual="separate_norms" if hf.flag("use_parallel_residual", True) else None,
            attention={"num_heads": heads, "qkv_bias": bias, "out_bias": bias,
                       "dropout": hf.number("attention_dropout", 0.0)},
            feedforward={"activation": hf.choice("hidden_act", ACTIVATIONS, "gelu", "the MLP's"),
                         "hidden_size": hf.integer("intermediate_size"), "bias": True},
            norm={"kind": "layernorm", "placement": "pre", "eps": hf.number("layer_norm_eps", 1e-5)},
            position={"kind": "rope", "rope_base": base,
                      "rotary_fraction": rotary_fraction(hf, "rotary_pct", 0.25)},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "gpt_neox")
        attention, base, fraction = config.attention, config.position.rope_base, config.position.rotary_fraction
        return {
            **self.header(config, architecture, "gpt_neox"),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "num_hidden_layers": config.num_layers, "num_attention_heads": attention.num_heads,
            "intermediate_size": config.feedforward_size,
            "hidden_act": hf_name(ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "max_position_embeddings": config.max_seq_len, "layer_norm_eps": config.norm.eps,
            # transformers 4.x reads rotary_pct and rotary_emb_base, 5.x rope_parameters.
            "rotary_pct": fraction, "rotary_emb_base": base,
            "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": fraction},
            "use_parallel_residual": config.parallel_residual == "separate_norms",
            "attention_bias": attention.qkv_bias, "attention_dropout": attention.dropout,
            "hidden_dropout": config.dropout, "tie_word_embeddings": config.head.tie_embeddings,
        }

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        heads, head_dim, bias = config.attention.num_heads, config.head_dim, config.attention.qkv_bias
        # query_key_value's rows are [heads, 3, head_dim]: each head's query, key and value together.
        order = grouped_qkv_order(heads, 1, head_dim)
        rules = [Rule("stem.tokens.weight", (f"{base}embed_in.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}layers.{i}"
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.input_layernorm")
            rules += permuted(f"{ours}.attention.qkv", [f"{theirs}.attention.query_key_value"],
                              (3 * heads * head_dim,), order, bias=bias)
            rules += pair(f"{ours}.attention.out", f"{theirs}.attention.dense", bias=config.attention.out_bias)
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.post_attention_layernorm")
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.mlp.dense_h_to_4h")
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.dense_4h_to_h")
        rules += pair("decoder.final_norm", f"{base}final_layer_norm")
        if config.head.kind == "lm" and not config.head.tie_embeddings:
            # transformers 5 calls the output embedding lm_head inside the model but saves it as embed_out, the name
            # in every GPT-NeoX and Pythia file.
            rules.append(Rule("head.projection.weight", ("embed_out.weight",)))
        return rules

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        if not config.head.tie_embeddings:
            return {}
        return {"embed_out.weight": f"{base}embed_in.weight"}
