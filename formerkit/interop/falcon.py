"""Falcon checkpoints (``falcon``: FalconForCausalLM, FalconModel) in and out."""

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
    lm_head_rules,
    pair,
    permuted,
)
from formerkit.interop.files import Fields
from formerkit.interop.rope import rope_base

__all__ = ["Falcon"]


class Falcon(Family):
    """Falcon (Almazrouei et al., 2023): LayerNorm, rotary positions, one fused query/key/value projection, biases on
    every projection or on none (``bias``), a tied LM head by default. Three block layouts:

    - Falcon-7B style (``multi_query``): one key/value head, attention and MLP in parallel from one LayerNorm
      (``parallel_attn``; sequential pre-norm without it);
    - without multi_query: a key and value per head, the fused rows laid out [heads, 3, head_dim];
    - Falcon-40B/180B style (``new_decoder_architecture``): ``num_kv_heads`` grouped-query heads, the fused rows laid
      out [num_kv_heads, queries per group + 2, head_dim], always parallel, with a LayerNorm per branch
      (``num_ln_in_parallel_attn`` 2, the default) or one shared (1).

    Falcon's ALiBi variant is refused: it adds slope * key position / sqrt(head_dim), computed in bfloat16, which
    formerkit's ALiBi (slope * distance, in float32) does not reproduce."""

    model_types = ("falcon",)
    writes_layout = ("decoder", "tokens", "rope")
    prefix = "transformer."
    buffers = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"FalconForCausalLM": "lm", "FalconModel": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        hf.expect("alibi", False, "Falcon's ALiBi adds slope * key position / sqrt(head_dim) in bfloat16, which "
                  "formerkit's ALiBi does not reproduce")
        width = hf.integer("hidden_size") if "hidden_size" in hf.data else hf.integer("n_embed")
        heads = hf.integer("num_attention_heads")
        if width % heads:
            hf.fail("num_attention_heads", f"a divisor of hidden_size ({width})", heads)
        kv_heads = hf.integer("num_kv_heads", None, nullable=True) or heads
        parallel = hf.flag("parallel_attn", True)
        norms = hf.integer("num_ln_in_parallel_attn", None, nullable=True)
        if hf.flag("new_decoder_architecture", False):
            # transformers builds the new architecture's block for parallel attention only.
            if not parallel:
                hf.fail("parallel_attn", "true with new_decoder_architecture", parallel)
            if heads % kv_heads:
                hf.fail("num_kv_heads", f"a divisor of num_attention_heads ({heads})", kv_heads)
            if norms not in (None, 1, 2):
                hf.fail("num_ln_in_parallel_attn", "1, 2 or null", norms)
            residual = "shared_norm" if norms == 1 else "separate_norms"
        else:
            if hf.flag("multi_query", True):
                kv_heads = 1
            elif kv_heads != heads:
                # Without multi_query the fused projection holds a key and a value per query head.
                hf.fail("num_kv_heads", f"null or num_attention_heads ({heads}) without multi_query or "
                        "new_decoder_architecture", kv_heads)
            if parallel and norms not in (None, 1):
                hf.fail("num_ln_in_parallel_attn", "1 or null (one shared LayerNorm) without "
                        "new_decoder_architecture", norms)
            residual = "shared_norm" if parallel else None
        bias = hf.flag("bias", False)
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", True)}
                if architecture == "FalconForCausalLM" else {"kind": "none"})
        return ModelConfig(
            arch="decoder", width=width, num_layers=hf.integer("num_hidden_layers"),
            max_seq_len=hf.integer("max_position_embeddings", 2048),
            dropout=hf.number("hidden_dropout", 0.0, nullable=True) or 0.0,
            init_std=hf.number("initializer_range", 0.02), parallel_residual=residual,
            attention={"num_heads": heads, "num_kv_heads": kv_heads if kv_heads != heads else None,
                       "qkv_bias": bias, "out_bias": bias,
                       "dropout": hf.number("attention_dropout", 0.0, nullable=True) or 0.0},
            feedforward={"activation": hf.choice("activation", ACTIVATIONS, "gelu", "the MLP's"),
                         "hidden_size": hf.integer("ffn_hidden_size", None, nullable=True) or 4 * width,
                         "bias": bias},
            norm={"kind": "layernorm", "placement": "pre", "eps": hf.number("layer_norm_epsilon", 1e-5)},
            position={"kind": "rope", "rope_base": rope_base(hf)},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "falcon")
        attention, base = config.attention, config.position.rope_base
        heads, kv_heads = attention.num_heads, attention.kv_heads
        # The new decoder architecture holds separate norms and grouped-query attention; the original one a shared
        # norm or sequential blocks, with one key/value head (multi_query) or one per query head.
        grouped = 1 < kv_heads < heads
        new = config.parallel_residual == "separate_norms" or (config.parallel_residual == "shared_norm" and grouped)
        return {
            **self.header(config, architecture, "falcon"),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "num_hidden_layers": config.num_layers, "num_attention_heads": heads,
            "new_decoder_architecture": new, "multi_query": not new and kv_heads == 1 < heads,
            "num_kv_heads": kv_heads if new else heads, "parallel_attn": config.parallel_residual is not None,
            "num_ln_in_parallel_attn": (2 if config.parallel_residual == "separate_norms" else 1) if new else None,
            "alibi": False, "bias": attention.qkv_bias, "ffn_hidden_size": config.feedforward_size,
            "activation": hf_name(ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "max_position_embeddings": config.max_seq_len, "layer_norm_epsilon": config.norm.eps,
            # transformers 4.x reads rope_theta, 5.x rope_parameters.
            "rope_theta": base, "rope_parameters": {"rope_type": "default", "rope_theta": base},
            "hidden_dropout": config.dropout, "attention_dropout": attention.dropout,
            "tie_word_embeddings": config.head.tie_embeddings,
        }

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        attention, head_dim = config.attention, config.head_dim
        heads, kv_heads, bias = attention.num_heads, attention.kv_heads, attention.qkv_bias
        # Every layout is [kv_heads, queries per group + 2, head_dim]: multi-query is one group of all query heads
        # (plain [q | k | v]), one key/value per head is groups of one ([heads, 3, head_dim]).
        order = grouped_qkv_order(kv_heads, heads // kv_heads, head_dim)
        rules = [Rule("stem.tokens.weight", (f"{base}word_embeddings.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}h.{i}"
            if config.parallel_residual == "separate_norms":
                rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.ln_attn")
                rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.ln_mlp")
            else:
                rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.input_layernorm")
                if config.parallel_residual is None:
                    rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.post_attention_layernorm")
            rules += permuted(f"{ours}.attention.qkv", [f"{theirs}.self_attention.query_key_value"],
                              ((heads + 2 * kv_heads) * head_dim,), order, bias=bias)
            rules += pair(f"{ours}.attention.out", f"{theirs}.self_attention.dense", bias=attention.out_bias)
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.mlp.dense_h_to_4h", bias=config.feedforward.bias)
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.dense_4h_to_h", bias=config.feedforward.bias)
        return rules + pair("decoder.final_norm", f"{base}ln_f") + lm_head_rules(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}word_embeddings.weight"} if config.head.tie_embeddings else {}
