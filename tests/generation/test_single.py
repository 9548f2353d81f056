"""decode_sequence: one TokenRequest decoded alone gives what generate gives, with the model's own log-softmax."""

from __future__ import annotations

import threading

import pytest
import torch

from formerkit import build_model
from formerkit.errors import InputError
from formerkit.generation.requests import TokenRequest
from formerkit.generation.sampling import SamplingConfig
from formerkit.generation.single import decode_sequence

from ..conftest import token_config


@pytest.fixture(scope="module")
def model():
    from ..conftest import randomize_weights

    torch.manual_seed(0)
    return randomize_weights(build_model(token_config(vocab_size=23, max_seq_len=12, position="rope")), 3).eval()


def test_greedy_tokens_are_generates_and_logprobs_are_the_full_recompute_log_softmax(model):
    prompt = [3, 7, 1, 9]
    events = list(decode_sequence(model, TokenRequest(tuple(prompt), 6, logprobs=3)))
    expected = model.generate(torch.tensor([prompt]), 6, temperature=0)[0, len(prompt):].tolist()
    assert [event.token for event in events] == expected
    assert [event.finish_reason for event in events] == [None] * 5 + ["length"]
    # Each step's distribution from one forward pass over the whole sequence so far (no cache).
    with torch.no_grad():
        logits = model(torch.tensor([prompt + expected]))[0].float()
    reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
    for step, event in enumerate(events):
        assert event.logprob == pytest.approx(float(reference[step, event.token]), abs=1e-5)
        values, indices = reference[step].topk(3)
        assert [token for token, _ in event.top_logprobs] == indices.tolist()
        assert [value for _, value in event.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)


def test_a_seeded_sample_is_generates_with_that_seed(model):
    prompt = (2, 5, 8)
    sampling = SamplingConfig(temperature=1.3, top_k=10, top_p=0.9)
    events = list(decode_sequence(model, TokenRequest(prompt, 7, sampling, seed=11)))
    expected = model.generate(torch.tensor([prompt]), 7, temperature=1.3, top_k=10, top_p=0.9, seed=11)
    assert [event.token for event in events] == expected[0, len(prompt):].tolist()
    assert all(event.logprob is None and event.top_logprobs is None for event in events)


def test_a_stop_token_ends_the_sequence_with_finish_reason_stop(model):
    prompt = (3, 7, 1, 9)
    greedy = [event.token for event in decode_sequence(model, TokenRequest(prompt, 6))]
    stop = greedy[2]
    first = greedy.index(stop)
    events = list(decode_sequence(model, TokenRequest(prompt, 6, stop_ids=frozenset({stop}))))
    assert [event.token for event in events] == greedy[:first + 1]
    assert events[-1].finish_reason == "stop" and all(event.finish_reason is None for event in events[:-1])


def test_the_context_ends_a_sequence_and_cancelling_stops_it(model):
    prompt = tuple(range(1, 11))  # 10 of the 12 positions: 3 new tokens fit (the last is never fed back)
    events = list(decode_sequence(model, TokenRequest(prompt, 20)))
    assert len(events) == 3 and events[-1].finish_reason == "length"
    cancelled = threading.Event()
    taken = []
    for event in decode_sequence(model, TokenRequest((1, 2), 8), cancelled):
        taken.append(event)
        if len(taken) == 2:
            cancelled.set()
    assert len(taken) == 2
    with pytest.raises(InputError, match="context of 12"):
        list(decode_sequence(model, TokenRequest(tuple(range(13)), 1)))
    with pytest.raises(InputError, match=r"ids: expected token ids in \[0, 23\)"):
        list(decode_sequence(model, TokenRequest((1, 99), 1)))
