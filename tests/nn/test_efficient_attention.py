"""Local (blockwise), linear and L2 attention, the Gaussian-mixture and soft-causal masks: each against its exact
reference (dense masked attention written out, or the quadratic form of linear attention), at the level of the
attention function and through whole models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import formerkit
from formerkit import ConfigError
from formerkit.nn import attention as attention_module
from formerkit.nn.attention import Attention, GaussianMixtureMask, attention_weights
from formerkit.nn.context import LayerContext
from formerkit.nn.linear_attention import feature_map, linear_attention, quadratic_form
from formerkit.nn.masks import (
    CausalMask,
    KeyPaddingMask,
    PreparedMask,
    SlidingWindowMask,
    SoftCausalMask,
    prepare_attention_mask,
    prepare_blocked_mask,
)

from ..conftest import image_config, token_config

VOCAB, WIDTH, HEADS = 29, 32, 4


def token_model(randomize, *, arch="decoder", position="rope", length=256, seed=0, **attention):
    config = token_config(arch, vocab_size=VOCAB, width=WIDTH, max_seq_len=length, num_heads=HEADS,
                          attention=attention, position=position, head="lm" if arch == "decoder" else "none")
    model = formerkit.Transformer(config).double().eval()
    randomize(model, seed)
    return model


def tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding(batch, length, pads):
    keep = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        keep[row, :pad] = 0
    return keep


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(Attention, name)

    def spy(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attention, name, spy)
    return calls


# ----- blockwise local attention -----


def dense_window_reference(q, k, v, mask, length, window, global_tokens=0, causal=True, bias=None):
    full = SlidingWindowMask(window, global_tokens) if mask is None else mask & SlidingWindowMask(window, global_tokens)
    if causal:
        full = CausalMask() & full
    prepared = prepare_attention_mask(full, length, length, bias=bias)
    out, _ = attention_weights(q, k, v, prepared.value, False)
    return out if prepared.empty_rows is None else out.masked_fill(prepared.empty_rows, 0.0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,length,global_tokens", [(5, 150, 0), (64, 300, 0), (7, 200, 3), (70, 150, 2)])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("batch", [2, 1])  # one sequence reads its windows as views, several gather them
def test_blockwise_window_equals_dense_banded_attention(causal, window, length, global_tokens, kv_heads, batch):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, length, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, length, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[-1, :11] = False  # the last row is left-padded: its first queries see no key at all
    mask = KeyPaddingMask(keep)
    local = mask & SlidingWindowMask(window, global_tokens)
    prepared = prepare_blocked_mask(CausalMask() & local if causal else local, length, window,
                                    global_tokens=global_tokens)
    assert prepared.blocked is not None and prepared.value is None
    module = Attention(32, 4, kv_heads, 8).double()
    out = module._blockwise(q, k, v, prepared.blocked, 0.0, None)
    expected = dense_window_reference(q, k, v, mask, length, window, global_tokens, causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal,global_tokens,kv_heads,alibi,batch", [
    (True, 0, 4, False, 2), (False, 2, 2, False, 2), (True, 3, 1, True, 2), (False, 0, 4, True, 2),
    (True, 0, 2, False, 1), (False, 0, 4, True, 1)])
def test_blockwise_backward_equals_autograd_through_the_same_computation(monkeypatch, causal, global_tokens,
                                                                         kv_heads, alibi, batch):
    from formerkit.nn import local_attention
    from formerkit.nn.positions import ALiBiPositions

    length, window = 150, 9
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(batch, 4, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[0, :20] = False
    mask = KeyPaddingMask(keep) & SlidingWindowMask(window, global_tokens)
    positions = torch.arange(length).unsqueeze(0)
    slopes = ALiBiPositions(4)
    bias = ((lambda qi, ki: slopes.attention_bias(positions[:, qi.clamp(0, length - 1)],
                                                   positions[:, ki.clamp(0, length - 1)])) if alibi else None)
    prepared = prepare_blocked_mask(CausalMask() & mask if causal else mask, length, window,
                                    global_tokens=global_tokens, bias=bias)
    grad = torch.randn(batch, 4, length, 8, generator=generator, dtype=torch.float64)
    results = []
    for reference in (False, True):
        if reference:  # the same blocks in one SDPA call, differentiated by autograd
            monkeypatch.setattr(local_attention._LocalAttention, "apply",
                                lambda q, k, v, blocked, scale: local_attention._local_with_autograd(
                                    q, k, v, blocked, 0.0, scale))
        out = local_attention.blockwise_attention(q, k, v, prepared.blocked)
        results.append((out.detach(), torch.autograd.grad(out, (q, k, v), grad)))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("global_tokens,kv_heads", [(0, 4), (2, 2)])
def test_softcapped_blockwise_window_equals_dense_capped_attention_and_its_gradients(global_tokens, kv_heads):
    """Gemma 2's capped scores on the blockwise path: forward and gradients equal dense attention with the cap
    written out (attention_weights) under the materialized window mask."""
    length, window, cap = 150, 7, 1.5
    generator = torch.Generator().manual_seed(8)
    q = 2 * torch.randn(2, 4, length, 8, generator=generator, dtype=torch.float64)
    k, v = (2 * torch.randn(2, kv_heads, length, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, :12] = False
    mask = CausalMask() & KeyPaddingMask(keep) & SlidingWindowMask(window, global_tokens)
    blocked = prepare_blocked_mask(mask, length, window, global_tokens=global_tokens).blocked
    dense = prepare_attention_mask(mask, length, length)
    grad = torch.randn(2, 4, length, 8, generator=generator, dtype=torch.float64)
    results = []
    for path in ("blockwise", "dense"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        if path == "blockwise":
            out = Attention(32, 4, kv_heads, 8, softcap=cap).double()._blockwise(*inputs, blocked, 0.0, 0.3)
        else:
            out, _ = attention_weights(*inputs, dense.value, False, scale=0.3, softcap=cap)
            out = out.masked_fill(dense.empty_rows, 0.0)
        results.append((out.detach(), torch.autograd.grad(out, inputs, grad)))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    uncapped, _ = attention_weights(q, k, v, dense.value, False, scale=0.3)
    assert (uncapped.masked_fill(dense.empty_rows, 0.0) - expected).abs().max() > 1e-2


def test_blocked_mask_memory_grows_with_length_times_window_not_length_squared():
    window, length = 16, 4096
    prepared = prepare_blocked_mask(CausalMask() & SlidingWindowMask(window), length, window)
    # Every block holds [block, reach + block] entries, the window's reach (window - 1) rounded up to whole blocks:
    # length x (block + reach) in all, far below length^2.
    block = prepared.blocked.block
    reach = -(-(window - 1) // block) * block
    assert prepared.blocked.before == reach
    assert prepared.blocked.value.numel() == length * (block + reach)
    assert prepared.blocked.value.numel() * 20 < length * length


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "relative"])
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_model_with_window_uses_blocks_on_long_inputs_and_equals_the_dense_computation(
        randomize, monkeypatch, position, arch):
    length, window = 200, 6
    model = token_model(randomize, arch=arch, position=position, length=length, sliding_window=window,
                        global_tokens=2 if arch == "encoder" else 0)
    ids = tokens(2, length)
    keep = left_padding(2, length, [0, 9])
    calls = count_calls(monkeypatch, "_blockwise")
    blockwise = model(ids, attention_mask=keep)
    assert len(calls) == 2  # both layers went block by block
    # output_attentions computes every layer densely (probabilities written out under the materialized mask).
    dense = model(ids, attention_mask=keep, output_attentions=True).logits
    assert len(calls) == 2
    torch.testing.assert_close(blockwise, dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_blockwise_window_gradients_equal_the_dense_ones(randomize, position):
    # relative: T5's learned bias table is trained through the window's mask too.
    length, window = 160, 5
    model = token_model(randomize, length=length, sliding_window=window, position=position)
    ids = tokens(1, length)
    grads = []
    for dense in (False, True):
        model.zero_grad()
        output = model(ids, output_attentions=dense, return_outputs=True).logits
        output.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for blockwise, dense in zip(*grads):
        torch.testing.assert_close(blockwise, dense, rtol=1e-8, atol=1e-10)


def test_window_larger_than_the_sequence_falls_back_to_full_attention(randomize):
    windowed = token_model(randomize, length=64, sliding_window=64)
    plain = token_model(randomize, length=64)
    plain.load_state_dict(windowed.state_dict())
    ids = tokens(2, 20)
    torch.testing.assert_close(windowed(ids), plain(ids), rtol=0, atol=0)


@pytest.mark.parametrize("window", [0, -3])
def test_window_below_one_is_a_config_error(window):
    with pytest.raises(ConfigError, match="attention.sliding_window"):
        token_config(vocab_size=VOCAB, width=WIDTH, num_layers=1, max_seq_len=8, num_heads=HEADS,
                     attention={"sliding_window": window})


def test_global_tokens_need_a_window():
    with pytest.raises(ConfigError, match="attention.global_tokens: .*0 when attention.sliding_window is null"):
        token_config("encoder", vocab_size=VOCAB, width=WIDTH, num_layers=1, max_seq_len=8, num_heads=HEADS,
                     attention={"global_tokens": 2})


# ----- linear attention -----


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length,chunk", [(100, 16), (64, 64), (5, 16)])
def test_linear_attention_equals_its_quadratic_form(causal, length, chunk):
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, length, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 2, length, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[0, : length // 3] = False
    allowed = keep[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    out = linear_attention(q, k, v, causal=causal, key_keep=keep, chunk=chunk)
    torch.testing.assert_close(out, quadratic_form(q, k, v, allowed), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("group_elements", [3000, 2**21])  # many groups of chunks, or one
@pytest.mark.parametrize("length,chunk", [(150, 16), (64, 64), (5, 16)])
def test_causal_linear_attention_gradients_equal_those_of_the_quadratic_form(monkeypatch, group_elements, length,
                                                                             chunk):
    from formerkit.nn import linear_attention as module

    monkeypatch.setattr(module, "GROUP_ELEMENTS", group_elements)
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, length, d, generator=generator, dtype=torch.float64, requires_grad=True)
            for d in (8, 6))
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, : length // 3 + 1] = False  # its first queries see no key at all
    grad = torch.randn(2, 4, length, 6, generator=generator, dtype=torch.float64)
    out = linear_attention(q, k, v, causal=True, key_keep=keep, chunk=chunk)
    allowed = keep[:, None, None, :] & torch.ones(length, length, dtype=torch.bool).tril()
    expected = quadratic_form(q, k, v, allowed)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert not want.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_quadratic_form_is_the_normalized_kernel_written_out():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    out = quadratic_form(q, k, v, torch.ones(4, 4, dtype=torch.bool).tril())
    for i in range(4):
        weights = [float(F.elu(q[0, 0, i]).add(1) @ F.elu(k[0, 0, j]).add(1)) for j in range(i + 1)]
        expected = sum(w * v[0, 0, j] for j, w in enumerate(weights)) / sum(weights)
        torch.testing.assert_close(out[0, 0, i], expected)
    # elu(x) + 1: exp(x) for x <= 0, x + 1 above, so positive everywhere.
    torch.testing.assert_close(feature_map(torch.tensor([-5.0, 0.0, 2.0])), torch.tensor([math.exp(-5.0), 1.0, 3.0]))


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_linear_model_fast_path_equals_its_quadratic_form_under_the_same_mask(randomize, monkeypatch, position):
    # A user mask that allows everything forces the quadratic form; without it the linear-time form runs.
    length = 90
    model = token_model(randomize, position=position, length=length, kind="linear", kind_layers=[1])
    ids, keep = tokens(2, length), left_padding(2, length, [0, 13])
    calls = count_calls(monkeypatch, "_linear")
    fast = model(ids, attention_mask=keep)
    everything = torch.ones(length, length, dtype=torch.bool)
    quadratic = model(ids, attention_mask=keep, mask=everything)
    assert len(calls) == 2  # only layer 1 is linear
    real = keep.bool()
    torch.testing.assert_close(fast[real], quadratic[real], rtol=1e-10, atol=1e-10)


def test_linear_layers_differ_from_softmax_layers(randomize):
    linear = token_model(randomize, length=32, kind="linear")
    softmax = token_model(randomize, length=32)
    softmax.load_state_dict(linear.state_dict())
    ids = tokens(1, 32)
    assert (linear(ids) - softmax(ids)).abs().max() > 1e-3


def test_linear_attention_bad_combinations_are_config_errors():
    def config(position=None, **attention):
        return token_config(vocab_size=VOCAB, width=WIDTH, num_heads=HEADS, attention=attention, position=position)

    with pytest.raises(ConfigError, match="position.kind"):
        config("alibi", kind="linear")
    with pytest.raises(ConfigError, match="attention.sliding_window_layers"):
        config(kind="linear", sliding_window=4)
    with pytest.raises(ConfigError, match="attention.dropout"):
        config(kind="linear", dropout=0.1)
    with pytest.raises(ConfigError, match="attention.kind_layers"):
        config(kind_layers=[0])
    with pytest.raises(ConfigError, match=r"attention.kind_layers: expected layer indices in \[0, 2\)"):
        config(kind="l2", kind_layers=[5])
    # Windows on the softmax layers and linear attention on the others is fine.
    config(kind="linear", kind_layers=[1], sliding_window=4, sliding_window_layers=[0])


# ----- L2 attention -----


def l2_reference(q, k, v, allowed=None):
    scores = -((q.unsqueeze(-2) - k.unsqueeze(-3)) ** 2).sum(-1) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v, scores.softmax(-1)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_l2_attention_equals_softmax_of_minus_squared_distances(need_weights, causal, randomize):
    module = randomize(Attention(WIDTH, HEADS, HEADS, 8, qkv_bias=True).double(), 3, std=0.5)
    x = torch.randn(2, 7, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    prepared = PreparedMask(is_causal=causal)
    out, weights = module(x, LayerContext(prepared, need_weights=need_weights, kind="l2"))
    q, k, v = module.project(x)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril() if causal else None
    expected, probabilities = l2_reference(q, k, v, allowed)
    expected = module.out(expected.transpose(1, 2).reshape(2, 7, WIDTH))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if need_weights:
        torch.testing.assert_close(weights, probabilities)


def test_l2_model_with_blockwise_window_equals_dense(randomize, monkeypatch):
    model = token_model(randomize, length=180, kind="l2", sliding_window=9)
    ids = tokens(2, 180)
    calls = count_calls(monkeypatch, "_blockwise")
    blockwise = model(ids)
    assert calls
    torch.testing.assert_close(blockwise, model(ids, output_attentions=True).logits, rtol=1e-9, atol=1e-9)


# ----- the Gaussian-mixture mask -----


def image_model(randomize, *, kernels=2, class_token=True):
    config = image_config(image_size=[8, 8], width=WIDTH, num_heads=HEADS, attention={"gaussian_mixture": kernels},
                          position={"kind": "learned"}, stem={"class_token": class_token},
                          head={"kind": "classification", "num_classes": 10,
                                "pooling": "cls" if class_token else "mean"})
    model = formerkit.Transformer(config).double().eval()
    randomize(model, 0)
    return model


def test_gaussian_mixture_multiplier_is_the_mixture_of_the_grid_distances():
    mask = GaussianMixtureMask(num_heads=2, kernels=3, grid=(2, 3), prefix_tokens=1).double()
    with torch.no_grad():
        mask.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.3, 0.2, 0.1]))
        mask.sigma.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5, 1.0]))
    multiplier = mask(7)
    coordinates = [(r, c) for r in range(2) for c in range(3)]
    for head in range(2):
        assert torch.all(multiplier[head, 0] == 1) and torch.all(multiplier[head, :, 0] == 1)
        for i, (ri, ci) in enumerate(coordinates):
            for j, (rj, cj) in enumerate(coordinates):
                d2 = (ri - rj) ** 2 + (ci - cj) ** 2
                expected = sum(float(mask.weight[head * 3 + n].detach()) * math.exp(-d2 / (2 * float(
                    mask.sigma[head * 3 + n].detach()) ** 2 + 1e-6)) for n in range(3))
                assert multiplier[head, i + 1, j + 1].item() == pytest.approx(expected, rel=1e-9)


def test_gaussian_mixture_attention_multiplies_the_scores_before_softmax(randomize):
    model = image_model(randomize)
    attention = model.encoder.blocks[0].attention
    x = torch.randn(2, 17, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, weights = attention(x, LayerContext(PreparedMask(), need_weights=True))
    q, k, v = attention.project(x)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) * attention.gaussian(17)
    expected = attention.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, WIDTH))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # The mask is learned: the loss reaches its parameters.
    model(torch.randn(2, 1, 8, 8, dtype=torch.float64)).sum().backward()
    assert attention.gaussian.weight.grad.abs().sum() > 0 and attention.gaussian.sigma.grad.abs().sum() > 0


def test_gaussian_mixture_needs_an_image_stem():
    with pytest.raises(ConfigError, match="attention.gaussian_mixture"):
        token_config("encoder", vocab_size=VOCAB, width=WIDTH, num_layers=1, max_seq_len=8, num_heads=HEADS,
                     attention={"gaussian_mixture": 2})


# ----- the soft causal mask -----


@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_soft_causal_mask_scales_the_weight_of_later_keys_by_one_minus_strength(strength):
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    prepared = prepare_attention_mask(SoftCausalMask(strength), 5, 5)
    _, weights = attention_weights(q, k, v, prepared.value, False)
    raw = ((q @ k.transpose(-2, -1)) / 2.0).exp()
    later = torch.ones(5, 5, dtype=torch.bool).triu(1)
    raw = torch.where(later, raw * (1.0 - strength), raw)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True))


def classifier_decoder(randomize, steps):
    config = token_config(vocab_size=VOCAB, width=WIDTH, max_seq_len=12, num_heads=HEADS,
                          attention={"soft_causal_steps": steps}, position="rope",
                          head={"kind": "classification", "num_classes": 3})
    model = formerkit.Transformer(config).double().eval()
    randomize(model, 0)
    return model


def test_soft_causal_schedule_goes_from_no_mask_to_the_causal_mask(randomize):
    model = classifier_decoder(randomize, steps=10)
    ids = tokens(2, 12)
    causal = model(ids, output_hidden_states=True).last_hidden_state  # a fresh model is fully causal
    model.set_training_step(0)
    bidirectional = model(ids, mask=SoftCausalMask(0.0), return_outputs=True).last_hidden_state
    assert model.soft_causal_strength == 0.0
    torch.testing.assert_close(model(ids, return_outputs=True).last_hidden_state, bidirectional)
    model.set_training_step(4)
    halfway = model(ids, return_outputs=True).last_hidden_state
    torch.testing.assert_close(halfway, model(ids, mask=SoftCausalMask(0.4), return_outputs=True).last_hidden_state)
    model.set_training_step(10)
    torch.testing.assert_close(model(ids, return_outputs=True).last_hidden_state, causal)
    # The first token sees later ones only while the mask is soft.
    assert (bidirectional[:, 0] - causal[:, 0]).abs().max() > 1e-3


def test_soft_causal_is_refused_for_language_models_and_encoders():
    for arch, head in [("decoder", "lm"), ("encoder", "none")]:
        with pytest.raises(ConfigError, match="attention.soft_causal_steps"):
            token_config(arch, vocab_size=VOCAB, width=WIDTH, num_layers=1, max_seq_len=8, num_heads=HEADS,
                         attention={"soft_causal_steps": 5}, head=head)


def test_attention_module_names_the_kinds():
    assert set(attention_module.__all__) >= {"Attention", "GaussianMixtureMask"}
