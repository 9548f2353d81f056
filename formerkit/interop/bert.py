"""BERT checkpoints (``bert``: BertModel, BertForMaskedLM, BertForSequenceClassification) in and out; RoBERTa
(``formerkit.interop.roberta``) shares this code where its layout is BERT's."""

from __future__ import annotations

import re
from typing import Any

from formerkit.config import ModelConfig
from formerkit.errors import InteropError
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

__all__ = ["Bert"]


class Bert(Family):
    """BERT (Devlin et al., 2019): post-norm LayerNorm, learned positions and token types, a norm on the embeddings;
    with its pooler, masked-LM head or sequence-classification head as the architectures field says."""

    model_types = ("bert",)
    prefix = "bert."
    buffers = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")
    # BERT's masked-LM transform applies hidden_act, which formerkit's head holds only when it is exact GELU.
    transform_uses_hidden_act = True
    # Rows of the position table in front of position 0 (RoBERTa's padding offset); BERT has none.
    position_offset = 0

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"BertForMaskedLM": "masked_lm", "BertModel": "none", "BertForSequenceClassification": "classification"}

    def writes(self, config: ModelConfig) -> bool:
        return config.arch == "encoder" and config.stem.kind == "tokens"

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        hf.expect("position_embedding_type", "absolute", "formerkit's BERT adds a learned table of absolute "
                  "positions; the relative_key schemes are not implemented")
        hf.expect("is_decoder", False, "formerkit reads BERT as a bidirectional encoder")
        hf.expect("add_cross_attention", False, "an encoder-only BERT has no cross-attention")
        width = hf.integer("hidden_size")
        activation = hf.choice("hidden_act", ACTIVATIONS, "gelu", "the MLP's")
        dropout = hf.number("hidden_dropout_prob", 0.1)
        kind = self.architectures("bert")[architecture]
        if kind == "masked_lm":
            if self.transform_uses_hidden_act and activation != "gelu":
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
            max_seq_len=self.max_seq_len(hf), dropout=dropout,
            init_std=hf.number("initializer_range", 0.02),
            attention={"num_heads": hf.integer("num_attention_heads"),
                       "dropout": hf.number("attention_probs_dropout_prob", 0.1)},
            feedforward={"activation": activation,
                         "hidden_size": feedforward_hidden_size(hf.integer("intermediate_size"), width)},
            norm={"kind": "layernorm", "placement": "post", "eps": hf.number("layer_norm_eps", 1e-12)},
            position={"kind": "learned"},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size"),
                  "num_token_types": hf.integer("type_vocab_size", 2), "embedding_norm": True},
            head=head,
        )

    def max_seq_len(self, hf: Fields) -> int:
        rows = hf.integer("max_position_embeddings", 512)
        if rows <= self.position_offset:
            hf.fail("max_position_embeddings", f"an integer > {self.position_offset} (the position table's rows "
                    "before position 0, then one per position)", rows)
        return rows - self.position_offset

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        model_type = self.model_types[0]
        architecture = self.architecture_for(config, model_type)
        head = config.head
        if self.transform_uses_hidden_act and head.kind == "masked_lm" and config.feedforward.activation != "gelu":
            raise InteropError(f"to_hf: feedforward.activation: expected 'gelu' for a BertForMaskedLM, got "
                               f"{config.feedforward.activation!r} (its head transform shares the MLP's activation)")
        if config.stem.num_token_types < 1:
            raise InteropError(f"to_hf: stem.num_token_types: expected an integer >= 1 for a {architecture} "
                               "checkpoint (it always has a token-type table), got 0")
        data = {
            **self.header(config, architecture, model_type),
            "vocab_size": config.stem.vocab_size, "hidden_size": config.width,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.attention.num_heads,
            "intermediate_size": config.feedforward_size,
            "hidden_act": hf_name(ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                  architecture),
            "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention.dropout,
            "max_position_embeddings": config.max_seq_len + self.position_offset,
            "type_vocab_size": config.stem.num_token_types,
            "layer_norm_eps": config.norm.eps, "position_embedding_type": "absolute", "is_decoder": False,
            "add_cross_attention": False, "tie_word_embeddings": head.tie_embeddings,
        }
        if head.kind == "classification":
            data.update(classifier_dropout=head.dropout, **label_fields(head.num_classes))
        return data

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        return self.encoder_rules(config, base) + self.head_rules(config, base)

    def encoder_rules(self, config: ModelConfig, base: str) -> list[Rule]:
        """The embeddings and the layers: what BERT and RoBERTa name alike."""
        embeddings, rows = f"{base}embeddings", config.attention.num_heads * config.head_dim
        positions = (Rule("positions.weight", (f"{embeddings}.position_embeddings.weight",), "offset",
                          (self.position_offset,)) if self.position_offset
                     else Rule("positions.weight", (f"{embeddings}.position_embeddings.weight",)))
        rules = [Rule("stem.tokens.weight", (f"{embeddings}.word_embeddings.weight",)),
                 Rule("stem.token_types.weight", (f"{embeddings}.token_type_embeddings.weight",)), positions]
        rules += pair("embedding_norm", f"{embeddings}.LayerNorm")
        for i in range(config.num_layers):
            # Post-norm: attention.output.LayerNorm follows the attention residual, output.LayerNorm the MLP's.
            ours, theirs = f"encoder.blocks.{i}", f"{base}encoder.layer.{i}"
            rules += stack(f"{ours}.attention.qkv", [f"{theirs}.attention.self.{p}" for p in QKV_NAMES],
                           (rows, rows, rows), bias=True)
            rules += pair(f"{ours}.attention.out", f"{theirs}.attention.output.dense")
            rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.attention.output.LayerNorm")
            rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.intermediate.dense")
            rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.output.dense")
            rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.output.LayerNorm")
        return rules

    def head_rules(self, config: ModelConfig, base: str) -> list[Rule]:
        """The pooler and the task head."""
        head = config.head
        rules = pair("head.pooler", f"{base}pooler.dense") if head.pooler else []
        if head.kind == "masked_lm":
            predictions = "cls.predictions"
            rules += pair("head.dense", f"{predictions}.transform.dense")
            rules += pair("head.norm", f"{predictions}.transform.LayerNorm")
            rules.append(Rule("head.projection.bias", (f"{predictions}.bias",)))
            if not head.tie_embeddings:
                rules.append(Rule("head.projection.weight", (f"{predictions}.decoder.weight",)))
        if head.kind == "classification":
            rules += pair("head.projection", "classifier")
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
