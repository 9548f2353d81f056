"""OPT checkpoints (``opt``: OPTForCausalLM, OPTModel) in and out.

OPT (Zhang et al., 2022) is a decoder with learned positions, ReLU MLPs, biases throughout (``enable_bias``) and
LayerNorm before each sub-layer (``do_layer_norm_before``; OPT-350m puts it after). Its position table has 2 rows in
front of position 0: transformers numbers a token cumsum(attention_mask) - 1 and reads row number + 2, so a real
token reads row 2 + (its count among real tokens), exactly formerkit's count; padding reads row 1. formerkit's table
is the file's without those 2 rows, which are written back as zeros (only padding reads them). The LM head is tied to
the token embedding unless tie_word_embeddings says otherwise.

Refused by field: ``word_embed_proj_dim`` other than hidden_size (OPT-350m's project_in/project_out, a narrower
embedding than the layers), ``layer_norm_elementwise_affine: false`` (LayerNorm without weight and bias) and
``layerdrop`` (skipping whole layers while training).
"""

from __future__ import annotations

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
    stack,
)
from formerkit.interop.files import Fields

__all__ = ["OPT"]

# The rows of OPT's position table in front of position 0 (OPTLearnedPositionalEmbedding's offset).
POSITION_OFFSET = 2
# OPT's LayerNorms use torch's default eps; its config has no field for it.
NORM_EPS = 1e-5


class OPT(Family):
    """OPT: a decoder with learned positions offset by 2, pre- or post-norm LayerNorm, biases or none."""

    model_types = ("opt",)
    writes_layout = ("decoder", "tokens", "learned")
    prefix = "model."

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"OPTForCausalLM": "lm", "OPTModel": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width = hf.integer("hidden_size")
        if hf.value("word_embed_proj_dim", None) not in (None, width):
            hf.fail("word_embed_proj_dim", f"null or hidden_size ({width})", hf.value("word_embed_proj_dim"),
                    hint="a narrower embedding projected in and out (project_in, project_out, OPT-350m) has no "
                         "formerkit equivalent")
        hf.expect("layer_norm_elementwise_affine", True, "formerkit's LayerNorms always learn a weight and bias")
        if hf.number("layerdrop", 0.0) != 0.0:
            hf.fail("layerdrop", "0.0", hf.value("layerdrop"),
                    hint="formerkit has no LayerDrop (skipping whole layers while training)")
        pre = hf.flag("do_layer_norm_before", True)
        # A final LayerNorm follows the last layer only with pre-norm, unless the file's config removed it.
        final = pre and not hf.flag("_remove_final_layer_norm", False)
        bias = hf.flag("enable_bias", True)
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", True)}
                if architecture == "OPTForCausalLM" else {"kind": "none"})
        return ModelConfig(
            arch="decoder", width=width, num_layers=hf.integer("num_hidden_layers"),
            max_seq_len=hf.integer("max_position_embeddings", 2048), dropout=hf.number("dropout", 0.1),
            init_std=hf.number("init_std", 0.02),
            attention={"num_heads": hf.integer("num_attention_heads"), "qkv_bias": bias, "out_bias": bias,
                       "dropout": hf.number("attention_dropout", 0.0)},
            feedforward={"activation": hf.choice("activation_function", ACTIVATIONS, "relu", "the MLP's"),
                         "hidden_size": feedforward_hidden_size(hf.integer("ffn_dim"), width), "bias": bias},
            norm={"kind": "layernorm", "placement": "pre" if pre else "post", "eps": NORM_EPS, "final": final},
            position={"kind": "learned"},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "opt")
        pre = config.norm.placement == "pre"
        return {
            **self.header(config, architecture, "opt"),
            "init_std": config.init_std, "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "word_embed_proj_dim": config.width, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.attention.num_heads, "ffn_dim": config.feedforward_size,
            "max_position_embeddings": config.max_seq_len,
            "activation_function": hf_name(ACTIVATION_NAMES, config.feedforward.activation,
                                           "feedforward.activation", architecture),
            "do_layer_norm_before": pre, "_remove_final_layer_norm": pre and not config.norm.has_final,
            "enable_bias": config.attention.qkv_bias, "layer_norm_elementwise_affine": True,
            "dropout": config.dropout, "attention_dropout": config.attention.dropout, "layerdrop": 0.0,
            "tie_word_embeddings": config.head.tie_embeddings,
        }

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        decoder, rows = f"{base}decoder", config.attention.num_heads * config.head_dim
        bias = config.attention.qkv_bias
        rules = [Rule("stem.tokens.weight", (f"{decoder}.embed_tokens.weight",)),
                 Rule("positions.weight", (f"{decoder}.embed_positions.weight",), "offset", (POSITION_OFFSET,))]
        for i in range(config.num_layers):
            # self_attn_layer_norm is the attention's norm, final_layer_norm the MLP's (before or after, by placement).
            ours, theirs = f"decoder.blocks.{i}", f"{decoder}.layers.{i}"
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.self_attn_layer_norm")
            rules += stack(f"{ours}.attention.qkv", [f"{theirs}.self_attn.{p}_proj" for p in "qkv"],
                           (rows, rows, rows), bias=bias)
            rules += pair(f"{ours}.attention.out", f"{theirs}.self_attn.out_proj", bias=config.attention.out_bias)
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.final_layer_norm")
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.fc1", bias=config.feedforward.bias)
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.fc2", bias=config.feedforward.bias)
        if config.norm.has_final:
            rules += pair("decoder.final_norm", f"{decoder}.final_layer_norm")
        return rules + lm_head_rules(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}decoder.embed_tokens.weight"} if config.head.tie_embeddings else {}
