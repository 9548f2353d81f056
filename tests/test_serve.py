"""formerkit serve: every endpoint, every refusal, streaming, and batched answers equal to one-at-a-time answers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
import httpx  # noqa: E402

import formerkit  # noqa: E402
import formerkit.serve  # noqa: E402
from formerkit.serve import ModelService, create_app, example_call  # noqa: E402

pytestmark = pytest.mark.slow  # every test serves a run trained for it

TWO_STEPS = {"schedule.steps": 2, "eval.every": 2}


@pytest.fixture(scope="module")
def lm_run(trained_run):
    return trained_run("char-lm", **TWO_STEPS)


@pytest.fixture(scope="module")
def image_run(trained_run):
    return trained_run("cct-digits", **TWO_STEPS)


def _call(app, requests: list[tuple[str, str, object]], *, concurrent: bool = True):
    """Sends (method, path, json body or raw bytes) requests, all at once or one after another; returns responses."""

    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            def send(method, path, body):
                if isinstance(body, bytes):
                    return client.request(method, path, content=body, headers={"content-type": "application/json"})
                return client.request(method, path, json=body)

            if concurrent:
                return await asyncio.gather(*(send(*request) for request in requests))
            return [await send(*request) for request in requests]

    return asyncio.run(run())


def test_health_model_and_openapi(lm_run):
    app = create_app(ModelService(lm_run))
    health, model, schema = _call(app, [("GET", "/health", None), ("GET", "/v1/model", None),
                                        ("GET", "/openapi.json", None)])
    assert health.json() == {"status": "ok"}
    info = model.json()
    parameters = sum(parameter.numel() for parameter in formerkit.load(lm_run / "model").parameters())
    assert info["task"] == "causal_lm" and info["context"] == 32 and info["parameters"] == parameters
    assert info["config"]["width"] == 32
    assert {"/v1/generate", "/v1/classify", "/health", "/v1/model"} <= set(schema.json()["paths"])


def test_concurrent_greedy_requests_answer_as_one_at_a_time(lm_run):
    # (Whether they share a batch is the engine's business: tests/generation/test_engine.py.)
    service = ModelService(lm_run, max_batch=8, wait_ms=50)
    app = create_app(service)
    prompts = ["def ", "import os\n", "x", "class Foo:\n    def", "return"]
    requests = [("POST", "/v1/generate", {"prompt": p, "max_new_tokens": 4 + i, "temperature": 0})
                for i, p in enumerate(prompts)]
    alone = _call(app, requests, concurrent=False)
    together = _call(app, requests, concurrent=True)
    for single, batched, (_, _, body) in zip(alone, together, requests):
        assert single.status_code == batched.status_code == 200
        assert single.json() == batched.json()
        assert batched.json()["num_tokens"] == body["max_new_tokens"]
    # And what the server answers is the model's own greedy continuation.
    tokenizer = service.tokenizer
    ids = tokenizer.encode(prompts[1])
    expected = service.model.generate(torch.tensor([ids]), 5, temperature=0)[0, len(ids):].tolist()
    assert together[1].json()["text"] == tokenizer.decode(expected)


def test_streaming_sends_the_same_text_as_events(lm_run):
    app = create_app(ModelService(lm_run))
    body = {"prompt": "def ", "max_new_tokens": 6, "temperature": 0}
    plain, streamed = _call(app, [("POST", "/v1/generate", body),
                                  ("POST", "/v1/generate", {**body, "stream": True})], concurrent=False)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == {"done": True, "num_tokens": 6}
    assert "".join(event["text"] for event in events[:-1]) == plain.json()["text"]


def test_bad_generation_requests_get_a_4xx_that_says_what_is_wrong(lm_run):
    app = create_app(ModelService(lm_run, max_new_tokens_limit=20), max_body_bytes=2000)
    responses = _call(app, [
        ("POST", "/v1/generate", b"{not json"),
        ("POST", "/v1/generate", {"max_new_tokens": 4}),
        ("POST", "/v1/generate", {"prompt": "x" * 40, "max_new_tokens": 4}),
        ("POST", "/v1/generate", {"prompt": "x", "max_new_tokens": 21}),
        ("POST", "/v1/generate", {"prompt": "x", "max_new_tokens": 0}),
        ("POST", "/v1/generate", {"prompt": "x", "temperature": -1}),
        ("POST", "/v1/generate", {"prompt": "x", "colour": "blue"}),
        ("POST", "/v1/generate", {"prompt": "x" * 5000}),
        ("POST", "/v1/classify", {"image": [[0, 1], [2, 3]]}),
        ("GET", "/health", None),
    ], concurrent=False)
    codes = [r.status_code for r in responses]
    assert codes == [422, 422, 400, 400, 422, 422, 422, 413, 400, 200]
    errors = [r.json()["error"] for r in responses[:-1]]
    assert "JSON" in errors[0] or "json" in errors[0]
    assert "prompt" in errors[1]
    assert "context" in errors[2]
    assert "at most 20" in errors[3]
    assert "max_new_tokens" in errors[4] and "temperature" in errors[5] and "colour" in errors[6]
    assert "limit of 2000 bytes" in errors[7]
    assert "/v1/generate" in errors[8]


def _png(pixels: torch.Tensor) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.to(torch.uint8).numpy(), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_classify_takes_raw_lists_and_pngs_and_preprocesses_as_in_training(image_run):
    from sklearn.datasets import load_digits

    service = ModelService(image_run)
    app = create_app(service)
    digits = load_digits()
    raw = digits.images[:3]  # scikit-learn's 0-16 values, 8x8
    requests = [("POST", "/v1/classify", {"image": image.tolist()}) for image in raw]
    requests.append(("POST", "/v1/classify", {"image": _png(torch.tensor(raw[0] * 255 / 16).round())}))
    responses = _call(app, requests)
    assert all(r.status_code == 200 for r in responses)
    pre = service.preprocessing
    inputs = (torch.tensor(raw, dtype=torch.float32).unsqueeze(1) / 16 - pre["mean"][0]) / pre["std"][0]
    with torch.no_grad():
        expected = service.model(inputs).softmax(-1)
    for response, row in zip(responses, expected):
        body = response.json()
        assert body["probabilities"] == pytest.approx(row.tolist(), abs=1e-5)
        assert body["label"] == pre["classes"][int(row.argmax())]
    # The PNG (0-255, rounded) reads as the same image up to rounding.
    assert responses[3].json()["probabilities"] == pytest.approx(expected[0].tolist(), abs=2e-2)
    bad = _call(app, [("POST", "/v1/classify", {"image": "not base64!"}),
                      ("POST", "/v1/classify", {"image": [[[0.0] * 8] * 8] * 3}),
                      ("POST", "/v1/classify", {"image": [1, 2, 3]}),
                      ("POST", "/v1/generate", {"prompt": "x"})], concurrent=False)
    assert [r.status_code for r in bad] == [400, 400, 400, 400]
    assert "PNG" in bad[0].json()["error"] and "channel" in bad[1].json()["error"]
    assert "[C][H][W]" in bad[2].json()["error"] and "/v1/classify" in bad[3].json()["error"]
    _assert_example_answers(service, app, "/v1/classify")


def test_forecast_takes_recent_values_and_answers_as_the_predictor_does(trained_run, lm_run):
    from formerkit.data.files import demo_series_csv

    run = trained_run("timeseries-forecast")
    service = ModelService(run, max_batch=4, wait_ms=50)
    app = create_app(service)
    rows = [line.split(",") for line in demo_series_csv().splitlines()[1:]]
    series = [[float(row[1]), float(row[2])] for row in rows]
    recent = [series[end - 40:end] for end in (100, 500, 900)]  # more than the window (32): the last 32 count
    info, *answers = _call(app, [("GET", "/v1/model", None)]
                           + [("POST", "/v1/forecast", {"values": values}) for values in recent])
    assert {key: info.json()[key] for key in ("task", "columns", "window", "horizon")} == {
        "task": "forecast", "columns": ["load", "temperature"], "window": 32, "horizon": 8}
    predictor = formerkit.load_run(run)
    for response, values in zip(answers, recent):
        assert response.status_code == 200 and response.json()["columns"] == ["load", "temperature"]
        expected = predictor(values)
        assert torch.tensor(response.json()["forecast"], dtype=torch.float64) == pytest.approx(expected, abs=1e-4)
    bad = _call(app, [("POST", "/v1/forecast", {"values": recent[0][:10]}),
                      ("POST", "/v1/forecast", {"values": [1.0] * 40}),
                      ("POST", "/v1/forecast", {"values": [["a", "b"]] * 40}),
                      ("POST", "/v1/forecast", {"series": recent[0]}),
                      ("POST", "/v1/classify", {"image": [[0, 1], [2, 3]]})], concurrent=False)
    assert [r.status_code for r in bad] == [400, 400, 400, 422, 400]
    errors = [r.json()["error"] for r in bad]
    assert errors[0] == "values: the model forecasts from the last 32 steps, got 10"
    assert errors[1] == "values: expected [steps][2] values (columns load, temperature), got shape [40]"
    assert errors[2].startswith("values: expected numbers [steps][columns]")
    assert "values" in errors[3] and "series" in errors[3]
    assert errors[4] == "this model is a forecast model: use /v1/forecast"
    _assert_example_answers(service, app, "/v1/forecast")
    language = _call(create_app(ModelService(lm_run)), [("POST", "/v1/forecast", {"values": [[1.0]]})])[0]
    assert language.status_code == 400 and language.json()["error"] == "this model is a causal_lm model: use " \
                                                                          "/v1/generate"


def _assert_example_answers(service: ModelService, app, path: str) -> None:
    """The call ``formerkit serve`` prints for this model goes to ``path`` and is answered (200)."""
    line = example_call(service, "http://127.0.0.1:8000")
    assert line.startswith(f"curl -s http://127.0.0.1:8000{path} ")
    body = json.loads(shlex.split(line)[-1])
    assert _call(app, [("POST", path, body)])[0].status_code == 200


def test_a_failing_request_answers_500_and_the_server_goes_on(lm_run, monkeypatch):
    service = ModelService(lm_run)
    app = create_app(service)
    calls = {"n": 0}
    original = service.model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(service.model, "forward", flaky)  # fails in the engine's thread, in the first prefill
    body = {"prompt": "def ", "max_new_tokens": 3, "temperature": 0}
    first, second = _call(app, [("POST", "/v1/generate", body)] * 2, concurrent=False)
    assert first.status_code == 500 and "out of memory" in first.json()["error"]
    assert second.status_code == 200 and second.json()["num_tokens"] == 3


class _Lines:
    """The lines a subprocess writes to one of its pipes, read on a thread as they come, so that a test can wait for
    one with a deadline."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, process: subprocess.Popen, timeout: float) -> re.Match:
        """The first line matching ``pattern``; fails, with every line seen, if the process ends or ``timeout``
        seconds pass before one comes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if found := re.search(pattern, line):
                        return found
                if process.poll() is not None or time.monotonic() > deadline:
                    break
                self._changed.wait(timeout=0.1)
        what = f"ended with exit code {process.returncode}" if process.poll() is not None else f"ran {timeout} s"
        pytest.fail(f"no line matching {pattern!r}: the server {what}; it wrote:\n" + "\n".join(self.lines[-50:]))


def test_sigterm_lets_the_request_in_flight_finish_then_the_server_exits(lm_run):
    # A request waits up to a second for others to share its batch: SIGTERM comes while it is in flight.
    server = subprocess.Popen([sys.executable, "-m", "formerkit.cli", "serve", str(lm_run), "--port", "0",
                               "--wait-ms", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        log = _Lines(server.stderr)
        # uvicorn's "listening" line, which names the port it chose.
        port = int(log.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", server, timeout=120).group(1))
        body = json.dumps({"prompt": "def ", "max_new_tokens": 20, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            # The headers alone, asking to be told when the body is wanted: the "100 Continue" answer says the
            # server has read them and the endpoint is waiting for the body, so the request is in flight.
            connection.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            interim = _read_until(connection, b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            server.send_signal(signal.SIGTERM)
            connection.sendall(body)
            status, response = _read_response(connection)
        # uvicorn finishes the requests in flight, then re-raises the signal it caught (so: killed by SIGTERM).
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        assert status == 200 and response["num_tokens"] == 20
    finally:
        if server.poll() is None:
            server.kill()


def _read_until(connection: socket.socket, end: bytes) -> bytes:
    data = b""
    while end not in data:
        chunk = connection.recv(4096)
        if not chunk:
            pytest.fail(f"the connection closed after {data!r}")
        data += chunk
    return data


def _read_response(connection: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of an HTTP/1.1 response (uvicorn closes the connection after it while shutting
    down; the body is read to its Content-Length either way)."""
    head, _, rest = _read_until(connection, b"\r\n\r\n").partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        chunk = connection.recv(4096)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), json.loads(rest)


def test_a_seeded_sample_is_the_same_alone_or_among_other_requests(lm_run):
    app = create_app(ModelService(lm_run, max_batch=8, wait_ms=50))
    seeded = {"prompt": "def ", "max_new_tokens": 8, "temperature": 1.0, "seed": 7}
    others = [("POST", "/v1/generate", {"prompt": p, "max_new_tokens": 8, "temperature": 1.0}) for p in "abc"]
    alone = _call(app, [("POST", "/v1/generate", seeded)])[0]
    crowded = _call(app, [*others, ("POST", "/v1/generate", seeded)])[-1]
    assert alone.status_code == crowded.status_code == 200 and alone.json() == crowded.json()
