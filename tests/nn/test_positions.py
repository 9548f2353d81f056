"""formerkit.nn.positions: each position scheme against a reference written out with Python loops and ``math``,
then a check that positions actually reach a full model."""

from __future__ import annotations

import math

import pytest
import torch

import formerkit
from formerkit.nn.attention import Attention
from formerkit.nn.context import LayerContext
from formerkit.nn.masks import PreparedMask
from formerkit.nn.positions import (
    ALiBiPositions,
    LearnedPositions,
    NoPositions,
    RelativePositions,
    RotaryPositions,
    SinCos2DPositions,
    SinusoidalPositions,
    alibi_slopes,
    apply_rotary,
    build_positions,
    relative_buckets,
    rope_frequencies,
    sinusoidal_table,
)

from ..conftest import image_config, randomize_weights, token_config

# ----- sinusoidal -----


def sinusoidal_ref(num_positions, width):
    table = [[0.0] * width for _ in range(num_positions)]
    for p in range(num_positions):
        for c in range(width):
            i = c // 2
            angle = p / 10000 ** (2 * i / width)
            table[p][c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return torch.tensor(table, dtype=torch.float64)


@pytest.mark.parametrize("num_positions, width", [(12, 8), (20, 16), (9, 7)])
def test_sinusoidal_table_has_sin_on_even_and_cos_on_odd_channels(num_positions, width):
    table = sinusoidal_table(num_positions, width)
    assert table.shape == (num_positions, width) and table.dtype == torch.float32
    torch.testing.assert_close(table.double(), sinusoidal_ref(num_positions, width), rtol=0, atol=1e-6)


def test_sinusoidal_positions_add_table_rows_by_position():
    torch.manual_seed(0)
    scheme = SinusoidalPositions(16, 8)
    hidden = torch.randn(2, 5, 8)
    ref = sinusoidal_ref(16, 8).float()
    expected = hidden + ref[:5]
    torch.testing.assert_close(scheme.encode_input(hidden, None), expected, rtol=0, atol=1e-6)
    position_ids = torch.tensor([[4, 5, 6, 7, 8], [0, 0, 1, 2, 3]])
    expected = torch.stack([torch.stack([hidden[b, t] + ref[position_ids[b, t]] for t in range(5)]) for b in range(2)])
    torch.testing.assert_close(scheme.encode_input(hidden, position_ids), expected, rtol=0, atol=1e-6)


# ----- learned -----


def test_learned_positions_add_rows_of_the_table_indexed_by_position_ids():
    torch.manual_seed(1)
    scheme = LearnedPositions(10, 6)
    assert [name for name, _ in scheme.named_parameters()] == ["weight"]
    with torch.no_grad():
        scheme.weight.normal_()
    hidden = torch.randn(2, 4, 6)
    position_ids = torch.tensor([[9, 0, 3, 3], [1, 2, 3, 4]])
    out = scheme.encode_input(hidden, position_ids)
    for b in range(2):
        for t in range(4):
            torch.testing.assert_close(out[b, t], hidden[b, t] + scheme.weight[position_ids[b, t]])
    default = scheme.encode_input(hidden, None)
    for t in range(4):
        torch.testing.assert_close(default[:, t], hidden[:, t] + scheme.weight[t])
    # the table is trained: gradients reach exactly the rows that were used
    out.sum().backward()
    used = set(position_ids.flatten().tolist())
    for row in range(10):
        assert bool(scheme.weight.grad[row].abs().sum() > 0) == (row in used)


def test_no_positions_change_nothing():
    scheme = NoPositions()
    hidden = torch.zeros(1, 3, 4)
    assert scheme.encode_input(hidden, None) is hidden
    assert scheme.rotary(None, 3) is None
    assert scheme.attention_bias(torch.arange(3)[None], torch.arange(3)[None]) is None
    assert not scheme.uses_bias


# ----- rotary -----


def rotate_by_hand(x, positions, base):
    """x [batch, heads, tokens, head_dim]; positions [batch][tokens]. Pairs channel i with i + d/2 and rotates the
    pair by angle p * base^(-2i/d)."""
    batch, heads, tokens, dim = x.shape
    half = dim // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(tokens):
                p = positions[b][t]
                for i in range(half):
                    theta = p * base ** (-2 * i / dim)
                    first, second = float(x[b, h, t, i]), float(x[b, h, t, i + half])
                    out[b, h, t, i] = first * math.cos(theta) - second * math.sin(theta)
                    out[b, h, t, i + half] = first * math.sin(theta) + second * math.cos(theta)
    return out


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rotary_rotates_each_channel_pair_by_position_times_frequency(base):
    torch.manual_seed(2)
    scheme = RotaryPositions(32, 8, base)
    x = torch.randn(2, 3, 6, 8)
    cos, sin = scheme.rotary(None, 6)
    assert cos.shape == sin.shape == (1, 1, 6, 8)
    expected = rotate_by_hand(x, [list(range(6))] * 2, base)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_base_changes_the_rotation():
    torch.manual_seed(11)
    x = torch.randn(1, 1, 4, 8)
    default, other = RotaryPositions(8, 8), RotaryPositions(8, 8, base=500.0)
    assert not torch.allclose(apply_rotary(x, *default.rotary(None, 4)), apply_rotary(x, *other.rotary(None, 4)))


def test_rotary_with_explicit_position_ids_uses_each_rows_positions():
    torch.manual_seed(3)
    scheme = RotaryPositions(64, 6, base=1000.0)
    x = torch.randn(2, 2, 4, 6)
    position_ids = torch.tensor([[7, 3, 30, 0], [0, 1, 2, 63]])
    cos, sin = scheme.rotary(position_ids, 4)
    assert cos.shape == sin.shape == (2, 1, 4, 6)
    expected = rotate_by_hand(x, position_ids.tolist(), 1000.0)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_at_position_zero_is_the_identity_and_preserves_norms():
    torch.manual_seed(4)
    scheme = RotaryPositions(16, 8)
    x = torch.randn(1, 2, 16, 8)
    rotated = apply_rotary(x, *scheme.rotary(None, 16))
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("p, p_key, shift", [(0, 0, 5), (3, 1, 7), (1, 9, 20), (12, 12, 3), (30, 2, 33)])
def test_rope_scores_depend_only_on_relative_position(p, p_key, shift):
    torch.manual_seed(5)
    scheme = RotaryPositions(128, 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(query_position, key_position):
        cos, sin = scheme.rotary(torch.tensor([[query_position, key_position]]), 2)
        rq = apply_rotary(q, cos[:, :, :1], sin[:, :, :1])
        rk = apply_rotary(k, cos[:, :, 1:], sin[:, :, 1:])
        return float((rq * rk).sum())

    assert score(p, p_key) == pytest.approx(score(p + shift, p_key + shift), abs=1e-4)
    if p != p_key:  # and the score does depend on the relative position
        assert score(p, p_key) != pytest.approx(score(p_key, p), abs=1e-3)


def test_rope_attention_probabilities_are_unchanged_by_shifting_all_positions():
    torch.manual_seed(6)
    attention = Attention(16, 4, 2, 4).eval()
    scheme = RotaryPositions(64, 4)
    x = torch.randn(2, 5, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4], [2, 5, 6, 9, 10]])
    causal = PreparedMask(is_causal=True)
    _, weights = attention(x, LayerContext(causal, rotary=scheme.rotary(positions, 5), need_weights=True))
    _, shifted = attention(x, LayerContext(causal, rotary=scheme.rotary(positions + 41, 5), need_weights=True))
    torch.testing.assert_close(weights, shifted, rtol=1e-4, atol=1e-5)
    _, unrotated = attention(x, LayerContext(PreparedMask(is_causal=True), need_weights=True))
    assert not torch.allclose(weights, unrotated, atol=1e-3)


# ----- ALiBi -----


def test_alibi_slopes_for_eight_heads_are_powers_of_one_half():
    expected = torch.tensor([2.0 ** -(i + 1) for i in range(8)])
    torch.testing.assert_close(alibi_slopes(8), expected, rtol=0, atol=0)


def test_alibi_slopes_for_six_heads_are_four_head_slopes_then_every_other_eight_head_slope():
    four = [2.0 ** (-8 / 4 * (i + 1)) for i in range(4)]  # 2^-2, 2^-4, 2^-6, 2^-8
    eight = [2.0 ** (-8 / 8 * (i + 1)) for i in range(8)]  # 2^-1 ... 2^-8
    expected = four + eight[0::2][:2]  # + 2^-1, 2^-3
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(expected), rtol=0, atol=0)
    # The values of get_slopes(6) in the ALiBi authors' code (github.com/ofirpress/attention_with_linear_biases).
    published = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(published), rtol=0, atol=0)


def paper_slopes(n):
    """Press et al.'s get_slopes, written out."""
    def power_of_two(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, 12, 16, 20])
def test_alibi_slopes_follow_the_paper_for_any_head_count(num_heads):
    slopes = alibi_slopes(num_heads)
    assert slopes.shape == (num_heads,)
    torch.testing.assert_close(slopes, torch.tensor(paper_slopes(num_heads), dtype=torch.float32), rtol=1e-6, atol=0)


def test_alibi_bias_is_minus_slope_times_distance():
    scheme = ALiBiPositions(6)
    assert scheme.uses_bias
    slopes = alibi_slopes(6).tolist()
    query_positions = torch.tensor([[3, 4, 5]])
    key_positions = torch.arange(6).view(1, 6)
    bias = scheme.attention_bias(query_positions, key_positions)
    assert bias.shape == (1, 6, 3, 6)
    expected = torch.tensor([[[[-slopes[h] * abs(i - j) for j in range(6)] for i in (3, 4, 5)] for h in range(6)]])
    torch.testing.assert_close(bias, expected, rtol=1e-6, atol=0)


def test_alibi_bias_uses_each_rows_positions():
    scheme = ALiBiPositions(4)
    slopes = alibi_slopes(4).tolist()
    positions = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8]])
    bias = scheme.attention_bias(positions, positions)
    assert bias.shape == (2, 4, 4, 4)
    pos = positions.tolist()
    expected = torch.tensor([[[[-slopes[h] * abs(pos[b][i] - pos[b][j]) for j in range(4)] for i in range(4)]
                              for h in range(4)] for b in range(2)])
    torch.testing.assert_close(bias, expected, rtol=1e-6, atol=0)


# ----- 2-D sine-cosine -----


def sincos2d_ref(rows, cols, width, prefix):
    quarter = width // 4
    table = [[0.0] * width for _ in range(prefix)]
    for r in range(rows):
        for c in range(cols):
            vector = []
            for position in (r, c):  # first half: the row, second half: the column
                frequencies = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
                vector += [math.sin(position * w) for w in frequencies] + [math.cos(position * w) for w in frequencies]
            table.append(vector)
    return torch.tensor(table, dtype=torch.float64)


@pytest.mark.parametrize("grid, width, prefix", [((3, 3), 8, 0), ((2, 3), 16, 1), ((4, 2), 12, 2)])
def test_sincos2d_table_encodes_row_then_column_with_zero_prefix_tokens(grid, width, prefix):
    scheme = SinCos2DPositions(grid, width, num_prefix_tokens=prefix)
    expected = sincos2d_ref(*grid, width, prefix)
    assert scheme.table.shape == (prefix + grid[0] * grid[1], width)
    torch.testing.assert_close(scheme.table.double(), expected, rtol=0, atol=1e-6)
    assert bool((scheme.table[:prefix] == 0).all())
    torch.manual_seed(12)
    hidden = torch.randn(2, scheme.table.shape[0], width)
    torch.testing.assert_close(scheme.encode_input(hidden, None), hidden + expected.float())


# ----- T5's relative buckets -----


def t5_bucket(distance: int, buckets: int, max_distance: int, bidirectional: bool) -> int:
    """T5's rule for one distance (key position - query position), in plain Python: with both directions, keys after
    the query take the upper half of the buckets; within a direction, half of its buckets are exact distances and the
    rest grow logarithmically up to max_distance, the last bucket holding everything farther."""
    first = 0
    if bidirectional:
        buckets //= 2
        if distance > 0:
            first = buckets
        distance = abs(distance)
    else:
        distance = max(-distance, 0)  # later keys (masked in a decoder) share bucket 0
    exact = buckets // 2
    if distance < exact:
        return first + distance
    steps = math.log(distance / exact) / math.log(max_distance / exact) * (buckets - exact)
    return first + min(exact + int(steps), buckets - 1)


@pytest.mark.parametrize("buckets, max_distance", [(8, 20), (32, 128), (6, 9)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_follow_t5s_rule(buckets, max_distance, bidirectional):
    distances = torch.arange(-300, 301)
    got = relative_buckets(distances, buckets, max_distance, bidirectional)
    expected = [t5_bucket(d, buckets, max_distance, bidirectional) for d in distances.tolist()]
    assert got.tolist() == expected


def test_relative_buckets_8_over_20_written_out():
    # Both directions: 4 buckets each, 2 exact (0, 1), then log steps 2 * 10^(k / 2) up to 20, capped at 3.
    # (Expected values from the rule by hand: distance 2..6 -> 2, 7..20 and beyond -> 3.)
    forward = relative_buckets(torch.arange(0, 25), 8, 20, True).tolist()
    assert forward == [0, 5] + [6] * 5 + [7] * 18
    backward = relative_buckets(-torch.arange(0, 25), 8, 20, True).tolist()
    assert backward == [0, 1] + [2] * 5 + [3] * 18
    # Causal: 8 buckets backward, 4 exact, then 4 + floor(4 * ln(d / 4) / ln 5), capped at 7; later keys bucket 0.
    causal = relative_buckets(-torch.arange(0, 25), 8, 20, False).tolist()
    expected = [d if d < 4 else min(4 + int(4 * math.log(d / 4) / math.log(5)), 7) for d in range(25)]
    assert causal == expected
    assert relative_buckets(torch.arange(1, 5), 8, 20, False).tolist() == [0, 0, 0, 0]


def test_relative_bias_reads_each_heads_entry_for_the_bucket_of_each_pair():
    torch.manual_seed(13)
    scheme = RelativePositions(num_heads=3, num_buckets=8, max_distance=20, bidirectional=True)
    with torch.no_grad():
        scheme.weight.normal_()
    positions = torch.tensor([[0, 1, 2, 9, 15], [0, 3, 4, 5, 5]])
    bias = scheme.attention_bias(positions, positions)
    assert bias.shape == (2, 3, 5, 5)
    for b in range(2):
        for h in range(3):
            for q in range(5):
                for k in range(5):
                    bucket = t5_bucket(positions[b, k].item() - positions[b, q].item(), 8, 20, True)
                    assert bias[b, h, q, k] == scheme.weight[bucket, h]


def test_relative_bias_reaches_the_attention_scores_of_every_layer():
    # The probabilities a model reports equal softmax(q k^T * scale + table[bucket(k - q)]) recomputed by hand, in
    # both layers of the stack (one table shared by the stack, as in T5).
    config = token_config("encoder", vocab_size=20, num_layers=2, max_seq_len=16, init_std=0.2,
                          attention={"scale": 1.0}, position={"kind": "relative", "relative_buckets": 8,
                                                              "relative_max_distance": 20})
    torch.manual_seed(14)
    model = formerkit.build_model(config).double().eval()
    with torch.no_grad():
        model.positions.weight.normal_()
    ids = torch.randint(0, 20, (1, 16))
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        distance = torch.arange(16).view(1, -1) - torch.arange(16).view(-1, 1)
        bias = model.positions.weight[relative_buckets(distance, 8, 20, True)].permute(2, 0, 1)
        for index, block in enumerate(model.encoder.blocks):
            hidden = out.hidden_states[index]  # the layer's input
            q, k, _ = block.attention.project(block.attention_residual.branch_input(hidden))
            expected = (q @ k.transpose(-1, -2) + bias).softmax(-1)
            torch.testing.assert_close(out.attentions[index], expected)
    # Without the table's contribution the probabilities differ.
    with torch.no_grad():
        model.positions.weight.zero_()
    assert (model(ids, output_attentions=True).attentions[0] - out.attentions[0]).abs().max() > 1e-2


def test_encoder_decoder_relative_tables_are_per_stack_bidirectional_then_causal():
    config = token_config("encoder_decoder", vocab_size=20, num_layers=1, max_seq_len=16, init_std=0.2,
                          position={"kind": "relative", "relative_buckets": 8, "relative_max_distance": 20,
                                    "separate_decoder": True})
    torch.manual_seed(15)
    model = formerkit.build_model(config).double().eval()
    assert model.positions.bidirectional and not model.decoder_positions.bidirectional
    assert not any("cross_attention" in name and "position" in name for name, _ in model.named_parameters())
    source, target = torch.randint(0, 20, (2, 9)), torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        encoded, logits = model.encode(source), model(source, decoder_input_ids=target)
        model.decoder_positions.weight.add_(0.5 * torch.randn_like(model.decoder_positions.weight))
        # The decoder's table moves the decoder only.
        torch.testing.assert_close(model.encode(source), encoded, rtol=0, atol=0)
        assert (model(source, decoder_input_ids=target) - logits).abs().max() > 1e-3
        logits = model(source, decoder_input_ids=target)
        model.positions.weight.add_(0.5 * torch.randn_like(model.positions.weight))
        assert (model.encode(source) - encoded).abs().max() > 1e-3


def test_training_reaches_both_relative_tables_of_an_encoder_decoder():
    config = token_config("encoder_decoder", vocab_size=20, num_layers=1, max_seq_len=16,
                          position={"kind": "relative", "relative_buckets": 8, "separate_decoder": True})
    model = formerkit.build_model(config).train()
    ids = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(16))
    model(ids, decoder_input_ids=ids).square().mean().backward()
    assert model.positions.weight.grad.abs().sum() > 0
    assert model.decoder_positions.weight.grad.abs().sum() > 0


# ----- build_positions -----


@pytest.mark.parametrize("kind, cls", [("learned", LearnedPositions), ("sinusoidal", SinusoidalPositions),
                                       ("rope", RotaryPositions), ("alibi", ALiBiPositions),
                                       ("relative", RelativePositions), ("none", NoPositions)])
def test_build_positions_makes_the_configured_scheme(kind, cls):
    extra = {"rope_base": 777.0} if kind == "rope" else {}
    config = token_config(vocab_size=20, num_layers=1, position={"kind": kind, **extra})
    scheme = build_positions(config)
    assert type(scheme) is cls
    if kind == "rope":
        half = torch.tensor([[math.cos(p * 777.0 ** (-2 * i / 8)) for i in range(4)] for p in range(16)],
                            dtype=torch.float64)
        torch.testing.assert_close(scheme.cos.double(), torch.cat([half, half], dim=1), rtol=0, atol=1e-6)
    if kind == "alibi":
        torch.testing.assert_close(scheme.slopes, alibi_slopes(4))


# ----- positions reach a full model -----

KINDS = ["learned", "sinusoidal", "rope", "alibi", "relative", "none"]


def small_model(arch, kind, **extra):
    torch.manual_seed(7)
    # init_std 0.2 (not the default 0.02) so attention is far from uniform: with near-uniform attention a
    # permutation of the keys hardly changes anything whatever the position scheme.
    config = token_config(arch, vocab_size=20, num_layers=1, init_std=0.2, position=kind, **extra)
    return formerkit.build_model(config).double().eval()


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_output_at_a_position_changes_when_earlier_tokens_are_permuted_unless_positions_are_none(kind):
    model = small_model("decoder", kind)
    torch.manual_seed(8)
    tokens = torch.randint(0, 20, (2, 8))
    tokens[:, :7] = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # distinct earlier tokens, so a permutation changes the input
    permutation = torch.tensor([3, 0, 6, 1, 5, 2, 4, 7])  # the last token stays in place
    with torch.no_grad():
        original, permuted = model(tokens)[:, -1], model(tokens[:, permutation])[:, -1]
    if kind == "none":  # the last token attends to the same set of tokens
        torch.testing.assert_close(original, permuted, rtol=1e-9, atol=1e-9)
    else:
        assert (original - permuted).abs().max() > 1e-2 * original.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_is_permutation_equivariant_only_without_positions(kind):
    model = small_model("encoder", kind, head={"kind": "none"})
    torch.manual_seed(9)
    tokens = torch.stack([torch.randperm(20)[:8], torch.randperm(20)[:8]])
    permutation = torch.tensor([5, 2, 7, 0, 1, 6, 4, 3])
    with torch.no_grad():
        original, permuted = model(tokens), model(tokens[:, permutation])
    assert original.shape == (2, 8, 32)
    if kind == "none":
        torch.testing.assert_close(permuted, original[:, permutation], rtol=1e-9, atol=1e-9)
    else:
        difference = (permuted - original[:, permutation]).abs().max()
        assert difference > 1e-2 * original.abs().max()


@pytest.mark.parametrize("kind", ["sincos2d", "learned", "none"])
def test_image_encoder_is_patch_permutation_equivariant_only_without_positions(kind):
    torch.manual_seed(10)
    config = image_config(image_size=(8, 8), patch_size=4, num_layers=1, init_std=0.2, stem={"class_token": False},
                          position={"kind": kind})
    model = formerkit.build_model(config).double().eval()
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    # swap patch (0, 0) with patch (1, 1): tokens 0 and 3 of the row-major 2x2 grid
    swapped = images.clone()
    swapped[..., :4, :4], swapped[..., 4:, 4:] = images[..., 4:, 4:], images[..., :4, :4]
    permutation = torch.tensor([3, 1, 2, 0])
    with torch.no_grad():
        original, permuted = model(images), model(swapped)
    assert original.shape == (2, 4, 32)
    if kind == "none":
        torch.testing.assert_close(permuted, original[:, permutation], rtol=1e-9, atol=1e-9)
    else:
        assert (permuted - original[:, permutation]).abs().max() > 1e-2 * original.abs().max()


def test_partial_rotary_rotates_the_first_channels_by_their_own_frequencies_and_passes_the_rest():
    """GPT-NeoX/Phi partial rotary: channels [0, r) rotate as a head of width r would (frequencies base^(-2i/r)), the
    channels from r on are untouched."""
    torch.manual_seed(3)
    scheme = RotaryPositions(32, 10, 500.0, rotary_dim=4)
    x = torch.randn(2, 3, 6, 10)
    cos, sin = scheme.rotary(None, 6)
    assert cos.shape == (1, 1, 6, 4)
    out = apply_rotary(x, cos, sin).double()
    expected = rotate_by_hand(x[..., :4], [list(range(6))] * 2, 500.0)
    torch.testing.assert_close(out[..., :4], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., 4:], x[..., 4:].double())


def test_rotary_fraction_reaches_the_model_through_the_config():
    config = formerkit.ModelConfig(width=32, num_layers=1, attention={"num_heads": 2},
                                   position={"kind": "rope", "rotary_fraction": 0.25}, stem={"vocab_size": 11})
    assert config.rotary_dim == 4
    assert build_positions(config).rotary(None, 3)[0].shape[-1] == 4


# ----- RoPE scaling -----


def plain_frequencies_ref(rotary_dim, base):
    return [1.0 / base ** (2 * i / rotary_dim) for i in range(rotary_dim // 2)]


def angles_of(scheme, positions):
    """The angle of every pair at each position, read back from the cos/sin tables (cos = scale * cos(angle))."""
    cos, sin = scheme.rotary(torch.tensor([positions]), len(positions))
    half = cos.shape[-1] // 2
    return torch.atan2(sin[0, 0, :, :half].double(), cos[0, 0, :, :half].double()), cos, sin


def test_linear_scaling_divides_every_frequency_by_the_factor():
    """Position interpolation (Chen et al., 2023): position p is rotated as plain RoPE rotates p / factor."""
    scheme = RotaryPositions(16, 12, 300.0, scaling="linear", factor=2.5)
    expected = [[p / 2.5 * f for f in plain_frequencies_ref(12, 300.0)] for p in range(16)]
    cos, sin = scheme.rotary(None, 16)
    half = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(cos[0, 0].double(), torch.cat([half.cos(), half.cos()], -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0, 0].double(), torch.cat([half.sin(), half.sin()], -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("base, original, factor, low, high", [(500000.0, 8192, 8.0, 1.0, 4.0),
                                                                 (10000.0, 64, 32.0, 2.0, 8.0)])
def test_llama3_scaling_follows_llama_3_1s_published_rule(base, original, factor, low, high):
    """Llama 3.1's rule (Meta's reference ``apply_scaling``), one frequency at a time: short wavelengths kept, long
    ones divided by the factor, the ones between blended by how many times they fit into the original context."""
    expected = []
    for frequency in plain_frequencies_ref(64, base):
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            expected.append(frequency)
        elif wavelength > original / low:
            expected.append(frequency / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            expected.append((1 - smooth) * frequency / factor + smooth * frequency)
    got = rope_frequencies(64, base, "llama3", factor=factor, original_max_len=original, low_freq_factor=low,
                           high_freq_factor=high)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # Both ends and the blend are exercised.
    kept = sum(abs(g - f) < 1e-15 for g, f in zip(got.tolist(), plain_frequencies_ref(64, base)))
    divided = sum(abs(g - f / factor) < 1e-15 for g, f in zip(got.tolist(), plain_frequencies_ref(64, base)))
    assert 0 < kept and 0 < divided and kept + divided < 32


@pytest.mark.parametrize("beta_fast, beta_slow", [(32.0, 1.0), (8.0, 2.0)])
def test_yarn_ramps_from_kept_to_interpolated_pairs_between_the_beta_rotations(beta_fast, beta_slow):
    """YaRN's "NTK-by-parts" (Peng et al., 2023): a pair whose wavelength fits more than beta_fast times into the
    original length L is kept, one fitting fewer than beta_slow times is interpolated (theta / s), and between them
    the mix is linear in the pair index, from the index where L / wavelength = beta_fast (rounded down) to the one
    where it is beta_slow (rounded up), as in the YaRN reference code."""
    dim, base, original, factor = 32, 10000.0, 512, 4.0

    def pair_where(rotations):  # L / (2 pi base^(2d/dim)) = rotations, solved for d
        return dim * math.log(original / (2 * math.pi * rotations)) / (2 * math.log(base))

    low, high = max(math.floor(pair_where(beta_fast)), 0), min(math.ceil(pair_where(beta_slow)), dim - 1)
    expected = []
    for d, frequency in enumerate(plain_frequencies_ref(dim, base)):
        interpolated = min(max((d - low) / (high - low), 0.0), 1.0)
        expected.append(interpolated * frequency / factor + (1 - interpolated) * frequency)
    got = rope_frequencies(dim, base, "yarn", factor=factor, original_max_len=original, beta_fast=beta_fast,
                           beta_slow=beta_slow)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    rotations = [original * f / (2 * math.pi) for f in plain_frequencies_ref(dim, base)]
    for d, (r, g, f) in enumerate(zip(rotations, got.tolist(), plain_frequencies_ref(dim, base))):
        if r > beta_fast and d <= low:
            assert g == pytest.approx(f, rel=1e-12)
        if r < beta_slow and d >= high:
            assert g == pytest.approx(f / factor, rel=1e-12)


@pytest.mark.parametrize("attention_factor, scale", [(None, 0.1 * math.log(4.0) + 1), (1.7, 1.7)])
def test_yarn_scales_the_cos_sin_tables_by_its_attention_factor(attention_factor, scale):
    """YaRN's temperature (eq. 22: sqrt(1/t) = 0.1 ln s + 1) multiplies both tables, so q.k scales by its square."""
    scheme = RotaryPositions(16, 8, 1000.0, scaling="yarn", factor=4.0, original_max_len=8,
                             attention_factor=attention_factor)
    cos, sin = scheme.rotary(None, 16)
    torch.testing.assert_close((cos ** 2 + sin ** 2), torch.full_like(cos, scale ** 2), rtol=1e-6, atol=0)


def test_dynamic_scaling_grows_the_base_with_the_longest_position_of_the_call():
    """Dynamic NTK: up to L positions plain RoPE; beyond, plain RoPE with the base
    base * (s * n / L - (s - 1))^(r / (r - 2)), n = max position + 1 of the call, for every position of the call."""
    dim, base, factor, original = 8, 1000.0, 2.0, 6
    scheme = RotaryPositions(4, dim, base, scaling="dynamic", factor=factor, original_max_len=original)

    def expected_angles(positions, seen):
        grown = base * (factor * max(seen, original) / original - (factor - 1)) ** (dim / (dim - 2))
        angles = torch.tensor([[p * f for f in plain_frequencies_ref(dim, grown)] for p in positions],
                              dtype=torch.float64)
        return torch.atan2(angles.sin(), angles.cos())  # in (-pi, pi], as read back

    for positions in ([0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8, 9], [2, 19], [5]):
        angles, _, _ = angles_of(scheme, positions)
        torch.testing.assert_close(angles, expected_angles(positions, max(positions) + 1), rtol=1e-5, atol=1e-5)
    # Stateless: a short call after a long one is plain RoPE again.
    short, _, _ = angles_of(scheme, [0, 1, 2])
    torch.testing.assert_close(short, expected_angles([0, 1, 2], 3), rtol=1e-5, atol=1e-5)
    # The whole batch decides n, as in transformers: a short row beside a long one gets the long row's base.
    cos, _ = scheme.rotary(torch.tensor([[0, 1, 2], [8, 9, 10]]), 3)
    torch.testing.assert_close(cos[0, 0, :, : dim // 2].double(), expected_angles([0, 1, 2], 11).cos(), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("scaling, fields", [("linear", {}), ("llama3", {"rope_original_max_len": 8}),
                                             ("yarn", {"rope_original_max_len": 8}),
                                             ("dynamic", {"rope_original_max_len": 8})])
def test_scaling_composes_with_partial_rotary_over_the_rotated_channels(scaling, fields):
    """The frequencies are those of a head of rotary_dim channels, whatever head_dim is."""
    config = formerkit.ModelConfig(width=64, num_layers=1, attention={"num_heads": 2}, max_seq_len=16,
                                   position={"kind": "rope", "rotary_fraction": 0.25, "rope_scaling": scaling,
                                             "rope_factor": 3.0, "rope_base": 700.0, **fields},
                                   stem={"vocab_size": 11})
    scheme = build_positions(config)
    positions = list(range(12))
    angles, cos, _ = angles_of(scheme, positions)
    assert cos.shape[-1] == 8
    if scaling == "dynamic":
        grown = 700.0 * (3.0 * 12 / 8 - 2.0) ** (8 / 6)
        frequency = torch.tensor(plain_frequencies_ref(8, grown), dtype=torch.float64)
    else:
        frequency = rope_frequencies(8, 700.0, scaling, factor=3.0, original_max_len=8)
    expected = torch.tensor(positions, dtype=torch.float64).unsqueeze(1) * frequency
    torch.testing.assert_close(angles, torch.atan2(expected.sin(), expected.cos()), rtol=0, atol=1e-5)


SHORT, LONG = (1.0, 1.5, 2.0, 4.0), (2.0, 3.0, 5.0, 11.0)


def longrope_scheme(**overrides):
    fields = dict(scaling="longrope", factor=4.0, original_max_len=6, short_factors=SHORT, long_factors=LONG)
    return RotaryPositions(24, 8, 100.0, **{**fields, **overrides})


@pytest.mark.parametrize("positions, factors", [([0, 1, 2, 3, 4, 5], SHORT), ([4, 5, 6], LONG), ([0, 1, 9], LONG),
                                                ([2], SHORT)])
def test_longrope_divides_each_pair_by_its_short_or_long_factor_by_the_calls_length(positions, factors):
    """LongRoPE (Ding et al., 2024), as Phi-3 uses it: theta_i = base^(-2i/r) / factor_i, with the short factors
    while the call's max position + 1 is within the original length and the long ones beyond, for every position
    of the call; both tables scaled by sqrt(1 + ln(factor) / ln(original length))."""
    scheme = longrope_scheme()
    angles, cos, sin = angles_of(scheme, positions)
    expected = torch.tensor([[p * f / s for f, s in zip(plain_frequencies_ref(8, 100.0), factors)]
                             for p in positions], dtype=torch.float64)
    torch.testing.assert_close(angles, torch.atan2(expected.sin(), expected.cos()), rtol=0, atol=1e-5)
    scale = math.sqrt(1 + math.log(4.0) / math.log(6))
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, scale ** 2), rtol=1e-6, atol=0)


def test_longrope_without_position_ids_picks_the_factors_by_the_input_length():
    scheme = longrope_scheme(attention_factor=1.0)
    for length, factors in ((6, SHORT), (7, LONG)):
        cos, sin = scheme.rotary(None, length)
        expected = torch.tensor([[p * f / s for f, s in zip(plain_frequencies_ref(8, 100.0), factors)]
                                 for p in range(length)], dtype=torch.float64)
        torch.testing.assert_close(cos[0, 0, :, :4].double(), expected.cos(), rtol=0, atol=1e-6)


def test_longrope_generation_equals_recomputing_the_whole_sequence_at_every_step():
    """Once the sequence outgrows the original length every position is rotated by the long factors: generate
    recomputes the cached keys at that step, so cached decoding picks what a full pass per token picks."""
    torch.manual_seed(0)
    model = formerkit.build_model(formerkit.ModelConfig(
        arch="decoder", width=32, num_layers=2, max_seq_len=32, attention={"num_heads": 2},
        feedforward={"activation": "swiglu"}, norm={"kind": "rmsnorm"}, stem={"vocab_size": 29}, head={"kind": "lm"},
        position={"kind": "rope", "rotary_fraction": 0.5, "rope_scaling": "longrope", "rope_factor": 4.0,
                  "rope_original_max_len": 8, "rope_short_factors": [1.0, 1.5, 2.0, 3.0],
                  "rope_long_factors": [2.0, 4.0, 8.0, 16.0]})).eval()
    randomize_weights(model, seed=3, std="fan_in")  # O(1) activations: a wrong rotation changes the picks
    prompt = torch.randint(0, 29, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sequence = prompt
        for _ in range(10):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(model.generate(prompt, 10, temperature=0), sequence)
