"""T5 checkpoints (``t5``: T5ForConditionalGeneration, T5Model, T5EncoderModel) in and out."""

from __future__ import annotations

from typing import Any

from formerkit.config import ModelConfig
from formerkit.errors import InteropError
from formerkit.interop.engine import ACTIVATIONS, Family, Rule, pair, stack
from formerkit.interop.files import Fields

__all__ = ["T5"]

# feed_forward_proj -> formerkit's activation. T5 v1.0 uses "relu"; v1.1's "gated-gelu" gates with GELU's tanh
# approximation (transformers maps it to gelu_new); a gated name is "gated-" and the gate's activation.
_GATED = {"gelu": "geglu_tanh", "gelu_new": "geglu_tanh", "gelu_pytorch_tanh": "geglu_tanh", "silu": "swiglu",
          "swish": "swiglu"}
# formerkit's activation -> the feed_forward_proj written.
_PROJECTIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu",
                "geglu_tanh": "gated-gelu", "swiglu": "gated-silu"}


class T5(Family):
    """T5 (Raffel et al., 2020): pre-norm RMSNorm without biases, unscaled attention with a learned relative position
    bias per stack (in each stack's first layer), one token embedding shared by the encoder, the decoder and (tied)
    the LM head, whose input is then scaled by width^-1/2."""

    model_types = ("t5",)

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"T5ForConditionalGeneration": "lm", "T5Model": "none", "T5EncoderModel": "none"}

    def architecture_for(self, config: ModelConfig, model_type: str) -> str:
        # The encoder alone is T5EncoderModel; an encoder-decoder is T5Model without a head, else with its LM head.
        expected = {"encoder": ("none", "T5EncoderModel")}.get(config.arch, ("lm or none", None))
        if config.arch == "encoder_decoder" and config.head.kind in ("lm", "none"):
            return "T5ForConditionalGeneration" if config.head.kind == "lm" else "T5Model"
        if config.arch == "encoder" and config.head.kind == "none":
            return "T5EncoderModel"
        raise InteropError(f"to_hf: head.kind: expected {expected[0]!r} for a T5 checkpoint of arch {config.arch!r}, "
                           f"got {config.head.kind!r}")

    def writes(self, config: ModelConfig) -> bool:
        return (config.arch in ("encoder", "encoder_decoder") and config.stem.kind == "tokens"
                and config.position.kind == "relative")

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        hf.expect("is_decoder", False, "formerkit reads T5 as an encoder or an encoder-decoder")
        width, heads = hf.integer("d_model", 512), hf.integer("num_heads", 8)
        head_dim = hf.integer("d_kv", 64)
        layers = hf.integer("num_layers", 6)
        decoder_layers = hf.integer("num_decoder_layers", None, nullable=True) or layers
        activation = self._activation(hf)
        encoder_only = architecture == "T5EncoderModel"
        tied = hf.flag("tie_word_embeddings", True)
        if architecture == "T5ForConditionalGeneration":
            # transformers 4 scaled the head's input exactly when the head was tied; transformers 5 ties always and
            # says so in scale_decoder_outputs.
            head = {"kind": "lm", "tie_embeddings": tied,
                    "scale_input": hf.flag("scale_decoder_outputs", tied)}
        else:
            head = {"kind": "none"}
        start = None if encoder_only else hf.integer("decoder_start_token_id", None, minimum=0, nullable=True)
        return ModelConfig(
            arch="encoder" if encoder_only else "encoder_decoder", width=width, num_layers=layers,
            num_decoder_layers=None if encoder_only or decoder_layers == layers else decoder_layers,
            # T5 has no position limit; formerkit needs one for its inputs: the old n_positions field, else 512.
            max_seq_len=hf.integer("n_positions", 512), dropout=hf.number("dropout_rate", 0.1),
            init_std=hf.number("initializer_range", 0.02), decoder_start_token_id=start,
            attention={"num_heads": heads, "head_dim": head_dim if head_dim * heads != width else None,
                       "qkv_bias": False, "out_bias": False, "scale": 1.0,
                       "dropout": hf.number("dropout_rate", 0.1)},
            feedforward={"activation": activation, "hidden_size": hf.integer("d_ff", 2048), "bias": False,
                         "dropout": hf.number("dropout_rate", 0.1)},
            norm={"kind": "rmsnorm", "placement": "pre", "eps": hf.number("layer_norm_epsilon", 1e-6)},
            position={"kind": "relative", "relative_buckets": hf.integer("relative_attention_num_buckets", 32,
                                                                         minimum=2),
                      "relative_max_distance": hf.integer("relative_attention_max_distance", 128),
                      "separate_decoder": not encoder_only},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size", 32128)},
            head=head,
        )

    @staticmethod
    def _activation(hf: Fields) -> str:
        value = hf.value("feed_forward_proj", "relu")
        parts = value.split("-") if isinstance(value, str) else []
        if len(parts) == 2 and parts[0] == "gated" and parts[1] in _GATED:
            return _GATED[parts[1]]
        if len(parts) == 1 and parts[0] in ACTIVATIONS:
            return ACTIVATIONS[parts[0]]
        hf.fail("feed_forward_proj", "one of " + ", ".join(map(repr, [*ACTIVATIONS, *(f"gated-{name}" for name in
                                                                                      _GATED)])), value,
                hint="formerkit's gated MLPs gate with GELU (tanh) or SiLU")

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "t5")
        activation = config.feedforward.activation
        if activation not in _PROJECTIONS:
            raise InteropError(f"to_hf: feedforward.activation: expected one of {', '.join(map(repr, _PROJECTIONS))} "
                               f"for a T5 checkpoint, got {activation!r}")
        head = config.head
        data = {
            **self.header(config, architecture, "t5"),
            "vocab_size": config.stem.vocab_size, "d_model": config.width, "d_kv": config.head_dim,
            "d_ff": config.feedforward_size, "num_heads": config.attention.num_heads, "num_layers": config.num_layers,
            "num_decoder_layers": config.decoder_layers if config.arch == "encoder_decoder" else config.num_layers,
            "relative_attention_num_buckets": config.position.relative_buckets,
            "relative_attention_max_distance": config.position.relative_max_distance,
            "dropout_rate": config.dropout, "layer_norm_epsilon": config.norm.eps, "feed_forward_proj":
                _PROJECTIONS[activation], "n_positions": config.max_seq_len, "is_encoder_decoder":
                config.arch == "encoder_decoder", "is_decoder": False,
            "decoder_start_token_id": config.decoder_start_token_id,
            "tie_word_embeddings": head.tie_embeddings if head.kind == "lm" else True,
        }
        if head.kind == "lm":
            data["scale_decoder_outputs"] = head.scale_input
        return data

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        rows = config.attention.num_heads * config.head_dim
        gated = config.feedforward.gated
        rules = [Rule("stem.tokens.weight", ("shared.weight",)),
                 Rule("positions.weight", ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",))]
        sides = [("encoder", config.num_layers)]
        if config.arch == "encoder_decoder":
            rules.append(Rule("decoder_positions.weight",
                              ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
            sides.append(("decoder", config.decoder_layers))
        for side, depth in sides:
            for i in range(depth):
                ours, theirs = f"{side}.blocks.{i}", f"{side}.block.{i}.layer"
                attention = f"{theirs}.0.SelfAttention"
                rules += stack(f"{ours}.attention.qkv", [f"{attention}.{p}" for p in "qkv"], (rows,) * 3, bias=False)
                rules += pair(f"{ours}.attention.out", f"{attention}.o", bias=False)
                rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.0.layer_norm", bias=False)
                last = 1
                if side == "decoder":
                    cross = f"{theirs}.1.EncDecAttention"
                    rules += pair(f"{ours}.cross_attention.q", f"{cross}.q", bias=False)
                    rules += stack(f"{ours}.cross_attention.kv", [f"{cross}.k", f"{cross}.v"], (rows,) * 2,
                                   bias=False)
                    rules += pair(f"{ours}.cross_attention.out", f"{cross}.o", bias=False)
                    rules += pair(f"{ours}.cross_attention_residual.norm", f"{theirs}.1.layer_norm", bias=False)
                    last = 2
                mlp = f"{theirs}.{last}.DenseReluDense"
                if gated:  # wi_0 is the gate, wi_1 the linear half
                    rules += stack(f"{ours}.feedforward.fc_in", [f"{mlp}.wi_0", f"{mlp}.wi_1"],
                                   (config.feedforward_size,) * 2, bias=False)
                else:
                    rules += pair(f"{ours}.feedforward.fc_in", f"{mlp}.wi", bias=False)
                rules += pair(f"{ours}.feedforward.fc_out", f"{mlp}.wo", bias=False)
                rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.{last}.layer_norm", bias=False)
            rules += pair(f"{side}.final_norm", f"{side}.final_layer_norm", bias=False)
        if config.head.kind == "lm" and not config.head.tie_embeddings:
            rules.append(Rule("head.projection.weight", ("lm_head.weight",)))
        return rules

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        copies = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
        if config.head.kind == "lm" and config.head.tie_embeddings:
            copies["lm_head.weight"] = "shared.weight"
        return copies
