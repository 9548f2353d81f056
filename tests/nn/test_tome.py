"""Token merging (ToMe) against its definition: bipartite matching on a hand-built case, size-weighted merges,
proportional attention checked against the unmerged tokens it stands for, exactness at r = 0 and the per-layer token
counts, on tiny models."""

from __future__ import annotations

import pytest
import torch

from formerkit import InputError, build_model
from formerkit.nn.context import LayerContext
from formerkit.nn.masks import PreparedMask
from formerkit.nn.tome import TokenMerging, attention_keys, bipartite_soft_matching, merge_weighted

from ..conftest import image_config, token_config

WIDTH, HEADS = 16, 2


def vit(pooling: str = "cls", *, layers: int = 3, registers: int = 0, class_token: bool = True, seed: int = 0,
        **overrides) -> torch.nn.Module:
    """A tiny ViT on 8x8 single-channel images with 2x2 patches: 16 patch tokens (plus the prefix tokens)."""
    config = image_config(width=WIDTH, num_layers=layers, num_heads=HEADS, max_seq_len=None,
                          position={"kind": "learned"}, norm={"eps": 1e-6},
                          stem={"class_token": class_token, "register_tokens": registers},
                          head={"kind": "classification", "num_classes": 5, "pooling": pooling}).replace(**overrides)
    torch.manual_seed(seed)
    return build_model(config).eval()


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pooling", ["cls", "mean", "sequence"])
def test_merging_zero_tokens_is_exactly_the_plain_model(pooling):
    model = vit(pooling, registers=1)
    x = images()
    with torch.no_grad():
        plain = model(x, return_outputs=True)
        merged = model(x, merge_tokens=0, return_outputs=True)
    assert torch.equal(plain.logits, merged.logits)
    assert torch.equal(plain.last_hidden_state, merged.last_hidden_state)
    assert merged.token_sizes is None


def test_bipartite_matching_merges_the_most_similar_pairs_by_size():
    # Sets: A = tokens 0, 2, 4 and B = tokens 1, 3, 5. Token 0 is nearly token 3 (cosine 0.9988), token 2 nearly
    # token 1 (0.995); token 4's best match (token 3, 0.74) is the weakest, so r = 2 merges 0 -> 3 and 2 -> 1.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.05], [1.0, 1.0], [-1.0, 0.0]]])
    matching = bipartite_soft_matching(metric, 2)
    assert matching.merged.tolist() == [[0, 1]]  # A's tokens 0 and 2 (A indices 0 and 1)
    assert matching.destination.tolist() == [[1, 0]]  # into B's tokens 3 and 1 (B indices 1 and 0)
    assert matching.kept.tolist() == [[2]]  # token 4 stays
    x = torch.arange(6.0).view(1, 6, 1).repeat(1, 1, 2) * torch.tensor([1.0, -1.0])
    sizes = torch.tensor([[2.0, 1.0, 1.0, 3.0, 1.0, 1.0]])
    merged, new_sizes = merge_weighted(x, sizes, matching)
    expected = torch.stack([x[0, 4], (x[0, 1] + x[0, 2]) / 2, (3 * x[0, 3] + 2 * x[0, 0]) / 5, x[0, 5]])
    assert torch.allclose(merged[0], expected)
    assert new_sizes.tolist() == [[1.0, 2.0, 5.0, 1.0]]
    # r = 1 merges only the best pair; two A tokens may share a destination.
    assert bipartite_soft_matching(metric, 1).merged.tolist() == [[0]]
    shared = bipartite_soft_matching(torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [-1.0, 0.0]]]), 2)
    assert shared.destination.tolist() == [[0, 0]]
    merged, new_sizes = merge_weighted(torch.tensor([[[1.0], [2.0], [4.0], [8.0]]]), torch.ones(1, 4), shared)
    assert torch.allclose(merged, torch.tensor([[[7.0 / 3.0], [8.0]]])) and new_sizes.tolist() == [[3.0, 1.0]]


def test_proportional_attention_counts_a_merged_token_as_the_identical_tokens_it_holds():
    attention = vit().encoder.blocks[0].attention
    a, b, c = torch.randn(3, 1, 1, WIDTH, generator=torch.Generator().manual_seed(3)).unbind(0)
    unmerged = torch.cat([a, b, b, c], dim=1)
    merged = torch.cat([a, b, c], dim=1)
    merging = TokenMerging(vit().config, 0)
    merging.sizes = torch.tensor([[1.0, 2.0, 1.0]])
    with torch.no_grad():
        expected, _ = attention(unmerged, LayerContext(PreparedMask()))
        got, _ = attention(merged, LayerContext(merging.attention_mask(PreparedMask())))
        plain, _ = attention(merged, LayerContext(PreparedMask()))
    assert torch.allclose(got, expected[:, [0, 1, 3]], atol=1e-6)
    assert not torch.allclose(plain, expected[:, [0, 1, 3]], atol=1e-4)  # without log(size) it would differ


@pytest.mark.parametrize("pooling", ["cls", "mean", "sequence"])
def test_merging_identical_tokens_changes_nothing(pooling):
    """Through a whole model: a constant image without position embeddings makes every patch token the same, so
    each merge joins identical tokens. Proportional attention and size-weighted pooling must then give exactly the
    unmerged model's output, whatever was merged."""
    model = vit(pooling, layers=4, registers=1)
    with torch.no_grad():
        model.positions.weight.zero_()
    x = torch.full((2, 1, 8, 8), 0.7)
    x[1] = -1.3
    with torch.no_grad():
        plain = model(x)
        for r in (1, 2, 3, [5, 0, 2, 1]):
            out = model(x, merge_tokens=r, return_outputs=True)
            assert out.last_hidden_state.shape[1] < 18
            assert torch.allclose(out.logits, plain, atol=1e-5), r


def test_token_counts_fall_by_r_at_every_layer_and_prefix_tokens_stay():
    model = vit("mean", layers=4, registers=2)
    x = images(2)
    with torch.no_grad():
        out = model(x, merge_tokens=2, output_hidden_states=True, output_attentions=True)
        plain = model(x, output_hidden_states=True)
    prefix = 3  # class token and two registers
    assert [state.shape[1] for state in out.hidden_states] == [prefix + 16 - 2 * i for i in range(5)]
    assert [weights.shape[-1] for weights in out.attentions] == [prefix + 16 - 2 * i for i in range(4)]
    assert out.token_sizes.shape == (2, prefix + 8)
    assert out.token_sizes.sum(dim=1).tolist() == [prefix + 16.0] * 2
    assert out.token_sizes[:, :prefix].eq(1).all()
    # The first layer attends over unmerged tokens and merges after attention, so the prefix tokens it outputs are
    # the plain model's: merging neither moved nor touched them.
    assert torch.allclose(out.hidden_states[1][:, :prefix], plain.hidden_states[1][:, :prefix], atol=1e-6)
    assert not torch.allclose(out.hidden_states[2][:, :prefix], plain.hidden_states[2][:, :prefix], atol=1e-4)
    with torch.no_grad():
        scheduled = model(x, merge_tokens=[4, 0, 3, 1], output_hidden_states=True)
    assert [state.shape[1] for state in scheduled.hidden_states] == [19, 15, 15, 12, 11]


def test_a_model_without_class_token_merges_every_patch_token():
    model = vit("mean", class_token=False)
    with torch.no_grad():
        out = model(images(), merge_tokens=4, return_outputs=True)
    assert out.last_hidden_state.shape[1] == 16 - 3 * 4 and out.token_sizes.sum(dim=1).eq(16).all()


def test_the_similarity_metric_is_the_keys_averaged_over_heads(randomize):
    model = randomize(vit(attention={"num_heads": 4, "num_kv_heads": 2, "qk_norm": True}, seed=5), 9)
    attention = model.encoder.blocks[1].attention  # non-trivial norm weights and biases
    with torch.no_grad():
        x = torch.randn(2, 17, WIDTH)
        _, keys, _ = attention.project(x)
        assert torch.allclose(attention_keys(attention, x), keys.mean(dim=1), atol=1e-6)


def test_gradients_through_merging_are_the_derivative_of_the_merged_model():
    """In training mode, backward through merging gives the derivative of what the merged forward pass computes:
    the matching is a piecewise-constant choice, so along a small step the merged model is smooth, and each
    gradient's component along a random direction equals a central finite difference (float64)."""
    model = vit("mean").double().train()
    x = images().double()
    generator = torch.Generator().manual_seed(4)
    weights = torch.randn(3, 5, dtype=torch.float64, generator=generator)  # a loss in which every logit counts

    def loss() -> torch.Tensor:
        return (model(x, merge_tokens=3) * weights).sum()

    loss().backward()
    parameters = dict(model.named_parameters())
    original = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    step = 1e-6
    for names in (["stem.projection.weight"], list(parameters)):
        direction = {name: torch.randn(parameters[name].shape, dtype=torch.float64, generator=generator)
                     for name in names}
        analytic = sum(float((parameters[name].grad * d).sum()) for name, d in direction.items())
        values = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                for name, d in direction.items():
                    parameters[name].copy_(original[name] + sign * step * d)
                values.append(float(loss()))
            for name in names:
                parameters[name].copy_(original[name])
        assert (values[0] - values[1]) / (2 * step) == pytest.approx(analytic, rel=1e-6, abs=0), names


def test_merging_identical_tokens_leaves_the_gradients_of_the_unmerged_model():
    """As in test_merging_identical_tokens_changes_nothing: without position embeddings a constant image makes every
    patch token the same whatever the other weights are, so the merged model is the unmerged one as a function of
    them, and its gradients (through the size-weighted merges, proportional attention and pooling) must be the
    unmerged model's. (Not the position rows': they are what would make the tokens differ.) The tolerance is that of
    the token sizes, which merging keeps in float32 whatever the model's dtype."""
    model = vit("mean", layers=4, registers=1).double().train()
    with torch.no_grad():
        model.positions.weight.zero_()
    x = torch.full((2, 1, 8, 8), 0.7, dtype=torch.float64)
    x[1] = -1.3
    weights = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    gradients = []
    for merge_tokens in (None, [5, 0, 2, 1]):
        model.zero_grad()
        (model(x, merge_tokens=merge_tokens) * weights).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if name != "positions.weight"})
    plain, merged = gradients
    for name in plain:
        torch.testing.assert_close(merged[name], plain[name], rtol=1e-7, atol=1e-8, msg=name)


def test_bad_merge_requests_are_refused_with_what_was_expected():
    model = vit("mean", layers=6)
    x = images()
    for bad, message in [(-1, "an int >= 0, got -1"), (1.5, "got 1.5 \\(float\\)"), (True, "got True"),
                         ("2", "got '2'"), ([1, 1], "one int >= 0 per layer \\(6 layers\\)")]:
        with pytest.raises(InputError, match=message):
            model(x, merge_tokens=bad)
    # 16 patch tokens, 3 merged per layer: layer 4 receives 7 and can merge at most 3; layer 5 receives 4.
    with pytest.raises(InputError, match="layer 5 of 6 cannot merge 3 tokens: only 4 mergeable tokens remain there "
                                         "\\(16 at the input, 12 merged by earlier layers"):
        model(x, merge_tokens=3)
    with pytest.raises(InputError, match="layer 1 of 6 cannot merge 9 tokens"):
        model(x, merge_tokens=[9, 0, 0, 0, 0, 0])


def test_merging_is_refused_for_models_and_inputs_it_does_not_serve():
    lm = build_model(token_config(vocab_size=11, width=WIDTH, num_layers=1, num_heads=HEADS))
    with pytest.raises(InputError, match="for encoders that classify.*arch='decoder', head='lm'"):
        lm(torch.randint(0, 11, (1, 6)), merge_tokens=1)
    text = build_model(token_config("encoder", vocab_size=11, width=WIDTH, num_heads=HEADS,
                                    head={"kind": "classification", "num_classes": 3}))
    ids = torch.randint(0, 11, (2, 8))
    assert text(ids, merge_tokens=1).shape == (2, 3)
    with pytest.raises(InputError, match="takes no attention_mask or mask"):
        text(ids, merge_tokens=1, attention_mask=torch.tensor([[1] * 8, [1] * 5 + [0] * 3]))
    with pytest.raises(InputError, match="cannot be combined with position.kind 'rope'"):
        vit("mean", position={"kind": "rope"})(images(), merge_tokens=1)
    with pytest.raises(InputError, match="attention.gaussian_mixture"):
        vit("mean", attention={"gaussian_mixture": 2})(images(), merge_tokens=1)
