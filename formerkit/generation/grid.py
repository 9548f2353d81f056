"""Image grids: many small images side by side in one PNG (formerkit sample's grid.png, the report's samples); one
image as PNG bytes (formerkit serve's image generation)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["grid_image", "png_bytes", "save_grid"]


def grid_image(pixels: Tensor, columns: int, *, zoom: int = 4, gap: int = 2):
    """A PIL image of ``pixels`` [N, C, H, W] in [0, 1] (1 or 3 channels), ``columns`` per row, each image enlarged
    ``zoom`` times (nearest neighbour: small images keep their pixels) with ``gap`` dark pixels between them."""
    from PIL import Image

    count, channels, height, width = pixels.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    cell_h, cell_w = height * zoom, width * zoom
    canvas = torch.zeros(channels, rows * cell_h + (rows + 1) * gap, columns * cell_w + (columns + 1) * gap)
    big = pixels.detach().float().clamp(0, 1).cpu().repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = gap + row * (cell_h + gap), gap + column * (cell_w + gap)
        canvas[:, top:top + cell_h, left:left + cell_w] = big[index]
    array = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if channels == 1 else array, mode="L" if channels == 1 else "RGB")


def save_grid(pixels: Tensor, path: str | Path, columns: int, **options) -> Path:
    """Writes ``grid_image(pixels, columns, **options)`` to ``path`` (a PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(pixels, columns, **options).save(path)
    return path


def png_bytes(pixels: Tensor, *, zoom: int = 1) -> bytes:
    """One image ``pixels`` [C, H, W] in [0, 1] (1 channel: grayscale, 3: RGB) as PNG bytes: each value clamped to
    [0, 1] and mapped to round(255 * value), as ``grid_image`` does; enlarged ``zoom`` times by nearest neighbour."""
    import io

    from PIL import Image

    channels = pixels.shape[0]
    if pixels.dim() != 3 or channels not in (1, 3):
        raise ValueError(f"pixels: expected [C, H, W] with 1 or 3 channels, got {list(pixels.shape)}")
    big = pixels.detach().float().clamp(0, 1).cpu().repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    array = (big * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if channels == 1 else array, mode="L" if channels == 1 else "RGB").save(
        buffer, format="PNG")
    return buffer.getvalue()
