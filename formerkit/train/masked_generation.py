"""Generative objectives over discrete tokens: MaskGIT on images as tokens (``masked_generation``) and a masked
diffusion language model (``masked_diffusion_lm``). Both train a bidirectional encoder to fill in masked tokens and
draw by iterative unmasking (formerkit.generation.masked); they register with formerkit.train.objectives on import
(``formerkit.train`` imports this module)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from formerkit.data.base import RowDraws, step_generator
from formerkit.errors import ConfigError, InputError
from formerkit.train.objectives import ExpertUsage, MaskToken, Objective, register_objective

__all__ = ["MaskedDiffusionLM", "MaskedGeneration", "masked_diffusion_loss"]


def _check_bidirectional_token_model(kind: str, model_config) -> None:
    if model_config.arch != "encoder" or model_config.head.kind != "masked_lm":
        raise ConfigError("objective.kind", kind, "an encoder model with a masked_lm head (tokens stem)",
                          hint=f"the model is arch={model_config.arch!r}, head={model_config.head.kind!r}")


def _check_sampling(steps, guidance) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps: expected an integer >= 1, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise InputError(f"guidance: expected a finite number (1 = conditional only), got {guidance!r}")


@register_objective
class MaskedGeneration(Objective):
    """MaskGIT (Chang et al., 2022) on images as discrete tokens (formerkit.data.image_tokens): a bidirectional
    encoder reads [class token, image tokens], a cosine-scheduled random fraction of the image tokens replaced by
    [MASK], and predicts the hidden ones (cross-entropy averaged over the masked tokens). ``sample`` decodes from all
    [MASK] in N parallel steps (formerkit.generation.masked).

    One embedding table holds every id: the image vocabulary (V ids), then [MASK] (V), the classes (V + 1 + c) and
    the null class (V + 1 + num_classes) that replaces the class with probability objective.class_dropout, for
    classifier-free guidance. The tokenizer (a fitted codebook included) is recorded in the data's preprocessing as
    ``image_tokens``, so the saved run decodes with it; the data's model fields become the token model's.
    """

    kind = "masked_generation"

    def __init__(self, config, bundle):
        from formerkit.data.image_tokens import PatchCodebook, PixelTokens, image_tokenizer, raw_images

        super().__init__(config, bundle)
        preprocessing = bundle.preprocessing
        if preprocessing.get("kind") != "image":
            raise ConfigError("objective.kind", "masked_generation", "an image data source (digits, image_folder)")
        if preprocessing.get("image_tokens"):  # a saved run: its own tokenizer
            self.tokenizer = image_tokenizer(preprocessing["image_tokens"])
        else:
            shape = (preprocessing["in_channels"], *preprocessing["image_size"])
            if config.image_tokens == "pixels":
                self.tokenizer = PixelTokens(round(1 / preprocessing["scale"]) + 1, shape)
            else:
                images = raw_images(bundle.train.tensors["inputs"], preprocessing)
                self.tokenizer = PatchCodebook.fit(images, config.codebook_size, config.codebook_patch)
            preprocessing["image_tokens"] = self.tokenizer.describe()
        self.num_classes = len(preprocessing["classes"])
        self.image_vocab = self.tokenizer.vocab_size
        self.mask_id = self.image_vocab
        self.null_class = self.image_vocab + 1 + self.num_classes
        bundle.model_fields = self.model_fields()

    def model_fields(self):
        return {"vocab_size": self.image_vocab + self.num_classes + 2, "max_seq_len": 1 + self.tokenizer.length}

    def check_model(self, model_config):
        _check_bidirectional_token_model(self.kind, model_config)

    def image_tokens(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's images (normalized, as the bundle holds them) as token ids [batch, L]."""
        from formerkit.data.image_tokens import raw_images

        return self.tokenizer.encode(raw_images(batch["inputs"].float(), self.bundle.preprocessing))

    def class_tokens(self, labels: Tensor) -> Tensor:
        return labels.long() + self.image_vocab + 1

    def corrupt(self, tokens: Tensor, labels: Tensor, generator: torch.Generator, class_dropout: float
                ) -> tuple[Tensor, Tensor]:
        """(inputs [batch, 1 + L], masked [batch, L]): per example a ratio r = cos(pi/2 u), u ~ U(0, 1), and
        ceil(r L) of its L tokens (at least one) replaced by [MASK] at random places; the class token first, the null
        class with probability ``class_dropout``."""
        from formerkit.generation.masked import cosine_masking_ratio, masked_count, random_mask

        count, length = tokens.shape
        draws = RowDraws.of(generator, count)
        # Drawn for the whole micro-batch, this process keeping its rows (RowDraws): the same masks however the
        # global batch is split between processes; and the micro-batch's masked total, which the loss divides by.
        counts = masked_count(cosine_masking_ratio(draws.rand()), length)
        masked = draws.mine(random_mask(counts, length, draws.generator)).to(tokens.device)
        dropped = draws.mine(draws.rand() < class_dropout).to(tokens.device)
        classes = torch.where(dropped, self.null_class, self.class_tokens(labels))
        inputs = torch.cat([classes.unsqueeze(1), tokens.masked_fill(masked, self.mask_id)], dim=1)
        return inputs, masked, int(counts.sum()) * draws.count / draws.total

    def _masked_logits(self, model, batch, generator, class_dropout, usage=None):
        tokens = self.image_tokens(batch)
        inputs, masked, share = self.corrupt(tokens, batch["labels"], generator, class_dropout)
        logits, aux_loss = self.run(model, inputs, usage=usage)
        # Only image tokens are ever predicted: [MASK] and the class ids are left out of the softmax.
        return logits[:, 1:, :self.image_vocab].float()[masked], tokens[masked], aux_loss, share

    def loss(self, model, batch, generator):
        logits, targets, aux_loss, share = self._masked_logits(model, batch, generator, self.config.class_dropout)
        # The mean over the micro-batch's masked tokens: summed here, divided by this process's share of the
        # micro-batch's masked total, so the processes' averaged gradients are the single-process mean's.
        total = F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing, reduction="sum")
        return self.with_aux(total / share, aux_loss)  # (share >= 1: every row masks a token)

    @torch.no_grad()
    def evaluate(self, model, batches):
        generator = step_generator(0, 9)  # the same masks every evaluation; always the true class
        total, correct, count, usage = 0.0, 0, 0, ExpertUsage()
        for batch in batches:
            logits, targets, _, _ = self._masked_logits(model, batch, generator, 0.0, usage)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.argmax(-1) == targets).sum().item()
            count += len(targets)
        return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1), **usage.metrics()}

    # Images per class in the grids written at each evaluation (RUN/samples/step_NNNNNN.png).
    grid_columns = 8

    @torch.no_grad()
    def sample(self, model, labels, *, steps: int | None = None, guidance: float | None = None,
               generator: torch.Generator | None = None, temperature: float = 1.0,
               choice_temperature: float | None = None) -> Tensor:
        """Images [N, C, H, W] in the data's raw units (digits: 0-16) of the classes ``labels`` [N], decoded from
        all [MASK] in ``steps`` MaskGIT steps (cosine schedule; see formerkit.generation.masked.iterative_unmask)
        with classifier-free guidance scale ``guidance`` on the logits (1 = conditional only; 0 = unconditional) and
        Gumbel noise of ``choice_temperature`` on the commit order; None takes the recipe's objective.sample_steps,
        objective.guidance and objective.choice_temperature."""
        from formerkit.generation.masked import guided_logits, iterative_unmask

        steps = self.config.sample_steps if steps is None else steps
        guidance = self.config.guidance if guidance is None else guidance
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
            raise InputError(f"labels: expected a 1-D tensor of class indices, got {labels.dtype} of shape "
                             f"{list(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise InputError(f"labels: expected classes in 0..{self.num_classes - 1}, got "
                             f"{int(labels.min())}..{int(labels.max())}")
        _check_sampling(steps, guidance)
        choice = self.config.choice_temperature if choice_temperature is None else choice_temperature
        device = next(model.parameters()).device
        count, length = len(labels), self.tokenizer.length
        tokens = torch.full((count, 1 + length), self.mask_id, dtype=torch.long, device=device)
        tokens[:, 0] = self.class_tokens(labels.to(device))
        masked = torch.ones_like(tokens, dtype=torch.bool)
        masked[:, 0] = False

        def logits(inputs: Tensor) -> Tensor:
            return model(inputs)[..., :self.image_vocab]

        def predict(inputs: Tensor) -> Tensor:
            unconditional = inputs.clone()
            unconditional[:, 0] = self.null_class
            return guided_logits(logits, inputs, unconditional, float(guidance))

        was_training = model.training
        model.eval()
        try:
            tokens = iterative_unmask(predict, tokens, masked, steps=steps, schedule="cosine", order="confidence",
                                      temperature=temperature, choice_temperature=choice, generator=generator)
        finally:
            model.train(was_training)
        return self.tokenizer.decode(tokens[:, 1:].cpu())

    def snapshot(self, model, run_dir, step: int):
        """A grid of samples (one row per class, ``grid_columns`` each, the same draws every time) written to
        RUN/samples/step_NNNNNN.png, as the diffusion objectives do: the run report shows them over training."""
        from pathlib import Path

        from formerkit.generation.grid import save_grid

        labels = torch.arange(self.num_classes).repeat_interleave(self.grid_columns)
        images = self.sample(model, labels, generator=torch.Generator().manual_seed(0))
        return save_grid(images * self.bundle.preprocessing["scale"],
                         Path(run_dir) / "samples" / f"step_{step:06d}.png", self.grid_columns)


def masked_diffusion_loss(logits: Tensor, targets: Tensor, masked: Tensor, t: Tensor) -> Tensor:
    """MDLM's bound on the negative log-likelihood per token for the linear schedule alpha_t = 1 - t (Sahoo et al.
    2024, eq. 10; Shi et al. 2024): for each example, (1 / (t L)) times the cross-entropy summed over its masked
    tokens, averaged over the examples. logits [batch, L, vocab] (the [MASK] id left out: MDLM's zero masking
    probability), targets [batch, L], masked bool [batch, L], t [batch]."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return ((nll * masked).sum(dim=1) / (t * targets.shape[1])).mean()


@register_objective
class MaskedDiffusionLM(MaskToken, Objective):
    """A masked diffusion language model (MDLM, Sahoo et al. 2024; Shi et al. 2024; the recipe of LLaDA, Nie et al.
    2025): each window gets a time t and every token is replaced by [MASK] with probability t; the loss is the
    1/t-weighted cross-entropy on the masked tokens (``masked_diffusion_loss``), an upper bound on the negative
    log-likelihood in nats per token (per byte with the byte tokenizer), so ``loss`` compares with causal_lm's from
    above. The times of a batch are stratified (t_i = (i + u) / batch, the low-discrepancy sampler of Kingma et al.
    2021 that MDLM uses) for a lower-variance estimate. [MASK] is one id past the tokenizer's vocabulary; generation:
    ``formerkit.generation.masked.unmask_continuation``."""

    kind = "masked_diffusion_lm"
    # t is kept away from 0: a window with nothing masked has no loss and an infinite weight.
    min_time = 1e-3

    def check_model(self, model_config):
        _check_bidirectional_token_model(self.kind, model_config)

    def corrupt(self, tokens: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, masked, t) for token windows [batch, L]."""
        draws = RowDraws.of(generator, tokens.shape[0])  # the micro-batch's draws, this process's rows
        total = draws.total
        t = (torch.arange(total) + torch.rand(1, generator=draws.generator)) / total
        t = self.min_time + (1 - self.min_time) * t
        masked = draws.mine(draws.rand(tokens.shape[1]) < t.unsqueeze(1)).to(tokens.device)
        t = draws.mine(t)
        return tokens.masked_fill(masked, self.mask_id), masked, t.to(tokens.device)

    def _bound(self, model, batch, generator, usage=None):
        tokens = batch["tokens"][:, :-1]  # the window the causal LM reads (its last token is only a target)
        inputs, masked, t = self.corrupt(tokens, generator)
        logits, aux_loss = self.run(model, inputs, usage=usage)
        return masked_diffusion_loss(logits[..., :self.mask_id], tokens, masked, t), aux_loss

    def loss(self, model, batch, generator):
        return self.with_aux(*self._bound(model, batch, generator))

    def units(self, batch):
        return batch["tokens"][:, :-1].numel()

    @torch.no_grad()
    def evaluate(self, model, batches):
        return self.mean_loss(batches, lambda batch, generator, usage: self._bound(model, batch, generator, usage),
                              "tokens", stream=10)
