"""formerkit.nn.masks: every mask materialized and compared with a matrix built by explicit loops over (query, key).

Queries are numbered from ``query_offset`` (as when decoding with a KV cache), keys from 0. The references below return
full [batch, 1, queries, keys] tensors; the masks may return anything that broadcasts to that shape.
"""

from __future__ import annotations

import pytest
import torch

from formerkit import InputError
from formerkit.nn.masks import (
    AllOf,
    CausalMask,
    DocumentMask,
    KeyPaddingMask,
    PrefixLMMask,
    PreparedMask,
    SlidingWindowMask,
    TensorMask,
    as_mask,
    prepare_attention_mask,
)

NEG_INF = float("-inf")
OFFSETS = [0, 3]


# ----- references -----


def by_loops(allowed, num_queries, num_keys, *, query_offset=0, batch=1):
    """bool [batch, 1, queries, keys] with entry (b, i, j) = allowed(b, query position, key position)."""
    return torch.tensor([[[[bool(allowed(b, query_offset + i, j)) for j in range(num_keys)]
                           for i in range(num_queries)]] for b in range(batch)])


def causal_ref(q, k, offset=0):
    return by_loops(lambda b, i, j: j <= i, q, k, query_offset=offset)


def window_ref(window, q, k, offset=0):
    return by_loops(lambda b, i, j: abs(i - j) < window, q, k, query_offset=offset)


def padding_ref(keep, q, offset=0):
    keep = keep.tolist()
    return by_loops(lambda b, i, j: keep[b][j] != 0, q, len(keep[0]), query_offset=offset, batch=len(keep))


def prefix_ref(lengths, q, k, offset=0):
    """``lengths``: one prefix length per row."""
    return by_loops(lambda b, i, j: j <= i or j < lengths[b], q, k, query_offset=offset, batch=len(lengths))


def document_ref(ids, q, offset=0):
    ids = ids.tolist()
    return by_loops(lambda b, i, j: ids[b][i] == ids[b][j], q, len(ids[0]), query_offset=offset, batch=len(ids))


def full(value, batch, heads, q, k):
    """A materialized mask broadcast to [batch, heads, q, k] (checks that it is 4-D and broadcastable)."""
    assert value.dim() == 4
    return value.expand(batch, heads, q, k)


# ----- single masks -----


@pytest.mark.parametrize("offset", OFFSETS)
def test_causal_mask_allows_keys_at_or_before_the_query_position(offset):
    q, k = 4, 4 + offset
    value = CausalMask().materialize(q, k, query_offset=offset)
    assert value.dtype == torch.bool and value.shape == (1, 1, q, k)
    assert torch.equal(value, causal_ref(q, k, offset))


def test_causal_mask_with_more_keys_than_queries_and_no_offset_is_top_left_aligned():
    assert torch.equal(CausalMask().materialize(3, 5), causal_ref(3, 5))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_sliding_window_mask_allows_keys_fewer_than_window_positions_away(window, offset):
    q, k = 5, 5 + offset
    value = SlidingWindowMask(window).materialize(q, k, query_offset=offset)
    assert value.dtype == torch.bool and value.shape == (1, 1, q, k)
    assert torch.equal(value, window_ref(window, q, k, offset))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_key_padding_mask_blocks_padded_keys_for_every_query(dtype, offset):
    keep = torch.tensor([[1, 1, 1, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1, 1]]).to(dtype)
    keep = keep[:, : 4 + offset]
    q, k = 4, 4 + offset
    mask = KeyPaddingMask(keep)
    value = mask.materialize(q, k, query_offset=offset)
    assert value.dtype == torch.bool and value.shape == (2, 1, 1, k)
    assert torch.equal(full(value, 2, 1, q, k), padding_ref(keep, q, offset))
    assert mask.batch_size() == 2


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("prefix", [0, 2, 5])
def test_prefix_lm_mask_with_int_length(prefix, offset):
    q, k = 5, 5 + offset
    value = PrefixLMMask(prefix).materialize(q, k, query_offset=offset)
    assert value.dtype == torch.bool and value.shape == (1, 1, q, k)
    assert torch.equal(value, prefix_ref([prefix], q, k, offset))


def test_prefix_lm_mask_with_zero_prefix_is_causal():
    assert torch.equal(PrefixLMMask(0).materialize(6, 6), causal_ref(6, 6))


@pytest.mark.parametrize("offset", OFFSETS)
def test_prefix_lm_mask_with_per_row_tensor_lengths(offset):
    lengths = torch.tensor([0, 2, 4])
    q, k = 5, 5 + offset
    mask = PrefixLMMask(lengths)
    value = mask.materialize(q, k, query_offset=offset)
    assert value.dtype == torch.bool
    assert torch.equal(full(value, 3, 1, q, k), prefix_ref(lengths.tolist(), q, k, offset))
    assert mask.batch_size() == 3


@pytest.mark.parametrize("offset", OFFSETS)
def test_document_mask_allows_only_tokens_of_the_same_document(offset):
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 7, 7, 7]])
    q = ids.shape[1] - offset
    mask = DocumentMask(ids)
    value = mask.materialize(q, ids.shape[1], query_offset=offset)
    assert value.dtype == torch.bool
    assert torch.equal(full(value, 2, 1, q, ids.shape[1]), document_ref(ids, q, offset))
    assert mask.batch_size() == 2


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5), (2, 3, 4, 5), (1, 1, 4, 5)])
def test_tensor_mask_bool_keeps_its_values(shape):
    torch.manual_seed(0)
    raw = torch.rand(shape) < 0.5
    value = TensorMask(raw).materialize(4, 5)
    assert value.dtype == torch.bool and value.dim() == 4
    padded = raw.view((1,) * (4 - raw.dim()) + tuple(shape))
    b, h = padded.shape[:2]
    expected = torch.tensor([[[[bool(padded[i0, i1, i, j]) for j in range(5)] for i in range(4)]
                              for i1 in range(h)] for i0 in range(b)])
    assert torch.equal(value, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_mask_float_is_additive_with_dtype_minimum_read_as_minus_infinity(dtype):
    torch.manual_seed(1)
    raw = torch.randn(4, 5, dtype=dtype)
    raw[0, 1] = torch.finfo(dtype).min
    raw[2, 3] = NEG_INF
    raw[3, :] = torch.finfo(dtype).min
    value = TensorMask(raw).materialize(4, 5)
    assert value.dtype == dtype and value.shape == (1, 1, 4, 5)
    minimum = torch.finfo(dtype).min
    expected = torch.tensor([[NEG_INF if float(raw[i, j]) <= minimum else float(raw[i, j]) for j in range(5)]
                             for i in range(4)], dtype=dtype).view(1, 1, 4, 5)
    assert torch.equal(value, expected)


def test_tensor_mask_ignores_query_offset():
    torch.manual_seed(5)
    raw = torch.rand(2, 5) < 0.5
    assert torch.equal(TensorMask(raw).materialize(2, 5, query_offset=3), raw.view(1, 1, 2, 5))


def test_masks_materialize_on_the_meta_device():
    keep = torch.ones(2, 4, dtype=torch.bool)
    masks = [CausalMask(), SlidingWindowMask(2), KeyPaddingMask(keep), PrefixLMMask(torch.tensor([1, 2])),
             DocumentMask(torch.zeros(2, 4, dtype=torch.long)), TensorMask(torch.ones(4, 4, dtype=torch.bool))]
    for mask in masks:
        assert mask.materialize(4, 4, device="meta").device.type == "meta"


# ----- combinations -----


@pytest.mark.parametrize("offset", OFFSETS)
def test_and_of_bool_masks_equals_elementwise_and_of_the_parts(offset):
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [3, 3, 3, 3, 3, 4, 4]])
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    k = ids.shape[1]
    q = k - offset
    combined = CausalMask() & SlidingWindowMask(3) & KeyPaddingMask(keep) & DocumentMask(ids)
    assert isinstance(combined, AllOf) and len(combined.parts) == 4
    value = combined.materialize(q, k, query_offset=offset)
    assert value.dtype == torch.bool
    expected = (causal_ref(q, k, offset) & window_ref(3, q, k, offset) & padding_ref(keep, q, offset)
                & document_ref(ids, q, offset))
    assert torch.equal(full(value, 2, 1, q, k), expected)
    # the same, each entry written out in one loop
    ids_l, keep_l = ids.tolist(), keep.tolist()
    by_hand = by_loops(lambda b, i, j: j <= i and abs(i - j) < 3 and keep_l[b][j] == 1 and ids_l[b][i] == ids_l[b][j],
                       q, k, query_offset=offset, batch=2)
    assert torch.equal(full(value, 2, 1, q, k), by_hand)


def test_and_flattens_nested_combinations_in_order():
    a, b, c, d = CausalMask(), SlidingWindowMask(2), PrefixLMMask(1), SlidingWindowMask(5)
    combined = (a & b) & (c & d)
    assert combined.parts == (a, b, c, d)
    assert (a & (b & c)).parts == (a, b, c)


def test_and_with_a_non_mask_raises_type_error():
    with pytest.raises(TypeError):
        CausalMask() & torch.ones(3, 3, dtype=torch.bool)


@pytest.mark.parametrize("offset", OFFSETS)
def test_and_with_a_float_part_gives_additive_scores_blocked_where_any_bool_part_forbids(offset):
    torch.manual_seed(2)
    q, k = 4, 4 + offset
    scores = torch.randn(q, k)
    scores[0, 0] = NEG_INF
    keep = torch.tensor([[1] * (k - 1) + [0], [0] + [1] * (k - 1)])
    value = (TensorMask(scores) & CausalMask() & KeyPaddingMask(keep)).materialize(q, k, query_offset=offset)
    assert value.dtype == torch.float32
    keep_l = keep.tolist()
    expected = torch.tensor([[[[float(scores[i, j]) if (j <= i + offset and keep_l[b][j]) else NEG_INF
                                for j in range(k)] for i in range(q)]] for b in range(2)])
    assert torch.equal(full(value, 2, 1, q, k), expected)


def test_and_of_float_parts_adds_their_scores():
    torch.manual_seed(3)
    first, second = torch.randn(3, 3), torch.randn(2, 1, 3, 3)
    value = (TensorMask(first) & TensorMask(second) & CausalMask()).materialize(3, 3)
    expected = torch.tensor([[[[float(first[i, j] + second[b, 0, i, j]) if j <= i else NEG_INF for j in range(3)]
                               for i in range(3)]] for b in range(2)])
    torch.testing.assert_close(full(value, 2, 1, 3, 3), expected, rtol=0, atol=1e-6)


def test_defines_order_is_true_for_prefix_lm_and_any_combination_containing_it():
    assert PrefixLMMask(2).defines_order
    assert PrefixLMMask(torch.tensor([1, 2])).defines_order
    for mask in [CausalMask(), SlidingWindowMask(2), KeyPaddingMask(torch.ones(1, 3)),
                 DocumentMask(torch.zeros(1, 3, dtype=torch.long)), TensorMask(torch.ones(3, 3, dtype=torch.bool))]:
        assert not mask.defines_order
    keep = KeyPaddingMask(torch.ones(1, 3))
    assert (keep & PrefixLMMask(1)).defines_order
    assert (SlidingWindowMask(2) & keep & PrefixLMMask(1)).defines_order
    assert not (CausalMask() & keep).defines_order
    assert not (CausalMask() & SlidingWindowMask(2)).defines_order


def test_batch_size_of_a_combination_is_the_batch_of_its_batched_parts():
    keep = KeyPaddingMask(torch.ones(3, 4))
    assert CausalMask().batch_size() is None
    assert (CausalMask() & keep).batch_size() == 3
    assert TensorMask(torch.ones(3, 1, 4, 4, dtype=torch.bool)).batch_size() == 3
    assert TensorMask(torch.ones(3, 4, 4, dtype=torch.bool)).batch_size() is None  # 3-D is [heads, q, k]


# ----- to_dense -----


@pytest.mark.parametrize("offset", OFFSETS)
def test_to_dense_is_a_full_boolean_picture_of_each_mask(offset):
    q = 4
    k = q + offset
    keep = torch.tensor([[1] * (k - 1) + [0], [1] * k])
    ids = torch.tensor([[0] * 2 + [1] * (k - 2), [0] * k])
    cases = [
        (CausalMask(), causal_ref(q, k, offset)),
        (SlidingWindowMask(2), window_ref(2, q, k, offset)),
        (KeyPaddingMask(keep), padding_ref(keep, q, offset)),
        (PrefixLMMask(2), prefix_ref([2], q, k, offset)),
        (PrefixLMMask(torch.tensor([1, 3])), prefix_ref([1, 3], q, k, offset)),
        (DocumentMask(ids), document_ref(ids, q, offset)),
        (CausalMask() & KeyPaddingMask(keep), causal_ref(q, k, offset) & padding_ref(keep, q, offset)),
    ]
    for mask, expected in cases:
        dense = mask.to_dense(q, query_offset=offset)  # num_keys defaults to queries + offset
        assert dense.dtype == torch.bool
        assert dense.shape == expected.shape, mask
        assert torch.equal(dense, expected), mask


def test_to_dense_of_a_float_mask_marks_minus_infinity_as_blocked():
    scores = torch.tensor([[0.0, NEG_INF, 2.0], [torch.finfo(torch.float32).min, -1e4, NEG_INF]])
    dense = TensorMask(scores).to_dense(2, 3)
    expected = torch.tensor([[[[float(scores[i, j]) > torch.finfo(torch.float32).min for j in range(3)]
                               for i in range(2)]]])
    assert torch.equal(dense, expected)


def test_to_dense_keeps_a_heads_dimension():
    torch.manual_seed(7)
    raw = torch.rand(3, 2, 2) < 0.5
    dense = TensorMask(raw).to_dense(2, 2)
    assert dense.shape == (1, 3, 2, 2)
    assert torch.equal(dense[0], raw)


def test_to_dense_with_explicit_num_keys():
    assert torch.equal(SlidingWindowMask(2).to_dense(3, 6), window_ref(2, 3, 6))


# ----- bad inputs -----


@pytest.mark.parametrize("build", [
    pytest.param(lambda: KeyPaddingMask(torch.ones(2, 3, 4)), id="key_padding_3d"),
    pytest.param(lambda: KeyPaddingMask(torch.ones(4)), id="key_padding_1d"),
    pytest.param(lambda: KeyPaddingMask(torch.tensor([[1, 2, 0]])), id="key_padding_value_2"),
    pytest.param(lambda: KeyPaddingMask(torch.tensor([[1.0, 0.5]])), id="key_padding_value_half"),
    pytest.param(lambda: KeyPaddingMask(torch.tensor([[1, -1]])), id="key_padding_value_negative"),
    pytest.param(lambda: KeyPaddingMask([[1, 0]]), id="key_padding_list"),
    pytest.param(lambda: TensorMask(torch.ones(3, 3, dtype=torch.long)), id="tensor_mask_int64"),
    pytest.param(lambda: TensorMask(torch.ones(3, 3, dtype=torch.int32)), id="tensor_mask_int32"),
    pytest.param(lambda: TensorMask(torch.ones(3, dtype=torch.bool)), id="tensor_mask_1d"),
    pytest.param(lambda: TensorMask(torch.ones(1, 1, 1, 3, 3, dtype=torch.bool)), id="tensor_mask_5d"),
    pytest.param(lambda: SlidingWindowMask(0), id="window_0"),
    pytest.param(lambda: SlidingWindowMask(-2), id="window_negative"),
    pytest.param(lambda: SlidingWindowMask(2.0), id="window_float"),
    pytest.param(lambda: SlidingWindowMask(True), id="window_bool"),
    pytest.param(lambda: PrefixLMMask(-1), id="prefix_negative"),
    pytest.param(lambda: PrefixLMMask(torch.tensor([1.0, 2.0])), id="prefix_float_tensor"),
    pytest.param(lambda: PrefixLMMask(torch.tensor([[1, 2]])), id="prefix_2d_tensor"),
    pytest.param(lambda: DocumentMask(torch.zeros(2, 3)), id="document_float"),
    pytest.param(lambda: DocumentMask(torch.zeros(3, dtype=torch.long)), id="document_1d"),
    pytest.param(lambda: as_mask([[True]]), id="as_mask_list"),
])
def test_bad_mask_arguments_raise_input_error(build):
    with pytest.raises(InputError):
        build()


@pytest.mark.parametrize("mask, q, k", [
    pytest.param(TensorMask(torch.ones(3, 4, dtype=torch.bool)), 4, 3, id="tensor_mask_transposed"),
    pytest.param(TensorMask(torch.ones(3, 4, dtype=torch.bool)), 3, 5, id="tensor_mask_too_few_keys"),
    pytest.param(TensorMask(torch.zeros(2, 1, 3, 3)), 4, 4, id="tensor_mask_float_wrong_queries"),
    pytest.param(KeyPaddingMask(torch.ones(2, 3)), 4, 4, id="key_padding_wrong_keys"),
    pytest.param(DocumentMask(torch.zeros(1, 3, dtype=torch.long)), 4, 4, id="document_wrong_tokens"),
])
def test_mask_that_does_not_fit_the_scores_raises_input_error_at_materialize(mask, q, k):
    with pytest.raises(InputError):
        mask.materialize(q, k)


def test_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        SlidingWindowMask(0)


def test_as_mask_wraps_tensors_and_passes_masks_through():
    causal = CausalMask()
    assert as_mask(None) is None
    assert as_mask(causal) is causal
    raw = torch.ones(2, 2, dtype=torch.bool)
    wrapped = as_mask(raw)
    assert isinstance(wrapped, TensorMask) and wrapped.value is raw


# ----- prepare_attention_mask -----


def test_prepare_lone_causal_mask_over_square_scores_uses_the_causal_flag():
    prepared = prepare_attention_mask(CausalMask(), 5, 5)
    assert prepared.is_causal is True
    assert prepared.value is None and prepared.empty_rows is None


def test_prepare_without_mask_is_empty():
    prepared = prepare_attention_mask(None, 3, 3)
    assert prepared == PreparedMask()


@pytest.mark.parametrize("q, k, offset", [(3, 5, 2), (3, 5, 0), (1, 6, 4), (2, 6, 4)])
def test_prepare_causal_mask_with_offset_or_rectangular_scores_materializes_it(q, k, offset):
    prepared = prepare_attention_mask(CausalMask(), q, k, query_offset=offset)
    assert prepared.is_causal is False
    assert torch.equal(prepared.value, causal_ref(q, k, offset))


def test_prepare_causal_mask_for_one_query_after_every_key_needs_no_mask():
    # Decoding one token after 5 cached ones: the causal mask allows every key.
    assert bool(causal_ref(1, 6, 5).all())
    prepared = prepare_attention_mask(CausalMask(), 1, 6, query_offset=5)
    assert prepared == PreparedMask()


def test_prepare_causal_mask_combined_with_another_mask_materializes_it():
    keep = torch.tensor([[1, 1, 0, 1]])
    prepared = prepare_attention_mask(CausalMask() & KeyPaddingMask(keep), 4, 4)
    assert prepared.is_causal is False
    assert torch.equal(full(prepared.value, 1, 1, 4, 4), causal_ref(4, 4) & padding_ref(keep, 4))


def test_prepare_reports_empty_bool_rows_and_opens_them_up():
    keep = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = CausalMask() & KeyPaddingMask(keep)
    allowed = causal_ref(4, 4) & padding_ref(keep, 4)
    prepared = prepare_attention_mask(mask, 4, 4)
    empty = torch.tensor([[not any(allowed[b, 0, i].tolist()) for i in range(4)] for b in range(2)])
    assert empty.tolist() == [[True, True, False, False], [False, False, False, False]]
    assert torch.equal(full(prepared.empty_rows, 2, 1, 4, 1)[..., 0], empty.view(2, 1, 4))
    value = full(prepared.value, 2, 1, 4, 4)
    for b in range(2):
        for i in range(4):
            if empty[b, i]:
                assert bool(value[b, 0, i].all())  # opened up: no all-blocked row reaches the kernel
            else:
                assert torch.equal(value[b, 0, i], allowed[b, 0, i])


def test_prepare_reports_empty_float_rows_and_zeroes_them():
    torch.manual_seed(6)
    scores = torch.randn(3, 4)
    scores[1] = NEG_INF
    scores[2, 0] = NEG_INF
    prepared = prepare_attention_mask(TensorMask(scores), 3, 4)
    assert prepared.empty_rows.view(-1).tolist() == [False, True, False]
    value = prepared.value.view(3, 4)
    assert torch.equal(value[1], torch.zeros(4))
    assert torch.equal(value[[0, 2]], scores[[0, 2]])


def test_prepare_without_empty_rows_reports_none():
    prepared = prepare_attention_mask(SlidingWindowMask(2), 4, 4)
    assert prepared.empty_rows is None
    assert torch.equal(prepared.value, window_ref(2, 4, 4))


def test_prepare_adds_a_bias_and_blocks_where_the_mask_forbids():
    torch.manual_seed(4)
    bias = torch.randn(1, 2, 4, 4)
    prepared = prepare_attention_mask(CausalMask(), 4, 4, bias=bias)
    assert prepared.is_causal is False
    expected = torch.tensor([[[[float(bias[0, h, i, j]) if j <= i else NEG_INF for j in range(4)] for i in range(4)]
                              for h in range(2)]])
    assert torch.equal(prepared.value, expected)
    # a float mask and a bias add up
    extra = torch.randn(4, 4)
    summed = prepare_attention_mask(TensorMask(extra), 4, 4, bias=bias)
    torch.testing.assert_close(summed.value, bias + extra, rtol=0, atol=1e-6)
    # bias alone
    assert torch.equal(prepare_attention_mask(None, 4, 4, bias=bias).value, bias)


# ----- block-causal masks and masks at chosen positions -----


@pytest.mark.parametrize("offset", OFFSETS)
def test_block_causal_mask_sees_its_own_segment_and_earlier_ones(offset):
    from formerkit.nn.masks import BlockCausalMask

    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1, 2, 2, 2]])
    mask = BlockCausalMask(segments)
    ids = segments.tolist()
    expected = by_loops(lambda b, i, j: ids[b][j] <= ids[b][i], 9 - offset, 9, query_offset=offset, batch=2)
    assert torch.equal(full(mask.materialize(9 - offset, 9, query_offset=offset), 2, 1, 9 - offset, 9), expected)
    assert mask.defines_order and mask.batch_size() == 2
    with pytest.raises(InputError, match="BlockCausalMask: expected an integer tensor"):
        BlockCausalMask(torch.zeros(2, 3))


def test_every_mask_at_chosen_positions_equals_its_dense_picture_read_there():
    from formerkit.nn.masks import BlockCausalMask, SoftCausalMask

    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 12, generator=generator) < 0.8
    masks = [CausalMask(), SlidingWindowMask(3, global_tokens=2), KeyPaddingMask(keep),
             PrefixLMMask(torch.tensor([2, 5])), DocumentMask(torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])),
             BlockCausalMask(torch.tensor([[0] * 4 + [1] * 8, [0, 1] * 6]).cumsum(1)), SoftCausalMask(0.5),
             TensorMask(torch.randn(2, 1, 12, 12, generator=generator)),
             CausalMask() & KeyPaddingMask(keep) & SlidingWindowMask(4)]
    queries = torch.tensor([[0, 5, 11], [3, 4, 7]])  # two blocks of three queries
    keys = torch.tensor([[0, 1, 2, 9], [11, 3, 3, 6]])  # any keys, in any order, repeats allowed
    for mask in masks:
        dense = mask.materialize(12, 12).expand(2, 1, 12, 12)
        picked = mask.materialize_at(queries, keys, num_keys=12).expand(2, 1, 2, 3, 4)
        for block in range(2):
            expected = dense[:, :, queries[block]][:, :, :, keys[block]]
            assert torch.equal(picked[:, :, block], expected), mask
