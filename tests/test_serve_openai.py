"""formerkit serve with the official ``openai`` client: a real server subprocess on loopback, one per module and run
(a tiny char-lm run; a tiny masked-LM run for embeddings), answers as the model itself computes; and the example call
the server prints works as printed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import formerkit  # noqa: E402
from formerkit.data import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # each server serves a run trained for it

# The default chat template's markers take ~30 characters: a context of 96 leaves room to answer.
LM = {"schedule.steps": 2, "eval.every": 2, "data.seq_len": 96}


class Server:
    """``formerkit serve RUN --port 0`` in a subprocess: its URL and the example call it printed."""

    def __init__(self, run):
        self.process = subprocess.Popen([sys.executable, "-m", "formerkit.cli", "serve", str(run), "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120) or self.process.poll() is not None:
            self.stop()
            pytest.fail("the server did not print its URL; it wrote:\n" + "\n".join(self.lines[-40:]))
        banner = "\n".join(self.lines)
        self.url = re.search(r"at (http://127\.0\.0\.1:\d+)", banner).group(1)
        self.example = re.search(r"^try: (.*)$", banner, re.MULTILINE).group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("try: "):
                self.ready.set()
        self.ready.set()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def lm_run(trained_run):
    return trained_run("char-lm", **LM)


@pytest.fixture(scope="module")
def lm(lm_run):
    server = Server(lm_run)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(lm_run):
    return formerkit.load(lm_run / "model").eval(), load_tokenizer(lm_run / "model" / "tokenizer.json")


def _greedy(model, ids: list[int], count: int) -> list[int]:
    network, _ = model
    return network.generate(torch.tensor([ids]), count, temperature=0)[0, len(ids):].tolist()


def test_models_list_and_a_greedy_completion_are_the_runs(lm, lm_run, model):
    assert [entry.id for entry in lm.client.models.list().data] == [lm_run.name]
    _, tokenizer = model
    answer = lm.client.completions.create(model=lm_run.name, prompt="def main(", max_tokens=12, temperature=0)
    ids = tokenizer.encode("def main(")
    assert answer.choices[0].text == tokenizer.decode(_greedy(model, ids, 12))
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 12)


def test_streamed_completions_and_chats_add_up_to_the_answers(lm, lm_run, model):
    _, tokenizer = model
    plain = lm.client.completions.create(model=lm_run.name, prompt="import ", max_tokens=10, temperature=0)
    chunks = list(lm.client.completions.create(model=lm_run.name, prompt="import ", max_tokens=10, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    messages = [{"role": "user", "content": "Write a loop."}]
    chat = lm.client.chat.completions.create(model=lm_run.name, messages=messages, max_tokens=10, temperature=0)
    streamed = list(lm.client.chat.completions.create(model=lm_run.name, messages=messages, max_tokens=10,
                                                      temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == chat.choices[0].message.content
    # The chat is the default template's rendering continued (a char-lm run has no template of its own).
    rendered = "<|user|>\nWrite a loop.<|end|>\n<|assistant|>\n"
    new = _greedy(model, tokenizer.encode(rendered), 10)
    assert chat.choices[0].message.content == tokenizer.decode(new).split("<|end|>")[0]
    assert chat.usage.prompt_tokens == len(tokenizer.encode(rendered))


def test_n_seeded_samples_and_stop_sequences(lm, lm_run, model):
    _, tokenizer = model
    three = lm.client.completions.create(model=lm_run.name, prompt="for ", max_tokens=8, temperature=1.0, n=3,
                                         seed=5)
    alone = [lm.client.completions.create(model=lm_run.name, prompt="for ", max_tokens=8, temperature=1.0,
                                          seed=5 + i).choices[0].text for i in range(3)]
    assert [choice.text for choice in sorted(three.choices, key=lambda c: c.index)] == alone
    full = tokenizer.decode(_greedy(model, tokenizer.encode("class "), 16))
    stop = full[5:7]
    cut = lm.client.completions.create(model=lm_run.name, prompt="class ", max_tokens=16, temperature=0,
                                       stop=[stop, "@@@"])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax_with_echo(lm, lm_run, model):
    network, tokenizer = model
    answer = lm.client.completions.create(model=lm_run.name, prompt="return", max_tokens=6, temperature=0,
                                          logprobs=3, echo=True)
    prompt = tokenizer.encode("return")
    ids = prompt + _greedy(model, prompt, 6)
    with torch.no_grad():
        reference = torch.log_softmax(network(torch.tensor([ids]))[0].float(), dim=-1)
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].text == tokenizer.decode(ids)
    assert logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(
        [float(reference[position - 1, ids[position]]) for position in range(1, len(ids))], abs=1e-4)
    best = reference[len(prompt) - 1].topk(3)
    assert logprobs.top_logprobs[len(prompt)] == pytest.approx(
        {tokenizer.decode([index]): value for index, value in zip(best.indices.tolist(), best.values.tolist())},
        abs=1e-4)
    chat = lm.client.chat.completions.create(model=lm_run.name, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(item.top_logprobs) == 2 for item in content)
    assert all(item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5) for item in content)  # greedy


def test_bad_requests_raise_the_clients_errors_naming_the_field(lm, lm_run):
    with pytest.raises(openai.BadRequestError) as bad:
        lm.client.completions.create(model=lm_run.name, prompt="x", max_tokens=4, temperature=9)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        lm.client.completions.create(model=lm_run.name, prompt="x" * 200, max_tokens=4)
    assert long.value.param == "prompt" and long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        lm.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found" and lm_run.name in str(missing.value)


def test_the_printed_example_call_works_as_printed(lm, lm_run):
    assert f'"model": "{lm_run.name}"' in lm.example and "/v1/completions" in lm.example
    result = subprocess.run(lm.example, shell=True, capture_output=True, text=True, timeout=60)
    answer = json.loads(result.stdout)
    assert answer["object"] == "text_completion" and len(answer["choices"][0]["text"]) > 0
    # The README's curl form (-d without a content type: curl says form-urlencoded) answers too.
    legacy = subprocess.run(["curl", "-s", f"{lm.url}/v1/generate", "-d",
                             '{"prompt": "def ", "max_new_tokens": 8, "temperature": 0}'],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(legacy.stdout)["num_tokens"] == 8


def test_embeddings_of_an_encoder_run_are_its_mean_pooled_hidden_states(trained_run):
    run = trained_run("mlm-stdlib", **{"schedule.steps": 2, "eval.every": 2})
    server = Server(run)
    try:
        texts = ["def f(x):", "import os"]
        answer = server.client.embeddings.create(model=run.name, input=texts)  # the client asks for base64
        network = formerkit.load(run / "model").eval()
        tokenizer = load_tokenizer(run / "model" / "tokenizer.json")
        for item, text in zip(answer.data, texts):
            with torch.no_grad():
                hidden = network(torch.tensor([tokenizer.encode(text)]), return_outputs=True).last_hidden_state
            expected = torch.nn.functional.normalize(hidden[0].float().mean(dim=0), dim=0)
            assert item.embedding == pytest.approx(expected.tolist(), abs=1e-4)
        assert answer.usage.prompt_tokens == sum(len(tokenizer.encode(text)) for text in texts)
        with pytest.raises(openai.BadRequestError) as refused:
            server.client.completions.create(model=run.name, prompt="x")
        assert refused.value.param == "model" and "/v1/embeddings" in str(refused.value)
        assert "/v1/embeddings" in server.example
        printed = json.loads(subprocess.run(server.example, shell=True, capture_output=True, text=True,
                                            timeout=60).stdout)
        assert len(printed["data"][0]["embedding"]) == network.config.width
    finally:
        server.stop()

