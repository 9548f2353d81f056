"""Activation checkpointing of whole blocks (``Transformer.set_activation_checkpointing``, the recipe's
``run.activation_checkpointing``): the same gradients as the plain model, each block run again in the backward pass."""

from __future__ import annotations

import pytest
import torch

import formerkit
from formerkit import ModelConfig
from formerkit.adapt import METHODS
from formerkit.nn.block import TransformerBlock
from formerkit.train import train

from ..conftest import randomize_weights


def make_model(**overrides) -> formerkit.Transformer:
    config = ModelConfig(arch="decoder", width=16, num_layers=3, max_seq_len=16, dropout=0.1, drop_path=0.2,
                         attention={"num_heads": 2, "dropout": 0.1}, position={"kind": "rope"},
                         stem={"kind": "tokens", "vocab_size": 19}, head={"kind": "lm"})
    if overrides:
        config = config.replace(**overrides)
    torch.manual_seed(0)
    return randomize_weights(formerkit.build_model(config), 0, std="fan_in").double().train()


def gradients(model, ids, mask) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout and stochastic-depth draws in both runs
    output = model(ids, attention_mask=mask, return_outputs=True)
    loss = output.logits.square().mean()
    if output.aux_loss is not None:
        loss = loss + output.aux_loss
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [
    {},
    {"feedforward.num_experts": 4, "feedforward.experts_per_token": 2},  # mixture-of-experts routing rerun in backward
    {"num_unique_layers": 1},                                # one block at every depth
])
def test_checkpointed_gradients_equal_the_plain_ones_with_dropout_and_stochastic_depth(overrides):
    model = make_model(**overrides)
    ids = torch.randint(0, 19, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    plain = gradients(model, ids, mask)
    model.set_activation_checkpointing(True)
    checkpointed = gradients(model, ids, mask)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-12, atol=1e-12, msg=name)


def test_each_block_runs_again_in_the_backward_pass_and_only_while_training(monkeypatch):
    model = make_model()
    calls = []
    forward = TransformerBlock.forward

    def counted(self, *args):  # (the recompute runs no module hooks, so the forward itself counts)
        calls.append(1)
        return forward(self, *args)

    monkeypatch.setattr(TransformerBlock, "forward", counted)
    ids = torch.randint(0, 19, (2, 8))
    model.set_activation_checkpointing(True)
    loss = model(ids).sum()
    assert len(calls) == 3
    loss.backward()
    assert len(calls) == 6  # recomputed: the activations inside the blocks were not kept
    calls.clear()
    model.eval()
    model(ids).sum().backward()
    assert len(calls) == 3


def test_checkpointing_with_adapters_gives_the_adapters_the_same_gradients():
    model = make_model(dropout=0.0, drop_path=0.0, **{"attention.dropout": 0.0})
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    METHODS["adapter"](model, targets=None, layers=None, name="default", bottleneck=3)
    METHODS["prefix"](model, targets=None, layers=None, name="default", num_virtual_tokens=2)
    ids = torch.randint(0, 19, (2, 8))
    plain = gradients(model, ids, None)
    model.set_activation_checkpointing(True)
    checkpointed = gradients(model, ids, None)
    assert len(plain) == 3 * 5
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.slow
def test_a_recipe_with_activation_checkpointing_trains_to_the_same_weights(tiny, tmp_path):
    plain = train("char-lm", tmp_path / "plain", overrides=tiny("char-lm", **{"model.dropout": 0.1}))
    checkpointed = train("char-lm", tmp_path / "checkpointed",
                         overrides=tiny("char-lm", **{"model.dropout": 0.1, "run.activation_checkpointing": True}))
    assert checkpointed.model.decoder.activation_checkpointing and not plain.model.decoder.activation_checkpointing
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), checkpointed.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
