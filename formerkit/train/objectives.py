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

from formerkit.data.base import step_generator
from formerkit.errors import ConfigError
from formerkit.models.early_exit import exit_logits
from formerkit.models.mae import MaskedAutoencoder
from formerkit.nn.masks import DocumentMask
from formerkit.nn.moe import MoEFeedForward

__all__ = ["ExpertUsage", "Objective", "make_objective", "objective_class", "register_objective"]


class ExpertUsage:
    """What the mixture-of-experts layers of a model report over forward passes (evaluation batches, or the training
    steps between two log lines), as metrics.

    moe_aux_loss: the mean auxiliary loss the training objective adds (aux_loss_weight x the layers' summed
        load-balancing losses), over the passes.
    moe_load_max: per layer, the busiest expert's share of the token assignments times the number of experts (1 is
        perfectly even; num_experts / experts_per_token is one expert taking every token), averaged over the layers.
    moe_load_entropy: per layer, the entropy of the experts' shares of the assignments divided by log(num_experts)
        (1 is perfectly even, 0 one expert), averaged over the layers.

    ``add`` only adds tensors where they are (no copy to the CPU, no synchronization with an accelerator), so the
    trainer can call it on every step; ``metrics`` reads them once.
    """

    def __init__(self):
        self.aux_loss: Tensor | None = None
        self.counts: Tensor | None = None
        self.batches = 0

    def add(self, output) -> None:
        """Adds one forward pass's ``ModelOutput`` (nothing for a dense model, whose aux_loss is None)."""
        if output is None or output.aux_loss is None:
            return
        aux_loss = output.aux_loss.detach().float()
        counts = torch.stack(output.expert_counts).detach()
        self.aux_loss = aux_loss if self.aux_loss is None else self.aux_loss + aux_loss
        self.counts = counts if self.counts is None else self.counts + counts
        self.batches += 1

    def metrics(self) -> dict[str, float]:
        if not self.batches:
            return {}
        counts = self.counts.double().cpu()
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        num_experts = share.shape[1]
        entropy = -(share * share.clamp(min=1e-12).log()).sum(dim=1) / math.log(num_experts)
        return {"moe_aux_loss": float(self.aux_loss) / self.batches,
                "moe_load_max": float((share.max(dim=1).values * num_experts).mean()),
                "moe_load_entropy": float(entropy.mean())}


def _has_experts(model: nn.Module, known: weakref.WeakKeyDictionary) -> bool:
    """Whether ``model`` (or the formerkit model inside a DDP/FSDP wrapper) has mixture-of-experts layers."""
    if model not in known:
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
        # Where training losses report their passes' expert usage (set by the trainer for models with mixture-of-
        # experts layers, read and replaced at every log line); evaluation collects its own.
        self.training_usage: ExpertUsage | None = None

    def has_experts(self, model: nn.Module) -> bool:
        """Whether ``model`` (or the model inside a DDP/FSDP wrapper) has mixture-of-experts layers."""
        return _has_experts(model, self._mixtures)

    def run(self, model: nn.Module, *args, usage: ExpertUsage | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
        """The model's output (logits) and, for a model with mixture-of-experts layers, its auxiliary loss (else
        None). Only such a model is asked for its full ``ModelOutput``; ``usage`` (by default ``training_usage``)
        collects what its layers report."""
        if not _has_experts(model, self._mixtures):
            return model(*args, **kwargs), None
        output = model(*args, return_outputs=True, **kwargs)
        usage = usage if usage is not None else self.training_usage
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
        """The training loss of ``batch``. The trainer's ``generator`` is a ``ProcessGenerator``: this process's own
        stream, and, through ``RowDraws.of(generator, rows)``, draws per example that do not depend on how the global
        batch is split between processes (what a stochastic objective uses, so DDP follows one process)."""
        raise NotImplementedError

    def snapshot(self, model: nn.Module, run_dir, step: int) -> None:
        """Called after each evaluation (rank 0) with the evaluated model: generative objectives write samples into
        the run directory (the report shows them); the others do nothing. Must leave every random state alone."""

    def units(self, batch: dict[str, Tensor]) -> int:
        """What one batch counts for throughput (examples, or tokens for language models)."""
        return len(next(iter(batch.values())))

    @torch.no_grad()
    def mean_loss(self, batches: Iterable[dict[str, Tensor]], batch_loss, rows: str, stream: int) -> dict[str, float]:
        """{"loss": the mean of ``batch_loss(batch, generator, usage)[0]`` over ``batches``, each weighted by its
        number of rows (``batch[rows]``), and the expert usage}: an evaluation of a stochastic objective, drawing the
        same noise every time (a generator seeded with ``stream``)."""
        generator = step_generator(0, stream)
        total, count, usage = 0.0, 0, ExpertUsage()
        for batch in batches:
            loss, _ = batch_loss(batch, generator, usage)
            total += loss.item() * len(batch[rows])
            count += len(batch[rows])
        return {"loss": total / max(count, 1), **usage.metrics()}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        raise NotImplementedError


def _cross_entropy(logits: Tensor, targets: Tensor, smoothing: float, ignore_index: int = -100) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           label_smoothing=smoothing, ignore_index=ignore_index)


def _mean_over_targets(logits: Tensor, targets: Tensor, smoothing: float) -> Tensor:
    """The cross-entropy averaged over the targets that are not -100, and 0 (not NaN) when there are none: a batch
    of packed rows may, rarely, hold no token to predict."""
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            label_smoothing=smoothing, ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def _is_packed(batch: dict[str, Tensor]) -> bool:
    return "document_ids" in batch


def _packed_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's keyword arguments for packed rows (see formerkit.data.packing), inputs being ``tokens[:, :-1]``:
    a token attends only to its own document, at its position within the document; padding (document -1) is also
    left out of mixture-of-experts routing through ``attention_mask``."""
    ids = batch["document_ids"][:, :-1]
    return {"mask": DocumentMask(ids), "position_ids": batch["position_ids"][:, :-1], "attention_mask": ids >= 0}


class CausalLM(Objective):
    """Predict each next token. Loss in nats per token (per byte with the byte tokenizer)."""

    kind = "causal_lm"

    def check_model(self, model_config) -> None:
        if model_config.arch != "decoder" or model_config.head.kind != "lm":
            raise ConfigError("objective.kind", "causal_lm", "a decoder model with an lm head",
                              hint=f"the model is arch={model_config.arch!r}, head={model_config.head.kind!r}")

    @staticmethod
    def inputs_and_targets(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Input ids [batch, seq_len], the next-token targets, and the model's keyword arguments. In packed rows a
        target is -100 (not predicted) where it starts another document or is padding: the last token of one document
        never predicts the first of the next."""
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if not _is_packed(batch):
            return inputs, targets, {}
        ids = batch["document_ids"]
        predicted = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
        if "loss_mask" in batch:  # instruction data (formerkit.data.instruct): only the responses are predicted
            predicted &= batch["loss_mask"][:, 1:].bool()
        return inputs, targets.masked_fill(~predicted, -100), _packed_inputs(batch)

    def loss(self, model, batch, generator):
        inputs, targets, kwargs = self.inputs_and_targets(batch)
        logits, aux_loss = self.run(model, inputs, **kwargs)
        if kwargs:
            return self.with_aux(_mean_over_targets(logits, targets, self.config.label_smoothing), aux_loss)
        return self.with_aux(_cross_entropy(logits, targets, self.config.label_smoothing), aux_loss)

    def units(self, batch):
        tokens = batch["tokens"]
        if _is_packed(batch):  # the real tokens read, padding not counted
            return int((batch["document_ids"][:, :-1] >= 0).sum())
        return tokens.shape[0] * (tokens.shape[1] - 1)

    @torch.no_grad()
    def evaluate(self, model, batches):
        total, count, usage = 0.0, 0, ExpertUsage()
        for batch in batches:
            inputs, targets, kwargs = self.inputs_and_targets(batch)
            logits, _ = self.run(model, inputs, usage=usage, **kwargs)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), **usage.metrics()}


class MaskToken:
    """Objectives that add a [MASK] token after the data's vocabulary."""

    @property
    def mask_id(self) -> int:
        return self.bundle.model_fields["vocab_size"]

    def model_fields(self):
        return {"vocab_size": self.bundle.model_fields["vocab_size"] + 1}


class MaskedLM(MaskToken, Objective):
    """BERT's masked LM: choose mask_prob of the tokens; of those, 80% become [MASK], 10% a random token, 10% stay;
    predict the original token at the chosen positions. [MASK] is one id past the tokenizer's vocabulary."""

    kind = "masked_lm"

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

    def corrupt_batch(self, batch: dict[str, Tensor], generator: torch.Generator
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Corrupted inputs, targets and the model's keyword arguments; in packed rows, padding is never a target
        and each token sees only its own document (in both directions)."""
        inputs, targets = self.corrupt(batch["tokens"][:, :-1], generator)
        if not _is_packed(batch):
            return inputs, targets, {}
        kwargs = _packed_inputs(batch)
        return inputs, targets.masked_fill(~kwargs["attention_mask"], -100), kwargs

    def loss(self, model, batch, generator):
        inputs, targets, kwargs = self.corrupt_batch(batch, generator)
        logits, aux_loss = self.run(model, inputs, **kwargs)
        if kwargs:
            return self.with_aux(_mean_over_targets(logits, targets, self.config.label_smoothing), aux_loss)
        return self.with_aux(_cross_entropy(logits, targets, self.config.label_smoothing), aux_loss)

    def units(self, batch):
        if _is_packed(batch):
            return int((batch["document_ids"][:, :-1] >= 0).sum())
        return batch["tokens"][:, :-1].numel()

    @torch.no_grad()
    def evaluate(self, model, batches):
        generator = step_generator(0, 7)  # the same corruption every evaluation
        total, correct, count, usage = 0.0, 0, 0, ExpertUsage()
        for batch in batches:
            inputs, targets, kwargs = self.corrupt_batch(batch, generator)
            logits, _ = self.run(model, inputs, usage=usage, **kwargs)
            chosen = targets != -100
            total += F.cross_entropy(logits[chosen].float(), targets[chosen], reduction="sum").item()
            correct += (logits[chosen].argmax(-1) == targets[chosen]).sum().item()
            count += chosen.sum().item()
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1), **usage.metrics()}


def _mask_kwargs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's ``attention_mask`` for a batch of padded texts (False at padding: neither attended to nor pooled);
    nothing for batches without padding (images, series)."""
    return {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}


class Classification(Objective):
    """One class per example: images, or padded texts (with an ``attention_mask``)."""

    kind = "classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def check_model(self, model_config):
        if model_config.head.kind != "classification":
            raise ConfigError("objective.kind", "classification", "a model with a classification head",
                              hint=f"the model's head is {model_config.head.kind!r}")

    def loss(self, model, batch, generator):
        if self.config.exit_loss_weight:
            return self.loss_with_exits(model, batch)
        logits, aux_loss = self.run(model, batch["inputs"], **_mask_kwargs(batch))
        return self.with_aux(_cross_entropy(logits, batch["labels"], self.config.label_smoothing), aux_loss)

    def loss_with_exits(self, model, batch) -> Tensor:
        """Deep supervision for early exit (objective.exit_loss_weight): the final loss plus the weight times the
        mean loss of the exits after every earlier layer, each the model's final norm and head on that layer's state
        (formerkit.models.early_exit.exit_logits), so the shared head learns to read every depth."""
        output = model(batch["inputs"], output_hidden_states=True, **_mask_kwargs(batch))
        if self.has_experts(model) and self.training_usage is not None:
            self.training_usage.add(output)
        labels, smoothing = batch["labels"], self.config.label_smoothing
        loss = _cross_entropy(output.logits, labels, smoothing)
        intermediate = output.hidden_states[1:-1]  # the stack's input and last layer's output are not exits
        if intermediate:
            core = getattr(model, "module", model)  # the formerkit model inside a DDP wrapper
            keep = batch.get("attention_mask")
            exits = torch.stack([_cross_entropy(exit_logits(core, state, keep), labels, smoothing)
                                 for state in intermediate])
            loss = loss + self.config.exit_loss_weight * exits.mean()
        return self.with_aux(loss, output.aux_loss)

    @torch.no_grad()
    def evaluate(self, model, batches):
        total, correct, count, usage = 0.0, 0, 0, ExpertUsage()
        for batch in batches:
            logits = self.run(model, batch["inputs"], usage=usage, **_mask_kwargs(batch))[0].float()
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
        if model_config.stem.distill_token:
            raise ConfigError("stem.distill_token", True, "false for masked-autoencoder pretraining",
                              hint="the distillation token learns from a teacher: add it when distilling")

    def wrap_model(self, model):
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
        generator = step_generator(0, 8)  # the same masks every evaluation
        total, count = 0.0, 0
        for batch in batches:
            total += model(batch["inputs"], generator=generator).loss.item() * len(batch["inputs"])
            count += len(batch["inputs"])
        return {"loss": total / max(count, 1)}


_OBJECTIVES = {cls.kind: cls for cls in (CausalLM, MaskedLM, Classification, SequenceToSequence, Forecast,
                                         MaskedImageModeling)}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Adds an Objective class to the registry under its ``kind`` (objectives defined in modules of their own)."""
    _OBJECTIVES[cls.kind] = cls
    return cls


def objective_class(kind: str) -> type[Objective] | None:
    """The Objective class registered under ``kind`` (None for an unknown kind). Objectives in modules of their own
    (formerkit.train.diffusion, formerkit.train.masked_generation) register when imported; ``formerkit.train``
    imports them."""
    return _OBJECTIVES.get(kind)


def make_objective(config, bundle) -> Objective:
    return _OBJECTIVES[config.kind](config, bundle)
