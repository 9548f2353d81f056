"""Attention maps, rollout and next-token tables: against the model's own outputs and hand computations."""

from __future__ import annotations

import shutil

import pytest
import torch

import formerkit
from formerkit.errors import InputError
from formerkit.inspection import attention_rollout, inspect_image, inspect_run, inspect_text, plot_inspection

from .conftest import token_config

TWO_STEPS = {"schedule.steps": 2, "eval.every": 2}


def _copy_of(trained_run, recipe: str, tmp_path):
    """A run of conftest's tiny ``recipe`` trained for two steps (the one test_serve serves), in this test's own
    directory: inspecting and reporting write into it."""
    return shutil.copytree(trained_run(recipe, **TWO_STEPS), tmp_path / "run")


def _decoder():
    torch.manual_seed(0)
    return formerkit.build_model(token_config(vocab_size=20, num_heads=2))


def test_text_inspection_gives_causal_attention_and_the_softmax_top_tokens(tmp_path):
    model = _decoder()
    ids = [3, 1, 4, 1, 5, 9]
    inspection = inspect_text(model, ids, decode=lambda token: f"t{token}", top_k=3)
    assert len(inspection.attentions) == 2 and inspection.attentions[0].shape == (2, 6, 6)
    for weights in inspection.attentions:
        assert torch.allclose(weights.sum(-1), torch.ones(2, 6), atol=1e-6)
        assert torch.all(weights.triu(diagonal=1) == 0)  # causal: nothing from later tokens
    with torch.no_grad():
        probabilities = model(torch.tensor([ids]))[0].softmax(-1)
    for position, options in enumerate(inspection.top_next):
        values, indices = probabilities[position].topk(3)
        assert [token for token, _ in options] == [f"t{int(i)}" for i in indices]
        assert [p for _, p in options] == pytest.approx(values.tolist(), abs=1e-6)
    assert inspection.tokens == [f"t{token}" for token in ids]
    paths = plot_inspection(inspection, tmp_path)
    assert sorted(path.name for path in paths) == ["attention_layer0.png", "attention_layer1.png", "next_tokens.png"]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths)


def test_rollout_is_the_product_of_head_averaged_attention_with_the_residual():
    torch.manual_seed(1)
    layers = [torch.rand(3, 4, 4).softmax(-1) for _ in range(2)]
    expected = torch.eye(4)
    for weights in layers:
        step = 0.5 * weights.mean(0) + 0.5 * torch.eye(4)
        step = step / step.sum(-1, keepdim=True)
        expected = step @ expected
    assert torch.allclose(attention_rollout(layers), expected, atol=1e-6)
    assert torch.allclose(attention_rollout(layers).sum(-1), torch.ones(4), atol=1e-6)
    with pytest.raises(InputError, match="expected"):
        attention_rollout([torch.rand(3, 4, 4), torch.rand(3, 5, 5)])


def test_a_class_token_model_reads_attention_from_its_class_token():
    torch.manual_seed(2)
    model = formerkit.create_model("vit_tiny_patch16_224", image_size=(16, 16), patch_size=4, width=32,
                                   num_layers=2, num_heads=2, num_classes=3, in_channels=1).eval()
    image = torch.randn(1, 16, 16)
    inspection = inspect_image(model, image, classes=["a", "b", "c"])
    with torch.no_grad():
        attentions = model(image[None], output_attentions=True, return_outputs=True).attentions
        logits = model(image[None])[0]
    for layer, weights in enumerate(attentions):
        expected = weights[0, :, 0, 1:].reshape(2, 4, 4)  # each head's row of the class token, over the patches
        assert torch.allclose(inspection.summary_attention[layer], expected, atol=1e-6)
    rollout = attention_rollout([w[0] for w in attentions])[0, 1:].reshape(4, 4)
    assert torch.allclose(inspection.rollout, rollout, atol=1e-6)
    label, probability = inspection.prediction
    assert label == "abc"[int(logits.argmax())] and probability == pytest.approx(float(logits.softmax(-1).max()))


def test_a_sequence_pooling_model_reads_attention_through_its_pooling_weights():
    torch.manual_seed(3)
    model = formerkit.create_model("cct_2_3x2_32", image_size=(8, 8), width=32, num_heads=2, num_classes=4,
                                   in_channels=1, conv_layers=1, pool_kernel=0).eval()
    image = torch.randn(1, 8, 8)
    inspection = inspect_image(model, image)
    with torch.no_grad():
        output = model(image[None], output_attentions=True, return_outputs=True)
        # The pooling weights behind the summary must rebuild the pooled vector the head classifies.
        scores = model.head.pooling.score(output.last_hidden_state[0]).squeeze(-1).softmax(0)
        pooled = model.head.pooling(output.last_hidden_state, None)[0]
    assert torch.allclose(scores @ output.last_hidden_state[0], pooled, atol=1e-5)
    for layer, weights in enumerate(output.attentions):
        expected = torch.einsum("q,hqk->hk", scores, weights[0]).reshape(2, 8, 8)
        assert torch.allclose(inspection.summary_attention[layer], expected, atol=1e-5)
    assert inspection.rollout.sum() == pytest.approx(1.0, abs=1e-5)


def test_bad_inspection_inputs_are_refused():
    model = _decoder()
    with pytest.raises(InputError, match="empty"):
        inspect_text(model, [])
    with pytest.raises(InputError, match="max_seq_len"):
        inspect_text(model, [1] * 17)
    with pytest.raises(InputError, match="image classifier"):
        inspect_image(model, torch.zeros(1, 8, 8))


@pytest.mark.slow
def test_inspect_runs_on_a_trained_image_run_from_the_cli(tmp_path, capsys, trained_run):
    from formerkit.cli import main

    _copy_of(trained_run, "cct-digits", tmp_path)
    assert main(["inspect", str(tmp_path / "run"), "--image-index", "3", "--out", str(tmp_path / "maps")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("predicted ")
    assert {p.name for p in (tmp_path / "maps").iterdir()} == {"attention_layer0.png", "rollout.png"}
    with pytest.raises(InputError, match="image index"):
        inspect_run(tmp_path / "run", image_index=10_000)
    with pytest.raises(InputError, match="is an image model .*pass --image-index N"):  # not "missing tokenizer"
        inspect_run(tmp_path / "run", text="hello")


@pytest.mark.slow
def test_inspect_runs_on_a_trained_language_model_run(tmp_path, trained_run):
    _copy_of(trained_run, "char-lm", tmp_path)
    inspection, paths = inspect_run(tmp_path / "run", text="def f(x):", top_k=2)
    assert "".join(inspection.tokens) == "def f(x):"
    assert len(inspection.top_next) == len(inspection.tokens) and len(inspection.top_next[0]) == 2
    assert {p.name for p in paths} == {"attention_layer0.png", "next_tokens.png"}
    assert all(p.parent == tmp_path / "run" / "inspect" for p in paths)


# ----- formerkit report -----


def _sections(page: str) -> set[str]:
    import re

    return set(re.findall(r'<h2 id="([a-z]+)">', page))


@pytest.mark.slow
def test_the_report_of_a_classifier_run_is_one_offline_page_with_its_sections(tmp_path, capsys, trained_run):
    import re

    from formerkit.cli import main

    _copy_of(trained_run, "cct-digits", tmp_path)
    assert main(["report", str(tmp_path / "run")]) == 0
    path = tmp_path / "run" / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = path.read_text()
    assert _sections(page) == {"summary", "model", "curves", "confusion", "hardest", "attention", "recipe"}
    images = re.findall(r'<img[^>]* src="([^"]+)"', page)
    # curves (loss, metrics), the confusion matrix, 12 hardest examples, one attention layer and the rollout
    assert len(images) == 2 + 1 + 12 + 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from anywhere
    assert len(re.findall(r"<tr><th>#\d+</th><td>true \d, predicted \d, loss ", page)) == 12


@pytest.mark.slow
def test_the_report_of_a_language_model_run_has_samples_at_three_temperatures(tmp_path, trained_run):
    from formerkit.train.html_report import write_report

    _copy_of(trained_run, "char-lm", tmp_path)
    page = write_report(tmp_path / "run", tmp_path / "page.html", samples=20).read_text()
    assert _sections(page) == {"summary", "model", "curves", "samples", "attention", "recipe"}
    assert [h for h in ("greedy", "temperature 0.8", "temperature 1.2") if f"<h3>{h}</h3>" in page] == [
        "greedy", "temperature 0.8", "temperature 1.2"]
    # loss and metric curves, one attention layer, the next-token table
    assert page.count("data:image/png;base64,") == 2 + 1 + 1


def test_the_confusion_matrix_counts_each_true_and_predicted_pair():
    from formerkit.train.html_report import confusion_matrix

    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert torch.equal(confusion_matrix(labels, predictions, 3), expected)
