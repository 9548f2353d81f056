"""Interrupting training subprocesses at a known step (tests/train/gated_train.py), with deadlines that fail loudly."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

GATED_TRAIN = Path(__file__).with_name("gated_train.py")


def gated_train(step: int, directory: Path, action: str, *cli_args: str) -> list[str]:
    """The arguments that run ``formerkit <cli_args>`` held after optimizer step ``step`` (see gated_train.py), to be
    started with the Python interpreter or torchrun. ``directory`` receives the reached-<rank> files."""
    directory.mkdir(parents=True, exist_ok=True)
    return [str(GATED_TRAIN), str(step), str(directory), action, *cli_args]


def wait_until_held(directory: Path, process: subprocess.Popen, *, ranks: int = 1, timeout: float = 120.0,
                    stop: Callable[[], None] | None = None) -> None:
    """Waits until every rank of the gated run has reached its step. Fails, with the run's output, when the process
    ends first or ``timeout`` seconds pass (then ``stop``, by default ``process.kill``, ends it)."""
    expected = [directory / f"reached-{rank}" for rank in range(ranks)]
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in expected):
        ended = process.poll() is not None
        if ended or time.monotonic() > deadline:
            if not ended:
                (stop or process.kill)()
            output = process.communicate(timeout=60)
            text = "\n".join(part if isinstance(part, str) else part.decode(errors="replace")
                             for part in output if part)
            reached = sorted(path.name for path in directory.glob("reached-*"))
            what = f"ended with exit code {process.returncode}" if ended else f"did not get there within {timeout} s"
            pytest.fail(f"the run {what}: reached {reached} of {[path.name for path in expected]}\n{text[-4000:]}")
        time.sleep(0.01)
