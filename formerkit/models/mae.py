"""Masked-autoencoder pretraining (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners").

A formerkit image encoder (``arch='encoder'``, ``stem.kind='patches'``) reads only a random subset of its patches; a
small decoder fills in a learned mask token for every hidden patch and predicts the pixels of all patches; the loss is
the squared error on the hidden patches only. After pretraining, ``finetune_model`` turns the encoder into a classifier.

    encoder = formerkit.create_model("vit_tiny_patch16_224")
    mae = MaskedAutoencoder(encoder)
    out = mae(images)                       # MAEOutput(loss, pred, mask, ids_restore)
    out.loss.backward()
    classifier = finetune_model(mae, num_classes=10)

Patches are laid out as in MAE's reference code and as the stem's Conv2d reads them: row-major over the patch grid
(patch ``i * columns + j`` is grid row ``i``, column ``j``), each patch flattened in (row, column, channel) order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from formerkit.config import AttentionConfig, HeadConfig, ModelConfig, NormConfig, PositionConfig, StemConfig
from formerkit.errors import ConfigError, InputError
from formerkit.models.transformer import Transformer, TransformerStack
from formerkit.nn.context import StackInput
from formerkit.nn.masks import PreparedMask
from formerkit.nn.positions import SinCos2DPositions

__all__ = ["ABSOLUTE_POSITIONS", "MAEOutput", "MaskedAutoencoder", "finetune_model", "gather_tokens", "patchify",
           "random_patch_mask", "unpatchify", "visible_count"]

# Added to each patch's variance before the square root when targets are normalized (MAE's value).
NORM_PIX_EPS = 1e-6
# Position schemes that add a table to the input, so a patch keeps its position when the others are dropped.
ABSOLUTE_POSITIONS = ("learned", "sinusoidal", "sincos2d", "none")


@dataclass
class MAEOutput:
    """What a forward pass of ``MaskedAutoencoder`` returns."""

    # Mean squared error over the masked patches (a scalar).
    loss: Tensor
    # Predicted pixels of every patch [batch, patches, patch_size**2 * channels], in patchify's layout.
    pred: Tensor
    # [batch, patches]: 1 for a masked (hidden) patch, 0 for a visible one.
    mask: Tensor
    # [batch, patches]: where each patch landed in the shuffled order; gathering the shuffled sequence with it
    # restores the original patch order.
    ids_restore: Tensor


# ----- patches as pixels -----


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[batch, channels, height, width] -> [batch, patches, patch_size**2 * channels], in the module's patch layout."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    # (row, column) of the grid first, then (row, column, channel) inside the patch.
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> Tensor:
    """The exact inverse of ``patchify``: [batch, patches, patch_size**2 * channels] -> images."""
    rows, cols = grid_size
    batch = patches.shape[0]
    images = patches.reshape(batch, rows, cols, patch_size, patch_size, channels)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, rows * patch_size, cols * patch_size)


# ----- random masking -----


def random_patch_mask(batch: int, num_patches: int, num_visible: int, *, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking: each sample's patches are shuffled by sorting uniform noise, and the first
    ``num_visible`` of the shuffled order stay visible.

    Returns ``ids_keep`` [batch, num_visible] (the visible patches, in shuffled order), ``mask`` [batch, num_patches]
    (1 = masked) and ``ids_restore`` [batch, num_patches] (the inverse permutation of the shuffle).
    """
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :num_visible]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_visible] = 0
    return ids_keep, mask.gather(1, ids_restore), ids_restore


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """tokens[b, ids[b, k]] for every sample b: [batch, tokens, width] -> [batch, len(ids[b]), width]."""
    return tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def visible_count(num_patches: int, mask_ratio: float) -> int:
    # MAE's rule, len_keep = int(N * (1 - mask_ratio)): the visible count rounds down, so the masked count rounds up.
    # The tolerance keeps float error from dropping a whole patch (10 * (1 - 0.9) is 0.99999..., not 1).
    return math.floor(num_patches * (1.0 - mask_ratio) + 1e-9)


# ----- the model -----


def _check_encoder(encoder: Transformer) -> ModelConfig:
    if not isinstance(encoder, Transformer):
        raise InputError(f"encoder: expected a formerkit.Transformer, got {type(encoder).__name__}")
    config = encoder.config
    if config.arch != "encoder":
        raise ConfigError("arch", config.arch, "'encoder' for a masked autoencoder",
                          hint="the encoder must read its visible patches in both directions")
    if config.stem.kind != "patches":
        raise ConfigError("stem.kind", config.stem.kind, "'patches' for a masked autoencoder",
                          hint="MAE masks whole non-overlapping patches")
    if config.position.kind not in ABSOLUTE_POSITIONS:
        raise ConfigError("position.kind", config.position.kind,
                          "one of " + ", ".join(repr(kind) for kind in ABSOLUTE_POSITIONS),
                          hint="positions are added to the patches before masking, so they must be an added table")
    if config.attention.sliding_window is not None:
        raise ConfigError("attention.sliding_window", config.attention.sliding_window, "null for a masked autoencoder",
                          hint="a window over the shuffled visible patches has no meaning")
    if config.feedforward.mixture:
        raise ConfigError("feedforward.num_experts", config.feedforward.num_experts,
                          "null or 0 (a dense feed-forward) for a masked autoencoder",
                          hint="the reconstruction loss does not include a mixture's load-balancing loss")
    return config


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "an integer >= 1")


class MaskedAutoencoder(nn.Module):
    """A formerkit image encoder trained to reconstruct the patches it was not shown (MAE).

    ``encoder`` is an ordinary ``Transformer`` (arch 'encoder', stem 'patches', added position table); its stem,
    positions and block stack are used as they are, its head is not used while pretraining. The decoder is a
    ``TransformerStack`` built from ``decoder_config``: pre-norm LayerNorm blocks of ``decoder_width``, with fixed 2-D
    sine-cosine positions.

    Of the N patches of an image, ``num_visible = int(N * (1 - mask_ratio))`` are shown to the encoder (MAE's rule,
    so the masked count ``num_masked`` rounds up). With ``norm_pix_loss`` each target patch is normalized by its own
    mean and (unbiased) variance, MAE's default.
    """

    def __init__(self, encoder: Transformer, *, decoder_width: int = 128, decoder_layers: int = 2,
                 decoder_heads: int = 4, mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        config = _check_encoder(encoder)
        stem = config.stem
        for name, value in (("decoder_width", decoder_width), ("decoder_layers", decoder_layers),
                            ("decoder_heads", decoder_heads)):
            _check_count(name, value)
        if decoder_width % decoder_heads:
            raise ConfigError("decoder_heads", decoder_heads, f"a divisor of decoder_width ({decoder_width})")
        if decoder_width % 4:
            raise ConfigError("decoder_width", decoder_width, "a multiple of 4",
                              hint="the decoder's 2-D sine-cosine positions use a sine and a cosine per axis")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
            raise ConfigError("mask_ratio", mask_ratio, "a number strictly between 0 and 1")
        if not isinstance(norm_pix_loss, bool):
            raise ConfigError("norm_pix_loss", norm_pix_loss, "true or false")
        rows, cols = stem.grid_size
        num_patches = rows * cols
        num_visible = visible_count(num_patches, mask_ratio)
        if not 1 <= num_visible < num_patches:
            raise ConfigError("mask_ratio", mask_ratio,
                              f"a ratio that leaves at least one visible and one masked patch of {num_patches}",
                              hint=f"it keeps int({num_patches} * (1 - mask_ratio)) = {num_visible} visible")
        patch_dim = stem.patch_size ** 2 * stem.in_channels
        if norm_pix_loss and patch_dim < 2:
            raise ConfigError("norm_pix_loss", norm_pix_loss, "false when a patch holds a single value",
                              hint="a one-value patch has no variance to normalize by")

        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = stem.patch_size
        self.in_channels = stem.in_channels
        self.grid_size = (rows, cols)
        self.num_patches = num_patches
        self.num_visible = num_visible
        self.num_masked = num_patches - num_visible
        self.num_prefix_tokens = stem.num_prefix_tokens

        self.decoder_config = ModelConfig(
            arch="encoder", width=decoder_width, num_layers=decoder_layers, max_seq_len=None,
            init_std=config.init_std,
            attention=AttentionConfig(num_heads=decoder_heads),
            norm=NormConfig(kind="layernorm", placement="pre", eps=config.norm.eps),
            position=PositionConfig(kind="sincos2d"),
            stem=StemConfig(kind="patches", image_size=stem.image_size, patch_size=stem.patch_size,
                            in_channels=stem.in_channels, class_token=stem.class_token,
                            register_tokens=stem.register_tokens),
            head=HeadConfig(kind="none"),
        )
        self.decoder_embed = nn.Linear(config.width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        # The class token and registers pass through the decoder with a zero position row, as MAE's class token does.
        self.decoder_positions = SinCos2DPositions(self.grid_size, decoder_width, self.num_prefix_tokens)
        self.decoder = TransformerStack(self.decoder_config, decoder_layers)
        self.decoder_prediction = nn.Linear(decoder_width, patch_dim)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's reference initialization for the new parts: xavier-uniform linear weights, zero biases, a small
        normal mask token. The encoder keeps the weights it came with."""
        for module in (self.decoder_embed, self.decoder, self.decoder_prediction):
            for part in module.modules():
                if isinstance(part, nn.Linear):
                    nn.init.xavier_uniform_(part.weight)
                    if part.bias is not None:
                        nn.init.zeros_(part.bias)
        nn.init.normal_(self.mask_token, std=self.decoder_config.init_std)

    # ----- pixels -----

    def patchify(self, images: Tensor) -> Tensor:
        """[batch, channels, height, width] -> [batch, patches, patch_size**2 * channels]."""
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """[batch, patches, patch_size**2 * channels] -> [batch, channels, height, width]; inverse of patchify."""
        return unpatchify(patches, self.patch_size, self.grid_size, self.in_channels)

    # ----- the three stages -----

    def encode(self, images: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Embeds every patch with the encoder's own stem and positions, keeps a random ``num_visible`` of them per
        sample, and runs the encoder's block stack on the prefix tokens and those patches only.

        Returns the latent [batch, prefix + num_visible, width] (visible patches in shuffled order), the mask and
        ids_restore (see ``random_patch_mask``).
        """
        self.encoder.stem.check(images, "images")
        # The encoder's own embedding (stem, positions, class token and registers, embedding norm, dropout) acts on
        # each token alone, so embedding every patch and then dropping the masked ones equals embedding the visible
        # ones only; MAE's reference code also embeds the whole image before masking.
        tokens, _ = self.encoder.embed(images)
        prefix, patches = tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
        ids_keep, mask, ids_restore = random_patch_mask(images.shape[0], self.num_patches, self.num_visible,
                                                        generator=generator, device=images.device)
        visible = torch.cat([prefix, gather_tokens(patches, ids_keep)], dim=1)
        # Every visible token sees every other one: no mask. The stack ends with the encoder's final norm.
        stack = self.encoder.encoder
        layers = self.encoder.layer_contexts(stack, visible)
        return stack(StackInput(visible, layers)).hidden, mask, ids_restore

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Fills in a mask token for every masked patch, restores the patch order, adds fixed 2-D positions and
        predicts the pixels of every patch: [batch, patches, patch_size**2 * channels]."""
        hidden = self.decoder_embed(latent)
        prefix, visible = hidden[:, :self.num_prefix_tokens], hidden[:, self.num_prefix_tokens:]
        mask_tokens = self.mask_token.expand(hidden.shape[0], self.num_masked, -1).to(hidden.dtype)
        # In shuffled order the visible patches come first and the masked ones after; ids_restore undoes the shuffle.
        patches = gather_tokens(torch.cat([visible, mask_tokens], dim=1), ids_restore)
        hidden = self.decoder_positions.encode_input(torch.cat([prefix, patches], dim=1), None)
        # The decoder's own stack (plain softmax attention, see __init__): no mask, no positions inside attention.
        hidden = self.decoder(StackInput(hidden, self.decoder.contexts({"full": PreparedMask()}))).hidden
        return self.decoder_prediction(hidden[:, self.num_prefix_tokens:])

    def targets(self, images: Tensor) -> Tensor:
        """The pixels each patch should be reconstructed to; normalized per patch with ``norm_pix_loss``."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            variance = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (variance + NORM_PIX_EPS).sqrt()
        return target

    def reconstruction_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over the masked patches only (visible ones are not scored)."""
        per_patch = (pred - self.targets(images)).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: Tensor, *, generator: torch.Generator | None = None) -> MAEOutput:
        """images [batch, channels, height, width]; ``generator`` seeds the random masks."""
        latent, mask, ids_restore = self.encode(images, generator=generator)
        pred = self.decode(latent, ids_restore)
        return MAEOutput(loss=self.reconstruction_loss(images, pred, mask), pred=pred, mask=mask,
                         ids_restore=ids_restore)

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, visible={self.num_visible}/{self.num_patches}, "
                f"norm_pix_loss={self.norm_pix_loss}")


# ----- fine-tuning -----


def finetune_model(mae: MaskedAutoencoder, num_classes: int, pooling: str = "mean") -> Transformer:
    """A classifier that starts from the pretrained encoder: the encoder's config with a classification head
    (``num_classes``; ``pooling`` 'mean', 'cls' or 'sequence'), every stem, position and block-stack weight copied from
    ``mae.encoder``; only the head is new. MAE fine-tunes with global average pooling, hence the default."""
    if not isinstance(mae, MaskedAutoencoder):
        raise InputError(f"mae: expected a formerkit MaskedAutoencoder, got {type(mae).__name__}")
    config = mae.encoder.config.replace(head=HeadConfig(kind="classification", num_classes=num_classes,
                                                        pooling=pooling))
    reference = next(mae.encoder.parameters())
    model = Transformer(config).to(device=reference.device, dtype=reference.dtype)
    # The pretraining encoder's head (if any) is not the new head: leave it behind, take everything else.
    pretrained = {key: value for key, value in mae.encoder.state_dict().items() if not key.startswith("head.")}
    missing, unexpected = model.load_state_dict(pretrained, strict=False)
    untransferred = [key for key in missing if not key.startswith("head.")]
    if untransferred or unexpected:
        raise RuntimeError(f"finetune_model: encoder weights did not transfer: missing {untransferred}, "
                           f"unexpected {list(unexpected)}")
    return model
