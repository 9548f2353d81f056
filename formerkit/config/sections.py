"""The sections of the model config: attention, feed-forward, norms, positions, stem and head, each a frozen
dataclass validated on construction (see ``formerkit.config``)."""

from __future__ import annotations

from dataclasses import dataclass

from formerkit.schema import ConfigSection, choice

__all__ = [
    "AttentionConfig",
    "ConditionConfig",
    "FeedForwardConfig",
    "HeadConfig",
    "NormConfig",
    "PositionConfig",
    "StemConfig",
]


# Names other libraries use for our choices, so an error can point to ours.
_ALIASES = {"rotary": "rope", "absolute": "learned", "sincos": "sinusoidal", "layer_norm": "layernorm",
            "rms_norm": "rmsnorm", "rms": "rmsnorm", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
            "swish": "silu", "relu2": "squared_relu", "prenorm": "pre", "postnorm": "post"}

ATTENTION_KINDS = ("softmax", "linear", "l2")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "squared_relu", "silu", "swiglu", "geglu", "geglu_tanh")
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
POSITION_KINDS = ("learned", "sinusoidal", "rope", "alibi", "relative", "sincos2d", "none")
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3", "longrope")
STEM_KINDS = ("tokens", "patches", "conv", "linear")
HEAD_KINDS = ("lm", "masked_lm", "classification", "regression", "patches", "none")
CONDITION_KINDS = ("adaln_zero",)
POOLINGS = ("cls", "mean", "sequence", "last", "none")
POOLER_ACTIVATIONS = ("tanh", "relu")
ARCHS = ("encoder", "decoder", "encoder_decoder")


class ModelSection(ConfigSection):
    """A section of the model config, whose choice errors know other libraries' names."""

    _aliases = _ALIASES


@dataclass(frozen=True)
class AttentionConfig(ModelSection):
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
    # The multiplier of the query-key dot products; null: 1/sqrt(head_dim). T5 uses 1.0 (its initialization carries
    # the scale); Gemma 2 and 3 use query_pre_attn_scalar^-1/2.
    scale: float | None = None
    # Soft-capping of the scores before the mask and softmax, softcap * tanh(scores / softcap) (Gemma 2): bounds the
    # logits without clipping their gradient. Fused attention kernels cannot apply it: capped layers compute their
    # scores explicitly (as transformers' eager attention does). null: none.
    softcap: float | None = None

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
        for name in ("scale", "softcap"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                self._fail(name, "a number > 0 or null")
        if self.softcap is not None and self.kind == "l2":
            self._fail("softcap", "null with attention.kind 'l2'",
                       hint="L2 attention drops each query's own |q|^2 from its scores, which a cap would not ignore")
        if self.softcap is not None and self.kind == "linear" and self.kind_layers is None:
            self._fail("softcap", "null when every layer uses linear attention",
                       hint="linear attention never forms the scores soft-capping bounds")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclass(frozen=True)
class FeedForwardConfig(ModelSection):
    """The position-wise feed-forward part: a plain MLP or a gated one (Shazeer, 2020, "GLU Variants")."""

    _prefix = "feedforward"

    # swiglu, geglu and geglu_tanh are gated, act(gate) * up (Shazeer, 2020), with SiLU, GELU or GELU's tanh
    # approximation (Gemma's GeGLU) on the gate.
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
class NormConfig(ModelSection):
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
    # Added to every norm's learned scale, which then starts at 1 - weight_offset (so every norm starts as a unit
    # scale): the norm multiplies by (weight_offset + weight). Gemma's RMSNorms store their scales this way
    # (weight_offset 1.0, weights starting at 0), so weight decay pulls them toward 1.
    weight_offset: float = 0.0

    def _validate(self) -> None:
        if self.eps <= 0:
            self._fail("eps", "a number > 0")
        self._check_applies("kind", {"weight_offset": ("rmsnorm",)})

    @property
    def has_final(self) -> bool:
        return self.final if self.final is not None else self.placement != "post"


@dataclass(frozen=True)
class PositionConfig(ModelSection):
    """How the model knows where a token is."""

    _prefix = "position"

    # learned: a trained table added to the input; sinusoidal: the fixed table of Vaswani et al.; rope: rotary
    # embeddings on queries and keys (Su et al., "RoFormer"); alibi: linear distance biases (Press et al., "Train Short,
    # Test Long"); relative: T5's learned bias per head and bucket of relative distance; sincos2d: fixed 2-D
    # sine-cosine table over a patch grid (MAE); none.
    kind: str = choice("learned", POSITION_KINDS)
    rope_base: float = 10000.0
    # rope: the fraction of each head's channels that are rotated (the first ones); the others pass unrotated
    # (GPT-NeoX's rotary_pct, Phi's partial_rotary_factor, GPT-J's rotary_dim / head_dim).
    rotary_fraction: float = 1.0
    # rope: stretching the rotation frequencies for longer contexts: linear (position interpolation, Chen et al.,
    # 2023), dynamic (NTK-aware base growth once the input outgrows rope_original_max_len), yarn (Peng et al., 2023,
    # "YaRN"), llama3 (Llama 3.1's interpolation of the low frequencies only), longrope (Ding et al., 2024,
    # "LongRoPE"; Phi-3: a factor per channel pair, short or long by the input's length). null: plain RoPE.
    rope_scaling: str | None = choice(None, (None, *ROPE_SCALINGS))
    # rope_scaling: how much longer the context gets.
    rope_factor: float = 1.0
    # dynamic, yarn, llama3, longrope: the context length of pre-training, before the extension.
    rope_original_max_len: int | None = None
    # llama3: wavelengths longer than rope_original_max_len / rope_low_freq_factor are interpolated by rope_factor,
    # those shorter than rope_original_max_len / rope_high_freq_factor kept, the ones between blended smoothly.
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    # yarn: rope_beta_fast and rope_beta_slow, the rotations per original context that bound the ramp from kept
    # (fast) to interpolated (slow) channel pairs; yarn, longrope: rope_attention_factor, the scale of the cos/sin
    # tables (null: YaRN's 0.1 ln(rope_factor) + 1; LongRoPE's sqrt(1 + ln(rope_factor) / ln(rope_original_max_len))).
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float | None = None
    # longrope: each channel pair's frequency is divided by its factor, from rope_short_factors while a call's
    # positions stay within rope_original_max_len, from rope_long_factors beyond (rotary_dim / 2 factors each).
    rope_short_factors: tuple[float, ...] | None = None
    rope_long_factors: tuple[float, ...] | None = None
    # rope: the base of the sliding-window layers, when it differs from rope_base (Gemma 3: 10,000 in its local
    # layers, 1,000,000 in its global ones); rope_scaling applies to the other layers only. null: rope_base.
    rope_local_base: float | None = None
    # relative: buckets of relative distance (half exact distances, half logarithmic up to relative_max_distance;
    # Raffel et al., 2020, "T5"). Decoders give later keys no buckets of their own.
    relative_buckets: int = 32
    relative_max_distance: int = 128
    # encoder_decoder: the decoder has positions of its own instead of reading the encoder's (BART's two learned
    # tables; T5's relative bias, one table per stack, needed there since the buckets differ).
    separate_decoder: bool = False

    def _validate(self) -> None:
        if self.rope_base <= 1.0:
            self._fail("rope_base", "a number > 1")
        scaling_fields = ("rope_factor", "rope_original_max_len", "rope_low_freq_factor", "rope_high_freq_factor",
                          "rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_short_factors",
                          "rope_long_factors")
        rope = ("rotary_fraction", "rope_scaling", "rope_local_base", *scaling_fields)
        self._check_applies("kind", {**{name: ("rope",) for name in rope},
                                     "relative_buckets": ("relative",), "relative_max_distance": ("relative",),
                                     "separate_decoder": ("learned", "relative")})
        # Scaling fields do nothing without a scaling scheme, and each scheme reads only its own.
        self._check_applies("rope_scaling", {
            "rope_factor": ROPE_SCALINGS, "rope_original_max_len": ("dynamic", "yarn", "llama3", "longrope"),
            "rope_low_freq_factor": ("llama3",), "rope_high_freq_factor": ("llama3",), "rope_beta_fast": ("yarn",),
            "rope_beta_slow": ("yarn",), "rope_attention_factor": ("yarn", "longrope"),
            "rope_short_factors": ("longrope",), "rope_long_factors": ("longrope",)})
        if not 0.0 < self.rotary_fraction <= 1.0:
            self._fail("rotary_fraction", "a fraction in (0, 1]")
        if self.rope_scaling is not None:
            if self.rope_factor <= 0 or (self.rope_scaling != "linear" and self.rope_factor < 1):
                self._fail("rope_factor", "a number > 0" if self.rope_scaling == "linear" else "a number >= 1")
            needs_original = self.rope_scaling in ("dynamic", "yarn", "llama3", "longrope")
            if needs_original and (self.rope_original_max_len is None or self.rope_original_max_len < 1):
                self._fail("rope_original_max_len", f"an integer >= 1 with rope_scaling {self.rope_scaling!r}")
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                self._fail("rope_high_freq_factor", f"a number > position.rope_low_freq_factor "
                           f"({self.rope_low_freq_factor})")
            if self.rope_beta_fast <= self.rope_beta_slow:
                self._fail("rope_beta_fast", f"a number > position.rope_beta_slow ({self.rope_beta_slow})")
            if self.rope_attention_factor is not None and self.rope_attention_factor <= 0:
                self._fail("rope_attention_factor", "a number > 0 or null")
            for name in ("rope_short_factors", "rope_long_factors"):
                factors = getattr(self, name)
                if self.rope_scaling == "longrope" and (not factors or min(factors) <= 0):
                    self._fail(name, "a list of numbers > 0 with rope_scaling 'longrope', one per rotated channel pair")
        if self.rope_local_base is not None and self.rope_local_base <= 1.0:
            self._fail("rope_local_base", "a number > 1 or null")
        if self.relative_buckets < 2:
            self._fail("relative_buckets", "an integer >= 2")
        if self.relative_max_distance < 1:
            self._fail("relative_max_distance", "an integer >= 1")


@dataclass(frozen=True)
class StemConfig(ModelSection):
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
    # encoder_decoder with embedding_norm: the decoder's embeddings get a norm of their own (BART's
    # layernorm_embedding in each stack) instead of sharing the encoder's.
    separate_decoder_norm: bool = False
    # tokens: multiply the token embeddings by sqrt(width) (Vaswani et al.; Gemma; BART's scale_embedding), so they
    # start at the scale of the residual stream.
    scale_embeddings: bool = False
    # patches and conv: input images are [batch, in_channels, height, width]
    image_size: tuple[int, int] | None = None
    in_channels: int = 3
    # patches: the side of a square patch; linear: how many consecutive time steps form one token
    patch_size: int | None = None
    # patches, conv and linear: a learned token in front of the sequence (ViT's [class] token)
    class_token: bool = False
    # patches and conv: extra learned tokens without positions (Darcet et al., "Vision Transformers Need Registers")
    register_tokens: int = 0
    # patches and conv, classification (or no head): DeiT's distillation token (Touvron et al., 2021), after the class
    # token, read by a second classification head that learns from a teacher (formerkit distill); the two heads'
    # logits are averaged at inference (head.distill_head: false keeps the token without its head).
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
            "vocab_size": ("tokens",), "num_token_types": ("tokens",), "scale_embeddings": ("tokens",),
            "image_size": ("patches", "conv"),
            "in_channels": ("patches", "conv"), "patch_size": ("patches", "linear"),
            "class_token": ("patches", "conv", "linear"), "register_tokens": ("patches", "conv"),
            "distill_token": ("patches", "conv"),
            "conv_layers": ("conv",), "conv_kernel": ("conv",), "conv_channels": ("conv",), "conv_bias": ("conv",),
            "pool_kernel": ("conv",), "pool_stride": ("conv",), "input_dim": ("linear",),
        })
        if kind == "tokens" and (self.vocab_size is None or self.vocab_size < 1):
            self._fail("vocab_size", "an integer >= 1 for a tokens stem")
        if self.separate_decoder_norm and not self.embedding_norm:
            self._fail("separate_decoder_norm", "false when stem.embedding_norm is false",
                       hint="there is no embedding norm to separate")
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
class HeadConfig(ModelSection):
    """What turns the final vectors into outputs."""

    _prefix = "head"

    # lm: next-token logits; masked_lm: BERT's transform + decoder; classification: pooled vector -> classes;
    # regression: pooled (or per-token) vector -> output_dim numbers (forecasts); patches: each image token -> the
    # pixels of its patch, put back together into an image [batch, channels, height, width] (DiT's final linear and
    # unpatchify: a diffusion model's noise or velocity); none: the final hidden states.
    kind: str = choice("lm", HEAD_KINDS)
    num_classes: int | None = None
    # regression: the numbers predicted; patches: channels per output pixel (null: stem.in_channels).
    output_dim: int | None = None
    # How a sequence becomes one vector: cls (first token), mean (of real input tokens), sequence (CCT's learned
    # attention pooling), last (last real token, for decoders), none (keep every position).
    pooling: str | None = choice(None, (None, *POOLINGS))
    # BERT's pooler: a dense layer with an activation (head.pooler_activation) on the pooled vector.
    pooler: bool = False
    # The pooler's activation: tanh (BERT, RoBERTa's classification head, ViT) or relu (DistilBERT's pre_classifier).
    pooler_activation: str = choice("tanh", POOLER_ACTIVATIONS)
    # Share the LM head's weight with the token embedding (Press & Wolf, 2017).
    tie_embeddings: bool = False
    dropout: float = 0.0
    # lm: a learned bias on the logits (GPT-J, Phi-2; BART's final_logits_bias).
    bias: bool = False
    # lm: multiply the final hidden states by 1/sqrt(width) before the projection (T5 with tied embeddings, whose
    # shared table has the embedding's scale).
    scale_input: bool = False
    # lm: soft-capping of the logits, logit_softcap * tanh(logits / logit_softcap) (Gemma 2). null: none.
    logit_softcap: float | None = None
    # Classification with stem.distill_token: a second head reads the distillation token and the logits are the mean
    # of both (DeiT, Touvron et al., 2021); false: only the class token's head predicts, the distillation token
    # still attends and is attended to in every layer (Hugging Face's DeiTForImageClassification).
    distill_head: bool = True

    def _validate(self) -> None:
        kind = self.kind
        if kind == "classification" and (self.num_classes is None or self.num_classes < 1):
            self._fail("num_classes", "an integer >= 1 for a classification head")
        if kind != "classification" and self.num_classes is not None:
            self._fail("num_classes", "null unless head.kind is 'classification'")
        if kind == "regression" and (self.output_dim is None or self.output_dim < 1):
            self._fail("output_dim", "an integer >= 1 for a regression head")
        if kind not in ("regression", "patches") and self.output_dim is not None:
            self._fail("output_dim", "null unless head.kind is 'regression' or 'patches'")
        if kind == "patches" and self.output_dim is not None and self.output_dim < 1:
            self._fail("output_dim", "an integer >= 1 (channels per pixel) or null (stem.in_channels)")
        if kind in ("lm", "masked_lm", "patches") and self.pooling not in (None, "none"):
            self._fail("pooling", f"null for a head of kind {kind!r}, which predicts at every position")
        if kind == "classification" and self.pooling == "none":
            self._fail("pooling", "cls, mean, sequence or last for a classification head")
        if self.pooler_activation != "tanh" and not self.pooler:
            self._fail("pooler_activation", "'tanh' (the default) when head.pooler is false",
                       hint="the activation belongs to the pooler; set head.pooler: true")
        if self.tie_embeddings and kind not in ("lm", "masked_lm"):
            self._fail("tie_embeddings", "false unless head.kind is 'lm' or 'masked_lm'")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", "a probability in [0, 1)")
        self._check_applies("kind", {"bias": ("lm",), "scale_input": ("lm",), "logit_softcap": ("lm",)})
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            self._fail("logit_softcap", "a number > 0 or null")



@dataclass(frozen=True)
class ConditionConfig(ModelSection):
    """Conditioning every block on a per-example vector (a diffusion timestep, a class, any vector)."""

    _prefix = "condition"

    # adaln_zero: each block regresses from the condition vector c a shift, scale and gate per sub-layer (SiLU, then
    # a linear map), x + gate * f(norm(x) * (1 + scale) + shift), its norms without learned scale or bias; the final
    # norm gets a shift and scale too. The maps start at zero, so a fresh block is the identity (adaLN-Zero: Peebles
    # & Xie, 2023, "Scalable Diffusion Models with Transformers"). The model's forward then takes timesteps=,
    # labels= and/or condition= (a ready vector [batch, condition.dim]). null: no conditioning.
    kind: str | None = choice(None, (None, *CONDITION_KINDS))
    # Width of the condition vector; null: the model's width.
    dim: int | None = None
    # A timestep embedding in the condition: sinusoidal features of the timestep (cosines, then sines) at
    # timestep_frequencies frequencies with periods up to timestep_max_period, then Linear, SiLU, Linear (DiT's
    # timestep embedder).
    timesteps: bool = False
    timestep_frequencies: int = 256
    timestep_max_period: float = 10000.0
    # A class embedding in the condition, with one more row (index `classes`) for the null class, "no label", the
    # unconditional prediction classifier-free guidance needs (Ho & Salimans, 2022). null: no classes.
    classes: int | None = None
    # While training, each label becomes the null class with this probability, so one model learns both the
    # conditional and the unconditional prediction (DiT: 0.1).
    label_dropout: float = 0.0

    def _validate(self) -> None:
        self._check_applies("kind", {name: CONDITION_KINDS for name in (
            "dim", "timesteps", "timestep_frequencies", "timestep_max_period", "classes", "label_dropout")})
        if self.dim is not None and self.dim < 1:
            self._fail("dim", "an integer >= 1 or null (the model's width)")
        if self.timestep_frequencies < 2:
            self._fail("timestep_frequencies", "an integer >= 2")
        if self.timestep_max_period <= 1:
            self._fail("timestep_max_period", "a number > 1")
        if self.classes is not None and self.classes < 1:
            self._fail("classes", "an integer >= 1 or null")
        if not 0.0 <= self.label_dropout < 1.0:
            self._fail("label_dropout", "a probability in [0, 1)")
        if self.label_dropout and self.classes is None:
            self._fail("label_dropout", "0.0 when condition.classes is null", hint="there are no labels to drop")
