"""Continuous batching: every request the engine runs beside others gives what it gives alone.

The reference is ``model.generate`` of each prompt alone (batch of one) and the model's own log-softmax over the
whole sequence recomputed without a cache. Requests of different prompt and output lengths are admitted at different
steps, so rows start at different cache columns, the cache is shifted right for a longer newcomer and compacted
when its columns run out; each row must still produce its lone tokens and log-probabilities.
"""

from __future__ import annotations

import threading

import pytest
import torch

import formerkit
from formerkit import InputError, ModelConfig
from formerkit.generation.engine import Engine, EngineFull
from formerkit.generation.requests import TokenRequest
from formerkit.generation.sampling import SamplingConfig

from ..conftest import randomize_weights

VOCAB = 29
MAX_LEN = 24
TOL = 1e-5
GREEDY = SamplingConfig(temperature=0.0)


def make_model(position: str = "learned", seed: int = 0, **attention) -> formerkit.Transformer:
    config = ModelConfig(arch="decoder", width=32, num_layers=2, max_seq_len=MAX_LEN,
                         attention={"num_heads": 4, **attention}, position={"kind": position},
                         stem={"kind": "tokens", "vocab_size": VOCAB}, head={"kind": "lm"})
    torch.manual_seed(seed)
    # O(1)-scale weights: sharp attention patterns, so a row that saw a neighbour's keys would show it.
    return randomize_weights(formerkit.build_model(config), seed, std="fan_in").eval()


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (length,), generator=generator).tolist() for length in lengths]


def alone(model, prompt: list[int], count: int, **sampling) -> list[int]:
    sampling.setdefault("temperature", 0.0)
    return model.generate(torch.tensor(prompt), count, **sampling)[len(prompt):].tolist()


def recomputed_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The log-probability of each new token, from one forward pass over prompt + tokens without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
    return logits.float().log_softmax(dim=-1).gather(1, torch.tensor(tokens).view(-1, 1)).flatten()


def run_staggered(engine: Engine, requests: list[TokenRequest], arrivals: list[int]):
    """Submits request i before step ``arrivals[i]`` and steps until every ticket is done."""
    tickets, step = [None] * len(requests), 0
    while step <= max(arrivals) or not all(ticket.done for ticket in tickets):
        for index, arrival in enumerate(arrivals):
            if arrival == step:
                tickets[index] = engine.submit(requests[index])
        engine.step()
        step += 1
    return tickets


CASES = {"learned": {}, "rope": {}, "alibi": {}, "relative": {}, "none": {}, "sliding_window": {"sliding_window": 4}}


@pytest.mark.parametrize("case", list(CASES))
def test_concurrent_greedy_requests_equal_each_alone(case):
    position = "learned" if case == "sliding_window" else case
    model = make_model(position, **CASES[case])
    lengths = [3, 9, 1, 5, 14, 2, 7, 4, 6, 11, 2, 8]
    counts = [6, 4, 12, 9, 3, 10, 8, 5, 12, 7, 10, 9]
    arrivals = [0, 0, 1, 3, 4, 4, 9, 12, 14, 15, 18, 20]
    texts = prompts(lengths)
    engine = Engine(model, max_running=3, max_queued=8, initial_columns=8)
    requests = [TokenRequest(tuple(text), count, logprobs=0) for text, count in zip(texts, counts)]
    tickets = run_staggered(engine, requests, arrivals)
    for text, count, ticket in zip(texts, counts, tickets):
        expected = alone(model, text, count)
        assert ticket.tokens == expected
        got = torch.tensor([event.logprob for event in ticket.events])
        torch.testing.assert_close(got, recomputed_logprobs(model, text, expected), atol=TOL, rtol=0)
        assert [event.finish_reason for event in ticket.events] == [None] * (count - 1) + ["length"]
    stats = engine.stats()
    # The scenario exercises every cache move: a longer newcomer (shift right), growth, compaction, rows leaving.
    assert stats["compactions"] > 0 and stats["grown"] > 0
    assert stats["admitted"] == len(requests) and stats["running"] == 0


def test_top_logprobs_are_the_models_own_log_softmax():
    model = make_model("rope")
    text = prompts([5])[0]
    engine = Engine(model, max_running=2)
    ticket = engine.submit(TokenRequest(tuple(text), 4, logprobs=3))
    other = engine.submit(TokenRequest(tuple(prompts([2], seed=5)[0]), 6))
    while not (ticket.done and other.done):
        engine.step()
    with torch.no_grad():
        log_probs = model(torch.tensor([text + ticket.tokens[:-1]]))[0, len(text) - 1:].float().log_softmax(-1)
    for index, event in enumerate(ticket.events):
        values, ids = log_probs[index].topk(3)
        assert [token for token, _ in event.top_logprobs] == ids.tolist()
        torch.testing.assert_close(torch.tensor([value for _, value in event.top_logprobs]), values, atol=TOL, rtol=0)
    assert all(event.logprob is None and event.top_logprobs is None for event in other.events)


def test_seeded_sampling_is_independent_of_neighbours():
    model = make_model("alibi")
    text = prompts([4])[0]
    sampling = SamplingConfig(temperature=1.3, top_k=12, top_p=0.95)
    seeded = TokenRequest(tuple(text), 10, sampling=sampling, seed=7)
    by_itself = run_staggered(Engine(model, max_running=4), [seeded], [0])[0]
    neighbours = [TokenRequest(tuple(p), 8, sampling=SamplingConfig(temperature=1.0)) for p in prompts([6, 2])] + \
                 [TokenRequest(tuple(prompts([3], seed=9)[0]), 5, sampling=sampling, seed=8)]
    crowded = run_staggered(Engine(model, max_running=4), neighbours + [seeded], [0, 0, 1, 2])[-1]
    assert crowded.tokens == by_itself.tokens
    # ... and both are what generate draws with the same seed.
    assert by_itself.tokens == alone(model, text, 10, temperature=1.3, top_k=12, top_p=0.95, seed=7)
    other_seed = run_staggered(Engine(model, max_running=1), [TokenRequest(tuple(text), 10, sampling=sampling,
                                                                              seed=8)], [0])[0]
    assert other_seed.tokens != by_itself.tokens


def test_a_stop_token_ends_its_row_and_is_reported():
    model = make_model("rope")
    text = prompts([6])[0]
    expected = alone(model, text, 10)
    stop = expected[3]
    first = expected.index(stop)
    tickets = run_staggered(Engine(model, max_running=2),
                            [TokenRequest(tuple(text), 10, stop_ids=frozenset({stop})),
                             TokenRequest(tuple(prompts([3], seed=4)[0]), 10)], [0, 0])
    assert tickets[0].tokens == expected[:first + 1]
    assert tickets[0].finish_reason == "stop"
    assert tickets[1].tokens == alone(model, prompts([3], seed=4)[0], 10)


def test_cancelling_frees_the_row_and_the_others_go_on_unchanged():
    model = make_model("alibi")
    texts = prompts([4, 6, 3])
    engine = Engine(model, max_running=2, max_queued=4)
    keep_going = engine.submit(TokenRequest(tuple(texts[0]), 12))
    dropped = engine.submit(TokenRequest(tuple(texts[1]), 12))
    waiting = engine.submit(TokenRequest(tuple(texts[2]), 8))
    for _ in range(3):
        engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["queued"] == 1
    dropped.cancel()
    engine.step()  # the cancelled row leaves before the step, the waiting request takes it
    assert dropped.row is None and len(dropped.tokens) == 4 and waiting.row is not None
    assert engine.stats()["cancelled"] == 1
    while not (keep_going.done and waiting.done):
        engine.step()
    assert keep_going.tokens == alone(model, texts[0], 12)
    assert waiting.tokens == alone(model, texts[2], 8)
    # A queued request cancelled never runs and leaves the queue at once.
    engine = Engine(model, max_running=1, max_queued=2)
    engine.submit(TokenRequest(tuple(texts[0]), 4))
    queued = engine.submit(TokenRequest(tuple(texts[1]), 4))
    queued.cancel()
    assert engine.stats()["queued"] == 1
    while engine.step():
        pass
    assert queued.events == [] and engine.stats()["admitted"] == 1


def test_limits_refuse_with_engine_full():
    model = make_model()
    text = tuple(prompts([3])[0])
    engine = Engine(model, max_running=2, max_queued=1)
    for _ in range(3):  # two free rows and one queue place
        engine.submit(TokenRequest(text, 5))
    with pytest.raises(EngineFull, match="2 sequences running|max_queued 1"):
        engine.submit(TokenRequest(text, 5))
    engine.step()  # two run, one waits: the queue is full
    assert engine.stats()["running"] == 2 and engine.stats()["queued"] == 1
    with pytest.raises(EngineFull, match="max_queued 1"):
        engine.submit(TokenRequest(text, 5))
    assert engine.stats()["refused"] == 2


def test_a_request_past_the_context_stops_at_it():
    model = make_model("rope")
    text = prompts([20])[0]
    ticket = run_staggered(Engine(model, max_running=2), [TokenRequest(tuple(text), 50)], [0])[0]
    # 20 prompt tokens + 4 fed back fill the 24 positions; the fifth new token is the last.
    assert ticket.tokens == alone(model, text, MAX_LEN - 20 + 1)
    assert ticket.finish_reason == "length"
    with pytest.raises(InputError, match="no room in the context"):
        Engine(model).submit(TokenRequest(tuple(prompts([MAX_LEN + 1])[0]), 1))
    with pytest.raises(InputError, match=r"token ids in \[0, 29\)"):
        Engine(model).submit(TokenRequest((3, 40), 1))


def test_models_the_engine_cannot_batch_are_refused():
    config = ModelConfig(arch="encoder_decoder", width=32, num_layers=1, num_decoder_layers=1, max_seq_len=16,
                         attention={"num_heads": 2}, stem={"kind": "tokens", "vocab_size": VOCAB},
                         head={"kind": "lm"})
    with pytest.raises(InputError, match="decoder language models"):
        Engine(formerkit.build_model(config))
    with pytest.raises(InputError, match="global_tokens"):
        Engine(make_model(sliding_window=4, global_tokens=1))
    with pytest.raises(InputError, match="max_running"):
        Engine(make_model(), max_running=0)


def test_the_loop_in_its_own_thread_serves_concurrent_callers():
    model = make_model("rope")
    texts = prompts([3, 8, 5, 2])
    engine = Engine(model, max_running=2, max_queued=4).start()
    results: dict[int, list[int]] = {}

    def client(index: int) -> None:
        results[index] = [event.token for event in engine.events(TokenRequest(tuple(texts[index]), 6 + index))]

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    engine.close()
    for index, text in enumerate(texts):
        assert results[index] == alone(model, text, 6 + index)


def test_window_policy_admits_nobody_until_the_batch_has_ended():
    model = make_model("rope")
    texts = prompts([3, 6, 4])
    engine = Engine(model, max_running=4, policy="window", wait_ms=0)
    first = [engine.submit(TokenRequest(tuple(texts[index]), count)) for index, count in ((0, 5), (1, 3))]
    engine.step()
    late = engine.submit(TokenRequest(tuple(texts[2]), 4))
    steps = 0
    while not all(ticket.done for ticket in first):
        assert late.row is None and engine.stats()["queued"] == 1
        engine.step()
        steps += 1
        if first[1].done and not first[0].done:  # finished, but its row stays in the batch (as generate pads it)
            assert first[1].row is not None and engine.stats()["running"] == 2
    assert first[0].row is None and first[1].row is None
    assert steps == 3  # the five tokens of the longest: two in the first step, one per step after
    while not late.done:
        engine.step()
    for ticket, text, count in zip(first + [late], texts, (5, 3, 4)):
        assert ticket.tokens == alone(model, text, count)
    # The continuous policy admits it at the next step.
    engine = Engine(model, max_running=4)
    for index, count in ((0, 5), (1, 3)):
        engine.submit(TokenRequest(tuple(texts[index]), count))
    engine.step()
    late = engine.submit(TokenRequest(tuple(texts[2]), 4))
    engine.step()
    assert late.row is not None and len(late.tokens) == 2


def test_calls_run_in_the_engine_thread_between_steps():
    model = make_model()
    engine = Engine(model, max_running=2).start()
    try:
        assert engine.call(threading.current_thread).result(timeout=30).name == "formerkit-engine"
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0).result(timeout=30)
    finally:
        engine.close()


def test_closing_fails_what_still_waits_and_refuses_more():
    engine = Engine(make_model(), max_running=1)
    running = engine.submit(TokenRequest((1, 2), 10))
    engine.step()
    waiting = engine.submit(TokenRequest((3,), 4))
    engine.close()
    assert "closed" in str(running.error) and "closed" in str(waiting.error)
    assert running.row is None and engine.stats()["running"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(TokenRequest((3,), 4))


def test_a_prompt_tuned_model_keeps_its_virtual_tokens_in_every_row():
    from formerkit.adapt.prompt import apply_prompt

    model = make_model("rope")
    apply_prompt(model, num_virtual_tokens=3)
    with torch.no_grad():  # virtual tokens that change the answers
        model.input_prompt["default"].embedding.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    model.eval()
    texts, counts = prompts([3, 9, 1, 5]), [6, 4, 9, 5]
    tickets = run_staggered(Engine(model, max_running=2, initial_columns=8),
                            [TokenRequest(tuple(text), count) for text, count in zip(texts, counts)], [0, 0, 1, 3])
    for text, count, ticket in zip(texts, counts, tickets):
        assert ticket.tokens == alone(model, text, count)


def test_the_engine_steps_through_the_lean_step_and_gives_what_the_general_forward_gives(monkeypatch):
    from formerkit.generation.lean_step import LeanStep

    model = make_model("rope")
    texts, counts, arrivals = prompts([3, 9, 1, 5, 2]), [6, 4, 9, 5, 7], [0, 0, 1, 3, 6]

    def run(build):
        monkeypatch.setattr(LeanStep, "build", staticmethod(build))
        engine = Engine(model, max_running=3, max_queued=8, initial_columns=8)
        requests = [TokenRequest(tuple(text), count, logprobs=0) for text, count in zip(texts, counts)]
        return engine, run_staggered(engine, requests, arrivals)

    built, build = [], LeanStep.build
    engine, lean = run(lambda *args: built.append(build(*args)) or built[-1])
    assert len(built) == 1 and isinstance(built[0], LeanStep)  # once, at the first decode step
    # Work run through ``call`` may change the model: the next step builds the lean step again.
    engine.call(lambda: None)
    run_staggered(engine, [TokenRequest(tuple(texts[0]), 3)], [0])
    assert len(built) == 2
    _, general = run(lambda *args: None)
    for ours, theirs in zip(lean, general):
        assert ours.tokens == theirs.tokens
        torch.testing.assert_close(torch.tensor([event.logprob for event in ours.events]),
                                   torch.tensor([event.logprob for event in theirs.events]), atol=1e-6, rtol=0)
