"""Speculative decoding: greedy output equals the model's own greedy output whatever the draft; sampled output follows
the model's distribution; the cache after rolling back equals a recompute.

References: plain ``generate`` (itself checked against a full recompute in test_cache.py), the model's own forward
pass without a cache, and the target distribution written out (the model's probabilities, multiplied along the
sequence) against which draws are compared.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import formerkit
from formerkit import InputError
from formerkit.generation.requests import TokenRequest
from formerkit.generation.sampling import SamplingConfig
from formerkit.generation.speculative import (
    Draft,
    ModelDraft,
    NGramDraft,
    SpeculativeDecoder,
    SpeculativeStats,
    verify,
)
from formerkit.generation.speculative_serving import speculative_events
from formerkit.nn.cache import KVCache

from ..conftest import randomize_weights, token_config

VOCAB = 13
GREEDY = SamplingConfig(temperature=0.0)
# A prompt that repeats itself, so prompt lookup has something to find.
REPETITIVE = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3]


def build(seed: int, *, vocab: int = VOCAB, max_seq_len: int = 48, **fields) -> formerkit.Transformer:
    torch.manual_seed(seed)
    model = formerkit.build_model(token_config(vocab_size=vocab, max_seq_len=max_seq_len, **fields))
    # O(1)-scale weights: sharp distributions, so a wrong token shows.
    return randomize_weights(model, seed, std="fan_in").eval()


@pytest.fixture(scope="module")
def target():
    return build(0)


@pytest.fixture(scope="module")
def other():
    """A different, smaller random model over the same vocabulary: its guesses are mostly wrong."""
    return build(1, num_layers=1, width=16, num_heads=2)


class AlwaysWrong(Draft):
    """Guesses, at every place, a token the target would not pick greedily (its argmax + 1), so every guess is
    rejected."""

    num_tokens = 3

    def __init__(self, model):
        self.model = model

    def start(self, model, max_length):
        return self

    def propose(self, sequence, count, sampling, generator):
        guesses = []
        for _ in range(count):
            with torch.no_grad():
                best = int(self.model(torch.tensor([sequence + guesses]))[0, -1].argmax())
            guesses.append((best + 1) % VOCAB)
        return guesses, None


def plain(model, prompt, max_new_tokens, **options):
    return model.generate(torch.tensor([prompt]), max_new_tokens, temperature=0, **options)


@pytest.mark.parametrize("draft_name", ["target", "other", "always_wrong", "ngram", "ngram_short"])
def test_greedy_output_equals_plain_greedy(target, other, draft_name):
    draft = {"target": lambda: target, "other": lambda: other, "always_wrong": lambda: AlwaysWrong(target),
             "ngram": lambda: "ngram", "ngram_short": lambda: NGramDraft(ngram_size=2, num_tokens=3)}[draft_name]()
    stats = SpeculativeStats()
    out = plain(target, REPETITIVE, 20, draft=draft, draft_stats=stats)
    assert torch.equal(out, plain(target, REPETITIVE, 20))
    assert stats.tokens == 20
    # Each pass makes its own token plus the kept guesses.
    assert stats.tokens == 1 + stats.rounds + stats.accepted
    if draft_name == "target":
        assert stats.proposed > 0 and stats.accepted == stats.proposed
    if draft_name == "always_wrong":
        assert stats.proposed > 0 and stats.accepted == 0 and stats.rounds == 19


def test_target_as_draft_needs_one_pass_per_k_plus_one_tokens(target):
    stats = SpeculativeStats()
    plain(target, [3, 1, 4], 21, draft=ModelDraft(target, num_tokens=4), draft_stats=stats)
    # 1 token from the prompt's pass, then passes of 4 kept guesses + 1 own token.
    assert (stats.rounds, stats.proposed, stats.accepted) == (4, 16, 16)


@pytest.mark.parametrize("fields", [{"position": {"kind": "rope"}}, {"position": {"kind": "alibi"}},
                                    {"attention": {"sliding_window": 4}}],
                         ids=["rope", "alibi", "sliding_window"])
def test_greedy_output_equals_plain_greedy_across_positions_and_windows(fields):
    model = build(2, **fields)
    draft = build(3, num_layers=1, **fields)
    for proposer in (model, draft, "ngram"):
        assert torch.equal(plain(model, REPETITIVE, 16, draft=proposer), plain(model, REPETITIVE, 16))


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 3])
def test_short_generations_equal_plain(target, max_new_tokens):
    assert torch.equal(plain(target, [5, 6], max_new_tokens, draft=target), plain(target, [5, 6], max_new_tokens))


def test_stop_token_ends_the_output_like_plain(target):
    full = plain(target, REPETITIVE, 20)[0, len(REPETITIVE):].tolist()
    stop = full[7]  # the first occurrence may be earlier: both must stop there
    reference = plain(target, REPETITIVE, 20, stop_tokens=[stop])
    assert reference.shape[1] < len(REPETITIVE) + 20
    for draft in (target, "ngram", AlwaysWrong(target)):
        assert torch.equal(plain(target, REPETITIVE, 20, stop_tokens=[stop], draft=draft), reference)


def test_stream_with_draft_yields_each_token(target):
    tokens = [int(step[0]) for step in target.stream(torch.tensor([REPETITIVE]), 12, temperature=0, draft="ngram")]
    assert tokens == plain(target, REPETITIVE, 12)[0, len(REPETITIVE):].tolist()
    assert not torch.is_inference_mode_enabled()


def test_left_padded_single_prompt_equals_unpadded(target):
    ids = torch.tensor([[0, 0, *REPETITIVE]])
    mask = torch.tensor([[0, 0] + [1] * len(REPETITIVE)])
    out = target.generate(ids, 10, attention_mask=mask, temperature=0, draft=target)
    assert torch.equal(out[:, :2], ids[:, :2])
    assert torch.equal(out[:, 2:], plain(target, REPETITIVE, 10))


def test_refuses_what_it_cannot_do(target):
    with pytest.raises(InputError, match="batch 1"):
        target.generate(torch.tensor([[1, 2], [3, 4]]), 4, draft="ngram")
    with pytest.raises(InputError, match="vocabulary has 14 tokens, the model's 13"):
        target.generate(torch.tensor([[1, 2]]), 4, draft=build(4, vocab=14))
    with pytest.raises(InputError, match="draft model's max_seq_len 8"):
        target.generate(torch.tensor([[1, 2]]), 10, draft=build(4, max_seq_len=8))
    with pytest.raises(InputError, match="draft: expected 'ngram'"):
        target.generate(torch.tensor([[1, 2]]), 4, draft="ngrams")
    with pytest.raises(InputError, match="compile"):
        target.generate(torch.tensor([[1, 2]]), 4, draft="ngram", compile=True)
    with pytest.raises(InputError, match="NGramDraft.num_tokens"):
        NGramDraft(num_tokens=0)

    class OutOfVocabulary(AlwaysWrong):
        def propose(self, sequence, count, sampling, generator):
            return [VOCAB] * count, None

    with pytest.raises(InputError, match=r"guessed token ids outside \[0, 13\)"):
        target.generate(torch.tensor([[1, 2]]), 4, draft=OutOfVocabulary(target))
    encoder_decoder = formerkit.build_model(token_config("encoder_decoder", vocab_size=VOCAB,
                                                         decoder_start_token_id=0))
    with pytest.raises(InputError, match="needs a decoder"):
        encoder_decoder.generate(torch.tensor([[1, 2]]), 4, draft="ngram")


def test_ngram_proposes_what_followed_the_latest_match():
    lookup = NGramDraft(ngram_size=3, num_tokens=2)
    # The last 3 tokens (7 8 9) occurred twice before: the latest occurrence is followed by 5 6.
    assert lookup.propose([7, 8, 9, 1, 2, 7, 8, 9, 5, 6, 0, 7, 8, 9], 2, GREEDY, None) == ([5, 6], None)
    # Only the last 1-gram (4) occurred before: falls back to it.
    assert lookup.propose([4, 2, 3, 1, 4], 3, GREEDY, None) == ([2, 3, 1], None)
    # Near the end the copy runs into what it copied: a repeating pattern goes on.
    assert lookup.propose([1, 2, 1, 2], 5, GREEDY, None) == ([1, 2, 1, 2, 1], None)
    assert lookup.propose([9, 0, 0, 0], 3, GREEDY, None) == ([0, 0, 0], None)
    assert lookup.propose([1, 2, 3], 2, GREEDY, None) == ([], None)


def full_cache(model, tokens: list[int], length: int) -> KVCache:
    cache = KVCache.for_model(model, 1, length, rolling=False)
    with torch.no_grad():
        model(torch.tensor([tokens]), cache=cache)
    return cache


def assert_cache_equal(cache: KVCache, reference: KVCache):
    length = reference.length
    assert cache.length == length
    for layer in range(len(cache.keys)):
        torch.testing.assert_close(cache.keys[layer][:, :, :length], reference.keys[layer][:, :, :length])
        torch.testing.assert_close(cache.values[layer][:, :, :length], reference.values[layer][:, :, :length])
    assert torch.equal(cache.positions[:, :length], reference.positions[:, :length])
    assert torch.equal(cache.counts, reference.counts)


def test_truncate_equals_a_recompute_and_continues_like_one(target):
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    cache = full_cache(target, tokens, 16)
    cache.truncate(6)
    assert_cache_equal(cache, full_cache(target, tokens[:6], 16))
    with torch.no_grad():
        logits = target(torch.tensor([[8, 7, 7]]), cache=cache)
        reference = target(torch.tensor([tokens[:6] + [8, 7, 7]]))[:, -3:]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_truncate_keeps_positions_of_a_padded_row(target):
    ids, mask = torch.tensor([[0, 0, 4, 5, 6], [1, 2, 3, 4, 5]]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    cache = KVCache.for_model(target, 2, 12, rolling=False)
    with torch.no_grad():
        target(ids, attention_mask=mask, cache=cache)
        target(torch.tensor([[7, 8, 9], [7, 8, 9]]), cache=cache)
        cache.truncate(6)
        logits = target(torch.tensor([[10], [10]]), cache=cache)[:, -1]
        reference = target(torch.tensor([[0, 0, 4, 5, 6, 7, 10], [1, 2, 3, 4, 5, 7, 10]]),
                           attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]))[:, -1]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_truncate_refuses_rolling_buffers_and_bad_lengths():
    model = build(5, attention={"sliding_window": 4})
    rolling = KVCache.for_model(model, 1, 20)
    with pytest.raises(InputError, match="rolling=False"):
        rolling.truncate(0)
    cache = full_cache(model, [1, 2, 3], 20)
    with pytest.raises(InputError, match=r"expected a length in \[0, 3\], got 4"):
        cache.truncate(4)


def test_rollback_leaves_the_cache_of_a_recompute(target, other):
    # The other model's guesses are mostly rejected, so most passes roll back.
    decoder = SpeculativeDecoder(target, REPETITIVE, 15, ModelDraft(other, num_tokens=3), sampling=GREEDY)
    made = [token for token, _ in decoder.tokens()]
    assert decoder.stats.proposed > decoder.stats.accepted > 0 or decoder.stats.accepted == 0
    assert decoder.stats.accepted < decoder.stats.proposed
    # The last token is never fed: the cache holds the prompt and every other new token.
    assert_cache_equal(decoder.cache, full_cache(target, REPETITIVE + made[:-1], decoder.cache.max_length))
    # The draft's cache too holds a prefix of the sequence, as a recompute of it.
    proposals = decoder.proposals
    assert proposals.fed == (REPETITIVE + made)[:len(proposals.fed)]
    assert_cache_equal(proposals.cache, full_cache(other, proposals.fed, proposals.cache.max_length))


def test_events_carry_the_models_log_probabilities(target):
    request = TokenRequest(ids=tuple(REPETITIVE), max_new_tokens=6, logprobs=2)
    events = list(speculative_events(target, request, "ngram"))
    tokens = [event.token for event in events]
    assert tokens == plain(target, REPETITIVE, 6)[0, len(REPETITIVE):].tolist()
    assert [event.finish_reason for event in events] == [None] * 5 + ["length"]
    with torch.no_grad():
        logprobs = target(torch.tensor([REPETITIVE + tokens]))[0, len(REPETITIVE) - 1:-1].log_softmax(dim=-1)
    for place, event in enumerate(events):
        assert event.logprob == pytest.approx(float(logprobs[place, event.token]), abs=1e-5)
        top = logprobs[place].topk(2)
        assert [token for token, _ in event.top_logprobs] == top.indices.tolist()
    stopped = list(speculative_events(target, TokenRequest(ids=tuple(REPETITIVE), max_new_tokens=6,
                                                           stop_ids=frozenset({tokens[2]})), target))
    assert stopped[-1].finish_reason == "stop" and stopped[-1].token == tokens[2] and len(stopped) <= 3


# ----- sampling: the acceptance rule keeps the target's distribution -----

P = torch.tensor([0.5, 0.3, 0.15, 0.05])
Q = torch.tensor([0.1, 0.2, 0.3, 0.4])
UNIT = SamplingConfig(temperature=1.0)


def total_variation(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probabilities).abs().sum())


def draw_sequences(guess_count: int, draws: int, *, deterministic: bool) -> torch.Tensor:
    """Counts [4, 4] of the first two tokens made by speculative rounds over a context-free model whose next-token
    distribution is P everywhere; guesses are drawn from Q (or are always token 3, a deterministic proposer)."""
    generator = torch.Generator().manual_seed(1234)
    logits = P.log().expand(guess_count + 1, -1)
    counts = torch.zeros(4, 4)
    for _ in range(draws):
        made: list[int] = []
        while len(made) < 2:
            if deterministic:
                guesses, q = torch.full((guess_count,), 3), None
            else:
                guesses = torch.multinomial(Q, guess_count, replacement=True, generator=generator)
                q = Q.expand(guess_count, -1)
            kept, token = verify(logits, guesses, q, UNIT, generator)
            made += guesses[:kept].tolist() + [token]
        counts[made[0], made[1]] += 1
    return counts


@pytest.mark.parametrize("guess_count,deterministic", [(2, False), (2, True)])
def test_acceptance_rule_keeps_the_targets_distribution(guess_count, deterministic):
    counts = draw_sequences(guess_count, 1500, deterministic=deterministic)
    joint = (P[:, None] * P[None, :]).flatten()
    # Fixed seed, so deterministic. With 1500 draws the correct rule lands at a total variation of 0.02-0.03 from
    # P x P (0.015 from P for the first token); drawing a rejected place from P instead of max(0, P - Q) gives
    # 0.09-0.18 (0.05-0.16), min(1, q/p) instead of min(1, p/q) 0.5 or more.
    assert total_variation(counts.flatten(), joint) < 0.055
    assert total_variation(counts.sum(dim=1), P) < 0.035


def test_acceptance_rule_would_notice_a_wrong_distribution():
    # The check above is sensitive: the guesses' own distribution is far from P.
    assert 0.5 * float((P - Q).abs().sum()) > 0.3


def test_greedy_verify_keeps_guesses_up_to_the_first_miss():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert verify(logits, torch.tensor([1, 2]), None, GREEDY) == (1, 0)
    assert verify(logits, torch.tensor([1, 0]), None, GREEDY) == (2, 2)
    assert verify(logits[:1], torch.tensor([], dtype=torch.long), None, GREEDY) == (0, 1)


@pytest.mark.slow
def test_sampled_sequences_follow_the_targets_distribution_with_a_draft_model():
    """End to end with tiny models over 4 tokens: the distribution of three sampled tokens (temperature and top-k
    applied) against the target's, written out as the product of its next-token probabilities over all 64
    sequences."""
    vocab, prompt = 4, [1, 2]
    sampling = SamplingConfig(temperature=0.9, top_k=3)
    target, draft = build(6, vocab=vocab, max_seq_len=8), build(7, vocab=vocab, max_seq_len=8, num_layers=1)
    exact = torch.zeros(vocab ** 3)
    with torch.no_grad():
        for index, sequence in enumerate(itertools.product(range(vocab), repeat=3)):
            probabilities = sampling.probabilities(target(torch.tensor([prompt + list(sequence)]))[0, 1:4])
            exact[index] = probabilities[torch.arange(3), torch.tensor(sequence)].prod()
    counts = torch.zeros(vocab ** 3)
    stats = SpeculativeStats()
    for seed in range(1500):
        out = target.generate(torch.tensor([prompt]), 3, temperature=0.9, top_k=3, seed=seed,
                              draft=ModelDraft(draft, num_tokens=2), draft_stats=stats)[0, 2:].tolist()
        counts[out[0] * 16 + out[1] * 4 + out[2]] += 1
    assert 0 < stats.accepted < stats.proposed  # both paths of the rule were taken
    assert total_variation(counts, exact) < 0.08


# ----- runs and the command line -----

TWO_STEPS = {"schedule.steps": 2, "eval.every": 2}  # the runs test_serve and test_predict train


@pytest.mark.slow
def test_generate_command_with_a_draft_run_or_ngram_prints_the_plain_greedy_text(trained_run, tmp_path, capsys):
    import shutil

    from formerkit.cli import main

    target, draft = trained_run("char-lm", **TWO_STEPS), trained_run("char-lm")
    command = ["generate", str(target), "--prompt", "def f(x):\n    return x\n", "--temperature", "0",
               "--max-new-tokens", "40"]
    assert main(command) == 0
    reference = capsys.readouterr().out
    for extra in (["--draft", str(draft)], ["--draft", "ngram", "--draft-tokens", "3"]):
        assert main(command + extra) == 0
        assert capsys.readouterr().out == reference
    other = tmp_path / "other"
    shutil.copytree(draft, other)
    tokenizer = other / "model" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    assert main(command + ["--draft", str(other)]) != 0
    assert "does not share" in capsys.readouterr().err


def test_a_draft_models_one_token_feeds_go_through_the_lean_step_and_propose_what_the_forward_does(
        target, other, monkeypatch):
    from formerkit.generation.lean_step import LeanStep

    def proposals(build):
        monkeypatch.setattr(LeanStep, "build", staticmethod(build))
        with torch.inference_mode():
            state = ModelDraft(other, num_tokens=4).start(target, 40)
            sequence, made = list(REPETITIVE), []
            for accepted in (4, 1, 0, 2):  # the target keeps some guesses: the draft's cache is cut back to them
                guesses, _ = state.propose(sequence, 4, GREEDY, None)
                made.append(guesses)
                sequence += guesses[:accepted] + [(guesses[accepted] + 1) % VOCAB if accepted < 4 else 0]
        return made

    built, build = [], LeanStep.build
    lean = proposals(lambda *args: built.append(build(*args)) or built[-1])
    assert len(built) == 1 and isinstance(built[0], LeanStep)
    assert lean == proposals(lambda *args: None)
