"""Load test of ``formerkit serve`` on loopback: the window batcher against the continuous-batching engine, in one run.

Starts two servers on a run directory (``--batching window`` and ``--batching continuous``, the same
``--max-running`` and ``--max-queued``), then for each client count keeps that many generation requests in flight for
``--seconds`` against each server in turn (the order alternates between repeats, and the figures are the medians
over repeats), and reports requests/s, generated tokens/s, p50/p99 latency and failed requests (any answer but 200,
a 429 included), then the continuous/window ratios. With ``--together`` both servers are loaded at the same time
(each by its own clients, one core each with ``--threads 1`` on two cores): on a machine whose load changes from
minute to minute, both then see the same conditions.

    python benchmarks/serve_load.py RUN_DIR [--clients 1,8,32,64] [--seconds 20] [--repeats 1] [--threads 1]
                                            [--together]

The workload is mixed: each request takes a prompt of 8, 32 or 96 characters (a slice of the standard library's
``json/decoder.py``, the kind of text the char-lm recipe learns) and asks for 8, 32 or 96 new tokens, greedy, drawn by
a generator seeded with the client and request number, so both servers see the same requests. Needs the ``serve``
extra and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

TEXT = Path(json.__file__).with_name("decoder.py").read_text()
PROMPT_CHARS = (8, 32, 96)
NEW_TOKENS = (8, 32, 96)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(run: str, port: int, batching: str, max_running: int, max_queued: int,
           threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    server = subprocess.Popen([sys.executable, "-m", "formerkit.cli", "serve", run, "--port", str(port),
                               "--batching", batching, "--max-running", str(max_running),
                               "--max-queued", str(max_queued)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the {batching} server did not start within 120 s")


def _request(client: int, count: int) -> dict:
    draw = random.Random(client * 100_003 + count)
    chars, new_tokens = draw.choice(PROMPT_CHARS), draw.choice(NEW_TOKENS)
    start = draw.randrange(len(TEXT) - chars)
    return {"prompt": TEXT[start:start + chars], "max_new_tokens": new_tokens, "temperature": 0}


async def _load(port: int, clients: int, seconds: float) -> dict:
    latencies, tokens, failures = [], 0, 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        count = 0
        while time.perf_counter() < stop_at:
            body = _request(index, count)
            began = time.perf_counter()
            try:
                response = await http.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=300)
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
    return {"requests_per_s": len(latencies) / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies
            else float("nan"), "failed": failures, "requests": len(latencies)}


async def _together(ports: list[int], clients: int, seconds: float) -> list[dict]:
    return await asyncio.gather(*(_load(port, clients, seconds) for port in ports))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-running", type=int, default=32, help="rows of both servers (default 32)")
    parser.add_argument("--max-queued", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the servers (default: as set)")
    parser.add_argument("--together", action="store_true", help="load both servers at the same time")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    servers = ("window", "continuous")
    print(f"{args.run}: prompts of {PROMPT_CHARS} characters, {NEW_TOKENS} greedy new tokens, {args.seconds:g} s "
          f"per client count and server, {args.repeats} repeat(s), max_running {args.max_running}, max_queued "
          f"{args.max_queued}, {os.cpu_count()} cores, server threads "
          f"{args.threads if args.threads is not None else os.environ.get('OMP_NUM_THREADS', 'default')}, "
          f"{'both servers loaded at once' if args.together else 'one server at a time'}\n")
    ports = {batching: _free_port() for batching in servers}
    started = {batching: _start(args.run, ports[batching], batching, args.max_running, args.max_queued,
                                args.threads) for batching in servers}
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for batching in servers:  # warm-up: the first passes of a process are slower
            asyncio.run(_load(ports[batching], 4, 2))
        print("| server | clients | requests/s | tokens/s | p50 ms | p99 ms | failed |")
        print("|---|---|---|---|---|---|---|")
        for clients in counts:
            for repeat in range(args.repeats):
                if args.together:
                    rows = asyncio.run(_together([ports[batching] for batching in servers], clients, args.seconds))
                    for batching, row in zip(servers, rows):
                        results.setdefault((batching, clients), []).append(row)
                    continue
                for batching in servers if repeat % 2 == 0 else servers[::-1]:
                    results.setdefault((batching, clients), []).append(
                        asyncio.run(_load(ports[batching], clients, args.seconds)))
            for batching in servers:
                rows = results[(batching, clients)]
                median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
                results[(batching, clients)] = [median]
                print(f"| {batching} | {clients} | {median['requests_per_s']:.1f} | {median['tokens_per_s']:.0f} | "
                      f"{median['p50_ms']:.0f} | {median['p99_ms']:.0f} | {sum(row['failed'] for row in rows)} |",
                      flush=True)
        print("\n| clients | tokens/s continuous / window | p99 continuous / window |\n|---|---|---|")
        for clients in counts:
            window, continuous = results[("window", clients)][0], results[("continuous", clients)][0]
            print(f"| {clients} | {continuous['tokens_per_s'] / window['tokens_per_s']:.2f}x | "
                  f"{continuous['p99_ms'] / window['p99_ms']:.2f}x |")
    finally:
        for server in started.values():
            server.send_signal(signal.SIGTERM)
        for server in started.values():
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
