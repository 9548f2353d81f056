"""Hugging Face checkpoints in and out, from local files only.

``from_hf(directory)`` reads a ``transformers`` checkpoint directory (``config.json`` with ``model.safetensors``, or a
sharded ``model.safetensors.index.json`` and its shards) into a formerkit ``Transformer`` with the same outputs.
``to_hf(model, directory)`` writes a formerkit model as such a directory, which ``transformers``' ``from_pretrained``
loads with no missing or unexpected weights and the same outputs. ``convert`` is the function behind the command line.

Families: GPT-2 (``gpt2``), LLaMA (``llama``) with its close relatives Mistral (``mistral``: sliding-window attention)
and Qwen2 (``qwen2``: query/key/value biases, sliding windows on chosen layers), BERT (``bert``) and ViT (``vit``). Each
family is one ``_Family``: the Hugging Face config read into a ModelConfig, a ModelConfig written back as one, and one
table of weight rules that serves both directions.

Faithfulness comes first. A config value formerkit does not reproduce, a missing weight or an unexpected one is an
``InteropError`` naming the field or the tensor, never a silent approximation. ``to_hf`` checks its own work the same
way: the config.json it writes must read back as the model's own config, or it names the fields that differ.

Two layout facts the rules encode: formerkit fuses the query, key and value projections into one ``qkv`` Linear stacked
[q | k | v] along the output dimension (with grouped-query attention k and v have ``num_kv_heads * head_dim`` rows
each), and a gated MLP's gate and up projections into one ``fc_in`` stacked [gate | up]. GPT-2's ``Conv1D`` stores its
weights [in, out], the transpose of ``nn.Linear``'s [out, in].

``transformers`` itself is never imported (it is a development dependency only): config.json is plain JSON, read and
written here.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from formerkit.config import ModelConfig
from formerkit.errors import ConfigError, InteropError

__all__ = ["convert", "from_hf", "to_hf"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

_MISSING = object()

# Hugging Face activation names (hidden_act, activation_function) -> the formerkit activation computing the same
# function. "gelu_new" spells GELU's tanh approximation out by hand; formerkit uses torch's, equal up to float rounding.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}
# formerkit -> the name written; "gelu_pytorch_tanh" is torch's tanh GELU, exactly what formerkit runs.
_ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# A LLaMA-family MLP computes act(gate) * up: formerkit's gated activations, by their gate's function.
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_GATED_NAMES = {"swiglu": "silu", "geglu": "gelu"}


# ----- weight rules: one formerkit parameter <-> the Hugging Face tensors it is made of -----


@dataclass(frozen=True)
class _Rule:
    """One formerkit parameter and the Hugging Face tensor(s) holding the same numbers.

    ``layout`` says how: "same" (copied), "transposed" (GPT-2's Conv1D, [in, out]), "stacked" (several tensors
    concatenated along dim 0, ``sizes`` rows each: fused q/k/v, fused gate/up) or "batched" (the Hugging Face tensor
    has a leading dimension of 1: ViT's position table).
    """

    ours: str
    theirs: tuple[str, ...]
    layout: str = "same"
    sizes: tuple[int, ...] = ()

    def their_shapes(self, shape: torch.Size) -> list[tuple[int, ...]]:
        """The shapes the Hugging Face tensors have for a formerkit parameter of ``shape``."""
        shape = tuple(shape)
        if self.layout == "transposed":
            return [shape[::-1]]
        if self.layout == "stacked":
            return [(rows, *shape[1:]) for rows in self.sizes]
        if self.layout == "batched":
            return [(1, *shape)]
        return [shape]

    def to_ours(self, parts: list[Tensor]) -> Tensor:
        if self.layout == "transposed":
            return parts[0].t()
        if self.layout == "stacked":
            return torch.cat(parts, dim=0)
        if self.layout == "batched":
            return parts[0].squeeze(0)
        return parts[0]

    def to_theirs(self, tensor: Tensor) -> dict[str, Tensor]:
        if self.layout == "transposed":
            parts = [tensor.t()]
        elif self.layout == "stacked":
            parts = list(tensor.split(list(self.sizes), dim=0))
        elif self.layout == "batched":
            parts = [tensor.unsqueeze(0)]
        else:
            parts = [tensor]
        return dict(zip(self.theirs, parts))


def _pair(ours: str, theirs: str, *, bias: bool = True, layout: str = "same") -> list[_Rule]:
    """A Linear, Conv2d or norm: its weight (in ``layout``) and, with ``bias``, its bias (always copied as is)."""
    rules = [_Rule(f"{ours}.weight", (f"{theirs}.weight",), layout)]
    return rules + [_Rule(f"{ours}.bias", (f"{theirs}.bias",))] if bias else rules


def _stack(ours: str, theirs: list[str], sizes: tuple[int, ...], *, bias: bool) -> list[_Rule]:
    """Several Hugging Face Linears stacked along the output dimension into one formerkit Linear."""
    rules = [_Rule(f"{ours}.weight", tuple(f"{name}.weight" for name in theirs), "stacked", sizes)]
    if bias:
        rules.append(_Rule(f"{ours}.bias", tuple(f"{name}.bias" for name in theirs), "stacked", sizes))
    return rules


def _untied_lm_head(config: ModelConfig) -> list[_Rule]:
    """A decoder's LM head has a weight of its own only when untied; tied, it is the token embedding."""
    if config.head.kind == "lm" and not config.head.tie_embeddings:
        return [_Rule("head.projection.weight", ("lm_head.weight",))]
    return []


def _check_coverage(rules: list[_Rule], params: dict[str, Tensor], architecture: str) -> None:
    """Every formerkit parameter is assigned by exactly one rule (a mismatch is a bug here, not bad input)."""
    counts = Counter(rule.ours for rule in rules)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    unmapped = sorted(set(params) - set(counts))
    unknown = sorted(set(counts) - set(params))
    if repeated or unmapped or unknown:
        raise RuntimeError(f"formerkit.interop: the {architecture} weight rules do not fit the model (assigned twice: "
                           f"{repeated}, unassigned: {unmapped}, not parameters: {unknown}); this is a formerkit bug")


# ----- reading a Hugging Face config.json -----


class _Fields:
    """A Hugging Face config.json as read: typed look-ups whose errors name the file and the field."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data = data
        self.source = source

    @property
    def model_type(self) -> Any:
        return self.data.get("model_type")

    def fail(self, name: str, expected: str, value: Any = _MISSING, hint: str = "") -> NoReturn:
        got = "nothing (the field is missing)" if value is _MISSING else repr(value)
        raise InteropError(f"{self.source}: {name}: expected {expected}, got {got}" + (f" ({hint})" if hint else ""))

    def value(self, name: str, default: Any = _MISSING) -> Any:
        """The raw value; ``default`` (Hugging Face's class default) when the field is absent, an error if none."""
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            self.fail(name, "a value")
        return default

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int = 1, nullable: bool = False) -> int | None:
        value = self.value(name, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(name, f"an integer >= {minimum}" + (" or null" if nullable else ""), value)
        return value

    def number(self, name: str, default: Any = _MISSING, *, nullable: bool = False) -> float | None:
        value = self.value(name, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, "a number" + (" or null" if nullable else ""), value)
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.value(name, default)
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)
        return value

    def expect(self, name: str, wanted: Any, why: str) -> None:
        """Refuses a field whose value (absent means ``wanted``, the class default) formerkit cannot reproduce."""
        value = self.value(name, wanted)
        if type(value) is not type(wanted) or value != wanted:
            self.fail(name, repr(wanted), value, hint=why)

    def choice(self, name: str, table: dict[str, str], default: str, why: str) -> str:
        """A name looked up in ``table`` (Hugging Face's spelling -> formerkit's)."""
        value = self.value(name, default)
        if not isinstance(value, str) or value not in table:
            self.fail(name, "one of " + ", ".join(map(repr, table)), value, hint=why)
        return table[value]

    def num_labels(self) -> int:
        labels = self.value("id2label", None)
        if isinstance(labels, dict) and labels:
            return len(labels)
        return self.integer("num_labels", 2)


def _hidden_size(hidden: int | None, width: int) -> int | None:
    """A feed-forward width as formerkit's presets spell it: null when it is the default 4 x width."""
    return None if hidden is None or hidden == 4 * width else hidden


def _rope_type(spec: Any) -> Any:
    return spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else spec


def _rope_base(hf: _Fields) -> float:
    """RoPE's base (``rope_theta``), after checking that no scaling scheme is asked for. transformers 4.x writes
    ``rope_theta`` and ``rope_scaling``; 5.x writes both into ``rope_parameters``."""
    why = ("formerkit implements plain RoPE; a scaled variant (linear, dynamic, yarn, longrope, llama3) changes the "
           "rotation angles")
    theta: Any = hf.number("rope_theta", 10000.0)
    scaling = hf.value("rope_scaling", None)
    if scaling is not None and _rope_type(scaling) != "default":
        hf.fail("rope_scaling", "null or a rope_type of 'default'", scaling, hint=why)
    parameters = hf.value("rope_parameters", None)
    if parameters is not None:
        if not isinstance(parameters, dict) or any(isinstance(value, dict) for value in parameters.values()):
            hf.fail("rope_parameters", "one mapping with rope_type and rope_theta", parameters,
                    hint="per-layer-type RoPE settings are not supported")
        if _rope_type(parameters) != "default":
            hf.fail("rope_parameters.rope_type", "'default'", _rope_type(parameters), hint=why)
        if parameters.get("partial_rotary_factor", 1.0) != 1.0:
            hf.fail("rope_parameters.partial_rotary_factor", "1.0 (every channel rotated)",
                    parameters["partial_rotary_factor"])
        theta = parameters.get("rope_theta", theta)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            hf.fail("rope_parameters.rope_theta", "a number", theta)
    if hf.value("partial_rotary_factor", 1.0) != 1.0:
        hf.fail("partial_rotary_factor", "1.0 (every channel rotated)", hf.value("partial_rotary_factor"))
    return float(theta)


def _labels(count: int) -> dict[str, Any]:
    names = {str(index): f"LABEL_{index}" for index in range(count)}
    return {"id2label": names, "label2id": {name: int(index) for index, name in names.items()}}


def _name_for(table: dict[str, str], value: str, field: str, architecture: str) -> str:
    """The Hugging Face spelling of a formerkit choice, or an error naming the formerkit field."""
    if value not in table:
        raise InteropError(f"to_hf: {field}: expected one of {', '.join(map(repr, table))} for a {architecture} "
                           f"checkpoint, got {value!r}")
    return table[value]


def _windowed_layers(config: ModelConfig) -> list[int]:
    """The layers whose attention is limited to a sliding window."""
    attention = config.attention
    if attention.sliding_window is None:
        return []
    if attention.sliding_window_layers is None:
        return list(range(config.num_layers))
    return sorted(set(attention.sliding_window_layers))


# ----- the families -----


class _Family:
    """One Hugging Face model family: its config read and written, its weight rules, and the tensors its files may
    hold besides the weights."""

    model_types: tuple[str, ...] = ()
    # The base model's name prefix inside a model with a head ("transformer." in GPT2LMHeadModel). Base models are
    # saved without it; some files of head models are too (the original GPT-2), so reading accepts both.
    prefix = ""
    # Tensors Hugging Face may store that are buffers, not weights (causal-mask tables, RoPE frequencies, position
    # ids); they are ignored on reading, by name. The default pattern never matches.
    buffers = re.compile(r"(?!)")

    def architectures(self, model_type: str) -> dict[str, str]:
        """Hugging Face architecture -> formerkit head kind."""
        raise NotImplementedError

    def read_config(self, hf: _Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        """The ModelConfig of a checkpoint; ``has_pooler``: the weights hold a pooler (BertModel, ViTModel)."""
        raise NotImplementedError

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        """A config.json (with "architectures" and "model_type") for a model of this family."""
        raise NotImplementedError

    def rules(self, config: ModelConfig, base: str) -> list[_Rule]:
        """The weight rules of a model; ``base`` is the prefix its base-model weights carry ("" or ``prefix``)."""
        raise NotImplementedError

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        """Tensors a file may hold as copies of tied ones (name -> the tensor it must equal); dropped once checked."""
        return {}

    def unused(self, architecture: str, base: str) -> set[str]:
        """Weights a file of ``architecture`` may hold that the architecture itself never uses (transformers drops
        them on loading too); dropped with a warning naming them."""
        return set()

    def architecture_for(self, config: ModelConfig, model_type: str) -> str:
        by_head = {kind: architecture for architecture, kind in self.architectures(model_type).items()}
        if config.head.kind not in by_head:
            raise InteropError(f"to_hf: head.kind: expected one of {', '.join(map(repr, by_head))} for a "
                               f"{model_type} checkpoint, got {config.head.kind!r}")
        return by_head[config.head.kind]

    @staticmethod
    def header(config: ModelConfig, architecture: str, model_type: str) -> dict[str, Any]:
        """The fields every written config.json starts with. formerkit knows no special token ids, so none are
        claimed (transformers' defaults could point outside a small vocabulary)."""
        data = {"architectures": [architecture], "model_type": model_type, "initializer_range": config.init_std}
        if config.stem.kind == "tokens":
            data.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return data


class _GPT2(_Family):
    """GPT-2 (Radford et al., 2019): learned positions, pre-norm LayerNorm, Conv1D projections with biases."""

    model_types = ("gpt2",)
    prefix = "transformer."
    # The causal-mask table GPT-2 registers per layer ("attn.bias") and, in older files, "attn.masked_bias".
    buffers = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"GPT2LMHeadModel": "lm", "GPT2Model": "none"}

    def read_config(self, hf: _Fields, architecture: str, has_pooler: bool) -> ModelConfig:
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
            feedforward={"activation": hf.choice("activation_function", _ACTIVATIONS, "gelu_new", "the MLP's"),
                         "hidden_size": _hidden_size(hf.integer("n_inner", None, nullable=True), width)},
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
            "activation_function": _name_for(_ACTIVATION_NAMES, config.feedforward.activation,
                                             "feedforward.activation", architecture),
            "layer_norm_epsilon": config.norm.eps, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
            "attn_pdrop": config.attention.dropout, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
            "tie_word_embeddings": config.head.tie_embeddings,
        }

    def rules(self, config: ModelConfig, base: str) -> list[_Rule]:
        rules = [_Rule("stem.tokens.weight", (f"{base}wte.weight",)),
                 _Rule("positions.weight", (f"{base}wpe.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}h.{i}"
            rules += _pair(f"{ours}.attention_residual.norm", f"{theirs}.ln_1")
            # c_attn's output columns are already [q | k | v].
            rules += _pair(f"{ours}.attention.qkv", f"{theirs}.attn.c_attn", layout="transposed")
            rules += _pair(f"{ours}.attention.out", f"{theirs}.attn.c_proj", layout="transposed")
            rules += _pair(f"{ours}.feedforward_residual.norm", f"{theirs}.ln_2")
            rules += _pair(f"{ours}.feedforward.fc_in", f"{theirs}.mlp.c_fc", layout="transposed")
            rules += _pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.c_proj", layout="transposed")
        return rules + _pair("decoder.final_norm", f"{base}ln_f") + _untied_lm_head(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}wte.weight"} if config.head.tie_embeddings else {}


# The class-name stem of each LLaMA-family model type, and its default number of key/value heads.
_LLAMA_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_LLAMA_KV_HEADS = {"llama": None, "mistral": 8, "qwen2": 32}


class _Llama(_Family):
    """LLaMA (Touvron et al., 2023) and two relatives formerkit reproduces exactly: RMSNorm, RoPE, SwiGLU,
    grouped-query attention. Mistral adds a sliding window on every layer; Qwen2 adds query/key/value biases and
    sliding windows on chosen layers (``layer_types``, as transformers 5 applies them)."""

    model_types = tuple(_LLAMA_CLASSES)
    prefix = "model."
    buffers = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

    def architectures(self, model_type: str) -> dict[str, str]:
        name = _LLAMA_CLASSES[model_type]
        return {f"{name}ForCausalLM": "lm", f"{name}Model": "none"}

    def read_config(self, hf: _Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        model_type = hf.model_type
        width, heads, layers = hf.integer("hidden_size"), hf.integer("num_attention_heads"), hf.integer(
            "num_hidden_layers")
        kv_heads = hf.integer("num_key_value_heads", _LLAMA_KV_HEADS[model_type], nullable=True) or heads
        head_dim = hf.integer("head_dim", None, nullable=True) or width // heads
        max_seq_len = hf.integer("max_position_embeddings")
        if model_type == "llama":
            qkv_bias = out_bias = hf.flag("attention_bias", False)
            mlp_bias = hf.flag("mlp_bias", False)
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
                       "out_bias": out_bias, "dropout": hf.number("attention_dropout", 0.0),
                       "sliding_window": window, "sliding_window_layers": windowed},
            feedforward={"activation": hf.choice("hidden_act", _GATED, "silu", "the activation of the MLP's gate"),
                         "hidden_size": hf.integer("intermediate_size"), "bias": mlp_bias},
            norm={"kind": "rmsnorm", "placement": "pre", "eps": hf.number("rms_norm_eps", 1e-6)},
            position={"kind": "rope", "rope_base": _rope_base(hf)},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size")},
            head=head,
        )

    @staticmethod
    def _sliding_window(hf: _Fields, layers: int, max_seq_len: int) -> tuple[int | None, tuple[int, ...] | None]:
        """formerkit's (sliding_window, sliding_window_layers). A window longer than max_seq_len never limits
        anything, so it is dropped (formerkit's config refuses such a window)."""
        model_type = hf.model_type
        if model_type == "mistral":
            window = hf.integer("sliding_window", 4096, nullable=True)
            windowed = list(range(layers))
        elif model_type == "qwen2":
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
        windowed = _windowed_layers(config)
        # The one family member that holds this model: Qwen2 for q/k/v-only biases or per-layer windows, Mistral for
        # windows on every layer, LLaMA otherwise. Whatever the choice cannot hold, the round-trip check names.
        if (attention.qkv_bias and not attention.out_bias) or 0 < len(windowed) < config.num_layers:
            model_type = "qwen2"
        else:
            model_type = "mistral" if windowed else "llama"
        architecture = self.architecture_for(config, model_type)
        base = config.position.rope_base
        data = {
            **self.header(config, architecture, model_type),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "intermediate_size": config.feedforward_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": attention.num_heads, "num_key_value_heads": attention.kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": _name_for(_GATED_NAMES, config.feedforward.activation, "feedforward.activation",
                                    architecture),
            "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm.eps,
            # transformers 4.x reads rope_theta, 5.x rope_parameters.
            "rope_theta": base, "rope_parameters": {"rope_type": "default", "rope_theta": base},
            "attention_dropout": attention.dropout, "tie_word_embeddings": config.head.tie_embeddings,
        }
        if model_type == "llama":
            data.update(attention_bias=attention.qkv_bias, mlp_bias=config.feedforward.bias)
        elif model_type == "mistral":
            data.update(sliding_window=attention.sliding_window)
        else:
            data.update(use_sliding_window=bool(windowed), sliding_window=attention.sliding_window,
                        max_window_layers=windowed[0] if windowed else config.num_layers,
                        layer_types=["sliding_attention" if index in windowed else "full_attention"
                                     for index in range(config.num_layers)])
        return data

    def rules(self, config: ModelConfig, base: str) -> list[_Rule]:
        attention, hidden = config.attention, config.feedforward_size
        q_rows, kv_rows = attention.num_heads * config.head_dim, attention.kv_heads * config.head_dim
        rules = [_Rule("stem.tokens.weight", (f"{base}embed_tokens.weight",))]
        for i in range(config.num_layers):
            ours, theirs = f"decoder.blocks.{i}", f"{base}layers.{i}"
            rules += _pair(f"{ours}.attention_residual.norm", f"{theirs}.input_layernorm", bias=False)
            rules += _stack(f"{ours}.attention.qkv", [f"{theirs}.self_attn.{p}_proj" for p in "qkv"],
                            (q_rows, kv_rows, kv_rows), bias=attention.qkv_bias)
            rules += _pair(f"{ours}.attention.out", f"{theirs}.self_attn.o_proj", bias=attention.out_bias)
            rules += _pair(f"{ours}.feedforward_residual.norm", f"{theirs}.post_attention_layernorm", bias=False)
            rules += _stack(f"{ours}.feedforward.fc_in", [f"{theirs}.mlp.gate_proj", f"{theirs}.mlp.up_proj"],
                            (hidden, hidden), bias=config.feedforward.bias)
            rules += _pair(f"{ours}.feedforward.fc_out", f"{theirs}.mlp.down_proj", bias=config.feedforward.bias)
        return rules + _pair("decoder.final_norm", f"{base}norm", bias=False) + _untied_lm_head(config)

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        return {"lm_head.weight": f"{base}embed_tokens.weight"} if config.head.tie_embeddings else {}


# BERT's and ViT's names for the query, key and value projections.
_QKV_NAMES = ("query", "key", "value")


class _Bert(_Family):
    """BERT (Devlin et al., 2019): post-norm LayerNorm, learned positions and token types, a norm on the embeddings;
    with its pooler, masked-LM head or sequence-classification head as the architectures field says."""

    model_types = ("bert",)
    prefix = "bert."
    buffers = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"BertForMaskedLM": "masked_lm", "BertModel": "none", "BertForSequenceClassification": "classification"}

    def read_config(self, hf: _Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        hf.expect("position_embedding_type", "absolute", "formerkit's BERT adds a learned table of absolute "
                  "positions; the relative_key schemes are not implemented")
        hf.expect("is_decoder", False, "formerkit reads BERT as a bidirectional encoder")
        hf.expect("add_cross_attention", False, "an encoder-only BERT has no cross-attention")
        width = hf.integer("hidden_size")
        activation = hf.choice("hidden_act", _ACTIVATIONS, "gelu", "the MLP's")
        dropout = hf.number("hidden_dropout_prob", 0.1)
        kind = self.architectures("bert")[architecture]
        if kind == "masked_lm":
            if activation != "gelu":
                hf.fail("hidden_act", "'gelu' for a BertForMaskedLM", hf.value("hidden_act"),
                        hint="formerkit's masked-LM head transform uses exact GELU")
            head = {"kind": "masked_lm", "tie_embeddings": hf.flag("tie_word_embeddings", True)}
        elif kind == "classification":
            classifier_dropout = hf.number("classifier_dropout", None, nullable=True)
            head = {"kind": "classification", "num_classes": hf.num_labels(), "pooling": "cls", "pooler": True,
                    "dropout": dropout if classifier_dropout is None else classifier_dropout}
        else:
            head = {"kind": "none", "pooler": has_pooler, "pooling": "cls" if has_pooler else None}
        return ModelConfig(
            arch="encoder", width=width, num_layers=hf.integer("num_hidden_layers"),
            max_seq_len=hf.integer("max_position_embeddings", 512), dropout=dropout,
            init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": hf.integer("num_attention_heads"),
                       "dropout": hf.number("attention_probs_dropout_prob", 0.1)},
            feedforward={"activation": activation,
                         "hidden_size": _hidden_size(hf.integer("intermediate_size"), width)},
            norm={"kind": "layernorm", "placement": "post", "eps": hf.number("layer_norm_eps", 1e-12)},
            position={"kind": "learned"},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size"),
                  "num_token_types": hf.integer("type_vocab_size", 2), "embedding_norm": True},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "bert")
        head = config.head
        if head.kind == "masked_lm" and config.feedforward.activation != "gelu":
            raise InteropError(f"to_hf: feedforward.activation: expected 'gelu' for a BertForMaskedLM, got "
                               f"{config.feedforward.activation!r} (its head transform shares the MLP's activation)")
        if config.stem.num_token_types < 1:
            raise InteropError("to_hf: stem.num_token_types: expected an integer >= 1 for a BERT checkpoint (it "
                               "always has a token-type table), got 0")
        data = {
            **self.header(config, architecture, "bert"),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.attention.num_heads,
            "intermediate_size": config.feedforward_size,
            "hidden_act": _name_for(_ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                    architecture),
            "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention.dropout,
            "max_position_embeddings": config.max_seq_len, "type_vocab_size": config.stem.num_token_types,
            "layer_norm_eps": config.norm.eps, "position_embedding_type": "absolute", "is_decoder": False,
            "add_cross_attention": False, "tie_word_embeddings": head.tie_embeddings,
        }
        if head.kind == "classification":
            data.update(classifier_dropout=head.dropout, **_labels(head.num_classes))
        return data

    def rules(self, config: ModelConfig, base: str) -> list[_Rule]:
        embeddings, rows = f"{base}embeddings", config.attention.num_heads * config.head_dim
        rules = [_Rule("stem.tokens.weight", (f"{embeddings}.word_embeddings.weight",)),
                 _Rule("stem.token_types.weight", (f"{embeddings}.token_type_embeddings.weight",)),
                 _Rule("positions.weight", (f"{embeddings}.position_embeddings.weight",))]
        rules += _pair("embedding_norm", f"{embeddings}.LayerNorm")
        for i in range(config.num_layers):
            # Post-norm: attention.output.LayerNorm follows the attention residual, output.LayerNorm the MLP's.
            ours, theirs = f"encoder.blocks.{i}", f"{base}encoder.layer.{i}"
            rules += _stack(f"{ours}.attention.qkv", [f"{theirs}.attention.self.{p}" for p in _QKV_NAMES],
                            (rows, rows, rows), bias=True)
            rules += _pair(f"{ours}.attention.out", f"{theirs}.attention.output.dense")
            rules += _pair(f"{ours}.attention_residual.norm", f"{theirs}.attention.output.LayerNorm")
            rules += _pair(f"{ours}.feedforward.fc_in", f"{theirs}.intermediate.dense")
            rules += _pair(f"{ours}.feedforward.fc_out", f"{theirs}.output.dense")
            rules += _pair(f"{ours}.feedforward_residual.norm", f"{theirs}.output.LayerNorm")
        head = config.head
        if head.pooler:
            rules += _pair("head.pooler", f"{base}pooler.dense")
        if head.kind == "masked_lm":
            predictions = "cls.predictions"
            rules += _pair("head.dense", f"{predictions}.transform.dense")
            rules += _pair("head.norm", f"{predictions}.transform.LayerNorm")
            rules.append(_Rule("head.projection.bias", (f"{predictions}.bias",)))
            if not head.tie_embeddings:
                rules.append(_Rule("head.projection.weight", (f"{predictions}.decoder.weight",)))
        if head.kind == "classification":
            rules += _pair("head.projection", "classifier")
        return rules

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        if config.head.kind != "masked_lm":
            return {}
        # The decoder's bias is cls.predictions.bias itself; older files store it under both names.
        copies = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
        if config.head.tie_embeddings:
            copies["cls.predictions.decoder.weight"] = f"{base}embeddings.word_embeddings.weight"
        return copies

    def unused(self, architecture: str, base: str) -> set[str]:
        # BERT's pre-training checkpoints (bert-base-uncased among them) declare BertForMaskedLM but also hold the
        # pooler and the next-sentence head, which a BertForMaskedLM does not have.
        if architecture != "BertForMaskedLM":
            return set()
        return {f"{base}pooler.dense.weight", f"{base}pooler.dense.bias", "cls.seq_relationship.weight",
                "cls.seq_relationship.bias"}


class _ViT(_Family):
    """ViT (Dosovitskiy et al., 2021): patch embedding with a class token, learned positions, pre-norm LayerNorm;
    a classification head on the class token, or (ViTModel) the hidden states and an optional tanh pooler."""

    model_types = ("vit",)
    prefix = "vit."

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"ViTForImageClassification": "classification", "ViTModel": "none"}

    @staticmethod
    def _sides(hf: _Fields, name: str, default: int) -> tuple[int, int]:
        value = hf.value(name, default)
        sides = [value, value] if isinstance(value, int) else value
        if (not isinstance(sides, list) or len(sides) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides)):
            hf.fail(name, "an integer >= 1 or a list [height, width] of them", value)
        return sides[0], sides[1]

    def read_config(self, hf: _Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width = hf.integer("hidden_size")
        patch = self._sides(hf, "patch_size", 16)
        if patch[0] != patch[1]:
            hf.fail("patch_size", "square patches", hf.value("patch_size"), hint="formerkit's patch_size is one side")
        if architecture == "ViTForImageClassification":
            head = {"kind": "classification", "num_classes": hf.num_labels(), "pooling": "cls"}
        else:
            if has_pooler:
                hf.expect("pooler_act", "tanh", "formerkit's pooler is a dense layer with tanh")
                if hf.integer("pooler_output_size", None, nullable=True) not in (None, width):
                    hf.fail("pooler_output_size", f"null or hidden_size ({width})", hf.value("pooler_output_size"))
            head = {"kind": "none", "pooler": has_pooler, "pooling": "cls" if has_pooler else None}
        return ModelConfig(
            arch="encoder", width=width, num_layers=hf.integer("num_hidden_layers"), max_seq_len=None,
            dropout=hf.number("hidden_dropout_prob", 0.0), init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": hf.integer("num_attention_heads"), "qkv_bias": hf.flag("qkv_bias", True),
                       "dropout": hf.number("attention_probs_dropout_prob", 0.0)},
            feedforward={"activation": hf.choice("hidden_act", _ACTIVATIONS, "gelu", "the MLP's"),
                         "hidden_size": _hidden_size(hf.integer("intermediate_size"), width)},
            norm={"kind": "layernorm", "placement": "pre", "eps": hf.number("layer_norm_eps", 1e-12)},
            position={"kind": "learned"},
            stem={"kind": "patches", "image_size": list(self._sides(hf, "image_size", 224)), "patch_size": patch[0],
                  "in_channels": hf.integer("num_channels", 3), "class_token": True},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "vit")
        stem, head = config.stem, config.head
        height, width = stem.image_size
        data = {
            **self.header(config, architecture, "vit"),
            "hidden_size": config.width, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.attention.num_heads, "intermediate_size": config.feedforward_size,
            "hidden_act": _name_for(_ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                    architecture),
            "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention.dropout,
            "layer_norm_eps": config.norm.eps, "image_size": height if height == width else [height, width],
            "patch_size": stem.patch_size, "num_channels": stem.in_channels, "qkv_bias": config.attention.qkv_bias,
            "encoder_stride": stem.patch_size, "pooler_act": "tanh", "pooler_output_size": config.width,
        }
        if head.kind == "classification":
            data.update(_labels(head.num_classes))
        return data

    def rules(self, config: ModelConfig, base: str) -> list[_Rule]:
        embeddings, rows = f"{base}embeddings", config.attention.num_heads * config.head_dim
        # The position table is [1, tokens, width] in transformers; its first row belongs to the class token in both.
        rules = [_Rule("stem.class_token", (f"{embeddings}.cls_token",)),
                 _Rule("positions.weight", (f"{embeddings}.position_embeddings",), "batched")]
        rules += _pair("stem.projection", f"{embeddings}.patch_embeddings.projection")
        for i in range(config.num_layers):
            # Pre-norm: layernorm_before feeds attention, layernorm_after the MLP.
            ours, theirs = f"encoder.blocks.{i}", f"{base}encoder.layer.{i}"
            rules += _pair(f"{ours}.attention_residual.norm", f"{theirs}.layernorm_before")
            rules += _stack(f"{ours}.attention.qkv", [f"{theirs}.attention.attention.{p}" for p in _QKV_NAMES],
                            (rows, rows, rows), bias=config.attention.qkv_bias)
            rules += _pair(f"{ours}.attention.out", f"{theirs}.attention.output.dense")
            rules += _pair(f"{ours}.feedforward_residual.norm", f"{theirs}.layernorm_after")
            rules += _pair(f"{ours}.feedforward.fc_in", f"{theirs}.intermediate.dense")
            rules += _pair(f"{ours}.feedforward.fc_out", f"{theirs}.output.dense")
        rules += _pair("encoder.final_norm", f"{base}layernorm")
        if config.head.pooler:
            rules += _pair("head.pooler", f"{base}pooler.dense")
        if config.head.kind == "classification":
            rules += _pair("head.projection", "classifier")
        return rules


_GPT2_FAMILY, _LLAMA_FAMILY, _BERT_FAMILY, _VIT_FAMILY = _GPT2(), _Llama(), _Bert(), _ViT()
_FAMILIES = (_GPT2_FAMILY, _LLAMA_FAMILY, _BERT_FAMILY, _VIT_FAMILY)


def _family_of(hf: _Fields) -> _Family:
    for family in _FAMILIES:
        if hf.model_type in family.model_types:
            return family
    supported = ", ".join(repr(kind) for family in _FAMILIES for kind in family.model_types)
    hf.fail("model_type", f"one of {supported}", hf.data.get("model_type", _MISSING),
            hint="formerkit converts these families only")


def _family_for(config: ModelConfig) -> _Family:
    """The family whose checkpoints can hold a model of ``config``, by its architecture, stem and positions."""
    arch, stem, position = config.arch, config.stem.kind, config.position.kind
    if arch == "decoder" and stem == "tokens":
        if position == "learned":
            return _GPT2_FAMILY
        if position == "rope":
            return _LLAMA_FAMILY
        raise InteropError(f"to_hf: position.kind: expected 'learned' (GPT-2) or 'rope' (LLaMA, Mistral, Qwen2) for a "
                           f"decoder over tokens, got {position!r}")
    if arch == "encoder" and stem == "tokens":
        return _BERT_FAMILY
    if arch == "encoder" and stem == "patches":
        return _VIT_FAMILY
    raise InteropError(f"to_hf: no Hugging Face family formerkit writes has arch={arch!r} with stem.kind={stem!r}; "
                       "supported: a decoder over tokens (GPT-2, LLaMA), an encoder over tokens (BERT), an encoder "
                       "over patches (ViT)")


def _semantics(config: ModelConfig) -> dict[str, Any]:
    """A config's values as dotted names, with defaults resolved and values that change nothing left out, so that
    two spellings of one model compare equal and a difference is one the model would show."""
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    flat.update({"attention.num_kv_heads": config.attention.kv_heads, "attention.head_dim": config.head_dim,
                 "attention.sliding_window_layers": _windowed_layers(config),
                 "feedforward.hidden_size": config.feedforward_size, "norm.final": config.norm.has_final,
                 "head.pooling": config.head_pooling})
    # A mixture of experts differs by feedforward.num_experts (0 and null are both dense); its other fields follow it.
    flat["feedforward.num_experts"] = config.feedforward.num_experts or None
    ignored = ["feedforward.ratio", "feedforward.experts_per_token", "feedforward.capacity_factor",
               "feedforward.aux_loss_weight", "feedforward.moe_layers"]
    if config.position.kind != "rope":
        ignored.append("position.rope_base")
    if config.norm.kind == "rmsnorm":
        ignored.append("norm.bias")
    if config.stem.kind in ("patches", "conv"):
        ignored.append("max_seq_len")
    if config.head.kind not in ("classification", "regression"):
        ignored.append("head.dropout")
    if config.head.kind in ("lm", "masked_lm"):  # these heads never build a pooler
        ignored.append("head.pooler")
    for name in ignored:
        flat.pop(name)
    return flat


def _check_round_trip(family: _Family, config: ModelConfig, data: dict[str, Any]) -> None:
    """The config.json about to be written must read back as ``config``; otherwise names every field it cannot
    hold. (A base model is read back with its pooler: BertModel and ViTModel always build one.)"""
    architecture = data["architectures"][0]
    back = family.read_config(_Fields(data, f"to_hf ({architecture})"), architecture, has_pooler=True)
    ours, theirs = _semantics(config), _semantics(back)
    differences = [f"{name} is {ours.get(name)!r} (a {architecture} checkpoint holds {theirs.get(name)!r})"
                   for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
    if differences:
        raise InteropError(f"to_hf: this model has no exact {architecture} equivalent: " + "; ".join(differences))


# ----- weight files -----


class _WeightFiles:
    """The weights of a checkpoint directory: one file or an index of shards, safetensors or (only when trusted)
    pickle. Safetensors is preferred when both are present."""

    def __init__(self, directory: Path, trust_pickle: bool):
        self.directory = directory
        self.pickled = False
        self.weight_map: dict[str, str] | None = None
        for single, index, pickled in ((SAFETENSORS_FILE, SAFETENSORS_INDEX, False), (PICKLE_FILE, PICKLE_INDEX, True)):
            if (directory / single).is_file():
                self.files = [directory / single]
            elif (directory / index).is_file():
                self.weight_map = self._read_index(directory / index)
                self.files = [directory / name for name in sorted(set(self.weight_map.values()))]
            else:
                continue
            self.pickled = pickled
            break
        else:
            raise InteropError(f"{directory}: no weights found; expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} "
                               f"with its shards (or {PICKLE_FILE}, read only with trust_pickle)")
        if self.pickled and not trust_pickle:
            raise InteropError(f"{self.files[0]}: a pickled PyTorch checkpoint, which can run code when loaded; "
                               "formerkit reads it only when asked: from_hf(..., trust_pickle=True) or --trust-pickle "
                               "(it then uses torch.load(weights_only=True)); better, convert it to safetensors")
        for path in self.files:
            if not path.is_file():
                raise InteropError(f"{path}: missing; the index lists it as a shard of this checkpoint")

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(path.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise InteropError(f"{path}: expected a JSON index with a \"weight_map\" ({error})") from error
        root = self.directory.resolve()
        if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and isinstance(file, str) and (root / file).resolve().parent == root
                for name, file in weight_map.items()):
            raise InteropError(f"{path}: weight_map: expected a mapping of tensor names to shard files in "
                               f"{self.directory}, got {weight_map!r:.200}")
        return weight_map

    def load(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Every tensor by name, and the file each came from (for error messages)."""
        tensors: dict[str, Tensor] = {}
        origins: dict[str, str] = {}
        if self.pickled:
            warnings.warn(f"{self.directory}: reading pickled weights because trust_pickle=True "
                          "(torch.load with weights_only=True)", UserWarning, stacklevel=4)
        for path in self.files:
            part = self._load_pickle(path) if self.pickled else self._load_safetensors(path)
            tensors.update(part)
            origins.update(dict.fromkeys(part, path.name))
        for name, file in (self.weight_map or {}).items():
            if origins.get(name) != file:
                raise InteropError(f"{self.directory / file}: does not hold {name!r}, which the index places there")
        return tensors, origins

    @staticmethod
    def _load_safetensors(path: Path) -> dict[str, Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise InteropError(f"{path}: not a readable safetensors file ({error})") from error

    @staticmethod
    def _load_pickle(path: Path) -> dict[str, Tensor]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types on a bad or unsafe file
            raise InteropError(f"{path}: not readable as a weights-only PyTorch checkpoint ({error})") from error
        if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
            raise InteropError(f"{path}: expected a mapping of tensor names to tensors, got {type(state).__name__}")
        return state


# ----- from Hugging Face -----


def _read_hf_config(directory: Path) -> _Fields:
    if not directory.is_dir():
        raise InteropError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory with "
                           f"{CONFIG_FILE} and {SAFETENSORS_FILE})")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InteropError(f"{path}: missing; a Hugging Face checkpoint directory holds {CONFIG_FILE} beside its "
                           "weights")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InteropError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if "formerkit" in data:
        raise InteropError(f"{path}: a formerkit model directory, not a Hugging Face one; read it with formerkit.load")
    return _Fields(data, str(path))


def _read_architecture(hf: _Fields, family: _Family) -> str:
    known = family.architectures(hf.model_type)
    value = hf.data.get("architectures", _MISSING)
    if not isinstance(value, list) or len(value) != 1 or value[0] not in known:
        hf.fail("architectures", f"a list of one of {', '.join(map(repr, known))}", value,
                hint="the class the weights were saved from decides the head")
    return value[0]


def _assign(model: torch.nn.Module, family: _Family, architecture: str, base: str, tensors: dict[str, Tensor],
            origins: dict[str, str], directory: Path) -> None:
    """Copies a checkpoint's tensors into ``model`` after checking that every weight the rules need is there, that
    nothing else is (buffers and checked copies of tied weights aside), and that every shape is the config's."""
    config = model.config
    rules = family.rules(config, base)
    params = dict(model.named_parameters())  # a tied weight appears once
    _check_coverage(rules, params, architecture)
    remaining = {name: tensor for name, tensor in tensors.items() if not family.buffers.search(name)}
    for copy, original in family.tied_copies(config, base).items():
        if copy in remaining:
            if original not in remaining or not torch.equal(remaining[copy], remaining[original]):
                raise InteropError(f"{directory / origins[copy]}: {copy} should equal {original}, which it is tied "
                                   "to, but differs (or the latter is absent); refusing to pick one")
            del remaining[copy]
    dropped = sorted(set(remaining) & family.unused(architecture, base))
    if dropped:
        warnings.warn(f"{directory}: dropping {', '.join(dropped)}: weights a {architecture} does not use "
                      "(transformers drops them too)", UserWarning, stacklevel=4)
        for name in dropped:
            del remaining[name]
    needed = [name for rule in rules for name in rule.theirs]
    missing = [name for name in needed if name not in remaining]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''})"
        raise InteropError(f"{directory}: weight {missing[0]!r} is missing{more if len(missing) > 1 else ''}; a "
                           f"{architecture} with this {CONFIG_FILE} needs it")
    extra = sorted(set(remaining) - set(needed))
    if extra:
        more = f" (and {len(extra) - 1} more: {', '.join(extra[1:6])})" if len(extra) > 1 else ""
        raise InteropError(f"{directory / origins[extra[0]]}: unexpected weight {extra[0]!r}{more}; it is not part "
                           f"of a {architecture} with this {CONFIG_FILE}, and formerkit does not drop weights silently")
    with torch.no_grad():
        for rule in rules:
            param = params[rule.ours]
            parts = [remaining[name] for name in rule.theirs]
            for name, part, shape in zip(rule.theirs, parts, rule.their_shapes(param.shape)):
                if tuple(part.shape) != shape:
                    raise InteropError(f"{directory / origins[name]}: {name} has shape {list(part.shape)}, but "
                                       f"{CONFIG_FILE} implies {list(shape)}")
            param.copy_(rule.to_ours(parts))


def _read_hf(directory: str | Path, trust_pickle: bool) -> tuple[torch.nn.Module, str, str]:
    """The model of a checkpoint directory, its model_type and its architecture."""
    from formerkit.models.transformer import build_model

    directory = Path(directory)
    hf = _read_hf_config(directory)
    family = _family_of(hf)
    architecture = _read_architecture(hf, family)
    tensors, origins = _WeightFiles(directory, trust_pickle).load()
    has_pooler = any(name.endswith("pooler.dense.weight") for name in tensors)
    try:
        config = family.read_config(hf, architecture, has_pooler)
    except ConfigError as error:
        raise InteropError(f"{hf.source}: describes a model formerkit cannot build: {error}") from error
    model = build_model(config)
    base = family.prefix if any(name.startswith(family.prefix) for name in tensors) else ""
    _assign(model, family, architecture, base, tensors, origins, directory)
    return model.eval(), hf.model_type, architecture


def from_hf(directory: str | Path, *, trust_pickle: bool = False) -> torch.nn.Module:
    """Reads a local Hugging Face checkpoint directory into a formerkit Transformer with the same outputs.

    The directory holds ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json`` with its
    shards). ``config.json``'s ``model_type`` picks the family (gpt2, llama, mistral, qwen2, bert, vit) and its
    ``architectures`` the head (e.g. BertForMaskedLM: the masked-LM head; BertModel: the pooler, if the weights hold
    one). A pickled ``pytorch_model.bin`` is refused unless ``trust_pickle`` is true (pickle can run code); then it is
    read with ``torch.load(weights_only=True)`` and a warning says so.

    The model comes back in eval mode, like transformers' ``from_pretrained``, with float32 weights whatever the
    checkpoint's dtype. Raises ``InteropError`` naming the field or tensor for anything formerkit would not reproduce
    exactly: an unknown model_type, a RoPE scaling scheme, a config value it does not implement, a missing weight, or
    an unexpected one (buffers such as GPT-2's ``attn.bias`` and LLaMA's ``rotary_emb.inv_freq`` are not weights and
    are ignored).
    """
    return _read_hf(directory, trust_pickle)[0]


# ----- to Hugging Face -----


def _write_hf(model: torch.nn.Module, directory: str | Path) -> tuple[str, str]:
    """Writes ``model`` as a Hugging Face checkpoint; returns its model_type and architecture."""
    from safetensors.torch import save_file

    from formerkit.checkpoint import _replace_atomically

    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, ModelConfig):
        raise InteropError(f"to_hf: expected a formerkit model with a .config ModelConfig, got {type(model).__name__}")
    family = _family_for(config)
    data = family.write_config(config)
    architecture = data["architectures"][0]
    _check_round_trip(family, config, data)
    rules = family.rules(config, "" if config.head.kind == "none" else family.prefix)
    params = dict(model.named_parameters())
    _check_coverage(rules, params, architecture)
    state = {}
    for rule in rules:
        for name, tensor in rule.to_theirs(params[rule.ours].detach()).items():
            # Each tensor gets storage of its own: safetensors refuses tensors sharing memory (q, k, v split from one
            # qkv) and a tied weight is written once, as transformers expects.
            state[name] = tensor.to("cpu").contiguous().clone()
    directory = Path(directory)
    stale = [name for name in (SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX) if (directory / name).exists()]
    if stale:
        raise InteropError(f"{directory}: already holds {', '.join(stale)}, which transformers could read instead of "
                           f"the {SAFETENSORS_FILE} written here; choose an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{SAFETENSORS_FILE}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt"})  # transformers checks the "format" entry
    _replace_atomically(tmp, directory / SAFETENSORS_FILE)
    tmp = directory / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    _replace_atomically(tmp, directory / CONFIG_FILE)
    return data["model_type"], architecture


def to_hf(model: torch.nn.Module, directory: str | Path) -> Path:
    """Writes a formerkit model as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``);
    returns the directory.

    The family follows from the config: a decoder over tokens with learned positions is GPT-2, with RoPE LLaMA
    (Mistral for sliding windows on every layer, Qwen2 for query/key/value-only biases or windows on some layers); an
    encoder over tokens is BERT, over patches ViT. The head picks the architecture written (GPT2LMHeadModel,
    LlamaForCausalLM, BertForMaskedLM, BertForSequenceClassification, BertModel, ViTForImageClassification,
    ViTModel, ...), which transformers' Auto classes load with no missing or unexpected weights and the same outputs.

    Before writing anything, the config.json is read back and compared with the model's config; anything the
    Hugging Face class cannot hold (qk_norm, LayerScale, shared layers, ALiBi, a conv stem, a BERT without its
    pooler, ...) is an ``InteropError`` naming the formerkit field. Other files in ``directory`` (a tokenizer) are left
    alone; one holding other weight files is refused.
    """
    _write_hf(model, directory)
    return Path(directory)


def convert(source: str | Path, out: str | Path, *, direction: str, trust_pickle: bool = False) -> dict[str, Any]:
    """Converts a checkpoint directory: ``direction="from_hf"`` reads a Hugging Face one and saves it with
    ``formerkit.save``; ``"to_hf"`` loads a formerkit one with ``formerkit.load`` and writes it with ``to_hf``.

    ``out`` must not exist or be empty (nothing is overwritten). ``trust_pickle`` applies to ``from_hf`` only.
    Returns a summary: direction, family (the Hugging Face model_type), architecture, parameters, source and out.
    """
    from formerkit.checkpoint import load, save

    if direction not in ("from_hf", "to_hf"):
        raise InteropError(f"convert: direction: expected 'from_hf' or 'to_hf', got {direction!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"convert: {out} already exists and is not empty; give a new or empty output directory "
                           "(nothing was written)")
    if direction == "from_hf":
        model, model_type, architecture = _read_hf(source, trust_pickle)
        save(model, out)
    else:
        model = load(source)
        model_type, architecture = _write_hf(model, out)
    return {"direction": direction, "family": model_type, "architecture": architecture,
            "parameters": sum(p.numel() for p in model.parameters()), "source": str(source), "out": str(out)}
