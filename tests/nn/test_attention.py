"""formerkit.nn.attention.Attention against softmax(Q K^T / sqrt(d) + mask) V written out by hand.

The reference below reads the module's own weights, applies the projections with explicit matrix products, loops over
heads (each query head h reads key/value head h // (num_heads // num_kv_heads)) and applies the mask entry by entry.
Most checks run in float64 so the tolerance can be tight; both of the module's code paths are covered (SDPA when
need_weights=False, the explicit softmax when need_weights=True).
"""

from __future__ import annotations

import math

import pytest
import torch

from formerkit.nn.attention import Attention
from formerkit.nn.context import LayerContext
from formerkit.nn.masks import KeyPaddingMask, PreparedMask, TensorMask, prepare_attention_mask

from ..conftest import randomize_weights

WIDTH = 16
NUM_HEADS = 4
HEAD_DIM = 4
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ----- the reference -----


def linear(x, layer):
    """x W^T + b for an nn.Linear, bias optional."""
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def layer_norm(x, norm):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight
    return out if norm.bias is None else out + norm.bias


def rms_norm(x, norm):
    return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight


def split_heads(projected, num_heads):
    """[batch, tokens, num_heads * head_dim] -> list of num_heads tensors [batch, tokens, head_dim]."""
    return [projected[..., h * HEAD_DIM:(h + 1) * HEAD_DIM] for h in range(num_heads)]


def reference_attention(module, x, *, mask=None, causal=False, memory=None, norm_kind="layernorm", scale=None,
                        softcap=None):
    """Returns (output [batch, tokens, width], probabilities [batch, heads, tokens, keys]).

    ``mask`` is None, a bool tensor (True = may attend) or an additive float tensor, broadcastable to
    [batch, heads, tokens, keys]. ``scale`` replaces 1/sqrt(head_dim); ``softcap`` caps the scores before the mask,
    softcap * tanh(scores / softcap) (Gemma 2)."""
    num_heads, num_kv = module.num_heads, module.num_kv_heads
    if module.cross:
        q_all = linear(x, module.q)
        kv_all = linear(memory, module.kv)
        k_all, v_all = kv_all[..., : num_kv * HEAD_DIM], kv_all[..., num_kv * HEAD_DIM:]
    else:
        fused = linear(x, module.qkv)
        q_all = fused[..., : num_heads * HEAD_DIM]
        k_all = fused[..., num_heads * HEAD_DIM:(num_heads + num_kv) * HEAD_DIM]
        v_all = fused[..., (num_heads + num_kv) * HEAD_DIM:]
    qs, ks, vs = split_heads(q_all, num_heads), split_heads(k_all, num_kv), split_heads(v_all, num_kv)
    if module.q_norm is not None:
        norm = layer_norm if norm_kind == "layernorm" else rms_norm
        qs = [norm(q, module.q_norm) for q in qs]
        ks = [norm(k, module.k_norm) for k in ks]
    batch, length = x.shape[:2]
    keys = ks[0].shape[1]
    group = num_heads // num_kv
    outs, probs = [], []
    for h in range(num_heads):
        q, k, v = qs[h], ks[h // group], vs[h // group]
        scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(HEAD_DIM) if scale is None else scale)  # [b, tokens, keys]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if causal:
            allowed = torch.tensor([[j <= i for j in range(keys)] for i in range(length)])
            scores = scores.masked_fill(~allowed, float("-inf"))
        if mask is not None:
            head_mask = mask.expand(batch, num_heads, length, keys)[:, h]
            if head_mask.dtype == torch.bool:
                scores = scores.masked_fill(~head_mask, float("-inf"))
            else:
                scores = scores + head_mask.to(scores.dtype)
        p = torch.softmax(scores, dim=-1)
        probs.append(p)
        outs.append(p @ v)
    out = linear(torch.cat(outs, dim=-1), module.out)
    return out, torch.stack(probs, dim=1)


# ----- helpers -----


def make_attention(*, dtype=torch.float64, num_kv_heads=NUM_HEADS, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = Attention(WIDTH, NUM_HEADS, num_kv_heads, HEAD_DIM, **kwargs).to(dtype)
    # Non-trivial biases and norm affine parameters, so a reference that skips them fails.
    return randomize_weights(module, seed, std=0.5).eval()


def inputs(batch=2, length=5, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, length, WIDTH, dtype=dtype)


def assert_close(actual, expected, dtype=torch.float64):
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ----- tests -----


@pytest.mark.parametrize("need_weights", [False, True])
def test_plain_attention_matches_reference(need_weights):
    module, x = make_attention(), inputs()
    out, weights = module(x, LayerContext(PreparedMask(), need_weights=need_weights))
    expected, expected_probs = reference_attention(module, x)
    assert out.shape == (2, 5, WIDTH)
    assert_close(out, expected)
    if need_weights:
        assert_close(weights, expected_probs)
    else:
        assert weights is None


def test_plain_attention_matches_reference_in_float32():
    module, x = make_attention(dtype=torch.float32), inputs(dtype=torch.float32)
    out, _ = module(x, LayerContext(PreparedMask()))
    expected, _ = reference_attention(module, x)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_flag_matches_reference_with_lower_triangular_mask(need_weights):
    module, x = make_attention(), inputs(length=6)
    out, weights = module(x, LayerContext(PreparedMask(is_causal=True), need_weights=need_weights))
    expected, expected_probs = reference_attention(module, x, causal=True)
    assert_close(out, expected)
    if need_weights:
        assert_close(weights, expected_probs)
        assert bool((weights.triu(diagonal=1) == 0).all())


@pytest.mark.parametrize("need_weights", [False, True])
def test_boolean_mask_matches_reference(need_weights):
    module, x = make_attention(), inputs(length=6)
    torch.manual_seed(2)
    mask = torch.rand(2, 1, 6, 6) < 0.6
    mask[..., 0] = True  # every query keeps at least one key
    out, weights = module(x, LayerContext(PreparedMask(value=mask), need_weights=need_weights))
    expected, expected_probs = reference_attention(module, x, mask=mask)
    assert_close(out, expected)
    if need_weights:
        assert_close(weights, expected_probs)
        assert bool((weights[~mask.expand_as(weights)] == 0).all())


@pytest.mark.parametrize("need_weights", [False, True])
def test_per_head_boolean_mask_matches_reference(need_weights):
    module, x = make_attention(), inputs(batch=1, length=5)
    torch.manual_seed(3)
    mask = torch.rand(1, NUM_HEADS, 5, 5) < 0.5
    mask[..., 2] = True
    out, weights = module(x, LayerContext(PreparedMask(value=mask), need_weights=need_weights))
    expected, expected_probs = reference_attention(module, x, mask=mask)
    assert_close(out, expected)
    if need_weights:
        assert_close(weights, expected_probs)


@pytest.mark.parametrize("need_weights", [False, True])
def test_additive_float_mask_matches_reference(need_weights):
    module, x = make_attention(), inputs(length=6)
    torch.manual_seed(4)
    mask = torch.randn(2, 1, 6, 6, dtype=torch.float64) * 2.0
    mask[0, 0, 1, 3:] = float("-inf")
    mask[1, 0, 4, :2] = float("-inf")
    out, weights = module(x, LayerContext(PreparedMask(value=mask), need_weights=need_weights))
    expected, expected_probs = reference_attention(module, x, mask=mask)
    assert_close(out, expected)
    if need_weights:
        assert_close(weights, expected_probs)


def test_float32_additive_mask_is_cast_to_module_dtype():
    module, x = make_attention(), inputs(length=4)
    torch.manual_seed(5)
    mask = torch.randn(4, 4, dtype=torch.float32).view(1, 1, 4, 4)
    out, _ = module(x, LayerContext(PreparedMask(value=mask)))
    expected, _ = reference_attention(module, x, mask=mask.double())
    assert out.dtype == torch.float64
    assert_close(out, expected)


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["grouped_query", "multi_query"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_shared_kv_heads_match_reference_that_repeats_each_kv_head_for_its_group(num_kv_heads, need_weights):
    module, x = make_attention(num_kv_heads=num_kv_heads), inputs(length=6)
    assert module.qkv.out_features == (NUM_HEADS + 2 * num_kv_heads) * HEAD_DIM
    torch.manual_seed(6)
    mask = torch.rand(2, 1, 6, 6) < 0.7
    mask[..., -1] = True
    for prepared, kwargs in [(PreparedMask(), {}), (PreparedMask(is_causal=True), {"causal": True}),
                             (PreparedMask(value=mask), {"mask": mask})]:
        out, weights = module(x, LayerContext(prepared, need_weights=need_weights))
        expected, expected_probs = reference_attention(module, x, **kwargs)
        assert_close(out, expected)
        if need_weights:
            assert_close(weights, expected_probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_qk_norm_normalizes_queries_and_keys_over_head_dim(norm_kind, dtype, need_weights):
    module = make_attention(dtype=dtype, qk_norm=True, norm_kind=norm_kind, num_kv_heads=2)
    assert module.q_norm.weight.shape == (HEAD_DIM,) and module.k_norm.weight.shape == (HEAD_DIM,)
    x = inputs(dtype=dtype) * 3.0
    out, weights = module(x, LayerContext(PreparedMask(is_causal=True), need_weights=need_weights))
    expected, expected_probs = reference_attention(module, x, causal=True, norm_kind=norm_kind)
    assert_close(out, expected, dtype)
    if need_weights:
        assert_close(weights, expected_probs, dtype)


def test_qk_norm_changes_the_output():
    plain, normed = make_attention(seed=7), make_attention(seed=7, qk_norm=True)
    x = inputs()
    assert not torch.allclose(plain(x, LayerContext(PreparedMask()))[0], normed(x, LayerContext(PreparedMask()))[0])


def param_shapes(module):
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("out_bias", [True, False])
def test_bias_flags_decide_which_bias_parameters_exist(qkv_bias, out_bias):
    module = make_attention(num_kv_heads=2, qkv_bias=qkv_bias, out_bias=out_bias)
    fused = (NUM_HEADS + 2 * 2) * HEAD_DIM
    expected = {"qkv.weight": (fused, WIDTH), "out.weight": (WIDTH, NUM_HEADS * HEAD_DIM)}
    if qkv_bias:
        expected["qkv.bias"] = (fused,)
    if out_bias:
        expected["out.bias"] = (WIDTH,)
    assert param_shapes(module) == expected
    assert sum(p.numel() for p in module.parameters()) == sum(math.prod(s) for s in expected.values())
    x = inputs()
    assert_close(module(x, LayerContext(PreparedMask()))[0], reference_attention(module, x)[0])


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_cross_attention_has_separate_query_and_key_value_projections(qkv_bias):
    module = make_attention(cross=True, num_kv_heads=2, qkv_bias=qkv_bias)
    kv = 2 * 2 * HEAD_DIM
    expected = {"q.weight": (NUM_HEADS * HEAD_DIM, WIDTH), "kv.weight": (kv, WIDTH),
                "out.weight": (WIDTH, NUM_HEADS * HEAD_DIM), "out.bias": (WIDTH,)}
    if qkv_bias:
        expected.update({"q.bias": (NUM_HEADS * HEAD_DIM,), "kv.bias": (kv,)})
    assert param_shapes(module) == expected


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
def test_qk_norm_adds_one_norm_each_for_queries_and_keys(norm_kind):
    module = make_attention(qk_norm=True, norm_kind=norm_kind)
    names = {name for name, _ in module.named_parameters()} - {"qkv.weight", "qkv.bias", "out.weight", "out.bias"}
    if norm_kind == "layernorm":
        assert names == {"q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"}
    else:
        assert names == {"q_norm.weight", "k_norm.weight"}


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_attends_to_memory_keys(num_kv_heads, need_weights):
    module = make_attention(cross=True, num_kv_heads=num_kv_heads)
    x = inputs(length=3)
    memory = inputs(length=7, seed=9)
    context = LayerContext(PreparedMask(), memory=memory, memory_mask=PreparedMask(), need_weights=need_weights)
    out, weights = module(x, context)
    expected, expected_probs = reference_attention(module, x, memory=memory)
    assert out.shape == (2, 3, WIDTH)
    assert_close(out, expected)
    if need_weights:
        assert weights.shape == (2, NUM_HEADS, 3, 7)
        assert_close(weights, expected_probs)


@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_with_memory_padding_mask_matches_reference(need_weights):
    module = make_attention(cross=True, num_kv_heads=2)
    x, memory = inputs(length=3), inputs(length=6, seed=10)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    prepared = prepare_attention_mask(KeyPaddingMask(keep), 3, 6)
    out, weights = module(x, LayerContext(prepared, memory_mask=prepared, memory=memory, need_weights=need_weights))
    expected, expected_probs = reference_attention(module, x, memory=memory, mask=keep.bool().view(2, 1, 1, 6))
    assert_close(out, expected)
    # padded memory positions have no influence
    changed = memory.clone()
    changed[0, 4:] = 100.0
    assert_close(module(x, LayerContext(prepared, memory_mask=prepared, memory=changed))[0][0], out[0])
    if need_weights:
        assert_close(weights, expected_probs)


def test_need_weights_returns_probabilities_that_sum_to_one():
    module, x = make_attention(num_kv_heads=2), inputs(length=5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    fast, none = module(x, LayerContext(PreparedMask(value=mask)))
    slow, weights = module(x, LayerContext(PreparedMask(value=mask), need_weights=True))
    assert none is None
    assert weights.shape == (2, NUM_HEADS, 5, 5)
    assert_close(weights, reference_attention(module, x, mask=mask)[1])
    assert_close(weights.sum(-1), torch.ones(2, NUM_HEADS, 5, dtype=torch.float64))
    assert_close(fast, slow)


def _check_empty_row_output(module, x, prepared, allowed, row, need_weights):
    out, weights = module(x, LayerContext(prepared, need_weights=need_weights))
    assert not torch.isnan(out).any()
    assert bool((out[:, row] == 0).all())
    # the other queries are untouched: they match the reference with the original mask
    others = [i for i in range(x.shape[1]) if i != row]
    expected, expected_probs = reference_attention(module, x, mask=allowed)
    assert_close(out[:, others], expected[:, others])
    if need_weights:
        assert not torch.isnan(weights).any()
        assert bool((weights[:, :, row] == 0).all())
        assert_close(weights[:, :, others], expected_probs[:, :, others])
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_fully_masked_boolean_row_returns_exact_zeros(need_weights, num_kv_heads):
    # out_bias=False: the output projection of a zero vector is exactly zero
    module, x = make_attention(out_bias=False, num_kv_heads=num_kv_heads), inputs(length=5)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    allowed[2] = False
    prepared = prepare_attention_mask(TensorMask(allowed), 5, 5)
    assert prepared.empty_rows.flatten().tolist() == [row == 2 for row in range(5)]
    _check_empty_row_output(module, x, prepared, allowed.view(1, 1, 5, 5), 2, need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_float_row_returns_exact_zeros(need_weights):
    module, x = make_attention(out_bias=False), inputs(length=5)
    torch.manual_seed(11)
    scores = torch.randn(5, 5, dtype=torch.float64)
    scores[3] = float("-inf")
    prepared = prepare_attention_mask(TensorMask(scores), 5, 5)
    assert prepared.empty_rows.flatten().tolist() == [row == 3 for row in range(5)]
    _check_empty_row_output(module, x, prepared, scores.view(1, 1, 5, 5), 3, need_weights)


def test_fully_masked_row_with_out_bias_returns_the_bias():
    module, x = make_attention(), inputs(length=4)
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[1] = False
    out, _ = module(x, LayerContext(prepare_attention_mask(TensorMask(allowed), 4, 4)))
    assert_close(out[:, 1], module.out.bias.expand(2, WIDTH))


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_dropout_is_active_in_train_mode_and_inactive_in_eval(need_weights):
    module, x = make_attention(dropout=0.5), inputs(length=6)
    mask = PreparedMask(is_causal=True)
    expected, _ = reference_attention(module, x, causal=True)

    module.eval()
    first, _ = module(x, LayerContext(mask, need_weights=need_weights))
    second, _ = module(x, LayerContext(mask, need_weights=need_weights))
    assert_close(first, expected)
    assert torch.equal(first, second)

    module.train()
    torch.manual_seed(12)
    train_a, _ = module(x, LayerContext(mask, need_weights=need_weights))
    train_b, _ = module(x, LayerContext(mask, need_weights=need_weights))
    assert not torch.allclose(train_a, expected)
    assert not torch.allclose(train_a, train_b)


def test_attention_dropout_rescales_kept_weights_so_the_mean_is_unchanged():
    module = make_attention(dropout=0.5)
    x = inputs(batch=1, length=4).expand(4000, 4, WIDTH)
    expected, _ = reference_attention(module, x[:1])
    module.train()
    torch.manual_seed(13)
    with torch.no_grad():
        out, _ = module(x, LayerContext(PreparedMask()))
    assert not torch.allclose(out[0], expected[0])
    spread = (out - expected).std(dim=0)
    error = (out.mean(dim=0) - expected[0]).abs()
    assert bool((error < 5 * spread / math.sqrt(x.shape[0]) + 1e-9).all())


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_single_query_attention_matches_the_written_out_softmax(kv_heads, mask_kind):
    """The decode-step form (products and sums, no matmul) against softmax(q k^T / sqrt(d) + mask) v per head."""
    from formerkit.nn.attention import single_query_attention

    generator = torch.Generator().manual_seed(3)
    batch, heads, keys, dim = 2, 4, 7, 8
    q = torch.randn(batch, heads, 1, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, keys, dim, generator=generator, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, 1, keys, generator=generator) > 0.4
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = -torch.rand(batch, heads, 1, keys, generator=generator, dtype=torch.float64)
    expected = torch.empty(batch, heads, 1, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = q[b, h] @ k[b, kv].T / math.sqrt(dim)
            if mask_kind == "bool":
                scores = scores.masked_fill(~mask[b, 0], float("-inf"))
            elif mask_kind == "additive":
                scores = scores + mask[b, h]
            expected[b, h] = scores.softmax(-1) @ v[b, kv]
    assert torch.allclose(single_query_attention(q, k, v, mask), expected, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("need_weights", [False, True])
def test_an_explicit_score_scale_replaces_one_over_sqrt_head_dim(scale, need_weights):
    """T5 (scale 1) and Gemma (query_pre_attn_scalar^-1/2): the reference with 1/sqrt(d) is the one with the queries
    multiplied by scale * sqrt(d)."""
    module = make_attention(scale=scale)
    x = inputs()
    out, _ = module(x, LayerContext(PreparedMask(None, True), need_weights=need_weights))
    plain = make_attention()
    with torch.no_grad():
        rows = NUM_HEADS * HEAD_DIM
        plain.qkv.weight[:rows] *= scale * math.sqrt(HEAD_DIM)
        plain.qkv.bias[:rows] *= scale * math.sqrt(HEAD_DIM)
    expected, _ = reference_attention(plain, x, causal=True)
    assert_close(out, expected)


# ----- soft-capped scores (Gemma 2) -----


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("num_kv_heads", [NUM_HEADS, 2])
@pytest.mark.parametrize("mask_kind", ["causal", "bool"])
def test_softcapped_scores_match_the_written_out_cap_before_the_mask(need_weights, num_kv_heads, mask_kind):
    """softmax(c * tanh(q k^T * scale / c) + mask) v, on the explicit-probabilities path and on the path that
    replaces SDPA (which cannot cap)."""
    module = make_attention(num_kv_heads=num_kv_heads, scale=0.7, softcap=1.5)
    x = inputs()
    if mask_kind == "causal":
        prepared, mask, causal = PreparedMask(None, True), None, True
    else:
        mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(5)) > 0.3
        mask[..., 0] = True
        prepared, causal = PreparedMask(mask), False
    out, weights = module(x, LayerContext(prepared, need_weights=need_weights))
    expected, probabilities = reference_attention(module, x, mask=mask, causal=causal, scale=0.7, softcap=1.5)
    assert_close(out, expected)
    if need_weights:
        assert_close(weights, probabilities)
    # The cap binds: without it the output differs.
    uncapped, _ = reference_attention(module, x, mask=mask, causal=causal, scale=0.7)
    assert (uncapped - expected).abs().max() > 1e-2


def test_softcapped_single_query_attention_matches_the_written_out_form():
    from formerkit.nn.attention import single_query_attention

    generator = torch.Generator().manual_seed(6)
    q = 3 * torch.randn(2, 4, 1, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 1, 1, 7, generator=generator) > 0.4
    mask[..., 0] = True
    expected = torch.empty(2, 4, 1, 8, dtype=torch.float64)
    for b in range(2):
        for h in range(4):
            scores = q[b, h] @ k[b, h // 2].T * 0.5
            scores = 2.0 * torch.tanh(scores / 2.0)
            expected[b, h] = scores.masked_fill(~mask[b, 0], float("-inf")).softmax(-1) @ v[b, h // 2]
    torch.testing.assert_close(single_query_attention(q, k, v, mask, scale=0.5, softcap=2.0), expected,
                               rtol=1e-12, atol=1e-12)
