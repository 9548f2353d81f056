"""Training objectives: what the model is asked to predict, the loss, and the metrics reported on held-out data.

An objective turns a batch (a dict of tensors from a DataBundle) into a loss, and a split into metrics. Losses are means
over the batch's examples (or target tokens), so gradient accumulation and data parallelism average them correctly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.errors import ConfigError

__all__ = ["Objective", "make_objective"]


class Objective:
    """Base class. ``model_fields`` adds model config fields the objective needs (a [MASK] token, an output size)."""

    kind = "base"
    # The metric that "better" means by default, and its direction.
    primary_metric = "loss"
    higher_is_better = False

    def __init__(self, config, bundle):
        self.config = config
        self.bundle = bundle

    def model_fields(self) -> dict:
        return {}

    def check_model(self, model_config) -> None:
        """Raises ConfigError if the model cannot serve this objective (checked before training)."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the optimizer trains (the model itself, or a wrapper such as the MAE)."""
        return model

    def unwrap_model(self, trained: nn.Module) -> nn.Module:
        """The formerkit model inside what ``wrap_model`` returned: what a run saves."""
        return trained

    def loss(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def units(self, batch: dict[str, Tensor]) -> int:
        """What one batch counts for throughput (examples, or tokens for language models)."""
        return len(next(iter(batch.values())))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        raise NotImplementedError


def _cross_entropy(logits: Tensor, targets: Tensor, smoothing: float, ignore_index: int = -100) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           label_smoothing=smoothing, ignore_index=ignore_index)


class CausalLM(Objective):
    """Predict each next token. Loss in nats per token (per byte with the byte tokenizer)."""

    kind = "causal_lm"

    def check_model(self, model_config) -> None:
        if model_config.arch != "decoder" or model_config.head.kind != "lm":
            raise ConfigError("objective.kind", "causal_lm", "a decoder model with an lm head",
                              hint=f"the model is arch={model_config.arch!r}, head={model_config.head.kind!r}")

    def loss(self, model, batch, generator):
        tokens = batch["tokens"]
        return _cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], self.config.label_smoothing)

    def units(self, batch):
        tokens = batch["tokens"]
        return tokens.shape[0] * (tokens.shape[1] - 1)

    @torch.no_grad()
    def evaluate(self, model, batches):
        total, count = 0.0, 0
        for batch in batches:
            tokens = batch["tokens"]
            logits = model(tokens[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += tokens[:, 1:].numel()
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class MaskedLM(Objective):
    """BERT's masked LM: choose mask_prob of the tokens; of those, 80% become [MASK], 10% a random token, 10% stay;
    predict the original token at the chosen positions. [MASK] is one id past the tokenizer's vocabulary."""

    kind = "masked_lm"

    @property
    def mask_id(self) -> int:
        return self.bundle.model_fields["vocab_size"]

    def model_fields(self):
        return {"vocab_size": self.bundle.model_fields["vocab_size"] + 1}

    def check_model(self, model_config):
        if model_config.arch != "encoder" or model_config.head.kind != "masked_lm":
            raise ConfigError("objective.kind", "masked_lm", "an encoder model with a masked_lm head",
                              hint=f"the model is arch={model_config.arch!r}, head={model_config.head.kind!r}")

    def corrupt(self, tokens: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        chosen = torch.rand(tokens.shape, generator=generator) < self.config.mask_prob
        action = torch.rand(tokens.shape, generator=generator)
        random_tokens = torch.randint(self.mask_id, tokens.shape, generator=generator)
        inputs = torch.where(chosen & (action < 0.8), self.mask_id, tokens)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
        targets = torch.where(chosen, tokens, -100)
        return inputs, targets

    def loss(self, model, batch, generator):
        tokens = batch["tokens"][:, :-1]
        inputs, targets = self.corrupt(tokens, generator)
        return _cross_entropy(model(inputs), targets, self.config.label_smoothing)

    def units(self, batch):
        return batch["tokens"][:, :-1].numel()

    @torch.no_grad()
    def evaluate(self, model, batches):
        from formerkit.data.base import step_generator

        generator = step_generator(0, 7)  # the same corruption every evaluation
        total, correct, count = 0.0, 0, 0
        for batch in batches:
            inputs, targets = self.corrupt(batch["tokens"][:, :-1], generator)
            logits = model(inputs)
            chosen = targets != -100
            total += F.cross_entropy(logits[chosen].float(), targets[chosen], reduction="sum").item()
            correct += (logits[chosen].argmax(-1) == targets[chosen]).sum().item()
            count += chosen.sum().item()
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1)}


class Classification(Objective):
    kind = "classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def check_model(self, model_config):
        if model_config.head.kind != "classification":
            raise ConfigError("objective.kind", "classification", "a model with a classification head",
                              hint=f"the model's head is {model_config.head.kind!r}")

    def loss(self, model, batch, generator):
        return _cross_entropy(model(batch["inputs"]), batch["labels"], self.config.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model, batches):
        total, correct, count = 0.0, 0, 0
        for batch in batches:
            logits = model(batch["inputs"]).float()
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(batch["labels"])
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1)}


class SequenceToSequence(Objective):
    """Encoder-decoder: read the source, predict the target token by token (teacher forcing). ``exact_match`` is
    the fraction of sequences whose every target token is the argmax; that is exactly the fraction greedy decoding
    reproduces, since a greedy decoder that is right at every step sees the teacher-forced prefix."""

    kind = "seq2seq"
    primary_metric = "exact_match"
    higher_is_better = True

    def check_model(self, model_config):
        if model_config.arch != "encoder_decoder" or model_config.head.kind != "lm":
            raise ConfigError("objective.kind", "seq2seq", "an encoder_decoder model with an lm head",
                              hint=f"the model is arch={model_config.arch!r}, head={model_config.head.kind!r}")

    def _logits(self, model, batch):
        pad = self.bundle.preprocessing.get("pad_id", 0)
        return model(batch["source"], attention_mask=batch["source"] != pad,
                     decoder_input_ids=batch["decoder_input"])

    def loss(self, model, batch, generator):
        pad = self.bundle.preprocessing.get("pad_id", 0)
        return _cross_entropy(self._logits(model, batch), batch["target"], self.config.label_smoothing,
                              ignore_index=pad)

    def units(self, batch):
        return int((batch["target"] != self.bundle.preprocessing.get("pad_id", 0)).sum())

    @torch.no_grad()
    def evaluate(self, model, batches):
        pad = self.bundle.preprocessing.get("pad_id", 0)
        total, correct, tokens, exact, sequences = 0.0, 0, 0, 0, 0
        for batch in batches:
            logits = self._logits(model, batch).float()
            target = batch["target"]
            real = target != pad
            total += F.cross_entropy(logits[real], target[real], reduction="sum").item()
            right = (logits.argmax(-1) == target) | ~real
            correct += (right & real).sum().item()
            tokens += real.sum().item()
            exact += right.all(dim=1).sum().item()
            sequences += len(target)
        return {"loss": total / max(tokens, 1), "token_accuracy": correct / max(tokens, 1),
                "exact_match": exact / max(sequences, 1)}


class Forecast(Objective):
    """Predict the next ``horizon`` steps of a numeric series from a window (mean squared error, normalized units)."""

    kind = "forecast"

    def model_fields(self):
        return {}

    def check_model(self, model_config):
        if model_config.head.kind != "regression":
            raise ConfigError("objective.kind", "forecast", "a model with a regression head",
                              hint=f"the model's head is {model_config.head.kind!r}")

    def loss(self, model, batch, generator):
        prediction = model(batch["inputs"]).float()
        return F.mse_loss(prediction, batch["targets"].reshape(prediction.shape))

    @torch.no_grad()
    def evaluate(self, model, batches):
        squared, absolute, count = 0.0, 0.0, 0
        for batch in batches:
            prediction = model(batch["inputs"]).float()
            target = batch["targets"].reshape(prediction.shape)
            squared += F.mse_loss(prediction, target, reduction="sum").item()
            absolute += F.l1_loss(prediction, target, reduction="sum").item()
            count += target.numel()
        return {"loss": squared / max(count, 1), "mae": absolute / max(count, 1)}


class MaskedImageModeling(Objective):
    """Masked-autoencoder pretraining (He et al., 2022): see formerkit.models.mae."""

    kind = "mae"

    def check_model(self, model_config):
        if model_config.arch != "encoder" or model_config.stem.kind != "patches":
            raise ConfigError("objective.kind", "mae", "an encoder with a patches stem (a ViT)",
                              hint=f"the model is arch={model_config.arch!r}, stem={model_config.stem.kind!r}")

    def wrap_model(self, model):
        from formerkit.models.mae import MaskedAutoencoder

        config = self.config
        return MaskedAutoencoder(model, decoder_width=config.decoder_width, decoder_layers=config.decoder_layers,
                                 decoder_heads=config.decoder_heads, mask_ratio=config.mask_ratio,
                                 norm_pix_loss=config.norm_pix_loss)

    def unwrap_model(self, trained):
        return trained.encoder

    def loss(self, model, batch, generator):
        return model(batch["inputs"], generator=generator).loss

    @torch.no_grad()
    def evaluate(self, model, batches):
        from formerkit.data.base import step_generator

        generator = step_generator(0, 8)  # the same masks every evaluation
        total, count = 0.0, 0
        for batch in batches:
            total += model(batch["inputs"], generator=generator).loss.item() * len(batch["inputs"])
            count += len(batch["inputs"])
        return {"loss": total / max(count, 1)}


_OBJECTIVES = {cls.kind: cls for cls in (CausalLM, MaskedLM, Classification, SequenceToSequence, Forecast,
                                         MaskedImageModeling)}


def make_objective(config, bundle) -> Objective:
    return _OBJECTIVES[config.kind](config, bundle)
