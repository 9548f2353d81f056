"""Causal linear attention over packed documents (formerkit.nn.document_linear_attention): outputs and gradients
against the quadratic form under the causal, same-document (and padding) mask, and through a model."""

from __future__ import annotations

import pytest
import torch

import formerkit
from formerkit.nn.attention import Attention
from formerkit.nn.document_linear_attention import document_runs
from formerkit.nn.linear_attention import linear_attention, quadratic_form
from formerkit.nn.masks import DocumentMask

from ..conftest import token_config


def packed_ids(lengths_per_row):
    return torch.stack([torch.cat([torch.full((n,), doc, dtype=torch.long) for doc, n in enumerate(lengths)])
                        for lengths in lengths_per_row])


@pytest.mark.parametrize("chunk", [4, 16, 64])  # documents across many chunks, a few, or all in one
def test_document_linear_attention_and_its_gradients_equal_the_quadratic_form(chunk):
    # Documents of 1, 2, 30, ... tokens; row 1 starts with padding (no key seen by its first queries).
    ids = packed_ids([[1, 2, 30, 7, 1, 19], [23, 3, 11, 1, 22]])
    length = ids.shape[1]
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, length, d, generator=generator, dtype=torch.float64, requires_grad=True)
            for d in (8, 6))
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, :9] = False
    grad = torch.randn(2, 4, length, 6, generator=generator, dtype=torch.float64)
    runs = document_runs(ids)
    out = linear_attention(q, k, v, causal=True, key_keep=keep, chunk=chunk, document_runs=runs)
    allowed = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
               & keep[:, None, :]).unsqueeze(1)
    expected = quadratic_form(q, k, v, allowed)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_document_runs_number_contiguous_documents_and_refuse_interrupted_ones():
    ids = torch.tensor([[4, 4, 9, 9, 9, 2], [0, 0, 0, 0, 1, 1]])
    assert document_runs(ids).tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    assert document_runs(torch.tensor([[4, 4, 9, 4]])) is None  # document 4 is interrupted by 9


def test_linear_model_under_a_document_mask_takes_the_linear_form_and_equals_the_dense_one(randomize, monkeypatch):
    length = 70
    config = token_config("decoder", vocab_size=29, width=32, max_seq_len=length, num_heads=4,
                          attention={"kind": "linear"}, position="rope", head="lm")
    model = formerkit.Transformer(config).double().eval()
    randomize(model, 0)
    tokens = torch.randint(0, 29, (2, length), generator=torch.Generator().manual_seed(1))
    ids = packed_ids([[20, 1, 49], [35, 35]])
    forms = []
    original = Attention._linear
    monkeypatch.setattr(Attention, "_linear", lambda self, q, k, v, mask: (
        forms.append(mask.document_runs is not None and mask.value is None), original(self, q, k, v, mask))[1])
    linear = model(tokens, mask=DocumentMask(ids))
    # The same documents as a dense boolean mask: the quadratic form.
    dense = model(tokens, mask=(ids[:, :, None] == ids[:, None, :]).unsqueeze(1))
    assert forms == [True] * config.num_layers + [False] * config.num_layers
    torch.testing.assert_close(linear, dense, rtol=1e-10, atol=1e-10)
