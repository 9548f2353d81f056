"""``formerkit serve``: a trained model behind HTTP (FastAPI + uvicorn, the ``[serve]`` extra).

Endpoints: ``GET /health``; ``GET /v1/model`` (config, parameters, task); ``POST /v1/generate`` (language models;
``"stream": true`` answers with server-sent events, one per new piece of text); ``POST /v1/classify`` (image
classifiers: a base64 PNG or a nested list [C][H][W] / [H][W] in the data source's raw units, which the server scales,
resizes and normalizes as in training); ``POST /v1/forecast`` (forecasters: the recent values of the series,
[steps][columns] or [steps] for one column, in the series' own units; answers the next ``horizon`` steps in the same
units); ``/openapi.json``.

Concurrent requests are batched: each waits at most ``wait_ms`` for others to join it, up to ``max_batch``, then
the batch runs in one forward pass (generation: prompts of different lengths left-padded, the padding masked, each
row stopping on its own; a batch groups the requests with the same sampling settings). The model runs in one worker
thread, so requests never interleave inside it; a request that fails answers with an error and the server goes on.
Streaming requests run one at a time on the same worker. Bodies larger than ``max_body_bytes`` are refused before
they are read whole. uvicorn drains in-flight requests on SIGTERM before exiting.
"""


import asyncio
import base64
import binascii
import concurrent.futures
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from formerkit.bench.common import parameter_count
from formerkit.data import load_tokenizer
from formerkit.errors import CheckpointError, InputError
from formerkit.runs import (
    denormalize_forecast,
    generate_text,
    generation_defaults,
    image_input,
    load_run_model,
    model_dir,
    prompt_ids,
    run_objective,
    series_input,
    stop_ids,
)

__all__ = ["ServeError", "create_app", "serve"]


ROUTES = {"causal_lm": "/v1/generate", "classification": "/v1/classify", "forecast": "/v1/forecast"}


class ServeError(Exception):
    """A request the server refuses: an HTTP status and a message saying what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Job:
    kind: str  # "generate", "classify" or "forecast"
    key: tuple  # requests with equal keys may share a batch
    payload: Any
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]


class ModelService:
    """The model of a run directory with its tokenizer or preprocessing, and the batching worker."""

    def __init__(self, target: str | Path, *, max_batch: int = 16, wait_ms: float = 5.0,
                 max_new_tokens_limit: int = 1024):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"serve: max_batch must be an integer >= 1, got {max_batch!r}")
        if not 0 <= wait_ms <= 1000:
            raise InputError(f"serve: wait_ms must lie in [0, 1000], got {wait_ms!r}")
        self.model, self.recipe, self.extra = load_run_model(target, imported=True)
        self.config = self.model.config
        self.task = run_objective(self.recipe, self.extra)
        self.tokenizer, self.eos_ids = None, ()
        if self.task == "causal_lm":
            path = model_dir(target) / "tokenizer.json"
            if not path.exists():
                raise CheckpointError(f"{path}: missing; a language model is served with the tokenizer of its run")
            self.tokenizer = load_tokenizer(path)
            # A converted checkpoint's end-of-sequence tokens end every generation.
            self.eos_ids = tuple(generation_defaults(self.extra, self.tokenizer)["stop_tokens"] or ())
        elif self.task not in ROUTES:
            what = f"this run trained {self.task!r}" if self.recipe is not None else (
                "this converted checkpoint is not a decoder language model")
            raise CheckpointError(f"{target}: serve answers language models (generate), classifiers (classify) and "
                                  f"forecasters (forecast); {what}")
        self.preprocessing = self.extra.get("preprocessing") or {}
        if self.task == "classification" and self.preprocessing.get("kind") != "image":
            raise CheckpointError(f"{target}: classify takes images; this classifier's data is "
                                  f"{self.preprocessing.get('kind')!r}")
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.max_new_tokens_limit = max_new_tokens_limit
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="formerkit-model")
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # batches run, for whoever watches the server

    # ----- describing the model -----

    def describe(self) -> dict:
        info = {"task": self.task, "parameters": parameter_count(self.model), "config": self.config.to_dict(),
                "max_batch": self.max_batch}
        if self.task == "classification":
            info["classes"] = self.preprocessing.get("classes")
            info["image_size"] = self.preprocessing.get("image_size")
            info["in_channels"] = self.preprocessing.get("in_channels")
        elif self.task == "forecast":
            for key in ("columns", "window", "horizon"):
                info[key] = self.preprocessing[key]
        else:
            info["context"] = self.config.max_seq_len
        return info

    # ----- requests -> jobs -----

    def check_task(self, task: str) -> None:
        if self.task != task:
            raise ServeError(400, f"this model is a {self.task} model: use {ROUTES[self.task]}")

    def generation_job(self, body: dict) -> _Job:
        self.check_task("causal_lm")
        ids = prompt_ids(self.tokenizer, body["prompt"])
        context = self.config.max_seq_len
        count = body["max_new_tokens"]
        if count > self.max_new_tokens_limit:
            raise ServeError(400, f"max_new_tokens: at most {self.max_new_tokens_limit}, got {count}")
        if context is not None and len(ids) + count > context + 1:
            raise ServeError(400, f"prompt: {len(ids)} tokens + max_new_tokens {count} exceed the model's context "
                                  f"of {context} tokens (+1); shorten the prompt or ask for fewer tokens")
        try:
            stop = stop_ids(self.tokenizer, body.get("stop"), name="stop")
        except InputError as error:
            raise ServeError(400, str(error)) from None
        key = (body["temperature"], body.get("top_k"), body.get("top_p"), tuple(stop or ()) + self.eos_ids)
        if body.get("seed") is not None and body["temperature"] > 0:
            key += (object(),)  # a seeded sample is reproducible only alone: it shares no batch
        return _Job("generate", key, {"ids": ids, "count": count, "stop": stop, "seed": body.get("seed")})

    def classification_job(self, body: dict) -> _Job:
        self.check_task("classification")
        return _Job("classify", ("classify",), self.prepare_image(body["image"]))

    def forecast_job(self, body: dict) -> _Job:
        self.check_task("forecast")
        try:
            return _Job("forecast", ("forecast",), series_input(body["values"], self.preprocessing))
        except InputError as error:
            raise ServeError(400, str(error)) from None

    def prepare_image(self, image) -> torch.Tensor:
        """Raw image (base64 PNG or nested list in the data source's units) -> the model's input [C, H, W]."""
        if isinstance(image, str):
            try:
                from PIL import Image

                image = Image.open(io.BytesIO(base64.b64decode(image, validate=True)))
                image.load()
            except (binascii.Error, ValueError, OSError) as error:
                raise ServeError(400, f"image: not a base64-encoded PNG ({error})") from None
        try:
            return image_input(image, self.preprocessing)
        except InputError as error:
            raise ServeError(400, str(error)) from None

    # ----- batching -----

    async def submit(self, job: _Job):
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop:  # the first request (of this event loop) starts the worker
            self.loop, self.queue = loop, asyncio.Queue()
            self.worker = loop.create_task(self._batch_loop())
        job.future = loop.create_future()
        await self.queue.put(job)
        return await job.future

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: list[_Job] = []
        while True:
            first = waiting.pop(0) if waiting else await self.queue.get()
            batch = [first]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch:
                # Jobs already waiting with the same key join first; then new arrivals until the deadline.
                same = [job for job in waiting if job.key == first.key][: self.max_batch - len(batch)]
                for job in same:
                    waiting.remove(job)
                batch.extend(same)
                if len(batch) >= self.max_batch:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                (batch if job.key == first.key else waiting).append(job)
            try:
                results = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as error:  # the batch fails, the server goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            self.batches += 1
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _run(self, batch: list[_Job]) -> list[dict]:
        with torch.inference_mode():
            if batch[0].kind == "forecast":
                output = self.model(torch.stack([job.payload for job in batch])).float()
                forecasts = denormalize_forecast(output, self.preprocessing)
                return [{"forecast": forecast.tolist(), "columns": self.preprocessing["columns"]}
                        for forecast in forecasts]
            if batch[0].kind == "classify":
                logits = self.model(torch.stack([job.payload for job in batch])).float()
                probabilities = logits.softmax(dim=-1)
                classes = self.preprocessing.get("classes")
                results = []
                for row in probabilities:
                    best = int(row.argmax())
                    label = classes[best] if classes else best
                    results.append({"label": label, "probabilities": [round(float(p), 6) for p in row]})
                return results
            return self._generate(batch)

    def _generate(self, batch: list[_Job]) -> list[dict]:
        temperature, top_k, top_p, stop = batch[0].key[:4]
        longest = max(len(job.payload["ids"]) for job in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, job in enumerate(batch):  # left padding: the real tokens last
            prompt = job.payload["ids"]
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        count = max(job.payload["count"] for job in batch)
        seed = batch[0].payload["seed"] if len(batch) == 1 else None
        stop_tokens = list(stop) or None
        out = self.model.generate(ids, count, attention_mask=mask, temperature=temperature, top_k=top_k,
                                  top_p=top_p, stop_tokens=stop_tokens, seed=seed)
        results = []
        for row, job in enumerate(batch):
            new = out[row, longest:longest + job.payload["count"]].tolist()
            ends = [index for index, token in enumerate(new) if token in (stop_tokens or ())]
            if ends:
                new = new[: ends[0] + 1]
            results.append({"text": self.tokenizer.decode(new), "num_tokens": len(new)})
        return results

    # ----- streaming -----

    def stream_pieces(self, job: _Job, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Runs in the worker thread: puts the text of each new token on ``queue``, then None."""
        temperature, top_k, top_p, stop = job.key[:4]
        try:
            with torch.inference_mode():
                for piece in generate_text(self.model, self.tokenizer, job.payload["ids"],
                                           max_new_tokens=job.payload["count"], temperature=temperature,
                                           top_k=top_k, top_p=top_p, seed=job.payload["seed"],
                                           stop_tokens=list(stop) or None):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)


class _BodyLimit:
    """ASGI middleware: a body declared larger than ``limit`` is refused (413) before any of it is read; one sent
    without a length is counted as it arrives and refused once past the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = json.dumps({"error": f"request body of {int(declared)} bytes exceeds the limit of {self.limit} "
                                        "bytes"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ServeError(413, f"request body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(service: ModelService, *, max_body_bytes: int = 8 * 2**20):
    """The FastAPI application over a ``ModelService``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str
        max_new_tokens: int = Field(64, ge=1)
        temperature: float = Field(1.0, ge=0.0)
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        stop: str | None = None
        stream: bool = False
        seed: int | None = None

    class GenerateResponse(BaseModel):
        text: str
        num_tokens: int

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        image: str | list

    class ClassifyResponse(BaseModel):
        label: int | str
        probabilities: list[float]

    class ForecastRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        values: list

    class ForecastResponse(BaseModel):
        forecast: list[list[float]]
        columns: list[str]

    app = FastAPI(title="formerkit", description=f"A formerkit {service.task} model")

    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ServeError)
    async def refused(request: Request, error: ServeError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        details = [f"{'.'.join(str(p) for p in item['loc'] if p != 'body') or 'body'}: {item['msg']}"
                   for item in error.errors()]
        return JSONResponse({"error": "; ".join(details) or "malformed request"}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):
        return JSONResponse({"error": f"the request failed: {type(error).__name__}: {error}"}, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info():
        return service.describe()

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(request: GenerateRequest):
        job = service.generation_job(request.model_dump())
        if not request.stream:
            return await service.submit(job)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        loop.run_in_executor(service.executor, service.stream_pieces, job, loop, queue)

        async def events():
            count = 0
            while (piece := await queue.get()) is not None:
                count += 1
                yield f"data: {json.dumps({'text': piece})}\n\n"
            yield f"data: {json.dumps({'done': True, 'num_tokens': count})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(request: ClassifyRequest):
        return await service.submit(service.classification_job(request.model_dump()))

    @app.post("/v1/forecast", response_model=ForecastResponse)
    async def forecast(request: ForecastRequest):
        return await service.submit(service.forecast_job(request.model_dump()))

    return app


def serve(target: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          wait_ms: float = 5.0, max_body_bytes: int = 8 * 2**20) -> None:
    """Serves a run (blocking) until SIGTERM or Ctrl-C, which let in-flight requests finish first."""
    try:
        import uvicorn
    except ImportError as error:
        raise InputError("formerkit serve needs FastAPI and uvicorn: pip install 'formerkit[serve]'") from error
    service = ModelService(target, max_batch=max_batch, wait_ms=wait_ms)
    app = create_app(service, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
