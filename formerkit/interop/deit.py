"""DeiT checkpoints (``deit``: DeiTForImageClassificationWithTeacher, DeiTForImageClassification, DeiTModel) in and
out.

DeiT (Touvron et al., 2021) is ViT's layout (``formerkit.interop.vit``) with a distillation token after the class
token, both with positions (formerkit's ``stem.distill_token``). DeiTForImageClassificationWithTeacher reads the class
token with ``cls_classifier`` and the distillation token with ``distillation_classifier`` and averages the two:
formerkit's classification head with its distillation head. DeiTForImageClassification carries the distillation token
through the layers but classifies from the class token alone: ``head.distill_head: false``. DeiTModel returns the
hidden states (both tokens included) and its pooler's output on the class token.
"""

from __future__ import annotations

from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.engine import Rule, pair
from formerkit.interop.files import Fields
from formerkit.interop.vit import ViT

__all__ = ["DeiT"]


class DeiT(ViT):
    """DeiT: ViT with a distillation token and, with the teacher's head, two classifiers averaged."""

    model_types = ("deit",)
    prefix = "deit."
    distill_token = True

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"DeiTForImageClassificationWithTeacher": "classification",
                "DeiTForImageClassification": "classification", "DeiTModel": "none"}

    def writes(self, config: ModelConfig) -> bool:
        return super().writes(config) and config.stem.distill_token

    def read_head(self, hf: Fields, architecture: str, has_pooler: bool, width: int) -> dict[str, Any]:
        head = super().read_head(hf, architecture, has_pooler, width)
        if architecture == "DeiTForImageClassification":
            head["distill_head"] = False
        return head

    def architecture_for(self, config: ModelConfig, model_type: str) -> str:
        if config.head.kind == "classification":
            return ("DeiTForImageClassificationWithTeacher" if config.head.distill_head
                    else "DeiTForImageClassification")
        return super().architecture_for(config, model_type)

    def head_rules(self, config: ModelConfig) -> list[Rule]:
        head = config.head
        if head.kind != "classification":
            return []
        if not head.distill_head:
            return pair("head.projection", "classifier")
        return pair("head.projection", "cls_classifier") + pair("head.distill_projection", "distillation_classifier")
