"""DistilBERT checkpoints (``distilbert``: DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification)
in and out.

DistilBERT (Sanh et al., 2019) is a post-norm BERT without token types or pooler, every LayerNorm with eps 1e-12.
Its classification head reads the first token through ``pre_classifier`` and a ReLU: formerkit's pooler with
``head.pooler_activation: relu``. With ``sinusoidal_pos_embds`` the file still stores the position table (frozen in
transformers); formerkit reads it as its own sinusoidal table when the two are equal to the last bit, which
``sinusoidal_table_of_distilbert`` decides from the sizes alone, and as a learned table otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from formerkit.config import ModelConfig
from formerkit.interop.engine import (
    ACTIVATION_NAMES,
    ACTIVATIONS,
    Family,
    Rule,
    feedforward_hidden_size,
    hf_name,
    label_fields,
    pair,
    stack,
)
from formerkit.interop.files import Fields
from formerkit.nn.positions import sinusoidal_table

__all__ = ["DistilBert", "sinusoidal_table_of_distilbert"]

# DistilBERT's LayerNorms all use this eps; its config has no field for it.
NORM_EPS = 1e-12


def sinusoidal_table_of_distilbert(num_positions: int, width: int) -> Tensor:
    """The table transformers writes for ``sinusoidal_pos_embds``: channel j of position p is sin (even j) or cos
    (odd j) of p / 10000^(2 * (j // 2) / width), computed in float64 with numpy, then rounded to float32. formerkit's
    ``sinusoidal_table`` is the same formula evaluated with torch; the two can differ in the last bit."""
    angles = np.arange(num_positions)[:, None] / np.power(10000, 2 * (np.arange(width) // 2) / width)[None, :]
    table = np.empty((num_positions, width))
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.from_numpy(table).float()


class DistilBert(Family):
    """DistilBERT: post-norm LayerNorm, learned (or fixed sinusoidal) positions, a norm on the embeddings, no token
    types; with its masked-LM head, its sequence-classification head or none, as the architectures field says."""

    model_types = ("distilbert",)
    prefix = "distilbert."
    buffers = re.compile(r"(^|\.)embeddings\.position_ids$")

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"DistilBertForMaskedLM": "masked_lm", "DistilBertModel": "none",
                "DistilBertForSequenceClassification": "classification"}

    def writes(self, config: ModelConfig) -> bool:
        return config.arch == "encoder" and config.stem.kind == "tokens" and config.stem.num_token_types == 0

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        width, positions = hf.integer("dim"), hf.integer("max_position_embeddings", 512)
        activation = hf.choice("activation", ACTIVATIONS, "gelu", "the MLP's")
        kind = self.architectures("distilbert")[architecture]
        if kind == "masked_lm":
            if activation != "gelu":
                hf.fail("activation", "'gelu' for a DistilBertForMaskedLM", hf.value("activation"),
                        hint="its vocab_transform applies the MLP's activation; formerkit's masked-LM head uses "
                             "exact GELU")
            head = {"kind": "masked_lm", "tie_embeddings": hf.flag("tie_word_embeddings", True)}
        elif kind == "classification":
            head = {"kind": "classification", "num_classes": hf.num_labels(), "pooling": "cls", "pooler": True,
                    "pooler_activation": "relu", "dropout": hf.number("seq_classif_dropout", 0.2)}
        else:
            head = {"kind": "none"}
        sinusoidal = hf.flag("sinusoidal_pos_embds", False) and torch.equal(
            sinusoidal_table(positions, width), sinusoidal_table_of_distilbert(positions, width))
        return ModelConfig(
            arch="encoder", width=width, num_layers=hf.integer("n_layers"), max_seq_len=positions,
            dropout=hf.number("dropout", 0.1), init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": hf.integer("n_heads"), "dropout": hf.number("attention_dropout", 0.1)},
            feedforward={"activation": activation,
                         "hidden_size": feedforward_hidden_size(hf.integer("hidden_dim"), width)},
            norm={"kind": "layernorm", "placement": "post", "eps": NORM_EPS},
            position={"kind": "sinusoidal" if sinusoidal else "learned"},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size"), "embedding_norm": True},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "distilbert")
        head = config.head
        data = {
            **self.header(config, architecture, "distilbert"),
            "vocab_size": config.stem.vocab_size, "dim": config.width, "n_layers": config.num_layers,
            "n_heads": config.attention.num_heads, "hidden_dim": config.feedforward_size,
            "activation": hf_name(ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "dropout": config.dropout, "attention_dropout": config.attention.dropout,
            "max_position_embeddings": config.max_seq_len,
            "sinusoidal_pos_embds": config.position.kind == "sinusoidal",
            "tie_word_embeddings": head.tie_embeddings,
        }
        if head.kind == "classification":
            data.update(seq_classif_dropout=head.dropout, **label_fields(head.num_classes))
        return data

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        embeddings, rows = f"{base}embeddings", config.attention.num_heads * config.head_dim
        rules = [Rule("stem.tokens.weight", (f"{embeddings}.word_embeddings.weight",))]
        if config.position.kind == "learned":
            rules.append(Rule("positions.weight", (f"{embeddings}.position_embeddings.weight",)))
        rules += pair("embedding_norm", f"{embeddings}.LayerNorm")
        for i in range(config.num_layers):
            # Post-norm: sa_layer_norm follows the attention residual, output_layer_norm the MLP's.
            ours, theirs = f"encoder.blocks.{i}", f"{base}transformer.layer.{i}"
            rules += stack(f"{ours}.attention.qkv", [f"{theirs}.attention.{p}_lin" for p in "qkv"],
                           (rows, rows, rows), bias=True)
            rules += pair(f"{ours}.attention.out", f"{theirs}.attention.out_lin")
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.sa_layer_norm")
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.ffn.lin1")
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.ffn.lin2")
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.output_layer_norm")
        head = config.head
        if head.kind == "masked_lm":
            rules += pair("head.dense", "vocab_transform")
            rules += pair("head.norm", "vocab_layer_norm")
            rules.append(Rule("head.projection.bias", ("vocab_projector.bias",)))
            if not head.tie_embeddings:
                rules.append(Rule("head.projection.weight", ("vocab_projector.weight",)))
        if head.kind == "classification":
            rules += pair("head.pooler", "pre_classifier")
            rules += pair("head.projection", "classifier")
        return rules

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        if config.head.kind == "masked_lm" and config.head.tie_embeddings:
            return {"vocab_projector.weight": f"{base}embeddings.word_embeddings.weight"}
        return {}

    def fixed(self, config: ModelConfig, base: str) -> dict[str, Tensor]:
        if config.position.kind != "sinusoidal":
            return {}
        return {f"{base}embeddings.position_embeddings.weight": sinusoidal_table(config.max_seq_len, config.width)}
