"""Training objectives: what the model is asked to predict, the loss, and the metrics reported on held-out data.

An objective turns a batch (a dict of tensors from a DataBundle) into a loss, and a split into metrics. Losses are means
over the batch's examples (or target tokens), so gradient accumulation and data parallelism average them correctly.

A model with mixture-of-experts layers adds its auxiliary (load-balancing) loss to every objective's training loss, and
its evaluation metrics gain ``moe_aux_loss``, ``moe_load_max`` and ``moe_load_entropy`` (see ``ExpertUsage``). Dense
models are called exactly as before (logits only).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.errors import ConfigError

__all__ = ["ExpertUsage", "Objective", "make_objective"]


class ExpertUsage:
    """What the mixture-of-experts layers of a model report over evaluation batches, as metrics.

    moe_aux_loss: the mean auxiliary loss the training objective adds (aux_loss_weight x the layers' summed
        load-balancing losses).
    moe_load_max: per layer, the busiest expert's share of the token assignments times the number of experts (1 is
        perfectly even; num_experts / experts_per_token is one expert taking every token), averaged over the layers.
    moe_load_entropy: per layer, the entropy of the experts' shares of the assignments divided by log(num_experts)
        (1 is perfectly even, 0 one expert), averaged over the layers.
    """

    def __init__(self):
        self.aux_loss, self.batches, self.counts = 0.0, 0, None

    def add(self, output) -> None:
        """Adds one forward pass's ``ModelOutput`` (nothing for a dense model, whose aux_loss is None)."""
        if output is None or output.aux_loss is None:
            return
        self.aux_loss += float(output.aux_loss)
        self.batches += 1
        counts = torch.stack(output.expert_counts).double().cpu()
        self.counts = counts if self.counts is None else self.counts + counts

    def metrics(self) -> dict[str, float]:
        if not self.batches:
            return {}
        share = self.counts / self.counts.sum(dim=1, keepdim=True).clamp(min=1)
        num_experts = share.shape[1]
        entropy = -(share * share.clamp(min=1e-12).log()).sum(dim=1) / math.log(num_experts)
        return {"moe_aux_loss": self.aux_loss / self.batches,
                "moe_load_max": float((share.max(dim=1).values * num_experts).mean()),
                "moe_load_entropy": float(entropy.mean())}


def _has_experts(model: nn.Module, known: weakref.WeakKeyDictionary) -> bool:
    """Whether ``model`` (or the formerkit model inside a DDP/FSDP wrapper) has mixture-of-experts layers."""
    if model not in known:
        from formerkit.nn.moe import MoEFeedForward

        known[model] = any(isinstance(module, MoEFeedForward) for module in model.modules())
    return known[model]


class Objective:
    """Base class. ``model_fields`` adds model config fields the objective needs (a [MASK] token, an output size)."""

    kind = "base"
    # The metric that "better" means by default, and its direction.
    primary_metric = "loss"
    higher_is_better = False

    def __init__(self, config, bundle):
        self.config = config
        self.bundle = bundle
        self._mixtures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def run(self, model: nn.Module, *args, usage: ExpertUsage | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
        """The model's output (logits) and, for a model with mixture-of-experts layers, its auxiliary loss (else
        None). Only such a model is asked for its full ``ModelOutput``; ``usage`` collects what its layers report."""
        if not _has_experts(model, self._mixtures):
            return model(*args, **kwargs), None
        output = model(*args, return_outputs=True, **kwargs)
        if usage is not None:
            usage.add(output)
        return output.logits, output.aux_loss

    @staticmethod
    def with_aux(loss: Tensor, aux_loss: Tensor | None) -> Tensor:
        """The training loss: the objective's own loss plus the model's auxiliary loss, if it has one."""
        return loss if aux_loss is None else loss + aux_loss

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
        logits, aux_loss = self.run(model, tokens[:, :-1])
        return self.with_aux(_cross_entropy(logits, tokens[:, 1:], self.config.label_smoothing), aux_loss)

    def units(self, batch):
        tokens = batch["tokens"]
        return tokens.shape[0] * (tokens.shape[1] - 1)

    @torch.no_grad()
    def evaluate(self, model, batches):
        total, count, usage = 0.0, 0, ExpertUsage()
        for batch in batches:
            tokens = batch["tokens"]
            logits, _ = self.run(model, tokens[:, :-1], usage=usage)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += tokens[:, 1:].numel()
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), **usage.metrics()}


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
        logits, aux_loss = self.run(model, inputs)
        return self.with_aux(_cross_entropy(logits, targets, self.config.label_smoothing), aux_loss)

    def units(self, batch):
        return batch["tokens"][:, :-1].numel()

    @torch.no_grad()
    def evaluate(self, model, batches):
        from formerkit.data.base import step_generator

        generator = step_generator(0, 7)  # the same corruption every evaluation
        total, correct, count, usage = 0.0, 0, 0, ExpertUsage()
        for batch in batches:
            inputs, targets = self.corrupt(batch["tokens"][:, :-1], generator)
            logits, _ = self.run(model, inputs, usage=usage)
            chosen = targets != -100
            total += F.cross_entropy(logits[chosen].float(), targets[chosen], reduction="sum").item()
            correct += (logits[chosen].argmax(-1) == targets[chosen]).sum().item()
            count += chosen.sum().item()
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1), **usage.metrics()}


class Classification(Objective):
    kind = "classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def check_model(self, model_config):
        if model_config.head.kind != "classification":
            raise ConfigError("objective.kind", "classification", "a model with a classification head",
                              hint=f"the model's head is {model_config.head.kind!r}")

    def loss(self, model, batch, generator):
        logits, aux_loss = self.run(model, batch["inputs"])
        return self.with_aux(_cross_entropy(logits, batch["labels"], self.config.label_smoothing), aux_loss)

    @torch.no_grad()
    def evaluate(self, model, batches):
        total, correct, count, usage = 0.0, 0, 0, ExpertUsage()
        for batch in batches:
            logits = self.run(model, batch["inputs"], usage=usage)[0].float()
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(batch["labels"])
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1), **usage.metrics()}


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

    def _logits(self, model, batch, usage: ExpertUsage | None = None) -> tuple[Tensor, Tensor | None]:
        pad = self.bundle.preprocessing.get("pad_id", 0)
        return self.run(model, batch["source"], attention_mask=batch["source"] != pad,
                        decoder_input_ids=batch["decoder_input"], usage=usage)

    def loss(self, model, batch, generator):
        pad = self.bundle.preprocessing.get("pad_id", 0)
        logits, aux_loss = self._logits(model, batch)
        return self.with_aux(_cross_entropy(logits, batch["target"], self.config.label_smoothing, ignore_index=pad),
                             aux_loss)

    def units(self, batch):
        return int((batch["target"] != self.bundle.preprocessing.get("pad_id", 0)).sum())

    @torch.no_grad()
    def evaluate(self, model, batches):
        pad = self.bundle.preprocessing.get("pad_id", 0)
        total, correct, tokens, exact, sequences, usage = 0.0, 0, 0, 0, 0, ExpertUsage()
        for batch in batches:
            logits = self._logits(model, batch, usage)[0].float()
            target = batch["target"]
            real = target != pad
            total += F.cross_entropy(logits[real], target[real], reduction="sum").item()
            right = (logits.argmax(-1) == target) | ~real
            correct += (right & real).sum().item()
            tokens += real.sum().item()
            exact += right.all(dim=1).sum().item()
            sequences += len(target)
        return {"loss": total / max(tokens, 1), "token_accuracy": correct / max(tokens, 1),
                "exact_match": exact / max(sequences, 1), **usage.metrics()}


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
        prediction, aux_loss = self.run(model, batch["inputs"])
        prediction = prediction.float()
        return self.with_aux(F.mse_loss(prediction, batch["targets"].reshape(prediction.shape)), aux_loss)

    @torch.no_grad()
    def evaluate(self, model, batches):
        squared, absolute, count, usage = 0.0, 0.0, 0, ExpertUsage()
        for batch in batches:
            prediction = self.run(model, batch["inputs"], usage=usage)[0].float()
            target = batch["targets"].reshape(prediction.shape)
            squared += F.mse_loss(prediction, target, reduction="sum").item()
            absolute += F.l1_loss(prediction, target, reduction="sum").item()
            count += target.numel()
        return {"loss": squared / max(count, 1), "mae": absolute / max(count, 1), **usage.metrics()}


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
