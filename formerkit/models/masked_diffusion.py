"""Cheaper diffusion training by patch masking (the masked diffusion Transformer line: MDT, Gao et al., 2023,
"Masked Diffusion Transformer is a Strong Image Synthesizer"; MaskDiT, Zheng et al., 2024, "Fast Training of
Diffusion Models with Masked Transformers").

While training, a large random fraction of each noisy image's patch tokens is dropped after the embedding (stem and
positions), so the first blocks -- the encoder -- see only the visible ones; before the last ``decoder_layers`` blocks
-- the light side decoder -- every dropped patch comes back as a learned mask token plus its position, and those
blocks, the final norm and the patch head predict the whole output. The loss is scored on the visible patches only
(MaskDiT's denoising loss; its optional MAE term on the masked patches is not added). Most blocks then run on a
fraction of the tokens: training steps are cheaper, and the model learns to denoise from partial views.

Sampling uses no mask: the wrapped model is the ordinary conditioned Transformer, all blocks on all tokens, and the
mask token is a training-only parameter (what a run saves is the model without it, ``unwrap``). So with every patch
kept, the masked path is exactly the plain one.

    masked = PatchMaskedDiffusion(model, mask_ratio=0.5, decoder_layers=2)
    ids_keep = masked.draw_visible(batch, generator)           # [batch, visible] patch indices
    out = masked(noisy, timesteps=t, labels=y, ids_keep=ids_keep)   # [batch, C, H, W], like model(...)
    kept = masked.kept_pixels(ids_keep)                          # [batch, 1, H, W]: 1 on visible patches
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from formerkit.errors import ConfigError, InputError
from formerkit.models.mae import ABSOLUTE_POSITIONS, gather_tokens, random_patch_mask, visible_count
from formerkit.models.transformer import Transformer

__all__ = ["PatchMaskedDiffusion"]


class PatchMaskedDiffusion(nn.Module):
    """A conditioned patch model (``condition.kind``, ``stem.kind: patches``, ``head.kind: patches``) trained with
    patch masking (see the module docstring). ``mask_ratio`` in [0, 1): the fraction of patches dropped, rounded as
    MAE's rule (``int(N * (1 - ratio))`` kept); ``decoder_layers`` (>= 1, fewer than the model's layers): how many of
    the last blocks form the side decoder."""

    def __init__(self, model: Transformer, *, mask_ratio: float = 0.5, decoder_layers: int = 2):
        super().__init__()
        if not isinstance(model, Transformer):
            raise InputError(f"model: expected a formerkit.Transformer, got {type(model).__name__}")
        config = model.config
        if config.condition.kind is None or config.stem.kind != "patches" or config.head.kind != "patches":
            raise ConfigError("objective.patch_mask_ratio", mask_ratio,
                              "0 unless the model is a conditioned patch model (condition.kind set, stem.kind and "
                              "head.kind 'patches')")
        if config.arch != "encoder" or config.position.kind not in ABSOLUTE_POSITIONS:
            raise ConfigError("position.kind", config.position.kind,
                              "an added table (" + ", ".join(ABSOLUTE_POSITIONS) + ") in an encoder",
                              hint="a dropped patch returns as a mask token plus its position")
        if config.attention.sliding_window is not None or config.feedforward.mixture:
            raise ConfigError("objective.patch_mask_ratio", mask_ratio,
                              "0 for models with a sliding window or mixture-of-experts layers")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
            raise ConfigError("objective.patch_mask_ratio", mask_ratio, "a fraction in [0, 1)")
        layers = config.num_layers
        if isinstance(decoder_layers, bool) or not isinstance(decoder_layers, int) or not 1 <= decoder_layers < layers:
            raise ConfigError("objective.decoder_layers", decoder_layers,
                              f"an integer from 1 to {layers - 1} (the side decoder is the last blocks of the "
                              f"model's {layers})")
        rows, columns = config.stem.grid_size
        self.model = model
        self.mask_ratio = float(mask_ratio)
        self.decoder_layers = decoder_layers
        self.num_patches = rows * columns
        self.num_visible = visible_count(self.num_patches, self.mask_ratio)
        if self.num_visible < 1:
            raise ConfigError("objective.patch_mask_ratio", mask_ratio, f"a ratio that keeps a patch of "
                              f"{self.num_patches}")
        self.num_prefix = config.stem.num_prefix_tokens
        self.patch_size = config.stem.patch_size
        self.grid = (rows, columns)
        # MAE's and MaskDiT's mask token: one learned vector, small normal init.
        self.mask_token = nn.Parameter(torch.randn(1, 1, config.width) * config.init_std)

    def draw_visible(self, batch: int, generator=None, device=None) -> Tensor:
        """Random visible patches per image [batch, num_visible] (patch indices, row-major over the grid)."""
        ids_keep, _, _ = random_patch_mask(batch, self.num_patches, self.num_visible, generator=generator,
                                           device=device)
        return ids_keep

    def kept_pixels(self, ids_keep: Tensor) -> Tensor:
        """[batch, 1, H, W]: 1 on the pixels of the patches in ``ids_keep``, 0 elsewhere."""
        kept = ids_keep.new_zeros(ids_keep.shape[0], self.num_patches, dtype=self.mask_token.dtype)
        kept.scatter_(1, ids_keep, 1.0)
        grid = kept.view(-1, 1, *self.grid)
        return grid.repeat_interleave(self.patch_size, dim=2).repeat_interleave(self.patch_size, dim=3)

    def forward(self, inputs: Tensor, *, timesteps: Tensor | None = None, labels: Tensor | None = None,
                condition: Tensor | None = None, ids_keep: Tensor | None = None) -> Tensor:
        """The model's output [batch, C, H, W] for ``inputs`` when only the patches ``ids_keep`` [batch, visible]
        enter the encoder blocks; without ``ids_keep``, the plain model's forward."""
        model = self.model
        if ids_keep is None:
            return model(inputs, timesteps=timesteps, labels=labels, condition=condition)
        batch = inputs.shape[0]
        if ids_keep.dim() != 2 or ids_keep.shape[0] != batch or ids_keep.shape[1] > self.num_patches:
            raise InputError(f"ids_keep: expected [batch {batch}, at most {self.num_patches}] patch indices, got "
                             f"{list(ids_keep.shape)}")
        model.stem.check(inputs, "inputs")
        cond = model.condition_vector(inputs, timesteps=timesteps, labels=labels, condition=condition)
        tokens, _ = model.embed(inputs)
        prefix = tokens[:, :self.num_prefix]
        hidden = _cat(prefix, gather_tokens(tokens[:, self.num_prefix:], ids_keep))
        stack = model.get_stack()
        split = stack.num_layers - self.decoder_layers
        contexts = model.layer_contexts(stack, hidden, condition=cond)
        for index in range(split):
            hidden, _ = stack.block_at(index)(hidden, contexts[index])
        # Every patch back in its place: the encoded visible ones, and the mask token plus position for the others.
        filler = model.positions.encode_input(self.mask_token.to(hidden.dtype).expand(batch, tokens.shape[1], -1),
                                              None)[:, self.num_prefix:]
        patches = filler.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]),
                                 hidden[:, self.num_prefix:])
        hidden = _cat(hidden[:, :self.num_prefix], patches)
        contexts = model.layer_contexts(stack, hidden, condition=cond)
        for index in range(split, stack.num_layers):
            hidden, _ = stack.block_at(index)(hidden, contexts[index])
        return model.head(stack.finish(hidden, cond))

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, visible={self.num_visible}/{self.num_patches}, "
                f"decoder_layers={self.decoder_layers}")


def _cat(prefix: Tensor, rest: Tensor) -> Tensor:
    return rest if prefix.shape[1] == 0 else torch.cat([prefix, rest], dim=1)
