"""formerkit.nn.block: the residual wiring of a block, against the formulas written out."""

from __future__ import annotations

import pytest
import torch

import formerkit
from formerkit.nn.block import TransformerBlock
from formerkit.nn.context import LayerContext
from formerkit.nn.masks import PreparedMask

from ..conftest import randomize_weights


def _block(parallel):
    config = formerkit.ModelConfig(width=16, num_layers=1, attention={"num_heads": 2}, parallel_residual=parallel,
                                   norm={"kind": "layernorm"}, stem={"vocab_size": 11})
    return randomize_weights(TransformerBlock(config), seed=0).double().eval()


@pytest.mark.parametrize("parallel", ["separate_norms", "shared_norm"])
def test_parallel_block_adds_attention_and_feedforward_of_the_same_input(parallel):
    block = _block(parallel)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    context = LayerContext(PreparedMask(None, True))
    attention_norm = block.attention_residual.norm
    feedforward_norm = attention_norm if parallel == "shared_norm" else block.feedforward_residual.norm
    expected = (x + block.attention(attention_norm(x), context)[0] + block.feedforward(feedforward_norm(x)))
    out, _ = block(x, context)
    torch.testing.assert_close(out, expected)


def test_a_shared_norm_block_has_one_norm_and_a_separate_norms_block_two():
    def norms(block):
        return [name for name, _ in block.named_parameters() if "residual.norm" in name and name.endswith("weight")]

    assert norms(_block("shared_norm")) == ["attention_residual.norm.weight"]
    assert len(norms(_block("separate_norms"))) == 2
    sequential = _block(None)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    context = LayerContext(PreparedMask(None, True))
    after_attention = x + sequential.attention(sequential.attention_residual.norm(x), context)[0]
    expected = after_attention + sequential.feedforward(sequential.feedforward_residual.norm(after_attention))
    torch.testing.assert_close(sequential(x, context)[0], expected)


@pytest.mark.parametrize("parallel", [None, "separate_norms", "shared_norm"])
def test_a_module_beside_the_feedforward_reads_its_input_and_adds_to_its_output(parallel):
    block = _block(parallel)
    beside = torch.nn.Linear(16, 16).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    context = LayerContext(PreparedMask(None, True))
    attention_norm = block.attention_residual.norm
    if parallel is None:
        stream = x + block.attention(attention_norm(x), context)[0]
        feedforward_input = block.feedforward_residual.norm(stream)
    else:
        stream = x + block.attention(attention_norm(x), context)[0]
        feedforward_input = attention_norm(x) if parallel == "shared_norm" else block.feedforward_residual.norm(x)
    expected = stream + block.feedforward(feedforward_input) + beside(feedforward_input)
    block.feedforward_beside = beside
    out, _ = block(x, context)
    torch.testing.assert_close(out, expected)
    assert "feedforward_beside.weight" in dict(block.named_parameters())
