"""Decoding with the key/value cache equals recomputing the whole sequence, step after step.

The reference is the model's own forward pass over the full prefix (no cache): at every step, the logits of the new
token with the cache must equal the last logits of a full recompute (<= 1e-5 in float32), for every position scheme
and attention option, for left-padded batches, for encoder-decoders. Generation itself is checked against a naive
loop written out here that recomputes everything at every step.
"""

from __future__ import annotations

import pytest
import torch

import formerkit
from formerkit import InputError, ModelConfig
from formerkit.nn.cache import KVCache

from ..conftest import randomize_weights

VOCAB = 29
WIDTH = 32
MAX_LEN = 24
TOL = 1e-5
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "relative", "none"]


def make_model(arch: str = "decoder", position: str = "learned", seed: int = 0, **overrides) -> formerkit.Transformer:
    # Relative buckets with the log-spaced ones inside MAX_LEN; an encoder_decoder's decoder has its own table.
    relative = {"relative_buckets": 8, "relative_max_distance": 20, "separate_decoder": arch == "encoder_decoder"}
    config = ModelConfig(arch=arch, width=WIDTH, num_layers=2, max_seq_len=MAX_LEN,
                         num_decoder_layers=2 if arch == "encoder_decoder" else None,
                         attention={"num_heads": 4},
                         position={"kind": position, **(relative if position == "relative" else {})},
                         stem={"kind": "tokens", "vocab_size": VOCAB}, head={"kind": "lm"})
    if overrides:
        config = config.replace(**overrides)
    torch.manual_seed(seed)
    model = formerkit.build_model(config)
    # O(1)-scale weights, so attention patterns are sharp and every part of the model matters.
    return randomize_weights(model, seed, std="fan_in").eval()


def left_padded(batch_lengths: list[int], total: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded to ``total`` with token 0, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(batch_lengths), total), generator=generator)
    mask = torch.zeros(len(batch_lengths), total, dtype=torch.long)
    for row, length in enumerate(batch_lengths):
        mask[row, total - length:] = 1
        ids[row, : total - length] = 0
    return ids, mask


def recompute_last_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask)[:, -1]


def check_steps(model, ids, mask, chunks: list[int]):
    """Feeds ``ids`` to the cache in chunks of the given sizes; after every chunk, its last logits must equal a
    recompute of the prefix so far. Returns the largest difference seen."""
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    worst, start = 0.0, 0
    with torch.no_grad():
        for size in chunks:
            stop = start + size
            chunk_mask = None if mask is None else mask[:, start:stop]
            cached = model(ids[:, start:stop], attention_mask=chunk_mask, cache=cache)[:, -1]
            full = recompute_last_logits(model, ids[:, :stop], None if mask is None else mask[:, :stop])
            worst = max(worst, (cached - full).abs().max().item())
            start = stop
    assert cache.length == ids.shape[1]
    return worst


def naive_greedy(model, ids, mask, steps: int) -> torch.Tensor:
    """Greedy decoding by recomputing the whole sequence at every step (the reference)."""
    mask = torch.ones_like(ids) if mask is None else mask
    for _ in range(steps):
        next_token = recompute_last_logits(model, ids, mask).argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
        mask = torch.cat([mask, torch.ones_like(next_token)], 1)
    return ids


# ----- cache exactness -----


@pytest.mark.parametrize("position", POSITIONS)
def test_every_step_equals_recompute_for_each_position_scheme(position):
    model = make_model(position=position)
    ids, mask = left_padded([14, 9, 3], 14)
    # A multi-token prefill, a second chunk, then one token at a time.
    assert check_steps(model, ids, mask, [5, 3] + [1] * 6) <= TOL
    assert check_steps(model, ids[:1], None, [6] + [1] * 8) <= TOL


@pytest.mark.parametrize("options", [
    {"attention.num_kv_heads": 2},               # grouped-query attention
    {"attention.num_kv_heads": 1},               # multi-query attention
    {"attention.qk_norm": True, "norm.kind": "rmsnorm", "feedforward.activation": "swiglu"},
    {"num_unique_layers": 1, "num_layers": 3},   # one block shared across depth: a cache slot per layer
    {"attention.sliding_window": 4},
    {"attention.sliding_window": 3, "attention.sliding_window_layers": [1]},
    {"norm.placement": "post"},
    {"layer_scale": 0.5, "norm.placement": "sandwich"},
])
@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "relative"])
def test_every_step_equals_recompute_with_attention_options(options, position):
    model = make_model(position=position, **options)
    ids, mask = left_padded([12, 7], 12, seed=3)
    assert check_steps(model, ids, mask, [4] + [1] * 8) <= TOL


@pytest.mark.parametrize("position", ["rope", "relative"])
def test_encoder_decoder_cache_equals_recompute_with_padded_source(position):
    model = make_model(arch="encoder_decoder", position=position)
    source, source_mask = left_padded([10, 6, 8], 10, seed=5)
    source_mask[2, :] = 1
    source_mask[2, -2:] = 0  # right padding on the source side is fine too
    target = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(6))
    cache = KVCache.for_model(model, 3, 9)
    with torch.no_grad():
        for stop in range(1, 10):
            start = cache.length
            cached = model(source, attention_mask=source_mask, decoder_input_ids=target[:, start:stop],
                           cache=cache)[:, -1]
            full = model(source, attention_mask=source_mask, decoder_input_ids=target[:, :stop])[:, -1]
            assert (cached - full).abs().max().item() <= TOL, stop
    assert all(kv is not None for kv in cache.cross)  # the source was projected once per layer and kept


def test_a_failed_pass_leaves_the_cache_unchanged():
    model = make_model()
    ids, _ = left_padded([6], 6)
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        with pytest.raises(InputError, match="max_length"):
            model(ids, cache=cache)  # 4 + 6 > 8
        assert cache.length == 4
        cached = model(ids[:, 4:], cache=cache)[:, -1]
    assert (cached - recompute_last_logits(model, ids, None)).abs().max().item() <= TOL


# ----- rolling buffers of sliding-window layers -----


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "relative"])
@pytest.mark.parametrize("options", [
    {"attention.sliding_window": 3},
    {"attention.sliding_window": 4, "attention.num_kv_heads": 2, "attention.sliding_window_layers": [0]},
    {"attention.sliding_window": 3, "attention.global_tokens": 2},
])
def test_rolling_window_cache_equals_recompute_far_beyond_the_window(position, options):
    model = make_model(position=position, **options)
    ids, mask = left_padded([20, 13, 6], 20, seed=8)
    cache = KVCache.for_model(model, 3, 20)
    window, glob = model.config.attention.sliding_window, model.config.attention.global_tokens
    for layer, windowed in enumerate(model.decoder.windowed):
        # Window layers keep global + window slots, whatever the length; the others keep every token.
        assert cache.keys[layer].shape[2] == (glob + window if windowed else 20)
    # Prompt pieces longer than the window, then one token at a time, far past the window.
    assert check_steps(model, ids, mask, [7, 5] + [1] * 8) <= TOL


@pytest.mark.parametrize("options", [{"attention.sliding_window": 3},
                                     {"attention.sliding_window": 4, "attention.global_tokens": 1}])
def test_generation_with_rolling_buffers_matches_the_naive_loop(options):
    model = make_model(position="rope", **options)
    ids, mask = left_padded([9, 4], 9, seed=9)
    assert torch.equal(model.generate(ids, 12, attention_mask=mask, temperature=0), naive_greedy(model, ids, mask, 12))


def test_a_failed_pass_leaves_rolling_buffers_unchanged():
    model = make_model(**{"attention.sliding_window": 3})
    ids, _ = left_padded([10], 10, seed=10)
    cache = KVCache.for_model(model, 1, 10)
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        before = [buffer.clone() for buffer in cache.keys + cache.values], cache.slot_tokens.clone()
        broken = model.decoder.blocks[1].feedforward
        original = broken.forward
        broken.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            model(ids[:, 6:7], cache=cache)  # layer 0 wrote into its rolling slot before layer 1 failed
        broken.forward = original
        after = [buffer for buffer in cache.keys + cache.values]
        assert all(torch.equal(a, b) for a, b in zip(before[0], after))
        assert torch.equal(before[1], cache.slot_tokens) and cache.length == 6
        cached = model(ids[:, 6:7], cache=cache)[:, -1]
    assert (cached - recompute_last_logits(model, ids[:, :7], None)).abs().max().item() <= TOL


# ----- generation -----


@pytest.mark.parametrize("position", POSITIONS)
def test_greedy_generation_matches_naive_recompute_loop_for_left_padded_batches(position):
    model = make_model(position=position, **{"attention.num_kv_heads": 2})
    ids, mask = left_padded([8, 5, 2], 8, seed=7)
    out = model.generate(ids, 10, attention_mask=mask, temperature=0)
    assert torch.equal(out, naive_greedy(model, ids, mask, 10))
    # Each padded row generates exactly what it generates alone, unpadded.
    for row, length in enumerate([8, 5, 2]):
        alone = model.generate(ids[row:row + 1, 8 - length:], 10, temperature=0)
        assert torch.equal(out[row, 8:], alone[0, length:])


def test_generation_with_the_maximum_length_fills_the_context_exactly():
    model = make_model(position="learned")
    ids, _ = left_padded([4], 4)
    out = model.generate(ids, MAX_LEN - 4, temperature=0)
    assert out.shape == (1, MAX_LEN)
    assert torch.equal(out, naive_greedy(model, ids, None, MAX_LEN - 4))
    # The last new token is never fed back, so one more still fits; two more would need position MAX_LEN.
    assert model.generate(ids, MAX_LEN - 3, temperature=0).shape == (1, MAX_LEN + 1)
    with pytest.raises(InputError, match="max_seq_len"):
        model.generate(ids, MAX_LEN - 2, temperature=0)


def test_encoder_decoder_generation_matches_naive_loop():
    model = make_model(arch="encoder_decoder", position="learned")
    source, source_mask = left_padded([9, 4], 9, seed=11)
    out = model.generate(source, 7, attention_mask=source_mask, temperature=0, decoder_start_token_id=1)
    target = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(7):
            logits = model(source, attention_mask=source_mask, decoder_input_ids=target)[:, -1]
            target = torch.cat([target, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, target)


def test_stream_yields_the_tokens_generate_returns():
    model = make_model(position="rope")
    ids, mask = left_padded([6, 3], 6)
    streamed = torch.stack(list(model.stream(ids, 8, attention_mask=mask, temperature=0.9, top_k=5, seed=3)), 1)
    generated = model.generate(ids, 8, attention_mask=mask, temperature=0.9, top_k=5, seed=3)
    assert torch.equal(generated[:, 6:], streamed)


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone():
    model = make_model()
    ids, _ = left_padded([5], 5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = model.generate(ids, 12, temperature=1.0, seed=42)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, model.generate(ids, 12, temperature=1.0, seed=42))
    others = [model.generate(ids, 12, temperature=1.0, seed=s) for s in range(5)]
    assert any(not torch.equal(first, other) for other in others)


def test_top_k_and_top_p_restrict_sampling_to_the_reference_sets():
    """Every sampled token lies in the top-k set (or the nucleus) of the recomputed logits at its step."""
    model = make_model(position="alibi")
    ids, _ = left_padded([5], 5)
    for seed in range(4):
        out = model.generate(ids, 10, temperature=1.5, top_k=3, seed=seed)
        for step in range(5, 15):
            logits = recompute_last_logits(model, out[:, :step], None)[0]
            assert int(out[0, step]) in logits.topk(3).indices.tolist()
        out = model.generate(ids, 10, temperature=1.0, top_p=0.6, seed=seed)
        for step in range(5, 15):
            probabilities = recompute_last_logits(model, out[:, :step], None)[0].softmax(-1)
            ordered, order = probabilities.sort(descending=True)
            # The nucleus: the smallest prefix of tokens by probability whose mass reaches 0.6.
            size = int((ordered.cumsum(0) < 0.6).sum()) + 1
            assert int(out[0, step]) in order[:size].tolist()
    # A nucleus too small for a second token and top_k=1 are both greedy.
    greedy = model.generate(ids, 10, temperature=0)
    assert torch.equal(model.generate(ids, 10, temperature=1.0, top_k=1, seed=0), greedy)
    assert torch.equal(model.generate(ids, 10, temperature=1.0, top_p=1e-6, seed=0), greedy)


def test_stop_tokens_end_rows_and_pad_the_rest():
    model = make_model()
    ids, mask = left_padded([6, 6, 6], 6, seed=13)
    free = model.generate(ids, 12, attention_mask=mask, temperature=0)
    stop = int(free[0, 8])  # row 0 produces this token at its third step
    out = model.generate(ids, 12, attention_mask=mask, temperature=0, stop_tokens=[stop], pad_token_id=0)
    for row in range(3):
        new = free[row, 6:].tolist()
        expected = new[: new.index(stop) + 1] if stop in new else new
        got = out[row, 6:].tolist()
        assert got[: len(expected)] == expected
        assert all(token == 0 for token in got[len(expected):])
    assert out.shape[1] <= free.shape[1]
    # Every row stopped early -> generation ended early.
    all_stop = model.generate(ids, 12, attention_mask=mask, temperature=0, stop_tokens=list(range(VOCAB)))
    assert all_stop.shape == (3, 7)


def test_generate_restores_training_mode_and_accepts_1d_prompts():
    model = make_model().train()
    ids, _ = left_padded([5], 5)
    out = model.generate(ids[0], 4, temperature=0)
    assert model.training
    assert out.dim() == 1 and torch.equal(out, model.eval().generate(ids, 4, temperature=0)[0])
    assert torch.equal(model.generate(ids, 0), ids)


@pytest.mark.parametrize("call, message", [
    (lambda m, ids: m.generate(ids.float(), 3), "integer token ids"),
    (lambda m, ids: m.generate(ids[:, :0], 3), "non-empty"),
    (lambda m, ids: m.generate(ids, -1), "max_new_tokens"),
    (lambda m, ids: m.generate(ids, 3, temperature=-0.5), "temperature"),
    (lambda m, ids: m.generate(ids, 3, top_k=0), "top_k"),
    (lambda m, ids: m.generate(ids, 3, top_p=0.0), "top_p"),
    (lambda m, ids: m.generate(ids, 3, stop_tokens=[VOCAB]), "stop_tokens"),
    (lambda m, ids: m.generate(ids, 3, pad_token_id=-1), "pad_token_id"),
    (lambda m, ids: m.generate(ids, 3, attention_mask=torch.tensor([[1, 1, 1, 0]])), "padded on the left"),
    (lambda m, ids: m.generate(ids, 3, attention_mask=torch.ones(1, 3)), "shape"),
    (lambda m, ids: m.generate(ids, 3, decoder_input_ids=ids), "encoder_decoder"),
])
def test_bad_generation_arguments_are_refused(call, message):
    model = make_model()
    ids, _ = left_padded([4], 4)
    with pytest.raises(InputError, match=message):
        call(model, ids)


def test_models_that_cannot_generate_are_refused():
    encoder = formerkit.build_model(ModelConfig(arch="encoder", width=WIDTH, num_layers=1, max_seq_len=8,
                                                attention={"num_heads": 2},
                                                stem={"kind": "tokens", "vocab_size": VOCAB},
                                                head={"kind": "masked_lm"}))
    with pytest.raises(InputError, match="decoder"):
        encoder.generate(torch.ones(1, 3, dtype=torch.long), 2)
    seq2seq = make_model(arch="encoder_decoder")
    with pytest.raises(InputError, match="decoder_start_token_id"):
        seq2seq.generate(torch.ones(1, 3, dtype=torch.long), 2)
    model = make_model()
    cache = KVCache.for_model(model, 1, 4)
    with pytest.raises(InputError, match="eval"):
        model.train()(torch.ones(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match="batch"):
        model.eval()(torch.ones(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match="position_ids"):
        model(torch.ones(1, 2, dtype=torch.long), cache=cache, position_ids=torch.zeros(1, 2, dtype=torch.long))


# ----- the compiled decode step -----


def _eager_static_decoder(monkeypatch):
    """Runs generate(compile=True) with the fixed-shape decode step but without torch.compile, so the step's own
    logic is checked quickly for every configuration (one test below compiles for real). Returns the number of
    steps taken through it, so a test can tell the step really ran (a failing step would fall back silently)."""
    import types

    from formerkit.generation import compiled_step

    calls = []

    def for_model(cls, model):
        def bind(slots):
            def step(tokens):
                calls.append(1)
                return compiled_step.decode_step(model, tokens, slots)

            return step

        return types.SimpleNamespace(bind=bind)

    monkeypatch.setattr(compiled_step.CompiledDecoder, "for_model", classmethod(for_model))
    return calls


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("options", [{}, {"attention.num_kv_heads": 2, "attention.sliding_window": 4},
                                     {"attention.qk_norm": True, "layer_scale": 0.5, "norm.placement": "sandwich"}])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_fixed_shape_decode_step_matches_the_naive_loop(position, options, monkeypatch):
    calls = _eager_static_decoder(monkeypatch)
    model = make_model(position=position, **options)
    ids, mask = left_padded([8, 5, 2], 8, seed=7)
    out = model.generate(ids, 10, attention_mask=mask, temperature=0, compile=True)
    assert len(calls) == 9  # every step after the prefill went through the fixed-shape step
    assert torch.equal(out, naive_greedy(model, ids, mask, 10))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("position", ["alibi", "relative"])
def test_fixed_shape_decode_step_for_encoder_decoders(monkeypatch, position):
    calls = _eager_static_decoder(monkeypatch)
    model = make_model(arch="encoder_decoder", position=position)
    source, source_mask = left_padded([9, 4], 9, seed=11)
    expected = model.generate(source, 7, attention_mask=source_mask, temperature=0, decoder_start_token_id=1)
    got = model.generate(source, 7, attention_mask=source_mask, temperature=0, decoder_start_token_id=1,
                         compile=True)
    assert len(calls) == 6
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_compiled_generation_equals_eager_per_model_and_after_weights_change():
    from formerkit.generation import compiled_step

    first, second = make_model(seed=0), make_model(seed=1)
    ids, mask = left_padded([6, 3], 6, seed=2)
    for model in (first, second, first):
        assert torch.equal(model.generate(ids, 8, attention_mask=mask, temperature=0, compile=True),
                           model.generate(ids, 8, attention_mask=mask, temperature=0))
        # Compiled ahead of time (AOTInductor), its cache writes landing in the cache's own buffers.
        decoder = compiled_step.CompiledDecoder.for_model(model)
        assert decoder.ahead_error is None and len(decoder.ahead) == 1 and decoder.jit is None
    # The compiled step holds frozen weights: changing a parameter must give a fresh compile, not stale results.
    with torch.no_grad():
        first.head.projection.weight.mul_(-1.0)
    assert torch.equal(first.generate(ids, 8, attention_mask=mask, temperature=0, compile=True),
                       first.generate(ids, 8, attention_mask=mask, temperature=0))


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_the_exported_step_reads_its_flat_inputs_back_for_encoder_decoders(monkeypatch):
    """The ahead-of-time path hands the step one flat list (cache buffers, cross-attention keys and values, memory
    mask parts); the exported module must read them back in that order. Run eagerly here, in place of the compiled
    library, through the same call."""
    from formerkit.generation import compiled_step

    runs = []

    def eager_library(model, slots, flat):
        step = compiled_step.DecodeStep(model, slots)

        def run(*inputs):
            runs.append(len(inputs))
            return step(*inputs)

        return run

    monkeypatch.setattr(compiled_step, "compile_ahead_of_time", eager_library)
    model = make_model(arch="encoder_decoder", position="alibi")
    source, source_mask = left_padded([9, 4], 9, seed=11)
    expected = model.generate(source, 7, attention_mask=source_mask, temperature=0, decoder_start_token_id=1)
    got = model.generate(source, 7, attention_mask=source_mask, temperature=0, decoder_start_token_id=1,
                         compile=True)
    # 5 step inputs (tokens, slot, counts, keep, key positions), keys and values of 2 layers, cross keys and values
    # of 2 layers, and the memory mask.
    assert len(runs) == 6 and runs[0] == 5 + 2 * 2 + 2 * 2 + 1
    assert torch.equal(got, expected)


def test_a_step_aotinductor_cannot_compile_goes_through_torch_compile(monkeypatch):
    from formerkit.generation import compiled_step

    def cannot(model, slots, flat):
        raise NotImplementedError("this torch has no AOTInductor")

    compiled = []

    def fake_compile(function, **options):  # torch.compile itself is tested above; here only the route to it
        compiled.append(options)
        return function

    monkeypatch.setattr(compiled_step, "compile_ahead_of_time", cannot)
    monkeypatch.setattr(torch, "compile", fake_compile)
    model = make_model(position="alibi")
    ids, mask = left_padded([5, 2], 5)
    out = model.generate(ids, 6, attention_mask=mask, temperature=0, compile=True)
    assert torch.equal(out, model.generate(ids, 6, attention_mask=mask, temperature=0))
    decoder = compiled_step.CompiledDecoder.for_model(model)
    assert compiled == [{"dynamic": False}] and decoder.ahead_error.startswith("NotImplementedError")


def test_a_failing_compile_falls_back_to_plain_decoding_with_a_warning(monkeypatch):
    from formerkit.generation import compiled_step

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_step.CompiledDecoder, "for_model",
                        classmethod(lambda cls, model: __import__("types").SimpleNamespace(bind=lambda *a: broken)))
    model = make_model(position="rope")
    ids, mask = left_padded([5, 2], 5)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = model.generate(ids, 6, attention_mask=mask, temperature=0, compile=True)
    assert torch.equal(out, model.generate(ids, 6, attention_mask=mask, temperature=0))


# ----- Gemma's parts: soft-capped scores, a local RoPE base for the window layers -----

GEMMA_PARTS = {"norm.kind": "rmsnorm", "norm.weight_offset": 1.0, "norm.placement": "sandwich",
               "stem.scale_embeddings": True, "attention.qk_norm": True, "attention.softcap": 1.0,
               "attention.scale": 0.4, "feedforward.activation": "geglu_tanh", "head.logit_softcap": 2.0,
               "position.rope_local_base": 30.0}


@pytest.mark.parametrize("windows", [{"attention.sliding_window": 3, "attention.sliding_window_layers": [0]},
                                     {"attention.sliding_window": 4}])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_gemma_parts_cache_and_fixed_shape_step_equal_recompute_far_beyond_the_window(windows, monkeypatch):
    """Every path a soft-capped layer takes while decoding (the multi-token prefill, single tokens over full and
    rolling buffers, the fixed-shape step's single-query form) caps its scores, and the window layers keep their own
    rotary tables."""
    model = make_model(position="rope", **GEMMA_PARTS, **windows)
    ids, mask = left_padded([20, 13, 6], 20, seed=8)
    assert check_steps(model, ids, mask, [7, 5] + [1] * 8) <= TOL
    prompts, prompt_mask = left_padded([9, 5, 2], 9, seed=9)
    expected = naive_greedy(model, prompts, prompt_mask, 10)
    assert torch.equal(model.generate(prompts, 10, attention_mask=prompt_mask, temperature=0), expected)
    calls = _eager_static_decoder(monkeypatch)
    assert torch.equal(model.generate(prompts, 10, attention_mask=prompt_mask, temperature=0, compile=True),
                       expected)
    assert len(calls) == 9
    # The cap and the local base bind: without them the logits differ.
    for name, value in (("attention.softcap", None), ("position.rope_local_base", None)):
        other = make_model(position="rope", **{**GEMMA_PARTS, **windows, name: value})
        assert (other(ids, attention_mask=mask) - model(ids, attention_mask=mask)).abs().max() > 1e-3, name


@pytest.mark.slow
def test_compiled_generation_with_gemma_parts_equals_eager():
    from formerkit.generation import compiled_step

    model = make_model(position="rope", **GEMMA_PARTS, **{"attention.sliding_window": 3,
                                                          "attention.sliding_window_layers": [0]})
    ids, mask = left_padded([6, 3], 6, seed=2)
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, temperature=0, compile=True),
                       model.generate(ids, 8, attention_mask=mask, temperature=0))
    assert compiled_step.CompiledDecoder.for_model(model).ahead_error is None


@pytest.mark.slow  # imports the compiler (seconds)
def test_the_step_tries_the_gemm_settings_of_its_row_count_first_and_the_other_after(monkeypatch):
    """One row per step: inductor's matrix-vector templates first; from compiled_step's row threshold on: the matrix
    library's call first. Whichever fails, the other is tried. (Compiling itself is replaced here: only the order.)"""
    import torch._inductor

    from formerkit.generation import compiled_step
    from formerkit.nn.cache import StaticSlots

    tried = []

    def compile_and_package(program, package_path, inductor_configs):
        tried.append(inductor_configs)
        if len(tried) % 2 == 1:
            raise RuntimeError("this setting cannot be built here")
        return package_path

    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: ("loaded", path))
    model = make_model()
    templates, library = compiled_step._GEMM_CONFIGS
    for rows, expected in ((1, [templates, library]), (compiled_step._LIBRARY_FROM_ROWS, [library, templates])):
        tried.clear()
        slots = StaticSlots(KVCache.for_model(model, rows, 8, rolling=False))
        loaded = compiled_step.compile_ahead_of_time(model, slots, [])
        assert [{key: value for key, value in config.items() if key != "freezing"} for config in tried] == expected
        assert all(config["freezing"] for config in tried) and loaded[0] == "loaded"


@pytest.mark.slow
def test_compiled_generation_with_the_library_products_equals_eager():
    """A batch large enough for the matrix library's products: the compiled step still gives eager's tokens."""
    from formerkit.generation import compiled_step

    model = make_model(seed=3)
    rows = compiled_step._LIBRARY_FROM_ROWS
    ids, mask = left_padded([6 - row % 5 for row in range(rows)], 6, seed=4)
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, temperature=0, compile=True),
                       model.generate(ids, 8, attention_mask=mask, temperature=0))
    decoder = compiled_step.CompiledDecoder.for_model(model)
    assert decoder.ahead_error is None and len(decoder.ahead) == 1
