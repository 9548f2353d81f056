"""Blockwise window attention over band views of the keys (formerkit.nn.banded_attention): outputs and gradients
against dense attention under the same banded mask, written out in float64, on the paths the chunks take (a chunk
of blocks that all share the middle block's mask reads only that block's triangles; others read their own slice)."""

from __future__ import annotations

import pytest
import torch

from formerkit.nn import banded_attention
from formerkit.nn.attention import attention_weights
from formerkit.nn.local_attention import blockwise_attention
from formerkit.nn.masks import (
    CausalMask,
    DocumentMask,
    KeyPaddingMask,
    SlidingWindowMask,
    prepare_attention_mask,
    prepare_blocked_mask,
)


@pytest.fixture(autouse=True)
def nan_filled_one_thread():
    """Every tensor the attention allocates without initializing starts as NaN (so a gradient row no product wrote
    shows), and one thread, so ``CHUNK_ELEMENTS`` (per thread) sets the blocks per chunk each test means."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def dense(q, k, v, mask, length, bias=None):
    prepared = prepare_attention_mask(mask, length, length, bias=bias)
    out, _ = attention_weights(q, k, v, prepared.value, False)
    return out if prepared.empty_rows is None else out.masked_fill(prepared.empty_rows, 0.0)


def inputs(batch, heads, kv_heads, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    return q, k, v, torch.randn(batch, heads, length, 8, generator=generator, dtype=torch.float64)


# chunk_blocks 1: one block per chunk, so most chunks share the middle block's mask; more: chunks mix both kinds.
@pytest.mark.parametrize("causal,window,length,batch,kv_heads,chunk_blocks", [
    (True, 70, 400, 2, 2, 1), (True, 70, 400, 2, 2, 100), (False, 30, 330, 1, 4, 1), (True, 64, 256, 3, 1, 2),
    (True, 200, 451, 1, 4, 3)])
def test_banded_attention_and_its_gradients_equal_dense_attention_under_the_band(
        monkeypatch, causal, window, length, batch, kv_heads, chunk_blocks):
    q, k, v, grad = inputs(batch, 4, kv_heads, length)
    local = SlidingWindowMask(window)
    mask = CausalMask() & local if causal else local
    blocked = prepare_blocked_mask(mask, length, window).blocked
    assert banded_attention.band_fits(blocked)
    span = blocked.before + blocked.block + blocked.after
    monkeypatch.setattr(banded_attention, "CHUNK_ELEMENTS", chunk_blocks * blocked.block * span)
    out = blockwise_attention(q, k, v, blocked)
    expected = dense(q, k, v, mask, length)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_banded_attention_under_documents_padding_and_alibi_equals_dense(monkeypatch):
    from formerkit.nn.positions import ALiBiPositions

    length, window, batch = 300, 40, 2
    q, k, v, grad = inputs(batch, 4, 2, length, seed=3)
    ids = torch.zeros(batch, length, dtype=torch.long)
    ids[0, 90:] = 1
    ids[0, 93:] = 2  # a three-token document
    ids[1, 250:] = 1
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[1, :70] = False  # the first queries of row 1 see no key
    mask = CausalMask() & DocumentMask(ids) & KeyPaddingMask(keep) & SlidingWindowMask(window)
    positions = torch.arange(length).unsqueeze(0)
    slopes = ALiBiPositions(4)

    def bias(query, key):
        return slopes.attention_bias(positions[:, query.clamp(0, length - 1)], positions[:, key.clamp(0, length - 1)])

    blocked = prepare_blocked_mask(mask, length, window, bias=bias).blocked
    monkeypatch.setattr(banded_attention, "CHUNK_ELEMENTS", 2 * blocked.block * (blocked.before + blocked.block))
    out = blockwise_attention(q, k, v, blocked)
    expected = dense(q, k, v, mask, length, bias=slopes.attention_bias(positions, positions))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_blocks_after_the_first_window_share_the_middle_blocks_mask():
    # Window 129: each query sees itself and 128 keys back, two whole blocks, so the span is three blocks; the first
    # two blocks' windows reach before the sequence, every later block's mask is the same band.
    window, length = 129, 64 * 8
    blocked = prepare_blocked_mask(CausalMask() & SlidingWindowMask(window), length, window).blocked
    masks = banded_attention._Masks(blocked, torch.float32, length // blocked.block)
    block = blocked.block
    assert blocked.before == 2 * block
    assert masks.same[0][0] == [False, False, True, True, True, True, True, True]
    query, key = torch.arange(block).unsqueeze(1), torch.arange(3 * block).unsqueeze(0) - 2 * block
    band = (key <= query) & (query - key < window)
    expected = torch.zeros(block, 3 * block).masked_fill(~band, float("-inf"))
    torch.testing.assert_close(masks.common[0, 0], expected)
