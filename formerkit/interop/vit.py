"""ViT checkpoints (``vit``: ViTModel, ViTForImageClassification) in and out; DeiT (``formerkit.interop.deit``)
shares this code."""

from __future__ import annotations

from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.engine import (
    ACTIVATION_NAMES,
    ACTIVATIONS,
    QKV_NAMES,
    Family,
    Rule,
    feedforward_hidden_size,
    hf_name,
    label_fields,
    pair,
    stack,
)
from formerkit.interop.files import Fields

__all__ = ["ViT"]


class ViT(Family):
    """ViT (Dosovitskiy et al., 2021): patch embedding with a class token, learned positions, pre-norm LayerNorm;
    a classification head on the class token, or (ViTModel) the hidden states and an optional tanh pooler."""

    model_types = ("vit",)
    prefix = "vit."
    # DeiT's embeddings add a distillation token after the class token.
    distill_token = False

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"ViTForImageClassification": "classification", "ViTModel": "none"}

    def writes(self, config: ModelConfig) -> bool:
        return config.arch == "encoder" and config.stem.kind == "patches"

    @staticmethod
    def _sides(hf: Fields, name: str, default: int) -> tuple[int, int]:
        value = hf.value(name, default)
        sides = [value, value] if isinstance(value, int) else value
        if (not isinstance(sides, list) or len(sides) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides)):
            hf.fail(name, "an integer >= 1 or a list [height, width] of them", value)
        return sides[0], sides[1]

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width = hf.integer("hidden_size")
        patch = self._sides(hf, "patch_size", 16)
        if patch[0] != patch[1]:
            hf.fail("patch_size", "square patches", hf.value("patch_size"), hint="formerkit's patch_size is one side")
        return ModelConfig(
            arch="encoder", width=width, num_layers=hf.integer("num_hidden_layers"), max_seq_len=None,
            dropout=hf.number("hidden_dropout_prob", 0.0), init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": hf.integer("num_attention_heads"), "qkv_bias": hf.flag("qkv_bias", True),
                       "dropout": hf.number("attention_probs_dropout_prob", 0.0)},
            feedforward={"activation": hf.choice("hidden_act", ACTIVATIONS, "gelu", "the MLP's"),
                         "hidden_size": feedforward_hidden_size(hf.integer("intermediate_size"), width)},
            norm={"kind": "layernorm", "placement": "pre", "eps": hf.number("layer_norm_eps", 1e-12)},
            position={"kind": "learned"},
            stem={"kind": "patches", "image_size": list(self._sides(hf, "image_size", 224)), "patch_size": patch[0],
                  "in_channels": hf.integer("num_channels", 3), "class_token": True,
                  "distill_token": self.distill_token},
            head=self.read_head(hf, architecture, has_pooler, width),
        )

    def read_head(self, hf: Fields, architecture: str, has_pooler: bool, width: int) -> dict[str, Any]:
        """The head section: a classifier on the class token, or the base model with its pooler if it has one."""
        if self.architectures(hf.model_type)[architecture] == "classification":
            return {"kind": "classification", "num_classes": hf.num_labels(), "pooling": "cls"}
        head = {"kind": "none", "pooler": has_pooler, "pooling": "cls" if has_pooler else None}
        if has_pooler:
            head["pooler_activation"] = hf.choice("pooler_act", {"tanh": "tanh", "relu": "relu"}, "tanh",
                                                  "formerkit's pooler is a dense layer with tanh or relu")
            if hf.integer("pooler_output_size", None, nullable=True) not in (None, width):
                hf.fail("pooler_output_size", f"null or hidden_size ({width})", hf.value("pooler_output_size"))
        return head

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        model_type = self.model_types[0]
        architecture = self.architecture_for(config, model_type)
        stem, head = config.stem, config.head
        height, width = stem.image_size
        data = {
            **self.header(config, architecture, model_type),
            "hidden_size": config.width, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.attention.num_heads, "intermediate_size": config.feedforward_size,
            "hidden_act": hf_name(ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention.dropout,
            "layer_norm_eps": config.norm.eps, "image_size": height if height == width else [height, width],
            "patch_size": stem.patch_size, "num_channels": stem.in_channels, "qkv_bias": config.attention.qkv_bias,
            "encoder_stride": stem.patch_size, "pooler_act": head.pooler_activation, "pooler_output_size": config.width,
        }
        if head.kind == "classification":
            data.update(label_fields(head.num_classes))
        return data

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        embeddings, rows = f"{base}embeddings", config.attention.num_heads * config.head_dim
        # The position table is [1, tokens, width] in transformers; its first row belongs to the class token in both.
        rules = [Rule("stem.class_token", (f"{embeddings}.cls_token",)),
                 Rule("positions.weight", (f"{embeddings}.position_embeddings",), "batched")]
        if config.stem.distill_token:
            rules.append(Rule("stem.distill_token", (f"{embeddings}.distillation_token",)))
        rules += pair("stem.projection", f"{embeddings}.patch_embeddings.projection")
        for i in range(config.num_layers):
            # Pre-norm: layernorm_before feeds attention, layernorm_after the MLP.
            ours, theirs = f"encoder.blocks.{i}", f"{base}encoder.layer.{i}"
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.layernorm_before")
            rules += stack(f"{ours}.attention.qkv", [f"{theirs}.attention.attention.{p}" for p in QKV_NAMES],
                           (rows, rows, rows), bias=config.attention.qkv_bias)
            rules += pair(f"{ours}.attention.out", f"{theirs}.attention.output.dense")
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.layernorm_after")
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.intermediate.dense")
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.output.dense")
        rules += pair("encoder.final_norm", f"{base}layernorm")
        if config.head.pooler:
            rules += pair("head.pooler", f"{base}pooler.dense")
        return rules + self.head_rules(config)

    def head_rules(self, config: ModelConfig) -> list[Rule]:
        return pair("head.projection", "classifier") if config.head.kind == "classification" else []
