"""formerkit.adapt's methods besides LoRA: parallel bottleneck adapters, prefix and prompt tuning, partial tuning.

Each against its formula written out on a tiny float64 model: the adapter as scale * up(act(down(x))) beside the
feed-forward, the prefix as attention over [prefix; keys] per head, the prompt as the same model reading extra tokens
whose embeddings are the prompt. Cached decoding with a prefix or a prompt equals a full recompute.
"""

from __future__ import annotations

import math

import pytest
import torch

import formerkit
from formerkit import InputError, ModelConfig
from formerkit.adapt import METHODS
from formerkit.nn.cache import KVCache
from formerkit.nn.context import LayerContext
from formerkit.nn.masks import CausalMask, KeyPaddingMask, PreparedMask, prepare_attention_mask

from ..conftest import randomize_weights

VOCAB, WIDTH, MAX_LEN = 23, 16, 24


def make_model(position: str = "learned", seed: int = 0, dtype=torch.float64, **overrides) -> formerkit.Transformer:
    config = ModelConfig(arch="decoder", width=WIDTH, num_layers=2, max_seq_len=MAX_LEN,
                         attention={"num_heads": 4, "num_kv_heads": 2}, position={"kind": position},
                         stem={"kind": "tokens", "vocab_size": VOCAB}, head={"kind": "lm"})
    if overrides:
        config = config.replace(**overrides)
    torch.manual_seed(seed)
    return randomize_weights(formerkit.build_model(config), seed, std="fan_in").to(dtype).eval()


def adapt(model, method: str, layers=None, **options):
    """What add_adapters does around a method: freeze the base, then apply."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    options.setdefault("name", "default")
    METHODS[method](model, targets=None, layers=layers, **options)
    return model


def trainable(model) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def left_padded(lengths: list[int], total: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, total - length:] = 1
        ids[row, : total - length] = 0
    return ids, mask


def redraw(module: torch.nn.Module, seed: int) -> None:
    """Nonzero values everywhere (a fresh adapter's up projection is zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)


def check_cached_steps(model, ids, mask, chunks) -> float:
    """Feeds ``ids`` to a cache chunk by chunk; the largest difference between each chunk's last logits and a full
    recompute of the sequence so far."""
    extra = model.input_prompt["default"].num_virtual_tokens if model.input_prompt is not None else 0
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1] + extra)
    worst, start = 0.0, 0
    with torch.no_grad():
        for size in chunks:
            stop = start + size
            cached = model(ids[:, start:stop], attention_mask=None if mask is None else mask[:, start:stop],
                           cache=cache)[:, -1]
            full = model(ids[:, :stop], attention_mask=None if mask is None else mask[:, :stop])[:, -1]
            worst = max(worst, (cached - full).abs().max().item())
            start = stop
    return worst


def naive_greedy(model, ids, mask, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            token = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


# ----- parallel bottleneck adapters (AdaptFormer) -----


def test_a_fresh_adapter_leaves_the_outputs_exactly_as_they_were():
    model = make_model()
    ids, mask = left_padded([9, 5], 9)
    with torch.no_grad():
        before = model(ids, attention_mask=mask)
        adapt(model, "adapter", bottleneck=4)
        assert torch.equal(model(ids, attention_mask=mask), before)


@pytest.mark.parametrize("parallel", [None, "separate_norms"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_adapter_block_output_is_the_reference_block_plus_the_bottleneck_formula(parallel, activation):
    model = adapt(make_model(parallel_residual=parallel), "adapter", layers=[1], bottleneck=3, scale=0.7,
                  activation=activation)
    block = model.decoder.blocks[1]
    adapter = block.feedforward_beside["default"]
    redraw(adapter, seed=5)
    assert model.decoder.blocks[0].feedforward_beside is None
    x = torch.randn(2, 6, WIDTH, dtype=torch.float64)
    context = LayerContext(PreparedMask(is_causal=True))
    with torch.no_grad():
        out, _ = block(x, context)
        slot, block.feedforward_beside = block.feedforward_beside, None
        reference, _ = block(x, context)
        block.feedforward_beside = slot
        # The feed-forward's input: after attention (sequential) or the block's input (parallel), normed.
        attention_norm = block.attention_residual.norm
        stream = x if parallel else x + block.attention(attention_norm(x), context)[0]
        ffn_input = block.feedforward_residual.norm(stream)
        act = torch.relu if activation == "relu" else torch.nn.functional.gelu
        hidden = act(ffn_input @ adapter.down.weight.T + adapter.down.bias)
        expected = reference + 0.7 * (hidden @ adapter.up.weight.T + adapter.up.bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_only_the_adapters_are_trainable_and_get_gradients():
    model = adapt(make_model(), "adapter", bottleneck=4)
    names = trainable(model)
    assert names == [f"decoder.blocks.{i}.feedforward_beside.default.{part}.{kind}" for i in (0, 1)
                     for part in ("down", "up") for kind in ("weight", "bias")]
    ids, mask = left_padded([9, 5], 9)
    model.train()
    model(ids, attention_mask=mask).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in names), name
    # A fresh adapter: up is zero, so up learns first and down's gradient is exactly zero.
    adapter = model.decoder.blocks[0].feedforward_beside["default"]
    assert adapter.up.weight.grad.abs().sum() > 0
    assert adapter.down.weight.grad.abs().sum() == 0


def test_adapter_layers_select_blocks_and_negative_layers_count_from_the_last():
    model = adapt(make_model(num_layers=3), "adapter", layers=[-1, 0], bottleneck=2)
    assert [block.feedforward_beside is not None for block in model.decoder.blocks] == [True, False, True]
    with pytest.raises(InputError, match=r"layers: \[3\] out of range"):
        adapt(make_model(num_layers=3), "adapter", layers=[3])


def test_adapter_keeps_cached_decoding_equal_to_recompute():
    model = adapt(make_model(position="rope"), "adapter", bottleneck=4)
    for index, block in enumerate(model.decoder.blocks):
        redraw(block.feedforward_beside["default"], seed=index)
    ids, mask = left_padded([10, 7, 3], 10)
    assert check_cached_steps(model, ids, mask, [4, 2] + [1] * 4) <= 1e-10


# ----- prefix tuning -----


@pytest.mark.parametrize("projection_hidden", [None, 5])
def test_prefix_attention_is_attention_over_the_prefix_then_the_keys(projection_hidden):
    model = adapt(make_model(), "prefix", layers=[0], num_virtual_tokens=3, projection_hidden=projection_hidden)
    layer = model.decoder.blocks[0].attention
    redraw(layer.key_value_prefix["default"], seed=2)
    assert model.decoder.blocks[1].attention.key_value_prefix is None
    batch, length, heads, kv_heads, dim = 2, 5, 4, 2, layer.head_dim
    x = torch.randn(batch, length, WIDTH, dtype=torch.float64)
    keep = torch.tensor([[True] * 5, [False, False, True, True, True]])
    mask = prepare_attention_mask(CausalMask() & KeyPaddingMask(keep), length, length)
    with torch.no_grad():
        out, _ = layer(x, LayerContext(mask))
        prefix = layer.key_value_prefix["default"]
        flat = prefix.prefix if projection_hidden is None else (
            torch.tanh(prefix.embedding @ prefix.projection[0].weight.T + prefix.projection[0].bias)
            @ prefix.projection[2].weight.T + prefix.projection[2].bias)
        prefix_k, prefix_v = flat[:, : kv_heads * dim], flat[:, kv_heads * dim:]
        w, b = layer.qkv.weight, layer.qkv.bias
        q_all = x @ w[: heads * dim].T + b[: heads * dim]
        k_all = x @ w[heads * dim: (heads + kv_heads) * dim].T + b[heads * dim: (heads + kv_heads) * dim]
        v_all = x @ w[(heads + kv_heads) * dim:].T + b[(heads + kv_heads) * dim:]
        expected = torch.zeros(batch, length, heads * dim, dtype=torch.float64)
        for row in range(batch):
            for head in range(heads):
                group = head // (heads // kv_heads)  # grouped-query: the key/value head of this query head
                cols = slice(group * dim, (group + 1) * dim)
                keys = torch.cat([prefix_k[:, cols], k_all[row, :, cols]])
                values = torch.cat([prefix_v[:, cols], v_all[row, :, cols]])
                for i in range(length):
                    if not keep[row, i]:
                        continue  # a padded query's output is zero and never read
                    allowed = [True] * 3 + [bool(j <= i and keep[row, j]) for j in range(length)]
                    scores = keys @ q_all[row, i, head * dim:(head + 1) * dim] / math.sqrt(dim)
                    scores = scores.masked_fill(~torch.tensor(allowed), float("-inf"))
                    expected[row, i, head * dim:(head + 1) * dim] = scores.softmax(0) @ values
        expected = expected @ layer.out.weight.T + layer.out.bias
    real = keep.unsqueeze(-1).expand_as(out)
    torch.testing.assert_close(out[real], expected[real], rtol=1e-12, atol=1e-12)


def test_only_the_prefixes_get_gradients():
    model = adapt(make_model(), "prefix", num_virtual_tokens=2, projection_hidden=4)
    names = trainable(model)
    assert names and all(".attention.key_value_prefix." in name for name in names)
    assert len(names) == 2 * 5  # per layer: the embedding and the MLP's two weights and biases
    ids, mask = left_padded([8, 4], 8)
    model(ids, attention_mask=mask).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == (name in names), name


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_cached_decoding_with_a_prefix_or_prompt_equals_recompute(method, position):
    model = adapt(make_model(position=position), method, num_virtual_tokens=3)
    ids, mask = left_padded([12, 8, 3], 12)
    assert check_cached_steps(model, ids, mask, [5, 3] + [1] * 4) <= 1e-10
    assert check_cached_steps(model, ids[:1], None, [4] + [1] * 8) <= 1e-10


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_greedy_generation_with_a_prefix_or_prompt_matches_a_recompute_loop(method):
    model = adapt(make_model(position="rope", dtype=torch.float32), method, num_virtual_tokens=4)
    ids, mask = left_padded([7, 4, 2], 7, seed=3)
    out = model.generate(ids, 8, attention_mask=mask, temperature=0)
    assert torch.equal(out, naive_greedy(model, ids, mask, 8))
    # Generation reaches max_seq_len less the virtual tokens (they hold positions too, for a prompt).
    room = MAX_LEN - ids.shape[1] + 1 - (4 if method == "prompt" else 0)
    assert model.generate(ids[:1], room, temperature=0).shape[1] == ids.shape[1] + room
    with pytest.raises(InputError, match="max_seq_len"):
        model.generate(ids[:1], room + 1, temperature=0)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_sliding_window_over_rolling_cache_buffers_with_a_prefix_or_prompt_equals_recompute(method):
    # A prefix stays visible to every query beside its window; a prompt's virtual tokens are the first tokens of the
    # sequence, which the window leaves behind as it would any others.
    model = adapt(make_model(position="rope", **{"attention.sliding_window": 3}), method, num_virtual_tokens=2)
    ids, mask = left_padded([14, 6], 14)
    assert check_cached_steps(model, ids, mask, [5] + [1] * 9) <= 1e-10
    model = model.float()
    assert torch.equal(model.generate(ids, 6, attention_mask=mask, temperature=0), naive_greedy(model, ids, mask, 6))


def test_a_long_input_with_a_prefix_and_a_sliding_window_takes_the_dense_window_mask():
    # Long enough for blockwise windows without a cache; the last token stepped from a cache is the reference.
    length = 3 + 2 * 64
    model = adapt(make_model(position="rope", max_seq_len=length, **{"attention.sliding_window": 3}), "prefix",
                  num_virtual_tokens=2)
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(model, 1, length)
    with torch.no_grad():
        full = model(ids)[:, -1]
        model(ids[:, :-1], cache=cache)
        stepped = model(ids[:, -1:], cache=cache)[:, -1]
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-10)


def test_an_encoder_decoder_gets_a_prefix_in_both_stacks_and_decodes_from_the_cache_as_it_recomputes():
    model = adapt(make_model(arch="encoder_decoder", num_decoder_layers=2), "prefix", num_virtual_tokens=2)
    assert [name.split(".")[0] for name in trainable(model)] == ["encoder"] * 2 + ["decoder"] * 2
    source, source_mask = left_padded([9, 5], 9, seed=2)
    target = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model, 2, 6)
    with torch.no_grad():
        for step in range(6):
            cached = model(source, attention_mask=source_mask, decoder_input_ids=target[:, step:step + 1],
                           cache=cache)[:, -1]
            full = model(source, attention_mask=source_mask, decoder_input_ids=target[:, :step + 1])[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-10, atol=1e-10)


# ----- prompt tuning -----


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_prompt_equals_the_model_reading_extra_tokens_whose_embeddings_are_the_prompt(arch):
    position = "learned"
    head = {"kind": "lm" if arch == "decoder" else "masked_lm"}
    model = adapt(make_model(position=position, arch=arch, head=head), "prompt", num_virtual_tokens=3)
    prompt = model.input_prompt["default"].embedding
    # The reference: the same weights with three more vocabulary rows, the prompt's embeddings, read first.
    config = model.config.replace(**{"stem.vocab_size": VOCAB + 3})
    reference = formerkit.build_model(config).to(torch.float64).eval()
    state = model.state_dict()
    state = {name: tensor for name, tensor in state.items() if not name.startswith("input_prompt")}
    state["stem.tokens.weight"] = torch.cat([state["stem.tokens.weight"], prompt.detach()])
    for name, tensor in state.items():  # the head's rows for the extra tokens: never compared
        if name.startswith("head.") and tensor.shape[0] == VOCAB:
            state[name] = torch.cat([tensor, tensor.new_zeros(3, *tensor.shape[1:])])
    reference.load_state_dict(state)
    ids, mask = left_padded([9, 6], 9)
    virtual = torch.arange(VOCAB, VOCAB + 3).expand(2, 3)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        expected = reference(torch.cat([virtual, ids], 1), attention_mask=torch.cat([torch.ones(2, 3).long(), mask],
                                                                                     1))
    assert out.shape == (2, 9, VOCAB)
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[:, 3:, :VOCAB][real], rtol=1e-12, atol=1e-12)


def test_only_the_prompt_gets_gradients_and_starts_as_vocabulary_embeddings():
    model = make_model()
    table = model.stem.tokens.weight.detach().clone()
    adapt(model, "prompt", num_virtual_tokens=4, seed=3)
    assert trainable(model) == ["input_prompt.default.embedding"]
    # Lester et al.'s initialization: each virtual token starts as some vocabulary token's embedding.
    start = model.input_prompt["default"].embedding.detach()
    assert all(any(torch.equal(row, entry) for entry in table) for row in start)
    ids, mask = left_padded([8, 4], 8)
    model(ids, attention_mask=mask).square().mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is not None] == ["input_prompt.default.embedding"]


def test_prompt_refuses_calls_that_name_positions_or_tokens_it_shifts():
    model = adapt(make_model(), "prompt", num_virtual_tokens=2)
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(InputError, match="position_ids: not supported with prompt tuning"):
        model(ids, position_ids=torch.arange(5).unsqueeze(0))
    with pytest.raises(InputError, match="mask: not supported with prompt tuning"):
        model(ids, mask=CausalMask())
    with pytest.raises(InputError, match="only the model's forward pass"):
        model.prepare(ids)


# ----- partial tuning -----


def test_partial_norms_biases_trains_every_norm_and_every_bias_and_nothing_else():
    model = adapt(make_model(), "partial", which="norms_biases")
    expected = [name for name, _ in model.named_parameters()
                if name.endswith(".bias") or ".norm." in name or name.startswith("decoder.final_norm")]
    assert trainable(model) == expected
    assert "decoder.blocks.0.attention.qkv.bias" in expected and "decoder.final_norm.weight" in expected


def test_partial_attention_trains_the_attention_projections_of_the_named_layers():
    model = adapt(make_model(), "partial", which="attention", layers=[1])
    assert trainable(model) == [f"decoder.blocks.1.attention.{part}.{kind}" for part in ("qkv", "out")
                                for kind in ("weight", "bias")]


def test_partial_head_trains_the_head_only_and_the_outputs_stay_those_of_the_base():
    model = make_model()
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        before = model(ids)
    adapt(model, "partial", which="head")
    assert trainable(model) == [name for name, _ in model.named_parameters() if name.startswith("head.")]
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    model(ids).sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is not None] == trainable(model)


# ----- refusals -----


@pytest.mark.parametrize(("method", "options", "message"), [
    ("adapter", {"bottleneck": 0}, "bottleneck: expected an integer >= 1"),
    ("adapter", {"activation": "tanh"}, "activation: expected one of"),
    ("prefix", {"num_virtual_tokens": 0}, "num_virtual_tokens: expected an integer >= 1"),
    ("prefix", {"projection_hidden": 0}, "projection_hidden: expected an integer >= 1"),
    ("prompt", {"num_virtual_tokens": 0}, "num_virtual_tokens: expected an integer >= 1"),
    ("prompt", {"num_virtual_tokens": MAX_LEN}, "leaves no room in max_seq_len"),
    ("prompt", {"layers": [0]}, "takes no layers"),
    ("partial", {"which": "everything"}, r"which: expected one of \['norms_biases', 'attention', 'head'\]"),
    ("partial", {"which": "head", "layers": [0]}, "which='head' takes no layers"),
    ("adapter", {"layers": "all"}, "layers: expected None, a layer index"),
    ("prefix", {"name": "keys"}, "name: 'keys' is the name of a container attribute"),
])
def test_bad_options_are_refused_by_name(method, options, message):
    with pytest.raises(InputError, match=message):
        adapt(make_model(), method, **options)


@pytest.mark.parametrize(("method", "overrides", "message"), [
    ("prefix", {"attention.kind": "linear"}, "attention is linear"),
    ("prompt", {"arch": "encoder_decoder", "num_decoder_layers": 1}, "encoder_decoder models are not supported"),
    ("prompt", {"stem": {"kind": "patches", "image_size": 8, "patch_size": 4, "in_channels": 1,
                         "vocab_size": None},
                "head": {"kind": "classification", "num_classes": 3}, "arch": "encoder"}, "needs a tokens stem"),
    ("partial", {"head": {"kind": "none"}}, "names no parameter"),
])
def test_methods_refuse_models_they_cannot_apply_to(method, overrides, message):
    with pytest.raises(InputError, match=message):
        adapt(make_model(**overrides), method, **({"which": "head"} if method == "partial" else {}))


@pytest.mark.parametrize("method", ["adapter", "prefix", "prompt", "partial"])
def test_projection_targets_given_to_a_method_that_reads_none_are_refused_not_ignored(method):
    model = make_model()
    with pytest.raises(InputError, match="targets does not apply to this method"):
        formerkit.add_adapters(model, method=method, targets=("q", "k"))
    assert all(p.requires_grad for p in model.parameters()), "a refused call leaves the model as it was"
    formerkit.add_adapters(model, method=method)  # the default targets are no choice of the caller's


def test_a_second_adapter_of_one_kind_and_name_on_a_block_is_refused():
    model = adapt(make_model(), "prefix", num_virtual_tokens=2)
    with pytest.raises(InputError, match="already has a prefix named 'default'"):
        METHODS["prefix"](model, targets=None, layers=None, name="default")
    adapt(model, "adapter", layers=[0])
    with pytest.raises(InputError, match="already has an adapter named 'default'"):
        METHODS["adapter"](model, targets=None, layers=[0], name="default")


# ----- on a frozen int8 base; through the compiled decode step -----


def test_adapters_and_prefixes_train_on_an_int8_base_and_partial_attention_is_refused_there():
    from formerkit.compress.quantize import quantize

    base = quantize(make_model(dtype=torch.float32), "weight-int8")
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        before = base(ids)
    model = adapt(base, "adapter", bottleneck=4)
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    adapt(model, "prefix", num_virtual_tokens=2)
    model(ids).square().mean().backward()
    with_grads = [name for name, p in model.named_parameters() if p.grad is not None]
    assert with_grads and all("feedforward_beside" in name or "key_value_prefix" in name for name in with_grads)
    with pytest.raises(InputError, match="which='attention': the projections are Int8"):
        adapt(quantize(make_model(dtype=torch.float32), "weight-int8"), "partial", which="attention")


@pytest.mark.slow
def test_compiled_generation_with_prompt_tuning_equals_eager_generation():
    # Adapters and prefixes are compiled by the switching test below (one compile each, ~20 s).
    model = adapt(make_model(position="rope", dtype=torch.float32), "prompt", num_virtual_tokens=3)
    ids, mask = left_padded([7, 4], 7)
    compiled = model.generate(ids, 6, attention_mask=mask, temperature=0, compile=True)
    assert torch.equal(compiled, model.generate(ids, 6, attention_mask=mask, temperature=0))


# ----- through formerkit.add_adapters: switching, saving, loading, merging -----


def test_several_named_adapters_switch_per_call_and_inactive_ones_act_as_absent():
    model = make_model(position="rope")
    ids, mask = left_padded([9, 5], 9)
    with torch.no_grad():
        base = model(ids, attention_mask=mask)
    formerkit.add_adapters(model, method="adapter", name="side", bottleneck=4)
    for block in model.decoder.blocks:
        redraw(block.feedforward_beside["side"], seed=1)
    formerkit.add_adapters(model, method="prefix", name="learned_keys", num_virtual_tokens=2)
    formerkit.add_adapters(model, method="prompt", name="words", num_virtual_tokens=3)
    # The last added is the active, trainable one.
    assert trainable(model) == ["input_prompt.words.embedding"]
    with torch.no_grad():
        with formerkit.use_adapter(model, None):
            assert torch.equal(model(ids, attention_mask=mask), base)
        outputs = {}
        for name in ("side", "learned_keys", "words"):
            with formerkit.use_adapter(model, name):
                outputs[name] = model(ids, attention_mask=mask)
                assert check_cached_steps_of(model, ids, mask) <= 1e-10
        assert all((outputs[name] - base).abs().max() > 1e-3 for name in outputs)
        with formerkit.use_adapter(model, ["side", "learned_keys", "words"]):
            assert check_cached_steps_of(model, ids, mask) <= 1e-10
            both = model(ids, attention_mask=mask)
        assert all((both - outputs[name]).abs().max() > 1e-3 for name in outputs)
    formerkit.set_adapter(model, "learned_keys")
    assert all(".key_value_prefix.learned_keys." in name for name in trainable(model)) and trainable(model)


def check_cached_steps_of(model, ids, mask) -> float:
    """The cache check with the virtual tokens of whatever prompts are active."""
    virtual = model.input_prompt() if model.input_prompt is not None else None
    extra = 0 if virtual is None else virtual.shape[0]
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1] + extra)
    with torch.no_grad():
        model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)
        cached = model(ids[:, 5:], attention_mask=mask[:, 5:], cache=cache)[:, -1]
        return (cached - model(ids, attention_mask=mask)[:, -1]).abs().max().item()


@pytest.mark.parametrize(("method", "options"), [
    ("adapter", {"bottleneck": 3, "scale": 0.5}),
    ("prefix", {"num_virtual_tokens": 2, "projection_hidden": 4}),
    ("prompt", {"num_virtual_tokens": 3}),
    ("partial", {"which": "norms_biases"}),
    ("partial", {"which": "attention", "layers": [1]}),
])
def test_saved_adapters_load_onto_a_fresh_base_with_the_same_outputs(method, options, tmp_path):
    model = formerkit.add_adapters(make_model(), method=method, **options)
    with torch.no_grad():  # as if trained: every trainable tensor moved
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    ids, mask = left_padded([9, 5], 9)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
    formerkit.save_adapters(model, tmp_path / "adapter")
    loaded = formerkit.load_adapters(make_model(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask), expected)
    assert trainable(loaded) == trainable(model)
    with pytest.raises(formerkit.CheckpointError, match="another base"):
        formerkit.load_adapters(make_model(seed=1), tmp_path / "adapter")


def test_add_adapters_refuses_lora_arguments_and_merging_for_these_methods():
    with pytest.raises(InputError, match="rank does not apply to this method"):
        formerkit.add_adapters(make_model(), method="adapter", rank=4)
    model = formerkit.add_adapters(make_model(), method="prefix", num_virtual_tokens=2)
    with pytest.raises(InputError, match="cannot be merged"):
        formerkit.merge_adapters(model)
    with pytest.raises(InputError, match="bottleneck: expected an integer >= 1"):
        formerkit.add_adapters(make_model(), method="adapter", bottleneck=0)
    # A refused call leaves the model as it was (trainable, no adapter).
    model = make_model()
    with pytest.raises(InputError, match="which: expected one of"):
        formerkit.add_adapters(model, method="partial", which="embeddings")
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.slow
def test_compiled_generation_follows_the_adapter_switched_on_per_call():
    model = make_model(position="rope", dtype=torch.float32)
    formerkit.add_adapters(model, method="prefix", name="first", num_virtual_tokens=2)
    formerkit.add_adapters(model, method="adapter", name="second", bottleneck=4)
    for index, block in enumerate(model.decoder.blocks):
        redraw(block.feedforward_beside["second"], seed=index)
    ids, mask = left_padded([6, 3], 6)
    # Two choices in turn: a compiled step kept from the first would generate the first adapter's tokens for the
    # second (each choice compiles once, ~20 s, so the bare base is left to the eager tests).
    for names in ("first", "second"):
        with formerkit.use_adapter(model, names):
            compiled = model.generate(ids, 5, attention_mask=mask, temperature=0, compile=True)
            assert torch.equal(compiled, model.generate(ids, 5, attention_mask=mask, temperature=0)), names
