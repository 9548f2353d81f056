"""Looking inside a model: attention maps, attention rollout and next-token probabilities, as tensors and as PNGs.

``inspect_text`` runs a text through a model and returns every layer's attention [heads, tokens, tokens] and, for a
language model, the most likely next tokens after each position; ``inspect_image`` returns, for an image classifier,
every layer's attention, each head's attention *from* the summary of the image (the class token, or for
sequence-pooling models such as CCT the pooled mix of tokens) to the image's tokens, and the attention rollout
(Abnar & Zuidema, 2020): the product over layers of the head-averaged attention plus the identity (for the residual
connection), renormalized, read from the same summary. ``plot_inspection`` writes the PNGs;
``inspect_run`` does all of it for a run directory (the CLI's ``formerkit inspect``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from formerkit.data import build_data
from formerkit.data.images import denormalize_images
from formerkit.errors import CheckpointError, InputError
from formerkit.runs import load_run_model, load_run_tokenizer

__all__ = ["Inspection", "attention_rollout", "inspect_example", "inspect_image", "inspect_run", "inspect_text",
           "plot_inspection"]


@dataclass
class Inspection:
    """What one input shows. ``attentions[layer]``: [heads, queries, keys] (batch 1)."""

    attentions: list[Tensor]
    # text: the tokens as strings, in order (the axes of the maps)
    tokens: list[str] | None = None
    # language models: after each position, the top next tokens and their probabilities
    top_next: list[list[tuple[str, float]]] | None = None
    # images: each layer's attention from the summary to the image tokens [layers, heads, grid_h, grid_w]
    summary_attention: Tensor | None = None
    # images: attention rollout from the summary to the image tokens [grid_h, grid_w]
    rollout: Tensor | None = None
    # images: the input as it is shown [C, H, W] in [0, 1]; the predicted class and its probability
    image: Tensor | None = None
    prediction: tuple[str, float] | None = None


def attention_rollout(attentions: list[Tensor]) -> Tensor:
    """Rollout [queries, keys] of per-layer attentions [heads, queries, keys]: the product, first layer rightmost,
    of 0.5 * (mean over heads) + 0.5 * identity, each row renormalized to sum to 1."""
    if not attentions:
        raise InputError("attention_rollout: needs at least one layer's attention")
    tokens = attentions[0].shape[-1]
    eye = torch.eye(tokens, dtype=torch.float32)
    result = eye
    for weights in attentions:
        if weights.dim() != 3 or weights.shape[-2:] != (tokens, tokens):
            raise InputError(f"attention_rollout: expected [heads, {tokens}, {tokens}] per layer, got "
                             f"{list(weights.shape)}")
        mixed = 0.5 * weights.float().mean(dim=0) + 0.5 * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        result = mixed @ result
    return result


def _forward(model, inputs: Tensor):
    model.eval()
    with torch.no_grad():
        return model(inputs, output_attentions=True, return_outputs=True)


@torch.no_grad()
def inspect_text(model, token_ids: list[int], *, decode=None, top_k: int = 5) -> Inspection:
    """Attention maps of a text (``token_ids``, one sequence) and, for a language model, the ``top_k`` next tokens
    after each position. ``decode(id) -> str`` names the tokens (default: the ids)."""
    config = model.config
    if config.stem.kind != "tokens" or config.arch not in ("decoder", "encoder"):
        raise InputError(f"inspect_text: needs a token model (decoder or encoder), this one has a "
                         f"{config.stem.kind!r} stem and arch {config.arch!r}")
    if not token_ids:
        raise InputError("inspect_text: the text is empty (no tokens)")
    limit = config.max_seq_len
    if limit is not None and len(token_ids) > limit:
        raise InputError(f"inspect_text: {len(token_ids)} tokens exceed the model's max_seq_len {limit}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"inspect_text: top_k must be an integer >= 1, got {top_k!r}")
    decode = decode or str
    output = _forward(model, torch.tensor([token_ids]))
    attentions = [weights[0].float() for weights in output.attentions]
    tokens = [decode(token) for token in token_ids]
    top_next = None
    if config.head.kind == "lm" and config.arch == "decoder":
        probabilities = output.logits[0].float().softmax(dim=-1)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        top_next = [[(decode(int(i)), float(p)) for p, i in zip(row_values, row_indices)]
                    for row_values, row_indices in zip(values, indices)]
    return Inspection(attentions=attentions, tokens=tokens, top_next=top_next)


@torch.no_grad()
def inspect_image(model, image: Tensor, *, shown: Tensor | None = None, classes: list[str] | None = None) -> Inspection:
    """Attention of an image classifier on ``image`` [C, H, W] (preprocessed as the model expects); ``shown``
    [C, H, W] in [0, 1] is what the plots draw under the maps (default: ``image`` rescaled)."""
    config = model.config
    if config.stem.kind not in ("patches", "conv") or config.head.kind != "classification":
        raise InputError(f"inspect_image: needs an image classifier (patches or conv stem, classification head), "
                         f"this one has a {config.stem.kind!r} stem and a {config.head.kind!r} head")
    if image.dim() != 3:
        raise InputError(f"inspect_image: expected one image [channels, height, width], got {list(image.shape)}")
    stem = model.stem
    prefix = getattr(stem, "num_prefix_tokens", 0)
    output = _forward(model, image.unsqueeze(0))
    attentions = [weights[0].float() for weights in output.attentions]
    grid = getattr(stem, "grid_size", None)
    tokens = attentions[0].shape[-1]
    if grid is None or grid[0] * grid[1] != tokens - prefix:
        raise InputError(f"inspect_image: cannot lay {tokens - prefix} tokens over the image (grid {grid})")
    summary = _summary_weights(model, output, prefix, tokens)  # [tokens]: how the summary mixes the token rows
    # from_summary[layer, head, key] = sum over queries q of summary[q] * attention[layer][head, q, key]
    from_summary = torch.stack([torch.einsum("q,hqk->hk", summary, weights) for weights in attentions])
    per_head = from_summary[:, :, prefix:].reshape(len(attentions), -1, *grid)
    rollout = (summary @ attention_rollout(attentions))[prefix:].reshape(*grid)
    probabilities = output.logits[0].float().softmax(dim=-1)
    best = int(probabilities.argmax())
    label = classes[best] if classes and best < len(classes) else str(best)
    if shown is None:
        low, high = image.min(), image.max()
        shown = (image - low) / (high - low).clamp(min=1e-6)
    return Inspection(attentions=attentions, summary_attention=per_head, rollout=rollout, image=shown.float(),
                      prediction=(label, float(probabilities[best])))


def _summary_weights(model, output, prefix: int, tokens: int) -> Tensor:
    """[tokens]: the weights with which the classifier's summary reads the final token rows — one-hot on the class
    token, the pooling weights for attention (sequence) pooling, uniform for mean pooling."""
    pooling = model.config.head_pooling
    weights = torch.zeros(tokens)
    if pooling == "cls":
        weights[0] = 1.0
    elif pooling == "mean":
        weights[prefix:] = 1.0 / (tokens - prefix)
    elif pooling == "sequence":
        scores = model.head.pooling.score(output.last_hidden_state[0, prefix:].float())
        weights[prefix:] = scores.squeeze(-1).softmax(dim=0)
    else:
        raise InputError(f"inspect_image: a {pooling!r} pooled head has no summary to read attention from")
    return weights


def plot_inspection(inspection: Inspection, out_dir: str | Path) -> list[Path]:
    """Writes the PNGs of an inspection into ``out_dir``: one per layer (every head), and the next-token table
    (language models) or the attention rollout over the image (image classifiers). Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, weights in enumerate(inspection.attentions):
        heads = weights.shape[0]
        columns = min(heads, 4)
        rows = -(-heads // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
        for head in range(rows * columns):
            axis = axes[head // columns][head % columns]
            axis.axis("off")
            if head >= heads:
                continue
            if inspection.image is not None:
                axis.imshow(_displayed(inspection.image), cmap="gray")
                overlay = _upsample(inspection.summary_attention[layer, head], inspection.image.shape[-2:])
                axis.imshow(overlay, cmap="inferno", alpha=0.6)
            else:
                axis.imshow(weights[head].numpy(), cmap="viridis", vmin=0.0)
                _label_tokens(axis, inspection.tokens)
            axis.set_title(f"layer {layer} head {head}", fontsize=8)
        figure.tight_layout()
        path = out / f"attention_layer{layer}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    if inspection.rollout is not None:
        figure, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.2))
        left.imshow(_displayed(inspection.image), cmap="gray")
        label, probability = inspection.prediction
        left.set_title(f"predicted {label} ({probability:.0%})", fontsize=9)
        right.imshow(_displayed(inspection.image), cmap="gray")
        right.imshow(_upsample(inspection.rollout, inspection.image.shape[-2:]), cmap="inferno", alpha=0.6)
        right.set_title("attention rollout", fontsize=9)
        for axis in (left, right):
            axis.axis("off")
        figure.tight_layout()
        path = out / "rollout.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    if inspection.top_next is not None:
        positions, k = len(inspection.top_next), len(inspection.top_next[0])
        figure, axis = plt.subplots(figsize=(1.3 * k + 1.5, 0.32 * positions + 1.0))
        grid = torch.tensor([[p for _, p in row] for row in inspection.top_next]).numpy()
        axis.imshow(grid, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        for row, options in enumerate(inspection.top_next):
            for column, (token, probability) in enumerate(options):
                axis.text(column, row, f"{token!r} {probability:.2f}"[:16], ha="center", va="center", fontsize=9)
        axis.set_yticks(range(positions), [repr(token)[:12] for token in inspection.tokens], fontsize=9)
        axis.set_xticks(range(k), [f"#{rank + 1}" for rank in range(k)], fontsize=9)
        axis.set_title("most likely next tokens after each token", fontsize=9)
        figure.tight_layout()
        path = out / "next_tokens.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def _displayed(image: Tensor):
    """The image as matplotlib shows it: [H, W] for one channel, [H, W, 3] in colour (values in [0, 1])."""
    image = image.clamp(0, 1)
    return (image[0] if image.shape[0] == 1 else image.permute(1, 2, 0) if image.shape[0] == 3
            else image.mean(dim=0)).numpy()


def _upsample(grid: Tensor, size) -> object:
    return torch.nn.functional.interpolate(grid[None, None].float(), size=tuple(size), mode="nearest")[0, 0].numpy()


def _label_tokens(axis, tokens: list[str] | None) -> None:
    """Token labels on both axes, at most 16 per axis (every k-th token) so that each is readable."""
    if tokens is None:
        return
    step = -(-len(tokens) // 16)
    ticks = list(range(0, len(tokens), step))
    labels = [repr(tokens[i])[1:-1][:6] for i in ticks]
    axis.axis("on")
    axis.set_xticks(ticks, labels, rotation=90, fontsize=9)
    axis.set_yticks(ticks, labels, fontsize=9)


def inspect_example(model, bundle, split: str, index: int) -> Inspection:
    """``inspect_image`` of example ``index`` of a data bundle's ``split`` (preprocessed as in training)."""
    examples = bundle.split(split)
    inputs = examples.tensors["inputs"] if hasattr(examples, "tensors") else None
    if inputs is None or inputs.dim() != 4:
        raise InputError(f"inspect: an image index needs image data; this run's data is {bundle.description!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(inputs):
        raise InputError(f"inspect: image index must lie in [0, {len(inputs)}) for the {split} split, got {index!r}")
    pre = bundle.preprocessing
    image = inputs[index]
    return inspect_image(model, image, shown=denormalize_images(image, pre["mean"], pre["std"]),
                         classes=pre.get("classes"))


def inspect_run(target: str | Path, *, text: str | None = None, image_index: int | None = None,
                out: str | Path | None = None, split: str = "test", top_k: int = 5) -> tuple[Inspection, list[Path]]:
    """``inspect_text`` (with the run's tokenizer) or ``inspect_example`` (example ``image_index`` of the run's
    ``split``) for a run or model directory, with the PNGs written to ``out`` (default: ``<target>/inspect``)."""
    if (text is None) == (image_index is None):
        raise InputError("inspect: give either a text or an image index")
    model, recipe, extra = load_run_model(target, imported=text is not None)
    out = Path(out) if out is not None else Path(target) / "inspect"
    stem = getattr(getattr(model, "config", None), "stem", None)
    if text is not None and stem is not None and stem.kind in ("patches", "conv"):
        raise InputError(f"inspect: {target} is an image model ({stem.kind} stem on {stem.in_channels}x"
                         f"{stem.image_size[0]}x{stem.image_size[1]} images), so it reads no text; pass --image-index "
                         f"N to look at image N of its --split instead of --text")
    if text is not None:
        try:
            tokenizer = load_run_tokenizer(target)
        except CheckpointError as error:  # asked for text of a run without one: a bad request here
            raise InputError(str(error)) from None
        inspection = inspect_text(model, tokenizer.encode(text), decode=tokenizer.token_label,
                                  top_k=top_k)
    else:
        inspection = inspect_example(model, build_data(recipe.data), split, image_index)
    return inspection, plot_inspection(inspection, out)
