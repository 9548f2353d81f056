"""LoRA and DoRA (formerkit.adapt.lora) and the adapter API around them: the update written out by hand per target,
DoRA as its formula, merge == unmerged, fresh == base, what trains, several adapters per call, an int8 base, the
formerkit file format and what it refuses."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import formerkit
from formerkit.adapt import adapter_names, parameter_counts, set_adapter, use_adapter
from formerkit.compress.quantize import quantize
from formerkit.errors import CheckpointError, InputError

from ..conftest import randomize_weights, token_config

VOCAB = 40


def gated_model(dtype=torch.float32, **feedforward):
    """A tiny LLaMA-style decoder (SwiGLU, grouped-query attention: q 16 rows, k and v 8 each), random weights."""
    config = token_config(vocab_size=VOCAB, width=16, num_layers=3, num_heads=4,
                          attention={"num_kv_heads": 2, "qkv_bias": True},
                          feedforward={"activation": "swiglu", "hidden_size": 24, **feedforward}, position="rope",
                          norm={"kind": "rmsnorm"})
    return randomize_weights(formerkit.build_model(config), 0).to(dtype).eval()


def plain_model(**fields):
    """A tiny GPT-2-style decoder (GELU MLP, biases everywhere), random weights."""
    config = token_config(vocab_size=VOCAB, width=16, num_layers=2, num_heads=4, **fields)
    return randomize_weights(formerkit.build_model(config), 1).eval()


def randomize_adapters(model, seed: int = 5):
    """Non-zero B (and perturbed magnitudes): a fresh adapter is the identity, which would hide a wrong product."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters." in name:
                noise = 0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                # A and B drawn afresh (independent of the global generator that drew A); magnitudes perturbed
                if name.endswith("magnitude"):
                    parameter.add_(noise)
                else:
                    parameter.copy_(noise)
    return model


def affine(linear, x):
    """W x + b of a Linear, written out."""
    return x @ linear.weight.T + (0 if linear.bias is None else linear.bias)


def tokens(seed: int = 0):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


# The rows of block 0's Linears each target owns in gated_model: q 16 rows, k 8, v 8 of qkv; gate and up 24 each.
ROWS = {"q": ("attention.qkv", 0, 16), "k": ("attention.qkv", 16, 24), "v": ("attention.qkv", 24, 32),
        "out": ("attention.out", 0, 16), "gate": ("feedforward.fc_in", 0, 24), "fc_in": ("feedforward.fc_in", 24, 48),
        "fc_out": ("feedforward.fc_out", 0, 16)}


@pytest.mark.parametrize("target", list(ROWS))
def test_lora_adds_the_low_rank_product_to_its_rows_only(target):
    model = gated_model(torch.float64)
    formerkit.add_adapters(model, targets=(target,), rank=3, alpha=6, layers=[0])
    randomize_adapters(model)
    path, start, stop = ROWS[target]
    linear = model.decoder.blocks[0].get_submodule(path)
    lora = linear.adapters["default"][target]
    x = torch.randn(2, 5, linear.in_features, dtype=torch.float64)
    # y = W x + b, plus (alpha / r) B A x on the target's rows, zero elsewhere (Hu et al. 2021, eq. 3).
    expected = affine(linear, x)
    update = torch.zeros_like(expected)
    update[..., start:stop] = (6 / 3) * (x @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(linear(x), expected + update, atol=1e-6, rtol=0)
    # and in the model: the same as the weight with B A added by hand
    reference = copy.deepcopy(model)
    for path_name, _ in [(n, m) for n, m in reference.named_modules() if hasattr(m, "adapters")]:
        module = reference.get_submodule(path_name)
        del module.adapters
        module._forward_hooks.clear()
    with torch.no_grad():
        reference.decoder.blocks[0].get_submodule(path).weight[start:stop] += 2.0 * lora.lora_B @ lora.lora_A
    ids = tokens()
    assert (model(ids) - reference(ids)).abs().max() < 1e-6


def test_rank_stabilized_scale_is_alpha_over_sqrt_rank():
    model = gated_model(torch.float64)
    formerkit.add_adapters(model, targets=("out",), rank=4, alpha=8, rslora=True, layers=0)
    randomize_adapters(model)
    linear = model.decoder.blocks[0].attention.out
    lora = linear.adapters["default"]["out"]
    x = torch.randn(3, linear.in_features, dtype=torch.float64)
    expected = affine(linear, x) + (8 / math.sqrt(4)) * (x @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(linear(x), expected, atol=1e-6, rtol=0)


def test_dropout_acts_on_the_lora_input_in_training_only():
    model = gated_model(torch.float64)
    formerkit.add_adapters(model, targets=("fc_out",), rank=2, alpha=2, dropout=0.5, layers=[1])
    randomize_adapters(model)
    linear = model.decoder.blocks[1].feedforward.fc_out
    lora = linear.adapters["default"]["fc_out"]
    x = torch.randn(4, linear.in_features, dtype=torch.float64)
    base = affine(linear, x)

    def product(inputs):
        return (inputs @ lora.lora_A.T) @ lora.lora_B.T

    torch.testing.assert_close(linear(x), base + product(x), atol=1e-6, rtol=0)  # eval: no dropout
    model.train()
    torch.manual_seed(3)
    got = linear(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, base + product(dropped), atol=1e-6, rtol=0)


@pytest.mark.parametrize("target", ["q", "v", "gate", "fc_out"])
def test_dora_is_magnitude_times_the_normalized_adapted_weight(target):
    model = gated_model(torch.float64)
    formerkit.add_adapters(model, method="dora", targets=(target,), rank=2, alpha=4, layers=[2])
    randomize_adapters(model)
    path, start, stop = ROWS[target]
    linear = model.decoder.blocks[2].get_submodule(path)
    lora = linear.adapters["default"][target]
    x = torch.randn(2, 3, linear.in_features, dtype=torch.float64)
    # W' = m * (W + s B A) / ||W + s B A||, the norm per output row (Liu et al. 2024, eq. 5)
    adapted = linear.weight[start:stop] + 2.0 * lora.lora_B @ lora.lora_A
    directed = adapted / adapted.norm(dim=1, keepdim=True)
    weight = linear.weight.clone()
    weight[start:stop] = lora.magnitude.unsqueeze(1) * directed
    expected = x @ weight.T + (linear.bias if linear.bias is not None else 0)
    torch.testing.assert_close(linear(x), expected, atol=1e-6, rtol=0)


def test_dora_with_dropout_applies_its_scale_to_the_dropped_out_input_as_peft_does():
    model = gated_model(torch.float64)
    formerkit.add_adapters(model, method="dora", targets=("out",), rank=2, alpha=2, dropout=0.3, layers=[0])
    randomize_adapters(model)
    model.train()
    linear = model.decoder.blocks[0].attention.out
    lora = linear.adapters["default"]["out"]
    x = torch.randn(3, linear.in_features, dtype=torch.float64)
    torch.manual_seed(11)
    got = linear(x)
    torch.manual_seed(11)
    dropped = F.dropout(x, 0.3, training=True)
    # W x + b + (m / n - 1) W x' + (m / n) s B A x', n = ||W + s B A|| per row, x' = dropout(x)
    ratio = lora.magnitude / (linear.weight + lora.lora_B @ lora.lora_A).norm(dim=1)
    expected = affine(linear, x) + (ratio - 1) * (dropped @ linear.weight.T) + ratio * (
        (dropped @ lora.lora_A.T) @ lora.lora_B.T)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # the norm is a constant to the gradient (Liu et al. 2024, section 4.3): the magnitude still learns
    got.sum().backward()
    assert lora.magnitude.grad is not None and lora.lora_A.grad is not None


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_fresh_adapter_leaves_the_outputs_unchanged(method):
    model = gated_model()
    ids = tokens()
    before = model(ids)
    formerkit.add_adapters(model, method=method, targets=tuple(ROWS), rank=4)
    if method == "lora":
        assert torch.equal(model(ids), before)  # B = 0: exactly the base
    else:
        assert (model(ids) - before).abs().max() < 1e-5  # m / ||W|| = 1 up to rounding


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merging_gives_the_unmerged_outputs_and_removes_the_adapters(method):
    model = gated_model()
    formerkit.add_adapters(model, method=method, targets=tuple(ROWS), rank=4, alpha=8, layers=range(0, 2))
    randomize_adapters(model)
    ids = tokens()
    unmerged = model(ids)
    base_names = [name for name, _ in model.named_parameters() if ".adapters." not in name]
    formerkit.merge_adapters(model)
    assert (model(ids) - unmerged).abs().max() <= 1e-5
    assert [name for name, _ in model.named_parameters()] == base_names
    assert not any(module._forward_hooks for module in model.modules())
    assert all(parameter.requires_grad for parameter in model.parameters())  # as before add_adapters
    assert adapter_names(model) == []


def test_only_the_adapter_trains_and_gradients_reach_it():
    model = gated_model()
    formerkit.add_adapters(model, targets=("q", "v", "fc_in"), rank=2)
    randomize_adapters(model)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".adapters.default." in name for name in trainable)
    assert len(trainable) == 3 * 3 * 2  # 3 layers x 3 targets x (A, B)
    model.train()
    model(tokens()).logsumexp(-1).mean().backward()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    counts = parameter_counts(model)
    adapter_size = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counts.trainable == adapter_size == counts.adapters["default"]
    assert counts.frozen == sum(p.numel() for n, p in model.named_parameters() if n not in trainable)


def test_several_adapters_switch_per_call():
    model = gated_model()
    base = copy.deepcopy(model)
    ids = tokens()
    formerkit.add_adapters(model, targets=("q", "v"), rank=2, name="a")
    randomize_adapters(model, seed=1)
    alone_a = model(ids)
    formerkit.add_adapters(model, targets=("out", "fc_out"), rank=3, name="b")
    randomize_adapters(model, seed=2)  # also moves a's weights: recompute a's output below
    assert adapter_names(model) == ["a", "b"]
    # b is the active one and the only trainable one
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".adapters.b." in n}
    with_b = model(ids)
    with use_adapter(model, "a"):
        with_a = model(ids)
    with use_adapter(model, None):
        assert torch.equal(model(ids), base(ids))
    assert torch.equal(model(ids), with_b)  # the choice comes back after the block
    assert not torch.equal(with_a, with_b) and not torch.equal(with_a, alone_a)
    # each equals the base with only its own update merged by hand
    for name, output in (("a", with_a), ("b", with_b)):
        reference = copy.deepcopy(model)
        set_adapter(reference, name)
        formerkit.merge_adapters(reference)
        assert (reference(ids) - output).abs().max() < 1e-5
    with use_adapter(model, ["a", "b"]):
        both = model(ids)
    reference = copy.deepcopy(model)
    set_adapter(reference, ["a", "b"])
    formerkit.merge_adapters(reference)
    assert (reference(ids) - both).abs().max() < 1e-5
    set_adapter(model, "a")
    assert torch.equal(model(ids), with_a)
    assert all(".adapters.a." in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_on_an_int8_base_adds_its_term_to_the_int8_output():
    float_model = gated_model()
    model = quantize(float_model, "weight-int8")
    ids = tokens()
    int8_output = model(ids)
    formerkit.add_adapters(model, targets=("q", "k", "fc_in", "fc_out"), rank=2, alpha=4)
    assert torch.equal(model(ids), int8_output)
    randomize_adapters(model)
    for target in ("q", "fc_in", "fc_out"):
        layer = model.decoder.blocks[1].get_submodule(ROWS[target][0])
        x = torch.randn(2, 4, layer.in_features)
        bias = 0 if layer.bias is None else layer.bias
        int8_alone = x @ layer.dequantized_weight(torch.float32).T + bias
        update = torch.zeros_like(int8_alone)
        for lora in layer.adapters["default"].values():  # q and k share qkv
            assert lora.lora_A.dtype == torch.float32 and layer.weight_int8.dtype == torch.int8
            update[..., lora.start:lora.stop] = 2.0 * (x @ lora.lora_A.T) @ lora.lora_B.T
        torch.testing.assert_close(layer(x), int8_alone + update, atol=1e-5, rtol=0)
    model.train()
    model(ids).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(InputError, match="int8 weights.*re-quantize.*float base"):
        formerkit.merge_adapters(model)
    with pytest.raises(InputError, match="dynamic-int8.*weight-int8"):
        formerkit.add_adapters(quantize(float_model, "dynamic-int8"))


def test_saved_adapters_load_onto_a_copy_of_the_base_with_the_same_outputs(tmp_path):
    model = gated_model()
    base = copy.deepcopy(model)
    formerkit.add_adapters(model, method="dora", targets=("k", "gate"), rank=2, name="first", layers=[0, 2])
    formerkit.add_adapters(model, targets=("q", "out"), rank=3, alpha=3, rslora=True, name="second")
    randomize_adapters(model)
    ids = tokens()
    outputs = {}
    for name in ("first", "second"):
        with use_adapter(model, name):
            outputs[name] = model(ids)
    formerkit.save_adapters(model, tmp_path / "both")
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["adapter.json", "adapter.safetensors"]
    loaded = formerkit.load_adapters(copy.deepcopy(base), tmp_path / "both")
    assert adapter_names(loaded) == ["first", "second"]
    for name in ("first", "second"):
        with use_adapter(loaded, name):
            assert torch.equal(loaded(ids), outputs[name])
    # one adapter alone, under another name
    formerkit.save_adapters(model, tmp_path / "one", name="second")
    renamed = formerkit.load_adapters(copy.deepcopy(base), tmp_path / "one", name="other")
    assert adapter_names(renamed) == ["other"] and torch.equal(renamed(ids), outputs["second"])


def test_an_adapter_for_another_base_is_refused_naming_what_differs(tmp_path):
    model = gated_model()
    base = copy.deepcopy(model)
    formerkit.add_adapters(model, rank=2)
    formerkit.save_adapters(model, tmp_path / "a")
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.decoder.blocks[1].attention.out.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match=r"another base.*weights that differ: decoder\.blocks\.1\.attention\.out"
                                              r"\.weight"):
        formerkit.load_adapters(changed, tmp_path / "a")
    assert adapter_names(changed) == []  # refused before anything was added
    other = gated_model(hidden_size=32)
    with pytest.raises(CheckpointError, match="another base.*the config"):
        formerkit.load_adapters(other, tmp_path / "a")
    with pytest.raises(CheckpointError, match="another base.*quantization"):
        formerkit.load_adapters(quantize(base, "weight-int8"), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"another base.*dtypes \(float64, the adapter's base float32"):
        formerkit.load_adapters(copy.deepcopy(base).double(), tmp_path / "a")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"targets": ("q", "query")}, r"'query' is not a projection name; expected some of q, k, v, qkv, out"),
    ({"targets": ("v",), "rank": 9}, r"rank 9 is larger than target 'v' at decoder\.blocks\.0\.attention\.qkv "
                                     r"\(8 rows x 16 inputs\); at most 8"),
    ({"layers": [0, 3]}, r"layers: \[3\] out of range for a stack of 3 layers"),
    ({"rank": 0}, r"rank: expected an integer >= 1"),
    ({"dropout": 1.0}, r"dropout: expected a number >= 0 and < 1"),
    ({"method": "lorax"}, r"method: expected one of .*'lora'"),
    ({"targets": ("cross_q",)}, r"name no projection of this model"),
])
def test_bad_targets_are_refused_by_name_before_any_tensor_is_made(kwargs, message):
    model = gated_model()
    parameters = [name for name, _ in model.named_parameters()]
    with pytest.raises(InputError, match=message):
        formerkit.add_adapters(model, **kwargs)
    assert [name for name, _ in model.named_parameters()] == parameters
    assert all(parameter.requires_grad for parameter in model.parameters())  # nothing left frozen either


def test_gate_is_refused_for_a_plain_mlp_and_a_name_is_taken_once():
    model = plain_model()
    with pytest.raises(InputError, match=r"target 'gate': layer 0's feed-forward is not gated.*use fc_in"):
        formerkit.add_adapters(model, targets=("gate",))
    formerkit.add_adapters(model, targets=("fc_in",), rank=2)  # the whole first projection of a plain MLP
    lora = model.decoder.blocks[0].feedforward.fc_in.adapters["default"]["fc_in"]
    assert (lora.start, lora.stop) == (0, 64)
    with pytest.raises(InputError, match="already has an adapter named 'default'"):
        formerkit.add_adapters(model, targets=("q",))


def test_mixture_of_experts_feedforward_targets_adapt_every_expert():
    model = gated_model(num_experts=3, experts_per_token=2)
    ids = tokens()
    before = model(ids)
    formerkit.add_adapters(model, targets=("fc_in", "fc_out"), rank=2, layers=[1])
    experts = model.decoder.blocks[1].feedforward.experts
    assert all("default" in expert.fc_in.adapters and "default" in expert.fc_out.adapters for expert in experts)
    assert not hasattr(model.decoder.blocks[1].feedforward.router, "adapters")
    assert torch.equal(model(ids), before)
    randomize_adapters(model)
    adapted = model(ids)
    formerkit.merge_adapters(model)
    assert (model(ids) - adapted).abs().max() <= 1e-5


def test_cross_attention_targets_of_an_encoder_decoder():
    config = token_config("encoder_decoder", vocab_size=VOCAB, width=16, num_layers=2, num_heads=4,
                          position="learned")
    model = randomize_weights(formerkit.build_model(config), 2).eval()
    formerkit.add_adapters(model, targets=("q", "cross_k", "cross_v", "cross_out"), rank=2)
    assert "default" in model.encoder.blocks[0].attention.qkv.adapters
    assert "default" in model.decoder.blocks[1].attention.qkv.adapters
    kv = model.decoder.blocks[0].cross_attention.kv.adapters["default"]
    assert (kv["cross_k"].start, kv["cross_k"].stop, kv["cross_v"].start, kv["cross_v"].stop) == (0, 16, 16, 32)
    randomize_adapters(model)
    ids = tokens()
    adapted = model(ids, decoder_input_ids=ids)
    formerkit.merge_adapters(model)
    assert (model(ids, decoder_input_ids=ids) - adapted).abs().max() <= 1e-5


def test_an_adapter_trained_on_an_int8_base_loads_onto_its_float_model_for_merging(tmp_path):
    float_model = gated_model()
    model = quantize(float_model, "weight-int8")
    formerkit.add_adapters(model, targets=("q", "fc_out"), rank=2)
    randomize_adapters(model)
    formerkit.save_adapters(model, tmp_path / "qlora")
    target = copy.deepcopy(float_model)
    formerkit.load_adapters(target, tmp_path / "qlora")
    trained = dict(model.named_parameters())
    for name, parameter in target.named_parameters():
        if ".adapters." in name:
            assert torch.equal(parameter, trained[name])
    ids = tokens()
    adapted = target(ids)
    formerkit.merge_adapters(target)
    assert (target(ids) - adapted).abs().max() <= 1e-5
    other = copy.deepcopy(float_model)
    with torch.no_grad():
        other.decoder.blocks[0].feedforward.fc_out.weight[3] *= 1.5  # quantizes to other int8 weights
    with pytest.raises(CheckpointError, match=r"weights that differ: decoder\.blocks\.0\.feedforward\.fc_out"):
        formerkit.load_adapters(other, tmp_path / "qlora")


def test_two_active_adapters_on_one_target_add_up():
    model = gated_model()
    formerkit.add_adapters(model, targets=("q", "fc_in"), rank=2, name="a")
    formerkit.add_adapters(model, method="dora", targets=("q",), rank=3, name="b")
    randomize_adapters(model)
    ids = tokens()
    with use_adapter(model, ["a", "b"]):
        both = model(ids)
    set_adapter(model, ["a", "b"])
    formerkit.merge_adapters(model)  # each update against the original weight, summed
    assert (model(ids) - both).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_gradients_equal_those_of_the_update_written_into_the_weight(method):
    model = gated_model(torch.float64)
    formerkit.add_adapters(model, method=method, targets=("q", "v", "fc_out"), rank=2, alpha=4, layers=[1])
    randomize_adapters(model)
    model.train()
    ids = tokens()
    model(ids).logsumexp(-1).mean().backward()
    # The reference: a bare copy whose weights are W + s B A (DoRA: m (W + s B A) / ||W + s B A||, the norm held
    # constant) as functions of leaf copies of the adapter tensors.
    bare = copy.deepcopy(model)
    formerkit.merge_adapters(bare)  # only to drop the adapters; the weights are replaced below
    block, weights = model.decoder.blocks[1], {}
    leaves = {}
    for path in ("attention.qkv", "feedforward.fc_out"):
        linear = block.get_submodule(path)
        weight = linear.weight.detach().clone()
        for target, lora in linear.adapters["default"].items():
            a, b = (lora.lora_A.detach().clone().requires_grad_(), lora.lora_B.detach().clone().requires_grad_())
            leaves[target] = (lora, a, b)
            rows = linear.weight[lora.start:lora.stop] + 2.0 * b @ a
            if method == "dora":
                m = lora.magnitude.detach().clone().requires_grad_()
                leaves[target] += (m,)
                rows = (m / rows.norm(dim=1).detach()).unsqueeze(1) * rows
            weight = torch.cat([weight[:lora.start], rows, weight[lora.stop:]])
        weights[f"decoder.blocks.1.{path}.weight"] = weight
    torch.func.functional_call(bare.train(), weights, (ids,)).logsumexp(-1).mean().backward()
    for lora, a, b, *m in leaves.values():
        torch.testing.assert_close(lora.lora_A.grad, a.grad, atol=1e-9, rtol=1e-6)
        torch.testing.assert_close(lora.lora_B.grad, b.grad, atol=1e-9, rtol=1e-6)
        if m:
            torch.testing.assert_close(lora.magnitude.grad, m[0].grad, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_paths_give_the_hooks_outputs_and_gradients(method):
    # In train mode the fused projections run part by part and the MLP recomputes fc_out's input, LoRA's terms
    # inside both (formerkit.nn.projection, formerkit.nn.feedforward); eval mode takes the hook on the fused output.
    model = gated_model(torch.float64)
    formerkit.add_adapters(model, method=method, targets=("q", "k", "v", "out", "gate", "fc_in", "fc_out"), rank=2)
    randomize_adapters(model)
    ids, upstream = tokens(), torch.randn(2, 7, VOCAB, dtype=torch.float64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = []
    for train in (True, False):
        out = model.train(train)(ids)
        results.append((out, torch.autograd.grad(out, trainable, upstream)))
    (out, grads), (reference, reference_grads) = results
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_lora_on_fc_out_keeps_the_mlps_recomputing_path():
    from formerkit.summary import saved_activation_bytes

    ids = tokens()
    saved = {}
    for targets in (("q", "v"), ("q", "v", "fc_out")):
        model = gated_model()
        formerkit.add_adapters(model, targets=targets, rank=2)
        saved[targets] = saved_activation_bytes(model.train(), ids)
    # fc_out's input act(gate) * up is recomputed for A's gradient too: only the product x A^T (for B's) is new.
    layers, rank = 3, 2
    assert saved[("q", "v", "fc_out")] - saved[("q", "v")] == layers * ids.numel() * rank * 4
