"""Gemma-family checkpoints in and out: Gemma (``gemma``), Gemma 2 (``gemma2``) and Gemma 3's text model
(``gemma3_text``), one family because each generation adds parts to the last.

What Gemma adds to a LLaMA-style decoder, each a part of formerkit's core named in the config: RMSNorm scales stored as
offsets from 1 (norm.weight_offset), token embeddings times sqrt(width) (stem.scale_embeddings), GeGLU with tanh GELU
(feedforward.activation geglu_tanh) and a head tied to the embedding. Gemma 2 adds a norm after each sub-layer as well
as before (norm.placement sandwich), soft-capped attention scores and logits (attention.softcap,
head.logit_softcap), the score scale query_pre_attn_scalar^-1/2 (attention.scale) and sliding windows on every other
layer. Gemma 3 adds QK-norm and a RoPE base of their own for the window layers (position.rope_local_base), and in
its larger models a linear scaling of the global layers' RoPE (position.rope_scaling).
"""

from __future__ import annotations

import math
import re
from typing import Any

from formerkit.config import ModelConfig
from formerkit.errors import InteropError
from formerkit.interop.engine import Family, Rule, hf_name, windowed_layers
from formerkit.interop.files import Fields
from formerkit.interop.llama import llama_layout_rules
from formerkit.interop.rope import rope_base

__all__ = ["Gemma"]

_CLASSES = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
# Class defaults of the fields whose defaults differ between the generations.
_KV_HEADS = {"gemma": 16, "gemma2": 4, "gemma3_text": 4}
_MAX_POSITIONS = {"gemma": 8192, "gemma2": 8192, "gemma3_text": 131072}
_FINAL_SOFTCAP = {"gemma2": 30.0, "gemma3_text": None}
_ATTENTION_SOFTCAP = {"gemma2": 50.0, "gemma3_text": None}
# Gemma reads its MLP's activation from hidden_act, and reads a legacy "gelu" there as the tanh approximation;
# Gemma 2 and 3 read hidden_activation, where "gelu" is the exact GELU. The MLP is act(gate) * up.
_GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu_tanh", "silu": "swiglu"}
_LATER_ACTIVATIONS = {"gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu", "silu": "swiglu"}
_GEMMA_ACTIVATION_NAMES = {"geglu_tanh": "gelu_pytorch_tanh", "swiglu": "silu"}
_LATER_ACTIVATION_NAMES = {"geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu", "swiglu": "silu"}
_LAYER_TYPES = ("full_attention", "sliding_attention")
_PLAIN_ROPE = ("formerkit reads Gemma with plain RoPE, but for Gemma 3's linear scaling of its global layers; another "
               "scaled variant changes the rotation angles")


class Gemma(Family):
    """Gemma (Gemma Team, 2024), Gemma 2 (2024) and Gemma 3 (2025, the text model). The multimodal Gemma 3
    (``gemma3``, Gemma3ForConditionalGeneration) is refused with a pointer to its text model."""

    model_types = (*_CLASSES, "gemma3")
    prefix = "model."
    # RoPE frequencies; Gemma 3's embedding scale.
    buffers = re.compile(r"(^|\.)(rotary_emb\.\w*inv_freq|embed_tokens\.embed_scale)$")

    def architectures(self, model_type: str) -> dict[str, str]:
        name = _CLASSES.get(model_type)
        if name is None:
            return {}
        base = "Gemma3TextModel" if model_type == "gemma3_text" else f"{name}Model"
        return {f"{name}ForCausalLM": "lm", base: "none"}

    def architecture_of(self, hf: Fields) -> str:
        if hf.model_type == "gemma3":
            hf.refuse("model_type", "'gemma3_text' (Gemma3ForCausalLM or Gemma3TextModel)",
                      hint="a multimodal Gemma 3 (Gemma3ForConditionalGeneration, with a vision tower); formerkit "
                           "reads Gemma 3's text model: save its language model on its own, as a Gemma3ForCausalLM")
        return super().architecture_of(hf)

    def writes(self, config: ModelConfig) -> bool:
        # The Gemma-only parts make the candidate; the round-trip check then names whatever else does not fit.
        return (config.arch == "decoder" and config.stem.kind == "tokens" and config.position.kind == "rope"
                and (config.norm.weight_offset != 0.0 or config.stem.scale_embeddings))

    # ----- reading -----

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        model_type = hf.model_type
        later = model_type != "gemma"
        width, heads, layers = (hf.integer("hidden_size"), hf.integer("num_attention_heads"),
                                hf.integer("num_hidden_layers"))
        kv_heads = hf.integer("num_key_value_heads", _KV_HEADS[model_type])
        head_dim = hf.integer("head_dim", 256)
        max_seq_len = hf.integer("max_position_embeddings", _MAX_POSITIONS[model_type])
        bias = hf.flag("attention_bias", False)
        if hf.value("use_bidirectional_attention", None):
            hf.fail("use_bidirectional_attention", "null or false (a causal decoder)",
                    hf.value("use_bidirectional_attention"),
                    hint="the bidirectional variant is an encoder (EmbeddingGemma), which this family does not read")
        if later:
            activation = hf.choice("hidden_activation", _LATER_ACTIVATIONS, "gelu_pytorch_tanh",
                                   "the activation of the MLP's gate")
            scalar = hf.number("query_pre_attn_scalar", 256)
            if scalar <= 0:
                hf.fail("query_pre_attn_scalar", "a number > 0", scalar)
            # Gemma 2 and 3 scale the scores by query_pre_attn_scalar^-1/2, which is the default 1/sqrt(head_dim)
            # when the two agree.
            scale = None if scalar == head_dim else scalar ** -0.5
            attention_softcap = hf.number("attn_logit_softcapping", _ATTENTION_SOFTCAP[model_type], nullable=True)
            if model_type == "gemma3_text" and attention_softcap is not None:
                hf.fail("attn_logit_softcapping", "null for gemma3_text", attention_softcap,
                        hint="transformers' Gemma 3 attention never applies it (Gemma 3 bounds its scores with "
                             "QK-norm instead), so the checkpoint's own computation is ambiguous")
            logit_softcap = hf.number("final_logit_softcapping", _FINAL_SOFTCAP[model_type], nullable=True)
            for name, value in (("attn_logit_softcapping", attention_softcap),
                                ("final_logit_softcapping", logit_softcap)):
                if value is not None and value <= 0:
                    hf.fail(name, "a number > 0 or null", value)
            window, windowed = self._windows(hf, layers)
        else:
            activation = hf.choice("hidden_act", _GEMMA_ACTIVATIONS, "gelu_pytorch_tanh",
                                   "the activation of the MLP's gate")
            scale = attention_softcap = logit_softcap = window = windowed = None
        scaling: dict[str, Any] = {}
        if model_type == "gemma3_text":
            base, local_base, factor = self._gemma3_rope(hf)
            if factor is not None:  # the global layers' tables; the window layers keep their own, unscaled
                scaling = {"rope_scaling": "linear", "rope_factor": factor}
            if window is None or (local_base == base and not scaling):
                local_base = None  # no layer reads it (or it is the global table)
        else:
            base, local_base = rope_base(hf), None
        head: dict[str, Any] = {"kind": "none"}
        if architecture.endswith("ForCausalLM"):
            head = {"kind": "lm", "tie_embeddings": hf.flag("tie_word_embeddings", True),
                    "logit_softcap": logit_softcap}
        return ModelConfig(
            arch="decoder", width=width, num_layers=layers, max_seq_len=max_seq_len,
            init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": heads, "num_kv_heads": kv_heads if kv_heads != heads else None,
                       "head_dim": head_dim if head_dim != width // heads else None, "qkv_bias": bias,
                       "out_bias": bias, "qk_norm": model_type == "gemma3_text",
                       "dropout": hf.number("attention_dropout", 0.0), "sliding_window": window,
                       "sliding_window_layers": windowed, "scale": scale, "softcap": attention_softcap},
            feedforward={"activation": activation, "hidden_size": hf.integer("intermediate_size"), "bias": False},
            norm={"kind": "rmsnorm", "placement": "sandwich" if later else "pre",
                  "eps": hf.number("rms_norm_eps", 1e-6), "weight_offset": 1.0},
            position={"kind": "rope", "rope_base": base, "rope_local_base": local_base, **scaling},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size"), "scale_embeddings": True},
            head=head,
        )

    @staticmethod
    def _windows(hf: Fields, layers: int) -> tuple[int | None, tuple[int, ...] | None]:
        """formerkit's (sliding_window, sliding_window_layers) from ``layer_types``, or, without it, Gemma 2's
        alternation (even layers slide) or Gemma 3's ``sliding_window_pattern`` (every n-th layer is global)."""
        kinds = hf.value("layer_types", None)
        if kinds is None:
            pattern = 2 if hf.model_type == "gemma2" else hf.integer("sliding_window_pattern", 6)
            windowed = [index for index in range(layers) if (index + 1) % pattern]
        elif not isinstance(kinds, list) or len(kinds) != layers or any(kind not in _LAYER_TYPES for kind in kinds):
            hf.fail("layer_types", f"a list of {layers} values 'full_attention' or 'sliding_attention'", kinds)
        else:
            windowed = [index for index, kind in enumerate(kinds) if kind == "sliding_attention"]
        if not windowed:
            return None, None
        window = hf.integer("sliding_window", 4096, nullable=True)
        if window is None:
            hf.fail("sliding_window", "an integer >= 1 (layer_types has sliding layers)", None)
        return window, None if len(windowed) == layers else tuple(windowed)

    @staticmethod
    def _gemma3_rope(hf: Fields) -> tuple[float, float, float | None]:
        """Gemma 3's RoPE bases (global, local) and the linear scaling factor of its global layers (position
        interpolation, 8 in the 4B to 27B models; None: unscaled): transformers 4.x writes rope_theta,
        rope_local_base_freq and rope_scaling; 5.x a rope_parameters mapping per layer type, which rope_scaling, when
        present, updates for the global layers (as transformers merges them). Other scalings are refused."""
        base = hf.number("rope_theta", 1_000_000.0)
        local = hf.number("rope_local_base_freq", 10_000.0)
        parameters = hf.value("rope_parameters", None)
        settings: dict[str, tuple[dict, str]] = {}
        if parameters is not None:
            if not isinstance(parameters, dict) or not set(parameters) <= set(_LAYER_TYPES) or not all(
                    isinstance(value, dict) for value in parameters.values()):
                hf.fail("rope_parameters", "a mapping of 'full_attention' and 'sliding_attention' to their RoPE "
                        "settings", parameters)
            settings = {kind: (value, f"rope_parameters.{kind}") for kind, value in parameters.items()}
        scaling = hf.value("rope_scaling", None)
        if scaling is not None:
            if not isinstance(scaling, dict):
                hf.fail("rope_scaling", "null or a mapping with rope_type and factor", scaling)
            settings["full_attention"] = ({**settings.get("full_attention", ({}, ""))[0], **scaling}, "rope_scaling")
        bases, factor = {"full_attention": base, "sliding_attention": local}, None
        for kind, (values, where) in settings.items():
            rope_type = values.get("rope_type", values.get("type", "default"))
            allowed = ("default", "linear") if kind == "full_attention" else ("default",)
            if rope_type not in allowed:
                name = "type" if "rope_type" not in values and "type" in values else "rope_type"
                hf.fail(f"{where}.{name}", " or ".join(map(repr, allowed)), rope_type, hint=_PLAIN_ROPE)
            if rope_type == "linear":
                factor = values.get("factor")
                if isinstance(factor, bool) or not isinstance(factor, (int, float)):
                    hf.fail(f"{where}.factor", "a number", factor)
                factor = float(factor)
            if values.get("partial_rotary_factor", 1.0) != 1.0:
                hf.fail(f"{where}.partial_rotary_factor", "1.0 (every channel rotated)",
                        values["partial_rotary_factor"])
            theta = values.get("rope_theta", bases[kind])
            if isinstance(theta, bool) or not isinstance(theta, (int, float)):
                hf.fail(f"{where}.rope_theta", "a number", theta)
            bases[kind] = float(theta)
        return bases["full_attention"], bases["sliding_attention"], factor

    # ----- writing -----

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        attention, position = config.attention, config.position
        if config.norm.placement != "sandwich":
            model_type = "gemma"
        else:
            model_type = "gemma3_text" if attention.qk_norm else "gemma2"
        architecture = self.architecture_for(config, model_type)
        later = model_type != "gemma"
        names = _LATER_ACTIVATION_NAMES if later else _GEMMA_ACTIVATION_NAMES
        base = position.rope_base
        data = {
            **self.header(config, architecture, model_type),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "intermediate_size": config.feedforward_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": attention.num_heads, "num_key_value_heads": attention.kv_heads,
            "head_dim": config.head_dim,
            ("hidden_activation" if later else "hidden_act"): hf_name(names, config.feedforward.activation,
                                                                     "feedforward.activation", architecture),
            "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm.eps,
            "attention_bias": attention.qkv_bias, "attention_dropout": attention.dropout,
            "tie_word_embeddings": config.head.tie_embeddings,
        }
        if model_type == "gemma3_text":
            local = position.rope_local_base or base
            # transformers 4.x reads rope_theta and rope_local_base_freq, 5.x rope_parameters.
            full: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
            if position.rope_scaling == "linear":
                full.update(rope_type="linear", factor=position.rope_factor)
                data.update(rope_scaling={"rope_type": "linear", "factor": position.rope_factor})
            data.update(rope_theta=base, rope_local_base_freq=local, rope_parameters={
                "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}})
        else:
            data.update(rope_theta=base, rope_parameters={"rope_type": "default", "rope_theta": base})
        if later:
            windowed = windowed_layers(config)
            data.update(
                query_pre_attn_scalar=self._query_pre_attn_scalar(config),
                attn_logit_softcapping=attention.softcap, final_logit_softcapping=config.head.logit_softcap,
                sliding_window=attention.sliding_window,
                layer_types=["sliding_attention" if index in windowed else "full_attention"
                             for index in range(config.num_layers)])
        return data

    @staticmethod
    def _query_pre_attn_scalar(config: ModelConfig) -> int:
        """attention.scale as Gemma 2's query_pre_attn_scalar (scale^-2), an integer in transformers' config."""
        scale = config.attention.scale
        if scale is None:
            return config.head_dim
        scalar = scale ** -2.0
        if abs(scalar - round(scalar)) > 1e-6 * scalar or round(scalar) ** -0.5 != scale:
            raise InteropError(f"to_hf: attention.scale: expected n^-1/2 for an integer n (Gemma's "
                               f"query_pre_attn_scalar), got {scale!r} (= {math.sqrt(scalar):.6g}^-1)")
        return round(scalar)

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        return llama_layout_rules(config, base)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}embed_tokens.weight"} if config.head.tie_embeddings else {}
