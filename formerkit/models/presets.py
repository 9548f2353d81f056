"""The built-in presets: published models reproduced exactly (their parameter counts are pinned in the tests), and
small models sized to train on a laptop CPU.

Presets are data: each function returns a ModelConfig, and families share a helper instead of repeating fields.
"""

from __future__ import annotations

from formerkit.config import (
    AttentionConfig,
    FeedForwardConfig,
    HeadConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    StemConfig,
)
from formerkit.models.registry import register_model


def _gpt(width: int, num_layers: int, num_heads: int, vocab_size: int, max_seq_len: int) -> ModelConfig:
    """GPT-2's layout: pre-norm LayerNorm, learned positions, tanh-GELU MLP x4, tied LM head."""
    return ModelConfig(
        arch="decoder", width=width, num_layers=num_layers, max_seq_len=max_seq_len,
        attention=AttentionConfig(num_heads=num_heads),
        feedforward=FeedForwardConfig(activation="gelu_tanh"),
        norm=NormConfig(kind="layernorm", placement="pre", eps=1e-5),
        position=PositionConfig(kind="learned"),
        stem=StemConfig(kind="tokens", vocab_size=vocab_size),
        head=HeadConfig(kind="lm", tie_embeddings=True),
    )


@register_model("gpt2", "GPT-2 small (Radford et al., 2019): 12 layers, width 768, 12 heads, tied head")
def gpt2() -> ModelConfig:
    return _gpt(768, 12, 12, 50257, 1024)


@register_model("char_gpt", "Byte-level decoder sized for a CPU: 4 layers, width 256, 4 heads, context 256")
def char_gpt() -> ModelConfig:
    return _gpt(256, 4, 4, 256, 256).replace(dropout=0.1)


@register_model("nanogpt_shakespeare_char",
                "nanoGPT's shakespeare-char decoder: 6 layers, width 384, 6 heads, context 256, vocab 65")
def nanogpt_shakespeare_char() -> ModelConfig:
    # nanoGPT's train_shakespeare_char config: exact GELU, dropout 0.2, and no biases in linear layers or norms.
    return _gpt(384, 6, 6, 65, 256).replace(
        dropout=0.2, attention={"qkv_bias": False, "out_bias": False},
        feedforward={"activation": "gelu", "bias": False}, norm={"bias": False})


@register_model("llama_tiny", "Small LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head")
def llama_tiny() -> ModelConfig:
    return ModelConfig(
        arch="decoder", width=512, num_layers=8, max_seq_len=2048,
        attention=AttentionConfig(num_heads=8, num_kv_heads=2, qkv_bias=False, out_bias=False),
        feedforward=FeedForwardConfig(activation="swiglu", hidden_size=1376, bias=False),
        norm=NormConfig(kind="rmsnorm", placement="pre", eps=1e-5),
        position=PositionConfig(kind="rope", rope_base=10000.0),
        stem=StemConfig(kind="tokens", vocab_size=32000),
        head=HeadConfig(kind="lm", tie_embeddings=False),
    )


def _bert(width: int, num_layers: int, num_heads: int, head: HeadConfig) -> ModelConfig:
    """BERT's layout: post-norm LayerNorm (eps 1e-12), learned positions, token types, norm on the embeddings."""
    return ModelConfig(
        arch="encoder", width=width, num_layers=num_layers, max_seq_len=512, dropout=0.1,
        attention=AttentionConfig(num_heads=num_heads, dropout=0.1),
        feedforward=FeedForwardConfig(activation="gelu"),
        norm=NormConfig(kind="layernorm", placement="post", eps=1e-12),
        position=PositionConfig(kind="learned"),
        stem=StemConfig(kind="tokens", vocab_size=30522, num_token_types=2, embedding_norm=True),
        head=head,
    )


@register_model("bert_base", "BERT-base (Devlin et al., 2019) encoder with its pooler, no task head")
def bert_base() -> ModelConfig:
    return _bert(768, 12, 12, HeadConfig(kind="none", pooler=True, pooling="cls"))


@register_model("bert_base_mlm", "BERT-base with its masked-LM head (tied to the token embedding)")
def bert_base_mlm() -> ModelConfig:
    return _bert(768, 12, 12, HeadConfig(kind="masked_lm", tie_embeddings=True))


def _vit(width: int, num_layers: int, num_heads: int, image_size: int = 224, patch_size: int = 16,
         num_classes: int = 1000) -> ModelConfig:
    """ViT's layout: patch embedding with a class token, learned positions, pre-norm LayerNorm (eps 1e-6)."""
    return ModelConfig(
        arch="encoder", width=width, num_layers=num_layers, max_seq_len=None,
        attention=AttentionConfig(num_heads=num_heads),
        feedforward=FeedForwardConfig(activation="gelu"),
        norm=NormConfig(kind="layernorm", placement="pre", eps=1e-6),
        position=PositionConfig(kind="learned"),
        stem=StemConfig(kind="patches", image_size=(image_size, image_size), patch_size=patch_size, class_token=True),
        head=HeadConfig(kind="classification", num_classes=num_classes, pooling="cls"),
    )


@register_model("vit_tiny_patch16_224", "ViT-Ti/16 (Touvron et al., DeiT): width 192, 12 layers, 3 heads, 224x224")
def vit_tiny_patch16_224() -> ModelConfig:
    return _vit(192, 12, 3)


@register_model("vit_small_patch16_224", "ViT-S/16: width 384, 12 layers, 6 heads, 224x224")
def vit_small_patch16_224() -> ModelConfig:
    return _vit(384, 12, 6)


@register_model("vit_base_patch16_224", "ViT-B/16 (Dosovitskiy et al., 2021): width 768, 12 layers, 12 heads, 224x224")
def vit_base_patch16_224() -> ModelConfig:
    return _vit(768, 12, 12)


def _cct(num_layers: int, num_heads: int, width: int, mlp_ratio: float, conv_layers: int, image_size: int = 32,
         num_classes: int = 10) -> ModelConfig:
    """Compact Convolutional Transformer (Hassani et al., 2021): convolutional tokenizer, learned positions,
    pre-norm blocks without query/key/value bias, sequence pooling, stochastic depth 0.1."""
    return ModelConfig(
        arch="encoder", width=width, num_layers=num_layers, max_seq_len=None, drop_path=0.1,
        attention=AttentionConfig(num_heads=num_heads, qkv_bias=False, dropout=0.1),
        feedforward=FeedForwardConfig(activation="gelu", ratio=mlp_ratio),
        norm=NormConfig(kind="layernorm", placement="pre", eps=1e-5),
        position=PositionConfig(kind="learned"),
        stem=StemConfig(kind="conv", image_size=(image_size, image_size), conv_layers=conv_layers, conv_kernel=3,
                        conv_channels=64),
        head=HeadConfig(kind="classification", num_classes=num_classes, pooling="sequence"),
    )


@register_model("cct_2_3x2_32", "CCT-2/3x2 for 32x32 images: 2 layers, width 128, 2 conv layers, 10 classes")
def cct_2_3x2_32() -> ModelConfig:
    return _cct(2, 2, 128, 1.0, 2)


@register_model("cct_7_3x1_32", "CCT-7/3x1 for 32x32 images: 7 layers, width 256, 1 conv layer, 10 classes")
def cct_7_3x1_32() -> ModelConfig:
    return _cct(7, 4, 256, 2.0, 1)
