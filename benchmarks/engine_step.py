"""The continuous-batching engine's decode steps through ``LeanStep`` against the general forward: generated tokens
per second of ``formerkit.generation.engine.Engine`` driven by hand (no server, no HTTP), the bench LM's layout
(nanoGPT shakespeare-char: 6 layers, width 384, vocab 65; random weights), ``--clients`` requests of an 8-token prompt
and ``--tokens`` greedy tokens each, all submitted at once; the two paths alternate ``--repeats`` times (medians).

    python benchmarks/engine_step.py [--clients 1 4 16] [--tokens 100] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import formerkit
from formerkit.generation.engine import Engine
from formerkit.generation.lean_step import LeanStep
from formerkit.generation.requests import TokenRequest


def tokens_per_second(model, clients: int, tokens: int, lean: bool) -> float:
    build = LeanStep.build
    if not lean:
        LeanStep.build = staticmethod(lambda *args: None)
    try:
        engine = Engine(model, max_running=max(clients, 1), max_queued=clients)
        generator = torch.Generator().manual_seed(1)
        tickets = [engine.submit(TokenRequest(tuple(torch.randint(1, 65, (8,), generator=generator).tolist()),
                                              tokens)) for _ in range(clients)]
        start = time.perf_counter()
        while not all(ticket.done for ticket in tickets):
            engine.step()
        return clients * tokens / (time.perf_counter() - start)
    finally:
        LeanStep.build = build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = formerkit.create_model("nanogpt_shakespeare_char").eval()
    tokens_per_second(model, 2, 4, True)  # warm-up
    for clients in args.clients:
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for lean in (True, False):
                rates[lean].append(tokens_per_second(model, clients, args.tokens, lean))
        lean, general = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"{clients:3d} clients x {args.tokens} tokens, {torch.get_num_threads()} threads: lean step "
              f"{lean:7.0f} tok/s, general forward {general:7.0f} tok/s (x{lean / general:.2f})", flush=True)


if __name__ == "__main__":
    main()
