"""``POST /v1/images/generations`` in-process (httpx's ASGI transport) over tiny random diffusion Transformers saved as
runs (the dit-digits recipe shrunk): each PNG is the ImageGenerator's image of the same class, seed and steps scaled
by the documented rule, n images, class by id and by name, scale and size, /v1/model, the example call, and every
refusal by field. The official ``openai`` client against a real ``formerkit serve``: the slow test at the end."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shlex

import pytest
import torch

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from formerkit import build_model, save  # noqa: E402
from formerkit.sample import load_image_generator  # noqa: E402
from formerkit.serve import ModelService, create_app, example_call  # noqa: E402
from formerkit.train.config import load_recipe  # noqa: E402

from .conftest import randomize_weights, tiny_overrides  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _saved_run(directory, *, in_channels: int, classes: list[str], seed: int, **overrides):
    """A run directory as training leaves it (model/ with the recipe and the data's preprocessing), holding a tiny
    random dit-digits model: nothing is trained, so the test stays fast; the random weights make every class and
    noise draw a different image."""
    recipe = load_recipe("dit-digits").with_overrides(tiny_overrides(
        "dit-digits", **{"model.config.width": 16, "model.config.stem.in_channels": in_channels,
                         "model.config.condition.timestep_frequencies": 8, "objective.sample_steps": 2,
                         **overrides}))
    model = randomize_weights(build_model(recipe.model.resolve()), seed, std=0.3)
    preprocessing = {"kind": "image", "scale": 1 / 16, "image_size": [8, 8], "in_channels": in_channels,
                     "mean": [0.3] * in_channels, "std": [0.4] * in_channels, "classes": classes}
    save(model.eval(), directory / "model", extra={"recipe": recipe.to_dict(), "preprocessing": preprocessing,
                                                   "objective": recipe.objective.kind})
    return directory


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """A one-channel generator whose classes are named (zero ... nine), served as "tiny-dit"."""
    run = _saved_run(tmp_path_factory.mktemp("gray") / "tiny-dit", in_channels=1, classes=NAMES, seed=3)
    service = ModelService(run)
    return service, create_app(service), load_image_generator(run)


def _post(app, bodies: list[dict], path: str = "/v1/images/generations"):
    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post(path, json=body) for body in bodies]

    return asyncio.run(run())


def _pixels(answer: dict) -> list[torch.Tensor]:
    """The PNGs of an answer as uint8 tensors [C, H, W]."""
    images = []
    for item in answer["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert image.format == "PNG"
        array = torch.from_numpy(np.array(image))
        images.append(array.unsqueeze(0) if image.mode == "L" else array.permute(2, 0, 1))
    return images


def _expected(generator, label: int, n: int, *, steps: int, seed: int, guidance=None, zoom: int = 1):
    """The documented rule written out: round(255 * clamp(image / raw_max, 0, 1)), enlarged by repetition."""
    raw = generator.sample([label] * n, steps=steps, guidance=guidance, seed=seed)
    levels = torch.floor(255 * (raw / generator.raw_max).clamp(0, 1) + 0.5).to(torch.uint8)
    return [image.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2) for image in levels]


def _error(response, status: int, param: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


def test_each_png_is_the_generators_image_of_the_class_seed_and_steps(gray):
    service, app, generator = gray
    [answer] = _post(app, [{"model": "tiny-dit", "prompt": "3", "n": 4, "seed": 7, "steps": 2}])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [item["revised_prompt"] for item in body["data"]] == ["three"] * 4
    assert body["size"] == "8x8" and body["output_format"] == "png" and isinstance(body["created"], int)
    got, expected = _pixels(body), _expected(generator, 3, 4, steps=2, seed=7)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(got[0], got[1])  # one generator for the request: each image its own noise
    assert not torch.equal(got[0], _expected(generator, 4, 4, steps=2, seed=7)[0])  # the class matters
    assert 1 < len(got[0].unique()) and got[0].dtype == torch.uint8


def test_the_same_request_gives_the_same_pngs_and_another_seed_others(gray):
    _, app, _ = gray
    body = {"prompt": "five", "n": 2, "seed": 11}
    first, again, other = _post(app, [body, body, {**body, "seed": 12}])
    assert first.json()["data"] == again.json()["data"]
    assert first.json()["data"] != other.json()["data"]


def test_the_class_by_name_by_id_text_and_by_class_agree(gray):
    _, app, generator = gray
    answers = _post(app, [{"prompt": "seven", "seed": 2}, {"prompt": " Seven ", "seed": 2}, {"prompt": "7", "seed": 2},
                          {"class": 7, "seed": 2}, {"class": 7, "prompt": "seven", "seed": 2}])
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    expected = _expected(generator, 7, 1, steps=2, seed=2)  # the recipe's steps (2) when none are sent
    for answer in answers:
        assert answer.json()["data"][0]["revised_prompt"] == "seven"
        assert torch.equal(_pixels(answer.json())[0], expected[0])


def test_guidance_and_steps_reach_the_sampler(gray):
    _, app, generator = gray
    [answer] = _post(app, [{"class": 1, "seed": 4, "steps": 3, "guidance": 1.0}])
    assert torch.equal(_pixels(answer.json())[0], _expected(generator, 1, 1, steps=3, seed=4, guidance=1.0)[0])


def test_scale_and_size_enlarge_by_nearest_neighbour(gray):
    _, app, generator = gray
    by_scale, by_size, both, auto = _post(app, [{"class": 2, "seed": 5, "scale": 3},
                                                {"class": 2, "seed": 5, "size": "24x24"},
                                                {"class": 2, "seed": 5, "size": "24x24", "scale": 3},
                                                {"class": 2, "seed": 5, "size": "auto"}])
    expected = _expected(generator, 2, 1, steps=2, seed=5, zoom=3)[0]
    for answer in (by_scale, by_size, both):
        assert answer.json()["size"] == "24x24" and torch.equal(_pixels(answer.json())[0], expected)
    assert torch.equal(_pixels(auto.json())[0], _expected(generator, 2, 1, steps=2, seed=5)[0])


def test_refusals_name_the_field(gray):
    _, app, _ = gray
    answers = _post(app, [{"prompt": "cat"}, {"prompt": "10"}, {"class": 10}, {"class": -1}, {"class": "3"},
                          {"class": 3, "prompt": "four"}, {}, {"prompt": "3", "n": 65}, {"prompt": "3", "n": 0},
                          {"prompt": "3", "steps": 0}, {"prompt": "3", "steps": True}, {"prompt": "3", "guidance": -1},
                          {"prompt": "3", "guidance": True},
                          {"prompt": "3", "response_format": "url"}, {"prompt": "3", "output_format": "jpeg"},
                          {"prompt": "3", "size": "10x10"}, {"prompt": "3", "size": "16x24"},
                          {"prompt": "3", "size": "16x16", "scale": 3}, {"prompt": "3", "scale": 0},
                          {"prompt": "3", "seed": -1}])
    params = ["prompt", "prompt", "class", "class", "class", "class", "prompt", "n", "n", "steps", "steps", "guidance",
              "guidance", "response_format", "output_format", "size", "size", "size", "scale", "seed"]
    messages = [_error(answer, 400, param) for answer, param in zip(answers, params, strict=True)]
    assert "'cat'" in messages[0] and "zero, one" in messages[0]
    assert "url" in messages[13]
    [wrong] = _post(app, [{"model": "gpt-image-1", "prompt": "3"}])
    assert _error(wrong, 404, "model") and wrong.json()["error"]["code"] == "model_not_found"


def test_other_tasks_point_to_the_images_endpoint_and_back(gray, tmp_path):
    from .test_openai_api import CHARS, _saved, token_config

    _, app, _ = gray
    [completion] = _post(app, [{"model": "tiny-dit", "prompt": "3"}], "/v1/completions")
    assert "/v1/images/generations" in _error(completion, 400, "model")
    lm = _saved(tmp_path / "lm", token_config(vocab_size=CHARS.vocab_size, max_seq_len=16, num_layers=1), 1,
                {"imported": {"family": "test"}, "objective": "causal_lm"})
    [image] = _post(create_app(ModelService(lm)), [{"prompt": "3"}])
    assert "not an image generator" in _error(image, 400, "model")


def test_the_model_description_and_the_example_call(gray):
    service, app, generator = gray
    info = service.describe()
    assert info["task"] == "image_generation" and info["classes"] == NAMES
    assert (info["image_size"], info["in_channels"], info["steps"], info["guidance"], info["raw_max"]) == \
        ([8, 8], 1, 2, 2.0, 16.0)
    command = shlex.split(example_call(service, "http://test"))
    assert command[2] == "http://test/v1/images/generations"
    [answer] = _post(app, [json.loads(command[command.index("-d") + 1])])
    assert answer.status_code == 200 and answer.json()["data"][0]["revised_prompt"] == "zero"


def test_three_channels_answer_rgb_pngs(tmp_path):
    run = _saved_run(tmp_path / "rgb", in_channels=3, classes=[str(i) for i in range(10)], seed=4)
    service = ModelService(run)
    [answer] = _post(create_app(service), [{"prompt": "4", "n": 2, "seed": 1}])
    got = _pixels(answer.json())
    expected = _expected(service.image_generator, 4, 2, steps=2, seed=1)
    assert got[0].shape == (3, 8, 8) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.slow
def test_the_official_client_and_the_printed_example_against_formerkit_serve(gray):
    """A real ``formerkit serve`` subprocess over the same run: the openai client's images.generate as the brief
    writes it, and the curl line the server prints, as printed."""
    import subprocess

    from .test_serve_openai import Server, openai

    service, _, generator = gray
    server = Server(service.target)
    try:
        assert "/v1/images/generations" in server.example
        answer = server.client.images.generate(model="tiny-dit", prompt="3", n=4, response_format="b64_json",
                                                extra_body={"seed": 1, "steps": 2, "guidance": 2})
        got = _pixels(answer.model_dump())
        assert [item.revised_prompt for item in answer.data] == ["three"] * 4
        assert all(torch.equal(a, b) for a, b in zip(got, _expected(generator, 3, 4, steps=2, seed=1, guidance=2)))
        with pytest.raises(openai.BadRequestError, match="response_format"):
            server.client.images.generate(model="tiny-dit", prompt="3", response_format="url")
        with pytest.raises(openai.NotFoundError):
            server.client.images.generate(model="dall-e-3", prompt="3")
        printed = subprocess.run(server.example, shell=True, capture_output=True, text=True, timeout=60)
        assert json.loads(printed.stdout)["data"][0]["revised_prompt"] == "zero"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_maskgit_run_is_served_as_an_image_generator(trained_run):
    run = trained_run("maskgit-digits", **{"run.threads": 1})
    service = ModelService(run)
    assert service.describe()["objective"] == "masked_generation"
    [answer] = _post(create_app(service), [{"prompt": "6", "n": 2, "seed": 3, "steps": 2}])
    expected = _expected(load_image_generator(run), 6, 2, steps=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(_pixels(answer.json()), expected))
