"""LLaMA-family checkpoints in and out: LLaMA (``llama``), Mistral (``mistral``), Qwen2 (``qwen2``) and Qwen3
(``qwen3``), one family because they differ only in biases, sliding windows and Qwen3's query/key norms. RoPE scaling
(linear, dynamic, yarn, llama3: Llama 3.1 and 3.2) is read for all of them.
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
    stack,
    windowed_layers,
)
from formerkit.interop.files import Fields
from formerkit.interop.rope import rope_fields, rope_position

__all__ = ["Llama", "llama_layout_rules"]


# The class-name stem of each LLaMA-family model type, and its default number of key/value heads.
_LLAMA_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_LLAMA_KV_HEADS = {"llama": None, "mistral": 8, "qwen2": 32, "qwen3": 32}


class Llama(Family):
    """LLaMA (Touvron et al., 2023) and two relatives formerkit reproduces exactly: RMSNorm, RoPE, SwiGLU,
    grouped-query attention. Mistral adds a sliding window on every layer; Qwen2 adds query/key/value biases and
    sliding windows on chosen layers (``layer_types``, as transformers 5 applies them); Qwen3 (Qwen team, 2025) drops
    the biases (``attention_bias`` sets all four) and adds an RMSNorm over each head's queries and keys before RoPE
    (formerkit's ``attention.qk_norm``), with a head_dim of its own (128 by default)."""

    model_types = tuple(_LLAMA_CLASSES)
    writes_layout = ("decoder", "tokens", "rope")
    prefix = "model."
    buffers = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

    def architectures(self, model_type: str) -> dict[str, str]:
        name = _LLAMA_CLASSES[model_type]
        return {f"{name}ForCausalLM": "lm", f"{name}Model": "none"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        model_type = hf.model_type
        width, heads, layers = hf.integer("hidden_size"), hf.integer("num_attention_heads"), hf.integer(
            "num_hidden_layers")
        kv_heads = hf.integer("num_key_value_heads", _LLAMA_KV_HEADS[model_type], nullable=True) or heads
        head_dim = hf.integer("head_dim", 128 if model_type == "qwen3" else None, nullable=True) or width // heads
        position, max_seq_len = rope_position(hf, hf.integer("max_position_embeddings"))
        if "rotary_fraction" in position:  # these classes rotate every channel whatever the field says
            hf.fail("partial_rotary_factor", "1.0 (every channel rotated)", position["rotary_fraction"],
                    hint=f"{_LLAMA_CLASSES[model_type]} rotates every channel of a head")
        if model_type in ("llama", "qwen3"):
            qkv_bias = out_bias = hf.flag("attention_bias", False)
            mlp_bias = hf.flag("mlp_bias", False) if model_type == "llama" else False
        else:  # Qwen2 has biases on q, k and v only; Mistral has none.
            qkv_bias, out_bias, mlp_bias = model_type == "qwen2", False, False
        window, windowed = self._sliding_window(hf, layers, max_seq_len)
        head = ({"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", False)}
                if architecture.endswith("ForCausalLM") else {"kind": "none"})
        return ModelConfig(
            arch="decoder", width=width, num_layers=layers, max_seq_len=max_seq_len,
            init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": heads, "num_kv_heads": kv_heads if kv_heads != heads else None,
                       "head_dim": head_dim if head_dim != width // heads else None, "qkv_bias": qkv_bias,
                       "out_bias": out_bias, "qk_norm": model_type == "qwen3",
                       "dropout": hf.number("attention_dropout", 0.0),
                       "sliding_window": window, "sliding_window_layers": windowed},
            feedforward={"activation": hf.choice("hidden_act", GATED_ACTIVATIONS, "silu",
                                                 "the activation of the MLP's gate"),
                         "hidden_size": hf.integer("intermediate_size"), "bias": mlp_bias},
            norm={"kind": "rmsnorm", "placement": "pre", "eps": hf.number("rms_norm_eps", 1e-6)},
            position=position,
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    @staticmethod
    def _sliding_window(hf: Fields, layers: int, max_seq_len: int) -> tuple[int | None, tuple[int, ...] | None]:
        """formerkit's (sliding_window, sliding_window_layers). A window longer than max_seq_len never limits
        anything, so it is dropped (formerkit's config refuses such a window)."""
        model_type = hf.model_type
        if model_type == "mistral":
            window = hf.integer("sliding_window", 4096, nullable=True)
            windowed = list(range(layers))
        elif model_type in ("qwen2", "qwen3"):
            window = hf.integer("sliding_window", 4096, nullable=True) if hf.flag("use_sliding_window", False) else None
            kinds = hf.value("layer_types", None)
            if kinds is None:  # transformers 4.x: the layers from max_window_layers on slide
                first = hf.integer("max_window_layers", 28, minimum=0)
                windowed = [index for index in range(layers) if index >= first]
            elif (not isinstance(kinds, list) or len(kinds) != layers
                  or any(kind not in ("full_attention", "sliding_attention") for kind in kinds)):
                hf.fail("layer_types", f"a list of {layers} values 'full_attention' or 'sliding_attention'", kinds)
            else:
                windowed = [index for index, kind in enumerate(kinds) if kind == "sliding_attention"]
        else:
            return None, None
        if window is None or window > max_seq_len or not windowed:
            return None, None
        return window, None if len(windowed) == layers else tuple(windowed)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        attention = config.attention
        windowed = windowed_layers(config)
        # The one family member that holds this model: Qwen3 for query/key norms, Qwen2 for q/k/v-only biases or
        # per-layer windows, Mistral for windows on every layer, LLaMA otherwise. Whatever the choice cannot hold, the
        # round-trip check names.
        if attention.qk_norm:
            model_type = "qwen3"
        elif (attention.qkv_bias and not attention.out_bias) or 0 < len(windowed) < config.num_layers:
            model_type = "qwen2"
        else:
            model_type = "mistral" if windowed else "llama"
        architecture = self.architecture_for(config, model_type)
        data = {
            **self.header(config, architecture, model_type),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "intermediate_size": config.feedforward_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": attention.num_heads, "num_key_value_heads": attention.kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": hf_name(GATED_ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "rms_norm_eps": config.norm.eps, **rope_fields(config),
            "attention_dropout": attention.dropout, "tie_word_embeddings": config.head.tie_embeddings,
        }
        if model_type == "llama":
            data.update(attention_bias=attention.qkv_bias, mlp_bias=config.feedforward.bias)
        elif model_type == "qwen3":
            data.update(attention_bias=attention.qkv_bias)
        elif model_type == "mistral":
            data.update(sliding_window=attention.sliding_window)
        if model_type in ("qwen2", "qwen3"):
            data.update(use_sliding_window=bool(windowed), sliding_window=attention.sliding_window,
                        max_window_layers=windowed[0] if windowed else config.num_layers,
                        layer_types=["sliding_attention" if index in windowed else "full_attention"
                                     for index in range(config.num_layers)])
        return data

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        return llama_layout_rules(config, base)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}embed_tokens.weight"} if config.head.tie_embeddings else {}


def llama_layout_rules(config: ModelConfig, base: str) -> list[Rule]:
    """The weight rules of LLaMA's module layout, which Mistral, Qwen2/3 and Gemma share: ``input_layernorm``,
    ``self_attn.{q,k,v,o}_proj`` (with Qwen3's and Gemma 3's ``q_norm``/``k_norm``), ``mlp.{gate,up,down}_proj``.
    With sandwich norms (Gemma 2 and 3) ``post_attention_layernorm`` normalizes the attention's output and the
    feed-forward has a pre and a post norm of its own; otherwise ``post_attention_layernorm`` is the feed-forward's
    input norm."""
    attention, hidden = config.attention, config.feedforward_size
    q_rows, kv_rows = attention.num_heads * config.head_dim, attention.kv_heads * config.head_dim
    rules = [Rule("stem.tokens.weight", (f"{base}embed_tokens.weight",))]
    for i in range(config.num_layers):
        ours, theirs = f"decoder.blocks.{i}", f"{base}layers.{i}"
        rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.input_layernorm", bias=False)
        rules += stack(f"{ours}.attention.qkv", [f"{theirs}.self_attn.{p}_proj" for p in "qkv"],
                       (q_rows, kv_rows, kv_rows), bias=attention.qkv_bias)
        rules += pair(f"{ours}.attention.out", f"{theirs}.self_attn.o_proj", bias=attention.out_bias)
        if attention.qk_norm:
            rules += pair(f"{ours}.attention.q_norm", f"{theirs}.self_attn.q_norm", bias=False)
            rules += pair(f"{ours}.attention.k_norm", f"{theirs}.self_attn.k_norm", bias=False)
        if config.norm.placement == "sandwich":
            rules += pair(f"{ours}.attention_residual.norm_out", f"{theirs}.post_attention_layernorm", bias=False)
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.pre_feedforward_layernorm", bias=False)
            rules += pair(f"{ours}.feedforward_residual.norm_out", f"{theirs}.post_feedforward_layernorm", bias=False)
        else:
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.post_attention_layernorm", bias=False)
        rules += stack(f"{ours}.feedforward.fc_in", [f"{theirs}.mlp.gate_proj", f"{theirs}.mlp.up_proj"],
                       (hidden, hidden), bias=config.feedforward.bias)
        rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.down_proj", bias=config.feedforward.bias)
    return rules + pair("decoder.final_norm", f"{base}norm", bias=False) + lm_head_rules(config)
