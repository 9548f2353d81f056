"""Masked generation (formerkit.generation.masked): the training masks against MaskGIT's cosine schedule, the
decoding schedule, the unmasking loop's invariants, classifier-free guidance on logits, and a masked diffusion LM's
continuation."""

from __future__ import annotations

import math

import pytest
import torch

from formerkit.errors import InputError
from formerkit.generation.masked import (
    cosine_masking_ratio,
    guided_logits,
    iterative_unmask,
    masked_count,
    random_mask,
    still_masked,
    unmask_continuation,
)

from ..conftest import token_config


def test_the_masking_ratio_is_cos_pi_over_2_u():
    u = torch.tensor([0.0, 1 / 3, 0.5, 2 / 3, 1.0])
    expected = torch.tensor([1.0, math.sqrt(3) / 2, math.sqrt(0.5), 0.5, 0.0])
    assert torch.allclose(cosine_masking_ratio(u), expected, atol=1e-6)


def test_the_masked_count_is_ceil_ratio_times_length_between_1_and_length():
    ratios = torch.tensor([1.0, 0.5, 0.26, 0.01, 0.0])
    # 64 tokens: ceil(64), ceil(32), ceil(16.64), ceil(0.64); a ratio of 0 still masks one token.
    assert masked_count(ratios, 64).tolist() == [64, 32, 17, 1, 1]


def test_a_random_mask_hides_exactly_the_count_of_each_row():
    counts = torch.tensor([1, 5, 16, 9])
    mask = random_mask(counts, 16, torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == counts.tolist()
    # Uniform placement: over many rows each position is hidden about equally often.
    many = random_mask(torch.full((4000,), 4), 16, torch.Generator().manual_seed(1)).float().mean(dim=0)
    assert torch.allclose(many, torch.full((16,), 0.25), atol=0.03)


@pytest.mark.parametrize(("length", "steps"), [(64, 8), (64, 12), (16, 16), (5, 9), (64, 1)])
def test_the_cosine_decoding_schedule_is_floor_length_cos_pi_over_2_t_over_n(length, steps):
    expected = [math.floor(length * math.cos(math.pi / 2 * t / steps)) for t in range(1, steps)] + [0]
    assert still_masked(length, steps) == expected
    revealed = [before - after for before, after in zip([length, *expected], expected)]
    assert sum(revealed) == length and min(revealed) >= 0


def test_the_linear_decoding_schedule_is_floor_length_times_1_minus_t_over_n():
    assert still_masked(10, 4, "linear") == [7, 5, 2, 0]  # floor(7.5), floor(5), floor(2.5), 0


@pytest.mark.parametrize(("steps", "schedule", "field"), [(0, "cosine", "steps"), (2.5, "cosine", "steps"),
                                                          (4, "quadratic", "schedule")])
def test_a_bad_schedule_is_refused_by_name(steps, schedule, field):
    with pytest.raises(InputError, match=field):
        still_masked(8, steps, schedule)


class Recorder:
    """A stand-in model: random logits, and a record of the token batches it was asked about."""

    def __init__(self, vocab: int, mask_id: int, seed: int = 0):
        self.vocab, self.mask_id, self.calls = vocab, mask_id, []
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, tokens):
        self.calls.append(tokens.clone())
        return torch.randn(*tokens.shape, self.vocab, generator=self.generator) * 3


@pytest.mark.parametrize(("order", "choice_temperature", "schedule"),
                         [("confidence", 0.0, "cosine"), ("confidence", 4.5, "cosine"), ("random", 0.0, "linear")])
def test_unmasking_follows_the_schedule_and_never_changes_a_committed_token(order, choice_temperature, schedule):
    mask_id, steps = 9, 6
    tokens = torch.full((3, 21), mask_id)
    tokens[:, 0] = torch.tensor([1, 2, 3])  # a condition token, never masked
    masked = tokens == mask_id
    model = Recorder(vocab=9, mask_id=mask_id)
    out = iterative_unmask(model, tokens, masked, steps=steps, schedule=schedule, order=order,
                           choice_temperature=choice_temperature, generator=torch.Generator().manual_seed(3))
    # One pass per step; before step t, still_masked(...)[t - 1] positions hold [MASK] in every row.
    assert len(model.calls) == steps
    before = [20, *still_masked(20, steps, schedule)[:-1]]
    for call, count in zip(model.calls, before):
        assert (call == mask_id).sum(dim=1).tolist() == [count] * 3
    assert not (out == mask_id).any() and (out[:, 0] == tokens[:, 0]).all()
    # A token once written stays: every later call, and the result, hold it.
    for earlier, later in zip(model.calls, [*model.calls[1:], out]):
        written = earlier != mask_id
        assert torch.equal(later[written], earlier[written])


def test_at_temperature_0_by_confidence_the_most_likely_tokens_are_committed_first():
    # Position i predicts token i % 4 with confidence growing with i: two steps of 4 tokens commit 4..7 first.
    logits = torch.full((1, 8, 4), -10.0)
    for position in range(8):
        logits[0, position, position % 4] = float(position)
    calls = []

    def predict(tokens):
        calls.append(tokens.clone())
        return logits

    out = iterative_unmask(predict, torch.full((1, 8), 4), torch.ones(1, 8, dtype=torch.bool), steps=2,
                           schedule="linear", temperature=0.0)
    assert calls[1][0].tolist() == [4, 4, 4, 4, 0, 1, 2, 3]
    assert out[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_unmasking_refuses_rows_with_different_counts_and_a_bad_order_by_name():
    tokens = torch.zeros(2, 4, dtype=torch.long)
    uneven = torch.tensor([[True, True, False, False], [True, False, False, False]])
    with pytest.raises(InputError, match="masked"):
        iterative_unmask(lambda t: torch.zeros(*t.shape, 3), tokens, uneven, steps=2)
    with pytest.raises(InputError, match="order"):
        iterative_unmask(lambda t: torch.zeros(*t.shape, 3), tokens, uneven[:1].expand(2, 4), steps=2,
                         order="left_to_right")


def test_guidance_at_scale_1_is_the_conditional_logits_in_one_pass():
    weight = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    calls = []

    def model(tokens):
        calls.append(len(tokens))
        return weight[tokens]

    conditional, unconditional = torch.tensor([[0, 1, 2]]), torch.tensor([[4, 1, 2]])
    assert torch.equal(guided_logits(model, conditional, unconditional, 1.0), weight[conditional])
    assert calls == [1]
    # Any other scale: u + g (c - u), both rows through the model together.
    guided = guided_logits(model, conditional, unconditional, 3.0)
    expected = weight[unconditional] + 3.0 * (weight[conditional] - weight[unconditional])
    assert torch.allclose(guided, expected) and calls == [1, 2]
    assert torch.allclose(guided_logits(model, conditional, unconditional, 0.0), weight[unconditional])


def test_a_masked_diffusion_continuation_keeps_the_prompt_and_never_writes_mask():
    from formerkit.models import build_model

    config = token_config("encoder", vocab_size=11, max_seq_len=12, head={"kind": "masked_lm"})
    model = build_model(config)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    new = unmask_continuation(model, prompt, 6, steps=3, generator=torch.Generator().manual_seed(0))
    assert new.shape == (1, 6) and int(new.max()) < 10  # id 10 is [MASK]
    # The prompt is cut from the left to fit the context (12 = 6 prompt + 6 new): the last 6 prompt tokens are read.
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    unmask_continuation(model, prompt, 6, steps=2, generator=torch.Generator().manual_seed(0))
    assert seen[0][0, :6].tolist() == [3, 4, 5, 6, 7, 8] and (seen[0][0, 6:] == 10).all()
    with pytest.raises(InputError, match="max_new_tokens"):
        unmask_continuation(model, prompt, 13, steps=2)
