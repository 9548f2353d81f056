"""What the benchmarks share: records, the machine's matrix-multiply limit, timing, peak memory in a fresh process,
and the Markdown table.

A record is one measured number: ``{"bench", "library", "precision", "metric", "value", "unit", "params",
"shape"}`` (``shape`` says what was run, so records of different libraries can be checked to be the same work).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from formerkit.errors import InputError

PRECISIONS = ("fp32", "bf16-autocast")


def record(bench: str, library: str, precision: str, metric: str, value: float, unit: str, params: int,
           shape: str) -> dict:
    return {"bench": bench, "library": library, "precision": precision, "metric": metric, "value": float(value),
            "unit": unit, "params": int(params), "shape": shape}


def check_choices(bench: str, libraries, known_libraries, precisions, counts: dict[str, int]) -> None:
    """Refuses unknown libraries or precisions and counts (rounds...) that are not integers >= 1."""
    unknown = [name for name in libraries if name not in known_libraries]
    if unknown:
        raise InputError(f"bench {bench}: unknown libraries {unknown}; expected some of {list(known_libraries)}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise InputError(f"bench {bench}: unknown precisions {bad}; expected some of {list(PRECISIONS)}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"bench {bench}: {name} must be an integer >= 1, got {value!r}")


def autocast(precision: str, device: str = "cpu"):
    """The context a precision runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16-autocast":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds(function: Callable, *args) -> float:
    """The wall time of one call ``function(*args)``."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def matmul_limit(precision: str, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of one large square matrix multiply in the precision's compute type (bf16 for bf16 autocast): what
    this machine's matrix units give at best, the ceiling for a model's useful FLOP rate."""
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    with torch.inference_mode():
        seconds = median_seconds(lambda: torch.mm(a, b), repeats, warmup=2)
    return 2 * size**3 / seconds / 1e9


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               precision: str, grad_clip: float | None = None) -> None:
    """One training step as every contender takes it: forward, cross-entropy of the logits (``.logits`` of an
    output object) against ``targets``, backward, (with ``grad_clip``, the gradient norm clipped to it, as
    formerkit's trainer does by default), optimizer step."""
    with autocast(precision):
        logits = model(inputs)
        logits = getattr(logits, "logits", logits)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_memory(build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]], inputs: torch.Tensor,
                    targets: torch.Tensor, precision: str, steps: int,
                    warm_up: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]]
                    | None = None, grad_clip: float | None = None) -> float:
    """The peak resident memory (MB) that building (model, optimizer) and ``steps`` training steps add to what the
    process holds before (its imports): meant for a fresh process (see ``in_fresh_process``).

    ``warm_up`` builds a tiny model of the same library (with its optimizer, inputs and targets) that takes one step
    before the base is read, so that what a library loads lazily on first use (modules imported inside its
    constructors, ``torch._dynamo`` that the first optimizer step imports -- ~70 MB -- and the math libraries'
    one-time buffers) counts as imports for every library alike, not as the model's memory of whichever library
    happens not to import it up front. ``grad_clip``: see ``train_step``."""
    if warm_up is not None:
        model, optimizer, warm_inputs, warm_targets = warm_up()
        train_step(model, optimizer, warm_inputs, warm_targets, precision, grad_clip)
        del model, optimizer, warm_inputs, warm_targets
    reset_peak_rss()
    base = status_mb("VmRSS") or 0.0
    model, optimizer = build()
    for _ in range(steps):
        train_step(model, optimizer, inputs, targets, precision, grad_clip)
    return max(peak_rss_mb() - base, 0.0)


def record_logger(label: str, path: str | None) -> Callable[[dict], None]:
    """A progress log for a long measurement: each record printed to stderr after ``label`` and, with ``path``,
    appended to that JSON-lines file as it comes (a run cut short keeps what it measured)."""
    def log(record: dict) -> None:
        print(f"  {label} {record}", file=sys.stderr, flush=True)
        if path:
            with open(path, "a") as out:
                out.write(json.dumps(record) + "\n")

    return log


def status_mb(field: str) -> float | None:
    """A field of /proc/self/status in MB (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets the process's peak resident memory (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return status_mb("VmHWM") is not None
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (MB)."""
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def in_fresh_process(code: str, what: str) -> object:
    """Runs ``code`` (which prints one JSON value last) in a new Python process and returns that value, so what
    earlier measurements left in the allocator (freed memory a process keeps) cannot hide or inflate this one."""
    # glibc keeps freed medium-sized blocks (up to its adaptive mmap threshold) in the heap, so peak resident memory
    # would count what the allocator holds on to; a fixed threshold returns every large block when it is freed, so
    # what is measured is what the computation holds at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench: measuring {what} in a fresh process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(records: list[dict], metrics: list[tuple[str, str]]) -> str:
    """One row per (library, precision), one column per metric (``(metric, column title)``), and each value's
    ratio to the best peer's (the other libraries') where formerkit is the row."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for item in records:
        rows.setdefault((item["library"], item["precision"]), {})[item["metric"]] = item
    lower_is_better = {metric for metric, _ in metrics if metric.startswith("peak_")}
    header = "| library | precision | params | " + " | ".join(title for _, title in metrics) + " |"
    lines = [header, "|" + "---|" * (3 + len(metrics))]
    for (library, precision), values in rows.items():
        if not any(metric in values for metric, _ in metrics):
            continue
        params = next(iter(values.values()))["params"]
        cells = []
        for metric, _ in metrics:
            item = values.get(metric)
            if item is None:
                cells.append("—")
                continue
            text = f"{item['value']:,.0f}" if item["value"] >= 100 else f"{item['value']:,.3g}"
            if library == "formerkit":
                peers = [other[metric]["value"] for (lib, prec), other in rows.items()
                         if lib != "formerkit" and prec == precision and metric in other]
                if peers:
                    best = min(peers) if metric in lower_is_better else max(peers)
                    text += f" ({item['value'] / best:.2f}x)" if best > 0 else ""
            cells.append(text)
        lines.append(f"| {library} | {precision} | {params / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """The CPU, its logical cores, torch's threads and the Python and torch versions: the "Machine:" line of a
    benchmark's output."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads; Python "
            f"{platform.python_version()}, torch {torch.__version__}")
