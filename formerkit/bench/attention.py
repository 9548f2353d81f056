"""``formerkit bench attention``: the cost of one attention computation as the sequence grows.

For each kind — full causal attention (SDPA), sliding-window attention computed block by block, causal linear
attention — and each length, it measures the forward time, the forward + backward time, and the peak memory, on
queries, keys and values of one layer (``heads`` x ``head_dim``, batch 1). The projections around attention cost the
same for every kind and are left out.

Times are medians over ``repeats`` runs after one warm-up run. Peak memory is measured in a fresh process per
(kind, length): how far one forward + backward raises the process's peak resident memory over what it held with the
inputs allocated (on CUDA: the allocator's peak). The window's blocked mask depends only on the shape and is built
once per shape, as in a model (the warm-up builds it).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from formerkit.bench.common import in_fresh_process, peak_rss_mb, reset_peak_rss, status_mb
from formerkit.errors import InputError
from formerkit.nn.attention import blockwise_attention
from formerkit.nn.linear_attention import linear_attention
from formerkit.nn.masks import CausalMask, SlidingWindowMask, prepare_blocked_mask

__all__ = ["KINDS", "attention_benchmark", "format_table", "measure", "plot"]

KINDS = ("full", "window", "linear")


def _attend(kind: str, window: int):
    """The attention function of a kind: (q, k, v) -> output, all [batch, heads, tokens, head_dim]."""
    if kind == "full":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kind == "linear":
        return lambda q, k, v: linear_attention(q, k, v, causal=True)

    def local(q, k, v):
        length = q.shape[2]
        if window >= length:  # no window to speak of: full attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        prepared = prepare_blocked_mask(CausalMask() & SlidingWindowMask(window), length, window,
                                        device=q.device)
        return blockwise_attention(q, k, v, prepared.blocked)

    return local


def _inputs(seq_len: int, heads: int, head_dim: int, dtype: torch.dtype, device, grad: bool):
    generator = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(1, heads, seq_len, head_dim, generator=generator, dtype=dtype).to(device).requires_grad_(grad)
            for _ in range(3)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, seq_len: int, *, window: int = 256, heads: int = 6, head_dim: int = 64, repeats: int = 3,
            dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """Forward and forward + backward times (ms) of one kind at one length, in this process."""
    attend = _attend(kind, window)
    q, k, v = _inputs(seq_len, heads, head_dim, dtype, device, grad=True)
    grad = torch.randn_like(q)
    times: dict[str, list[float]] = {"fwd_ms": [], "fwd_bwd_ms": []}
    for _ in range(repeats + 1):  # the first run warms up (and builds the window's mask)
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            attend(q, k, v)
            _sync(device)
            times["fwd_ms"].append(1000 * (time.perf_counter() - start))
        _sync(device)
        start = time.perf_counter()
        attend(q, k, v).backward(grad)
        _sync(device)
        times["fwd_bwd_ms"].append(1000 * (time.perf_counter() - start))
        q.grad = k.grad = v.grad = None
    return {"kind": kind, "seq_len": seq_len, **{key: statistics.median(values[1:]) for key, values in times.items()}}


def peak_memory(kind: str, seq_len: int, window: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: str) -> float:
    """The memory one forward + backward needs beyond its inputs (MB): on CUDA the allocator's peak; on a CPU the
    growth of the process's peak resident memory, reset just before (on Linux; elsewhere, run this in a fresh
    process)."""
    q, k, v = _inputs(seq_len, heads, head_dim, dtype, device, grad=True)
    grad = torch.randn_like(q)
    attend = _attend(kind, window)
    if kind == "window" and window < seq_len:
        # The shape's mask is built once and cached, as in a model: build it before measuring.
        prepare_blocked_mask(CausalMask() & SlidingWindowMask(window), seq_len, window, device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attend(q, k, v).backward(grad)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # With the peak reset (Linux), growth over what is resident now; elsewhere over the peak so far.
    base = status_mb("VmRSS") if reset_peak_rss() else peak_rss_mb()
    attend(q, k, v).backward(grad)
    return max(peak_rss_mb() - base, 0.0)


def _peak_in_fresh_process(kind: str, seq_len: int, window: int, heads: int, head_dim: int, dtype: torch.dtype,
                           device: str) -> float:
    """``peak_memory`` in a process of its own, so what earlier measurements left in the allocator (freed memory
    a process keeps) cannot hide or inflate this one."""
    code = ("import json, torch; from formerkit.bench.attention import peak_memory; "
            f"print(json.dumps(peak_memory({kind!r}, {seq_len}, {window}, {heads}, {head_dim}, "
            f"torch.{str(dtype).split('.')[-1]}, {device!r})))")
    return float(in_fresh_process(code, f"the memory of {kind} attention at {seq_len} tokens"))


def attention_benchmark(seq_lens=(1024, 4096, 16384), *, kinds=KINDS, window: int = 256, heads: int = 6,
                        head_dim: int = 64, repeats: int = 3, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", memory: bool = True, progress=None) -> list[dict]:
    """One record per (kind, length): ``{"kind", "seq_len", "fwd_ms", "fwd_bwd_ms", "peak_mb"}``."""
    for name, value in (("window", window), ("heads", heads), ("head_dim", head_dim), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"bench attention: {name} must be an integer >= 1, got {value!r}")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise InputError(f"bench attention: unknown kinds {unknown}; expected some of {list(KINDS)}")
    if not seq_lens or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in seq_lens):
        raise InputError(f"bench attention: sequence lengths must be integers >= 1, got {list(seq_lens)}")
    records = []
    for seq_len in seq_lens:
        for kind in kinds:
            if progress is not None:
                progress(f"{kind} attention at {seq_len} tokens")
            record = measure(kind, seq_len, window=window, heads=heads, head_dim=head_dim, repeats=repeats,
                             dtype=dtype, device=device)
            record["peak_mb"] = (_peak_in_fresh_process(kind, seq_len, window, heads, head_dim, dtype, device)
                                 if memory else None)
            records.append(record)
    return records


def format_table(records: list[dict]) -> str:
    """A Markdown table: one row per length and kind, with each kind's speed-up over full attention."""
    full = {r["seq_len"]: r for r in records if r["kind"] == "full"}
    lines = ["| tokens | kind | forward ms | fwd+bwd ms | peak MB | forward speed-up vs full | fwd+bwd speed-up |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for record in records:
        base = full.get(record["seq_len"])
        ratios = [f"{base[key] / record[key]:.1f}x" if base else "" for key in ("fwd_ms", "fwd_bwd_ms")]
        peak = "" if record.get("peak_mb") is None else f"{record['peak_mb']:.0f}"
        lines.append(f"| {record['seq_len']} | {record['kind']} | {record['fwd_ms']:.1f} | "
                     f"{record['fwd_bwd_ms']:.1f} | {peak} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str | Path) -> None:
    """Forward and forward + backward time against length, log-log, one line per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in zip(axes, ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward + backward")):
        for kind in dict.fromkeys(r["kind"] for r in records):
            points = sorted((r["seq_len"], r[key]) for r in records if r["kind"] == kind)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens")
        axis.set_ylabel("ms")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
