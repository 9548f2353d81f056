"""Training recipes: one validated config naming the model, the data, the objective and the schedule.

Recipes are YAML files (``formerkit/recipes/*.yaml`` ship with the package; any user file works the same). Every key is
checked like a model config: an unknown key gets a "did you mean", a bad value names the field and what is allowed.
``--set optim.lr=1e-3`` overrides any key; keys under ``model.`` that are not ``preset``/``config``/``overrides`` go to
the model's overrides (``--set model.num_layers=2``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from formerkit.config import ModelConfig
from formerkit.errors import ConfigError
from formerkit.models.registry import model_config
from formerkit.schema import ConfigSection, choice, load_yaml

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelSpec",
    "ObjectiveConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "list_recipes",
    "load_recipe",
    "shipped_recipe",
]

DATA_SOURCES = ("stdlib", "text", "jsonl", "instruct", "digits", "image_folder", "synthetic", "csv")
OBJECTIVES = ("causal_lm", "masked_lm", "classification", "seq2seq", "mae", "forecast", "flow_matching", "ddpm",
              "masked_generation", "masked_diffusion_lm")
# The objectives that read packed rows (data.pack): they pass each row's document mask and positions to the model.
PACKING_OBJECTIVES = ("causal_lm", "masked_lm")


@dataclass(frozen=True)
class ModelSpec(ConfigSection):
    """A preset with overrides, a whole model config, or a model to start from (``from``: its weights)."""

    _prefix = "model"

    # Start from a trained model: a run directory, a saved model or a Hugging Face directory (its weights, and its
    # tokenizer, which the text sources then read with), or a preset name (a fresh model, as model.preset). Not with
    # model.preset or model.config; model.overrides may change only what keeps the weights' shapes (dropout). See
    # formerkit.train.start
    from_: str | None = None
    # A preset name (formerkit models), e.g. char_gpt, cct_2_3x2_32, vit_tiny_patch16_224
    preset: str | None = None
    # Model keys changed from the preset's, dotted (attention.num_heads: 4); see "Model keys"
    overrides: dict[str, Any] = field(default_factory=dict)
    # Instead of a preset: a whole model config (nested sections: attention: {num_heads: 4})
    config: dict[str, Any] | None = None

    def _validate(self) -> None:
        if self.from_ is not None:
            given = [name for name in ("preset", "config") if getattr(self, name) is not None]
            if given:
                raise ConfigError("model.from", self.from_, f"no model.{given[0]} beside it",
                                  hint=f"model.from and model.{given[0]} each name the starting model; keep one")
            if not isinstance(self.from_, str) or not self.from_:
                self._fail("from_", "a run directory, a saved model, a Hugging Face directory or a preset name")
            return
        if (self.preset is None) == (self.config is None):
            self._fail("preset", "exactly one of model.preset, model.config and model.from")

    def _path(self, name: str) -> str:
        return super()._path("from" if name == "from_" else name)

    @classmethod
    def from_dict(cls, data):
        # ``from`` is a Python keyword: the field is ``from_``, the recipe key ``from``.
        if isinstance(data, dict) and "from" in data:
            data = {("from_" if key == "from" else key): value for key, value in data.items()}
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        start = data.pop("from_")
        return {"from": start, **data} if start is not None else data

    @property
    def start_preset(self) -> str | None:
        """``model.from`` when it names a preset (a fresh model, as ``model.preset``), else None."""
        from formerkit.train.start import is_preset

        return self.from_ if self.from_ is not None and is_preset(self.from_) else None

    def resolve(self, data_fields: dict[str, Any] | None = None) -> ModelConfig:
        """The ModelConfig: preset (or config), then the fields the data fixes, then the user's overrides. (A
        ``model.from`` with weights resolves through formerkit.train.start instead.)"""
        preset = self.preset if self.preset is not None else self.start_preset
        if preset is None and self.config is None:
            raise ConfigError("model.from", self.from_, "a preset name here",
                              hint="a model.from with weights is loaded, not resolved (formerkit.train.start)")
        base = model_config(preset) if preset is not None else ModelConfig.from_dict(self.config)
        fields = {k: v for k, v in (data_fields or {}).items() if k not in self.overrides}
        # One replace, validated once: a data field and an override may only make sense together (8x8 digits need
        # a smaller patch size than the preset's).
        return base.replace(**fields, **self.overrides) if fields or self.overrides else base


@dataclass(frozen=True)
class DataConfig(ConfigSection):
    """Where examples come from. Fields apply to some sources only; setting one for another source is an error."""

    _prefix = "data"

    # stdlib: Python's own source; text: a .txt file or a folder of them; jsonl: one JSON object a line; digits:
    # scikit-learn's 8x8 digits; image_folder: one sub-folder of images per class; synthetic: copy/reverse/sort
    # sequences; csv: a numeric time series (one row a time step)
    source: str = choice("stdlib", DATA_SOURCES)
    # text, jsonl, instruct, image_folder, csv: a file or folder of the user's
    path: str | None = None
    # jsonl: the field holding the text
    text_field: str = "text"
    # jsonl with objective.kind classification: the field holding each line's class (strings or integers; classes in
    # sorted order); a stratified data.valid_fraction of each class (20% when 0) is the test split
    label_field: str | None = None
    # instruct: how conversations become text: null = the tokenizer's chat template where it has one (a model
    # converted from Hugging Face, via model.from), else the default template; default = always the default template
    # (formerkit.data.instruct); tokenizer = the tokenizer's template, an error without one
    chat_template: str | None = choice(None, (None, "default", "tokenizer"))
    # text sources: byte, char or bpe (trained on the training split with the `tokenizers` library)
    tokenizer: str = choice("byte", ("byte", "char", "bpe"))
    # bpe: the vocabulary size to train
    vocab_size: int | None = None
    # text sources: tokens per training window; synthetic: longest sequence
    seq_len: int = 256
    # text sources: pack whole documents (files, JSON lines, chunks of a single file) into rows of seq_len + 1
    # tokens instead of cutting windows from one stream; a token then sees and predicts only its own document
    # (positions restart at each document). See formerkit.data.packing.
    pack: bool = False
    # text sources: fraction of files (or lines) held out for validation, chosen deterministically
    valid_fraction: float = 0.05
    # stdlib: read at most this many bytes of source (None = the whole corpus)
    max_bytes: int | None = None
    # digits, image_folder: resize images to this square size (None = native size for digits)
    image_size: int | None = None
    # digits, image_folder: light augmentation (small random shifts, rotations and scalings) while training
    augment: bool = True
    # digits, image_folder: train on only the first this-many training images of each class (a few-label regime,
    # the same images in every run; validation, if any, is held out of them; the test split stays whole)
    labels_per_class: int | None = None
    # synthetic: the task, how many training examples, the symbol alphabet, the shortest sequence
    task: str = choice("reverse", ("copy", "reverse", "sort"))
    num_examples: int = 20000
    num_symbols: int = 10
    min_len: int = 4
    # csv: window length fed to the model, how many future steps to predict, which columns (None = all numeric)
    window: int = 64
    horizon: int = 16
    columns: tuple[str, ...] | None = None

    _APPLIES = {
        "path": ("text", "jsonl", "instruct", "image_folder", "csv"), "text_field": ("jsonl",),
        "label_field": ("jsonl",), "chat_template": ("instruct",),
        "tokenizer": ("stdlib", "text", "jsonl", "instruct"), "vocab_size": ("stdlib", "text", "jsonl", "instruct"),
        "seq_len": ("stdlib", "text", "jsonl", "instruct", "synthetic"),
        "pack": ("stdlib", "text", "jsonl", "instruct"),
        "valid_fraction": ("stdlib", "text", "jsonl", "instruct", "digits", "image_folder", "csv"),
        "max_bytes": ("stdlib", "text", "jsonl", "instruct"), "image_size": ("digits", "image_folder"),
        "augment": ("digits", "image_folder"),
        "labels_per_class": ("digits", "image_folder"), "task": ("synthetic",), "num_examples": ("synthetic",),
        "num_symbols": ("synthetic",), "min_len": ("synthetic",), "window": ("csv",), "horizon": ("csv",),
        "columns": ("csv",),
    }

    def _validate(self) -> None:
        self._check_applies("source", self._APPLIES)
        if self.source in ("text", "jsonl", "instruct", "image_folder", "csv") and not self.path:
            self._fail("path", f"a file or folder for data.source={self.source!r}")
        if self.tokenizer == "bpe" and (self.vocab_size is None or self.vocab_size < 260):
            self._fail("vocab_size", "an integer >= 260 for a bpe tokenizer (256 bytes plus merges)")
        if self.tokenizer != "bpe" and self.vocab_size is not None:
            self._fail("vocab_size", "null unless data.tokenizer is 'bpe' (byte and char vocabularies are fixed)")
        for name in ("seq_len", "num_examples", "num_symbols", "min_len", "window", "horizon"):
            if getattr(self, name) < 1:
                self._fail(name, "an integer >= 1")
        if not 0.0 <= self.valid_fraction < 1.0:
            self._fail("valid_fraction", "a fraction in [0, 1)")
        if self.image_size is not None and self.image_size < 1:
            self._fail("image_size", "an integer >= 1 or null")
        if self.max_bytes is not None and self.max_bytes < 1:
            self._fail("max_bytes", "an integer >= 1 or null")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            self._fail("labels_per_class", "an integer >= 1 or null (null: every training image)")
        if self.min_len > self.seq_len:
            self._fail("min_len", f"at most data.seq_len ({self.seq_len})")


@dataclass(frozen=True)
class ObjectiveConfig(ConfigSection):
    _prefix = "objective"

    # What the model learns: next tokens, masked tokens, a class per example, an output sequence per input sequence,
    # the hidden image patches (masked autoencoder), the next data.horizon steps of a series; flow_matching and ddpm
    # train a class-conditioned diffusion model of images (formerkit.train.diffusion): flow matching predicts the
    # velocity noise - x0 of x_t = (1 - t) x0 + t noise (rectified flow), ddpm the noise added (Ho et al., 2020)
    kind: str = choice("causal_lm", OBJECTIVES)
    # classification, seq2seq, LM: the weight moved from the true class to all classes alike (0 = off)
    label_smoothing: float = 0.0
    # masked_lm: the fraction of tokens chosen for prediction (BERT: 15%, of which 80% masked, 10% random, 10% kept)
    mask_prob: float = 0.15
    # mae: the fraction of patches hidden from the encoder, and the light decoder's size (decoder_layers also: the
    # side decoder's blocks under objective.patch_mask_ratio)
    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    # mae: predict each patch's pixels normalized by that patch's mean and variance (the MAE paper's default, made
    # for 16x16 patches); turn it off for tiny patches, whose few pixels make a noisy variance.
    norm_pix_loss: bool = True
    # masked_generation (MaskGIT, Chang et al. 2022: images as tokens, a random cosine-scheduled fraction masked,
    # decoded in parallel steps): pixels = one token per pixel intensity level (digits: 17 levels); codebook = one
    # token per codebook_patch x codebook_patch patch, the nearest of codebook_size k-means centres fitted on the
    # training images (saved with the run)
    image_tokens: str = choice("pixels", ("pixels", "codebook"))
    codebook_size: int = 64
    codebook_patch: int = 2
    # masked_generation: the probability a training example's class is replaced by the null class, so one model
    # also predicts unconditionally and sampling can use classifier-free guidance (Ho & Salimans 2022)
    class_dropout: float = 0.1
    # masked_generation: sampling's default Gumbel noise on the confidences that pick which tokens to commit,
    # annealed linearly to 0 over the steps (MaskGIT's choice temperature; 0 = purely by confidence)
    choice_temperature: float = 2.0
    # masked_diffusion_lm (MDLM, Sahoo et al. 2024): generation commits the most confident tokens first (LLaDA's
    # low-confidence remasking, Nie et al. 2025) or a random order (the ancestral sampler's)
    unmask_order: str = choice("confidence", ("confidence", "random"))
    # classification: deep supervision for early exit (formerkit.models.early_exit): add this weight times the mean
    # cross-entropy of the exits after every layer but the last (each is the final norm and the head, shared with the
    # last layer, on that layer's state). 0 = off.
    exit_loss_weight: float = 0.0
    # flow_matching, ddpm (masked_generation: the steps and guidance only, on the logits): how formerkit sample and
    # the report's grids draw unless told otherwise: the sampler
    # (flow_matching: euler or heun, Heun's method taking two predictions a step; ddpm: ddim; null: euler or ddim),
    # its steps and the classifier-free guidance scale (Ho & Salimans, 2022; 1: the conditional prediction alone)
    sampler: str | None = choice(None, (None, "euler", "heun", "ddim"))
    sample_steps: int = 20
    guidance: float = 1.0
    # ddpm: the noise schedule (cosine: Nichol & Dhariwal, 2021; linear: Ho et al., 2020), its number of diffusion
    # steps, and DDIM's eta (0: deterministic sampling; 1: as noisy as DDPM's ancestral sampling)
    noise_schedule: str = choice("cosine", ("cosine", "linear"))
    diffusion_steps: int = 1000
    ddim_eta: float = 0.0
    # flow_matching, ddpm: cheaper training by patch masking (MDT, Gao et al., 2023; MaskDiT, Zheng et al., 2024):
    # this fraction of each noisy image's patches is dropped before the blocks, the last objective.decoder_layers
    # blocks (the side decoder) see every patch again (a dropped one as a learned mask token plus its position), and
    # the loss counts the kept patches only. Sampling uses no mask. 0 = off.
    patch_mask_ratio: float = 0.0

    def _validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            self._fail("label_smoothing", "a value in [0, 1)")
        if self.exit_loss_weight < 0:
            self._fail("exit_loss_weight", "a number >= 0")
        if self.exit_loss_weight and self.kind != "classification":
            self._fail("exit_loss_weight", "0 unless objective.kind is classification",
                       hint=f"objective.kind is {self.kind!r}; only classifiers exit early")
        if not 0.0 < self.mask_prob < 1.0:
            self._fail("mask_prob", "a probability in (0, 1)")
        if not 0.0 < self.mask_ratio < 1.0:
            self._fail("mask_ratio", "a fraction in (0, 1)")
        if not 0.0 <= self.patch_mask_ratio < 1.0:
            self._fail("patch_mask_ratio", "a fraction in [0, 1) (0: off)")
        if self.patch_mask_ratio and self.kind not in ("flow_matching", "ddpm"):
            self._fail("patch_mask_ratio", "0 unless objective.kind is flow_matching or ddpm",
                       hint="patch masking drops the noisy image's patches of a diffusion model")
        diffusion, generators = ("flow_matching", "ddpm"), ("flow_matching", "ddpm", "masked_generation")
        self._check_applies("kind", {"sampler": diffusion, "sample_steps": generators, "guidance": generators,
                                     "noise_schedule": ("ddpm",), "diffusion_steps": ("ddpm",),
                                     "ddim_eta": ("ddpm",)})
        samplers = {"flow_matching": (None, "euler", "heun"), "ddpm": (None, "ddim")}
        if self.kind in samplers and self.sampler not in samplers[self.kind]:
            self._fail("sampler", f"one of {', '.join(str(s) for s in samplers[self.kind][1:])} (or null) with "
                       f"objective.kind {self.kind!r}")
        if self.sample_steps < 1:
            self._fail("sample_steps", "an integer >= 1")
        if self.kind == "ddpm" and self.sample_steps > self.diffusion_steps:
            self._fail("sample_steps", f"at most objective.diffusion_steps ({self.diffusion_steps})")
        if not self.guidance >= 0.0:
            self._fail("guidance", "a number >= 0 (1: conditional only; above 1: guided)")
        if self.diffusion_steps < 2:
            self._fail("diffusion_steps", "an integer >= 2")
        if not 0.0 <= self.ddim_eta <= 1.0:
            self._fail("ddim_eta", "a number in [0, 1]")
        generation = ("masked_generation",)
        self._check_applies("kind", {"image_tokens": generation, "codebook_size": generation,
                                     "codebook_patch": generation, "class_dropout": generation,
                                     "choice_temperature": generation, "unmask_order": ("masked_diffusion_lm",)})
        self._check_applies("image_tokens", {"codebook_size": ("codebook",), "codebook_patch": ("codebook",)})
        if not 0.0 <= self.class_dropout < 1.0:
            self._fail("class_dropout", "a probability in [0, 1)")
        if self.codebook_size < 2:
            self._fail("codebook_size", "an integer >= 2")
        if self.codebook_patch < 1:
            self._fail("codebook_patch", "an integer >= 1")
        if self.choice_temperature < 0:
            self._fail("choice_temperature", "a number >= 0")


@dataclass(frozen=True)
class OptimConfig(ConfigSection):
    """AdamW (no weight decay on norms, biases, embeddings and position tables), optionally with layer-wise
    learning-rate decay."""

    _prefix = "optim"

    # The peak learning rate (reached after schedule.warmup_steps)
    lr: float = 1e-3
    # AdamW's decoupled weight decay (none on norms, biases, embeddings and position tables)
    weight_decay: float = 0.05
    # AdamW's moment decays and its epsilon
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Clip the global gradient norm to this (None = no clipping).
    grad_clip: float | None = 1.0
    # Keep an exponential moving average of the weights with this decay; evaluated and saved instead of the raw
    # weights (None = off).
    ema_decay: float | None = None
    # Layer-wise learning-rate decay (BEiT, Bao et al. 2021; MAE fine-tuning), for fine-tuning a pretrained encoder
    # whose early layers should move least: with L blocks, block i (1 = first) trains at lr * layer_decay**(L + 1 - i),
    # the embedding (stem, positions, class token) at lr * layer_decay**(L + 1), the final norm and head at lr; the
    # schedule scales every group alike. Shared blocks (model.num_unique_layers) count once (L = distinct blocks); an
    # encoder-decoder's decoder blocks come after its encoder's. None = off (one lr for all).
    layer_decay: float | None = None

    def _validate(self) -> None:
        if self.lr <= 0:
            self._fail("lr", "a number > 0")
        if self.weight_decay < 0:
            self._fail("weight_decay", "a number >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            self._fail("betas", "two numbers in [0, 1)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            self._fail("grad_clip", "a number > 0 or null")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            self._fail("ema_decay", "a number in (0, 1) or null")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            self._fail("layer_decay", "a number in (0, 1] or null",
                       hint="e.g. 0.75 (MAE's ViT-B fine-tuning); 1 scales nothing, values above 1 would train the "
                            "early layers fastest")


@dataclass(frozen=True)
class ScheduleConfig(ConfigSection):
    """How long to train: optimizer steps of ``batch_size`` examples (split into ``grad_accum`` micro-batches);
    linear warm-up to optim.lr, then cosine decay to ``min_lr_ratio * lr``. A warm-up longer than the run (a short
    run of a long recipe, ``--set schedule.steps=30``) becomes a tenth of the run, with a printed note; a fraction
    (``warmup_steps: 0.1``) scales with the run."""

    _prefix = "schedule"

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    # Steps of linear warm-up, or a fraction in (0, 1) of schedule.steps (0.1: the first tenth of the run).
    warmup_steps: int | float = 100
    min_lr_ratio: float = 0.1

    def _validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                self._fail(name, "an integer >= 1")
        if self.batch_size % self.grad_accum:
            self._fail("grad_accum", f"a divisor of schedule.batch_size ({self.batch_size})")
        # Longer than the run: training warms up over a tenth of it (with a note).
        if self.warmup_steps < 0 or isinstance(self.warmup_steps, float) and not 0 < self.warmup_steps < 1:
            self._fail("warmup_steps", "an integer >= 0 (steps) or a fraction in (0, 1) of schedule.steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            self._fail("min_lr_ratio", "a fraction in [0, 1]")

    @property
    def warmup(self) -> int:
        """Warm-up steps: warmup_steps, a fraction of the run in steps (rounded), or, when longer than the run, a
        tenth of it."""
        if isinstance(self.warmup_steps, float):
            return round(self.warmup_steps * self.steps)
        return self.warmup_steps if self.warmup_steps <= self.steps else self.steps // 10


@dataclass(frozen=True)
class EvalConfig(ConfigSection):
    _prefix = "eval"

    # Evaluate every this many steps (and at the end).
    every: int = 200
    # Which split the periodic evaluations use; the final report always includes the test split when there is one.
    split: str = choice("valid", ("valid", "test"))
    # Evaluate on at most this many batches (None = the whole split).
    batches: int | None = None
    # Examples per evaluation batch (memory only: the metrics do not depend on it)
    batch_size: int = 256
    # Stop when `metric` (e.g. valid_loss, valid_accuracy) has not improved for `patience` evaluations (None = never).
    metric: str | None = None
    patience: int | None = None

    def _validate(self) -> None:
        if self.every < 1 or self.batch_size < 1:
            self._fail("every" if self.every < 1 else "batch_size", "an integer >= 1")
        if self.patience is not None:
            if self.patience < 1:
                self._fail("patience", "an integer >= 1 or null")
            if self.metric is None:
                self._fail("metric", "the metric to watch (e.g. valid_loss) when eval.patience is set")
            if self.split != "valid":
                self._fail("split", "'valid' for early stopping (stopping on the test split would leak it)")


@dataclass(frozen=True)
class RunConfig(ConfigSection):
    _prefix = "run"

    # Seeds the model's initialization, the data order, augmentation and dropout
    seed: int = 0
    # bf16: autocast matmuls to bfloat16; fp32: full precision; auto: bf16 where the hardware has native bf16 math
    # (CUDA with bf16, CPUs with AMX or AVX-512 BF16), fp32 otherwise.
    precision: str = choice("fp32", ("auto", "bf16", "fp32"))
    # Write a train record to metrics.jsonl every this many steps
    log_every: int = 10
    # Save a checkpoint (to resume from) every this many steps (and at the end)
    checkpoint_every: int = 500
    # Keep this many most recent checkpoints.
    keep_checkpoints: int = 2
    # Torch threads per process (None = PyTorch's default).
    threads: int | None = None
    # Show a progress bar (rank 0 only).
    progress: bool = True
    # Several processes (torchrun): ddp replicates the model (DistributedDataParallel); fsdp shards parameters,
    # gradients and optimizer state across processes (FSDP2's fully_shard).
    strategy: str = choice("ddp", ("ddp", "fsdp"))
    # Recompute each block's activations in the backward pass instead of keeping them: less training memory for
    # about one more forward pass per step; the same gradients.
    activation_checkpointing: bool = False

    def _validate(self) -> None:
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                self._fail(name, "an integer >= 1")
        if self.threads is not None and self.threads < 1:
            self._fail("threads", "an integer >= 1 or null")


@dataclass(frozen=True)
class TrainConfig(ConfigSection):
    # The run's name (the default run directory is runs/<name>)
    name: str = "run"
    # One line shown by formerkit recipes
    description: str = ""
    model: ModelSpec = field(default_factory=lambda: ModelSpec(preset="char_gpt"))
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # A second stage run after this one, starting from its weights: a partial recipe (same keys) merged over this
    # one. mae-digits uses it to fine-tune a classifier from the pretrained encoder.
    then: dict[str, Any] | None = None
    # Adapters added to the model before training (its base frozen): the keyword arguments of formerkit.add_adapters,
    # e.g. {method: lora, targets: [q, v], rank: 8, alpha: 16, dropout: 0.0, layers: null, name: default} plus the
    # method's options (rslora: true). The run saves the model with the adapters merged into the weights (what
    # generate, eval and predict load) and, in RUN/adapter, the adapters alone (formerkit.load_adapters); a method
    # that cannot be merged saves the base and adapter only
    adapt: dict[str, Any] | None = None

    def _validate(self) -> None:
        if self.data.source == "instruct" and self.objective.kind != "causal_lm":
            raise ConfigError("objective.kind", self.objective.kind, "causal_lm for data.source 'instruct'",
                              hint="instruction data trains a language model to answer")
        if self.data.pack and self.objective.kind not in PACKING_OBJECTIVES:
            raise ConfigError("data.pack", True, f"false with objective.kind {self.objective.kind!r}",
                              hint=f"packed rows serve the language-model objectives {PACKING_OBJECTIVES}")
        if self.data.label_field is not None and self.objective.kind != "classification":
            raise ConfigError("data.label_field", self.data.label_field,
                              f"null with objective.kind {self.objective.kind!r}",
                              hint="a label field trains a text classifier: set objective.kind: classification")
        if self.data.source == "jsonl" and self.objective.kind == "classification" and self.data.label_field is None:
            raise ConfigError("data.label_field", None, "the field holding each line's class for objective.kind "
                              "classification on data.source 'jsonl'", hint="e.g. --set data.label_field=label")
        if self.adapt is not None:
            if not isinstance(self.adapt, dict):
                raise ConfigError("adapt", self.adapt, "a mapping of formerkit.add_adapters arguments "
                                  "({method: lora, targets: [q, v], rank: 8, ...})")
            if not isinstance(self.adapt.get("method", "lora"), str):
                raise ConfigError("adapt.method", self.adapt.get("method"), "a method name (lora, dora, ...)")
        if self.then is not None:
            self.next_stage()  # validate the second stage now, before any training

    def next_stage(self) -> TrainConfig:
        data = self.to_dict()
        data.pop("then")
        merged = _merge(data, self.then or {})
        try:
            return TrainConfig.from_dict(merged)
        except ConfigError as error:
            raise ConfigError(f"then.{error.field}", error.value, error.expected) from error

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        return TrainConfig.from_dict(apply_overrides(self.to_dict(), overrides))

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("recipe", str(path), "an existing YAML file or a recipe name (formerkit recipes)")
        try:
            data = load_yaml(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError("recipe", str(path), "a valid YAML document", hint=str(error)) from error
        if not isinstance(data, dict):
            raise ConfigError("recipe", str(path), "a YAML mapping of recipe sections")
        return cls.from_dict(data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_MODEL_SPEC_FIELDS = ("from", "preset", "overrides", "config")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Sets dotted keys in a recipe dict: ``{"optim.lr": 1e-3, "model.num_layers": 2}``."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = key.split(".")
        if key == "model.from" and value is not None and isinstance(data.get("model"), dict):
            # --set model.from=RUN names the start: it replaces the recipe's preset or config (they would conflict)
            data["model"].pop("preset", None)
            data["model"].pop("config", None)
        if parts[0] == "model" and len(parts) > 1 and parts[1] not in _MODEL_SPEC_FIELDS:
            data.setdefault("model", {}).setdefault("overrides", {})[".".join(parts[1:])] = value
            continue
        target = data
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return data


def list_recipes() -> list[str]:
    """Names of the recipes shipped with formerkit."""
    folder = resources.files("formerkit") / "recipes"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> TrainConfig:
    """A shipped recipe by name, or a user's YAML file."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return TrainConfig.from_file(text)
    with resources.as_file(shipped_recipe(text, "or a path to a YAML file")) as path:
        return TrainConfig.from_file(path)


def shipped_recipe(name: str, alternative: str = "") -> Any:
    """The shipped recipe file called ``name`` (an importlib.resources Traversable); an unknown name is a
    ConfigError listing the recipes (and ``alternative``, another accepted kind of value) with a "did you mean"."""
    recipes = list_recipes()
    if name not in recipes:
        import difflib

        close = difflib.get_close_matches(name, recipes, n=1, cutoff=0.4)
        expected = " ".join(part for part in (f"a recipe name ({', '.join(recipes)})", alternative) if part)
        raise ConfigError("recipe", name, expected, hint=f"did you mean {close[0]!r}?" if close else "")
    return resources.files("formerkit") / "recipes" / f"{name}.yaml"
