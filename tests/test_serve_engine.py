"""formerkit serve over HTTP with the continuous-batching engine behind it: concurrent requests answer what each
prompt gives alone, a client that disconnects mid-stream frees its row, a full engine answers 429.

A real uvicorn server on loopback, in a thread of this process so the test can slow the model down (each forward
pass sleeps a little, so a stream is still running when its client goes away) and read the engine's counters.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from formerkit.serve import ModelService, create_app  # noqa: E402

pytestmark = pytest.mark.slow  # a run trained for it, a server

SLOW_FORWARD_S = 0.02


@pytest.fixture(scope="module")
def served(trained_run):
    run = trained_run("char-lm", **{"schedule.steps": 2, "eval.every": 2})
    service = ModelService(run, max_batch=3, max_queued=1)
    forward = service.model.forward

    def slowed(*args, **kwargs):
        time.sleep(SLOW_FORWARD_S)
        return forward(*args, **kwargs)

    service.model.forward = slowed
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield service, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def _wait_idle(base: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(f"{base}/v1/stats").json()
        if stats["running"] == 0 and stats["queued"] == 0:
            return stats
        time.sleep(0.02)
    pytest.fail(f"the engine is still busy: {stats}")


def test_concurrent_requests_answer_what_each_prompt_gives_alone(served):
    service, base = served
    prompts = ["def ", "import os\n", "x", "class Foo:\n    def", "return", "for i in"]
    bodies = [{"prompt": prompt, "max_new_tokens": 3 + 3 * index, "temperature": 0, "stream": index % 2 == 1}
              for index, prompt in enumerate(prompts)]

    async def ask(client: httpx.AsyncClient, body: dict) -> str:
        # Three rows and one queue place: a request refused with 429 is sent again as rows free up, so the later
        # requests join a running batch.
        while (response := await client.post(f"{base}/v1/generate", json=body, timeout=60)).status_code == 429:
            await asyncio.sleep(0.02)
        assert response.status_code == 200, response.text
        if not body["stream"]:
            return response.json()["text"]
        events = [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data:")]
        return "".join(event.get("text", "") for event in events)

    async def all_at_once():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(ask(client, body) for body in bodies))

    before = httpx.get(f"{base}/v1/stats").json()
    texts = asyncio.run(all_at_once())
    tokenizer = service.tokenizer
    for body, text in zip(bodies, texts):
        ids = tokenizer.encode(body["prompt"])
        alone = service.model.generate(torch.tensor(ids), body["max_new_tokens"], temperature=0)[len(ids):]
        assert text == tokenizer.decode(alone.tolist())
    stats = _wait_idle(base)
    assert stats["admitted"] - before["admitted"] == len(bodies)
    assert stats["steps"] - before["steps"] < sum(body["max_new_tokens"] for body in bodies)  # rows shared steps


def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    _, base = served
    before = _wait_idle(base)
    body = {"prompt": "def ", "max_new_tokens": 25, "temperature": 0, "stream": True}
    with httpx.Client() as client, client.stream("POST", f"{base}/v1/generate", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert "text" in json.loads(first[len("data: "):])
        assert httpx.get(f"{base}/v1/stats").json()["running"] == 1
    # Closed after one token of 25 (each step sleeps): the engine drops the sequence and frees its row.
    stats = _wait_idle(base)
    assert stats["cancelled"] - before["cancelled"] == 1
    assert stats["finished"] == before["finished"]
    assert stats["tokens"] - before["tokens"] < 25


def test_a_full_engine_answers_429_in_the_openai_error_shape(served):
    _, base = served
    _wait_idle(base)
    body = {"prompt": "def ", "max_new_tokens": 25, "temperature": 0, "stream": True}
    with httpx.Client() as client:
        streams = [client.stream("POST", f"{base}/v1/generate", json=body, timeout=60) for _ in range(3)]
        opened = [stream.__enter__() for stream in streams]  # the three rows
        # One queue place: a request that waits in it (its answer starts with its first token).
        waiting = threading.Thread(target=httpx.post, args=(f"{base}/v1/generate",),
                                   kwargs={"json": {**body, "stream": False}, "timeout": 60})
        waiting.start()
        try:
            assert all(response.status_code == 200 for response in opened)
            deadline = time.monotonic() + 10
            while httpx.get(f"{base}/v1/stats").json()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            # A stream is refused before it starts, and so is a completion, in the OpenAI error shape.
            assert client.post(f"{base}/v1/generate", json=body).status_code == 429
            refused = client.post(f"{base}/v1/completions",
                                  json={"model": httpx.get(f"{base}/v1/models").json()["data"][0]["id"],
                                        "prompt": "def ", "max_tokens": 4})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "engine_full"
            assert "max_queued 1" in refused.json()["error"]["message"]
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
            waiting.join(timeout=60)
    assert _wait_idle(base)["running"] == 0
