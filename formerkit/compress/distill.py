"""Knowledge distillation: a student model trained on a teacher run's data to match the teacher's outputs.

The loss (Hinton et al., 2015) mixes the task's own loss on the labels with the KL divergence from the teacher's
softened distribution to the student's::

    (1 - alpha) * hard_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(the T^2 keeps the soft term's gradients at the scale of the hard term's as T grows), averaged over the examples
(classification) or the predicted tokens (causal language modelling; packed rows' ignored targets left out).
Optionally the student's final hidden states are pulled towards the teacher's (mean squared error, through a learned
projection when the widths differ; the projection is not part of the saved student).

With ``mixup`` (function matching, Beyer et al., 2022, "Knowledge distillation: A good teacher is patient and
consistent") each training image is mixed with another of its batch, ``w * x + (1 - w) * x'`` with ``w ~ U(0, 1)``
drawn per example from the step's generator; teacher and student see the same mixed image, the soft term matches the
teacher on it, and the hard term weighs the two labels ``w`` and ``1 - w``. The teacher then labels images that are
not in the training set, which is where a teacher has the most to add when labelled images are few.

A ViT or CCT student with DeiT's distillation token (``stem.distill_token: true``, Touvron et al., 2021) splits the
two terms between its heads: the class head learns from the labels (weight ``1 - alpha``), the distillation-token
head from the teacher (weight ``alpha``); the model's logits are the mean of the two.

``Distillation`` wraps the task's objective, so the ordinary trainer runs it: logging, evaluation (the task's own
metrics), checkpoints, exact resume and torchrun all work, and the result is a normal run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.config import ModelConfig
from formerkit.errors import ConfigError, InputError
from formerkit.models.registry import list_models
from formerkit.nn.int8 import is_quantized
from formerkit.runs import load_run_model
from formerkit.train.config import TrainConfig, list_recipes, load_recipe
from formerkit.train.objectives import CausalLM, Objective
from formerkit.train.trainer import train

__all__ = ["Distillation", "distill_run", "distillation_loss", "mix_images"]

KINDS = ("classification", "causal_lm")
IMAGE_SOURCES = ("digits", "image_folder")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, temperature: float,
                      alpha: float, smoothing: float = 0.0, ignore_index: int = -100,
                      mixed: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``, both
    averaged over the targets that are not ``ignore_index`` (logits [..., classes], targets [...]).

    ``mixed = (partner_targets, weights)`` (classification of mixed images, see ``mix_images``): the hard term of each
    example is ``w * CE(targets) + (1 - w) * CE(partner_targets)``."""
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes).float()
    teacher = teacher_logits.reshape(-1, classes).float()
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    count = keep.sum().clamp(min=1)
    if mixed is None:
        hard = F.cross_entropy(student, targets, label_smoothing=smoothing, ignore_index=ignore_index,
                               reduction="sum") / count
    else:
        partner, weights = mixed[0].reshape(-1), mixed[1].reshape(-1).float()
        first = F.cross_entropy(student, targets, label_smoothing=smoothing, reduction="none")
        second = F.cross_entropy(student, partner, label_smoothing=smoothing, reduction="none")
        hard = (weights * first + (1 - weights) * second).mean()
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    soft = (kl * keep).sum() / count
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


def mix_images(inputs: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Each example mixed with a partner from the same batch: ``(w * x + (1 - w) * x[partner], partner, w)``, the
    partner a random permutation and ``w ~ U(0, 1)`` per example, both drawn from ``generator``."""
    count = inputs.shape[0]
    weights = torch.rand(count, generator=generator).to(inputs.device)
    partner = torch.randperm(count, generator=generator).to(inputs.device)
    w = weights.view((count,) + (1,) * (inputs.dim() - 1)).to(inputs.dtype)
    return w * inputs + (1 - w) * inputs[partner], partner, weights


class _StudentWithProjection(nn.Module):
    """The student and the projection of its final hidden states onto the teacher's width, trained together; a plain
    call is the student's (so evaluation sees the student alone)."""

    def __init__(self, model: nn.Module, projection: nn.Module):
        super().__init__()
        self.model, self.projection = model, projection

    def forward(self, *args, distill_hidden: bool = False, **kwargs):
        if not distill_hidden:
            return self.model(*args, **kwargs)
        output = self.model(*args, return_outputs=True, **kwargs)
        return output, self.projection(output.last_hidden_state)


def _check_settings(temperature: float, alpha: float, hidden_weight: float, mix: bool = False) -> None:
    if not isinstance(mix, bool):
        raise InputError(f"distill: mixup must be true or false, got {mix!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InputError(f"distill: temperature must be a number > 0 (2 to 4 is usual), got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise InputError(f"distill: alpha (the weight of the teacher's soft targets) must be in [0, 1], got "
                         f"{alpha!r}")
    if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float)) or hidden_weight < 0:
        raise InputError(f"distill: hidden_weight must be a number >= 0 (0: no hidden-state matching), got "
                         f"{hidden_weight!r}")


class Distillation(Objective):
    """The task's objective (classification or causal LM) with a frozen teacher's outputs mixed into the loss."""

    def __init__(self, base: Objective, teacher: nn.Module, *, temperature: float = 2.0, alpha: float = 0.5,
                 hidden_weight: float = 0.0, mixup: bool = False, teacher_path: str | None = None):
        _check_settings(temperature, alpha, hidden_weight, mixup)
        if base.kind not in KINDS:
            raise InputError(f"distill: works for {' and '.join(KINDS)} runs, this one trains {base.kind!r}")
        if mixup and base.kind != "classification":
            raise InputError(f"distill: mixup mixes images; this run trains {base.kind!r}, whose token ids cannot be "
                             "mixed: leave mixup off")
        super().__init__(base.config, base.bundle)
        self.base = base
        self.kind, self.primary_metric, self.higher_is_better = base.kind, base.primary_metric, base.higher_is_better
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.temperature, self.alpha, self.hidden_weight = float(temperature), float(alpha), float(hidden_weight)
        self.mixup = mixup
        self.record = {"teacher": teacher_path, "temperature": self.temperature, "alpha": self.alpha,
                       "hidden_weight": self.hidden_weight, "mixup": mixup}

    def model_fields(self) -> dict:
        return self.base.model_fields()

    def check_model(self, model_config) -> None:
        self.base.check_model(model_config)
        teacher = self.teacher.config
        if self.kind == "causal_lm" and model_config.stem.vocab_size != teacher.stem.vocab_size:
            raise ConfigError("model.stem.vocab_size", model_config.stem.vocab_size,
                              f"the teacher's vocabulary size ({teacher.stem.vocab_size})",
                              hint="a student must predict over the teacher's vocabulary; train it with the "
                                   "teacher's tokenizer and data")
        if self.kind == "classification" and model_config.head.num_classes != teacher.head.num_classes:
            raise ConfigError("model.head.num_classes", model_config.head.num_classes,
                              f"the teacher's number of classes ({teacher.head.num_classes})",
                              hint="a student must classify into the teacher's label set")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model = self.base.wrap_model(model)
        if not self.hidden_weight:
            return model
        width, teacher_width = model.config.width, self.teacher.config.width
        projection = nn.Identity() if width == teacher_width else nn.Linear(width, teacher_width, bias=False)
        return _StudentWithProjection(model, projection)

    def unwrap_model(self, trained: nn.Module) -> nn.Module:
        return self.base.unwrap_model(trained.model if isinstance(trained, _StudentWithProjection) else trained)

    def _inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Any]]:
        if self.kind == "causal_lm":
            return CausalLM.inputs_and_targets(batch)
        return batch["inputs"], batch["labels"], {}

    def loss(self, model, batch, generator):
        inputs, targets, kwargs = self._inputs(batch)
        mixed = None
        if self.mixup:
            if not inputs.is_floating_point():
                raise InputError(f"distill: mixup mixes images or feature vectors; this data gives {inputs.dtype} "
                                 "inputs (token ids), which cannot be mixed: leave mixup off")
            inputs, partner, weights = mix_images(inputs, generator)
            mixed = (targets[partner], weights)
        if next(self.teacher.parameters()).device != inputs.device:
            self.teacher.to(inputs.device)
        with torch.no_grad():
            teacher = self.teacher(inputs, return_outputs=True, **kwargs)
        if self.hidden_weight:
            output, projected = model(inputs, distill_hidden=True, **kwargs)
        else:
            output, projected = model(inputs, return_outputs=True, **kwargs), None
        if self.training_usage is not None:
            self.training_usage.add(output)
        if output.head_logits is not None:
            # DeiT: the class token's head learns from the labels, the distillation token's from the teacher.
            class_logits, distill_logits = output.head_logits
            loss = ((1 - self.alpha) * distillation_loss(class_logits, teacher.logits, targets, temperature=1.0,
                                                         alpha=0.0, smoothing=self.config.label_smoothing,
                                                         mixed=mixed)
                    + self.alpha * distillation_loss(distill_logits, teacher.logits, targets,
                                                     temperature=self.temperature, alpha=1.0))
        else:
            loss = distillation_loss(output.logits, teacher.logits, targets, temperature=self.temperature,
                                     alpha=self.alpha, smoothing=self.config.label_smoothing, mixed=mixed)
        if projected is not None:
            loss = loss + self.hidden_weight * F.mse_loss(projected.float(), teacher.last_hidden_state.float())
        return self.with_aux(loss, output.aux_loss)

    def units(self, batch):
        return self.base.units(batch)

    @torch.no_grad()
    def evaluate(self, model, batches):
        return self.base.evaluate(model, batches)


def _student_recipe(student: str, teacher_recipe, overrides: dict[str, Any]):
    """The student's recipe: a recipe (shipped name or YAML file with data/objective) as it is; a preset name or a
    model YAML file: the teacher's recipe with that model."""
    import yaml

    path = Path(student)
    if student in list_recipes():
        recipe = load_recipe(student)
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise InputError(f"--student: {path} is not valid YAML ({error})") from None
        if isinstance(document, dict) and ("data" in document or "objective" in document):
            recipe = load_recipe(path)
        else:
            data = teacher_recipe.to_dict()
            data["model"] = {"config": ModelConfig.from_file(path).to_dict()}
            data["name"] = f"{path.stem}-distilled"
            recipe = TrainConfig.from_dict(data)
    elif student in list_models():
        data = teacher_recipe.to_dict()
        data["model"] = {"preset": student}
        data["name"] = f"{student}-distilled"
        recipe = TrainConfig.from_dict(data)
    else:
        raise InputError(f"--student: {student!r} is neither a recipe ({', '.join(list_recipes())}), a preset "
                         f"({', '.join(list_models())}) nor a .yaml file")
    if overrides:
        recipe = recipe.with_overrides(overrides)
    if recipe.then is not None:
        raise InputError(f"--student: the recipe {recipe.name!r} has a second stage (then:); distil into a "
                         "one-stage recipe")
    if recipe.objective.kind != teacher_recipe.objective.kind:
        raise InputError(f"--student: the student's recipe trains {recipe.objective.kind!r}, the teacher was trained "
                         f"for {teacher_recipe.objective.kind!r}; a student learns the teacher's task")
    if recipe.data != teacher_recipe.data:
        raise InputError("--student: the student's recipe reads other data than the teacher's run; distillation "
                         "needs the teacher's data (its labels or vocabulary): give a preset or model file, or set "
                         "the student's data to the teacher's")
    return recipe


def distill_run(teacher: str | Path, student: str, out: str | Path, *, overrides: dict[str, Any] | None = None,
                temperature: float = 2.0, alpha: float = 0.5, hidden_weight: float = 0.0, mixup: bool = False,
                resume: bool = False, console=None):
    """Trains ``student`` (a recipe, a preset, or a model YAML) into the run directory ``out`` with the teacher run's
    outputs in the loss (see ``Distillation``). Returns the trainer's ``TrainResult``."""
    _check_settings(temperature, alpha, hidden_weight, mixup)
    model, teacher_recipe, _ = load_run_model(teacher)
    if is_quantized(model):
        raise InputError(f"--teacher: {teacher} is quantized; teach with the float run it came from")
    if teacher_recipe.objective.kind not in KINDS:
        raise InputError(f"--teacher: distillation works for {' and '.join(KINDS)} runs, {teacher} trained "
                         f"{teacher_recipe.objective.kind!r}")
    recipe = _student_recipe(student, teacher_recipe, overrides or {})
    if mixup and recipe.data.source not in IMAGE_SOURCES:
        raise InputError(f"--mixup: mixes images (data.source {' or '.join(IMAGE_SOURCES)}); this run reads "
                         f"{recipe.data.source!r}: leave --mixup off")

    def wrap(base: Objective) -> Objective:
        return Distillation(base, model, temperature=temperature, alpha=alpha, hidden_weight=hidden_weight,
                            mixup=mixup, teacher_path=str(Path(teacher).resolve()))

    return train(recipe, out, resume=resume, console=console, wrap_objective=wrap)
