"""Fixtures and helpers shared by the test folders: random weights, shrunken recipes and runs trained once, a console
that records, tiny model configs.

Tests ask for the fixtures (``randomize``, ``tiny``, ``trained_run``, ``console``). Module-level helpers and parametrize
lists, which cannot ask for fixtures, import the same functions: ``from ..conftest import randomize_weights``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from formerkit import ModelConfig

# One thread per process, here and in the subprocesses tests start (unless OMP_NUM_THREADS says otherwise): the
# models are tiny, so a second thread gains nothing, and on a machine whose cores are busy with other work the
# threads of every small op wait for each other (the suite ran 20x slower on 2 shared cores).
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# ----- random weights -----


def randomize_weights(model: torch.nn.Module, seed: int, *, std: float | str = 0.15) -> torch.nn.Module:
    """Redraws every parameter of ``model`` (in place; returns it) from a generator seeded with ``seed``.

    Vectors (norm weights, biases, LayerScale gammas) get their value plus N(0, 0.1^2), so norm weights stay near 1
    but are no longer uniform and biases are no longer 0; matrices and tables get N(0, std^2), or N(0, 1/fan_in)
    with ``std="fan_in"`` (O(1)-scale activations whatever the width). Default inits (unit norms, zero biases, small
    weights) would let a missing bias, a norm without its affine part or a nearly uniform attention pattern hide a
    difference.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 1:
                parameter.add_(0.1 * noise)
            elif std == "fan_in":
                parameter.copy_(noise / math.sqrt(parameter.shape[-1]))
            else:
                parameter.copy_(std * noise)
    return model


@pytest.fixture(scope="session")
def randomize():
    """randomize(model, seed, std=0.15): ``randomize_weights``, for tests that compare two implementations."""
    return randomize_weights


# ----- shrunken recipes -----

# No progress bar, a train record every step, one warm-up step.
QUIET = {"run.progress": False, "run.log_every": 1, "schedule.warmup_steps": 1}

# The shipped recipes with tiny models and a few steps.
TINY = {
    "cct-digits": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "model.num_layers": 1,
                   "model.width": 32, "model.num_heads": 2, "model.conv_layers": 1},
    "vit-digits": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "model.num_layers": 1,
                   "model.width": 32, "model.num_heads": 2},
    "mae-digits": {"schedule.steps": 4, "schedule.batch_size": 16, "eval.every": 2, "model.num_layers": 1,
                   "model.width": 32, "model.num_heads": 2, "objective.decoder_width": 32,
                   "objective.decoder_layers": 1,
                   "then": {"objective": {"kind": "classification"},
                            "schedule": {"steps": 4, "batch_size": 16, "warmup_steps": 1}}},
    "dit-digits": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "model.config.width": 32,
                   "model.config.num_layers": 1, "model.config.attention.num_heads": 2,
                   "model.config.condition.timestep_frequencies": 32, "objective.sample_steps": 4},
    "seq2seq-reverse": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "data.num_examples": 64,
                        "data.seq_len": 6, "model.config.width": 32, "model.config.max_seq_len": 7},
    "mlm-stdlib": {"schedule.steps": 6, "schedule.batch_size": 4, "eval.every": 3, "data.max_bytes": 120_000,
                   "data.seq_len": 32, "model.config.width": 32, "model.config.num_layers": 1,
                   "model.config.max_seq_len": 32, "eval.batches": 2},
    "timeseries-forecast": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "data.window": 32,
                            "data.horizon": 8, "model.config.width": 32, "model.config.num_layers": 1,
                            "model.config.max_seq_len": 32},
    "char-lm-long": {"schedule.steps": 4, "schedule.batch_size": 2, "eval.every": 2, "data.max_bytes": 120_000,
                     "data.seq_len": 160, "model.width": 32, "model.num_heads": 2, "model.max_seq_len": 160,
                     "model.attention.sliding_window": 8, "eval.batches": 2, "eval.batch_size": 2},
    "char-lm": {"schedule.steps": 6, "schedule.batch_size": 4, "eval.every": 3, "data.max_bytes": 120_000,
                "data.seq_len": 32, "model.num_layers": 1, "model.width": 32, "model.num_heads": 2,
                "eval.batches": 2, "run.precision": "fp32"},  # (the recipe's auto: bf16 on some machines only)
    "maskgit-digits": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3,
                       "model.config.width": 32, "model.config.num_layers": 1, "model.config.attention.num_heads": 2},
    "mdlm-stdlib": {"schedule.steps": 6, "schedule.batch_size": 4, "eval.every": 3, "data.max_bytes": 120_000,
                    "data.seq_len": 32, "model.config.width": 32, "model.config.num_layers": 1,
                    "model.config.attention.num_heads": 2, "model.config.max_seq_len": 32, "eval.batches": 2},
    # The recipes for the user's own data (their data.path comes from the test's files).
    "text-folder": {"schedule.steps": 6, "schedule.batch_size": 4, "eval.every": 3, "data.seq_len": 32,
                    "model.num_layers": 1, "model.width": 32, "model.num_heads": 2, "eval.batches": 2},
    "jsonl-lm": {"schedule.steps": 6, "schedule.batch_size": 4, "eval.every": 3, "data.seq_len": 32,
                 "model.num_layers": 1, "model.width": 32, "model.num_heads": 2, "eval.batches": 2},
    "jsonl-classify": {"schedule.steps": 6, "schedule.batch_size": 8, "eval.every": 3, "data.seq_len": 32,
                       "model.config.width": 32, "model.config.num_layers": 1, "model.config.attention.num_heads": 2},
    "image-folder": {"schedule.steps": 6, "schedule.batch_size": 8, "eval.every": 3, "model.num_layers": 1,
                     "model.width": 32, "model.num_heads": 2, "model.conv_channels": 16},
    "csv-forecast": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "data.window": 32,
                     "data.horizon": 8, "model.config.width": 32, "model.config.num_layers": 1,
                     "model.config.max_seq_len": 32},
}


def tiny_overrides(recipe: str, **extra: Any) -> dict[str, Any]:
    """The overrides that shrink a shipped recipe for a test (quiet, tiny model, a few steps), then ``extra``."""
    return {**QUIET, **TINY[recipe], **extra}


@pytest.fixture(scope="session")
def tiny():
    """tiny(recipe, **extra) -> the overrides that shrink a shipped recipe for a test (``tiny_overrides``)."""
    return tiny_overrides


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """trained_run(recipe, **extra) -> the directory of a run of ``tiny_overrides(recipe, **extra)``, trained once
    per test session for every test that asks for the same run. Tests only read it: one that writes into a run
    directory copies it first (``shutil.copytree(trained_run(...), tmp_path / "run")``)."""
    from formerkit.train import train

    runs: dict[str, Path] = {}

    def get(recipe: str, **extra: Any) -> Path:
        overrides = tiny_overrides(recipe, **extra)
        key = json.dumps([recipe, overrides], sort_keys=True)
        if key not in runs:
            out = tmp_path_factory.mktemp(recipe) / "run"
            train(recipe, out, overrides=overrides)
            runs[key] = out
        return runs[key]

    return get


@pytest.fixture
def console():
    """A rich console that prints into a string (``console.file.getvalue()``), wide enough that no line wraps."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=400, force_terminal=False)


# ----- tiny model configs -----


def _kind(value: str | dict | None) -> dict | None:
    return {"kind": value} if isinstance(value, str) else value


def token_config(arch: str = "decoder", *, vocab_size: int, width: int = 32, num_layers: int = 2,
                 max_seq_len: int | None = 16, num_heads: int = 4, attention: dict | None = None,
                 position: str | dict | None = None, head: str | dict | None = None, **fields: Any) -> ModelConfig:
    """A tiny model over token ids. ``head`` and ``position`` are a kind or a whole section (head: lm for decoders and
    encoder-decoders, none for encoders; position: ModelConfig's default); ``attention`` adds to num_heads;
    ``fields`` are any other ModelConfig fields."""
    head = _kind(head) or {"kind": "none" if arch == "encoder" else "lm"}
    if position is not None:
        fields["position"] = _kind(position)
    return ModelConfig(arch=arch, width=width, num_layers=num_layers, max_seq_len=max_seq_len,
                       attention={"num_heads": num_heads, **(attention or {})},
                       stem={"kind": "tokens", "vocab_size": vocab_size}, head=head, **fields)


def image_config(*, image_size: int | tuple[int, int] = 8, patch_size: int = 2, in_channels: int = 1,
                 width: int = 32, num_layers: int = 2, num_heads: int = 4, attention: dict | None = None,
                 stem: dict | None = None, head: str | dict = "none", **fields: Any) -> ModelConfig:
    """A tiny ViT encoder over images (by default 8x8 one-channel digits in 2x2 patches and a class token).
    ``stem`` adds to the patch stem; ``head`` is a kind or a whole section; ``fields`` are any other ModelConfig
    fields."""
    patches = {"kind": "patches", "image_size": image_size, "patch_size": patch_size, "in_channels": in_channels,
               "class_token": True, **(stem or {})}
    return ModelConfig(arch="encoder", width=width, num_layers=num_layers,
                       attention={"num_heads": num_heads, **(attention or {})}, stem=patches, head=_kind(head),
                       **fields)


def char_hf_tokenizer(chat_template: str):
    """A ``tokenizers`` word-level tokenizer with one token per printable ASCII character, ``<s>`` and ``</s>`` as
    added special tokens, wrapped as formerkit's HFTokenizer with ``chat_template``: (tokenizer, backend)."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from formerkit.data.tokenizers import HFTokenizer

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.add_special_tokens(["<s>", "</s>"])
    return HFTokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template}), backend


@contextlib.contextmanager
def stop_training_after(step: int):
    """A context in which ``formerkit train``'s loop receives SIGINT right after ``step`` (as a user pressing Ctrl-C
    then would): the run checkpoints and ends "interrupted"."""
    import signal

    from formerkit.train import trainer

    original = trainer.StepTimer.tick

    def tick(self, done):
        original(self, done)
        if done == step:
            signal.raise_signal(signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.StepTimer, "tick", tick)
        yield
