"""``formerkit serve``: a trained model behind HTTP (FastAPI + uvicorn, the ``[serve]`` extra).

Endpoints: ``GET /health``; ``GET /v1/model`` (config, parameters, task); ``POST /v1/generate`` (language models;
``"stream": true`` answers with server-sent events, one per new token); ``POST /v1/classify`` (image classifiers: a
base64 PNG or a nested list [C][H][W] / [H][W] in the data source's raw units, which the server scales, resizes and
normalizes as in training); ``POST /v1/forecast`` (forecasters: the recent values of the series, [steps][columns] or
[steps] for one column, in the series' own units; answers the next ``horizon`` steps in the same units);
``/openapi.json``; and the OpenAI-compatible API (``formerkit.openai_api``): ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (language models), ``POST /v1/embeddings`` (encoders over
tokens), ``POST /v1/images/generations`` (image generators: a diffusion or masked-generation run draws a class as
base64 PNGs). Every endpoint reads its body as JSON whatever content type the client declares (curl's ``-d`` says form).

Generation goes through one seam: ``ModelService.token_events(TokenRequest)`` yields a ``TokenEvent`` per new token
(``formerkit.generation.requests``); every generation endpoint is built on it. Behind it runs an ``Engine``
(``formerkit.generation.engine``) in a thread of its own, the model's thread for language models: with
``batching="continuous"`` (the default) it steps every running sequence one token at a time and admits new requests
between steps, streamed or not; with ``batching="window"`` it schedules as the earlier window batcher did (a batch
gathered within ``wait_ms`` runs until its longest row ends). At most ``max_running`` sequences run and
``max_queued`` wait; past that a request is refused with 429. A consumer that stops iterating (a client that
disconnects) cancels its sequence and frees its row; ``GET /v1/stats`` shows the engine's counters. A model the engine
cannot batch (``Engine`` says why) is decoded one sequence at a time (``OneSequenceAtATime``; both sources in
``formerkit.serve_sequences``). Classification and
forecasting requests are batched: each waits at most ``wait_ms`` for others to join it, up to ``max_batch``, then the
batch runs in one forward pass. The model runs in one thread, so requests never interleave inside it; a request that
fails answers with an error and the server goes on. Bodies larger than ``max_body_bytes`` are refused before they are
read whole. uvicorn drains in-flight requests on SIGTERM before exiting.
"""


import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import io
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from formerkit.bench.common import parameter_count
from formerkit.data import load_tokenizer
from formerkit.errors import CheckpointError, InputError, ServeError
from formerkit.generation.engine import Engine
from formerkit.generation.requests import TokenEvent, TokenRequest
from formerkit.generation.sampling import SamplingConfig
from formerkit.generation.text import TextPieces
from formerkit.runs import (
    denormalize_forecast,
    generation_defaults,
    image_input,
    load_draft,
    load_run_model,
    model_dir,
    prompt_ids,
    run_objective,
    series_input,
    stop_ids,
)
from formerkit.sample import generates_images, image_generator
from formerkit.serve_http import BodyLimit, error_body, example_call, is_openai, validation_message
from formerkit.serve_sequences import BatchedSequences, OneSequenceAtATime, speculative_decoding

__all__ = ["BatchedSequences", "ModelService", "OneSequenceAtATime", "ServeError", "create_app", "example_call",
           "serve"]


# The endpoint each task is served on (the legacy API; the OpenAI-compatible one in formerkit.openai_api).
ROUTES = {"causal_lm": "/v1/generate", "classification": "/v1/classify", "forecast": "/v1/forecast",
          "embedding": "/v1/embeddings", "image_generation": "/v1/images/generations"}


@dataclass
class _Job:
    kind: str  # "classify" or "forecast"
    key: tuple  # requests with equal keys may share a batch
    payload: Any
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]


class ModelService:
    """The model of a run directory with its tokenizer or preprocessing, the generation seam (``token_events``) and
    the batching worker of classification and forecasting."""

    def __init__(self, target: str | Path, *, max_batch: int = 16, wait_ms: float = 5.0,
                 max_new_tokens_limit: int = 1024, batching: str = "continuous", max_running: int | None = None,
                 max_queued: int = 64, draft: str | Path | None = None, draft_tokens: int | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"serve: max_batch must be an integer >= 1, got {max_batch!r}")
        if not 0 <= wait_ms <= 1000:
            raise InputError(f"serve: wait_ms must lie in [0, 1000], got {wait_ms!r}")
        if batching not in ("continuous", "window"):
            raise InputError(f"serve: batching must be 'continuous' or 'window', got {batching!r}")
        self.model, self.recipe, self.extra = load_run_model(target, imported=True)
        self.config = self.model.config
        self.target, self.model_id = Path(target), _model_name(target)
        self.task = run_objective(self.recipe, self.extra)
        self.preprocessing = self.extra.get("preprocessing") or {}
        # A run whose objective samples images (flow_matching, ddpm, masked_generation): its generator, loaded once.
        self.image_generator = None
        if self.recipe is not None and generates_images(target):
            self.task = "image_generation"
            self.image_generator = image_generator(target, self.model, self.recipe, self.extra)
        self.tokenizer, self.eos_ids = None, ()
        # Embeddings: an encoder over tokens pooled (a masked-LM run, a text classifier, an imported BERT; the
        # encoder of an encoder-decoder: a seq2seq run, an imported T5 or BART).
        encoder_over_text = self.config.stem.kind == "tokens" and (
            (self.config.arch == "encoder" and self.task in ("masked_lm", "classification", None))
            or (self.config.arch == "encoder_decoder" and self.task in ("seq2seq", None)))
        # (Without a tokenizer, as the synthetic-token seq2seq-reverse run, there is no text to embed.)
        self.embeds = encoder_over_text and self.preprocessing.get("kind") != "image" and (
            model_dir(target) / "tokenizer.json").exists()
        if self.embeds:
            self.task = self.task if self.task in ("classification", "seq2seq") else "embedding"
        if self.task == "causal_lm" or self.embeds:
            path = model_dir(target) / "tokenizer.json"
            if not path.exists():
                raise CheckpointError(f"{path}: missing; a model over text is served with the tokenizer of its run")
            self.tokenizer = load_tokenizer(path)
        if self.task == "causal_lm":
            # A converted checkpoint's end-of-sequence tokens end every generation.
            self.eos_ids = tuple(generation_defaults(self.extra, self.tokenizer)["stop_tokens"] or ())
        elif self.task not in ROUTES and not self.embeds:
            what = f"this run trained {self.task!r}" if self.recipe is not None else (
                "this converted checkpoint is neither a decoder language model nor an encoder over tokens")
            raise CheckpointError(f"{target}: serve answers language models (generate, completions), classifiers "
                                  f"(classify), forecasters (forecast) and encoders over text with their tokenizer "
                                  f"(embeddings); {what}")
        if self.task == "classification" and not self.embeds and self.preprocessing.get("kind") != "image":
            raise CheckpointError(f"{target}: classify takes images; this classifier's data is "
                                  f"{self.preprocessing.get('kind')!r}")
        self.route = "/v1/embeddings" if self.embeds else ROUTES[self.task]
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.max_new_tokens_limit = max_new_tokens_limit
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="formerkit-model")
        # The implementation behind token_events: the engine, or one sequence at a time for a model it refuses.
        self.engine: Engine | None = None
        self.batching = "none"
        self.sequences = OneSequenceAtATime(self.model, self.executor)
        if draft is not None:
            if self.task != "causal_lm":
                raise InputError(f"serve: --draft speeds up language models; {target} is a {self.task} model")
            # Speculative decoding is batch-1: sequences are decoded one at a time, each at the lowest latency
            # (one client, an editor or an agent); many clients are served better by the continuous engine.
            self.batching = "speculative"
            self.draft = load_draft(target, draft, num_tokens=draft_tokens)
            self.sequences = OneSequenceAtATime(self.model, self.executor, speculative_decoding(self.draft))
        elif self.task == "causal_lm":
            try:
                self.engine = Engine(self.model, max_running=max_running if max_running is not None else max_batch,
                                     max_queued=max_queued, policy=batching, wait_ms=wait_ms)
            except InputError as error:
                print(f"formerkit serve: one sequence at a time ({error})", file=sys.stderr, flush=True)
            else:
                self.batching = batching
                self.sequences = BatchedSequences(self.engine)
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # batches run, for whoever watches the server

    # ----- describing the model -----

    def describe(self) -> dict:
        info = {"task": self.task, "model": self.model_id, "parameters": parameter_count(self.model),
                "config": self.config.to_dict(), "max_batch": self.max_batch}
        if self.task == "causal_lm":
            info["batching"] = self.batching
        if self.task == "classification":
            info["classes"] = self.preprocessing.get("classes")
            if not self.embeds:
                info["image_size"] = self.preprocessing.get("image_size")
                info["in_channels"] = self.preprocessing.get("in_channels")
        elif self.task == "forecast":
            for key in ("columns", "window", "horizon"):
                info[key] = self.preprocessing[key]
        elif self.task == "image_generation":
            objective = self.image_generator.objective.config
            info.update(classes=self.image_generator.classes, image_size=self.preprocessing.get("image_size"),
                        in_channels=self.preprocessing.get("in_channels"), objective=objective.kind,
                        steps=objective.sample_steps, guidance=objective.guidance,
                        raw_max=self.image_generator.raw_max)
        else:
            info["context"] = self.config.max_seq_len
        return info

    def check_task(self, task: str) -> None:
        if self.task != task or (task == "classification" and self.embeds):
            article = "an" if self.task[0] in "aeiou" else "a"
            raise ServeError(400, f"this model is {article} {self.task} model: use {self.route}")

    # ----- generation: the seam -----

    async def token_events(self, request: TokenRequest) -> AsyncIterator[TokenEvent]:
        """The events of ``request``'s new tokens as they are made. A consumer that stops iterating before the last
        one (and closes the iterator, as ``async for`` over ``contextlib.aclosing`` does) cancels the sequence."""
        events = self.sequences.events(request)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    def check_length(self, ids: list[int], count: int, *, param: str = "max_new_tokens",
                     prompt_param: str = "prompt") -> None:
        """A 400 naming the field when ``count`` new tokens after ``ids`` do not fit the model's context."""
        if count > self.max_new_tokens_limit:
            raise ServeError(400, f"{param}: at most {self.max_new_tokens_limit}, got {count}", param=param)
        context = self.config.max_seq_len
        if context is not None and len(ids) > context:
            raise ServeError(400, f"{prompt_param}: {len(ids)} tokens exceed the model's context of {context} tokens",
                             param=prompt_param, code="context_length_exceeded")
        if context is not None and len(ids) + count > context + 1:
            raise ServeError(400, f"{param}: {count} new tokens after {len(ids)} tokens of {prompt_param} exceed the "
                                  f"model's context of {context} tokens (+1); shorten the prompt or ask for fewer "
                                  "tokens",
                             param=param, code="context_length_exceeded")

    def token_ids(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text)

    async def on_model_thread(self, function, *args):
        """Runs ``function(*args)`` in the model's worker thread (work other than token generation: embeddings, a
        prompt's log-probabilities): the engine's, between two of its steps, when an engine runs the model."""
        if self.engine is not None:
            return await asyncio.wrap_future(self.engine.start().call(function, *args))
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def generate_images(self, labels: list[int], *, steps: int | None, guidance: float | None,
                              seed: int) -> torch.Tensor:
        """Images [N, C, H, W] in the data's raw units of the classes ``labels``, drawn in the model's worker thread:
        one request at a time (sampling switches the model between train and eval modes), each with one generator
        seeded once with ``seed`` (``ImageGenerator.sample``)."""
        def draw() -> torch.Tensor:
            return self.image_generator.sample(labels, steps=steps, guidance=guidance, seed=seed)

        return await self.on_model_thread(draw)

    def stats(self) -> dict:
        """How generation is scheduled and, with an engine, its running and waiting sequences and counters."""
        return {"batching": self.batching, **(self.engine.stats() if self.engine is not None else {})}

    def prompt_logprobs(self, ids: list[int], top: int) -> list[tuple[float | None, tuple | None]]:
        """(log-probability, the ``top`` most likely (id, log-probability)) of each prompt token given the ones
        before it: the model's own log-softmax; (None, None) for the first, which nothing predicts."""
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=next(self.model.parameters()).device))[0].float()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            chosen = logprobs.gather(-1, torch.tensor(ids[1:], device=logprobs.device).view(-1, 1)).flatten()
            result: list[tuple[float | None, tuple | None]] = [(None, None)]
            values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1) if top > 0 else (None, None)
            for position in range(len(ids) - 1):
                best = None if values is None else tuple(
                    (int(i), float(v)) for i, v in zip(indices[position], values[position]))
                result.append((float(chosen[position]), best))
            return result

    def embed(self, texts: list[list[int]]) -> torch.Tensor:
        """Unit-length embeddings [len(texts), width] of token-id lists: for a classifier (or regressor) the vector
        its head pools, the one it classifies; else the mean of the (encoder's) final hidden states over the tokens
        (sentence-transformers' mean pooling; a BERT pooler, trained on next-sentence prediction, is not used).
        Padding is masked and never pooled."""
        longest = max(len(ids) for ids in texts)
        device = next(self.model.parameters()).device
        ids = torch.zeros(len(texts), longest, dtype=torch.long, device=device)
        keep = torch.zeros(len(texts), longest, dtype=torch.long, device=device)
        for row, tokens in enumerate(texts):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            keep[row, :len(tokens)] = 1
        with torch.inference_mode():
            if self.config.arch == "encoder_decoder":
                out, hidden = None, self.model.encode(ids, attention_mask=keep).float()
            else:
                out = self.model(ids, attention_mask=keep, return_outputs=True)
                hidden = out.last_hidden_state.float()
            if out is not None and out.pooled is not None and self.config.head.kind in ("classification",
                                                                                         "regression"):
                vectors = out.pooled.float()
            else:
                weights = keep.unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            return torch.nn.functional.normalize(vectors, dim=-1)

    # ----- legacy requests -----

    def generation_request(self, body: dict) -> TokenRequest:
        """The TokenRequest of a /v1/generate body (checked)."""
        self.check_task("causal_lm")
        ids = self.token_ids(body["prompt"])
        self.check_length(ids, body["max_new_tokens"])
        try:
            stop = stop_ids(self.tokenizer, body.get("stop"), name="stop")
            sampling = SamplingConfig(body["temperature"], body.get("top_k"), body.get("top_p"))
            return TokenRequest(tuple(ids), body["max_new_tokens"], sampling, body.get("seed"),
                                frozenset((stop or []) + list(self.eos_ids)))
        except InputError as error:
            raise ServeError(400, str(error)) from None

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

    # ----- batching (classify, forecast) -----

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
            logits = self.model(torch.stack([job.payload for job in batch])).float()
            probabilities = logits.softmax(dim=-1)
            classes = self.preprocessing.get("classes")
            results = []
            for row in probabilities:
                best = int(row.argmax())
                label = classes[best] if classes else best
                results.append({"label": label, "probabilities": [round(float(p), 6) for p in row]})
            return results


def _model_name(target: str | Path) -> str:
    """The name clients send as ``model``: the run directory's name (the parent's of a run's ``model/``)."""
    path = Path(target).resolve()
    directory = model_dir(path).resolve()
    if directory != path:  # a run directory
        return path.name
    if directory.name == "model" and (directory.parent / "model" / "config.json").exists() and \
            any((directory.parent / name).exists() for name in ("recipe.yaml", "metrics.jsonl", "checkpoints")):
        return directory.parent.name  # a run's model/ directory
    return directory.name


async def _collect(service: ModelService, request: TokenRequest) -> list[TokenEvent]:
    async with contextlib.aclosing(service.token_events(request)) as events:
        return [event async for event in events]


def create_app(service: ModelService, *, max_body_bytes: int = 8 * 2**20):
    """The FastAPI application over a ``ModelService``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    from formerkit.generation.requests import EngineFull
    from formerkit.openai_api import add_openai_routes
    from formerkit.openai_images import add_image_routes

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

    app.add_middleware(BodyLimit, limit=max_body_bytes)

    def error_response(request: Request, message: str, status: int, param: str | None = None,
                       code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, message, status, param, code), status_code=status,
                            headers=headers)

    @app.exception_handler(ServeError)
    async def refused(request: Request, error: ServeError):
        return error_response(request, error.message, error.status, error.param, error.code, error.headers)

    @app.exception_handler(EngineFull)
    async def full(request: Request, error: EngineFull):
        headers = None if error.retry_after is None else {"Retry-After": str(max(1, round(error.retry_after)))}
        return error_response(request, f"the server is busy: {error}", 429, None, "engine_full", headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        message, param = validation_message(error.errors())
        # OpenAI answers a bad field with 400; the legacy endpoints keep FastAPI's 422.
        status = 400 if is_openai(request.url.path) else 422
        return error_response(request, message, status, param, "invalid_value" if param else "invalid_json")

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, error: HTTPException):
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(error.status_code, str(error.detail))
        return error_response(request, message, error.status_code, None, None, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):
        return error_response(request, f"the request failed: {type(error).__name__}: {error}", 500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info():
        return service.describe()

    @app.get("/v1/stats")
    async def stats():
        return service.stats()

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(request: GenerateRequest):
        token_request = service.generation_request(request.model_dump())
        pieces = TextPieces(service.tokenizer)  # the stop token's text is part of the answer here
        if not request.stream:
            events = await _collect(service, token_request)
            for event in events:
                pieces.add(event.token)
            pieces.finish()
            return {"text": pieces.text, "num_tokens": len(events)}

        stream = service.token_events(token_request)
        try:  # the first token before the headers: a refusal (a full queue: 429) is then answered as one
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None

        async def events():
            count = 0
            try:
                async with contextlib.aclosing(stream):
                    if first is not None:
                        count += 1
                        yield f"data: {json.dumps({'text': pieces.add(first.token)})}\n\n"
                    async for event in stream:
                        count += 1
                        yield f"data: {json.dumps({'text': pieces.add(event.token)})}\n\n"
                if rest := pieces.finish():
                    yield f"data: {json.dumps({'text': rest})}\n\n"
                yield f"data: {json.dumps({'done': True, 'num_tokens': count})}\n\n"
            except Exception as error:  # the headers are sent: the failure is the last event
                yield f"data: {json.dumps({'error': f'the request failed: {type(error).__name__}: {error}'})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(request: ClassifyRequest):
        return await service.submit(service.classification_job(request.model_dump()))

    @app.post("/v1/forecast", response_model=ForecastResponse)
    async def forecast(request: ForecastRequest):
        return await service.submit(service.forecast_job(request.model_dump()))

    add_openai_routes(app, service)
    add_image_routes(app, service)
    return app


def serve(target: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          wait_ms: float = 5.0, max_body_bytes: int = 8 * 2**20, batching: str = "continuous",
          max_running: int | None = None, max_queued: int = 64, draft: str | Path | None = None,
          draft_tokens: int | None = None) -> None:
    """Serves a run (blocking) until SIGTERM or Ctrl-C, which let in-flight requests finish first. Once listening,
    prints the URL, the model name clients send and an example call."""
    try:
        import uvicorn
    except ImportError as error:
        raise InputError("formerkit serve needs FastAPI and uvicorn: pip install 'formerkit[serve]'") from error
    service = ModelService(target, max_batch=max_batch, wait_ms=wait_ms, batching=batching, max_running=max_running,
                           max_queued=max_queued, draft=draft, draft_tokens=draft_tokens)
    app = create_app(service, max_body_bytes=max_body_bytes)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.should_exit or not self.servers:
                return
            bound = self.servers[0].sockets[0].getsockname()
            shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            shown = f"[{shown}]" if ":" in shown else shown
            base_url = f"http://{shown}:{bound[1]}"
            print(f"formerkit serve: {service.model_id} ({service.task}) at {base_url}  (docs: {base_url}/docs; "
                  f"OpenAI clients: base_url={base_url}/v1, model={service.model_id!r})\n"
                  f"try: {example_call(service, base_url)}", file=sys.stdout, flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
    Server(config).run()
