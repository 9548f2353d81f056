"""``formerkit train`` held after one optimizer step, so that a test interrupts a run at a moment it knows.

    python gated_train.py STEP DIRECTORY ACTION <formerkit CLI arguments: train RECIPE --out ...>

Right after optimizer step STEP (the step's update is applied; its record and checkpoint are not written yet) the
process writes ``DIRECTORY/reached-<RANK>`` (RANK 0 outside torchrun) and waits:

- ``hold``: until it is killed;
- ``sigterm``: until it receives SIGTERM, which it then hands to the handler the run installed, so the run stops
  after this very step.

It gives up after two minutes (exit code 3), so a test that fails to act leaves no process behind. A test-only
script: it changes nothing in formerkit, it watches the optimizer through torch's global step hook.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

GIVE_UP_S = 120


def _hold(step: int, directory: Path, action: str) -> None:
    received: list[int] = []
    handler = signal.getsignal(signal.SIGTERM)
    if action == "sigterm":
        if not callable(handler):
            sys.exit(f"gated_train: the run installed no SIGTERM handler (found {handler!r})")
        signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    (directory / f"reached-{os.environ.get('RANK', '0')}").write_text(str(step))
    deadline = time.monotonic() + GIVE_UP_S
    while not received:
        if time.monotonic() > deadline:
            print(f"gated_train: nothing happened within {GIVE_UP_S} s of step {step}", file=sys.stderr, flush=True)
            os._exit(3)
        time.sleep(0.01)
    signal.signal(signal.SIGTERM, handler)
    handler(signal.SIGTERM, None)  # as if the signal came now: the run checkpoints after this step and stops


def main() -> int:
    step, directory, action, cli_args = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    if action not in ("hold", "sigterm"):
        sys.exit(f"gated_train: ACTION must be hold or sigterm, got {action!r}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's formerkit, as `python -m` from it
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from formerkit.cli import main as cli

    steps = 0

    def after_step(optimizer, args, kwargs) -> None:
        nonlocal steps
        steps += 1
        if steps == step:
            _hold(step, directory, action)

    register_optimizer_step_post_hook(after_step)
    return cli(cli_args)


if __name__ == "__main__":
    raise SystemExit(main())
