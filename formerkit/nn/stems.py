"""Stems: what turns raw inputs into a sequence of vectors the core reads.

Each stem checks its input (shape, dtype, values) before doing any work and raises ``InputError`` with what it expected.
A stem may put learned tokens in front of the sequence (class token, registers); ``num_prefix_tokens`` says how many.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from formerkit.errors import InputError

__all__ = ["ConvTokenizer", "LinearStem", "PatchEmbedding", "TokenEmbedding", "build_stem"]


def _checking_values(x: Tensor) -> bool:
    """Value checks (which read the tensor) are skipped on meta tensors and while compiling or exporting."""
    return x.device.type != "meta" and not torch.compiler.is_compiling()


class TokenEmbedding(nn.Module):
    """Token ids [batch, tokens] -> vectors; optionally adds token-type (segment) embeddings, as BERT does.

    ``scale_embeddings`` multiplies the token embeddings by sqrt(width) (Vaswani et al.; Gemma), the factor first
    rounded to the embeddings' dtype as Gemma rounds it (sqrt(3072) is 55.4256... in float32, 55.5 in bfloat16)."""

    num_prefix_tokens = 0

    def __init__(self, vocab_size: int, width: int, max_seq_len: int, num_token_types: int = 0,
                 scale_embeddings: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.scale = math.sqrt(width) if scale_embeddings else None
        self.tokens = nn.Embedding(vocab_size, width)
        self.token_types = nn.Embedding(num_token_types, width) if num_token_types else None

    def check(self, input_ids: Tensor, token_type_ids: Tensor | None = None, name: str = "input_ids") -> None:
        if not isinstance(input_ids, Tensor):
            raise InputError(f"{name}: expected a tensor of token ids [batch, tokens], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise InputError(f"{name}: expected shape [batch, tokens], got {list(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise InputError(f"{name}: expected an integer tensor of token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise InputError(f"{name}: expected at least one token, got shape {list(input_ids.shape)}")
        if input_ids.shape[1] > self.max_seq_len:
            raise InputError(f"{name}: {input_ids.shape[1]} tokens is longer than the model's max_seq_len "
                             f"({self.max_seq_len})")
        if _checking_values(input_ids) and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.vocab_size:
                raise InputError(f"{name}: token ids must lie in [0, {self.vocab_size}) (vocab_size), "
                                 f"got values from {low} to {high}")
        if token_type_ids is not None:
            if self.token_types is None:
                raise InputError("token_type_ids: this model has no token types (stem.num_token_types is 0)")
            if not isinstance(token_type_ids, Tensor) or token_type_ids.shape != input_ids.shape:
                shape = list(token_type_ids.shape) if isinstance(token_type_ids, Tensor) else token_type_ids
                raise InputError(f"token_type_ids: expected shape {list(input_ids.shape)} like {name}, got {shape}")
            if _checking_values(token_type_ids):
                low, high = int(token_type_ids.min()), int(token_type_ids.max())
                if low < 0 or high >= self.token_types.num_embeddings:
                    raise InputError(f"token_type_ids: must lie in [0, {self.token_types.num_embeddings}), "
                                     f"got values from {low} to {high}")

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.tokens(input_ids)
        if self.scale is not None:
            hidden = hidden * torch.tensor(self.scale, dtype=hidden.dtype, device=hidden.device)
        if self.token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            hidden = hidden + self.token_types(token_type_ids)
        return hidden

    def add_registers(self, hidden: Tensor) -> Tensor:
        return hidden

    def num_tokens(self, input_ids: Tensor) -> int:
        """Length of the sequence this stem makes from ``input_ids``."""
        return input_ids.shape[1]


class _PrefixTokens(nn.Module):
    """Learned class, distillation and register tokens shared by the image and linear stems, in that order."""

    def __init__(self, width: int, class_token: bool, register_tokens: int, distill_token: bool = False):
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        self.distill_token = nn.Parameter(torch.zeros(1, 1, width)) if distill_token else None
        self.registers = nn.Parameter(torch.zeros(1, register_tokens, width)) if register_tokens else None
        self.num_prefix_tokens = int(class_token) + int(distill_token) + register_tokens

    def add_class_token(self, hidden: Tensor) -> Tensor:
        """The class and distillation tokens in front (before positions are added: they have positions)."""
        tokens = [token for token in (self.class_token, self.distill_token) if token is not None]
        if not tokens:
            # A feature map's [batch, tokens, width] view has its width as the slowest axis: one copy here gives
            # every later layer (norms, residual adds, modulations) rows they read contiguously (4.5% of a step
            # of `formerkit bench dit`); with tokens in front, the concatenation below makes that copy.
            return hidden.contiguous()
        front = torch.cat(tokens, dim=1).expand(hidden.shape[0], -1, -1).to(hidden.dtype)
        return torch.cat([front, hidden], dim=1)

    def add_registers(self, hidden: Tensor) -> Tensor:
        """Registers go right after the class token, after positions are added: they carry no position."""
        if self.registers is None:
            return hidden
        split = int(self.class_token is not None) + int(self.distill_token is not None)
        registers = self.registers.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
        return torch.cat([hidden[:, :split], registers, hidden[:, split:]], dim=1)


class _ImageStem(_PrefixTokens):
    def __init__(self, width: int, image_size: tuple[int, int], in_channels: int, class_token: bool,
                 register_tokens: int, distill_token: bool = False):
        super().__init__(width, class_token, register_tokens, distill_token)
        self.image_size = tuple(image_size)
        self.in_channels = in_channels
        self.grid_size: tuple[int, int] = (0, 0)  # set by each image stem

    def num_tokens(self, images: Tensor) -> int:
        return self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens

    def check(self, images: Tensor, name: str = "images") -> None:
        expected = [self.in_channels, *self.image_size]
        if not isinstance(images, Tensor):
            raise InputError(f"{name}: expected a tensor [batch, {', '.join(map(str, expected))}], "
                             f"got {type(images).__name__}")
        if images.dim() != 4 or list(images.shape[1:]) != expected:
            raise InputError(f"{name}: expected shape [batch, {', '.join(map(str, expected))}] "
                             f"(channels, height, width), got {list(images.shape)}")
        if not images.dtype.is_floating_point:
            raise InputError(f"{name}: expected a floating-point tensor, got dtype {images.dtype}")


class PatchEmbedding(_ImageStem):
    """ViT patch embedding (Dosovitskiy et al., 2021): non-overlapping patches, each linearly projected."""

    def __init__(self, width: int, image_size: tuple[int, int], patch_size: int, in_channels: int = 3,
                 class_token: bool = False, register_tokens: int = 0, distill_token: bool = False):
        super().__init__(width, image_size, in_channels, class_token, register_tokens, distill_token)
        self.projection = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.add_class_token(self.projection(images).flatten(2).transpose(1, 2))


class ConvTokenizer(_ImageStem):
    """CCT's convolutional tokenizer (Hassani et al., 2021): [conv 'same' -> ReLU -> max-pool] x conv_layers, then
    every pixel of the last feature map is a token. Intermediate layers have ``conv_channels`` channels."""

    def __init__(self, width: int, image_size: tuple[int, int], in_channels: int = 3, *, conv_layers: int = 1,
                 conv_kernel: int = 3, conv_channels: int = 64, conv_bias: bool = False, pool_kernel: int = 3,
                 pool_stride: int = 2, class_token: bool = False, register_tokens: int = 0,
                 distill_token: bool = False, grid_size: tuple[int, int]):
        super().__init__(width, image_size, in_channels, class_token, register_tokens, distill_token)
        channels = [in_channels] + [conv_channels] * (conv_layers - 1) + [width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, conv_kernel, stride=1, padding=conv_kernel // 2, bias=conv_bias),
                       nn.ReLU()]
            if pool_kernel:
                layers.append(nn.MaxPool2d(pool_kernel, stride=pool_stride, padding=pool_kernel // 2))
        self.layers = nn.Sequential(*layers)
        self.grid_size = grid_size  # the feature map's size: StemConfig.grid_size computes it

    def forward(self, images: Tensor) -> Tensor:
        return self.add_class_token(self.layers(images).flatten(2).transpose(1, 2))


class LinearStem(_PrefixTokens):
    """Numeric sequences [batch, steps, input_dim] -> vectors by one linear map. With ``patch_size`` p, each run of p
    consecutive steps becomes one token (time-series patches, Nie et al., 2023, "PatchTST")."""

    def __init__(self, width: int, input_dim: int, max_seq_len: int, patch_size: int | None = None,
                 class_token: bool = False):
        super().__init__(width, class_token, 0)
        self.input_dim = input_dim
        self.max_seq_len = max_seq_len
        self.patch_size = patch_size or 1
        self.projection = nn.Linear(input_dim * self.patch_size, width)

    def check(self, inputs: Tensor, name: str = "inputs") -> None:
        if not isinstance(inputs, Tensor):
            raise InputError(f"{name}: expected a tensor [batch, steps, {self.input_dim}], got {type(inputs).__name__}")
        if inputs.dim() != 3 or inputs.shape[-1] != self.input_dim:
            raise InputError(f"{name}: expected shape [batch, steps, {self.input_dim}] (input_dim), "
                             f"got {list(inputs.shape)}")
        if not inputs.dtype.is_floating_point:
            raise InputError(f"{name}: expected a floating-point tensor, got dtype {inputs.dtype}")
        steps = inputs.shape[1]
        if steps == 0 or steps > self.max_seq_len:
            raise InputError(f"{name}: expected 1 to {self.max_seq_len} steps (max_seq_len), got {steps}")
        if steps % self.patch_size:
            raise InputError(f"{name}: {steps} steps is not a multiple of stem.patch_size ({self.patch_size})")

    def num_tokens(self, inputs: Tensor) -> int:
        return inputs.shape[1] // self.patch_size + self.num_prefix_tokens

    def forward(self, inputs: Tensor) -> Tensor:
        batch, steps, features = inputs.shape
        patches = inputs.reshape(batch, steps // self.patch_size, self.patch_size * features)
        return self.add_class_token(self.projection(patches))


def build_stem(config) -> nn.Module:
    stem = config.stem
    if stem.kind == "tokens":
        return TokenEmbedding(stem.vocab_size, config.width, config.max_seq_len, stem.num_token_types,
                              stem.scale_embeddings)
    if stem.kind == "patches":
        return PatchEmbedding(config.width, stem.image_size, stem.patch_size, stem.in_channels, stem.class_token,
                              stem.register_tokens, stem.distill_token)
    if stem.kind == "conv":
        return ConvTokenizer(config.width, stem.image_size, stem.in_channels, conv_layers=stem.conv_layers,
                             conv_kernel=stem.conv_kernel, conv_channels=stem.conv_channels,
                             conv_bias=stem.conv_bias, pool_kernel=stem.pool_kernel, pool_stride=stem.pool_stride,
                             class_token=stem.class_token, register_tokens=stem.register_tokens,
                             distill_token=stem.distill_token, grid_size=stem.grid_size)
    return LinearStem(config.width, stem.input_dim, config.max_seq_len, stem.patch_size, stem.class_token)
