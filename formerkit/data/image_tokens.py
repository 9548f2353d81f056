"""Images as discrete tokens, for masked generative modelling (formerkit.generation.masked).

Two tokenizers, both over images in the data's raw units (digits: intensities 0-16):

- ``PixelTokens``: one token per pixel and channel, the pixel's intensity level. 8x8 digits are already discrete (17
  levels), so this loses nothing: 64 tokens of a 17-word vocabulary.
- ``PatchCodebook``: one token per p x p patch, the nearest of K patch centres learned by k-means on the training
  images (a tiny stand-in for the VQ tokenizers of MaskGIT and its kin: the Transformer models the same token grid,
  the tokenizer is just not learned end to end). Lossy: decoding gives each patch its centre.

A tokenizer describes itself as JSON (``describe``; the codebook's centres included) and ``image_tokenizer`` rebuilds
it, so a run saves it with its preprocessing and sampling later decodes with the same one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from formerkit.data.base import DataError
from formerkit.errors import InputError

__all__ = ["PatchCodebook", "PixelTokens", "image_tokenizer", "raw_images"]


def raw_images(images: Tensor, preprocessing: dict[str, Any]) -> Tensor:
    """Normalized images [N, C, H, W] (as a data bundle holds them) back in raw units (digits: 0-16)."""
    mean = torch.tensor(preprocessing["mean"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing["std"], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean) / preprocessing["scale"]


def _check_images(images: Tensor, shape: tuple[int, int, int], name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
        got = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{name}: expected images [N, {shape[0]}, {shape[1]}, {shape[2]}], got {got}")


class PixelTokens:
    """One token per pixel (and channel): the intensity rounded to an integer level in 0..levels-1."""

    kind = "pixels"

    def __init__(self, levels: int, shape: tuple[int, int, int]):
        self.levels, self.shape = int(levels), tuple(int(s) for s in shape)
        self.vocab_size = self.levels
        self.length = self.shape[0] * self.shape[1] * self.shape[2]

    def encode(self, images: Tensor) -> Tensor:
        """Raw images [N, C, H, W] -> token ids [N, C*H*W] (channel, row, column order)."""
        _check_images(images, self.shape)
        return images.round().clamp(0, self.levels - 1).long().flatten(1)

    def decode(self, tokens: Tensor) -> Tensor:
        """Token ids [N, C*H*W] -> raw images [N, C, H, W] (float)."""
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise InputError(f"tokens: expected [N, {self.length}], got {list(tokens.shape)}")
        return tokens.float().view(-1, *self.shape)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": self.levels, "shape": list(self.shape)}


class PatchCodebook:
    """One token per patch: the index of the nearest centre (Euclidean, raw units) among ``centres`` [K, C*p*p]."""

    kind = "codebook"

    def __init__(self, centres: Tensor, patch_size: int, shape: tuple[int, int, int]):
        self.centres = torch.as_tensor(centres, dtype=torch.float32)
        self.patch_size, self.shape = int(patch_size), tuple(int(s) for s in shape)
        channels, height, width = self.shape
        if height % self.patch_size or width % self.patch_size:
            raise DataError(f"objective.codebook_patch: {self.patch_size} does not divide the {height}x{width} images")
        if self.centres.dim() != 2 or self.centres.shape[1] != channels * self.patch_size ** 2:
            raise DataError(f"codebook: expected centres [K, {channels * self.patch_size ** 2}], got "
                            f"{list(self.centres.shape)}")
        self.grid = (height // self.patch_size, width // self.patch_size)
        self.vocab_size = len(self.centres)
        self.length = self.grid[0] * self.grid[1]

    @classmethod
    def fit(cls, images: Tensor, size: int, patch_size: int, seed: int = 0) -> PatchCodebook:
        """k-means (scikit-learn's KMeans, k-means++ start, seeded) on every p x p patch of ``images`` [N, C, H, W]."""
        try:
            from sklearn.cluster import KMeans
        except ImportError as error:
            raise DataError("objective.image_tokens 'codebook' needs scikit-learn: pip install 'formerkit[train]'"
                            ) from error
        shape = tuple(images.shape[1:])
        patches = cls(torch.zeros(1, shape[0] * patch_size ** 2), patch_size, shape).patches(images)
        flat = patches.reshape(-1, patches.shape[-1]).double().numpy()
        if len(flat) < size:
            raise DataError(f"objective.codebook_size: {size} centres asked, but the images hold only {len(flat)} "
                            "patches")
        kmeans = KMeans(n_clusters=size, n_init=3, random_state=seed).fit(flat)
        return cls(torch.tensor(kmeans.cluster_centers_, dtype=torch.float32), patch_size, shape)

    def patches(self, images: Tensor) -> Tensor:
        """Images [N, C, H, W] -> patches [N, patches, C*p*p] in row-major grid order."""
        _check_images(images, self.shape)
        p = self.patch_size
        n, c = images.shape[:2]
        rows, cols = self.grid
        return (images.float().reshape(n, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
                .reshape(n, rows * cols, c * p * p))

    def encode(self, images: Tensor) -> Tensor:
        """Raw images [N, C, H, W] -> token ids [N, patches]: each patch's nearest centre."""
        patches = self.patches(images)
        centres = self.centres.to(patches.device)
        distances = (patches.unsqueeze(2) - centres).pow(2).sum(-1)
        return distances.argmin(dim=-1)

    def decode(self, tokens: Tensor) -> Tensor:
        """Token ids [N, patches] -> raw images [N, C, H, W]: each patch its centre."""
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise InputError(f"tokens: expected [N, {self.length}], got {list(tokens.shape)}")
        p, (c, _, _), (rows, cols) = self.patch_size, self.shape, self.grid
        patches = self.centres.to(tokens.device)[tokens]
        return (patches.reshape(-1, rows, cols, c, p, p).permute(0, 3, 1, 4, 2, 5)
                .reshape(-1, *self.shape))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "patch_size": self.patch_size, "shape": list(self.shape),
                "centres": self.centres.tolist()}


def image_tokenizer(description: dict[str, Any]) -> PixelTokens | PatchCodebook:
    """The tokenizer ``describe`` described."""
    kind = description.get("kind")
    if kind == "pixels":
        return PixelTokens(description["levels"], tuple(description["shape"]))
    if kind == "codebook":
        return PatchCodebook(torch.tensor(description["centres"]), description["patch_size"],
                             tuple(description["shape"]))
    raise DataError(f"image tokens: unknown kind {kind!r} (expected pixels or codebook)")
