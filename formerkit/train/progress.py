"""How a run shows its progress: a rich progress bar on a terminal, plain lines every few steps in a log (stdout
piped or redirected, where a bar would only appear at the end), or nothing."""

from __future__ import annotations

__all__ = ["line_every", "progress"]


class _Progress:
    """A rich progress bar with loss, throughput and ETA, and evaluation lines printed above it."""

    def __init__(self, console, total: int, start: int, name: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console,
                            transient=False)
        self.task = self.bar.add_task(name, total=total, completed=start, status="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self, step, loss, rate, unit, load_max=None):
        fields = {}
        if loss is not None:
            fields["status"] = _status(loss, rate, unit, load_max)
        self.bar.update(self.task, completed=step, **fields)

    def note(self, step, metrics):
        self.bar.console.print(_metrics_line(step, metrics))


def _status(loss, rate, unit, load_max) -> str:
    text = f"loss {loss:.4f}  {rate:,.0f} {unit}/s"
    if load_max is not None:  # mixture of experts: how unevenly the experts were loaded (1 = evenly)
        text += f"  expert load {load_max:.2f}"
    return text


def _metrics_line(step, metrics) -> str:
    return f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def line_every(total: int, log_every: int) -> int:
    """Steps between two plain progress lines: a multiple of run.log_every (the steps with a loss to show), about
    twenty lines per run."""
    return log_every * max(1, round(total / (20 * log_every)))


class _Lines:
    """Plain progress lines (no cursor movement, nothing held back): one every ``every`` steps and at the last."""

    def __init__(self, console, total: int, name: str, every: int):
        self.console, self.total, self.name, self.every = console, total, name, every

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def advance(self, step, loss, rate, unit, load_max=None):
        if loss is not None and (step % self.every == 0 or step == self.total):
            self.console.print(f"{self.name} step {step}/{self.total}  {_status(loss, rate, unit, load_max)}",
                               highlight=False, soft_wrap=True)

    def note(self, step, metrics):
        self.console.print(_metrics_line(step, metrics), highlight=False, soft_wrap=True)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def advance(self, *args):
        return None

    def note(self, *args):
        return None


def progress(console, enabled: bool, total: int, start: int, name: str, log_every: int):
    """The bar on a terminal, plain lines otherwise (see ``line_every``), nothing when disabled."""
    if not enabled or console is None:
        return _NoProgress()
    if not console.is_terminal:
        return _Lines(console, total, name, line_every(total, log_every))
    return _Progress(console, total, start, name)
