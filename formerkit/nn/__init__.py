"""Parts: attention, masks, positions, norms, feed-forward (dense or a mixture of experts), blocks, stems and
heads; the per-layer context blocks read; token merging for classifiers at inference."""

from formerkit.nn.attention import Attention, attention_weights
from formerkit.nn.block import DropPath, LayerScale, Residual, TransformerBlock
from formerkit.nn.context import LayerContext, StackInput
from formerkit.nn.feedforward import MLP, GatedMLP
from formerkit.nn.heads import ClassificationHead, LMHead, MaskedLMHead, Pooling, RegressionHead
from formerkit.nn.masks import (
    AllOf,
    CausalMask,
    DocumentMask,
    KeyPaddingMask,
    Mask,
    PrefixLMMask,
    SlidingWindowMask,
    TensorMask,
)
from formerkit.nn.moe import MoEFeedForward, Routing
from formerkit.nn.norms import RMSNorm
from formerkit.nn.positions import (
    ALiBiPositions,
    LearnedPositions,
    NoPositions,
    RelativePositions,
    RotaryPositions,
    SinCos2DPositions,
    SinusoidalPositions,
)
from formerkit.nn.stems import ConvTokenizer, LinearStem, PatchEmbedding, TokenEmbedding
from formerkit.nn.tome import TokenMerging, bipartite_soft_matching

__all__ = [
    "ALiBiPositions", "AllOf", "Attention", "CausalMask", "ClassificationHead", "ConvTokenizer", "DocumentMask",
    "DropPath", "GatedMLP", "KeyPaddingMask", "LMHead", "LayerContext", "LayerScale", "LearnedPositions", "LinearStem",
    "MLP", "Mask", "MaskedLMHead", "MoEFeedForward", "NoPositions", "PatchEmbedding", "Pooling", "PrefixLMMask",
    "RMSNorm", "RegressionHead", "RelativePositions", "Residual", "RotaryPositions", "Routing", "SinCos2DPositions",
    "SinusoidalPositions", "SlidingWindowMask", "StackInput", "TensorMask", "TokenEmbedding", "TokenMerging",
    "TransformerBlock", "attention_weights", "bipartite_soft_matching",
]
