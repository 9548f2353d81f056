"""Load test of ``formerkit serve`` on loopback: a bounded number of concurrent clients for a bounded time.

Starts the server on a run directory (twice: with batching, and with ``--max-batch 1`` for comparison), then for each
client count keeps that many generation requests in flight for ``--seconds`` and reports requests/s, generated
tokens/s, p50/p99 latency and failed requests.

    python benchmarks/serve_load.py RUN_DIR [--clients 1,8,32] [--seconds 20] [--max-new-tokens 32]

Needs the ``serve`` extra and httpx. Every prompt is a different slice of a fixed text, greedy decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

TEXT = ("def load(path):\n    with open(path) as handle:\n        return handle.read()\n\nclass Store:\n"
        "    def __init__(self):\n        self.items = {}\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(run: str, port: int, max_batch: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "formerkit.cli", "serve", run, "--port", str(port),
                               "--max-batch", str(max_batch)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start within 60 s")


async def _load(port: int, clients: int, seconds: float, new_tokens: int) -> dict:
    latencies, tokens, failures = [], 0, 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        count = 0
        while time.perf_counter() < stop_at:
            start = (index * 7 + count * 13) % (len(TEXT) - 20)
            body = {"prompt": TEXT[start:start + 12], "max_new_tokens": new_tokens, "temperature": 0}
            began = time.perf_counter()
            try:
                response = await http.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=120)
                if response.status_code == 200:
                    tokens += response.json()["num_tokens"]
                    latencies.append(time.perf_counter() - began)
                else:
                    failures += 1
            except httpx.HTTPError:
                failures += 1
            count += 1

    began = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {"clients": clients, "requests_per_s": len(latencies) / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies
            else float("nan"), "failed": failures, "requests": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    print(f"{args.run}: {args.max_new_tokens} greedy tokens per request, {args.seconds:g} s per client count, "
          f"{os.cpu_count()} cores\n")
    print("| server | clients | requests/s | tokens/s | p50 ms | p99 ms | failed |")
    print("|---|---|---|---|---|---|---|")
    for max_batch in (16, 1):
        port = _free_port()
        server = _start(args.run, port, max_batch)
        try:
            for clients in counts:
                row = asyncio.run(_load(port, clients, args.seconds, args.max_new_tokens))
                label = "batching (max 16)" if max_batch > 1 else "no batching (max 1)"
                print(f"| {label} | {clients} | {row['requests_per_s']:.1f} | {row['tokens_per_s']:.0f} | "
                      f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['failed']} |", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
