"""Behaviour of the assembled Transformer: padding, causality, masks, norms, feed-forward, weight sharing, stochastic
depth, stems, heads and the outputs a forward pass reports.

Every reference is computed here from the model's own parameters (or from a second run of the model on other inputs);
nothing is compared against stored numbers. Models are tiny, float32, seeded and in eval mode unless a test says so.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import formerkit
from formerkit import ModelConfig, ModelOutput
from formerkit.nn.context import LayerContext
from formerkit.nn.masks import PreparedMask
from formerkit.nn.norms import RMSNorm

from ..conftest import image_config, randomize_weights, token_config

VOCAB = 23
WIDTH = 32
HEADS = 4
MAX_LEN = 16
TOL = 1e-5
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


# ----- helpers -----


def make_config(arch: str = "decoder", position: str = "learned", **overrides) -> ModelConfig:
    """A tiny token model (conftest's token_config: lm head for decoders and encoder-decoders, none for encoders);
    ``overrides`` go through ModelConfig.replace."""
    config = token_config(arch, vocab_size=VOCAB, width=WIDTH, max_seq_len=MAX_LEN, num_heads=HEADS, position=position)
    return config.replace(**overrides) if overrides else config


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replaces the (tiny) default init by O(1)-scale random weights so every part visibly matters: conftest's
    randomize_weights with N(0, 1/fan_in) matrices (vectors get their value plus N(0, 0.1^2), so norm weights stay
    near 1 and LayerScale gammas near their configured value but are no longer uniform)."""
    return randomize_weights(model, seed, std="fan_in")


def build(config: ModelConfig, seed: int = 0, train: bool = False) -> formerkit.Transformer:
    torch.manual_seed(seed)
    model = randomize(formerkit.build_model(config), seed)
    return model.train(train)


def token_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def other_token(token: int) -> int:
    return (int(token) + 1 + VOCAB // 2) % VOCAB


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference = (actual - expected).abs().max().item()
    assert difference <= tol, f"max abs difference {difference:.3g} > {tol}"


def assert_differs(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert (a - b).abs().max().item() > tol, "expected the outputs to change"


def right_padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    return (torch.arange(total).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


def left_padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    return (torch.arange(total).unsqueeze(0) >= total - torch.tensor(lengths).unsqueeze(1)).long()


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def norm_by_hand(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        out = (x - mean) / torch.sqrt(var + module.eps) * module.weight
        return out if module.bias is None else out + module.bias
    assert isinstance(module, RMSNorm)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight


# ----- padding invariance -----


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_right_padding_matches_each_sequence_alone(arch, position):
    model = build(make_config(arch, position))
    lengths, total = [7, 4, 1], 7
    ids = token_ids(len(lengths), total)  # the padded slots hold arbitrary (non-zero) ids on purpose
    with torch.no_grad():
        batched = model(ids, attention_mask=right_padding_mask(lengths, total))
        for row, length in enumerate(lengths):
            alone = model(ids[row:row + 1, :length])
            assert_close(batched[row, :length], alone[0])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("arch, window", [("decoder", None), ("decoder", 2), ("encoder", None)])
def test_left_padding_matches_each_sequence_alone(arch, window, position):
    # Positions count real tokens (from attention_mask), so a left-padded row equals the row alone.
    model = build(make_config(arch, position, attention={"sliding_window": window}))
    lengths, total = [7, 5, 2], 7
    ids = token_ids(len(lengths), total)
    with torch.no_grad():
        batched = model(ids, attention_mask=left_padding_mask(lengths, total))
        for row, length in enumerate(lengths):
            alone = model(ids[row:row + 1, total - length:])
            assert_close(batched[row, total - length:], alone[0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_style_decoder_padding_invariance(side):
    # Grouped-query attention, QK-norm, RMSNorm, SwiGLU and rope together.
    config = make_config("decoder", "rope", attention={"num_kv_heads": 2, "qk_norm": True, "qkv_bias": False},
                         feedforward={"activation": "swiglu"}, norm={"kind": "rmsnorm"})
    model = build(config)
    lengths, total = [8, 5, 3], 8
    ids = token_ids(len(lengths), total)
    padding = right_padding_mask if side == "right" else left_padding_mask
    with torch.no_grad():
        batched = model(ids, attention_mask=padding(lengths, total))
        for row, length in enumerate(lengths):
            real = slice(0, length) if side == "right" else slice(total - length, total)
            assert_close(batched[row, real], model(ids[row:row + 1, real])[0])


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_encoder_decoder_padding_on_source_and_target(position):
    model = build(make_config("encoder_decoder", position))
    source_lengths, target_lengths, source_total, target_total = [6, 3, 5], [5, 5, 2], 6, 5
    source, target = token_ids(3, source_total, seed=2), token_ids(3, target_total, seed=3)
    with torch.no_grad():
        batched = model(source, attention_mask=right_padding_mask(source_lengths, source_total),
                        decoder_input_ids=target,
                        decoder_attention_mask=right_padding_mask(target_lengths, target_total))
        for row, (s, t) in enumerate(zip(source_lengths, target_lengths)):
            alone = model(source[row:row + 1, :s], decoder_input_ids=target[row:row + 1, :t])
            assert_close(batched[row, :t], alone[0])


# ----- causality -----


def _check_causal(run, ids: torch.Tensor) -> None:
    """Changing token t changes nothing before t (and does change position t)."""
    with torch.no_grad():
        base = run(ids)
        for t in (1, ids.shape[1] // 2, ids.shape[1] - 1):
            changed = ids.clone()
            changed[:, t] = torch.tensor([other_token(v) for v in ids[:, t]])
            out = run(changed)
            assert_close(out[:, :t], base[:, :t])
            assert_differs(out[:, t], base[:, t])


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_is_causal(position):
    model = build(make_config("decoder", position))
    _check_causal(model, token_ids(2, 9))


@pytest.mark.parametrize("layers", [None, (1,)])
def test_decoder_with_sliding_window_is_causal(layers):
    model = build(make_config("decoder", "rope", attention={"sliding_window": 3, "sliding_window_layers": layers}))
    _check_causal(model, token_ids(2, 9))


def test_sliding_window_limits_what_a_layer_sees():
    window = 3
    model = build(make_config("decoder", "learned", num_layers=1, attention={"sliding_window": window}))
    ids = token_ids(2, 9)
    changed = ids.clone()
    changed[:, 0] = torch.tensor([other_token(v) for v in ids[:, 0]])
    with torch.no_grad():
        base, out = model(ids), model(changed)
    assert_differs(out[:, window - 1], base[:, window - 1])  # still inside the window
    assert_close(out[:, window:], base[:, window:])  # one layer: position p sees p - window + 1 .. p only


def test_encoder_decoder_decoder_side_is_causal():
    model = build(make_config("encoder_decoder", "rope"))
    source = token_ids(2, 6, seed=4)
    _check_causal(lambda target: model(source, decoder_input_ids=target), token_ids(2, 8))


# ----- prefix-LM -----


@pytest.mark.parametrize("position", POSITIONS)
def test_prefix_lm_mask_is_bidirectional_inside_the_prefix_and_causal_after(position):
    model = build(make_config("decoder", position))
    prefix, total = 4, 9
    ids = token_ids(2, total)
    mask = formerkit.PrefixLMMask(prefix)

    def run(x):
        return model(x, mask=mask)

    with torch.no_grad():
        base = run(ids)
        inside = ids.clone()
        inside[:, prefix - 1] = torch.tensor([other_token(v) for v in ids[:, prefix - 1]])
        out = run(inside)
        for position_index in range(prefix):  # every prefix position sees the last prefix token
            assert_differs(out[:, position_index], base[:, position_index])
        for t in (prefix, total - 1):
            after = ids.clone()
            after[:, t] = torch.tensor([other_token(v) for v in ids[:, t]])
            out = run(after)
            assert_close(out[:, :t], base[:, :t])
            assert_differs(out[:, t], base[:, t])
        # Without the prefix mask the same model is plainly causal: position 0 ignores token prefix - 1.
        plain = model(inside)
        assert_close(plain[:, 0], model(ids)[:, 0])


def test_prefix_lm_mask_per_row_lengths_and_padding():
    model = build(make_config("decoder", "rope"))
    ids = token_ids(2, 7)
    with torch.no_grad():
        per_row = model(ids, mask=formerkit.PrefixLMMask(torch.tensor([2, 4])))
        assert_close(per_row[0], model(ids[:1], mask=formerkit.PrefixLMMask(2))[0])
        assert_close(per_row[1], model(ids[1:], mask=formerkit.PrefixLMMask(4))[0])
        padded = model(ids, attention_mask=right_padding_mask([7, 4], 7), mask=formerkit.PrefixLMMask(3))
        assert_close(padded[1, :4], model(ids[1:, :4], mask=formerkit.PrefixLMMask(3))[0])


# ----- fully masked rows -----


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padded_decoder_never_produces_nan(position):
    model = build(make_config("decoder", position, attention={"sliding_window": 2}))
    total = 6
    mask = left_padding_mask([6, 3, 1, 0], total)  # the last row is padding only
    ids = token_ids(4, total)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        outputs = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(outputs.logits).all()
    assert all(torch.isfinite(state).all() for state in outputs.hidden_states)
    assert all(torch.isfinite(weights).all() for weights in outputs.attentions)
    assert_close(outputs.logits, logits)


# ----- norm placements and LayerScale -----


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
def test_block_matches_norm_placement_by_hand(placement, kind):
    gamma = 0.5
    config = make_config("encoder", "none", num_layers=1, layer_scale=gamma,
                         norm={"kind": kind, "placement": placement})
    torch.manual_seed(0)
    model = formerkit.build_model(config).eval()
    block = model.encoder.blocks[0]
    attn_res, ff_res = block.attention_residual, block.feedforward_residual
    assert torch.all(attn_res.scale.gamma == gamma) and torch.all(ff_res.scale.gamma == gamma)
    norm_type = nn.LayerNorm if kind == "layernorm" else RMSNorm
    assert isinstance(attn_res.norm, norm_type) and isinstance(ff_res.norm, norm_type)
    assert (attn_res.norm_out is not None) == (placement == "sandwich")
    assert (model.encoder.final_norm is not None) == (placement != "post")
    randomize(model)  # norm weights, biases and gammas now differ per channel

    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(5))

    def attn(h):
        return block.attention(h, LayerContext(PreparedMask()))[0]

    ff = block.feedforward
    g_attn, g_ff = attn_res.scale.gamma, ff_res.scale.gamma
    with torch.no_grad():
        out, _ = block(x, LayerContext(PreparedMask()))
        if placement == "pre":
            h = x + g_attn * attn(norm_by_hand(attn_res.norm, x))
            expected = h + g_ff * ff(norm_by_hand(ff_res.norm, h))
        elif placement == "post":
            h = norm_by_hand(attn_res.norm, x + g_attn * attn(x))
            expected = norm_by_hand(ff_res.norm, h + g_ff * ff(h))
        else:
            h = x + g_attn * norm_by_hand(attn_res.norm_out, attn(norm_by_hand(attn_res.norm, x)))
            expected = h + g_ff * norm_by_hand(ff_res.norm_out, ff(norm_by_hand(ff_res.norm, h)))
    assert_close(out, expected)


# ----- feed-forward -----

ACTIVATIONS_BY_HAND = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3)))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "squared_relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)) ** 2,
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
}
GATES_BY_HAND = {"swiglu": ACTIVATIONS_BY_HAND["silu"], "geglu": ACTIVATIONS_BY_HAND["gelu"]}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS_BY_HAND) + sorted(GATES_BY_HAND))
def test_feedforward_matches_formula(activation):
    model = build(make_config("encoder", "none", num_layers=1, feedforward={"activation": activation}))
    ff = model.encoder.blocks[0].feedforward
    hidden = model.config.feedforward_size
    x = 2.0 * torch.randn(3, 4, WIDTH, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pre = linear(x, ff.fc_in)
        if activation in GATES_BY_HAND:
            assert pre.shape[-1] == 2 * hidden
            gate, up = pre[..., :hidden], pre[..., hidden:]
            expected = linear(GATES_BY_HAND[activation](gate) * up, ff.fc_out)
        else:
            assert pre.shape[-1] == hidden
            expected = linear(ACTIVATIONS_BY_HAND[activation](pre), ff.fc_out)
        assert_close(ff(x), expected, tol=1e-4)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_feedforward_hidden_size_by_ratio_and_explicit(activation):
    factor = 2 if activation == "swiglu" else 1
    ratio = 2.5
    by_ratio = formerkit.build_model(make_config("encoder", feedforward={"activation": activation, "ratio": ratio}))
    ff = by_ratio.encoder.blocks[0].feedforward
    assert ff.fc_out.in_features == int(ratio * WIDTH)
    assert ff.fc_in.out_features == factor * int(ratio * WIDTH)
    explicit = formerkit.build_model(
        make_config("encoder", feedforward={"activation": activation, "ratio": ratio, "hidden_size": 24}))
    ff = explicit.encoder.blocks[0].feedforward
    assert ff.fc_out.in_features == 24 and ff.fc_in.out_features == factor * 24


# ----- weight sharing -----


def _by_hand_through_blocks(model: formerkit.Transformer, ids: torch.Tensor, order: list[int]) -> torch.Tensor:
    stack = model.decoder
    hidden, _ = model.embed(ids)
    for index in order:
        hidden, _ = stack.blocks[index](hidden, LayerContext(PreparedMask(is_causal=True)))
    return model.head(stack.final_norm(hidden))


def test_one_unique_layer_is_one_block_applied_num_layers_times():
    shared = build(make_config("decoder", "learned", num_layers=4, num_unique_layers=1))
    single = formerkit.build_model(make_config("decoder", "learned", num_layers=1))
    assert len(shared.decoder.blocks) == 1
    assert shared.num_parameters() == single.num_parameters()
    ids = token_ids(2, 7)
    with torch.no_grad():
        assert_close(shared(ids), _by_hand_through_blocks(shared, ids, [0, 0, 0, 0]))


def test_two_unique_layers_cycle():
    model = build(make_config("decoder", "learned", num_layers=4, num_unique_layers=2))
    assert len(model.decoder.blocks) == 2
    ids = token_ids(2, 7)
    with torch.no_grad():
        out = model(ids)
        assert_close(out, _by_hand_through_blocks(model, ids, [0, 1, 0, 1]))
        assert_differs(out, _by_hand_through_blocks(model, ids, [0, 0, 1, 1]))


# ----- stochastic depth -----


@pytest.mark.parametrize("num_unique_layers", [None, 1])
def test_drop_path_is_random_in_training_and_identity_in_eval(num_unique_layers):
    config = make_config("decoder", "learned", num_layers=4, drop_path=0.5, num_unique_layers=num_unique_layers)
    model = build(config)
    plain = formerkit.build_model(config.replace(drop_path=0.0))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    # The rate belongs to the layer (shared blocks too): it rises linearly from 0 at the first to drop_path at the last.
    rates = [getattr(drop, "rate", 0.0) for drop in model.decoder.drop_paths]
    assert rates == pytest.approx([0.5 * i / 3 for i in range(4)])
    ids = token_ids(4, 6)
    with torch.no_grad():
        assert_close(model.eval()(ids), plain(ids))  # eval: every branch kept, no rescaling
        model.train()
        runs = []
        for seed in range(4):
            torch.manual_seed(seed)
            runs.append(model(ids))
    assert any((run - runs[0]).abs().max().item() > 1e-4 for run in runs[1:]), \
        "drop_path > 0 in train mode gave the same output for every seed"


# ----- stems -----


def test_vit_class_token_and_registers():
    image, patch, registers, classes = 16, 4, 2, 5
    config = image_config(image_size=image, patch_size=patch, in_channels=3, width=WIDTH, num_heads=HEADS,
                          max_seq_len=None, position={"kind": "learned"}, stem={"register_tokens": registers})
    model = build(config).eval()
    grid = image // patch
    assert config.stem.grid_size == (grid, grid)
    assert model.positions.weight.shape == (1 + grid * grid, WIDTH)  # registers get no position row
    images = torch.randn(2, 3, image, image, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hidden = model(images)
        assert hidden.shape == (2, 1 + registers + grid * grid, WIDTH)
        embedded, _ = model.embed(images)
        # Patches by hand: [batch, channels, rows, patch, cols, patch] -> one flat vector per patch.
        patches = images.view(2, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5).reshape(2, grid * grid, -1)
        projection = model.stem.projection
        tokens = patches @ projection.weight.reshape(WIDTH, -1).T + projection.bias
        table = model.positions.weight
        expected = torch.cat([
            (model.stem.class_token[0, 0] + table[0]).expand(2, 1, WIDTH),
            model.stem.registers.expand(2, -1, -1),  # exactly the learned registers: no position added
            tokens + table[1:],
        ], dim=1)
        assert_close(embedded, expected)

        classifier = build(config.replace(head={"kind": "classification", "num_classes": classes, "pooling": "cls"}))
        out = classifier(images, return_outputs=True)
        assert out.logits.shape == (2, classes)
        assert out.last_hidden_state.shape == (2, 1 + registers + grid * grid, WIDTH)
        assert_close(out.logits, linear(out.last_hidden_state[:, 0], classifier.head.projection))


@pytest.mark.parametrize("stem", [{"kind": "patches", "patch_size": 4},
                                  {"kind": "conv", "conv_layers": 1, "patch_size": None}])
def test_image_stems_without_prefix_tokens_give_token_major_rows(stem):
    """The tokens a feature map gives are laid out token by token (every later layer reads rows), and are the
    feature map's values: token i of image b is its pixel i's channel vector."""
    config = image_config(image_size=8, in_channels=3, width=WIDTH, num_heads=HEADS, max_seq_len=None,
                          position={"kind": "none"}, stem={**stem, "class_token": False})
    model = build(config).eval()
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model.stem(images)
        feature_map = (model.stem.projection if stem["kind"] == "patches" else model.stem.layers)(images)
    assert tokens.is_contiguous()
    assert torch.equal(tokens, feature_map.flatten(2).transpose(1, 2))


def _conv_grid(size: int, layers: int, kernel: int, pool_kernel: int, pool_stride: int) -> int:
    for _ in range(layers):
        size = size + 2 * (kernel // 2) - kernel + 1  # stride 1, padding kernel // 2
        if pool_kernel:
            size = (size + 2 * (pool_kernel // 2) - pool_kernel) // pool_stride + 1
    return size


@pytest.mark.parametrize("layers, kernel, pool_kernel, pool_stride",
                         [(1, 3, 3, 2), (2, 3, 3, 2), (2, 5, 2, 2), (1, 3, 0, 2), (2, 2, 3, 2)])
def test_cct_conv_tokenizer_grid_size(layers, kernel, pool_kernel, pool_stride):
    image = 16
    config = ModelConfig(
        arch="encoder", width=WIDTH, num_layers=1, max_seq_len=None, attention={"num_heads": HEADS},
        stem={"kind": "conv", "image_size": image, "conv_layers": layers, "conv_kernel": kernel,
              "conv_channels": 8, "pool_kernel": pool_kernel, "pool_stride": pool_stride},
        head={"kind": "classification", "num_classes": 3, "pooling": "sequence"},
    )
    side = _conv_grid(image, layers, kernel, pool_kernel, pool_stride)
    assert config.stem.grid_size == (side, side)
    model = build(config)
    assert tuple(model.stem.grid_size) == (side, side)
    images = torch.randn(2, 3, image, image)
    with torch.no_grad():
        out = model(images, return_outputs=True)
    assert out.last_hidden_state.shape == (2, side * side, WIDTH)
    assert out.logits.shape == (2, 3)


@pytest.mark.parametrize("class_token", [False, True])
def test_linear_stem_with_patches_and_regression_head(class_token):
    steps, features, patch, horizon = 12, 3, 4, 5
    config = ModelConfig(
        arch="encoder", width=WIDTH, num_layers=2, max_seq_len=24, attention={"num_heads": HEADS},
        stem={"kind": "linear", "input_dim": features, "patch_size": patch, "class_token": class_token},
        head={"kind": "regression", "output_dim": horizon},
    )
    model = build(config)
    series = torch.randn(2, steps, features, generator=torch.Generator().manual_seed(8))
    tokens = steps // patch
    with torch.no_grad():
        stem_out = model.stem(series)
        by_hand = linear(series.reshape(2, tokens, patch * features), model.stem.projection)
        if class_token:
            by_hand = torch.cat([model.stem.class_token.expand(2, 1, WIDTH), by_hand], dim=1)
        assert_close(stem_out, by_hand)
        out = model(series, return_outputs=True)
        assert out.last_hidden_state.shape == (2, tokens + int(class_token), WIDTH)
        assert out.logits.shape == (2, horizon)
        pooled = out.last_hidden_state[:, 0] if class_token else out.last_hidden_state.mean(dim=1)
        assert_close(out.logits, linear(pooled, model.head.projection))

        per_token = build(config.replace(head={"kind": "regression", "output_dim": horizon, "pooling": "none"}))
        assert per_token(series).shape == (2, tokens + int(class_token), horizon)


# ----- heads -----


def _pool_by_hand(kind: str, hidden: torch.Tensor, keep: torch.Tensor, head) -> torch.Tensor:
    keep_f = keep.to(hidden.dtype).unsqueeze(-1)
    if kind == "cls":
        return hidden[:, 0]
    if kind == "mean":
        return (hidden * keep_f).sum(1) / keep_f.sum(1)
    if kind == "last":
        last = torch.tensor([int(row.nonzero().max()) for row in keep])
        return hidden[torch.arange(hidden.shape[0]), last]
    scores = linear(hidden, head.pooling.score).squeeze(-1)
    scores = scores.masked_fill(keep == 0, float("-inf"))
    weights = scores.softmax(dim=1).unsqueeze(-1)
    return (weights * hidden).sum(1)


@pytest.mark.parametrize("pooler", [False, True])
@pytest.mark.parametrize("arch, pooling", [("encoder", "cls"), ("encoder", "mean"), ("encoder", "sequence"),
                                           ("decoder", "last"), ("decoder", "mean")])
def test_classification_pooling_by_hand(arch, pooling, pooler):
    classes = 3
    config = make_config(arch, "learned", head={"kind": "classification", "num_classes": classes,
                                                "pooling": pooling, "pooler": pooler})
    model = build(config)
    lengths, total = [6, 3], 6
    keep = right_padding_mask(lengths, total)
    ids = token_ids(2, total)
    with torch.no_grad():
        out = model(ids, attention_mask=keep, return_outputs=True)
        assert isinstance(out, ModelOutput)
        assert out.logits.shape == (2, classes)
        pooled = _pool_by_hand(pooling, out.last_hidden_state, keep, model.head)
        if pooler:
            pooled = torch.tanh(linear(pooled, model.head.pooler))
        assert_close(out.pooled, pooled)
        assert_close(out.logits, linear(pooled, model.head.projection))
        assert_close(model(ids, attention_mask=keep), out.logits)


@pytest.mark.parametrize("arch, pooling, side", [("encoder", "mean", "right"), ("encoder", "sequence", "right"),
                                                 ("encoder", "cls", "right"), ("decoder", "last", "right"),
                                                 ("decoder", "last", "left"), ("decoder", "mean", "left")])
def test_pooled_heads_ignore_padded_tokens(arch, pooling, side):
    model = build(make_config(arch, "learned", head={"kind": "classification", "num_classes": 4, "pooling": pooling}))
    lengths, total = [7, 3, 5], 7
    keep = (right_padding_mask if side == "right" else left_padding_mask)(lengths, total)
    ids = token_ids(3, total)
    scrambled = torch.where(keep.bool(), ids, (ids + 7) % VOCAB)
    with torch.no_grad():
        logits = model(ids, attention_mask=keep)
        assert_close(model(scrambled, attention_mask=keep), logits)
        for row, length in enumerate(lengths):
            real = slice(0, length) if side == "right" else slice(total - length, total)
            assert_close(logits[row], model(ids[row:row + 1, real])[0])


def test_masked_lm_head_shape_and_tied_embeddings():
    config = make_config("encoder", "learned", head={"kind": "masked_lm", "tie_embeddings": True})
    model = build(config)
    assert model.head.projection.weight is model.stem.tokens.weight
    ids = token_ids(2, 6)
    with torch.no_grad():
        assert model(ids).shape == (2, 6, VOCAB)


def test_lm_head_tied_embeddings_share_storage():
    tied = build(make_config("decoder", "learned", head={"kind": "lm", "tie_embeddings": True}))
    untied = formerkit.build_model(make_config("decoder", "learned"))
    assert tied.head.projection.weight is tied.stem.tokens.weight
    assert tied.head.projection.weight.data_ptr() == tied.stem.tokens.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * WIDTH  # the shared matrix counts once
    ids = token_ids(2, 5)
    with torch.no_grad():
        out = tied(ids, return_outputs=True)
        assert_close(out.logits, out.last_hidden_state @ tied.stem.tokens.weight.T)
        tied.stem.tokens.weight.mul_(2.0)  # one storage: the head sees the change
        assert_close(tied.head.projection.weight, tied.stem.tokens.weight, tol=0.0)


# ----- outputs on request -----


@pytest.mark.parametrize("arch", ["encoder", "decoder", "encoder_decoder"])
def test_hidden_states_and_attentions_on_request(arch):
    num_layers = 3
    model = build(make_config(arch, "alibi", num_layers=num_layers))
    ids = token_ids(2, 6)
    extra = {"decoder_input_ids": token_ids(2, 5, seed=9)} if arch == "encoder_decoder" else {}
    with torch.no_grad():
        plain = model(ids, **extra)
        out = model(ids, output_hidden_states=True, output_attentions=True, **extra)
    assert isinstance(out, ModelOutput)
    assert_close(out.logits, plain)
    assert len(out.hidden_states) == num_layers + 1
    stack = model.encoder if arch == "encoder" else model.decoder
    assert_close(out.last_hidden_state, stack.final_norm(out.hidden_states[-1]))
    with torch.no_grad():
        assert_close(out.hidden_states[0], model.embed(extra.get("decoder_input_ids", ids))[0])
    assert len(out.attentions) == num_layers
    length = 5 if arch == "encoder_decoder" else 6
    for weights in out.attentions:
        assert weights.shape == (2, HEADS, length, length)
        assert_close(weights.sum(-1), torch.ones(2, HEADS, length))
        assert (weights >= 0).all()
        if arch != "encoder":
            upper = torch.ones(length, length, dtype=torch.bool).triu(1)
            assert (weights[..., upper] == 0).all()
        else:
            assert (weights[..., torch.ones(length, length, dtype=torch.bool).triu(1)] > 0).all()


def test_return_outputs_without_extras():
    model = build(make_config("decoder", "rope"))
    ids = token_ids(2, 6)
    with torch.no_grad():
        out = model(ids, return_outputs=True)
        assert_close(out.logits, model(ids))
    assert out.hidden_states is None and out.attentions is None
    assert out.last_hidden_state.shape == (2, 6, WIDTH)


def test_attentions_with_left_padding_put_no_weight_on_padding():
    model = build(make_config("decoder", "rope"))
    keep = left_padding_mask([6, 3], 6)
    with torch.no_grad():
        out = model(token_ids(2, 6), attention_mask=keep, output_attentions=True)
    for weights in out.attentions:
        assert (weights[1, :, :, :3] == 0).all()  # no query attends to the three padded keys of row 1
        assert_close(weights[1, :, 3:].sum(-1), torch.ones(HEADS, 3))


# ----- encoder-decoder -----


def test_encoder_decoder_shapes_and_source_dependence():
    model = build(make_config("encoder_decoder", "learned", num_decoder_layers=3))
    assert len(model.decoder.blocks) == 3 and len(model.encoder.blocks) == 2
    source, target = token_ids(2, 7, seed=10), token_ids(2, 5, seed=11)
    with torch.no_grad():
        logits = model(source, decoder_input_ids=target)
        assert logits.shape == (2, 5, VOCAB)
        out = model(source, decoder_input_ids=target, return_outputs=True)
        assert_close(out.encoder_last_hidden_state, model.encode(source))
        assert out.encoder_last_hidden_state.shape == (2, 7, WIDTH)
        for t in (0, 6):
            changed = source.clone()
            changed[:, t] = torch.tensor([other_token(v) for v in source[:, t]])
            assert_differs(model(changed, decoder_input_ids=target)[:, 0], logits[:, 0])


def test_cross_attention_ignores_padded_source_tokens():
    model = build(make_config("encoder_decoder", "rope"))
    source, target = token_ids(2, 7, seed=12), token_ids(2, 5, seed=13)
    keep = right_padding_mask([7, 4], 7)
    scrambled = torch.where(keep.bool(), source, (source + 5) % VOCAB)
    with torch.no_grad():
        logits = model(source, attention_mask=keep, decoder_input_ids=target)
        assert_close(model(scrambled, attention_mask=keep, decoder_input_ids=target), logits)
        # ...while a real source token of the same row does matter.
        changed = source.clone()
        changed[1, 2] = other_token(source[1, 2])
        assert_differs(model(changed, attention_mask=keep, decoder_input_ids=target)[1], logits[1])


# ----- the per-layer interface -----


@pytest.mark.parametrize("arch, position, overrides", [
    ("decoder", "rope", {}),
    ("decoder", "alibi", {"attention.sliding_window": 3, "attention.sliding_window_layers": [1]}),
    ("decoder", "learned", {"attention.kind": "linear", "attention.kind_layers": [0]}),
    ("encoder", "learned", {"num_unique_layers": 1, "num_layers": 3}),
])
def test_running_the_prepared_layers_by_hand_equals_the_forward_pass(arch, position, overrides):
    """What the README shows: prepare, then each block with its own context, then the final norm and head."""
    model = randomize(formerkit.build_model(make_config(arch, position, **overrides))).eval()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, 7:] = 0  # right padding
    prepared = model.prepare(ids, attention_mask=attention_mask)
    stack = model.get_stack()
    assert len(prepared.layers) == stack.num_layers
    assert [context.index for context in prepared.layers] == list(range(stack.num_layers))
    x = prepared.hidden
    for index, context in enumerate(prepared.layers):
        x, _ = stack.block_at(index)(x, context)
    if stack.final_norm is not None:
        x = stack.final_norm(x)
    expected = model(ids, attention_mask=attention_mask, return_outputs=True).last_hidden_state
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_each_depth_gets_the_mask_of_its_kind():
    config = make_config("decoder", "learned", **{"attention.sliding_window": 3,
                                                  "attention.sliding_window_layers": [1], "attention.kind": "linear",
                                                  "attention.kind_layers": [2], "num_layers": 3})
    model = formerkit.build_model(config).eval()
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :2] = 0
    prepared = model.prepare(torch.randint(0, VOCAB, (2, 8)), attention_mask=attention_mask)
    full, window, linear = (context.mask for context in prepared.layers)
    assert [context.kind for context in prepared.layers] == ["softmax", "softmax", "linear"]
    keys = attention_mask.bool()[:, None, None, :]
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    near = ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    # Queries with no key left (row 1's padding) are opened for the kernel and reported, as everywhere.
    empty = ~(causal & keys).any(-1, keepdim=True)
    assert torch.equal(full.value, (causal & keys) | empty) and torch.equal(full.empty_rows, empty)
    assert torch.equal(window.value, (causal & near & keys) | empty)
    # Linear attention gets its linear-time form: the causal flag and the padding, no dense mask.
    assert linear.value is None and linear.is_causal and torch.equal(linear.key_keep, attention_mask.bool())


def test_prepare_names_the_stack_a_two_stack_model_needs():
    model = formerkit.build_model(make_config("encoder_decoder"))
    with pytest.raises(formerkit.InputError, match="side: expected encoder or decoder"):
        model.prepare(torch.zeros(1, 3, dtype=torch.long))


def test_linear_attention_reads_a_callers_causal_and_padding_masks_in_its_linear_form():
    """An encoder's linear-attention layers take a caller's CausalMask & KeyPaddingMask in their linear-time form
    (running sums) and must compute what the quadratic form computes under the same mask given as a dense tensor."""
    model = randomize(formerkit.build_model(make_config("encoder", "learned", **{"attention.kind": "linear"}))).eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    structured = model(ids, mask=formerkit.CausalMask() & formerkit.KeyPaddingMask(keep))
    dense = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    torch.testing.assert_close(structured, model(ids, mask=formerkit.TensorMask(dense)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(structured, model(ids))  # the masks matter


# ----- an encoder-decoder's per-stack embeddings and start token -----


def seq2seq_config(**fields) -> ModelConfig:
    """make_config's encoder_decoder with whole sections or fields replaced."""
    return ModelConfig.from_dict({**make_config("encoder_decoder", "learned").to_dict(), **fields})


def test_decoder_with_positions_and_embedding_norm_of_its_own():
    # BART: each stack adds its own learned table and normalizes with its own LayerNorm.
    config = seq2seq_config(position={"kind": "learned", "separate_decoder": True},
                            stem={"kind": "tokens", "vocab_size": VOCAB, "embedding_norm": True,
                                  "separate_decoder_norm": True})
    model = build(config).eval()
    names = {name for name, _ in model.named_parameters()}
    assert {"positions.weight", "decoder_positions.weight", "embedding_norm.weight",
            "decoder_embedding_norm.weight"} <= names
    ids = token_ids(2, 6, seed=4)
    with torch.no_grad():
        tokens = model.stem.tokens(ids)
        for side, table, norm in (("encoder", model.positions.weight, model.embedding_norm),
                                  ("decoder", model.decoder_positions.weight, model.decoder_embedding_norm)):
            assert_close(model.embed(ids, side=side)[0], norm(tokens + table[:6]))
        # The decoder's own parts move the decoder's output only.
        encoded, logits = model.encode(ids), model(ids, decoder_input_ids=ids)
        model.decoder_positions.weight.add_(torch.randn_like(model.decoder_positions.weight))
        assert_close(model.encode(ids), encoded)
        assert (model(ids, decoder_input_ids=ids) - logits).abs().max() > 1e-3


def test_shared_encoder_decoder_embeddings_keep_their_parameter_names():
    # The shipped seq2seq-reverse recipe's layout: one table and one norm for both stacks, named as before.
    config = seq2seq_config(stem={"kind": "tokens", "vocab_size": VOCAB, "embedding_norm": True},
                            head={"kind": "lm", "tie_embeddings": False})
    names = [name for name, _ in build(config).named_parameters() if not name.startswith(("encoder.", "decoder."))]
    assert names == ["stem.tokens.weight", "positions.weight", "embedding_norm.weight", "embedding_norm.bias",
                     "head.projection.weight"]


@pytest.mark.parametrize("fields, name", [
    ({"arch": "decoder", "position": {"kind": "learned", "separate_decoder": True}}, "position.separate_decoder"),
    ({"position": {"kind": "rope", "separate_decoder": True}}, "position.separate_decoder"),
    ({"position": {"kind": "relative"}}, "position.separate_decoder"),
    ({"stem": {"kind": "tokens", "vocab_size": VOCAB, "separate_decoder_norm": True}}, "stem.separate_decoder_norm"),
    ({"arch": "decoder", "stem": {"kind": "tokens", "vocab_size": VOCAB, "embedding_norm": True,
                                  "separate_decoder_norm": True}}, "stem.separate_decoder_norm"),
    ({"decoder_start_token_id": VOCAB}, "decoder_start_token_id"),
    ({"arch": "decoder", "decoder_start_token_id": 1}, "decoder_start_token_id"),
])
def test_per_stack_fields_and_start_token_are_refused_where_they_mean_nothing(fields, name):
    with pytest.raises(formerkit.ConfigError, match=name.replace(".", r"\.")):
        seq2seq_config(**fields)


def test_generate_starts_the_target_from_the_configs_start_token():
    model = build(seq2seq_config(decoder_start_token_id=5)).eval()
    source = token_ids(2, 6, seed=6)
    out = model.generate(source, 4, temperature=0)
    assert out[:, 0].tolist() == [5, 5]
    assert torch.equal(out, model.generate(source, 4, temperature=0, decoder_start_token_id=5))
    assert model.generate(source, 4, temperature=0, decoder_start_token_id=3)[:, 0].tolist() == [3, 3]
