"""``ModelConfig``: the whole model, its sections and the checks that span them (see ``formerkit.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from formerkit.config.sections import (
    ARCHS,
    AttentionConfig,
    ConditionConfig,
    FeedForwardConfig,
    HeadConfig,
    ModelSection,
    NormConfig,
    PositionConfig,
    StemConfig,
)
from formerkit.errors import ConfigError
from formerkit.schema import choice

__all__ = ["ModelConfig"]

@dataclass(frozen=True)
class ModelConfig(ModelSection):
    """The whole model. ``formerkit.build_model(config)`` turns it into a ``torch.nn.Module``."""

    # encoder: bidirectional; decoder: causal; encoder_decoder: a bidirectional encoder read by a causal decoder
    # through cross-attention.
    arch: str = choice("decoder", ARCHS)
    width: int = 512
    num_layers: int = 6
    # encoder_decoder only: decoder depth (default num_layers).
    num_decoder_layers: int | None = None
    # Weight sharing across depth: this many distinct blocks, cycled over num_layers (1 = one block applied
    # num_layers times, as in ALBERT and looped Transformers). null means every layer has its own weights.
    num_unique_layers: int | None = None
    # The longest token sequence (tokens and linear stems); image stems derive their length from the image.
    max_seq_len: int | None = 1024
    # Dropout on embeddings and on each residual branch.
    dropout: float = 0.0
    # Stochastic depth (Huang et al., 2016): the drop rate of the last layer, rising linearly from 0 at the first.
    drop_path: float = 0.0
    # LayerScale (Touvron et al., 2021, "CaiT"): a learned per-channel scale on each residual branch, initialized here.
    layer_scale: float | None = None
    init_std: float = 0.02
    # Attention and feed-forward both read the block's input and add to the stream, x + attn(norm(x)) + ff(norm'(x)),
    # instead of one after the other (Wang and Komatsuzaki, GPT-J; GPT-NeoX; PaLM): separate_norms gives each branch
    # its own norm (GPT-NeoX), shared_norm feeds both from one (GPT-J, Phi-2, Falcon). null: sequential.
    parallel_residual: str | None = choice(None, (None, "separate_norms", "shared_norm"))
    # encoder_decoder: the token the decoder's target begins with (T5: its pad token; BART: its end token), which
    # generate starts from unless given another. null: generate needs one.
    decoder_start_token_id: int | None = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    feedforward: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    stem: StemConfig = field(default_factory=lambda: StemConfig(vocab_size=256))
    head: HeadConfig = field(default_factory=HeadConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)

    def _validate(self) -> None:
        attention, stem, head = self.attention, self.stem, self.head
        if self.width < 1:
            self._fail("width", "an integer >= 1")
        if self.num_layers < 1:
            self._fail("num_layers", "an integer >= 1")
        if self.num_decoder_layers is not None:
            if self.arch != "encoder_decoder":
                self._fail("num_decoder_layers", "null unless arch is 'encoder_decoder'")
            if self.num_decoder_layers < 1:
                self._fail("num_decoder_layers", "an integer >= 1")
        if self.num_unique_layers is not None:
            depths = {self.num_layers, self.decoder_layers}
            if self.num_unique_layers < 1 or any(d % self.num_unique_layers for d in depths):
                self._fail("num_unique_layers", f"a divisor of the depth ({' and '.join(map(str, sorted(depths)))})")
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self._fail(name, "a probability in [0, 1)")
        if self.layer_scale is not None and self.layer_scale <= 0:
            self._fail("layer_scale", "a number > 0 or null")
        if self.init_std <= 0:
            self._fail("init_std", "a number > 0")
        if attention.head_dim is None and self.width % attention.num_heads:
            raise ConfigError("attention.num_heads", attention.num_heads, f"a divisor of width ({self.width})",
                              hint="or set attention.head_dim explicitly")
        if self.position.kind == "rope" and self.head_dim % 2:
            raise ConfigError("attention.head_dim", self.head_dim, "an even head width for rope positions")
        if attention.sliding_window_layers is not None:
            for index in attention.sliding_window_layers:
                if not 0 <= index < max(self.num_layers, self.decoder_layers):
                    raise ConfigError("attention.sliding_window_layers", attention.sliding_window_layers,
                                      f"layer indices in [0, {max(self.num_layers, self.decoder_layers)})")
        if attention.kind_layers is not None:
            for index in attention.kind_layers:
                if not 0 <= index < max(self.num_layers, self.decoder_layers):
                    raise ConfigError("attention.kind_layers", attention.kind_layers,
                                      f"layer indices in [0, {max(self.num_layers, self.decoder_layers)})")
        position = self.position
        if position.kind == "rope" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise ConfigError("position.rotary_fraction", position.rotary_fraction,
                              f"a fraction of head_dim ({self.head_dim}) that rotates an even number >= 2 of "
                              f"channels (int(head_dim * rotary_fraction) is {self.rotary_dim})")
        if position.rope_scaling == "dynamic" and self.rotary_dim < 4:
            raise ConfigError("position.rope_scaling", position.rope_scaling, "a scheme other than 'dynamic' when "
                              f"only {self.rotary_dim} channels rotate", hint="dynamic's base grows by a power "
                              "r / (r - 2) of the rotated channels r")
        if position.rope_scaling == "longrope":
            for name in ("rope_short_factors", "rope_long_factors"):
                if len(getattr(position, name)) != self.rotary_dim // 2:
                    raise ConfigError(f"position.{name}", getattr(position, name),
                                      f"{self.rotary_dim // 2} factors, one per rotated channel pair")
        if position.rope_local_base is not None and attention.sliding_window is None:
            raise ConfigError("position.rope_local_base", position.rope_local_base,
                              "null unless attention.sliding_window is set", hint="it is the base of the window layers")
        if self.parallel_residual is not None:
            if self.norm.placement != "pre":
                raise ConfigError("parallel_residual", self.parallel_residual, "null unless norm.placement is 'pre'",
                                  hint="parallel branches both read the normed input of the block")
            if self.arch == "encoder_decoder":
                raise ConfigError("parallel_residual", self.parallel_residual, "null for arch 'encoder_decoder'",
                                  hint="a decoder block with cross-attention has three branches in sequence")
        if position.separate_decoder and self.arch != "encoder_decoder":
            raise ConfigError("position.separate_decoder", True, "false unless arch is 'encoder_decoder'",
                              hint="only an encoder_decoder has a second stack to give positions of its own")
        if position.kind == "relative" and self.arch == "encoder_decoder" and not position.separate_decoder:
            raise ConfigError("position.separate_decoder", False, "true for relative positions in an "
                              "encoder_decoder", hint="the encoder's buckets look both ways, the decoder's back only, "
                              "so each stack has its own table (as in T5)")
        if stem.separate_decoder_norm and self.arch != "encoder_decoder":
            raise ConfigError("stem.separate_decoder_norm", True, "false unless arch is 'encoder_decoder'")
        if self.decoder_start_token_id is not None:
            if self.arch != "encoder_decoder":
                self._fail("decoder_start_token_id", "null unless arch is 'encoder_decoder'")
            vocab = stem.vocab_size or 0
            if not 0 <= self.decoder_start_token_id < vocab:
                self._fail("decoder_start_token_id", f"a token id in [0, {vocab}) (stem.vocab_size)")
        if attention.kind == "linear" and position.kind == "relative":
            raise ConfigError("position.kind", "relative", "a position scheme without score biases with linear "
                              "attention", hint="linear attention never forms the scores a relative bias adds to")
        if attention.kind == "linear" and self.position.kind == "alibi":
            raise ConfigError("position.kind", "alibi", "a position scheme without score biases with linear attention",
                              hint="linear attention never forms the scores ALiBi adds to; use rope or learned")
        if attention.gaussian_mixture and stem.kind not in ("patches", "conv"):
            raise ConfigError("attention.gaussian_mixture", attention.gaussian_mixture,
                              "0 unless the stem makes a 2-D grid of image tokens (patches or conv)",
                              hint=f"stem.kind is {stem.kind!r}")
        if attention.gaussian_mixture and attention.kind == "linear" and attention.kind_layers is None:
            raise ConfigError("attention.gaussian_mixture", attention.gaussian_mixture,
                              "0 when every layer uses linear attention (it scales scores that linear attention "
                              "never forms)")
        if attention.soft_causal_steps is not None and (self.arch != "decoder" or self.head.kind == "lm"):
            raise ConfigError("attention.soft_causal_steps", attention.soft_causal_steps,
                              "null unless the model is a decoder with a head other than 'lm'",
                              hint="it fades in a decoder's causal mask (iLLaMA's image classifiers); a language "
                                   "model that saw later tokens would learn to copy its targets")
        if self.feedforward.moe_layers is not None:
            # A shared block is a mixture at every depth it is applied, so with sharing the indices name shared blocks.
            blocks = self.num_unique_layers or max(self.num_layers, self.decoder_layers)
            what = "indices of the num_unique_layers shared blocks" if self.num_unique_layers else "layer indices"
            for index in self.feedforward.moe_layers:
                if not 0 <= index < blocks:
                    raise ConfigError("feedforward.moe_layers", self.feedforward.moe_layers, f"{what} in [0, {blocks})")
        for name, values in (("attention.layer_heads", attention.layer_heads),
                             ("feedforward.layer_hidden_sizes", self.feedforward.layer_hidden_sizes)):
            if values is not None:
                self._check_per_layer(name, values)
        # Stems and sequence lengths.
        if stem.kind in ("tokens", "linear"):
            if self.max_seq_len is None or self.max_seq_len < 1:
                self._fail("max_seq_len", f"an integer >= 1 for a {stem.kind} stem")
        if self.position.kind == "sincos2d" and self.width % 4:
            raise ConfigError("width", self.width, "a multiple of 4 for sincos2d positions (sin and cos per axis)")
        if stem.register_tokens and self.position.kind in ("rope", "alibi", "relative"):
            raise ConfigError("stem.register_tokens", stem.register_tokens, "0 with rope, alibi or relative positions",
                              hint="register tokens carry no position; use learned, sinusoidal, sincos2d or none")
        if self.arch == "encoder_decoder" and stem.kind != "tokens":
            raise ConfigError("stem.kind", stem.kind, "'tokens' for arch 'encoder_decoder'")
        if self.position.kind == "sincos2d" and stem.kind not in ("patches", "conv"):
            raise ConfigError("position.kind", "sincos2d", "an image stem (patches or conv) for a 2-D position table",
                              hint=f"stem.kind is {stem.kind!r}")
        if self.condition.kind is not None:
            self._check_condition()
        # Heads.
        if head.kind == "patches" and stem.kind != "patches":
            raise ConfigError("head.kind", "patches", "a patches stem (the head maps each patch token back to its "
                              "pixels)", hint=f"stem.kind is {stem.kind!r}")
        if head.kind == "lm" and (stem.kind != "tokens" or self.arch == "encoder"):
            raise ConfigError("head.kind", "lm", "a tokens stem with arch 'decoder' or 'encoder_decoder'",
                              hint="an encoder over tokens predicts masked tokens: use head.kind 'masked_lm'")
        if head.kind == "masked_lm" and (stem.kind != "tokens" or self.arch != "encoder"):
            raise ConfigError("head.kind", "masked_lm", "a tokens stem with arch 'encoder'")
        if stem.distill_token and head.kind not in ("classification", "none"):
            raise ConfigError("stem.distill_token", True, "false unless head.kind is 'classification' or 'none'",
                              hint="the distillation token feeds a second classification head (or, with no head, "
                                   "is part of the hidden states, as in DeiTModel)")
        if not head.distill_head and not (stem.distill_token and head.kind == "classification"):
            raise ConfigError("head.distill_head", False, "true unless stem.distill_token is true and head.kind is "
                              "'classification'", hint="it turns off the head that reads the distillation token")
        if head.tie_embeddings and stem.kind != "tokens":
            raise ConfigError("head.tie_embeddings", True, "a tokens stem, whose embedding the head can share")
        if self.head_pooling == "cls" and stem.kind != "tokens" and not stem.class_token:
            raise ConfigError("head.pooling", "cls", "a stem with stem.class_token true (or a tokens stem)")
        if self.head_pooling == "last" and self.arch == "encoder":
            raise ConfigError("head.pooling", "last", "cls, mean or sequence for an encoder",
                              hint="'last' pools the last token, which sees the whole input only in a decoder")

    def _check_condition(self) -> None:
        """adaLN-Zero modulates the normed input of each sub-layer and gates its output: pre-norm blocks, one branch
        after the other, no cross-attention sub-layer."""
        kind = self.condition.kind
        if self.norm.placement != "pre":
            raise ConfigError("norm.placement", self.norm.placement, f"'pre' with condition.kind {kind!r}",
                              hint="adaLN-Zero modulates the normed input of each branch")
        if self.parallel_residual is not None:
            raise ConfigError("parallel_residual", self.parallel_residual, f"null with condition.kind {kind!r}")
        if self.arch == "encoder_decoder":
            raise ConfigError("arch", self.arch, f"'encoder' or 'decoder' with condition.kind {kind!r}",
                              hint="the cross-attention sub-layer has no modulation")

    def _check_per_layer(self, name: str, values: tuple[int, ...]) -> None:
        """Per-layer sizes (a pruned model): one per layer of one stack, each layer its own block."""
        hint = "per-layer sizes come from structured pruning (formerkit prune), which keeps the model plain"
        if self.arch == "encoder_decoder":
            raise ConfigError(name, values, "null for arch 'encoder_decoder'", hint=hint)
        if self.num_unique_layers is not None:
            raise ConfigError(name, values, "null with num_unique_layers (a shared block has one size)", hint=hint)
        if len(values) != self.num_layers:
            raise ConfigError(name, values, f"{self.num_layers} values, one per layer (num_layers)")
        if name == "feedforward.layer_hidden_sizes":
            if self.feedforward.mixture:
                raise ConfigError(name, values, "null with mixture-of-experts feed-forward layers", hint=hint)
            if any(size < 1 for size in values):
                raise ConfigError(name, values, "hidden sizes >= 1")
            return
        attention = self.attention
        if attention.kv_heads != attention.num_heads:
            raise ConfigError(name, values, "null with grouped-query attention (num_kv_heads < num_heads)", hint=hint)
        if self.position.kind == "alibi":
            raise ConfigError(name, values, "null with alibi positions (one slope per head, shared by all layers)",
                              hint=hint)
        if self.position.kind == "relative":
            raise ConfigError(name, values, "null with relative positions (one bias per head, shared by all layers)",
                              hint=hint)
        if attention.gaussian_mixture:
            raise ConfigError(name, values, "null with attention.gaussian_mixture", hint=hint)

    def layer_num_heads(self, index: int) -> int:
        """Attention (query) heads of layer ``index``."""
        heads = self.attention.layer_heads
        return self.attention.num_heads if heads is None else heads[index]

    def layer_kv_heads(self, index: int) -> int:
        """Key/value heads of layer ``index``: per-layer head counts (pruned models) exist only without grouped-query
        attention, so there they are the layer's query heads."""
        heads = self.attention.layer_heads
        return self.attention.kv_heads if heads is None else heads[index]

    def layer_feedforward_size(self, index: int) -> int:
        """Hidden size of layer ``index``'s feed-forward part."""
        sizes = self.feedforward.layer_hidden_sizes
        return self.feedforward_size if sizes is None else sizes[index]

    # ----- derived values -----

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.width // self.attention.num_heads

    @property
    def condition_dim(self) -> int:
        """Width of the condition vector (condition.dim, or the model's width)."""
        return self.condition.dim or self.width

    @property
    def rotary_dim(self) -> int:
        """The channels of each head that rotary positions rotate."""
        return int(self.head_dim * self.position.rotary_fraction)

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def feedforward_size(self) -> int:
        return self.feedforward.hidden_size or int(self.feedforward.ratio * self.width)

    @property
    def head_pooling(self) -> str:
        """The pooling the head uses, with the default filled in."""
        if self.head.pooling is not None:
            return self.head.pooling
        if self.head.kind in ("lm", "masked_lm", "patches", "none"):
            return "none"
        if self.stem.kind == "tokens" or self.stem.class_token:
            return "last" if self.arch == "decoder" and not self.stem.class_token else "cls"
        return "mean"

    @classmethod
    def from_file(cls, path) -> ModelConfig:
        """Reads a config from a .json, .yaml or .yml file, or from a saved model's config.json (``formerkit.save``
        writes the config under "model", beside the weights record and the tool's version)."""
        import json
        from pathlib import Path

        path = Path(path)
        if path.suffix == ".json" and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                data = None  # the base reader names the error
            if isinstance(data, dict) and "formerkit" in data and isinstance(data.get("model"), dict):
                return cls.from_dict(data["model"])
        return super().from_file(path)

    @property
    def num_positions(self) -> int:
        """How many positions the position table covers: max_seq_len, or the image stem's token count."""
        if self.stem.kind in ("patches", "conv"):
            rows, cols = self.stem.grid_size
            return rows * cols + self.stem.num_positioned_prefix_tokens
        tokens = self.max_seq_len
        if self.stem.kind == "linear" and self.stem.patch_size:
            tokens = tokens // self.stem.patch_size
        return tokens + int(self.stem.class_token)

