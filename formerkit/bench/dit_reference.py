"""A reference diffusion Transformer written the way the original DiT code writes it (Peebles & Xie, 2023,
"Scalable Diffusion Models with Transformers", facebookresearch/DiT ``models.py``), for ``formerkit bench dit``.

It is a peer to measure against, not part of formerkit: one class per piece of the original, each doing what the
original's does, in our own words. The original builds on timm's ``PatchEmbed``, ``Attention`` and ``Mlp``; those
are written out here with the same layers:

- patch embedding: a convolution with kernel = stride = patch size, then tokens in row-major order;
- fixed 2-D sine-cosine position embeddings (not trained), added to the patch tokens;
- timestep embedder: 256 sinusoidal features (cosines then sines, periods up to 10,000), Linear, SiLU, Linear;
- label embedder: a table with one extra row (the null class) that a label is replaced by with probability
  ``class_dropout`` while training (classifier-free guidance);
- block: LayerNorm without affine parameters (eps 1e-6); ``adaLN_modulation`` = SiLU + Linear to 6 x width (shift,
  scale, gate of attention and of the MLP); ``x + gate * attn(norm(x) * (1 + scale) + shift)``, the same for the MLP;
- attention as timm's: one fused qkv Linear (with bias), heads split, then either its own
  ``softmax(q k^T / sqrt(d)) v`` -- what timm did when DiT was released (timm 0.6, December 2022), ``explicit`` --
  or ``F.scaled_dot_product_attention``, what timm >= 0.9 does by default (``fused_attn``), ``sdpa``; then the output
  projection;
- MLP: Linear, GELU with the tanh approximation, Linear (ratio 4);
- final layer: the adaLN-modulated LayerNorm (shift and scale from SiLU + Linear to 2 x width), then a Linear to
  patch x patch x out channels, unpatchified to an image.

The condition is ``c = timestep embedding + label embedding``. The original's ``learn_sigma`` (twice the output
channels, for a learned variance) is off by default here, as formerkit's DiT predicts the noise or velocity only;
turn it on to reproduce DiT's output width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReferenceDiT"]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _sincos_2d(width: int, grid: int) -> Tensor:
    """[grid * grid, width] for the tokens in row-major order, as MAE's and DiT's: the first half of each vector
    encodes the token's column, the second half its row, each as the sines then the cosines of
    ``position / 10000^(i / (width / 4))``, i < width / 4."""
    def one_axis(dim: int, positions: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        angles = positions.reshape(-1, 1).double() * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(width // 2, columns), one_axis(width // 2, rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequencies // 2
        rates = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * rates[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, classes: int, width: int, dropout: float):
        super().__init__()
        self.classes, self.dropout = classes, dropout
        self.table = nn.Embedding(classes + (dropout > 0), width)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            labels = torch.where(torch.rand(labels.shape[0], device=labels.device) < self.dropout, self.classes,
                                 labels)
        return self.table(labels)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kind: str):
        super().__init__()
        self.heads, self.head_dim, self.kind = heads, width // heads, kind
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.kind == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, attention)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class ReferenceDiT(nn.Module):
    """The DiT of the module docstring: ``model(x [N, C, H, W], t [N], y [N]) -> [N, C_out, H, W]``."""

    def __init__(self, *, image_size: int, patch: int, channels: int, width: int, depth: int, heads: int,
                 classes: int, mlp_ratio: float = 4.0, class_dropout: float = 0.1, learn_sigma: bool = False,
                 attention: str = "explicit"):
        super().__init__()
        if attention not in ("explicit", "sdpa"):
            raise ValueError(f"attention: expected 'explicit' or 'sdpa', got {attention!r}")
        self.patch, self.out_channels = patch, channels * 2 if learn_sigma else channels
        self.x_embedder = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(classes, width, class_dropout)
        grid = image_size // patch
        # Fixed, as in DiT (a parameter with requires_grad=False there; a buffer here, the same in training).
        self.register_buffer("pos_embed", _sincos_2d(width, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, attention) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch, self.out_channels)
        self._initialize()

    def _initialize(self) -> None:
        """DiT's initialization: Xavier-uniform Linears with zero biases, the patch convolution as a Linear, N(0,
        0.02) label table and timestep MLP, and every adaLN map and the final Linear at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[N, tokens, patch * patch * C] -> [N, C, H, W] (each token's vector is its patch, pixel-major)."""
        batch, tokens, _ = x.shape
        grid, p, c = int(math.isqrt(tokens)), self.patch, self.out_channels
        x = x.reshape(batch, grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, c, grid * p, grid * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))
