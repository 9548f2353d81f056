"""What every data source hands the trainer: splits held in memory, and how batches are drawn from them.

Batches are a pure function of (seed, step): the indices of step ``s`` come from a generator seeded by the run's seed
and ``s`` (or the epoch ``s`` falls in). Resuming at step ``s`` therefore reproduces exactly the batches an
uninterrupted run would have seen, and every process of a distributed run agrees on the global batch without talking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from formerkit.errors import FormerkitError

__all__ = [
    "ArraySplit",
    "DataBundle",
    "DataError",
    "ProcessGenerator",
    "RowDraws",
    "TokenSplit",
    "step_generator",
]


class DataError(FormerkitError):
    """A data source cannot be read: a missing path, an empty corpus, an unreadable file, bad options."""


def step_seed(seed: int, *keys: int) -> int:
    """The seed ``step_generator`` gives its generator."""
    value = seed & 0xFFFFFFFF
    for key in keys:
        # A simple mix (the FNV-style multiply-xor) so (seed, step) pairs do not collide for realistic ranges.
        value = ((value ^ (key & 0xFFFFFFFF)) * 0x100000001B3) & 0x7FFFFFFFFFFFFFFF
    return value


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from the run seed and any number of integer keys (step, epoch, purpose)."""
    return torch.Generator().manual_seed(step_seed(seed, *keys))


class RowDraws:
    """Per-example random draws (noise, timesteps, masks) for a batch that may be one process's share of a micro-batch.

    Every process draws the whole micro-batch's values from one stream they all share and keeps its own rows, so an
    example gets the same draws however the global batch is split between processes: a distributed run of a
    stochastic objective then follows the single-process run. ``rand``/``randn``/``randint`` draw for the whole
    micro-batch ([total, *shape]); ``mine`` keeps this process's rows. ``generator`` is the shared stream itself,
    for draws that are not per example."""

    def __init__(self, generator: torch.Generator, rows: Tensor | None, total: int):
        self.generator = generator
        # This process's rows of the micro-batch (None: all of them, a single process).
        self.rows = rows
        self.total = total

    @staticmethod
    def of(generator: torch.Generator, count: int) -> RowDraws:
        """The draws for a batch of ``count`` rows: the trainer's (a ``ProcessGenerator``), or, for any other
        generator (evaluation, a direct call), the whole batch drawn from ``generator``."""
        draws = getattr(generator, "row_draws", None)
        if draws is None:
            return RowDraws(generator, None, count)
        if draws.count != count:
            raise ValueError(f"RowDraws: the batch has {count} rows, the trainer's share has {draws.count}")
        return draws

    @property
    def count(self) -> int:
        """How many rows this process has."""
        return self.total if self.rows is None else len(self.rows)

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(self.total, *shape, generator=self.generator)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(self.total, *shape, generator=self.generator)

    def randint(self, high: int, *shape: int) -> Tensor:
        return torch.randint(high, (self.total, *shape), generator=self.generator)

    def mine(self, values: Tensor) -> Tensor:
        """This process's rows of draws made for the whole micro-batch."""
        return values if self.rows is None else values[self.rows.to(values.device)]


class ProcessGenerator(torch.Generator):
    """What the trainer hands ``Objective.loss``: this process's own stream (seeded by ``seed``), usable wherever a
    torch.Generator is, and ``row_draws`` (a ``RowDraws``) for objectives whose draws must not depend on how the
    global batch is split (``RowDraws.of``). With one process the two streams start from the same seed."""

    def __new__(cls, seed: int, row_draws: RowDraws):
        return super().__new__(cls)  # (torch.Generator's constructor takes only a device)

    def __init__(self, seed: int, row_draws: RowDraws):
        super().__init__()
        self.manual_seed(seed)
        self.row_draws = row_draws


class ArraySplit:
    """A split held in memory as aligned tensors (the same first dimension), e.g. {"inputs", "labels"}."""

    def __init__(self, tensors: dict[str, Tensor]):
        sizes = {name: len(t) for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"ArraySplit: tensors must have the same length, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def take(self, indices: Tensor) -> dict[str, Tensor]:
        return {name: t[indices] for name, t in self.tensors.items()}

    def sample_indices(self, batch_size: int, seed: int, step: int) -> Tensor:
        """The indices of global batch ``step``: epochs of a seeded permutation (the last partial batch dropped)."""
        per_epoch = max(len(self) // batch_size, 1)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(len(self), generator=step_generator(seed, 1, epoch))
        chunk = order[position * batch_size:(position + 1) * batch_size]
        if len(chunk) < batch_size:  # a split smaller than one batch: wrap around
            chunk = order.repeat(batch_size // len(self) + 1)[:batch_size]
        return chunk

    def eval_batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Every example once, in order (the last batch may be smaller)."""
        for number, start in enumerate(range(0, len(self), batch_size)):
            if limit is not None and number >= limit:
                return
            yield self.take(torch.arange(start, min(start + batch_size, len(self))))


class TokenSplit:
    """A long stream of token ids; an example is a window of ``seq_len + 1`` tokens (inputs and shifted targets)."""

    def __init__(self, tokens: Tensor, seq_len: int):
        if tokens.dim() != 1:
            raise DataError(f"TokenSplit: expected a 1-D tensor of token ids, got shape {list(tokens.shape)}")
        if len(tokens) < seq_len + 1:
            raise DataError(f"TokenSplit: {len(tokens)} tokens is too few for one window of {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        """How many distinct windows start in the stream."""
        return len(self.tokens) - self.seq_len

    def take(self, starts: Tensor) -> dict[str, Tensor]:
        offsets = torch.arange(self.seq_len + 1)
        return {"tokens": self.tokens[starts.unsqueeze(1) + offsets]}

    def sample_indices(self, batch_size: int, seed: int, step: int) -> Tensor:
        """Random window starts for step ``step`` (a stream has too many windows for epoch permutations)."""
        return torch.randint(len(self), (batch_size,), generator=step_generator(seed, 2, step))

    def eval_batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Non-overlapping windows covering the stream, in order."""
        starts = torch.arange(0, len(self), self.seq_len)
        for number, begin in enumerate(range(0, len(starts), batch_size)):
            if limit is not None and number >= limit:
                return
            yield self.take(starts[begin:begin + batch_size])


Split = ArraySplit | TokenSplit


@dataclass
class DataBundle:
    """A data source, loaded: its splits and what the model must agree with."""

    train: Split
    valid: Split | None
    test: Split | None
    # Model config fields the data fixes (vocab_size, num_classes, image_size, in_channels, input_dim, ...),
    # as ModelConfig.replace keys.
    model_fields: dict[str, Any] = field(default_factory=dict)
    # JSON-able description of how raw inputs become model inputs; saved with the model so every later command
    # (eval, serving, export) applies the same.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    # Train-time augmentation: (batch, generator) -> batch.
    augment: Callable[[dict[str, Tensor], torch.Generator], dict[str, Tensor]] | None = None
    # What one example counts as for throughput: "tokens" (per window token) or "examples".
    unit: str = "examples"
    description: str = ""

    def split(self, name: str) -> Split:
        split = getattr(self, name)
        if split is None:
            raise DataError(f"this data source has no {name!r} split")
        return split
