"""``formerkit bench samples``: the quality of generated images, judged by a classifier trained on the real ones.

A class-conditioned generator is asked for images of given classes; a classifier run (``formerkit train cct-digits``)
is the judge:

- **recognized**: the fraction of samples the classifier labels as the class they were drawn for (overall and per
  class) -- a generator that draws the wrong digit, or no digit, is caught here;
- **Fréchet distance** (FD) between the Gaussians fitted to the classifier's penultimate features (the pooled vector
  its head maps to logits) of the samples and of the real test images: the FID recipe (Heusel et al. 2017, "GANs
  Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium") with the task's own classifier in
  place of Inception. It sees what "recognized" does not: samples that all look alike, or that miss a class's styles.

FD is only meaningful next to references on the same features: the real training images (the floor: what two
draws of real digits score) and a simple baseline, each class's mean training image plus Gaussian pixel noise (in raw
units, clipped to the data's range), drawn for the same labels as the samples. Every image goes through the
classifier run's own preprocessing (raw units -> scale -> resize -> normalize), as ``formerkit predict`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from formerkit.data.images import normalize_images
from formerkit.errors import CheckpointError, InputError

__all__ = ["SampleJudge", "SampleReport", "frechet_distance", "frechet_distance_from_statistics",
           "gaussian_statistics", "judge_samples", "load_samples", "mean_image_baseline", "recognized_fraction"]

# The baseline's pixel noise (raw units of scikit-learn's digits, 0-16): an eighth of the range, enough to blur the
# strokes' edges while the class mean stays recognizable.
BASELINE_NOISE = 2.0
BATCH = 256  # images per classifier pass


# ----- Fréchet distance -----


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """The mean [D] and the unbiased covariance [D, D] of ``features`` [N, D] (N >= 2), in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise InputError(f"features: expected [N, D] with N >= 2, got {list(features.shape)}")
    values = features.double()
    return values.mean(0), torch.cov(values.T, correction=1).reshape(values.shape[1], values.shape[1])


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0 from rounding are
    taken as 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_statistics(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mean_a, cov_a) and N(mean_b, cov_b):
    ``|mean_a - mean_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2))``.

    The trace of the matrix square root is taken as that of ``(A^(1/2) B A^(1/2))^(1/2)``, which has the same
    eigenvalues as ``(A B)^(1/2)`` but is symmetric, so an eigendecomposition gives it without the complex parts a
    general ``sqrtm`` of ``A B`` produces on nearly singular covariances."""
    mean_a, mean_b, cov_a, cov_b = (t.double() for t in (mean_a, mean_b, cov_a, cov_b))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    difference = mean_a - mean_b
    value = difference @ difference + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return max(float(value), 0.0)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of features [N, D] and [M, D]."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise InputError(f"features: expected [N, D] and [M, D] with the same D, got {list(features_a.shape)} and "
                         f"{list(features_b.shape)}")
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


# ----- recognized fraction -----


def recognized_fraction(predicted: Tensor, requested: Tensor, num_classes: int) -> tuple[float, list[float | None]]:
    """(the fraction of ``predicted == requested``, the same fraction per requested class; None for a class that was
    never requested)."""
    if predicted.shape != requested.shape or predicted.dim() != 1 or predicted.numel() == 0:
        raise InputError(f"labels: expected two equal non-empty vectors, got {list(predicted.shape)} and "
                         f"{list(requested.shape)}")
    hits = (predicted == requested).double()
    per_class: list[float | None] = []
    for label in range(num_classes):
        members = requested == label
        per_class.append(float(hits[members].mean()) if members.any() else None)
    return float(hits.mean()), per_class


# ----- the baseline -----


def mean_image_baseline(images: Tensor, labels: Tensor, wanted: Tensor, *, noise: float, maximum: float,
                        seed: int = 0) -> Tensor:
    """For each label in ``wanted``, the mean of the ``images`` [N, C, H, W] (raw units) of that label plus
    N(0, noise^2) per pixel, clipped to [0, maximum]."""
    if noise < 0:
        raise InputError(f"baseline noise: expected a standard deviation >= 0, got {noise}")
    missing = sorted(set(wanted.unique().tolist()) - set(labels.unique().tolist()))
    if missing:
        raise InputError(f"baseline: no training images of classes {missing}")
    means = torch.stack([images[labels == label].mean(0) if (labels == label).any() else images[0] * 0
                         for label in range(int(max(labels.max(), wanted.max())) + 1)])
    generator = torch.Generator().manual_seed(seed)
    drawn = means[wanted] + noise * torch.randn(means[wanted].shape, generator=generator)
    return drawn.clamp(0, maximum)


# ----- the judge -----


class SampleJudge:
    """A classifier run and its data: features and predictions for raw images, and the real images' features.

    ``run``: a classification run on images (``formerkit train cct-digits --out RUN``)."""

    def __init__(self, run: str | Path):
        from formerkit.data import build_data
        from formerkit.runs import load_run_model

        self.run = run
        self.model, recipe, extra = load_run_model(run)
        self.preprocessing = extra.get("preprocessing") or {}
        if recipe.objective.kind != "classification" or self.preprocessing.get("kind") != "image":
            raise CheckpointError(f"{run}: the judge must be an image classifier run (e.g. formerkit train "
                                  f"cct-digits); this run trained {recipe.objective.kind!r} on "
                                  f"{self.preprocessing.get('kind') or 'non-image'} data")
        self.classes = list(self.preprocessing["classes"])
        self.maximum = 1 / self.preprocessing["scale"]  # the raw units' top (16 for the digits)
        bundle = build_data(recipe.data)
        # The bundle's images are normalized already (as the classifier saw them); the raw training images (for the
        # baseline) are those undone.
        self.train_inputs, self.train_labels = bundle.train.tensors["inputs"], bundle.train.tensors["labels"]
        self.test_inputs, self.test_labels = bundle.test.tensors["inputs"], bundle.test.tensors["labels"]
        mean = torch.tensor(self.preprocessing["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocessing["std"]).view(1, -1, 1, 1)
        self.train_raw = (self.train_inputs * std + mean) * self.maximum

    def normalize(self, images: Tensor) -> Tensor:
        """Raw images [N, C, H, W] -> the classifier's inputs (scaled, resized, normalized as in its training)."""
        channels = self.preprocessing["in_channels"]
        if images.dim() != 4 or images.shape[1] != channels:
            raise InputError(f"images: expected [N, {channels}, H, W] (the classifier's {channels} channel(s)), got "
                             f"{list(images.shape)}")
        if not torch.isfinite(images).all():
            raise InputError("images: values must be finite numbers")
        values = images.float() * self.preprocessing["scale"]
        size = tuple(self.preprocessing["image_size"])
        if tuple(values.shape[-2:]) != size:
            values = F.interpolate(values, size=size, mode="bilinear", align_corners=False)
        return normalize_images(values, self.preprocessing["mean"], self.preprocessing["std"])

    @torch.no_grad()
    def features(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(penultimate features [N, D], predicted labels [N]) of already normalized inputs."""
        features, predictions = [], []
        for start in range(0, len(inputs), BATCH):
            out = self.model(inputs[start:start + BATCH], return_outputs=True)
            if out.pooled is None:
                raise CheckpointError(f"{self.run}: the classifier's head does not pool, so it has no penultimate "
                                      "feature vector")
            features.append(out.pooled.float())
            predictions.append(out.logits.argmax(-1))
        return torch.cat(features), torch.cat(predictions)


@dataclass
class SampleReport:
    """What ``judge_samples`` measured."""

    count: int
    recognized: float
    recognized_per_class: list[float | None]
    # FD to the real test images' features: the samples, the real training images (floor), the baseline.
    fd_samples: float
    fd_train: float
    fd_baseline: float
    baseline_recognized: float
    baseline_noise: float
    classes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def markdown(self) -> str:
        lines = ["| images | count | recognized as requested | FD to test features |", "|---|---|---|---|",
                 f"| samples | {self.count} | {self.recognized:.1%} | {self.fd_samples:.3g} |",
                 f"| real training images (floor) | — | — | {self.fd_train:.3g} |",
                 f"| baseline: class mean + N(0, {self.baseline_noise:g}²) pixel noise | {self.count} | "
                 f"{self.baseline_recognized:.1%} | {self.fd_baseline:.3g} |", "",
                 "Recognized per class: " + ", ".join(
                     f"{name} {'—' if value is None else f'{value:.0%}'}"
                     for name, value in zip(self.classes, self.recognized_per_class, strict=True))]
        return "\n".join(lines)


def judge_samples(images: Tensor, labels: Tensor, judge: SampleJudge | str | Path, *,
                  baseline_noise: float = BASELINE_NOISE, seed: int = 0) -> SampleReport:
    """Judges generated ``images`` [N, C, H, W] (raw units) drawn for ``labels`` [N] (see the module docstring)."""
    judge = judge if isinstance(judge, SampleJudge) else SampleJudge(judge)
    if labels.dim() != 1 or len(labels) != len(images) or len(labels) < 2:
        raise InputError(f"labels: expected one label per image (at least 2 images), got labels "
                         f"{list(labels.shape)} for images {list(images.shape)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= len(judge.classes):
        raise InputError(f"labels: expected classes 0..{len(judge.classes) - 1} (the classifier's), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    sample_features, predicted = judge.features(judge.normalize(images))
    test_features, _ = judge.features(judge.test_inputs)
    train_features, _ = judge.features(judge.train_inputs)
    baseline = mean_image_baseline(judge.train_raw, judge.train_labels, labels, noise=baseline_noise,
                                   maximum=judge.maximum, seed=seed)
    baseline_features, baseline_predicted = judge.features(judge.normalize(baseline))
    recognized, per_class = recognized_fraction(predicted, labels, len(judge.classes))
    test_statistics = gaussian_statistics(test_features)
    return SampleReport(
        count=len(labels), recognized=recognized, recognized_per_class=per_class,
        fd_samples=frechet_distance_from_statistics(*gaussian_statistics(sample_features), *test_statistics),
        fd_train=frechet_distance_from_statistics(*gaussian_statistics(train_features), *test_statistics),
        fd_baseline=frechet_distance_from_statistics(*gaussian_statistics(baseline_features), *test_statistics),
        baseline_recognized=recognized_fraction(baseline_predicted, labels, len(judge.classes))[0],
        baseline_noise=baseline_noise, classes=judge.classes)


def load_samples(path: str | Path) -> tuple[Tensor, Tensor]:
    """(images [N, C, H, W], labels [N]) of a ``samples.safetensors`` that ``formerkit sample`` wrote."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "samples.safetensors"
    if not path.is_file():
        raise InputError(f"samples: {path} does not exist (expected the samples.safetensors of formerkit sample)")
    tensors = load_file(str(path))
    missing = [name for name in ("images", "labels") if name not in tensors]
    if missing:
        raise InputError(f"samples: {path} has no {' and no '.join(missing)} tensor (it has {sorted(tensors)})")
    images, labels = tensors["images"], tensors["labels"]
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
        raise InputError(f"samples: expected images [N, C, H, W] and labels [N], got {list(images.shape)} and "
                         f"{list(labels.shape)}")
    return images, labels
