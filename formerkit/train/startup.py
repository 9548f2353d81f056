"""What a run says as it starts: the model's size and tokens per example, a warning when the data gives far more
tokens per example than the recipe was made for, the measured time per step with the projected run time, and the
name the run goes by."""

from __future__ import annotations

import time
from pathlib import Path

from formerkit.errors import FormerkitError

__all__ = ["TOKEN_WARNING_RATIO", "StepTimer", "example_prompt", "format_duration", "run_title", "token_warning",
           "tokens_per_example"]

# Warn when an example gives more than this many times the tokens of the recipe's own data (attention's cost grows
# with the square of the count: 4x the tokens is about 16x the attention work per example).
TOKEN_WARNING_RATIO = 4
USER_SOURCES = ("text", "jsonl", "image_folder", "csv")
TEXT_SOURCES = ("stdlib", "text", "jsonl", "instruct", "synthetic")


def tokens_per_example(model_config, data) -> int:
    """The sequence the Transformer runs on for one example: an image stem's grid (with its class, distillation and
    register tokens), else the data's window (data.seq_len; csv: data.window, in patches for a patching stem)."""
    stem = model_config.stem
    if stem.kind in ("patches", "conv"):
        rows, cols = stem.grid_size
        return rows * cols + stem.num_prefix_tokens
    length = data.window if data.source == "csv" else data.seq_len
    if stem.kind == "linear" and stem.patch_size:
        length //= stem.patch_size
    if stem.kind == "tokens" and model_config.max_seq_len is not None and data.source not in TEXT_SOURCES:
        length = model_config.max_seq_len  # images read as tokens (objective masked_generation): the model's length
    return length + int(stem.class_token)


def _own_tokens(config) -> tuple[int, str] | None:
    """Tokens per example of the shipped recipe ``config.name`` on its own data, and that data's source; None when
    the recipe is not a shipped one or its data is the data used now."""
    from formerkit.data import build_data
    from formerkit.train.config import list_recipes, load_recipe

    if config.name not in list_recipes():
        return None
    own = load_recipe(config.name)
    if own.data == config.data or own.data.source in USER_SOURCES and own.data.path:
        return None
    try:
        # Image sources: the model's grid depends on the images' size (digits: 8x8, loaded in a moment); the
        # text sources' windows do not depend on the data's contents.
        fields = build_data(own.data).model_fields if own.data.source == "digits" else {}
        return tokens_per_example(own.model.resolve(fields), own.data), own.data.source
    except FormerkitError:
        return None


def _fewer_tokens_hint(model_config, data) -> str:
    stem = model_config.stem
    if stem.kind == "conv":
        if not stem.pool_kernel:
            return (f"set model.stem.pool_kernel=3 (now 0: no pooling; 3 with stride {stem.pool_stride} divides each "
                    f"side by {stem.pool_stride} per conv layer) or a smaller data.image_size (now {data.image_size})")
        return f"set a smaller data.image_size (now {data.image_size}) or more model.stem.conv_layers"
    if stem.kind == "patches":
        return (f"set a larger model.stem.patch_size (now {stem.patch_size}) or a smaller data.image_size (now "
                f"{data.image_size})")
    if data.source == "csv":
        return f"set a smaller data.window (now {data.window})"
    return f"set a smaller data.seq_len (now {data.seq_len})"


def token_warning(config, model_config) -> str | None:
    """A warning when one example gives more than TOKEN_WARNING_RATIO times the tokens of the recipe's own data
    (a recipe made for 8x8 digits run on 32x32 images: 16x the tokens, ~256x the attention work), naming the field
    to change; None otherwise."""
    own = _own_tokens(config)
    if own is None:
        return None
    baseline, source = own
    tokens = tokens_per_example(model_config, config.data)
    if tokens <= TOKEN_WARNING_RATIO * baseline:
        return None
    ratio = tokens / baseline
    return (f"warning: {tokens:,} tokens per example, {ratio:.0f}x the {baseline:,} recipe {config.name} was made for "
            f"(its data: {source}; warned above {TOKEN_WARNING_RATIO}x). Attention's cost grows with the square of "
            f"the count (~{ratio ** 2:,.0f}x per example). For fewer tokens "
            f"{_fewer_tokens_hint(model_config, config.data)}")


def run_title(config, run_dir: Path) -> str:
    """The name a run goes by in tables and reports: the recipe's, or, on the user's own data (data.path), the run
    directory's, as the recipe's name describes data the run did not use."""
    if config.data.source in USER_SOURCES and config.data.path:
        return Path(run_dir).resolve().name
    return config.name


def example_prompt(bundle, limit: int = 16) -> str | None:
    """A prompt for the "next:" hint, taken from the run's own training data: the start of its first line (up to the
    first space, at most ``limit`` characters); None when the data is not text."""
    if bundle.tokenizer is None:
        return None
    try:
        import torch

        example = bundle.train.take(torch.tensor([0]))
        ids = example["tokens"][0].tolist()  # a window of the stream, or a packed row (its first documents)
        text = bundle.tokenizer.decode([i for i in ids[:256] if i >= 0])
    except Exception:  # a split of another layout (no token rows): no prompt rather than a bad one
        return None
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    word, space, _ = line.partition(" ")
    return (word[:limit] + space) or None


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class StepTimer:
    """Measures seconds per step over the steps after the first (which pays for allocation and warm-up) and reports
    once, after ``measure`` of them (or at the end of a shorter run): the time per step and the projected run time."""

    def __init__(self, start: int, total: int, say, measure: int = 5):
        self.start, self.total, self.say, self.measure = start, total, say, measure
        self.first_done: float | None = None
        self.reported = False

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        if step == self.start + 1:
            self.first_done = now
            return
        timed = step - self.start - 1
        if self.reported or self.first_done is None or (timed < self.measure and step < self.total):
            return
        self.reported = True
        per_step = (now - self.first_done) / timed
        self.say(f"speed: {per_step:.3g} s per step (measured over steps {self.start + 2}-{step}); {self.total:,} "
                 f"steps take about {format_duration(per_step * self.total)}, "
                 f"{format_duration(per_step * (self.total - step))} to go", highlight=False)
