"""BART checkpoints (``bart``: BartForConditionalGeneration, BartModel) in and out."""

from __future__ import annotations

from typing import Any

from formerkit.config import ModelConfig
from formerkit.errors import InteropError
from formerkit.interop.engine import ACTIVATION_NAMES, ACTIVATIONS, Family, Rule, hf_name, pair, stack
from formerkit.interop.files import Fields

__all__ = ["Bart"]

# BART's position tables have two rows before position 0 (a fairseq convention): position p reads row p + 2.
POSITION_OFFSET = 2


class Bart(Family):
    """BART (Lewis et al., 2020): a post-norm LayerNorm encoder-decoder with biases, a learned position table and an
    embedding LayerNorm in each stack, one token embedding shared by both stacks and (tied) the LM head, which adds
    ``final_logits_bias``."""

    model_types = ("bart",)
    prefix = "model."

    def architectures(self, model_type: str) -> dict[str, str]:
        return {"BartForConditionalGeneration": "lm", "BartModel": "none"}

    def writes(self, config: ModelConfig) -> bool:
        return (config.arch == "encoder_decoder" and config.stem.kind == "tokens"
                and config.position.kind == "learned")

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        hf.expect("is_decoder", False, "formerkit reads BART as an encoder-decoder")
        for name in ("encoder_layerdrop", "decoder_layerdrop"):
            hf.expect(name, 0.0, "formerkit has no LayerDrop (Fan et al.); its drop_path drops per example, not "
                      "whole layers per batch")
        width = hf.integer("d_model", 1024)
        heads = hf.integer("encoder_attention_heads", 16)
        if hf.integer("decoder_attention_heads", 16) != heads:
            hf.refuse("decoder_attention_heads", f"encoder_attention_heads ({heads})",
                      hint="formerkit's encoder and decoder have one head count")
        hidden = hf.integer("encoder_ffn_dim", 4096)
        if hf.integer("decoder_ffn_dim", 4096) != hidden:
            hf.refuse("decoder_ffn_dim", f"encoder_ffn_dim ({hidden})",
                      hint="formerkit's encoder and decoder have one feed-forward width")
        layers, decoder_layers = hf.integer("encoder_layers", 12), hf.integer("decoder_layers", 12)
        # transformers 5 unties the encoder's and the decoder's token tables from each other too: three tables, where
        # formerkit's stacks read one.
        hf.expect("tie_word_embeddings", True, "formerkit's encoder and decoder share one token embedding")
        head = ({"kind": "lm", "tie_embeddings": True, "bias": True}
                if architecture == "BartForConditionalGeneration" else {"kind": "none"})
        return ModelConfig(
            arch="encoder_decoder", width=width, num_layers=layers,
            num_decoder_layers=decoder_layers if decoder_layers != layers else None,
            max_seq_len=hf.integer("max_position_embeddings", 1024), dropout=hf.number("dropout", 0.1),
            init_std=hf.number("init_std", 0.02),
            decoder_start_token_id=hf.integer("decoder_start_token_id", 2, minimum=0, nullable=True),
            attention={"num_heads": heads, "dropout": hf.number("attention_dropout", 0.0)},
            feedforward={"activation": hf.choice("activation_function", ACTIVATIONS, "gelu", "the MLP's"),
                         "hidden_size": hidden, "dropout": hf.number("activation_dropout", 0.0)},
            # BART's LayerNorms have torch's default eps; its config has no field for it.
            norm={"kind": "layernorm", "placement": "post", "eps": 1e-5},
            position={"kind": "learned", "separate_decoder": True},
            stem={"kind": "tokens", "vocab_size": hf.integer("vocab_size", 50265), "embedding_norm": True,
                  "separate_decoder_norm": True, "scale_embeddings": hf.flag("scale_embedding", False)},
            head=head,
        )

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        architecture = self.architecture_for(config, "bart")
        head = config.head
        if head.kind == "lm" and not head.tie_embeddings:
            raise InteropError("to_hf: head.tie_embeddings: expected true for a BartForConditionalGeneration (untied, "
                               "transformers gives its encoder and decoder token tables of their own), got false")
        if head.kind == "lm" and not head.bias:
            raise InteropError("to_hf: head.bias: expected true for a BartForConditionalGeneration (its "
                               "final_logits_bias), got false")
        return {
            **self.header(config, architecture, "bart"),
            "init_std": config.init_std,
            "vocab_size": config.stem.vocab_size, "d_model": config.width, "max_position_embeddings":
                config.max_seq_len, "encoder_layers": config.num_layers, "decoder_layers": config.decoder_layers,
            "encoder_attention_heads": config.attention.num_heads,
            "decoder_attention_heads": config.attention.num_heads,
            "encoder_ffn_dim": config.feedforward_size, "decoder_ffn_dim": config.feedforward_size,
            "activation_function": hf_name(ACTIVATION_NAMES, config.feedforward.activation, "feedforward.activation",
                                           architecture),
            "dropout": config.dropout, "attention_dropout": config.attention.dropout,
            "activation_dropout": config.feedforward.dropout, "scale_embedding": config.stem.scale_embeddings,
            "is_encoder_decoder": True,
            "is_decoder": False, "decoder_start_token_id": config.decoder_start_token_id,
            # generate's defaults for BART force the end token at the length limit; formerkit's generate does not.
            "forced_eos_token_id": None,
            "tie_word_embeddings": True,
        }

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        rows = config.attention.num_heads * config.head_dim
        rules = [Rule("stem.tokens.weight", (f"{base}shared.weight",)),
                 Rule("positions.weight", (f"{base}encoder.embed_positions.weight",), "offset", (POSITION_OFFSET,)),
                 Rule("decoder_positions.weight", (f"{base}decoder.embed_positions.weight",), "offset",
                      (POSITION_OFFSET,))]
        rules += pair("embedding_norm", f"{base}encoder.layernorm_embedding")
        rules += pair("decoder_embedding_norm", f"{base}decoder.layernorm_embedding")
        for side, depth in (("encoder", config.num_layers), ("decoder", config.decoder_layers)):
            for i in range(depth):
                ours, theirs = f"{side}.blocks.{i}", f"{base}{side}.layers.{i}"
                rules += stack(f"{ours}.attention.qkv", [f"{theirs}.self_attn.{p}_proj" for p in "qkv"],
                               (rows,) * 3, bias=True)
                rules += pair(f"{ours}.attention.out", f"{theirs}.self_attn.out_proj")
                rules += pair(f"{ours}.attention_residual.norm", f"{theirs}.self_attn_layer_norm")
                if side == "decoder":
                    cross = f"{theirs}.encoder_attn"
                    rules += pair(f"{ours}.cross_attention.q", f"{cross}.q_proj")
                    rules += stack(f"{ours}.cross_attention.kv", [f"{cross}.k_proj", f"{cross}.v_proj"], (rows,) * 2,
                                   bias=True)
                    rules += pair(f"{ours}.cross_attention.out", f"{cross}.out_proj")
                    rules += pair(f"{ours}.cross_attention_residual.norm", f"{theirs}.encoder_attn_layer_norm")
                rules += pair(f"{ours}.feedforward.fc_in", f"{theirs}.fc1")
                rules += pair(f"{ours}.feedforward.fc_out", f"{theirs}.fc2")
                rules += pair(f"{ours}.feedforward_residual.norm", f"{theirs}.final_layer_norm")
        if config.head.kind == "lm":
            # final_logits_bias is a [1, vocab] buffer that transformers saves with the weights.
            rules.append(Rule("head.projection.bias", ("final_logits_bias",), "batched"))
        return rules

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        shared = f"{base}shared.weight"
        copies = {f"{base}encoder.embed_tokens.weight": shared, f"{base}decoder.embed_tokens.weight": shared}
        if config.head.kind == "lm":
            copies["lm_head.weight"] = shared
        return copies

