"""Images: scikit-learn's digits (on every machine with scikit-learn), and the user's image folders.

Images are held in memory as float tensors [N, C, H, W], normalized per channel with the training split's mean and
standard deviation; the normalization (and the resizing) is recorded in the bundle's preprocessing so a saved model
applies it to raw inputs later.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from formerkit.data.base import ArraySplit, DataBundle, DataError

__all__ = ["augment_images", "denormalize_images", "digits_bundle", "image_bundle", "normalize_images"]


def augment_images(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Light augmentation for small images: a random rotation (up to 10 degrees), scaling (0.9 to 1.1) and shift
    (up to 1/8 of the side) per image, by one affine resampling. Fills with the image's minimum (background)."""
    images = batch["inputs"]
    count = images.shape[0]
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(count, generator=generator)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * 0.25  # in [-1, 1] grid units: 1/8 of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    moved = F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return {**batch, "inputs": moved + background}


def normalize_images(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def denormalize_images(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """``normalize_images`` undone, clamped to [0, 1]: images [..., C, H, W] as they are shown."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


def image_bundle(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                 test_labels: torch.Tensor, config, *, scale: float, classes: list[str], source: str,
                 valid_fraction: float = 0.0) -> DataBundle:
    """Builds the bundle from raw images [N, C, H, W] (raw units; ``scale`` maps them to [0, 1])."""
    if config.labels_per_class is not None:
        train_images, train_labels = _first_per_class(train_images, train_labels, config.labels_per_class, classes)
    size = config.image_size
    if size is not None and tuple(train_images.shape[-2:]) != (size, size):
        resize = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    else:
        resize = lambda x: x  # noqa: E731
    train_x = resize(train_images.float() * scale)
    test_x = resize(test_images.float() * scale)
    mean = train_x.mean(dim=(0, 2, 3)).tolist()
    std = train_x.std(dim=(0, 2, 3)).clamp(min=1e-6).tolist()
    train_x, test_x = normalize_images(train_x, mean, std), normalize_images(test_x, mean, std)
    valid = None
    if valid_fraction > 0:
        train_x, train_labels, valid_x, valid_labels = _stratified_holdout(train_x, train_labels, valid_fraction)
        valid = ArraySplit({"inputs": valid_x, "labels": valid_labels})
    channels, height, width = train_x.shape[1:]
    return DataBundle(
        train=ArraySplit({"inputs": train_x, "labels": train_labels.long()}), valid=valid,
        test=ArraySplit({"inputs": test_x, "labels": test_labels.long()}),
        model_fields={"image_size": [height, width], "in_channels": channels, "num_classes": len(classes)},
        preprocessing={"kind": "image", "scale": scale, "image_size": [height, width], "in_channels": channels,
                       "mean": mean, "std": std, "classes": classes, "resize": "bilinear"},
        augment=augment_images if config.augment else None, unit="examples",
        description=f"{source}: {len(train_x)} training and {len(test_x)} test images of {channels}x{height}x{width},"
                    f" {len(classes)} classes" + (f", {len(valid_labels)} held out for validation" if valid else ""),
    )


def _first_per_class(images, labels, count, classes):
    """The first ``count`` images of each class, in the split's order (data.labels_per_class)."""
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(len(classes)):
        members = (labels == label).nonzero().flatten()
        if len(members) < count:
            raise DataError(f"data.labels_per_class: {count} asked, but class {classes[label]!r} has only "
                            f"{len(members)} training images; lower it or give more images")
        keep[members[:count]] = True
    return images[keep], labels[keep]


def _stratified_holdout(images, labels, fraction):
    """Every k-th example of each class (in order) goes to validation: deterministic and stratified."""
    every = max(2, round(1 / fraction))
    keep = torch.ones(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        keep[members[every - 1::every]] = False
    return images[keep], labels[keep], images[~keep], labels[~keep]


def digits_bundle(config) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits (values 0-16): a fixed stratified 75/25 train/test split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise DataError("data.source 'digits' needs scikit-learn: pip install 'formerkit[train]'") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.25,
                                           stratify=labels.numpy(), random_state=0)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return image_bundle(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], config,
                        scale=1 / 16, classes=[str(i) for i in range(10)], source="digits",
                        valid_fraction=config.valid_fraction)
