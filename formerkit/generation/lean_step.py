"""The eager decode step: one new token per row through a decoder, with the per-step work of the general forward
pass taken out.

``generate`` without ``compile`` feeds one token per row at every step after the prompt. Through ``model(...)`` each
such step checks its inputs, builds a mask and one ``LayerContext`` per layer, and goes through about sixty module
calls (block, residual, attention, projections, norms, feed-forward), each with its hook checks and attribute lookups
(the bench LM's layers at width 12, where the products cost next to nothing: 0.66 ms per token, against 0.30 through
this step; bench/RESULTS.md, issue 22). What a step of one token after all cached ones needs is far less: its
positions (each row's count of real tokens), no causal mask (the query comes after every key), a key-padding mask
only when some cached slot is padding, and each layer's products. ``LeanStep`` decides once per ``generate`` call,
from the model's structure, how each layer is computed, and then runs only that: plain ``nn.Linear`` and
``nn.LayerNorm`` layers become direct functional calls with their weights looked up once, the residual wiring is the
blocks' own (``Residual.merge``; a plain pre-norm branch is added directly), and any part it does not know (an
RMSNorm, a feed-forward of another kind, a Linear with hooks, as LoRA's) is called as the module it is. It computes
what ``model(token, cache=cache, logits_to_keep=1)`` computes (the tests hold the two equal, and both equal to a
recompute without the cache).

``LeanStep.build`` returns None for what it does not cover, and generation then takes the general forward: sliding
windows over rolling buffers, linear or L2 attention, score biases (ALiBi, relative buckets), cross-attention,
mixtures of experts, conditioned (adaLN) blocks, prefix tuning, adapters beside the feed-forward, forward hooks on
the modules it would skip (or a ``forward`` replaced on such a module), and models in training mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.nn.cache import KVCache
from formerkit.nn.feedforward import MLP, GatedMLP
from formerkit.nn.heads import LMHead, lm_logits
from formerkit.nn.local_attention import grouped_sdpa
from formerkit.nn.positions import LearnedPositions, PositionScheme, apply_rotary
from formerkit.nn.stems import TokenEmbedding

__all__ = ["LeanStep"]


def _hooked(module: nn.Module) -> bool:
    """Forward hooks on ``module``, or a ``forward`` set on the instance (a wrapper put in its place, as a test or a
    profiler does): either way its own call has to run."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_globals

    return bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def _call(module: nn.Module):
    """A function computing ``module(x)``: for a plain ``nn.Linear`` or ``nn.LayerNorm`` without hooks the functional
    call with its weights bound (no module call per step), else the module itself."""
    if not _hooked(module):
        if type(module) is nn.Linear:
            # The step's rows are [batch, features]: the matrix product itself, with the transposed weight made
            # once (what F.linear does per call, as the same addmm).
            transposed, bias = module.weight.t(), module.bias
            if bias is None:
                return lambda x: torch.mm(x, transposed)
            return lambda x: torch.addmm(bias, x, transposed)
        if type(module) is nn.LayerNorm:
            shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
            return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return module


def _plain(residual) -> bool:
    """Whether ``residual.merge(x, out)`` is ``x + out`` in inference: pre-norm, no output norm, no LayerScale."""
    return residual.placement == "pre" and residual.norm_out is None and residual.scale is None


class _Embedding:
    """``Transformer.embed`` of one token per row [batch] at ``positions`` [batch], as rows [batch, width], for a
    token stem of plain embeddings (no token types) with an absolute table or positions that add nothing to the
    input; ``build`` returns None otherwise (the model's own ``embed`` is then called)."""

    def __init__(self, model, scheme):
        stem = model.stem
        self.weight = stem.tokens.weight
        # The stem multiplies by sqrt(width) as a tensor of the activations' dtype: the same rounding here.
        self.scale = None if stem.scale is None else torch.tensor(stem.scale, dtype=self.weight.dtype)
        self.table = scheme.table if type(scheme).encode_input is LearnedPositions.encode_input else None
        self.norm = None if model.embedding_norm is None else _call(model.embedding_norm)

    @classmethod
    def build(cls, model, scheme) -> _Embedding | None:
        stem = model.stem
        # Positions that add nothing to the input (rotary, none), or a learned or sinusoidal table.
        known = type(scheme).encode_input in (PositionScheme.encode_input, LearnedPositions.encode_input)
        if (type(stem) is not TokenEmbedding or stem.token_types is not None or _hooked(stem)
                or type(stem.tokens) is not nn.Embedding or _hooked(stem.tokens) or stem.tokens.max_norm is not None
                or not known or _hooked(scheme) or type(model.embedding_dropout) not in (nn.Dropout, nn.Identity)):
            return None
        return cls(model, scheme)

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        hidden = F.embedding(tokens, self.weight)
        if self.scale is not None:
            hidden = hidden * self.scale
        if self.table is not None:
            hidden = hidden + self.table[positions].to(hidden.dtype)
        return hidden if self.norm is None else self.norm(hidden)  # dropout: none in inference


class _Layer:
    """One depth's step, its parts resolved by ``_call``."""

    def __init__(self, block, index: int):
        attention, feedforward = block.attention, block.feedforward
        self.index = index
        self.attention_residual, self.feedforward_residual = block.attention_residual, block.feedforward_residual
        self.parallel = block.parallel
        # Pre-norm blocks without extras (GPT-2's, LLaMA's) add each branch to the stream directly.
        self.plain = not block.parallel and _plain(self.attention_residual) and _plain(self.feedforward_residual)
        self.attention_norm = _call(self.attention_residual.norm)
        # None: a parallel block whose feed-forward reads the attention's normed input (a shared norm).
        norm = self.feedforward_residual.norm
        self.feedforward_norm = None if norm is None else _call(norm)
        self.qkv, self.out = _call(attention.qkv), _call(attention.out)
        self.heads, self.kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        self.sizes = [self.heads, self.kv_heads, self.kv_heads]
        self.q_norm, self.k_norm = attention.q_norm, attention.k_norm
        self.scale, self.softcap = attention.scale, attention.softcap
        self.direct_sdpa = self.softcap is None and self.heads == self.kv_heads
        # Feed-forward: MLP and GatedMLP written out (in inference neither recomputes nor drops out), else the module.
        self.feedforward = None
        if type(feedforward) in (MLP, GatedMLP) and not _hooked(feedforward):
            self.fc_in, self.fc_out, self.act = _call(feedforward.fc_in), _call(feedforward.fc_out), feedforward.act
            self.gated = type(feedforward) is GatedMLP
        else:
            self.feedforward = feedforward

    @staticmethod
    def supports(block) -> bool:
        attention = block.attention
        return (block.modulation is None and block.cross_attention is None and not block.mixture
                and block.feedforward_beside is None and block.attention_residual.norm is not None
                and (block.parallel or block.feedforward_residual.norm is not None)
                and attention.gaussian is None and attention.key_value_prefix is None and not attention.cross
                and not any(_hooked(module) for module in (block, attention, block.attention_residual,
                                                           block.feedforward_residual)))

    def __call__(self, x: Tensor, cache: KVCache, rotary, attn_mask: Tensor | None) -> Tensor:
        """``TransformerBlock.forward`` for one token per row, in the cache's pass."""
        if self.plain:
            x = x + self._attend(self.attention_norm(x), cache, rotary, attn_mask)
            return x + self._feedforward(self.feedforward_norm(x))
        attention_residual, feedforward_residual = self.attention_residual, self.feedforward_residual
        if self.parallel:  # x + attention(norm(x)) + feedforward(norm'(x)), norm' = norm with a shared norm
            h = self.attention_norm(x)
            out = self._attend(h, cache, rotary, attn_mask)
            feedforward_out = self._feedforward(h if self.feedforward_norm is None else self.feedforward_norm(x))
            return feedforward_residual.merge(attention_residual.merge(x, out), feedforward_out)
        h = x if attention_residual.placement == "post" else self.attention_norm(x)
        x = attention_residual.merge(x, self._attend(h, cache, rotary, attn_mask))
        h = x if feedforward_residual.placement == "post" else self.feedforward_norm(x)
        return feedforward_residual.merge(x, self._feedforward(h))

    def _attend(self, h: Tensor, cache: KVCache, rotary, attn_mask: Tensor | None) -> Tensor:
        """Self-attention of one query per row over the cached keys and its own, written into the cache."""
        batch = h.shape[0]
        # One token: [batch, (heads + 2 kv_heads) * dim] is [batch, heads + 2 kv_heads, 1, dim] without moving
        # anything, and the queries, keys and values are its heads.
        q, k, v = self.qkv(h).view(batch, -1, 1, self.head_dim).split(self.sizes, dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = cache.update(self.index, k, v)
        if self.direct_sdpa:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask, scale=self.scale)
        else:  # grouped keys and values, or soft-capped scores
            out = grouped_sdpa(q, keys, values, attn_mask, 0.0, False, self.scale, self.softcap)
        return self.out(out.view(batch, self.heads * self.head_dim))

    def _feedforward(self, h: Tensor) -> Tensor:
        if self.feedforward is not None:
            return self.feedforward(h)
        if self.gated:
            gate, up = self.fc_in(h).chunk(2, dim=-1)
            return self.fc_out(self.act(gate) * up)
        return self.fc_out(self.act(self.fc_in(h)))


class LeanStep:
    """``model(tokens.view(-1, 1), cache=cache, logits_to_keep=1)[:, -1]`` for a decoder whose cache holds the
    prompt, as a call ``step(tokens)`` -> logits [batch, vocab]; see the module's docstring. Build with ``build``."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        stack = model.decoder
        self.layers = [_Layer(stack.block_at(index), index) for index in range(stack.num_layers)]
        self.final_norm = None if stack.final_norm is None else _call(stack.final_norm)
        self.positions = model.positions_of(stack)
        self.embedding = _Embedding.build(model, self.positions)
        head = model.head
        self.head_scale, self.head_softcap = head.input_scale, head.logit_softcap
        self.projection = _call(head.projection)

    @classmethod
    def build(cls, model, cache: KVCache) -> LeanStep | None:
        """The step for ``model`` and ``cache``, or None where generation should take the general forward."""
        config = model.config
        if config.arch != "decoder" or model.training or _global_hooks():
            return None
        stack = model.decoder
        if (type(model.head) is not LMHead or model.conditioning is not None or stack.final_modulation is not None
                or any(cache.rolling) or any(kind != "full" for kind in stack.mask_kinds)
                or any(kind != "softmax" for kind in stack.kinds) or model.positions_of(stack).uses_bias
                or config.position.rope_scaling == "longrope"):
            return None
        skipped = [model, stack, model.head] + ([stack.final_norm] if stack.final_norm is not None else [])
        if any(_hooked(module) for module in skipped):
            return None
        if not all(_Layer.supports(stack.block_at(index)) for index in range(stack.num_layers)):
            return None
        return cls(model, cache)

    def __call__(self, tokens: Tensor) -> Tensor:
        """Logits [batch, vocab] of one new token per row (``tokens`` [batch]), whose keys and values join the cache.
        One pass of the cache's own (``begin`` / ``update`` / ``commit``, as the forward pass takes it): the cache's
        length advances only once every layer has run (a failed step leaves it as it was)."""
        cache = self.cache
        if cache.length >= cache.max_length:
            raise RuntimeError(f"KVCache: a step past the cache's max_length {cache.max_length}")
        positions = cache.begin(None, 1)  # each row's count of real tokens
        try:
            logits = self._logits(tokens, positions)
        except BaseException:
            cache.abort()
            raise
        cache.commit()
        return logits

    def _logits(self, tokens: Tensor, positions: Tensor) -> Tensor:
        cache = self.cache
        if self.embedding is not None:
            hidden = self.embedding(tokens, positions.view(-1))
        else:
            hidden, _ = self.model.embed(tokens.view(-1, 1), position_ids=positions)
            hidden = hidden.view(hidden.shape[0], hidden.shape[2])  # [batch, width]: one token per row
        rotary = self.positions.rotary(positions, 1)
        if rotary is not None:
            rotary = (rotary[0].to(hidden.dtype), rotary[1].to(hidden.dtype))
        # The query comes after every cached key: only padding among them is masked.
        keep = cache.key_keep()
        attn_mask = None
        if keep is not None:  # additive once per step: SDPA would turn a boolean mask into this in every layer
            attn_mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=keep.device).masked_fill_(
                ~keep, float("-inf")).view(cache.batch_size, 1, 1, -1)
        for layer in self.layers:
            hidden = layer(hidden, cache, rotary, attn_mask)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return lm_logits(hidden, self.projection, self.head_scale, self.head_softcap)

