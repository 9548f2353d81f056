"""``formerkit report RUN_DIR``: one self-contained HTML file about a run, readable offline in any browser.

Sections: the summary (status, steps, final metrics, throughput), the model (its parts and parameter counts), the loss
and metric curves, and then by task — for classifiers the test confusion matrix and the hardest test examples (the
highest loss), for language models samples at a few temperatures — and attention maps of one example. Every image is
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

from formerkit.data import build_data
from formerkit.data.images import denormalize_images
from formerkit.errors import CheckpointError, FormerkitError
from formerkit.inspection import inspect_example, inspect_text, plot_inspection
from formerkit.runs import generate_text, load_run_model, load_run_tokenizer
from formerkit.summary import summarize
from formerkit.train.report import plot_run

__all__ = ["confusion_matrix", "write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; } .grid img { width: 23%; margin: 0.5%; }
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


def write_report(run_dir: str | Path, out: str | Path | None = None, *, samples: int = 200) -> Path:
    """Writes the report (default ``RUN_DIR/report.html``) and returns its path. ``samples``: the length in tokens
    of each language-model sample."""
    import matplotlib

    matplotlib.use("Agg")

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise CheckpointError(f"{run_dir}: no summary.json; report needs a run directory written by formerkit train")
    summary = json.loads(summary_path.read_text())
    model, recipe, extra = load_run_model(run_dir)
    parts = [_section("summary", "Summary", _table([(k.replace("_", " "), v) for k, v in summary.items()
                                                    if not isinstance(v, (dict, list))]))]
    parts.append(_section("model", "Model", f"<pre>{html.escape(str(summarize(model)))}</pre>"
                          f"<pre>{html.escape(json.dumps(model.config.to_dict(), indent=1))}</pre>"))
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
        section, greedy = _samples(model, tokenizer, samples)
        parts.append(section)
        # The attention of the model's own greedy text (in its domain, whatever the corpus), a line or so.
        attention = _attention_maps(lambda: inspect_text(model, tokenizer.encode(greedy[:48] or "\n"),
                                                         decode=lambda token: tokenizer.decode([token])))
    else:
        attention = "<p>Attention maps are drawn for classifiers and language models.</p>"
    parts.append(_section("attention", "Attention maps", attention))
    parts.append(_section("recipe", "Recipe", f"<pre>{html.escape(json.dumps(extra['recipe'], indent=1))}</pre>"))
    title = html.escape(f"{summary.get('name', run_dir.name)} — {run_dir.name}")
    document = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{title}</h1>\n" + "".join(parts) + "</body></html>\n")
    path = Path(out) if out is not None else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document)
    return path


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
    figure, axis = plt.subplots(figsize=(0.45 * count + 2.5, 0.45 * count + 2))
    axis.imshow(matrix.numpy(), cmap="Blues")
    for (row, column), value in zip(torch.cartesian_prod(torch.arange(count), torch.arange(count)).tolist(),
                                    matrix.flatten().tolist()):
        if value:
            axis.text(column, row, str(value), ha="center", va="center", fontsize=7)
    axis.set_xticks(range(count), classes, fontsize=7)
    axis.set_yticks(range(count), classes, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    accuracy = float((predictions == labels).float().mean())
    axis.set_title(f"{len(labels)} held-out examples, accuracy {accuracy:.2%}", fontsize=9)
    figure.tight_layout()
    confusion = _png(figure)
    plt.close(figure)
    hardest = losses.argsort(descending=True)[:12].tolist()
    rows = [(f"#{index}", f"true {classes[int(labels[index])]}, predicted {classes[int(predictions[index])]}, "
                          f"loss {float(losses[index]):.3f}") for index in hardest]
    pictures = ""
    if inputs.dim() == 4:
        pre = bundle.preprocessing
        tiles = []
        for index in hardest:
            figure, axis = plt.subplots(figsize=(2, 2))
            axis.imshow(denormalize_images(inputs[index], pre["mean"], pre["std"]).mean(0).numpy(), cmap="gray")
            axis.set_title(f"#{index}: {classes[int(labels[index])]} → {classes[int(predictions[index])]}",
                           fontsize=8)
            axis.axis("off")
            figure.tight_layout()
            tiles.append(_png(figure))
            plt.close(figure)
        pictures = '<div class="grid">' + "".join(tiles) + "</div>"
    return (_section("confusion", "Confusion matrix", confusion)
            + _section("hardest", "Hardest held-out examples", pictures + _table(rows))), name


def _samples(model, tokenizer, length: int) -> tuple[str, str]:
    """Samples from a start of line at a few temperatures (seeded); returns the section and the greedy text."""
    blocks, greedy = [], ""
    start = tokenizer.encode("\n")[:1]
    for temperature in (0.0, 0.8, 1.2):
        text = "".join(generate_text(model, tokenizer, start, max_new_tokens=length, temperature=temperature,
                                     seed=0))
        greedy = greedy or text
        label = "greedy" if temperature == 0 else f"temperature {temperature}"
        blocks.append(f"<h3>{label}</h3><pre>{html.escape(text)}</pre>")
    return _section("samples", "Samples", "".join(blocks)), greedy


def _attention_maps(inspect) -> str:
    """The PNGs of ``inspect()``'s inspection, embedded; a note where the model's input cannot be inspected."""
    try:
        inspection = inspect()
    except FormerkitError as error:  # e.g. a classifier of non-image inputs
        return f"<p>No attention maps: {html.escape(str(error))}</p>"
    with tempfile.TemporaryDirectory() as scratch:
        return "".join(_png(path) for path in plot_inspection(inspection, scratch))
