"""``formerkit report RUN_DIR``: one self-contained HTML file about a run, readable offline in any browser.

Sections: the summary (status, steps, final metrics, throughput), the model (its parts and parameter counts), the loss
and metric curves, and then by task — for classifiers the test confusion matrix and the hardest test examples (the
highest loss), for language models samples at a few temperatures, for image generators the sample grids written
at each evaluation — and attention maps of one example. Every image is
embedded (base64 PNG) and the styling is inline: the file references nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from formerkit.checkpoint import load_extra
from formerkit.data import build_data
from formerkit.data.images import denormalize_images
from formerkit.errors import CheckpointError, FormerkitError
from formerkit.inspection import inspect_example, inspect_text, plot_inspection
from formerkit.runs import (
    generate_text,
    generation_defaults,
    load_run_model,
    load_run_tokenizer,
    prompt_ids,
    run_objective,
)
from formerkit.summary import summarize
from formerkit.train.report import plot_run

__all__ = ["confusion_matrix", "image_pixels", "model_section", "sample_grids", "write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; } .grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid figure { margin: 0; text-align: center; font-size: 0.9em; } img.pixels { image-rendering: pixelated; }
.prompt { background: #dbeafe; color: #1e3a8a; font-weight: bold; } .empty { color: #a00; font-style: italic; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; } tr.total td { font-weight: bold; }
"""


def _png(path_or_figure) -> str:
    """An <img> of a PNG file or of a matplotlib figure, embedded."""
    if isinstance(path_or_figure, (str, Path)):
        data = Path(path_or_figure).read_bytes()
    else:
        import io

        buffer = io.BytesIO()
        path_or_figure.savefig(buffer, format="png", dpi=100)
        data = buffer.getvalue()
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = []
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.2%}" if "accuracy" in key else f"{value:,.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        cells.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<h2 id="{anchor}">{html.escape(title)}</h2>\n{body}\n'


def _part_setting(config, part: str) -> str:
    """What a part of ``summarize``'s table is made of, in a few words (from the model's config)."""
    stem, attention, feedforward, head = config.stem, config.attention, config.feedforward, config.head
    if part == "embedding":
        if stem.kind == "tokens":
            return f"token table, {stem.vocab_size:,} tokens x width {config.width}"
        if stem.kind in ("patches", "conv"):
            image = f"{stem.in_channels}x{stem.image_size[0]}x{stem.image_size[1]} image"
            if stem.kind == "patches":
                return f"{image} in {stem.patch_size}x{stem.patch_size} patches -> width {config.width}"
            return (f"{image}, {stem.conv_layers} conv layer(s) (kernel {stem.conv_kernel}, {stem.conv_channels} "
                    f"channels) -> width {config.width}")
        return f"linear from {stem.input_dim} features -> width {config.width}"
    if part == "positions":
        return f"{config.position.kind} positions" + (f", up to {config.max_seq_len}" if config.max_seq_len else "")
    if part.endswith(" cross-attention"):
        return f"{attention.num_heads} heads over the encoder's output"
    if part.endswith(" attention"):
        window = f", window {attention.sliding_window}" if attention.sliding_window else ""
        kv = f", {attention.num_kv_heads} key/value heads" if attention.num_kv_heads else ""
        return f"{attention.kind}, {attention.num_heads} heads{kv}{window}"
    if part.endswith(" feed-forward"):
        hidden = feedforward.hidden_size or int(feedforward.ratio * config.width)
        experts = (f", {feedforward.num_experts} experts ({feedforward.experts_per_token} per token)"
                   if feedforward.mixture else "")
        return f"{feedforward.activation}, {config.width} -> {hidden} -> {config.width}{experts}"
    if part.endswith(" final norm"):
        return config.norm.kind
    if part.endswith(" norms and scales"):
        scale = f", layer scale {config.layer_scale}" if config.layer_scale else ""
        return f"{config.norm.kind}, {config.norm.placement}-norm{scale}"
    if part == "head":
        detail = {"classification": f"{head.num_classes} classes", "lm": "next token"}.get(head.kind, "")
        pooling = f", {head.pooling} pooling" if head.pooling else ""
        return f"{head.kind}" + (f" ({detail}{pooling})" if detail else pooling)
    return ""


def model_section(config) -> str:
    """The model as a table of its parts (``formerkit.summary``'s parameter counts, the blocks that hold them and
    what each part is), its cost, and the full config folded away."""
    summary = summarize(config)
    rows = []
    for part, count in summary.parts:
        share = count / summary.total_parameters if summary.total_parameters else 0.0
        rows.append(f"<tr><td>{html.escape(part)}</td><td>{html.escape(_part_setting(config, part))}</td>"
                    f"<td class='n'>{summary.blocks.get(part, '')}</td><td class='n'>{count:,}</td>"
                    f"<td class='n'>{share:.1%}</td></tr>")
    rows.append(f"<tr class='total'><td>total</td><td>{html.escape(config.arch)}, width {config.width}</td><td></td>"
                f"<td class='n'>{summary.total_parameters:,}</td><td class='n'>100.0%</td></tr>")
    table = ("<table class='parts'><tr><th>part</th><th>setting</th><th class='n'>layers</th>"
             "<th class='n'>parameters</th><th class='n'>share</th></tr>" + "".join(rows) + "</table>")
    cost = "".join(f"<li>{html.escape(line)}</li>" for line in summary.format().splitlines()[-4 - len(summary.notes):]
                   if line)
    full = html.escape(json.dumps(config.to_dict(), indent=1))
    return f"{table}<ul>{cost}</ul><details><summary>full model config</summary><pre>{full}</pre></details>"


def write_report(run_dir: str | Path, out: str | Path | None = None, *, samples: int = 200) -> Path:
    """Writes the report (default ``RUN_DIR/report.html``) and returns its path. ``samples``: the length in tokens
    of each language-model sample."""
    import matplotlib

    matplotlib.use("Agg")

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        if (run_dir / "config.json").exists() and "imported" in load_extra(run_dir):
            return _imported_report(run_dir, out, samples)
        raise CheckpointError(f"{run_dir}: no summary.json; report needs a run directory written by formerkit train "
                              "(or a checkpoint converted with formerkit convert --from-hf)")
    summary = json.loads(summary_path.read_text())
    model, recipe, extra = load_run_model(run_dir)
    parts = [_section("summary", "Summary", _table([(k.replace("_", " "), v) for k, v in summary.items()
                                                    if not isinstance(v, (dict, list))]))]
    parts.append(_section("model", "Model", model_section(model.config)))
    curves = plot_run(run_dir)
    parts.append(_section("curves", "Loss and metrics", "".join(_png(path) for path in curves) or
                          "<p>No training records.</p>"))
    kind = recipe.objective.kind
    if kind == "classification":
        bundle = build_data(recipe.data)
        section, split = _classification(model, bundle)
        parts.append(section)
        attention = _attention_maps(lambda: inspect_example(model, bundle, split, 0))
    elif kind == "causal_lm":
        tokenizer = load_run_tokenizer(run_dir)
        section, greedy = _samples(model, tokenizer, samples, _prompt(build_data(recipe.data), tokenizer))
        parts.append(section)
        # The attention over the prompt and the model's greedy continuation: a line or so, within its context.
        window = tokenizer.encode(greedy or "\n")[:min(48, model.config.max_seq_len or 48)]
        attention = _attention_maps(lambda: inspect_text(model, window,
                                                         decode=tokenizer.token_label))
    else:
        attention = "<p>Attention maps are drawn for classifiers and language models.</p>"
    grids = sample_grids(run_dir)
    if grids:
        parts.append(_section("samples", "Samples over training", grids))
    parts.append(_section("attention", "Attention maps", attention))
    parts.append(_section("recipe", "Recipe", f"<pre>{html.escape(json.dumps(extra['recipe'], indent=1))}</pre>"))
    return _write_page(parts, f"{summary.get('name', run_dir.name)} — {run_dir.name}", out, run_dir)


def sample_grids(run_dir: Path) -> str:
    """The sample grids a generative objective wrote at each evaluation (RUN/samples/step_NNNNNN.png: the same
    noise and classes every time, one row per class), side by side with their steps; "" when there are none."""
    paths = sorted((run_dir / "samples").glob("step_*.png")) if (run_dir / "samples").is_dir() else []
    figures = [f'<figure>{_png(path).replace("<img ", "<img class=pixels ")}'
               f'<figcaption>step {int(path.stem.split("_")[1]):,}</figcaption></figure>' for path in paths]
    return f'<div class="grid">{"".join(figures)}</div>' if figures else ""


def _write_page(parts: list[str], title: str, out, directory: Path) -> Path:
    title = html.escape(title)
    document = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{title}</h1>\n" + "".join(parts) + "</body></html>\n")
    path = Path(out) if out is not None else directory / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document)
    return path


def _imported_report(directory: Path, out, samples: int) -> Path:
    """The page of a converted checkpoint: where it came from, the model, and for a language model samples from an
    empty prompt (its tokenizer's BOS, if it adds one) and the attention over the greedy text. No training, no data:
    no curves and no held-out metrics."""
    model, _, extra = load_run_model(directory, imported=True)
    record = extra["imported"]
    parts = [_section("summary", "Summary", _table([(key.replace("_", " "), value) for key, value in record.items()])),
             _section("model", "Model", model_section(model.config))]
    if run_objective(None, extra) == "causal_lm" and (directory / "tokenizer.json").exists():
        tokenizer = load_run_tokenizer(directory)
        section, greedy = _samples(model, tokenizer, samples, "", generation_defaults(extra, tokenizer)["stop_tokens"],
                                   source="empty: the text starts from nothing, or the tokenizer's BOS")
        parts.append(section)
        window = tokenizer.encode(greedy or "\n")[:min(48, model.config.max_seq_len or 48)]
        parts.append(_section("attention", "Attention maps", _attention_maps(
            lambda: inspect_text(model, window, decode=tokenizer.token_label))))
    return _write_page(parts, f"{record['model_type']} — {directory.name}", out, directory)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """[true class, predicted class] counts."""
    matrix = torch.zeros(classes, classes, dtype=torch.long)
    matrix.index_put_((labels.long(), predictions.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return matrix


def _classification(model, bundle) -> tuple[str, str | None]:
    """The held-out confusion matrix and hardest examples, and the name of the split they come from."""
    import matplotlib.pyplot as plt

    name = "test" if bundle.test is not None else "valid" if bundle.valid is not None else None
    split = bundle.split(name) if name is not None else None
    if split is None or not hasattr(split, "tensors"):
        return _section("confusion", "Confusion matrix", "<p>This run's data has no held-out split.</p>"), None
    inputs, labels = split.tensors["inputs"], split.tensors["labels"]
    losses, predictions = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(labels), 256):
            logits = model(inputs[start:start + 256]).float()
            losses.append(torch.nn.functional.cross_entropy(logits, labels[start:start + 256], reduction="none"))
            predictions.append(logits.argmax(-1))
    losses, predictions = torch.cat(losses), torch.cat(predictions)
    classes = bundle.preprocessing.get("classes") or [str(i) for i in range(int(labels.max()) + 1)]
    count = len(classes)
    matrix = confusion_matrix(labels, predictions, count)
    side = min(12.0, max(4.5, 0.55 * count + 2.5))  # inches: a readable cell for up to ~20 classes
    font = max(7, min(12, int(72 * 0.55 * (side - 2.5) / max(count, 1) * 0.6)))  # a number fits its cell
    figure, axis = plt.subplots(figsize=(side, side * 0.9))
    axis.imshow(matrix.numpy(), cmap="Blues")
    dark = matrix.max().item() / 2
    for (row, column), value in zip(torch.cartesian_prod(torch.arange(count), torch.arange(count)).tolist(),
                                    matrix.flatten().tolist()):
        if value:
            axis.text(column, row, str(value), ha="center", va="center", fontsize=font,
                      color="white" if value > dark else "black")
    ticks = list(range(0, count, max(1, -(-count // 30))))  # at most 30 labels per axis
    axis.set_xticks(ticks, [classes[i] for i in ticks], fontsize=max(font, 9), rotation=90 if count > 10 else 0)
    axis.set_yticks(ticks, [classes[i] for i in ticks], fontsize=max(font, 9))
    axis.set_xlabel("predicted", fontsize=11)
    axis.set_ylabel("true", fontsize=11)
    accuracy = float((predictions == labels).float().mean())
    axis.set_title(f"{len(labels)} held-out examples, accuracy {accuracy:.2%}", fontsize=12)
    figure.tight_layout()
    confusion = _png(figure)
    plt.close(figure)
    hardest = losses.argsort(descending=True)[:12].tolist()
    rows = [(f"#{index}", f"true {classes[int(labels[index])]}, predicted {classes[int(predictions[index])]}, "
                          f"loss {float(losses[index]):.3f}") for index in hardest]
    pictures = ""
    if inputs.dim() == 4:
        pre = bundle.preprocessing
        tiles = [f"<figure>{_pixels_png(image_pixels(inputs[index], pre['mean'], pre['std']))}<figcaption>"
                 f"#{index}: {html.escape(classes[int(labels[index])])} &rarr; "
                 f"{html.escape(classes[int(predictions[index])])}</figcaption></figure>" for index in hardest]
        pictures = '<div class="grid">' + "".join(tiles) + "</div>"
    return (_section("confusion", "Confusion matrix", confusion)
            + _section("hardest", "Hardest held-out examples", pictures + _table(rows))), name


def _prompt(bundle, tokenizer) -> str:
    """The start of the first held-out line of 20 or more characters (its first 40), else a newline."""
    name = "test" if bundle.test is not None else "valid" if bundle.valid is not None else None
    split = bundle.split(name) if name is not None else None
    tokens = getattr(split, "tokens", None)
    if tokens is None:
        return "\n"
    lines = tokenizer.decode(tokens[:4000].tolist()).splitlines()
    return next((line.strip()[:40] for line in lines[1:] if len(line.strip()) >= 20), "\n")


def _samples(model, tokenizer, length: int, prompt: str, stop_tokens: list[int] | None = None,
             source: str = "the start of a held-out line") -> tuple[str, str]:
    """Continuations of ``prompt`` at a few temperatures (seeded), each ending at ``stop_tokens``; returns the
    section and the greedy text."""
    blocks, greedy = [], ""
    ids = prompt_ids(tokenizer, prompt)
    shown = html.escape(prompt if prompt.strip() else repr(prompt))
    for temperature in (0.0, 0.8, 1.2):
        text = "".join(generate_text(model, tokenizer, ids, max_new_tokens=length, temperature=temperature, seed=0,
                                     stop_tokens=stop_tokens))
        greedy = greedy or text
        label = "greedy" if temperature == 0 else f"temperature {temperature}"
        continuation = (html.escape(text) if text.strip() else
                        f"<span class='empty'>(empty: {len(text)} whitespace characters)</span>" if text else
                        "<span class='empty'>(empty: the model ended the text at once)</span>")
        blocks.append(f"<h3>{label}</h3><pre><span class='prompt'>{shown}</span>{continuation}</pre>")
    legend = (f"<p><span class='prompt'>highlighted</span>: the prompt ({source}); then the "
              f"model's continuation, {length} tokens.</p>")
    return _section("samples", "Samples", legend + "".join(blocks)), prompt + greedy


def image_pixels(image: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """A normalized model input [C, H, W] as the uint8 pixels it was made from: [H, W] for one channel, [H, W, 3]
    for colour (channels last, as image files and matplotlib hold them)."""
    pixels = (denormalize_images(image.float(), mean, std) * 255).round().to(torch.uint8)
    return pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0)


def _pixels_png(pixels: torch.Tensor, side: int = 144) -> str:
    """An <img> of uint8 pixels [H, W] or [H, W, 3], enlarged with square pixels to about ``side`` pixels."""
    import io

    from PIL import Image

    image = Image.fromarray(pixels.contiguous().numpy())
    factor = max(1, side // max(image.size))
    image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img class="pixels" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _attention_maps(inspect) -> str:
    """The PNGs of ``inspect()``'s inspection, embedded; a note where the model's input cannot be inspected."""
    try:
        inspection = inspect()
    except FormerkitError as error:  # e.g. a classifier of non-image inputs
        return f"<p>No attention maps: {html.escape(str(error))}</p>"
    with tempfile.TemporaryDirectory() as scratch:
        return "".join(_png(path) for path in plot_inspection(inspection, scratch))
