"""formerkit report's page, against exact references: the parts table equals formerkit.summary, colour examples are
shown with their source pixels, language-model samples show their prompt and say when they are empty."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil

import pytest
import torch

from formerkit import ModelConfig
from formerkit.summary import summarize
from formerkit.train.html_report import image_pixels, model_section, write_report

from .conftest import token_config


def _rows(section: str) -> list[list[str]]:
    """The cells of each row of the page's parts table (header excluded)."""
    table = re.search(r"<table class='parts'>(.*?)</table>", section).group(1)
    return [[html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]]


@pytest.mark.parametrize("config", [
    token_config("encoder_decoder", vocab_size=50, num_layers=2, num_decoder_layers=3),
    ModelConfig(arch="encoder", width=32, num_layers=2, max_seq_len=None, attention={"num_heads": 2},
                stem={"kind": "patches", "image_size": [8, 8], "in_channels": 3, "patch_size": 4},
                head={"kind": "classification", "num_classes": 5}),
], ids=["encoder-decoder", "vit"])
def test_the_model_parts_table_has_summarys_counts_and_the_configs_layers(config):
    summary = summarize(config)
    rows = _rows(model_section(config))
    *parts, total = rows
    assert [(row[0], int(row[3].replace(",", ""))) for row in parts] == summary.parts
    assert total[0] == "total" and int(total[3].replace(",", "")) == summary.total_parameters
    layers = {row[0]: row[2] for row in parts}
    encoder, decoder = config.num_layers, config.num_decoder_layers or config.num_layers
    expected = {"encoder attention": encoder, "encoder feed-forward": encoder, "decoder attention": decoder,
                "decoder cross-attention": decoder, "decoder feed-forward": decoder}
    assert {part: int(layers[part]) for part in expected if part in layers} == {
        part: count for part, count in expected.items() if part in layers}
    assert layers.get("head", "") == "" and layers["embedding"] == ""
    assert all(row[1] for row in parts)  # every part says what it is


def _colour_folder(root, per_class: int = 5, side: int = 12) -> dict[str, list[torch.Tensor]]:
    """Class folders of random RGB PNGs; returns each class's images as uint8 [H, W, 3]."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = {}
    for name in ("cyan", "magenta", "yellow"):
        (root / name).mkdir(parents=True)
        images[name] = [torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
                        for _ in range(per_class)]
        for index, pixels in enumerate(images[name]):
            Image.fromarray(pixels.numpy(), "RGB").save(root / name / f"{index}.png")
    return images


def test_a_colour_example_is_shown_with_its_source_pixels(tmp_path):
    from formerkit.data import build_data
    from formerkit.train.config import DataConfig

    sources = _colour_folder(tmp_path / "images")
    bundle = build_data(DataConfig(source="image_folder", path=str(tmp_path / "images"), image_size=12))
    pre, split = bundle.preprocessing, bundle.split("test")
    assert pre["in_channels"] == 3 and len(split.tensors["labels"]) == 3
    for image, label in zip(split.tensors["inputs"], split.tensors["labels"]):
        shown = image_pixels(image, pre["mean"], pre["std"])
        assert shown.shape == (12, 12, 3) and shown.dtype == torch.uint8
        # exactly one of its class's files, channel for channel (red stays red: no swap, no gray average)
        assert sum(torch.equal(shown, source) for source in sources[pre["classes"][int(label)]]) == 1


def test_a_gray_example_is_shown_as_one_channel():
    mean, std = [0.25], [0.5]
    pixels = torch.arange(16, dtype=torch.float32).view(1, 4, 4) * 16 / 255
    shown = image_pixels((pixels - 0.25) / 0.5, mean, std)
    assert torch.equal(shown, (torch.arange(16) * 16).view(4, 4).to(torch.uint8))


def _embedded(page: str, css_class: str) -> list[torch.Tensor]:
    """The pixels of the page's embedded PNGs of one class, [H, W, 3]."""
    import numpy
    from PIL import Image

    sources = re.findall(rf'<img class="{css_class}" src="data:image/png;base64,([^"]+)"', page)
    return [torch.from_numpy(numpy.array(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
            for data in sources]


@pytest.mark.slow
def test_the_report_of_a_colour_image_run_shows_its_hardest_examples_in_their_colours(tmp_path, tiny):
    from formerkit.train import train

    sources = _colour_folder(tmp_path / "images")
    run = tmp_path / "run"
    train("cct-digits", run, overrides=tiny("cct-digits", **{
        "data.source": "image_folder", "data.path": str(tmp_path / "images"), "data.image_size": 12,
        "schedule.steps": 2}))
    page = write_report(run).read_text()
    shown = _embedded(page, "pixels")
    assert len(shown) == 3  # the test split: one of each class's 5 images
    every = [source for images in sources.values() for source in images]
    for image in shown:
        factor = image.shape[0] // 12  # enlarged with square pixels
        assert any(torch.equal(image[::factor, ::factor], source) for source in every)


@pytest.mark.slow
def test_language_model_samples_show_their_prompt_and_say_when_empty(tmp_path, trained_run, monkeypatch):
    import formerkit.train.html_report as report

    run = tmp_path / "run"
    shutil.copytree(trained_run("char-lm"), run)
    page = write_report(run, tmp_path / "page.html", samples=10).read_text()
    prompts = re.findall(r"<pre><span class='prompt'>(.*?)</span>", page)
    assert len(prompts) == 3 and len(set(prompts)) == 1 and len(html.unescape(prompts[0])) >= 20

    texts = iter(["", "  \n", "abc"])
    monkeypatch.setattr(report, "generate_text", lambda *args, **kwargs: next(texts))
    page = write_report(run, tmp_path / "page.html", samples=10).read_text()
    continuations = re.findall(r"<pre><span class='prompt'>.*?</span>(.*?)</pre>", page)
    assert continuations == ["<span class='empty'>(empty: the model ended the text at once)</span>",
                             "<span class='empty'>(empty: 3 whitespace characters)</span>", "abc"]
