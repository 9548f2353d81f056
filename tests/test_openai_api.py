"""The OpenAI-compatible endpoints in-process (httpx's ASGI transport) over tiny random models saved as converted
checkpoints: formats, streaming, stop texts, logprobs, n, chat rendering, embeddings and every refusal. The official
client against a real server: tests/test_serve_openai.py."""

from __future__ import annotations

import asyncio
import base64
import json
import string
import struct
import time

import pytest
import torch

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from formerkit import build_model, save  # noqa: E402
from formerkit.data.instruct import DEFAULT_END  # noqa: E402
from formerkit.data.tokenizers import ByteTokenizer, CharTokenizer, save_tokenizer  # noqa: E402
from formerkit.errors import InputError  # noqa: E402
from formerkit.generation.requests import EngineFull  # noqa: E402
from formerkit.generation.text import TextPieces  # noqa: E402
from formerkit.serve import ModelService, create_app, example_call  # noqa: E402

from .conftest import char_hf_tokenizer, randomize_weights, token_config  # noqa: E402

BYTES = ByteTokenizer()
# One token per character (and one for any other): a random model's text reads back exactly, offsets are positions.
CHARS = CharTokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")


def _saved(directory, config, seed: int, extra: dict):
    model = randomize_weights(build_model(config), seed).eval()
    save(model, directory, extra=extra)
    save_tokenizer(CHARS, directory / "tokenizer.json")
    return directory


def encode(text: str) -> list[int]:
    return CHARS.encode(text)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A character-level decoder saved as a converted checkpoint named "tiny-lm", its service and app."""
    directory = _saved(tmp_path_factory.mktemp("lm") / "tiny-lm",
                       token_config(vocab_size=CHARS.vocab_size, max_seq_len=96, num_layers=1, position="rope"), 5,
                       {"imported": {"family": "test"}, "objective": "causal_lm"})
    service = ModelService(directory)
    return service, create_app(service)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    directory = _saved(tmp_path_factory.mktemp("encoder") / "tiny-encoder",
                       token_config("encoder", vocab_size=CHARS.vocab_size, max_seq_len=32, num_layers=1,
                                    position="learned"), 6,
                       {"imported": {"family": "test"}})
    service = ModelService(directory)
    return service, create_app(service)


def _call(app, requests: list[tuple[str, str, object]]):
    """(method, path, json body or (raw bytes, content type)) requests one after another; the responses."""

    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = []
            for method, path, body in requests:
                if isinstance(body, tuple):
                    responses.append(await client.request(method, path, content=body[0],
                                                          headers={"content-type": body[1]}))
                else:
                    responses.append(await client.request(method, path, json=body))
            return responses

    return asyncio.run(run())


def _post(app, path: str, body) -> httpx.Response:
    return _call(app, [("POST", path, body)])[0]


def _events(response: httpx.Response) -> list:
    """The data of each server-sent event; the last must be [DONE]."""
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _greedy(service: ModelService, ids: list[int], count: int) -> list[int]:
    return service.model.generate(torch.tensor([ids]), count, temperature=0)[0, len(ids):].tolist()


def _log_softmax(service: ModelService, ids: list[int]) -> torch.Tensor:
    """The model's own log-probabilities of each next token, from one forward pass over ``ids``: [len(ids), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(service.model(torch.tensor([ids]))[0].float(), dim=-1)


def test_models_list_names_the_run_directory(lm):
    service, app = lm
    listed, one, missing = _call(app, [("GET", "/v1/models", None), ("GET", "/v1/models/tiny-lm", None),
                                       ("GET", "/v1/models/other", None)])
    assert service.model_id == "tiny-lm"
    assert [model["id"] for model in listed.json()["data"]] == ["tiny-lm"] and listed.json()["object"] == "list"
    assert one.json()["id"] == "tiny-lm" and one.json()["object"] == "model"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_greedy_completion_is_the_models_own_continuation_with_usage(lm):
    service, app = lm
    body = _post(app, "/v1/completions", {"model": "tiny-lm", "prompt": "def f", "max_tokens": 7,
                                          "temperature": 0}).json()
    ids = encode("def f")
    assert body["object"] == "text_completion" and body["model"] == "tiny-lm" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["text"] == CHARS.decode(_greedy(service, ids, 7)) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    # A prompt of token ids and a list of prompts answer the same; choices are numbered across prompts.
    both = _post(app, "/v1/completions", {"model": "tiny-lm", "prompt": [ids, encode("xy")], "max_tokens": 7,
                                          "temperature": 0}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1] and both["choices"][0]["text"] == choice["text"]
    assert both["choices"][1]["text"] == CHARS.decode(_greedy(service, encode("xy"), 7))
    assert both["usage"]["prompt_tokens"] == 7


def test_a_stop_text_ends_the_completion_before_it_streamed_or_not(lm):
    service, app = lm
    full = CHARS.decode(_greedy(service, encode("ab"), 12))
    stop = full[4:6]  # a text the completion reaches: it ends just before its first occurrence
    expected = full[:full.find(stop)]
    body = {"model": "tiny-lm", "prompt": "ab", "max_tokens": 12, "temperature": 0, "stop": ["\x00zz", stop]}
    plain, streamed = _call(app, [("POST", "/v1/completions", body),
                                  ("POST", "/v1/completions", {**body, "stream": True})])
    [choice] = plain.json()["choices"]
    assert choice["text"] == expected and choice["finish_reason"] == "stop"
    chunks = _events(streamed)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks][-1] == "stop"
    # The tokens generated count, those of the stop text included (generation stops at the token completing it).
    assert plain.json()["usage"]["completion_tokens"] == full.find(stop) + len(stop)


def test_pieces_hold_back_what_may_become_a_stop_text_and_incomplete_characters():
    pieces = TextPieces(BYTES, ["END"])
    shown = [pieces.add(token) for token in "héE".encode() + b"N" + b"x" + b"EN" + b"D!"]
    assert shown == ["h", "", "é", "", "", "ENx", "", "", "", ""]
    assert pieces.stopped and pieces.text == "héENx" and pieces.finish() == "" and pieces.tokens_shown == 6


def test_streamed_chunks_add_up_to_the_answer_with_a_usage_chunk_last(lm):
    service, app = lm
    body = {"model": "tiny-lm", "prompt": "import", "max_tokens": 9, "temperature": 0}
    plain, streamed = _call(app, [("POST", "/v1/completions", body),
                                  ("POST", "/v1/completions", {**body, "stream": True,
                                                               "stream_options": {"include_usage": True}})])
    assert streamed.headers["content-type"].startswith("text/event-stream")
    *chunks, usage = _events(streamed)
    assert all(chunk["object"] == "text_completion" and chunk["id"] == chunks[0]["id"] for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain.json()["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == plain.json()["usage"]


def test_logprobs_are_the_models_log_softmax_and_echo_adds_the_prompts(lm):
    service, app = lm
    body = _post(app, "/v1/completions", {"model": "tiny-lm", "prompt": "cla", "max_tokens": 5, "temperature": 0,
                                          "logprobs": 2, "echo": True}).json()
    [choice] = body["choices"]
    new = _greedy(service, encode("cla"), 5)
    ids = encode("cla") + new
    reference = _log_softmax(service, ids)
    logprobs = choice["logprobs"]
    assert choice["text"] == "cla" + CHARS.decode(new)
    assert logprobs["tokens"] == [CHARS.decode([token]) for token in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = [float(reference[position - 1, token]) for position, token in enumerate(ids) if position > 0]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    for position in range(1, len(ids)):
        values, indices = reference[position - 1].topk(2)
        assert logprobs["top_logprobs"][position] == pytest.approx(
            {CHARS.decode([index]): value for index, value in zip(indices.tolist(), values.tolist())}, abs=1e-5)
    assert logprobs["text_offset"] == list(range(len(ids)))  # one byte, one character each


def test_n_seeded_samples_are_the_seeds_in_turn(lm):
    _, app = lm
    body = {"model": "tiny-lm", "prompt": "x = ", "max_tokens": 6, "temperature": 1.0, "seed": 40}
    together, *alone = _call(app, [("POST", "/v1/completions", {**body, "n": 3})]
                             + [("POST", "/v1/completions", {**body, "seed": 40 + i}) for i in range(3)])
    texts = [choice["text"] for choice in together.json()["choices"]]
    assert texts == [response.json()["choices"][0]["text"] for response in alone]
    assert len(set(texts)) > 1  # different seeds, different samples
    assert together.json()["usage"]["completion_tokens"] == 18


def test_chat_renders_the_default_template_and_stops_at_its_end_marker(lm):
    service, app = lm
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                           "text": "Hi"}]}]
    rendered = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    body = {"model": "tiny-lm", "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 1}
    plain, streamed = _call(app, [("POST", "/v1/chat/completions", body),
                                  ("POST", "/v1/chat/completions", {**body, "stream": True})])
    answer = plain.json()
    new = _greedy(service, encode(rendered), 8)
    text = CHARS.decode(new)
    assert DEFAULT_END not in text  # a random model does not write the marker: nothing cut here
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": text, "refusal": None}
    assert answer["usage"]["prompt_tokens"] == len(rendered)
    content = answer["choices"][0]["logprobs"]["content"]
    reference = _log_softmax(service, encode(rendered) + new)[len(rendered) - 1:-1]
    assert [item["logprob"] for item in content] == pytest.approx(
        [float(reference[step, token]) for step, token in enumerate(new)], abs=1e-5)
    assert [item["top_logprobs"][0]["token"] for item in content] == [CHARS.decode([int(row.argmax())])
                                                                      for row in reference]
    chunks = _events(streamed)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in chunks[1:])
    assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == text
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    streamed_logprobs = [item for chunk in chunks if chunk["choices"][0]["logprobs"]
                         for item in chunk["choices"][0]["logprobs"]["content"]]
    assert streamed_logprobs == content


def test_the_default_templates_end_marker_ends_the_answer(lm, monkeypatch):
    service, app = lm
    # The model "writes" the end marker: the answer is the text before it, finish_reason stop.
    from formerkit.generation.requests import TokenEvent

    async def scripted(request):
        for index, token in enumerate(encode("ok!" + DEFAULT_END + "more")):
            yield TokenEvent(token, finish_reason="length" if index == request.max_new_tokens - 1 else None)

    monkeypatch.setattr(service, "token_events", scripted)
    answer = _post(app, "/v1/chat/completions", {"model": "tiny-lm", "max_tokens": 20,
                                                 "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert answer["choices"][0]["message"]["content"] == "ok!" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 3 + len(DEFAULT_END)


def test_bad_fields_are_refused_with_the_openai_error_shape_naming_the_field(lm):
    _, app = lm
    good = {"model": "tiny-lm", "prompt": "x", "max_tokens": 2}
    cases = [
        ({**good, "temperature": 3}, 400, "temperature"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_tokens": 97}, 400, "max_tokens"),  # beyond the 96-token context (+1)
        ({**good, "prompt": "x" * 100}, 400, "prompt"),
        ({**good, "prompt": [[1, 300]]}, 400, "prompt"),
        ({**good, "n": 0}, 400, "n"),
        ({**good, "logprobs": 30}, 400, "logprobs"),
        ({**good, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({**good, "logit_bias": {"5": 1}}, 400, "logit_bias"),
        ({**good, "best_of": 3}, 400, "best_of"),
        ({**good, "model": "gpt-4o"}, 404, "model"),
        ({"model": "tiny-lm"}, 400, "prompt"),
    ]
    responses = _call(app, [("POST", "/v1/completions", body) for body, _, _ in cases]
                      + [("POST", "/v1/completions", (b"{not json", "application/json")),
                         ("POST", "/v1/chat/completions", {"model": "tiny-lm", "messages": [{"role": "robot",
                                                                                            "content": "x"}]}),
                         ("POST", "/v1/chat/completions", {"model": "tiny-lm", "messages": []}),
                         ("POST", "/v1/chat/completions", {"model": "tiny-lm", "top_logprobs": 2,
                                                           "messages": [{"role": "user", "content": "x"}]}),
                         ("POST", "/v1/chat/completions", {"model": "tiny-lm", "tools": [{"type": "function"}],
                                                           "messages": [{"role": "user", "content": "x"}]}),
                         ("POST", "/v1/embeddings", {"model": "tiny-lm", "input": "x"})])
    expected = [(status, param) for _, status, param in cases] + [
        (400, None), (400, "messages[0].role"), (400, "messages"), (400, "top_logprobs"), (400, "tools"),
        (400, "model")]
    for response, (status, param) in zip(responses, expected):
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (status, param), error
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert param is None or error["message"].startswith(param)
    assert responses[10].json()["error"]["code"] == "model_not_found" and "tiny-lm" in responses[10].json()[
        "error"]["message"]
    assert "JSON" in responses[12].json()["error"]["message"]
    # Fields that change nothing here are ignored: user, an unknown vendor field.
    fine = _post(app, "/v1/completions", {**good, "user": "me", "repetition_penalty": 1.0, "metadata": {"a": 1}})
    assert fine.status_code == 200


def test_a_full_engine_answers_429_before_a_stream_starts(lm, monkeypatch):
    service, app = lm

    async def full(request):
        raise EngineFull("64 requests are waiting", retry_after=2)
        yield  # an async generator, as token_events is

    monkeypatch.setattr(service, "token_events", full)
    body = {"model": "tiny-lm", "prompt": "x", "max_tokens": 2}
    plain, streamed = _call(app, [("POST", "/v1/completions", body),
                                  ("POST", "/v1/completions", {**body, "stream": True})])
    for response in (plain, streamed):
        assert response.status_code == 429 and response.headers["retry-after"] == "2"
        assert response.json()["error"]["type"] == "rate_limit_error" and "64 requests" in response.json()[
            "error"]["message"]
    legacy = _post(app, "/v1/generate", {"prompt": "x", "max_new_tokens": 2, "stream": True})
    assert legacy.status_code == 429 and "64 requests" in legacy.json()["error"]


def test_a_json_body_is_read_whatever_content_type_curl_sends(lm):
    service, app = lm
    body = json.dumps({"prompt": "def ", "max_new_tokens": 3, "temperature": 0}).encode()
    form = _post(app, "/v1/generate", (body, "application/x-www-form-urlencoded"))
    assert form.status_code == 200 and form.json()["text"] == CHARS.decode(_greedy(service, encode("def "), 3))
    chat = json.dumps({"model": "tiny-lm", "prompt": "def ", "max_tokens": 3, "temperature": 0}).encode()
    assert _post(app, "/v1/completions", (chat, "text/plain")).json()["choices"][0]["text"] == form.json()["text"]


def test_a_client_that_stops_reading_cancels_its_sequence(lm):
    service, _ = lm
    from formerkit.generation.requests import TokenRequest

    calls = []

    def slow_step(*args):  # a step of a few milliseconds, so the consumer's cancel comes before the 40th
        calls.append(1)
        time.sleep(0.003)

    handle = service.model.register_forward_hook(slow_step)

    async def run():
        events = service.token_events(TokenRequest(tuple(encode("def ")), 40))
        taken = [await events.__anext__(), await events.__anext__()]
        await events.aclose()
        await service.on_model_thread(lambda: None)  # the worker has finished whatever it was doing
        return taken

    try:
        taken = asyncio.run(run())
    finally:
        handle.remove()
    assert len(taken) == 2 and len(calls) < 20  # the prefill and a few steps, not 40


def test_embeddings_are_unit_mean_pooled_hidden_states_alone_or_padded(encoder):
    service, app = encoder
    texts = ["short", "a longer text than that"]
    floats, packed = _call(app, [
        ("POST", "/v1/embeddings", {"model": "tiny-encoder", "input": texts}),
        ("POST", "/v1/embeddings", {"model": "tiny-encoder", "input": texts[0], "encoding_format": "base64"})])
    data = floats.json()["data"]
    assert [item["index"] for item in data] == [0, 1] and floats.json()["usage"]["prompt_tokens"] == sum(
        len(text) for text in texts)
    for item, text in zip(data, texts):
        with torch.no_grad():  # the text alone, no padding: the mean of its final hidden states, unit length
            hidden = service.model(torch.tensor([encode(text)]))[0].float()
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
        assert item["embedding"] == pytest.approx(expected.tolist(), abs=1e-5)
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(data[0]["embedding"], abs=1e-6)
    bad = _call(app, [("POST", "/v1/embeddings", {"model": "tiny-encoder", "input": ["ok", ""]}),
                      ("POST", "/v1/embeddings", {"model": "tiny-encoder", "input": "x" * 40}),
                      ("POST", "/v1/embeddings", {"model": "tiny-encoder", "input": "x", "dimensions": 8}),
                      ("POST", "/v1/completions", {"model": "tiny-encoder", "prompt": "x"})])
    assert [(r.status_code, r.json()["error"]["param"]) for r in bad] == [
        (400, "input[1]"), (400, "input"), (400, "dimensions"), (400, "model")]
    assert "/v1/embeddings" in bad[3].json()["error"]["message"]


def test_the_example_call_names_the_model_and_the_tasks_endpoint(lm, encoder):
    line = example_call(lm[0], "http://127.0.0.1:8000")
    assert line.startswith("curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d ")
    assert json.loads(line.split(" -d ", 1)[1].strip("'"))["model"] == "tiny-lm"
    assert "/v1/embeddings" in example_call(encoder[0], "http://127.0.0.1:8000")


def test_chat_uses_an_imported_tokenizers_own_template_and_its_end_token(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer, backend = char_hf_tokenizer(template)
    directory = tmp_path / "imported-chat"
    model = randomize_weights(build_model(token_config(vocab_size=backend.get_vocab_size(), max_seq_len=48,
                                                       num_layers=1)), 8).eval()
    save(model, directory, extra={"imported": {"family": "test"}, "objective": "causal_lm"})
    save_tokenizer(tokenizer, directory / "tokenizer.json")
    service = ModelService(directory)
    eos = backend.token_to_id("</s>")
    assert service.eos_ids == (eos,)
    answer = _post(create_app(service), "/v1/chat/completions", {
        "model": "imported-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
        "temperature": 0}).json()
    # The template's BOS is its one token, not added a second time; the answer continues exactly those ids.
    ids = [backend.token_to_id("<s>")] + [backend.token_to_id(c) for c in "[user]hi[assistant]"]
    assert answer["usage"]["prompt_tokens"] == len(ids)
    new = model.generate(torch.tensor([ids]), 6, temperature=0, stop_tokens=[eos])[0, len(ids):].tolist()
    shown = new[:new.index(eos)] if eos in new else new
    assert answer["choices"][0]["message"]["content"] == service.tokenizer.decode(shown)


def test_a_classifiers_embedding_is_the_vector_its_head_pools(tmp_path):
    config = token_config("encoder", vocab_size=CHARS.vocab_size, max_seq_len=32, num_layers=1, position="learned",
                          head={"kind": "classification", "num_classes": 3, "pooling": "sequence"})
    directory = _saved(tmp_path / "classifier", config, 9, {"imported": {"family": "test"}})
    service = ModelService(directory)
    texts = ["ab", "a much longer text"]  # padded together: the padding must get no weight
    pool = service.model.head.pooling
    answer = _post(create_app(service), "/v1/embeddings", {"model": "classifier", "input": texts}).json()
    for item, text in zip(answer["data"], texts):
        with torch.no_grad():
            hidden = service.model(torch.tensor([encode(text)]), return_outputs=True).last_hidden_state[0]
            # CCT's sequence pooling written out: softmax over the tokens of a learned score, weighted sum.
            weights = torch.softmax(pool.score(hidden).squeeze(-1), dim=0)
        expected = torch.nn.functional.normalize((weights.unsqueeze(-1) * hidden).sum(dim=0).float(), dim=0)
        assert item["embedding"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_client_that_disconnects_mid_stream_cancels_its_sequence(lm):
    service, app = lm
    calls, chunks = [], []

    def slow_step(*args):  # a step of a few milliseconds: the disconnect comes long before the 80th
        calls.append(1)
        time.sleep(0.003)

    body = json.dumps({"model": "tiny-lm", "prompt": "x", "max_tokens": 80, "stream": True}).encode()

    async def run():
        gone = asyncio.Event()
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if len(chunks) == 3:
                    gone.set()  # the client reads three chunks, then goes away

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        await app(scope, receive, send)
        await service.on_model_thread(lambda: None)  # whatever the worker was doing is done

    handle = service.model.register_forward_hook(slow_step)
    try:
        asyncio.run(run())
    finally:
        handle.remove()
    assert len(chunks) >= 3 and b"[DONE]" not in b"".join(chunks)
    assert len(calls) < 40  # the prefill and the steps until the cancel reached the worker, not 80


def test_an_encoder_decoders_embeddings_are_its_encoders_mean_pooled_states(tmp_path):
    config = token_config("encoder_decoder", vocab_size=CHARS.vocab_size, max_seq_len=32, num_layers=1,
                          position="learned")
    directory = _saved(tmp_path / "seq2seq", config, 10, {"imported": {"family": "test"}})
    service = ModelService(directory)
    texts = ["ab", "a much longer text"]
    answer = _post(create_app(service), "/v1/embeddings", {"model": "seq2seq", "input": texts}).json()
    for item, text in zip(answer["data"], texts):
        with torch.no_grad():
            hidden = service.model.encode(torch.tensor([encode(text)]))[0].float()
        assert item["embedding"] == pytest.approx(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist(),
                                                  abs=1e-5)


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_a_server_with_a_draft_answers_what_the_model_alone_does(lm, tmp_path, draft):
    """--draft: each request decoded speculatively (greedy equals the model alone, logprobs its own log-softmax)."""
    plain, _ = lm
    if draft == "model":  # a smaller random model over the same tokenizer: mostly wrong guesses
        draft = _saved(tmp_path / "draft", token_config(vocab_size=CHARS.vocab_size, max_seq_len=96, num_layers=1,
                                                        width=32, position="rope"), 9,
                       {"imported": {"family": "test"}, "objective": "causal_lm"})
    service = ModelService(plain.target, draft=draft, draft_tokens=3)
    app = create_app(service)
    assert service.batching == "speculative" and service.engine is None
    prompt = "abcabcabcab"
    body = _post(app, "/v1/completions", {"model": "tiny-lm", "prompt": prompt, "max_tokens": 9, "temperature": 0,
                                          "logprobs": 2}).json()
    [choice] = body["choices"]
    ids = encode(prompt)
    new = _greedy(service, ids, 9)
    assert choice["text"] == CHARS.decode(new)
    expected = _log_softmax(service, ids + new)[len(ids) - 1:-1].gather(1, torch.tensor(new)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), expected, atol=1e-5, rtol=0)
    streamed = _events(_post(app, "/v1/completions", {"model": "tiny-lm", "prompt": prompt, "max_tokens": 9,
                                                      "temperature": 0, "stream": True}))
    assert "".join(chunk["choices"][0]["text"] for chunk in streamed) == choice["text"]


def test_a_draft_is_refused_for_a_model_that_does_not_generate(encoder):
    service, _ = encoder
    with pytest.raises(InputError, match="--draft speeds up language models"):
        ModelService(service.target, draft="ngram")
