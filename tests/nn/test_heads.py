"""formerkit.nn.heads: the LM head's options against the formulas written out."""

from __future__ import annotations

import torch

import formerkit

from ..conftest import randomize_weights


def test_lm_head_bias_input_scale_and_logit_softcap_follow_their_formulas():
    config = formerkit.ModelConfig(width=16, num_layers=1, attention={"num_heads": 2}, stem={"vocab_size": 11},
                                   head={"bias": True, "scale_input": True, "logit_softcap": 2.0})
    head = randomize_weights(formerkit.build_model(config), seed=0, std=1.0).head.double()
    hidden = torch.randn(2, 3, 16, dtype=torch.float64) * 4
    logits = (hidden / 4.0) @ head.projection.weight.T + head.projection.bias  # 1/sqrt(16) = 1/4
    expected = 2.0 * torch.tanh(logits / 2.0)
    torch.testing.assert_close(head(hidden), expected)
    assert head(hidden).abs().max() < 2.0 < logits.abs().max()  # the cap binds on these inputs
