"""Long inputs: sliding-window attention against full causal attention, and linear attention over packed documents.

Window: one layer's queries, keys and values (``--heads`` x ``--head-dim``, the sizes ``formerkit bench attention``
uses), full causal SDPA and blockwise window attention (``--window``) at ``--length`` tokens, forward and forward +
backward, interleaved repeats, medians; window attention also at batch ``--batch`` (time per sequence), to show that
several sequences cost the same per token as one (with the minor page faults each forward takes per sequence;
``THP_MEM_ALLOC_ENABLE=1``, PyTorch's switch for 2 MB pages on CPU, removes most of them but made batch 4 twice as
slow at 2 threads on the 2026-12-05 host: bench/RESULTS.md). With ``--threads 1``
the times are the thread's CPU time, which a machine loaded by other processes inflates far less than wall time;
otherwise wall time.

Documents (``--documents``): causal linear attention under a DocumentMask of packed documents (300 to 1500 tokens
each) at several lengths, forward + backward: the document form (running sums restarting at each document) against
the dense quadratic form under the same mask (what a model ran before; up to 4K tokens: at 8K it needs several GB)
and the plain causal form (no documents) — the document form grows linearly with length, like the causal one.

    python benchmarks/long_attention.py [--length 16384] [--window 256] [--batch 4] [--threads 1] [--repeats 3]
    python benchmarks/long_attention.py --documents [--lengths 2048,4096,8192,16384] [--threads 1]
    python benchmarks/long_attention.py --profile [--threads 1]      # where the window's time goes
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from formerkit.nn.document_linear_attention import document_runs
from formerkit.nn.linear_attention import linear_attention, quadratic_form
from formerkit.nn.local_attention import blockwise_attention
from formerkit.nn.masks import CausalMask, SlidingWindowMask, prepare_blocked_mask


def clock(threads: int):
    return time.thread_time if threads == 1 else time.perf_counter


def windows(args) -> None:
    length, window, heads, dim = args.length, args.window, args.heads, args.head_dim
    now = clock(args.threads)

    def full(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def local(q, k, v):
        prepared = prepare_blocked_mask(CausalMask() & SlidingWindowMask(window), length, window)
        return blockwise_attention(q, k, v, prepared.blocked)

    generator = torch.Generator().manual_seed(0)
    inputs = {batch: [torch.randn(batch, heads, length, dim, generator=generator).requires_grad_()
                      for _ in range(3)] for batch in (1, args.batch)}
    runs = [("full", full, 1), ("window", local, 1), ("window", local, args.batch)]
    times: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up (and builds the window's mask)
        for name, attend, batch in runs:
            q, k, v = inputs[batch]
            with torch.no_grad():
                faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, now()
                attend(q, k, v)
                forward = now() - start
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            both_faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, now()
            attend(q, k, v).backward(torch.ones_like(q))
            both = now() - start
            both_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - both_faults
            q.grad = k.grad = v.grad = None
            if repeat:
                times.setdefault((name, batch, "fwd"), []).append(1000 * forward / batch)
                times.setdefault((name, batch, "fwd+bwd"), []).append(1000 * both / batch)
                times.setdefault((name, batch, "faults"), []).append(faults / batch)
                times.setdefault((name, batch, "faults fwd+bwd"), []).append(both_faults / batch)
    medians = {key: statistics.median(values) for key, values in times.items() if not key[2].startswith("faults")}
    faults = {key[:2]: statistics.median(values) for key, values in times.items() if key[2] == "faults"}
    both_faults = {key[:2]: statistics.median(values) for key, values in times.items() if key[2] == "faults fwd+bwd"}
    what = "thread CPU ms" if args.threads == 1 else "wall ms"
    print(f"{length} tokens, window {window}, {heads} heads x {dim}, {args.threads} thread(s), {what} per sequence")
    for (name, batch, kind), value in medians.items():
        print(f"  {name:6s} batch {batch}  {kind:7s} {value:9.1f}")
    # A tensor over glibc's largest mmap threshold (32 MB) is fresh pages on every call, each first touch a page
    # fault (the kernel zeroing 4 KB): batch 4's 100 MB outputs are, batch 1's 25 MB are reused heap.
    print("  minor page faults per sequence, forward: "
          + ", ".join(f"{name} batch {batch} {count:.0f}" for (name, batch), count in faults.items()))
    print("  minor page faults per sequence, forward + backward: "
          + ", ".join(f"{name} batch {batch} {count:.0f}" for (name, batch), count in both_faults.items()))
    for kind in ("fwd", "fwd+bwd"):
        ratio = medians[("full", 1, kind)] / medians[("window", 1, kind)]
        per_token = medians[("window", args.batch, kind)] / medians[("window", 1, kind)]
        print(f"  {kind}: full / window {ratio:.1f}x; window batch {args.batch} / batch 1 per sequence {per_token:.2f}")


def document_times(length: int, args) -> tuple[int, dict[str, float]]:
    """Packed documents of 300 to 1500 tokens over ``length`` tokens: (documents, median fwd+bwd ms by form)."""
    now = clock(args.threads)
    generator = torch.Generator().manual_seed(0)
    sizes, total = [], 0
    while total < length:
        size = min(int(torch.randint(300, 1500, (1,), generator=generator)), length - total)
        sizes.append(size)
        total += size
    ids = torch.cat([torch.full((size,), index) for index, size in enumerate(sizes)]).unsqueeze(0)
    q, k, v = (torch.randn(1, args.heads, length, args.head_dim, generator=generator).requires_grad_()
               for _ in range(3))
    grad = torch.randn_like(q)
    runs = document_runs(ids)
    kinds = {"document form": lambda: linear_attention(q, k, v, causal=True, document_runs=runs),
             "causal form, no documents": lambda: linear_attention(q, k, v, causal=True)}
    if length <= 4096:
        allowed = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril())
        kinds["dense quadratic form"] = lambda: quadratic_form(q, k, v, allowed.unsqueeze(1))
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats + 1):
        for name, run in kinds.items():
            start = now()
            run().backward(grad)
            if repeat:
                times.setdefault(name, []).append(1000 * (now() - start))
    return len(sizes), {name: statistics.median(values) for name, values in times.items()}


def documents(args) -> None:
    for length in (int(n) for n in args.lengths.split(",")):
        count, medians = document_times(length, args)
        cells = "; ".join(f"{name} {value:.0f} ms" for name, value in medians.items())
        print(f"{length} tokens, {count} documents, fwd+bwd: {cells}", flush=True)


def profile(args) -> None:
    """torch.profiler tables of the window's forward and forward + backward (self CPU time by operation)."""
    from torch.profiler import profile as torch_profile

    length, window = args.length, args.window
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, length, args.head_dim, generator=generator).requires_grad_()
               for _ in range(3))
    prepared = prepare_blocked_mask(CausalMask() & SlidingWindowMask(window), length, window)
    blockwise_attention(q, k, v, prepared.blocked).sum().backward()  # warm-up
    for name, backward in (("forward", False), ("forward + backward", True)):
        with torch_profile() as table:
            if backward:
                blockwise_attention(q, k, v, prepared.blocked).backward(torch.ones_like(q))
            else:
                with torch.no_grad():
                    blockwise_attention(q, k, v, prepared.blocked)
        print(f"window {name}, {length} tokens, window {window}:")
        print(table.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--documents", action="store_true", help="linear attention over packed documents")
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the window attention")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    (documents if args.documents else profile if args.profile else windows)(args)


if __name__ == "__main__":
    main()
