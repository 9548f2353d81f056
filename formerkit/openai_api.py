"""The OpenAI-compatible endpoints of ``formerkit serve``: what the official ``openai`` client, and the editors, agents
and evaluation tools written against it, already speak.

- ``GET /v1/models`` (and ``/v1/models/{id}``): the one model served, named after its run directory.
- ``POST /v1/completions``: ``prompt`` (a string, a list of strings, a list of token ids or a list of such lists),
  ``max_tokens`` (default 16), ``temperature`` (default 1; 0 = greedy), ``top_p``, ``top_k`` (an extension, as vLLM
  has), ``n``, ``stop`` (a text or up to 16 texts: the completion ends before the first of them, which is not
  included; finish_reason "stop"), ``seed``, ``stream``, ``logprobs`` (k: each token's log-probability and the k most
  likely, with ``text_offset`` counted from the start of the prompt, as OpenAI's legacy API counts), ``echo`` (the
  prompt is returned before the completion; with ``logprobs`` its tokens' log-probabilities too, the first null).
- ``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template (``formerkit.data.instruct``:
  an imported tokenizer's own template, or the default ``<|role|>\\n...<|end|>`` one, whose end-of-turn marker then
  ends the answer as a stop text), the same sampling fields, ``max_completion_tokens`` or ``max_tokens`` (default: as
  many as the context leaves), ``logprobs`` (true/false) with ``top_logprobs`` (0-20).
- ``POST /v1/embeddings``: encoders over text (a masked-LM run, a text classifier, an imported BERT, the encoder of
  an encoder-decoder); ``input`` a string, strings or token ids; unit-length vectors (``ModelService.embed``: a
  classifier's pooled vector, else the mean of the final hidden states), ``encoding_format`` "float" or "base64"
  (little-endian float32).
- ``POST /v1/images/generations``: image generators (``formerkit.openai_images``, which shares these errors and
  field rules; ``formerkit.serve`` adds both).

Streaming answers are server-sent events in OpenAI's chunk format, ``data: {json}\\n\\n`` each, ending with
``data: [DONE]``; a chat stream's first chunk of each choice carries the role alone (content ""), the next ones
content, the last one the finish_reason; with ``stream_options.include_usage`` a last chunk (no choices) carries the
token counts. The text streamed adds up to the text answered without streaming: both come from the same
``TextPieces``.

``n`` > 1 runs n separate sequences; with a ``seed``, choice i (counted over every prompt's choices) is sampled with
seed + i, so each choice is reproducible on its own. ``usage`` counts each prompt's tokens once and every token the
model generated (an end-of-sequence token and the tokens of a stop text included, though not shown).

Fields: a field we cannot honour and that would change the answer (a non-zero presence/frequency penalty, a
logit_bias, best_of other than n, a suffix, tools, a JSON response_format) is refused with 400 naming it, rather than
silently answering something else. Fields that change nothing here (``user``, ``metadata``, ``store``,
``service_tier``, ``parallel_tool_calls``, ``stream_options`` without streaming, and fields this server does not
know) are accepted and ignored, as vLLM does, so that clients sending their usual extras work. Errors have OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field (``param`` names it), 404 for a
``model`` other than the one served (code ``model_not_found``), 429 when the engine's queue is full, 500 when the
request fails.
"""

import asyncio
import base64
import contextlib
import time
import uuid
from typing import Any, Literal

import torch

from formerkit.data.instruct import DEFAULT_END, chat_template, encode_plain, renderer
from formerkit.errors import FormerkitError, InputError, ServeError
from formerkit.generation.requests import TokenEvent, TokenRequest
from formerkit.generation.sampling import SamplingConfig
from formerkit.generation.text import TextPieces
from formerkit.openai_formats import (
    chat_logprobs,
    completion_logprobs,
    join_logprobs,
    message_text,
    prompt_logprobs,
    sse,
    usage,
)

__all__ = ["add_openai_routes"]

# The most choices (prompts x n) one request may ask for, and the most texts one embeddings request may send.
MAX_CHOICES = 64
MAX_EMBEDDING_INPUTS = 2048
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 16



# ----- one choice: token events -> text, logprobs, finish reason -----


class _Choice:
    """One generated sequence as the client sees it: the text shown so far, the events of its shown tokens, and why
    it ended. An end-of-sequence token ends it without being shown; a stop text ends it at the text before it."""

    def __init__(self, index: int, service, request: TokenRequest, stops: list[str]):
        self.index, self.service, self.request = index, service, request
        self.pieces = TextPieces(service.tokenizer, stops)
        self.shown_events: list[TokenEvent] = []  # every token given to the text, in order
        self.generated = 0  # every token the model made for this choice
        self.sent = 0  # shown tokens whose log-probabilities are already sent
        self.finish_reason: str | None = None

    def add(self, event: TokenEvent) -> str:
        """The text this token adds to the shown text (maybe none yet)."""
        self.generated += 1
        delta = ""
        if event.finish_reason == "stop" and event.token in self.request.stop_ids:
            self.finish_reason = "stop"
        else:
            delta = self.pieces.add(event.token)
            self.shown_events.append(event)
            if self.pieces.stopped:
                self.finish_reason = "stop"
            elif event.finish_reason is not None:
                self.finish_reason = event.finish_reason
        if self.finish_reason is not None:
            delta += self.pieces.finish()
        return delta

    def new_tokens(self) -> list[tuple[int, TokenEvent]]:
        """(index among the shown tokens, event) of the tokens shown since the last call."""
        count = self.pieces.tokens_shown
        new = list(enumerate(self.shown_events[self.sent:count], start=self.sent))
        self.sent = max(self.sent, count)
        return new

    def text_of(self, token: int) -> str:
        return self.service.tokenizer.decode([token])


async def _run_choice(choice: _Choice, first: TokenEvent | None = None, events=None,
                      on_delta=None) -> None:
    """Feeds ``choice`` its events until it ends (stopping the sequence early when a stop text ends it)."""
    events = events if events is not None else choice.service.token_events(choice.request)
    async with contextlib.aclosing(events):
        if first is not None:
            delta = choice.add(first)
            if on_delta is not None:
                await on_delta(choice, delta)
        if choice.finish_reason is None:
            async for event in events:
                delta = choice.add(event)
                if on_delta is not None:
                    await on_delta(choice, delta)
                if choice.finish_reason is not None:
                    break  # leaving the loop closes the events: the engine drops the rest of the sequence
    if choice.finish_reason is None:  # the engine ended the sequence without saying why: it ran out of room
        choice.finish_reason = "length"
        delta = choice.pieces.finish()
        if on_delta is not None:
            await on_delta(choice, delta)


async def _start(events) -> TokenEvent | None:
    """The first event of a sequence, so that a refusal (a full queue: 429) is answered before a stream starts."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


# ----- request fields -----


def check_model(service, name: str, task: str) -> None:
    if name != service.model_id:
        raise ServeError(404, f"model: the model {name!r} does not exist; this server serves {service.model_id!r} "
                              "(GET /v1/models)", param="model", code="model_not_found")
    if task == "embedding" and not service.embeds:
        raise ServeError(400, f"model: {service.model_id!r} is a {service.task} model, not an encoder over text: it "
                              f"has no embeddings; use {service.route}", param="model", code="model_not_supported")
    if task == "image_generation" and service.task != "image_generation":
        raise ServeError(400, f"model: {service.model_id!r} is a {service.task} model, not an image generator: use "
                              f"{service.route}", param="model", code="model_not_supported")
    if task == "causal_lm" and service.task != "causal_lm":
        raise ServeError(400, f"model: {service.model_id!r} is a {service.task} model, not a language model: use "
                              f"{service.route}", param="model", code="model_not_supported")


def refuse_field(param: str, message: str) -> ServeError:
    return ServeError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


def _check_unsupported(body) -> None:
    """Fields that would change the answer and that this server cannot honour: refused, naming the field."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name, None):
            raise refuse_field(name, "penalties are not supported; send 0 or leave it out")
    if getattr(body, "logit_bias", None):
        raise refuse_field("logit_bias", "not supported; leave it out")


def _token_ids(service, value, param: str) -> list[int]:
    if isinstance(value, str):
        return service.token_ids(value)
    vocab = service.config.stem.vocab_size
    if not value:
        raise ServeError(400, f"{param}: an empty list of token ids", param=param, code="invalid_value")
    for token in value:
        if not 0 <= token < vocab:
            raise ServeError(400, f"{param}: token id {token} is outside the vocabulary [0, {vocab})", param=param,
                             code="invalid_value")
    return list(value)


def _prompts(value, param: str) -> list:
    """A prompt or input field as a list of prompts, each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(item, int) for item in value):
        return [value]
    if not value:
        raise ServeError(400, f"{param}: expected a string, strings or token ids, got an empty list", param=param,
                         code="invalid_value")
    return list(value)


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ServeError(400, f"stop: at most {MAX_STOPS} stop texts, got {len(stops)}", param="stop",
                         code="invalid_value")
    return [text for text in stops if text]


def _sampling(body) -> SamplingConfig:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = None if body.top_p is None or body.top_p >= 1 else body.top_p
    try:
        return SamplingConfig(temperature, body.top_k, top_p)
    except InputError as error:
        raise ServeError(400, str(error), param=str(error).split(":")[0], code="invalid_value") from None


def _token_request(service, ids: list[int], count: int, sampling: SamplingConfig, seed: int | None,
                   logprobs: int | None) -> TokenRequest:
    return TokenRequest(tuple(ids), count, sampling, seed, frozenset(service.eos_ids), logprobs)


# ----- the routes -----


def add_openai_routes(app, service) -> None:
    """Adds the OpenAI-compatible endpoints over ``service`` to the FastAPI ``app``."""
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore")
        include_usage: bool | None = False

    class Sampling(BaseModel):
        # Unknown fields are ignored (see the module docstring).
        model_config = ConfigDict(extra="ignore")
        model: str
        temperature: float | None = Field(None, ge=0.0, le=2.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=1)
        n: int | None = Field(None, ge=1, le=MAX_CHOICES)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        logit_bias: dict[str, float] | None = None
        user: str | None = None

    class CompletionRequest(Sampling):
        prompt: str | list[str] | list[int] | list[list[int]]
        max_tokens: int | None = Field(16, ge=1)
        logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
        echo: bool | None = False
        best_of: int | None = Field(None, ge=1)
        suffix: str | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[dict] | None = None

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = False
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
        tools: list | None = None
        functions: list | None = None
        response_format: dict | None = None

    class EmbeddingRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        input: str | list[str] | list[int] | list[list[int]]
        encoding_format: Literal["float", "base64"] | None = "float"
        dimensions: int | None = Field(None, ge=1)
        user: str | None = None

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": created, "owned_by": "formerkit"}

    created = int(time.time())
    chat: list = []  # the chat renderer and its implicit stop texts, made at the first chat request

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        check_model(service, name, "any")
        return model_card()

    def choice_requests(prompts: list[list[int]], n: int, count: int | None, sampling: SamplingConfig,
                        seed: int | None, logprobs: int | None, param: str) -> list[TokenRequest]:
        if len(prompts) * n > MAX_CHOICES:
            raise ServeError(400, f"n: {len(prompts)} prompts x n {n} = {len(prompts) * n} choices, more than "
                                  f"{MAX_CHOICES}", param="n", code="invalid_value")
        requests = []
        for ids in prompts:
            wanted = count
            if wanted is None:  # as many as the context leaves (and the server allows)
                context = service.config.max_seq_len
                room = service.max_new_tokens_limit if context is None else context + 1 - len(ids)
                wanted = max(1, min(room, service.max_new_tokens_limit))
            service.check_length(ids, wanted, param="max_tokens" if count is not None else param,
                                 prompt_param=param)
            for _ in range(n):
                index = len(requests)
                requests.append(_token_request(service, ids, wanted, sampling,
                                               None if seed is None else seed + index, logprobs))
        return requests

    class _Chunks:
        """Chunk builders sharing a request's id, creation time and object name."""

        def __init__(self, kind: str, prefix: str, with_usage: bool):
            self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
            self.kind, self.with_usage = kind, with_usage

        def wrap(self, choices: list[dict]) -> dict:
            chunk = {"id": self.id, "object": self.kind, "created": self.created, "model": service.model_id,
                     "choices": choices}
            if self.with_usage:
                chunk["usage"] = None
            return chunk

        def usage_chunk(self, usage: dict) -> dict:
            return {"id": self.id, "object": self.kind, "created": self.created, "model": service.model_id,
                    "choices": [], "usage": usage}

    async def run_all(choices: list[_Choice], chunks: _Chunks, stream_chunk, finish_chunk, stream: bool,
                      include_usage: bool, prompt_tokens: int):
        """Non-streamed: every choice run to its end (concurrently). Streamed: an event stream of the chunks."""
        starts = [choice.service.token_events(choice.request) for choice in choices]
        first = await _start(starts[0])  # a refusal answers with its status before the stream begins
        if not stream:
            tasks = [asyncio.ensure_future(_run_choice(choice, first if index == 0 else None, events))
                     for index, (choice, events) in enumerate(zip(choices, starts))]
            try:
                await asyncio.gather(*tasks)
            finally:  # one choice failed (or the request was cancelled): the others stop too
                for task in tasks:
                    task.cancel()
            return None
        queue: asyncio.Queue = asyncio.Queue()

        async def on_delta(choice: _Choice, delta: str) -> None:
            for chunk in stream_chunk(choice, delta):
                await queue.put(chunk)
            if choice.finish_reason is not None:
                await queue.put(finish_chunk(choice))

        async def pump(index: int) -> None:
            try:
                await _run_choice(choices[index], first if index == 0 else None, starts[index], on_delta)
            except Exception as error:  # the headers are sent: the failure goes into the stream
                await queue.put({"error": {"message": f"the request failed: {type(error).__name__}: {error}",
                                           "type": "server_error", "param": None, "code": None}})
            finally:
                await queue.put(None)

        async def events():
            tasks = [asyncio.ensure_future(pump(index)) for index in range(len(choices))]
            try:
                running = len(tasks)
                while running:
                    chunk = await queue.get()
                    if chunk is None:
                        running -= 1
                    else:
                        yield sse(chunk)
                if include_usage:
                    yield sse(chunks.usage_chunk(usage(prompt_tokens, choices)))
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or all is sent): every sequence still running is cancelled
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.gather(*tasks, return_exceptions=True)
                for events_ in starts:  # a choice whose task never began still holds its unstarted events
                    with contextlib.suppress(Exception):
                        await events_.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(service, body.model, "causal_lm")
        _check_unsupported(body)
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise refuse_field("best_of", f"only best_of = n ({n}) is supported (no ranking of extra samples)")
        if body.suffix:
            raise refuse_field("suffix", "insertion after a suffix is not supported")
        prompts = _prompts(body.prompt, "prompt")
        ids = [_token_ids(service, prompt, "prompt") for prompt in prompts]
        texts = [prompt if isinstance(prompt, str) else service.tokenizer.decode(list(prompt)) for prompt in prompts]
        stops = _stops(body.stop)
        requests = choice_requests(ids, n, body.max_tokens, _sampling(body), body.seed, body.logprobs, "prompt")
        choices = [_Choice(index, service, request, stops) for index, request in enumerate(requests)]
        prompt_of = [index // n for index in range(len(choices))]
        echo_logprobs = {}
        if body.echo and body.logprobs is not None:
            for index, prompt in enumerate(ids):
                echo_logprobs[index] = prompt_logprobs(
                    service, prompt, await service.on_model_thread(service.prompt_logprobs, prompt, body.logprobs))
        prompt_tokens = sum(len(prompt) for prompt in ids)

        def logprobs_of(choice: _Choice, tokens, with_prompt: bool) -> dict | None:
            if body.logprobs is None:
                return None
            text = texts[prompt_of[choice.index]]
            own = completion_logprobs(choice, tokens, len(text))
            return join_logprobs(echo_logprobs.get(prompt_of[choice.index]) if with_prompt else None, own)

        stream = bool(body.stream)
        include_usage = stream and bool(body.stream_options and body.stream_options.include_usage)
        chunks = _Chunks("text_completion", "cmpl", include_usage)
        echoed: set[int] = set()

        def stream_chunk(choice: _Choice, delta: str) -> list[dict]:
            tokens = choice.new_tokens()
            first = body.echo and choice.index not in echoed
            if first:
                echoed.add(choice.index)
                delta = texts[prompt_of[choice.index]] + delta
            if not delta and not tokens and not first:
                return []
            return [chunks.wrap([{"index": choice.index, "text": delta,
                                  "logprobs": logprobs_of(choice, tokens, first), "finish_reason": None}])]

        def finish_chunk(choice: _Choice) -> dict:
            return chunks.wrap([{"index": choice.index, "text": "", "logprobs": None,
                                 "finish_reason": choice.finish_reason}])

        response = await run_all(choices, chunks, stream_chunk, finish_chunk, stream, include_usage, prompt_tokens)
        if response is not None:
            return response
        answers = []
        for choice in choices:
            text = choice.pieces.text
            if body.echo:
                text = texts[prompt_of[choice.index]] + text
            answers.append({"index": choice.index, "text": text,
                            "logprobs": logprobs_of(choice, choice.new_tokens(), bool(body.echo)),
                            "finish_reason": choice.finish_reason})
        return {"id": chunks.id, "object": "text_completion", "created": chunks.created,
                "model": service.model_id, "choices": answers, "usage": usage(prompt_tokens, choices)}

    def chat_render():
        if not chat:
            choice = getattr(getattr(service.recipe, "data", None), "chat_template", None)
            try:
                template = chat_template(service.tokenizer, choice)
                # The default template ends each turn with its marker: the answer ends there too.
                chat.extend([renderer(service.tokenizer, choice), [DEFAULT_END] if template is None else []])
            except FormerkitError as error:
                raise ServeError(400, f"messages: this model cannot render a chat: {error}", param="messages",
                                 code="model_not_supported") from None
        return chat

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(service, body.model, "causal_lm")
        _check_unsupported(body)
        if body.tools or body.functions:
            raise refuse_field("tools" if body.tools else "functions", "tool calls are not supported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise refuse_field("response_format", f"only type 'text' is supported, got {body.response_format!r}")
        if body.top_logprobs is not None and not body.logprobs:
            raise ServeError(400, "top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
        render, implicit_stops = chat_render()
        messages = [{"role": "system" if message.role == "developer" else message.role,
                     "content": message_text(message, index)} for index, message in enumerate(body.messages)]
        try:
            text = render(messages, True)
        except Exception as error:  # the template itself refuses (jinja's raise_exception) or fails
            raise ServeError(400, f"messages: the chat template could not render them: {error}", param="messages",
                             code="invalid_value") from None
        # The template writes the special tokens it wants as text: none are added (as instruction tuning tokenized).
        ids = encode_plain(service.tokenizer, text) or service.token_ids(text)
        n = body.n or 1
        count = body.max_completion_tokens or body.max_tokens
        top = body.top_logprobs or 0
        requests = choice_requests([ids], n, count, _sampling(body), body.seed, top if body.logprobs else None,
                                   "messages")
        choices = [_Choice(index, service, request, _stops(body.stop) + implicit_stops)
                   for index, request in enumerate(requests)]
        stream = bool(body.stream)
        include_usage = stream and bool(body.stream_options and body.stream_options.include_usage)
        chunks = _Chunks("chat.completion.chunk", "chatcmpl", include_usage)
        started: set[int] = set()

        def stream_chunk(choice: _Choice, delta: str) -> list[dict]:
            out = []
            if choice.index not in started:  # the first chunk of a choice says who speaks, and nothing else
                started.add(choice.index)
                out.append(chunks.wrap([{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
            tokens = choice.new_tokens()
            if delta or tokens:
                out.append(chunks.wrap([{"index": choice.index, "delta": {"content": delta},
                                         "logprobs": chat_logprobs(choice, tokens, top) if body.logprobs else None,
                                         "finish_reason": None}]))
            return out

        def finish_chunk(choice: _Choice) -> dict:
            return chunks.wrap([{"index": choice.index, "delta": {}, "logprobs": None,
                                 "finish_reason": choice.finish_reason}])

        response = await run_all(choices, chunks, stream_chunk, finish_chunk, stream, include_usage, len(ids))
        if response is not None:
            return response
        answers = [{"index": choice.index,
                    "message": {"role": "assistant", "content": choice.pieces.text, "refusal": None},
                    "logprobs": chat_logprobs(choice, choice.new_tokens(), top) if body.logprobs else None,
                    "finish_reason": choice.finish_reason} for choice in choices]
        return {"id": chunks.id, "object": "chat.completion", "created": chunks.created,
                "model": service.model_id, "choices": answers, "usage": usage(len(ids), choices)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(service, body.model, "embedding")
        inputs = _prompts(body.input, "input")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ServeError(400, f"input: at most {MAX_EMBEDDING_INPUTS} inputs, got {len(inputs)}", param="input",
                             code="invalid_value")
        width = service.config.width
        if body.dimensions is not None and body.dimensions != width:
            raise refuse_field("dimensions", f"this model's embeddings have {width} dimensions, got {body.dimensions}")
        ids = []
        context = service.config.max_seq_len
        for index, item in enumerate(inputs):
            param = "input" if len(inputs) == 1 else f"input[{index}]"
            if isinstance(item, str) and not item:
                raise ServeError(400, f"{param}: an empty text has no embedding", param=param, code="invalid_value")
            tokens = service.tokenizer.encode(item) if isinstance(item, str) else _token_ids(service, item, param)
            if context is not None and len(tokens) > context:
                raise ServeError(400, f"{param}: {len(tokens)} tokens exceed the model's context of {context}",
                                 param=param, code="context_length_exceeded")
            ids.append(tokens)
        vectors = []
        for begin in range(0, len(ids), service.max_batch):
            vectors.append(await service.on_model_thread(service.embed, ids[begin:begin + service.max_batch]))
        matrix = torch.cat(vectors)
        data = []
        for index, vector in enumerate(matrix):
            if body.encoding_format == "base64":
                value: Any = base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(len(item) for item in ids)
        return {"object": "list", "data": data, "model": service.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
