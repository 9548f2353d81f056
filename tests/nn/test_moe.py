"""The mixture-of-experts feed-forward against its definition, written out here.

Routing is checked against a dense reference (every expert on every token, the top k picked from router
probabilities computed in the test), capacity against the documented priority order, the load-balancing loss against
hand-worked cases, and the model-level plumbing (aux_loss, padding, the key/value cache, save/load, summary, training)
end to end on tiny models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import formerkit
from formerkit import ConfigError, ModelConfig
from formerkit.cli import main
from formerkit.nn.cache import KVCache
from formerkit.nn.feedforward import MLP, GatedMLP
from formerkit.nn.moe import MoEFeedForward, load_balancing_loss

from ..conftest import token_config

WIDTH = 8
VOCAB = 23


def make_layer(num_experts: int = 4, k: int = 2, capacity_factor: float | None = None, width: int = WIDTH,
               gated: bool = False, seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    cls = GatedMLP if gated else MLP
    experts = [cls(width, 12, "silu" if gated else "gelu") for _ in range(num_experts)]
    return MoEFeedForward(width, experts, k, capacity_factor)


def routed_by_logits(layer: MoEFeedForward) -> None:
    """Makes the router the identity, so a token's router logits are its first num_experts features."""
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(layer.num_experts, layer.router.in_features))


def dense_reference(layer: MoEFeedForward, x: torch.Tensor, dropped: set[tuple[int, int]] = frozenset()):
    """Every expert on every token; each token's output is sum over its k most probable experts of gate * output,
    with gates p / (sum of the chosen p) (k > 1) or p (k = 1). ``dropped`` holds (token, expert) pairs that add
    nothing."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ layer.router.weight.t()
    exps = logits.exp()
    probabilities = exps / exps.sum(dim=-1, keepdim=True)
    every = torch.stack([expert(flat) for expert in layer.experts], dim=1)  # [tokens, experts, width]
    out = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        p = probabilities[token].tolist()
        chosen = sorted(range(layer.num_experts), key=lambda e: -p[e])[:layer.experts_per_token]
        total = sum(p[e] for e in chosen) if layer.experts_per_token > 1 else 1.0
        for e in chosen:
            if (token, e) not in dropped:
                out[token] += p[e] / total * every[token, e]
    return out.reshape(x.shape)


# ----- routing -----


@pytest.mark.parametrize("k, gated", [(1, False), (2, False), (3, True)])
def test_every_token_gets_the_gate_weighted_sum_of_its_chosen_experts(k, gated):
    layer = make_layer(num_experts=4, k=k, gated=gated)
    x = torch.randn(3, 5, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-6, rtol=1e-5)
    routing = layer.last_routing
    assert routing.expert_counts.sum() == 15 * k and routing.dropped_counts.sum() == 0


def test_capacity_drops_first_choices_of_later_tokens_after_earlier_choices_then_second_choices():
    # 3 experts, k = 2, 4 tokens, capacity ceil(0.75 * 4 * 2 / 3) = 2 assignments per expert.
    layer = make_layer(num_experts=3, k=2, capacity_factor=0.75, width=3)
    routed_by_logits(layer)
    ln = math.log
    x = torch.tensor([[ln(3), ln(4), 0.0],    # token 0: expert 1, then 0
                      [0.0, ln(4), ln(3)],    # token 1: expert 1, then 2
                      [ln(4), 0.0, ln(3)],    # token 2: expert 0, then 2
                      [ln(4), ln(3), 0.0]])   # token 3: expert 0, then 1
    assert layer.capacity(4) == 2
    layer.train()
    with torch.no_grad():
        out = layer(x)
    # First choices are served first: expert 1 takes tokens 0, 1 and expert 0 takes tokens 2, 3. Then second choices:
    # token 0's expert 0 and token 3's expert 1 find them full (token order would have dropped token 3's both).
    dropped = {(0, 0), (3, 1)}
    with torch.no_grad():
        torch.testing.assert_close(out, dense_reference(layer, x, dropped), atol=1e-6, rtol=1e-5)
    assert layer.last_routing.expert_counts.tolist() == [3, 3, 2]
    assert layer.last_routing.dropped_counts.tolist() == [1, 1, 0]
    # Evaluation drops nothing.
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-6, rtol=1e-5)
    assert layer.last_routing.dropped_counts.tolist() == [0, 0, 0]


def test_capacity_follows_the_priority_order_on_random_routing():
    layer = make_layer(num_experts=4, k=2, capacity_factor=0.5).train()
    x = torch.randn(2, 6, WIDTH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer(x)
        # The rule written out: choice rank by choice rank, tokens in row-major order, an expert full at capacity.
        probabilities = (x.reshape(-1, WIDTH) @ layer.router.weight.t()).softmax(-1)
        chosen = probabilities.topk(2, dim=-1).indices.tolist()
        capacity, load, dropped = math.ceil(0.5 * 12 * 2 / 4), [0] * 4, set()
        for rank in range(2):
            for token in range(12):
                expert = chosen[token][rank]
                if load[expert] < capacity:
                    load[expert] += 1
                else:
                    dropped.add((token, expert))
        assert dropped, "the case must drop something"
        torch.testing.assert_close(out, dense_reference(layer, x, dropped), atol=1e-6, rtol=1e-5)
    assert int(layer.last_routing.dropped_counts.sum()) == len(dropped)


def test_padding_is_routed_nowhere_and_takes_no_capacity():
    layer = make_layer(num_experts=4, k=2, capacity_factor=1.0).train()
    x = torch.randn(2, 4, WIDTH, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([[True, True, True, True], [False, False, True, True]])
    with torch.no_grad():
        out = layer(x, keep)
        counts = layer.last_routing.expert_counts.clone()
        alone = layer(x.reshape(-1, WIDTH)[keep.reshape(-1)])
    assert counts.sum() == 6 * 2
    assert torch.equal(out[1, :2], torch.zeros(2, WIDTH))
    # The real tokens get what they get when the padding is not there at all (same capacity: 6 real tokens).
    torch.testing.assert_close(out[keep], alone)
    assert torch.equal(layer.last_routing.expert_counts, counts)


# ----- the load-balancing loss -----


def test_load_balancing_loss_matches_a_hand_worked_top1_case_and_ignores_padding():
    # 2 experts, k = 1. Router logits [ln 3, 0] give probabilities [3/4, 1/4].
    layer = make_layer(num_experts=2, k=1, width=2)
    routed_by_logits(layer)
    ln3 = math.log(3)
    x = torch.tensor([[[ln3, 0.0], [ln3, 0.0], [0.0, ln3], [ln3, 0.0], [0.0, 10.0]]])
    keep = torch.tensor([[True, True, True, True, False]])  # the last token is padding
    layer(x, keep)
    # Assignments: tokens 0, 1, 3 -> expert 0, token 2 -> expert 1: f = [3/4, 1/4].
    # Mean probabilities: P_0 = (3/4 + 3/4 + 1/4 + 3/4) / 4 = 5/8, P_1 = 3/8.
    expected = 2 * (3 / 4 * 5 / 8 + 1 / 4 * 3 / 8)  # = 9/8
    assert layer.last_routing.expert_counts.tolist() == [3, 1]
    assert layer.last_routing.aux_loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.125)


def test_load_balancing_loss_matches_a_hand_worked_top2_case():
    # 3 experts, k = 2; each token's probabilities are 1/2, 1/3, 1/6 in some order (logits ln 3, ln 2, 0).
    layer = make_layer(num_experts=3, k=2, width=3)
    routed_by_logits(layer)
    a, b = math.log(3), math.log(2)
    x = torch.tensor([[a, b, 0.0],   # p = [1/2, 1/3, 1/6] -> experts 0, 1
                      [0.0, a, b],   # p = [1/6, 1/2, 1/3] -> experts 1, 2
                      [b, 0.0, a],   # p = [1/3, 1/6, 1/2] -> experts 2, 0
                      [a, b, 0.0]])  # experts 0, 1
    layer(x)
    f = [3 / 8, 3 / 8, 2 / 8]  # of 4 * 2 assignments
    p = [(1 / 2 + 1 / 6 + 1 / 3 + 1 / 2) / 4, (1 / 3 + 1 / 2 + 1 / 6 + 1 / 3) / 4, (1 / 6 + 1 / 3 + 1 / 2 + 1 / 6) / 4]
    expected = 3 * sum(fe * pe for fe, pe in zip(f, p))
    assert expected == pytest.approx(195 / 192)
    assert layer.last_routing.expert_counts.tolist() == [3, 3, 2]
    assert layer.last_routing.aux_loss.item() == pytest.approx(expected, abs=1e-6)
    # Even routing scores exactly 1.
    even = load_balancing_loss(torch.full((6, 3), 1 / 3), torch.tensor([4, 4, 4]), 2)
    assert even.item() == pytest.approx(1.0)


# ----- sparse dispatch and gradients -----


def test_only_chosen_experts_run_and_each_on_its_own_tokens():
    layer = make_layer(num_experts=4, k=2, width=WIDTH)
    routed_by_logits(layer)
    x = torch.randn(10, WIDTH, generator=torch.Generator().manual_seed(4))
    x[:, 3] = -30.0  # nobody chooses expert 3
    calls = [[] for _ in range(4)]
    for index, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda module, args, out, index=index: calls[index].append(args[0].shape[0]))
    with torch.no_grad():
        layer(x)
    counts = layer.last_routing.expert_counts.tolist()
    assert counts[3] == 0 and calls[3] == []
    assert [sum(c) for c in calls] == counts and all(len(c) <= 1 for c in calls)
    assert sum(counts) == 10 * 2  # every token ran on exactly 2 experts, not 4


def test_gradients_reach_the_router_and_the_chosen_experts_only():
    layer = make_layer(num_experts=4, k=2, width=WIDTH)
    routed_by_logits(layer)
    x = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(5))
    x[:, 3] = -30.0
    layer(x).square().sum().backward()  # the task loss alone: the renormalized gates depend on the router
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.experts[3].parameters())
    for expert in layer.experts[:3]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())
    layer.zero_grad()
    layer(x)
    layer.last_routing.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


# ----- config -----


def moe_config(**overrides) -> ModelConfig:
    config = token_config(vocab_size=VOCAB, width=16, max_seq_len=24, num_heads=2,
                          feedforward={"ratio": 2.0, "num_experts": 4}, position="rope")
    return config.replace(**overrides) if overrides else config


@pytest.mark.parametrize("feedforward, top, field", [
    ({"num_experts": 3, "experts_per_token": 4}, {}, "feedforward.experts_per_token"),
    ({"num_experts": 4, "experts_per_token": 0}, {}, "feedforward.experts_per_token"),
    ({"num_experts": 1}, {}, "feedforward.num_experts"),
    ({"num_experts": -2}, {}, "feedforward.num_experts"),
    ({"num_experts": 4, "capacity_factor": -1.0}, {}, "feedforward.capacity_factor"),
    ({"num_experts": 4, "aux_loss_weight": -0.1}, {}, "feedforward.aux_loss_weight"),
    ({"num_experts": 4, "moe_layers": [2]}, {}, "feedforward.moe_layers"),
    ({"num_experts": 4, "moe_layers": [-1]}, {}, "feedforward.moe_layers"),
    ({"num_experts": 4, "moe_layers": [1]}, {"num_layers": 4, "num_unique_layers": 1}, "feedforward.moe_layers"),
    ({"capacity_factor": 1.0}, {}, "feedforward.capacity_factor"),
    ({"moe_layers": [0]}, {}, "feedforward.moe_layers"),
])
def test_bad_mixture_settings_name_the_field(feedforward, top, field):
    with pytest.raises(ConfigError, match=rf"^{field.replace('.', '[.]')}: expected "):
        ModelConfig.from_dict({"width": 16, "num_layers": 2, "attention": {"num_heads": 2}, **top,
                               "feedforward": feedforward})


def test_top_k_larger_than_the_number_of_experts_says_what_is_allowed():
    with pytest.raises(ConfigError) as error:
        ModelConfig(feedforward={"num_experts": 4, "experts_per_token": 5})
    assert str(error.value) == ("feedforward.experts_per_token: expected an integer in [1, 4] "
                                "(feedforward.num_experts), got 5")


def test_mixture_fields_round_trip_and_old_files_load(tmp_path):
    config = moe_config(**{"feedforward.capacity_factor": 1.25, "feedforward.moe_layers": [1],
                           "feedforward.experts_per_token": 1, "feedforward.aux_loss_weight": 0.05})
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    config.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_file(tmp_path / "c.yaml") == config
    old = config.to_dict()
    for name in ("num_experts", "experts_per_token", "capacity_factor", "aux_loss_weight", "moe_layers"):
        del old["feedforward"][name]
    assert not ModelConfig.from_dict(old).feedforward.mixture
    # Dotted overrides, on a preset too; 0 experts is dense.
    llama = formerkit.model_config("llama_tiny").replace(**{"feedforward.num_experts": 4, "experts_per_token": 1})
    assert (llama.feedforward.num_experts, llama.feedforward.experts_per_token) == (4, 1)
    assert not formerkit.build_model(moe_config(**{"feedforward.num_experts": 0})).decoder.blocks[0].mixture


def test_moe_layers_choose_blocks_and_name_shared_blocks_with_num_unique_layers():
    model = formerkit.build_model(moe_config(num_layers=3, **{"feedforward.moe_layers": [0, 2]}))
    assert [block.mixture for block in model.decoder.blocks] == [True, False, True]
    assert isinstance(model.decoder.blocks[1].feedforward, MLP)
    shared = formerkit.build_model(moe_config(num_layers=4, num_unique_layers=2, **{"feedforward.moe_layers": [1]}))
    assert [block.mixture for block in shared.decoder.blocks] == [False, True]
    ids = torch.randint(0, VOCAB, (2, 6))
    out = shared(ids, return_outputs=True)
    # Shared block 1 runs at depths 1 and 3: two routings, both in the aux loss.
    assert len(out.expert_counts) == 2


# ----- the model -----


def test_model_aux_loss_is_the_weighted_sum_over_layers_and_dense_models_have_none():
    model = formerkit.build_model(moe_config(**{"feedforward.aux_loss_weight": 0.5}))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    out = model(ids, return_outputs=True)
    layers = [block.feedforward.last_routing.aux_loss for block in model.decoder.blocks]
    torch.testing.assert_close(out.aux_loss, 0.5 * (layers[0] + layers[1]))
    assert [c.sum().item() for c in out.expert_counts] == [2 * 7 * 2] * 2
    torch.testing.assert_close(model(ids), out.logits)
    dense = formerkit.build_model(moe_config(**{"feedforward.num_experts": None}))
    assert dense(ids, return_outputs=True).aux_loss is None


def test_a_padded_row_gets_the_logits_it_gets_alone():
    model = formerkit.build_model(moe_config()).eval()
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        alone = model(ids[1:, 3:])
    torch.testing.assert_close(padded[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_cached_step_by_step_logits_equal_a_full_recompute(arch):
    extra = {"arch": arch, "num_decoder_layers": 3, "feedforward.moe_layers": [2]} if arch == "encoder_decoder" else {}
    config = moe_config(**{"feedforward.capacity_factor": 0.5, **extra})  # capacity applies while training only
    torch.manual_seed(0)
    model = formerkit.build_model(config).eval()
    generator = torch.Generator().manual_seed(8)
    ids = torch.randint(1, VOCAB, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    ids[0, :2] = 0
    source = {"inputs": torch.randint(1, VOCAB, (2, 5), generator=generator)} if arch == "encoder_decoder" else {}

    def call(chunk, chunk_mask, cache=None):
        if arch == "encoder_decoder":
            return model(source["inputs"], decoder_input_ids=chunk, decoder_attention_mask=chunk_mask, cache=cache)
        return model(chunk, attention_mask=chunk_mask, cache=cache)

    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    start = 0
    with torch.no_grad():
        for size in (4, 1, 1, 2, 1):
            stop = start + size
            cached = call(ids[:, start:stop], mask[:, start:stop], cache)[:, -1]
            full = call(ids[:, :stop], mask[:, :stop])[:, -1]
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
            start = stop
    assert cache.length == ids.shape[1]


def test_save_load_summary_and_cli_handle_mixtures(tmp_path, capsys):
    config = moe_config(**{"feedforward.capacity_factor": 1.0})
    model = formerkit.build_model(config).eval()
    formerkit.save(model, tmp_path / "m")
    loaded = formerkit.load(tmp_path / "m").eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    assert loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    # FLOPs: two of the four experts per token (even routing on the meta device) plus the router.
    moe = formerkit.summarize(config, seq_len=16)
    dense = formerkit.summarize(config.replace(**{"feedforward.num_experts": None,
                                                  "feedforward.capacity_factor": None}), seq_len=16)
    expert_flops = 2 * 2 * 16 * 32 * 16  # fc_in and fc_out, per token, for 16 tokens
    router_flops = 2 * 16 * 4 * 16
    assert moe.forward_flops - dense.forward_flops == 2 * (expert_flops + router_flops)
    assert any("experts" in note for note in moe.notes)
    assert main(["summary", "llama_tiny", "--seq", "16", "--set", "feedforward.num_experts=4",
                 "--set", "feedforward.capacity_factor=1.0"]) == 0
    assert "experts" in capsys.readouterr().out


def test_to_hf_refuses_a_mixture_and_ignores_mixture_fields_of_a_dense_model(tmp_path):
    pytest.importorskip("transformers")
    small = {"width": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "hidden_size": 48,
             "vocab_size": VOCAB, "max_seq_len": 16}
    moe = formerkit.create_model("llama_tiny", **small, **{"feedforward.num_experts": 2})
    with pytest.raises(formerkit.InteropError, match=r"to_hf: .*feedforward\.num_experts is 2"):
        formerkit.to_hf(moe, tmp_path / "moe")
    dense = formerkit.create_model("llama_tiny", **small, **{"feedforward.experts_per_token": 1})
    formerkit.to_hf(dense, tmp_path / "dense")
    assert (tmp_path / "dense" / "config.json").is_file()


def test_a_masked_autoencoder_refuses_a_mixture_encoder():
    from formerkit.models.mae import MaskedAutoencoder

    encoder = formerkit.create_model("vit_tiny_patch16_224", image_size=8, patch_size=2, width=16, num_layers=1,
                                     num_heads=2, num_classes=10, **{"feedforward.num_experts": 2})
    with pytest.raises(ConfigError, match=r"^feedforward\.num_experts: expected null or 0"):
        MaskedAutoencoder(encoder, decoder_width=16, decoder_layers=1, decoder_heads=2)


# ----- training -----


@pytest.mark.slow
def test_a_mixture_decoder_trains_with_the_aux_loss_in_its_loss(tmp_path, tiny):
    from formerkit.data import build_data
    from formerkit.data.base import step_generator
    from formerkit.train import load_recipe, train
    from formerkit.train.objectives import make_objective

    # conftest's tiny char-lm with 4 experts; lr 1e-12 leaves the model as initialized.
    base = tiny("char-lm", **{"schedule.warmup_steps": 0, "schedule.steps": 2, "eval.every": 2,
                              "model.num_experts": 4, "model.capacity_factor": 1.5, "optim.lr": 1e-12})

    def run(name, weight):
        result = train("char-lm", tmp_path / name, overrides={**base, "model.aux_loss_weight": weight})
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return result, records

    with_aux, records = run("aux", 0.5)
    _, plain = run("plain", 0.0)
    assert with_aux.summary["status"] == "completed"
    assert isinstance(with_aux.model.decoder.blocks[0].feedforward, MoEFeedForward)
    evaluation = next(r for r in records if r["kind"] == "eval")
    assert {"valid_moe_aux_loss", "valid_moe_load_max", "valid_moe_load_entropy"} <= set(evaluation)
    # Same initialization and batch: the first logged losses differ by the weighted aux loss of the first batch,
    # which the (untrained) model reproduces; the objective's loss is the logged one.
    config = load_recipe("char-lm").with_overrides({**base, "model.aux_loss_weight": 0.5})
    bundle = build_data(config.data)
    # The evaluation's expert load, by hand: the validation batches' expert counts summed per layer; per layer the
    # largest share times the number of experts and the entropy of the shares over log(experts); then their means.
    counts, aux_losses = 0, []
    with torch.no_grad():
        for batch in bundle.valid.eval_batches(config.eval.batch_size, config.eval.batches):
            out = with_aux.model.eval()(batch["tokens"][:, :-1], return_outputs=True)
            counts = counts + torch.stack(out.expert_counts).double()
            aux_losses.append(out.aux_loss.item())
    share = counts / counts.sum(dim=1, keepdim=True)
    entropy = -torch.where(share > 0, share * share.log(), 0.0).sum(dim=1) / math.log(4)
    assert evaluation["valid_moe_load_max"] == pytest.approx(float((share.max(dim=1).values * 4).mean()), rel=1e-6)
    assert evaluation["valid_moe_load_entropy"] == pytest.approx(float(entropy.mean()), rel=1e-6)
    assert evaluation["valid_moe_aux_loss"] == pytest.approx(sum(aux_losses) / len(aux_losses), rel=1e-5)
    batch = bundle.train.take(bundle.train.sample_indices(config.schedule.batch_size, config.run.seed, 0))
    model = with_aux.model.train()
    out = model(batch["tokens"][:, :-1], return_outputs=True)
    difference = records[0]["loss"] - plain[0]["loss"]
    assert difference > 0
    assert difference == pytest.approx(out.aux_loss.item(), rel=1e-4)
    objective = make_objective(config.objective, bundle)
    loss = objective.loss(model, batch, step_generator(0, 5, 0, 0, 0))
    assert loss.item() == pytest.approx(records[0]["loss"], rel=1e-5)
