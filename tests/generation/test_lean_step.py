"""The eager decode step (``LeanStep``) computes what the general forward pass with a cache computes.

For decoders of many shapes (GPT-2's layout, LLaMA's, parallel blocks, post- and sandwich norms, LayerScale, q/k norms,
soft-capped scores and logits, shared blocks, grouped keys and values, left-padded batches), every step's logits must
equal both the general cached forward's (``model(token, cache=...)``, on a cache of its own) and a recompute of the
whole sequence without a cache; the two caches must hold the same keys, values and bookkeeping. What the step does not
cover it must refuse, and generation must then still equal a recompute.
"""

from __future__ import annotations

import pytest
import torch

from formerkit.generation.lean_step import LeanStep
from formerkit.nn.cache import KVCache

from .test_cache import TOL, left_padded, make_model, naive_greedy, recompute_last_logits

COVERED = [
    {},  # GPT-2's layout: learned positions, LayerNorm, GELU MLP
    {"position.kind": "rope", "norm.kind": "rmsnorm", "feedforward.activation": "swiglu",
     "attention.num_kv_heads": 2, "attention.qkv_bias": False, "attention.out_bias": False},  # LLaMA's
    {"position.kind": "rope", "parallel_residual": "shared_norm", "position.rotary_fraction": 0.5},  # GPT-J's
    {"parallel_residual": "separate_norms", "position.kind": "sinusoidal"},  # GPT-NeoX's
    {"norm.placement": "post"},
    {"norm.placement": "sandwich", "layer_scale": 0.5, "attention.qk_norm": True, "attention.num_kv_heads": 1},
    {"attention.softcap": 5.0, "head.logit_softcap": 3.0, "attention.scale": 0.1, "stem.embedding_norm": True,
     "position.kind": "none", "head.tie_embeddings": True},
    {"num_unique_layers": 1, "feedforward.activation": "geglu_tanh", "norm.weight_offset": 1.0,
     "norm.kind": "rmsnorm", "stem.scale_embeddings": True, "position.kind": "rope"},  # Gemma's parts
    {"stem.num_token_types": 2},  # the model's own embed (token types added to every token)
]


def _general_step(model, tokens, cache):
    return model(tokens.view(-1, 1), cache=cache, logits_to_keep=1)[:, -1]


@pytest.mark.parametrize("options", COVERED, ids=lambda options: ",".join(options) or "gpt2")
def test_each_step_equals_the_general_forward_and_a_recompute(options):
    model = make_model(**options)
    ids, mask = left_padded([6, 3, 1], 6, seed=5)
    steps = 6
    lean_cache, general_cache = (KVCache.for_model(model, 3, 6 + steps) for _ in range(2))
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=lean_cache)
        model(ids, attention_mask=mask, cache=general_cache)
        step = LeanStep.build(model, lean_cache)
        assert step is not None
        sequence, keep = ids, mask
        for index in range(steps):
            tokens = torch.randint(1, 29, (3,), generator=torch.Generator().manual_seed(index))
            lean = step(tokens)
            general = _general_step(model, tokens, general_cache)
            sequence, keep = torch.cat([sequence, tokens[:, None]], 1), torch.cat([keep, torch.ones(3, 1).long()], 1)
            assert (lean - general).abs().max().item() <= 1e-6
            assert (lean - recompute_last_logits(model, sequence, keep)).abs().max().item() <= TOL
    assert lean_cache.length == general_cache.length == 6 + steps
    for name in ("keep", "positions", "counts"):
        assert torch.equal(getattr(lean_cache, name), getattr(general_cache, name))
    for ours, theirs in zip(lean_cache.keys + lean_cache.values, general_cache.keys + general_cache.values):
        assert (ours - theirs).abs().max().item() <= 1e-6


def test_generation_through_the_step_equals_a_recompute_loop():
    model = make_model(**COVERED[1])
    ids, mask = left_padded([7, 2], 7, seed=3)
    assert torch.equal(model.generate(ids, 9, attention_mask=mask, temperature=0), naive_greedy(model, ids, mask, 9))


def test_hooked_projections_are_called_as_modules():
    # A forward hook on a projection (as LoRA and other adapters install) changes its output: the step must run it.
    model = make_model()
    layer = model.decoder.blocks[1]
    layer.attention.out.register_forward_hook(lambda module, args, out: out * 1.5)
    layer.feedforward.fc_in.register_forward_hook(lambda module, args, out: out - 0.25)
    ids, _ = left_padded([5], 5)
    assert torch.equal(model.generate(ids, 8, temperature=0), naive_greedy(model, ids, None, 8))
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(ids, cache=cache)
        step = LeanStep.build(model, cache)
        general_cache = KVCache.for_model(model, 1, 8)
        model(ids, cache=general_cache)
        tokens = torch.tensor([3])
        assert (step(tokens) - _general_step(model, tokens, general_cache)).abs().max().item() <= 1e-6


def _adapted(kind: str):
    from formerkit.adapt.lora import apply_lora
    from formerkit.adapt.prompt import apply_prompt
    from formerkit.compress.quantize import quantize

    from ..conftest import randomize_weights

    if kind == "int8":
        return quantize(make_model(), "dynamic-int8")
    model = make_model(**{"position.kind": "rope"})
    if kind == "lora":
        apply_lora(model, targets=("q", "v", "fc_in"))
    else:
        apply_prompt(model, num_virtual_tokens=3)
    return randomize_weights(model, 3, std="fan_in").eval()  # non-zero adapter weights


@pytest.mark.parametrize("kind", ["lora", "prompt", "int8"])
def test_adapted_and_quantized_models_generate_through_the_step_as_through_the_forward(kind, monkeypatch):
    model = _adapted(kind)
    ids, mask = left_padded([6, 3], 6, seed=4)
    built = []
    build = LeanStep.build
    monkeypatch.setattr(LeanStep, "build", staticmethod(lambda *args: built.append(build(*args)) or built[-1]))
    lean = model.generate(ids, 6, attention_mask=mask, temperature=0)
    assert built and built[0] is not None
    monkeypatch.setattr(LeanStep, "build", staticmethod(lambda *args: None))
    assert torch.equal(lean, model.generate(ids, 6, attention_mask=mask, temperature=0))


@pytest.mark.parametrize("options", [
    {"position.kind": "alibi"},
    {"position.kind": "relative", "position.relative_buckets": 8, "position.relative_max_distance": 20},
    {"attention.sliding_window": 3},
    {"attention.kind": "linear"},
    {"feedforward.num_experts": 2, "feedforward.experts_per_token": 1},
], ids=lambda options: ",".join(f"{key}={value}" for key, value in options.items()))
def test_what_the_step_does_not_cover_takes_the_general_forward(options):
    model = make_model(**options)
    ids, mask = left_padded([5, 2], 5, seed=2)
    cache = KVCache.for_model(model, 2, 9)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    assert LeanStep.build(model, cache) is None
    assert torch.equal(model.generate(ids, 4, attention_mask=mask, temperature=0), naive_greedy(model, ids, mask, 4))


def test_hooks_on_skipped_modules_or_training_mode_refuse_the_step():
    model = make_model()
    cache = KVCache.for_model(model, 1, 4)
    assert LeanStep.build(model, cache) is not None
    handle = model.decoder.blocks[0].register_forward_hook(lambda *args: None)
    assert LeanStep.build(model, cache) is None
    handle.remove()
    forward = model.forward
    model.forward = lambda *args, **kwargs: forward(*args, **kwargs)  # a wrapper in the model's place
    assert LeanStep.build(model, cache) is None
    del model.forward
    assert LeanStep.build(model, cache) is not None
    model.train()
    assert LeanStep.build(model, cache) is None


def test_a_step_past_the_cache_is_refused_and_a_failed_step_leaves_the_length():
    model = make_model()
    ids, _ = left_padded([3], 3)
    cache = KVCache.for_model(model, 1, 4)
    with torch.no_grad():
        model(ids, cache=cache)
        step = LeanStep.build(model, cache)
        with pytest.raises(IndexError):
            step(torch.tensor([29]))  # out of the vocabulary: the embedding fails before any layer runs
        assert cache.length == 3 and int(cache.counts[0]) == 3
        step(torch.tensor([4]))
        with pytest.raises(RuntimeError, match="max_length"):
            step(torch.tensor([4]))
