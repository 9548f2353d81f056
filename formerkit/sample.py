"""Drawing images from a generative run (``formerkit sample``): a run whose objective has a ``sample`` method (the
diffusion objectives flow_matching and ddpm, masked generation) turns class labels into images in the data's raw
units (0-16 for digits).

``sample_images(run, labels, steps=, guidance=, seed=)`` is the one call (a server loads the run once with
``load_image_generator`` and passes that instead of the path); ``sample_command`` is the command: a grid PNG and the
samples as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from formerkit.checkpoint import load_extra
from formerkit.data.base import DataBundle
from formerkit.errors import CheckpointError, InputError
from formerkit.generation.grid import save_grid
from formerkit.runs import load_run_model, model_dir, run_objective
from formerkit.train.objectives import make_objective, objective_class

__all__ = ["ImageGenerator", "generates_images", "image_generator", "load_image_generator", "sample_command",
           "sample_images"]


def _objective_kind(extra: dict[str, Any]) -> str | None:
    recipe = extra.get("recipe")
    if isinstance(recipe, dict) and isinstance(recipe.get("objective"), dict):
        return recipe["objective"].get("kind", "causal_lm")
    return extra.get("objective")


def generates_images(target: str | Path) -> bool:
    """Whether ``target`` (a run or a model directory a run saved) holds an image generator: its objective can
    ``sample``."""
    return _draws_images(_objective_kind(load_extra(model_dir(target))))


def _draws_images(kind: str | None) -> bool:
    return kind is not None and callable(getattr(objective_class(kind), "sample", None))


@dataclass
class ImageGenerator:
    """A loaded generative run: its model (the EMA weights when the run kept an EMA), its objective (the sampler
    and the data's units) and its class names."""

    model: nn.Module
    objective: Any
    classes: list[str]
    # The data's raw units per pixel value 1 of a [0, 1] image (digits: 16), for showing samples.
    raw_max: float

    def sample(self, labels, *, steps: int | None = None, guidance: float | None = None, seed: int = 0) -> Tensor:
        """Images [N, C, H, W] (float, the data's raw units) of the classes ``labels`` (ids, [N]); ``steps`` and
        ``guidance`` default to the run's recipe (objective.sample_steps, objective.guidance)."""
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed: expected an integer, got {seed!r}")
        generator = torch.Generator().manual_seed(seed)
        return self.objective.sample(self.model, labels, steps=steps, guidance=guidance, generator=generator)


def load_image_generator(target: str | Path) -> ImageGenerator:
    """The image generator of a run directory (or a model directory a run saved). A run that does not generate
    images (a classifier, a language model) is refused by name."""
    return image_generator(target, *load_run_model(target, imported=True))


def image_generator(target: str | Path, model: nn.Module, recipe, extra: dict[str, Any]) -> ImageGenerator:
    """``load_image_generator`` over a run already loaded (``runs.load_run_model``'s model, recipe and extra), as
    ``formerkit serve`` has it; ``target`` names the run in the refusal."""
    kind = run_objective(recipe, extra)
    if recipe is None or not _draws_images(kind):
        hint = (" (a language model: formerkit generate writes text)" if model.config.head.kind == "lm" else "")
        raise CheckpointError(f"{target}: objective.kind is {kind!r}, which does not generate images{hint}; "
                              f"formerkit sample draws from image generators (flow_matching, ddpm, ...)")
    preprocessing = extra["preprocessing"]
    classes = list(preprocessing.get("classes") or [])
    bundle = DataBundle(train=None, valid=None, test=None, model_fields={"num_classes": len(classes)},
                        preprocessing=preprocessing)
    return ImageGenerator(model, make_objective(recipe.objective, bundle), classes,
                          1.0 / float(preprocessing.get("scale", 1.0)))


def sample_images(model_or_run, labels, *, steps: int | None = None, guidance: float | None = None,
                  seed: int = 0) -> Tensor:
    """Images [N, C, H, W] in the data's raw units (float; 0-16 for digits) of the classes ``labels`` [N], from a
    run directory, a model directory a run saved, or an ``ImageGenerator`` already loaded (a server keeps one).
    ``steps`` and ``guidance`` default to the recipe's; ``seed`` fixes the noise (the same seed and labels give the
    same images)."""
    generator = model_or_run if isinstance(model_or_run, ImageGenerator) else load_image_generator(model_or_run)
    return generator.sample(labels, steps=steps, guidance=guidance, seed=seed)


def sample_command(target: str | Path, out: str | Path, *, label: int | None = None, num: int = 64,
                   steps: int | None = None, guidance: float | None = None, seed: int = 0) -> dict[str, Any]:
    """``formerkit sample``: ``num`` images of class ``label`` (None: every class in turn, 0, 1, 2, ...) written to
    OUT/grid.png (one column per class when drawing every class) and OUT/samples.safetensors (``images`` [N, C, H,
    W] float in the data's raw units, ``labels`` [N] long). Returns what was written, for printing."""
    import time

    from safetensors.torch import save_file

    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise InputError(f"--num: expected an integer >= 1, got {num!r}")
    generator = load_image_generator(target)
    count = len(generator.classes)
    if label is not None and not 0 <= label < count:
        raise InputError(f"--class: a class id in [0, {count - 1}] ({', '.join(generator.classes)}), got {label}")
    labels = (torch.full((num,), label, dtype=torch.long) if label is not None
              else torch.arange(num, dtype=torch.long) % count)
    started = time.perf_counter()
    images = generator.sample(labels, steps=steps, guidance=guidance, seed=seed)
    seconds = time.perf_counter() - started
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = 8 if label is not None else count
    grid = save_grid(images / generator.raw_max, out / "grid.png", columns)
    tensors = out / "samples.safetensors"
    save_file({"images": images.float().contiguous(), "labels": labels}, str(tensors))
    config = generator.objective.config
    return {"grid": grid, "samples": tensors, "count": num, "seconds": seconds,
            "classes": [generator.classes[index] for index in sorted(set(labels.tolist()))],
            "steps": config.sample_steps if steps is None else steps,
            "guidance": config.guidance if guidance is None else guidance}
