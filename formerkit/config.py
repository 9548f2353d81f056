"""The model config: one validated dataclass that describes a whole Transformer.

``ModelConfig`` holds the core's shape (``arch``, ``width``, ``num_layers``) and one small section per part: attention,
feed-forward, norms, positions, stem (what turns inputs into vectors) and head (what turns vectors into outputs). Every
value is checked when the config is constructed; an error names the field, the value given and what is allowed.

Configs are frozen. Derive a new one with ``config.replace(...)``, which accepts top-level fields, whole sections as
dicts, dotted paths (``"attention.num_heads"``) and unambiguous field names of a section (``num_classes=10``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from formerkit.errors import ConfigError
from formerkit.schema import ConfigSection, choice, load_yaml  # noqa: F401 - load_yaml: also read from here

__all__ = [
    "AttentionConfig",
    "FeedForwardConfig",
    "HeadConfig",
    "ModelConfig",
    "NormConfig",
    "PositionConfig",
    "StemConfig",
]


# Names other libraries use for our choices, so an error can point to ours.
_ALIASES = {"rotary": "rope", "absolute": "learned", "sincos": "sinusoidal", "layer_norm": "layernorm",
            "rms_norm": "rmsnorm", "rms": "rmsnorm", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
            "swish": "silu", "relu2": "squared_relu", "prenorm": "pre", "postnorm": "post"}

ATTENTION_KINDS = ("softmax", "linear", "l2")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "squared_relu", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
POSITION_KINDS = ("learned", "sinusoidal", "rope", "alibi", "sincos2d", "none")
STEM_KINDS = ("tokens", "patches", "conv", "linear")
HEAD_KINDS = ("lm", "masked_lm", "classification", "regression", "none")
POOLINGS = ("cls", "mean", "sequence", "last", "none")
ARCHS = ("encoder", "decoder", "encoder_decoder")


class _ModelSection(ConfigSection):
    """A section of the model config, whose choice errors know other libraries' names."""

    _aliases = _ALIASES


@dataclass(frozen=True)
class AttentionConfig(_ModelSection):
    """Multi-head attention: heads, grouped-query heads, biases, QK-norm, dropout, local windows."""

    _prefix = "attention"

    num_heads: int = 8
    # Grouped-query attention (Ainslie et al., 2023): key/value heads shared by groups of query heads; 1 is multi-query.
    num_kv_heads: int | None = None
    # Width of one head; by default width // num_heads.
    head_dim: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    # Normalize queries and keys per head before the dot product (Dehghani et al., 2023, "Scaling ViT to 22B").
    qk_norm: bool = False
    dropout: float = 0.0
    # Each query sees only the `sliding_window` nearest keys (itself included; earlier ones in a decoder).
    sliding_window: int | None = None
    # Which layers use the window (by index); None means every layer.
    sliding_window_layers: tuple[int, ...] | None = None
    # With a window: the first `global_tokens` tokens see every token and every token sees them (Longformer).
    global_tokens: int = 0
    # softmax: scaled dot products; linear: softmax replaced by the kernel elu(x) + 1 (Katharopoulos et al.,
    # "Transformers are RNNs"), linear in length; l2: scores are minus squared distances -|q - k|^2 / sqrt(head_dim)
    # (the L2 attention of Ma et al., "Plain Transformers Can be Powerful Graph Learners").
    kind: str = choice("softmax", ATTENTION_KINDS)
    # Which layers use `kind` (by index); the others use softmax. None means every layer.
    kind_layers: tuple[int, ...] | None = None
    # A learned Gaussian-mixture mask with this many kernels per head, scaling the scores of image patches by their 2-D
    # distance (Li and Zhang, "Toward a Deeper Understanding: RetNet Viewed through Convolution"). 0: none.
    gaussian_mixture: int = 0
    # Decoders: fade the causal mask in linearly over the first `soft_causal_steps` training steps, from no mask to
    # fully causal (the soft mask of iLLaMA, Wang et al.). null: causal from the start.
    soft_causal_steps: int | None = None
    # Heads of each layer (a structurally pruned model; each head keeps head_dim). null: num_heads in every layer.
    layer_heads: tuple[int, ...] | None = None

    def _validate(self) -> None:
        if self.num_heads < 1:
            self._fail("num_heads", "an integer >= 1")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            self._fail("num_kv_heads", f"a divisor of attention.num_heads ({self.num_heads})")
        if self.head_dim is not None and self.head_dim < 1:
            self._fail("head_dim", "an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "a probability in [0, 1)")
        if self.sliding_window is not None and self.sliding_window < 1:
            self._fail("sliding_window", "an integer >= 1 or null")
        if self.sliding_window_layers is not None and self.sliding_window is None:
            self._fail("sliding_window_layers", "null when attention.sliding_window is null",
                       hint="a window on a model without one: set attention.sliding_window first")
        if self.global_tokens < 0:
            self._fail("global_tokens", "an integer >= 0")
        if self.global_tokens and self.sliding_window is None:
            self._fail("global_tokens", "0 when attention.sliding_window is null",
                       hint="without a window every token already sees every other")
        if self.kind_layers is not None and self.kind == "softmax":
            self._fail("kind_layers", "null when attention.kind is 'softmax'",
                       hint="set attention.kind to 'linear' or 'l2' for the layers listed")
        if self.kind == "linear":
            if self.dropout:
                self._fail("dropout", "0.0 with attention.kind 'linear'",
                           hint="linear attention never forms the attention probabilities that dropout would drop")
            # Layer lists of None mean every layer, so any two lists of which one is None overlap.
            overlap = (self.kind_layers is None or self.sliding_window_layers is None
                       or set(self.kind_layers) & set(self.sliding_window_layers))
            if self.sliding_window is not None and overlap:
                self._fail("sliding_window_layers", "layers that do not use linear attention",
                           hint="linear attention is already linear in length; list the window layers in "
                                "attention.sliding_window_layers and the linear ones in attention.kind_layers")
        if self.gaussian_mixture < 0:
            self._fail("gaussian_mixture", "an integer >= 0 (the number of Gaussian kernels per head)")
        if self.soft_causal_steps is not None and self.soft_causal_steps < 1:
            self._fail("soft_causal_steps", "an integer >= 1 or null")
        if self.layer_heads is not None and any(h < 1 or h > self.num_heads for h in self.layer_heads):
            self._fail("layer_heads", f"head counts in [1, attention.num_heads={self.num_heads}], one per layer")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclass(frozen=True)
class FeedForwardConfig(_ModelSection):
    """The position-wise feed-forward part: a plain MLP or a gated one (Shazeer, 2020, "GLU Variants")."""

    _prefix = "feedforward"

    activation: str = choice("gelu", ACTIVATIONS)
    # Hidden width; by default int(ratio * width).
    hidden_size: int | None = None
    ratio: float = 4.0
    bias: bool = True
    dropout: float = 0.0
    # Mixture of experts (Shazeer et al., 2017; Fedus et al., 2021, "Switch Transformers"): num_experts feed-forwards
    # of the shape above, of which a learned router sends each token to `experts_per_token`. null or 0: dense.
    num_experts: int | None = None
    experts_per_token: int = 2
    # Training only: an expert takes at most ceil(capacity_factor * tokens * experts_per_token / num_experts) token
    # assignments per pass; the rest are dropped (those tokens keep their residual). null: nothing is dropped.
    capacity_factor: float | None = None
    # The load-balancing losses of the mixture layers, summed and times this weight, are the model's aux_loss.
    aux_loss_weight: float = 0.01
    # Which blocks are mixtures, by index (with num_unique_layers: the index of the shared block); null means all.
    moe_layers: tuple[int, ...] | None = None
    # Hidden size of each layer's feed-forward part (a structurally pruned model). null: the same in every layer.
    layer_hidden_sizes: tuple[int, ...] | None = None

    def _validate(self) -> None:
        if self.hidden_size is not None and self.hidden_size < 1:
            self._fail("hidden_size", "an integer >= 1 or null")
        if self.ratio <= 0:
            self._fail("ratio", "a number > 0")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "a probability in [0, 1)")
        if self.num_experts is not None and self.num_experts != 0 and self.num_experts < 2:
            self._fail("num_experts", "null or 0 (a dense feed-forward) or an integer >= 2",
                       hint="a mixture of one expert is the dense feed-forward with a router that changes nothing")
        if self.experts_per_token < 1:
            self._fail("experts_per_token", "an integer >= 1")
        if self.mixture and self.experts_per_token > self.num_experts:
            self._fail("experts_per_token", f"an integer in [1, {self.num_experts}] (feedforward.num_experts)")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            self._fail("capacity_factor", "a number > 0 or null (no capacity limit)")
        if self.aux_loss_weight < 0:
            self._fail("aux_loss_weight", "a number >= 0")
        for name in ("capacity_factor", "moe_layers"):
            if getattr(self, name) is not None and not self.mixture:
                self._fail(name, "null when feedforward.num_experts is null or 0 (a dense feed-forward)",
                           hint="set feedforward.num_experts first")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def mixture(self) -> bool:
        """Whether any block is a mixture of experts."""
        return bool(self.num_experts)

    def is_mixture_block(self, index: int) -> bool:
        """Whether block ``index`` (of a stack, or of the shared blocks with num_unique_layers) is a mixture."""
        return self.mixture and (self.moe_layers is None or index in self.moe_layers)


@dataclass(frozen=True)
class NormConfig(_ModelSection):
    """Normalization: which norm, where it sits around each sub-layer, and whether the stack ends with one."""

    _prefix = "norm"

    kind: str = choice("layernorm", NORM_KINDS)
    # pre: x + f(norm(x)); post: norm(x + f(x)) (the original Transformer, BERT); sandwich: x + norm(f(norm(x)))
    # (Ding et al., 2021, "CogView").
    placement: str = choice("pre", NORM_PLACEMENTS)
    eps: float = 1e-5
    # LayerNorm only: learn an additive bias.
    bias: bool = True
    # A norm after the last block; null means "yes for pre and sandwich, no for post".
    final: bool | None = None

    def _validate(self) -> None:
        if self.eps <= 0:
            self._fail("eps", "a number > 0")

    @property
    def has_final(self) -> bool:
        return self.final if self.final is not None else self.placement != "post"


@dataclass(frozen=True)
class PositionConfig(_ModelSection):
    """How the model knows where a token is."""

    _prefix = "position"

    # learned: a trained table added to the input; sinusoidal: the fixed table of Vaswani et al.; rope: rotary
    # embeddings on queries and keys (Su et al., "RoFormer"); alibi: linear distance biases (Press et al., "Train Short,
    # Test Long"); sincos2d: fixed 2-D sine-cosine table over a patch grid (MAE); none.
    kind: str = choice("learned", POSITION_KINDS)
    rope_base: float = 10000.0

    def _validate(self) -> None:
        if self.rope_base <= 1.0:
            self._fail("rope_base", "a number > 1")


@dataclass(frozen=True)
class StemConfig(_ModelSection):
    """What turns raw inputs (token ids, images, numeric sequences) into a sequence of vectors."""

    _prefix = "stem"

    # tokens: an embedding table; patches: ViT patch embedding; conv: the CCT convolutional tokenizer (Hassani et al.,
    # "Escaping the Big Data Paradigm with Compact Transformers"); linear: a linear map of numeric vectors.
    kind: str = choice("tokens", STEM_KINDS)
    # tokens
    vocab_size: int | None = None
    num_token_types: int = 0
    # A norm right after the embeddings (BERT).
    embedding_norm: bool = False
    # patches and conv: input images are [batch, in_channels, height, width]
    image_size: tuple[int, int] | None = None
    in_channels: int = 3
    # patches: the side of a square patch; linear: how many consecutive time steps form one token
    patch_size: int | None = None
    # patches, conv and linear: a learned token in front of the sequence (ViT's [class] token)
    class_token: bool = False
    # patches and conv: extra learned tokens without positions (Darcet et al., "Vision Transformers Need Registers")
    register_tokens: int = 0
    # patches and conv, classification: DeiT's distillation token (Touvron et al., 2021), after the class token, read
    # by a second classification head that learns from a teacher (formerkit distill); the two heads' logits are
    # averaged at inference.
    distill_token: bool = False
    # conv
    conv_layers: int = 1
    conv_kernel: int = 3
    conv_channels: int = 64
    conv_bias: bool = False
    pool_kernel: int = 3
    pool_stride: int = 2
    # linear: features per time step
    input_dim: int | None = None

    def _validate(self) -> None:
        kind = self.kind
        if isinstance(self.image_size, tuple) and min(self.image_size) < 1:
            self._fail("image_size", "positive sizes")
        self._check_applies("kind", {
            "vocab_size": ("tokens",), "num_token_types": ("tokens",), "image_size": ("patches", "conv"),
            "in_channels": ("patches", "conv"), "patch_size": ("patches", "linear"),
            "class_token": ("patches", "conv", "linear"), "register_tokens": ("patches", "conv"),
            "distill_token": ("patches", "conv"),
            "conv_layers": ("conv",), "conv_kernel": ("conv",), "conv_channels": ("conv",), "conv_bias": ("conv",),
            "pool_kernel": ("conv",), "pool_stride": ("conv",), "input_dim": ("linear",),
        })
        if kind == "tokens" and (self.vocab_size is None or self.vocab_size < 1):
            self._fail("vocab_size", "an integer >= 1 for a tokens stem")
        if self.num_token_types < 0:
            self._fail("num_token_types", "an integer >= 0")
        if kind in ("patches", "conv"):
            if self.image_size is None:
                self._fail("image_size", "[height, width] (or one integer) for an image stem")
            if self.in_channels < 1:
                self._fail("in_channels", "an integer >= 1")
            if self.register_tokens < 0:
                self._fail("register_tokens", "an integer >= 0")
        if kind == "patches":
            if self.patch_size is None or self.patch_size < 1:
                self._fail("patch_size", "an integer >= 1 for a patches stem")
            if any(side % self.patch_size for side in self.image_size):
                self._fail("patch_size", f"a divisor of both sides of stem.image_size {list(self.image_size)}")
        if kind == "conv":
            for name in ("conv_layers", "conv_kernel", "conv_channels", "pool_stride"):
                if getattr(self, name) < 1:
                    self._fail(name, "an integer >= 1")
            if self.pool_kernel < 0:
                self._fail("pool_kernel", "an integer >= 0 (0 turns pooling off)")
            if min(self.grid_size) < 1:
                self._fail("image_size", "an image large enough for the tokenizer's pooling")
        if kind == "linear":
            if self.input_dim is None or self.input_dim < 1:
                self._fail("input_dim", "an integer >= 1 for a linear stem")
            if self.patch_size is not None and self.patch_size < 1:
                self._fail("patch_size", "an integer >= 1 or null")

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        super().__post_init__()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Rows and columns of the token grid an image stem produces."""
        if self.kind == "patches":
            return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)
        if self.kind == "conv":
            rows, cols = self.image_size
            for _ in range(self.conv_layers):
                # conv: stride 1, padding kernel // 2 (the same size for odd kernels, one more for even ones);
                # then max pooling with padding pool_kernel // 2, as in CCT.
                rows = rows + 2 * (self.conv_kernel // 2) - self.conv_kernel + 1
                cols = cols + 2 * (self.conv_kernel // 2) - self.conv_kernel + 1
                if self.pool_kernel:
                    pad = self.pool_kernel // 2
                    rows = (rows + 2 * pad - self.pool_kernel) // self.pool_stride + 1
                    cols = (cols + 2 * pad - self.pool_kernel) // self.pool_stride + 1
            return (rows, cols)
        raise AttributeError("grid_size exists only for image stems (patches, conv)")

    @property
    def num_prefix_tokens(self) -> int:
        """Learned tokens placed before the input's own tokens (class token, distillation token, registers)."""
        return int(self.class_token) + int(self.distill_token) + self.register_tokens

    @property
    def num_positioned_prefix_tokens(self) -> int:
        """The prefix tokens that get positions (class and distillation tokens; registers get none)."""
        return int(self.class_token) + int(self.distill_token)


@dataclass(frozen=True)
class HeadConfig(_ModelSection):
    """What turns the final vectors into outputs."""

    _prefix = "head"

    # lm: next-token logits; masked_lm: BERT's transform + decoder; classification: pooled vector -> classes;
    # regression: pooled (or per-token) vector -> output_dim numbers (forecasts); none: the final hidden states.
    kind: str = choice("lm", HEAD_KINDS)
    num_classes: int | None = None
    output_dim: int | None = None
    # How a sequence becomes one vector: cls (first token), mean (of real input tokens), sequence (CCT's learned
    # attention pooling), last (last real token, for decoders), none (keep every position).
    pooling: str | None = choice(None, (None, *POOLINGS))
    # BERT's pooler: a dense layer with tanh on the pooled vector.
    pooler: bool = False
    # Share the LM head's weight with the token embedding (Press & Wolf, 2017).
    tie_embeddings: bool = False
    dropout: float = 0.0

    def _validate(self) -> None:
        kind = self.kind
        if kind == "classification" and (self.num_classes is None or self.num_classes < 1):
            self._fail("num_classes", "an integer >= 1 for a classification head")
        if kind != "classification" and self.num_classes is not None:
            self._fail("num_classes", "null unless head.kind is 'classification'")
        if kind == "regression" and (self.output_dim is None or self.output_dim < 1):
            self._fail("output_dim", "an integer >= 1 for a regression head")
        if kind != "regression" and self.output_dim is not None:
            self._fail("output_dim", "null unless head.kind is 'regression'")
        if kind in ("lm", "masked_lm") and self.pooling not in (None, "none"):
            self._fail("pooling", f"null for a head of kind {kind!r}, which predicts at every position")
        if kind == "classification" and self.pooling == "none":
            self._fail("pooling", "cls, mean, sequence or last for a classification head")
        if self.tie_embeddings and kind not in ("lm", "masked_lm"):
            self._fail("tie_embeddings", "false unless head.kind is 'lm' or 'masked_lm'")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "a probability in [0, 1)")


@dataclass(frozen=True)
class ModelConfig(_ModelSection):
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
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    feedforward: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    stem: StemConfig = field(default_factory=lambda: StemConfig(vocab_size=256))
    head: HeadConfig = field(default_factory=HeadConfig)

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
        if stem.register_tokens and self.position.kind in ("rope", "alibi"):
            raise ConfigError("stem.register_tokens", stem.register_tokens, "0 with rope or alibi positions",
                              hint="register tokens carry no position; use learned, sinusoidal, sincos2d or none")
        if self.arch == "encoder_decoder" and stem.kind != "tokens":
            raise ConfigError("stem.kind", stem.kind, "'tokens' for arch 'encoder_decoder'")
        if self.position.kind == "sincos2d" and stem.kind not in ("patches", "conv"):
            raise ConfigError("position.kind", "sincos2d", "an image stem (patches or conv) for a 2-D position table",
                              hint=f"stem.kind is {stem.kind!r}")
        # Heads.
        if head.kind == "lm" and (stem.kind != "tokens" or self.arch == "encoder"):
            raise ConfigError("head.kind", "lm", "a tokens stem with arch 'decoder' or 'encoder_decoder'",
                              hint="an encoder over tokens predicts masked tokens: use head.kind 'masked_lm'")
        if head.kind == "masked_lm" and (stem.kind != "tokens" or self.arch != "encoder"):
            raise ConfigError("head.kind", "masked_lm", "a tokens stem with arch 'encoder'")
        if stem.distill_token and head.kind != "classification":
            raise ConfigError("stem.distill_token", True, "false unless head.kind is 'classification'",
                              hint="the distillation token feeds a second classification head")
        if head.tie_embeddings and stem.kind != "tokens":
            raise ConfigError("head.tie_embeddings", True, "a tokens stem, whose embedding the head can share")
        if self.head_pooling == "cls" and stem.kind != "tokens" and not stem.class_token:
            raise ConfigError("head.pooling", "cls", "a stem with stem.class_token true (or a tokens stem)")
        if self.head_pooling == "last" and self.arch == "encoder":
            raise ConfigError("head.pooling", "last", "cls, mean or sequence for an encoder",
                              hint="'last' pools the last token, which sees the whole input only in a decoder")

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
        if self.head.kind in ("lm", "masked_lm", "none"):
            return "none"
        if self.stem.kind == "tokens" or self.stem.class_token:
            return "last" if self.arch == "decoder" and not self.stem.class_token else "cls"
        return "mean"

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

