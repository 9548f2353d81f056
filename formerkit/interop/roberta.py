"""RoBERTa checkpoints (``roberta``: RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification) in and out.

RoBERTa (Liu et al., 2019) is BERT's architecture (``formerkit.interop.bert``) with three differences in the files:

- Positions. transformers numbers a token's position from its ids: a real token (id != pad_token_id) at count k
  (0, 1, 2, ... over real tokens) reads row ``pad_token_id + 1 + k`` of the table; padding reads row pad_token_id.
  formerkit counts real tokens from the attention mask, so its table is the file's without its first
  pad_token_id + 1 rows, and max_seq_len is max_position_embeddings - (pad_token_id + 1). Written back, those rows
  are zeros: no real token reads them (row pad_token_id is what padding reads, and transformers initializes it to
  zeros too, as nn.Embedding's padding_idx row). The two numberings agree whenever padding, and only padding, has
  the id pad_token_id.
- The masked-LM head (``lm_head``: dense -> exact GELU -> layer_norm -> decoder tied to the word embeddings, plus a
  bias) applies GELU whatever hidden_act says; formerkit's masked-LM head does the same.
- The classification head (``classifier``: dense -> tanh -> out_proj on the first token) is formerkit's pooler
  (``head.pooler``) and projection; the base model inside it has no pooler of its own.
"""

from __future__ import annotations

from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.bert import Bert
from formerkit.interop.engine import Rule, pair
from formerkit.interop.files import Fields

__all__ = ["Roberta"]

# RoBERTa's padding id, which sets the position offset. Every RoBERTa checkpoint published uses 1 (fairseq's <pad>);
# the offset enters the weight rules, which see the config formerkit built and not the file, so other ids are refused.
PAD_TOKEN_ID = 1


class Roberta(Bert):
    """RoBERTa: BERT's layers with positions offset by pad_token_id + 1 and its own head names."""

    model_types = ("roberta",)
    prefix = "roberta."
    transform_uses_hidden_act = False
    position_offset = PAD_TOKEN_ID + 1

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"RobertaForMaskedLM": "masked_lm", "RobertaModel": "none",
                "RobertaForSequenceClassification": "classification"}

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        pad = hf.value("pad_token_id", PAD_TOKEN_ID)
        if pad != PAD_TOKEN_ID or isinstance(pad, bool):
            hf.fail("pad_token_id", repr(PAD_TOKEN_ID), pad,
                    hint="RoBERTa's positions start after the padding id; formerkit maps the table with RoBERTa's "
                         "own offset of 2 rows")
        return super().read_config(hf, architecture, has_pooler)

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        # transformers needs the padding id to number positions; formerkit has none of its own, so RoBERTa's is
        # written (inputs padded with it get the positions formerkit gives them).
        return {**super().write_config(config), "pad_token_id": PAD_TOKEN_ID}

    def head_rules(self, config: ModelConfig, base: str) -> list[Rule]:
        head, rules = config.head, []
        if head.kind == "none" and head.pooler:
            rules += pair("head.pooler", f"{base}pooler.dense")
        if head.kind == "masked_lm":
            rules += pair("head.dense", "lm_head.dense")
            rules += pair("head.norm", "lm_head.layer_norm")
            rules.append(Rule("head.projection.bias", ("lm_head.bias",)))
            if not head.tie_embeddings:
                rules.append(Rule("head.projection.weight", ("lm_head.decoder.weight",)))
        if head.kind == "classification":
            rules += pair("head.pooler", "classifier.dense")
            rules += pair("head.projection", "classifier.out_proj")
        return rules

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        if config.head.kind != "masked_lm":
            return {}
        copies = {"lm_head.decoder.bias": "lm_head.bias"}
        if config.head.tie_embeddings:
            copies["lm_head.decoder.weight"] = f"{base}embeddings.word_embeddings.weight"
        return copies

    def unused(self, architecture: str, base: str) -> set[str]:
        # A RobertaForMaskedLM file may hold the pooler of the model it was trained as; RobertaForMaskedLM has none.
        if architecture != "RobertaForMaskedLM":
            return set()
        return {f"{base}pooler.dense.weight", f"{base}pooler.dense.bias"}
