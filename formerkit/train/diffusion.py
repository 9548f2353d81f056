"""Diffusion objectives: a class-conditioned model of images trained by flow matching or DDPM (a diffusion
Transformer, DiT: Peebles & Xie, 2023, when the model is a patch Transformer with adaLN-Zero conditioning).

The model is called ``model(x_t, timesteps=..., labels=...)`` and returns a tensor of the images' shape: the velocity
(flow matching; the model sees 1000 t for t in [0, 1], the scale of DiT's integer timesteps) or the noise (DDPM; the
timestep itself). Images are trained on in data units, [-1, 1] (digits 0-16 -> [-1, 1]), whatever the data source's
own normalization, and ``sample`` returns them in the data's raw units (0-16 for digits). The schedules and samplers
are ``formerkit.generation.diffusion``'s.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.data.base import RowDraws
from formerkit.errors import ConfigError, InputError
from formerkit.generation.diffusion import (
    NoiseSchedule,
    ddim_sample,
    euler_sample,
    flow_interpolate,
    guided,
    heun_sample,
)
from formerkit.generation.grid import save_grid
from formerkit.models.masked_diffusion import PatchMaskedDiffusion
from formerkit.train.objectives import ExpertUsage, Objective, register_objective

__all__ = ["DDPM", "DiffusionObjective", "FlowMatching"]

# Flow matching's t in [0, 1] reaches the model as 1000 t: the timestep embedding's frequencies are made for
# DiT's integer timesteps 0-999.
FLOW_TIMESTEP_SCALE = 1000.0


class DiffusionObjective(Objective):
    """What flow matching and DDPM share: data units, the model's checks, evaluation, ``sample`` and the grids."""

    # Images per class in the grids written at each evaluation (RUN/samples/step_NNNNNN.png).
    grid_columns = 8
    # The probability with which training passes drop a label (the model's condition.label_dropout: wrap_model).
    label_dropout = 0.0

    def __init__(self, config, bundle):
        super().__init__(config, bundle)
        preprocessing = bundle.preprocessing
        if preprocessing.get("kind") != "image":
            raise ConfigError("objective.kind", config.kind, "image data (data.source digits or images)",
                              hint=f"this data's preprocessing is {preprocessing.get('kind')!r}")
        self.mean, self.std = preprocessing["mean"], preprocessing["std"]
        self.scale = preprocessing["scale"]
        self.classes = len(preprocessing["classes"])

    def model_fields(self):
        # The class embedding takes the data's classes; the model has no classification head.
        return {"num_classes": None, "condition.classes": self.classes}

    def check_model(self, model_config) -> None:
        kind = self.config.kind
        if model_config.stem.kind != "patches" or model_config.head.kind != "patches":
            raise ConfigError("head.kind", model_config.head.kind, f"'patches' (and stem.kind 'patches') for "
                              f"objective.kind {kind!r}", hint="the model maps noisy images to images")
        condition = model_config.condition
        if condition.kind is None or not condition.timesteps or condition.classes is None:
            raise ConfigError("condition.kind", condition.kind, f"'adaln_zero' with condition.timesteps true and "
                              f"condition.classes set for objective.kind {kind!r}",
                              hint="the model is told the timestep and the class")
        channels = model_config.head.output_dim or model_config.stem.in_channels
        if channels != model_config.stem.in_channels:
            raise ConfigError("head.output_dim", model_config.head.output_dim,
                              f"null or stem.in_channels ({model_config.stem.in_channels}) for objective.kind "
                              f"{kind!r}", hint="the prediction has the image's channels (no learned variance)")

    # ----- units -----

    def _per_channel(self, values: list[float], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def to_data(self, inputs: Tensor) -> Tensor:
        """The bundle's normalized images -> data units [-1, 1] (pixels in [0, 1] times 2, minus 1)."""
        pixels = inputs * self._per_channel(self.std, inputs) + self._per_channel(self.mean, inputs)
        return pixels * 2 - 1

    def to_raw(self, x: Tensor) -> Tensor:
        """Data units -> the data's raw units (0-16 for digits), clamped to the data's range."""
        return ((x.clamp(-1, 1) + 1) / 2) / self.scale

    # ----- training -----

    def noisy(self, x0: Tensor, draws: RowDraws) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, the model's timesteps, the target) for clean images ``x0`` in data units."""
        raise NotImplementedError

    def wrap_model(self, model):
        """With objective.patch_mask_ratio: the model inside ``PatchMaskedDiffusion`` (its mask token trains too).

        The objective drops the labels to the null class itself (condition.label_dropout, DiT's class dropout), from
        the per-example draws of the noise (RowDraws): the model's own drop draws from each process's global stream,
        so a distributed run would drop other labels than one process. Only training passes drop."""
        self.label_dropout = model.config.condition.label_dropout
        model.conditioning.label_dropout = 0.0
        if not self.config.patch_mask_ratio:
            return model
        return PatchMaskedDiffusion(model, mask_ratio=self.config.patch_mask_ratio,
                                    decoder_layers=self.config.decoder_layers)

    def unwrap_model(self, trained):
        return trained.model if isinstance(trained, PatchMaskedDiffusion) else trained

    def batch_loss(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator,
                   usage: ExpertUsage | None = None, label_dropout: float = 0.0) -> tuple[Tensor, Tensor | None]:
        x0 = self.to_data(batch["inputs"].float())
        draws = RowDraws.of(generator, len(x0))
        x_t, timesteps, target = self.noisy(x0, draws)
        labels = batch["labels"]
        if label_dropout:
            dropped = draws.mine(draws.rand()).to(labels.device) < label_dropout
            labels = labels.masked_fill(dropped, self.classes)  # the null class (condition.classes)
        masked = getattr(model, "module", model)  # inside DDP/FSDP
        if isinstance(masked, PatchMaskedDiffusion) and model.training:
            # Patch masking: a random subset of patches per image enters the blocks; the error counts there only.
            # (Drawn from the process's own stream: under torchrun each process masks its rows independently.)
            ids_keep = masked.draw_visible(len(x0), generator).to(x0.device)
            prediction = model(x_t, timesteps=timesteps, labels=labels, ids_keep=ids_keep)
            kept = masked.kept_pixels(ids_keep)
            error = (prediction.float() - target).pow(2) * kept
            return error.sum() / (kept.sum() * x0.shape[1]), None
        prediction, aux_loss = self.run(model, x_t, timesteps=timesteps, labels=labels, usage=usage)
        return F.mse_loss(prediction.float(), target), aux_loss

    def loss(self, model, batch, generator):
        return self.with_aux(*self.batch_loss(model, batch, generator, label_dropout=self.label_dropout))

    @torch.no_grad()
    def evaluate(self, model, batches):
        # The same noise and timesteps every evaluation; labels never dropped.
        return self.mean_loss(batches, lambda batch, generator, usage: self.batch_loss(model, batch, generator, usage),
                              "labels", stream=9)

    # ----- sampling -----

    def check_labels(self, labels) -> Tensor:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
                or labels.dtype == torch.bool:
            raise InputError(f"labels: expected a 1-D tensor of class ids, got {labels!r}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
            raise InputError(f"labels: class ids in [0, {self.classes - 1}], got values in [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        return labels.long()

    def sample(self, model: nn.Module, labels: Tensor, *, steps: int | None = None, guidance: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Images [N, C, H, W] of the classes ``labels`` [N], in the data's raw units, drawn from noise with the
        objective's sampler in ``steps`` steps (default objective.sample_steps) with classifier-free guidance
        ``guidance`` (default objective.guidance; 1: the conditional prediction only, one pass per step). ``model``
        is the formerkit model (a run saves its EMA weights when optim.ema_decay is set: those are what sample)."""
        labels = self.check_labels(labels)
        model = self.unwrap_model(model)  # a patch-masked training model samples unmasked
        steps = self.config.sample_steps if steps is None else steps
        guidance = self.config.guidance if guidance is None else guidance
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InputError(f"steps: expected an integer >= 1, got {steps!r}")
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance) \
                or guidance < 0:
            raise InputError(f"guidance: expected a number >= 0 (1: conditional only), got {guidance!r}")
        stem = model.config.stem
        shape = (len(labels), stem.in_channels, *stem.image_size)
        parameter = next(model.parameters())
        noise = torch.randn(shape, generator=generator).to(parameter.device, parameter.dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                x = self.draw(model, noise, labels.to(parameter.device), steps, float(guidance), generator)
        finally:
            model.train(was_training)
        return self.to_raw(x.float()).cpu()

    def draw(self, model, noise: Tensor, labels: Tensor, steps: int, guidance: float,
             generator: torch.Generator | None) -> Tensor:
        """Samples in data units from ``noise`` (the objective's sampler)."""
        raise NotImplementedError

    def snapshot(self, model: nn.Module, run_dir: Path, step: int) -> Path:
        """A grid of samples (one row per class, ``grid_columns`` each, the same noise every time) written to
        RUN/samples/step_NNNNNN.png: how the samples change over training (the run report shows them)."""
        labels = torch.arange(self.classes).repeat_interleave(self.grid_columns)
        images = self.sample(model, labels, generator=torch.Generator().manual_seed(0))
        return save_grid(images * self.scale, Path(run_dir) / "samples" / f"step_{step:06d}.png", self.grid_columns)


@register_objective
class FlowMatching(DiffusionObjective):
    """Rectified flow: x_t = (1 - t) x0 + t noise, t ~ U(0, 1); the model predicts v = noise - x0; Euler or Heun
    steps from t = 1 to 0 sample."""

    kind = "flow_matching"

    def noisy(self, x0, draws):
        noise = draws.mine(draws.randn(*x0.shape[1:])).to(x0.device, x0.dtype)
        t = draws.mine(draws.rand()).to(x0.device)
        x_t, velocity = flow_interpolate(x0, noise, t)
        return x_t, t * FLOW_TIMESTEP_SCALE, velocity

    def draw(self, model, noise, labels, steps, guidance, generator):
        predict = guided(model, labels, model.conditioning.null_class, guidance, timestep_scale=FLOW_TIMESTEP_SCALE)
        sampler = heun_sample if self.config.sampler == "heun" else euler_sample
        return sampler(predict, noise, steps)


@register_objective
class DDPM(DiffusionObjective):
    """DDPM's epsilon-prediction: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t uniform over the
    objective.diffusion_steps of the cosine or linear schedule; DDIM steps sample, each x0 estimate clamped to the
    data's [-1, 1]."""

    kind = "ddpm"

    def __init__(self, config, bundle):
        super().__init__(config, bundle)
        self.schedule = NoiseSchedule(config.noise_schedule, config.diffusion_steps)

    def noisy(self, x0, draws):
        noise = draws.mine(draws.randn(*x0.shape[1:])).to(x0.device, x0.dtype)
        t = draws.mine(draws.randint(self.schedule.steps))
        return self.schedule.add_noise(x0, noise, t), t.float().to(x0.device), noise

    def draw(self, model, noise, labels, steps, guidance, generator):
        if steps > self.schedule.steps:
            raise InputError(f"steps: at most objective.diffusion_steps ({self.schedule.steps}), got {steps}")
        predict = guided(model, labels, model.conditioning.null_class, guidance)
        # Data units are [-1, 1]: each step's estimate of x0 is clamped there (see ddim_step).
        return ddim_sample(predict, noise, self.schedule, steps, eta=self.config.ddim_eta, generator=generator,
                           clip=1.0)
