"""What a layer reads besides the residual stream: one small object per layer, built once per forward pass.

A block's and an attention layer's forward take ``(x, context)``. The model (``Transformer.prepare``) decides
everything that is the same for a whole pass, or fixed per depth, and hands each layer its ``LayerContext``: which mask
its attention applies, which kind of attention it computes, the rotary tables, the cache rows it writes. A new
per-call input (a conditioning vector, an adapter switch) becomes a field here instead of a keyword argument threaded
through the model, the stack, the block and the attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from formerkit.nn.masks import PreparedMask

if TYPE_CHECKING:
    from formerkit.nn.cache import KVCache, StaticSlots
    from formerkit.nn.tome import TokenMerging

__all__ = ["LayerContext", "StackInput"]


@dataclass(eq=False)
class LayerContext:
    """One layer's share of a forward pass.

    mask: the self-attention mask of this layer (the full mask, its sliding window, blockwise or over a rolling cache,
        or linear attention's form), as ``Transformer.prepare`` chose it for the layer's depth.
    kind: the attention this depth computes: softmax, l2 or linear.
    index: the layer's depth in its stack (a block shared across depths runs at several); names its cache rows.
    rotary: (cos, sin) tables for the queries and keys of this pass (rotary positions), else None.
    cache: a ``KVCache`` (or a compiled step's ``StaticSlots``) when decoding step by step.
    memory, memory_mask: an encoder-decoder's encoder output and the cross-attention mask over it.
    token_keep: [batch, tokens], True for a real token: keeps padding out of mixture-of-experts routing.
    need_weights: return the attention probabilities (computed explicitly, without SDPA).
    drop_path: the depth's stochastic-depth module while training, else None.
    merging: token merging (``formerkit.nn.tome``) for this pass, else None.
    condition: a per-example conditioning vector [batch, dim] for blocks that take one; None for plain models.
    """

    mask: PreparedMask
    kind: str = "softmax"
    index: int = 0
    rotary: tuple[Tensor, Tensor] | None = None
    cache: KVCache | StaticSlots | None = None
    memory: Tensor | None = None
    memory_mask: PreparedMask | None = None
    token_keep: Tensor | None = None
    need_weights: bool = False
    drop_path: nn.Module | None = None
    merging: TokenMerging | None = None
    condition: Tensor | None = None


@dataclass(eq=False)
class StackInput:
    """What ``Transformer.prepare`` hands a stack: the embedded input and each layer's context.

    hidden: [batch, tokens, width], the stem's output with absolute positions, registers and embedding norm applied.
    layers: one ``LayerContext`` per depth of the stack.
    token_keep: [batch, tokens], True for a real token (prefix tokens included), or None when nothing is padded.
    position_ids: the positions the layers use ([batch, tokens]), or None for 0, 1, 2, ...
    condition: the pass's condition vector [batch, dim] (adaLN-Zero: the blocks' and the final norm's modulation),
        or None.
    """

    hidden: Tensor
    layers: tuple[LayerContext, ...]
    token_keep: Tensor | None = None
    position_ids: Tensor | None = None
    condition: Tensor | None = None
