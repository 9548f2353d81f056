"""Recipes that start from a model (model.from): a run, a saved model, a Hugging Face directory, a preset."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit
from formerkit.errors import ConfigError
from formerkit.train import load_recipe, train
from formerkit.train.config import TrainConfig

from ..conftest import QUIET, token_config

# A few steps at a learning rate too small to move a weight visibly: the run's weights are its start's.
STILL = {**QUIET, "schedule.steps": 2, "schedule.batch_size": 2, "optim.lr": 1e-12, "eval.every": 2,
         "eval.batches": 1}


def text_recipe(tmp_path, start: str, **extra) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus of text for a tiny model to read again and again.\n\n" * 30)
    data = {"name": "from", "model": {"from": start},
            "data": {"source": "text", "path": str(corpus), "tokenizer": "byte", "seq_len": 16}}
    return TrainConfig.from_dict(data).with_overrides({**STILL, **extra})


def assert_close(model, reference, atol=1e-6):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name].float(), want[name].float(), atol=atol), name


def test_from_a_saved_model_starts_from_its_weights(tmp_path):
    torch.manual_seed(3)
    start = formerkit.build_model(token_config(vocab_size=256, width=32, max_seq_len=16, num_heads=2))
    formerkit.save(start, tmp_path / "saved")
    result = train(text_recipe(tmp_path, str(tmp_path / "saved")), tmp_path / "run")
    assert_close(result.model, start)
    assert result.model.config == start.config


def test_from_a_run_takes_its_weights_and_tokenizer(tmp_path, trained_run):
    run = trained_run("char-lm")
    start = formerkit.load(run / "model")
    result = train(text_recipe(tmp_path, str(run), **{"data.seq_len": 32}), tmp_path / "run")
    assert_close(result.model, start)
    saved = json.loads((tmp_path / "run" / "model" / "tokenizer.json").read_text())
    assert saved == json.loads((run / "model" / "tokenizer.json").read_text())


def test_from_a_hugging_face_directory_converts_it_and_keeps_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    # a byte-level tokenizer of 256 symbols plus specials, as tokenizer.json + tokenizer_config.json
    vocab = {chr(c): c - 32 for c in range(32, 127)} | {"\n": 95, "<|endoftext|>": 96}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    start = formerkit.from_hf(tmp_path / "hf")
    result = train(text_recipe(tmp_path, str(tmp_path / "hf")), tmp_path / "run")
    assert_close(result.model, start)
    tokenizer = formerkit.data.load_tokenizer(tmp_path / "run" / "model" / "tokenizer.json")
    assert tokenizer.kind == "hf" and tokenizer.chat_template is not None
    assert tokenizer.encode("a b") == backend.encode("a b").ids


def test_from_a_preset_is_model_preset(tmp_path):
    overrides = {**STILL, "optim.lr": 1e-3, "model.num_layers": 1, "model.width": 32, "model.num_heads": 2}
    a = train(text_recipe(tmp_path, "char_gpt", **overrides), tmp_path / "a").model
    recipe = text_recipe(tmp_path, "char_gpt", **overrides).to_dict()
    recipe["model"] = {"preset": "char_gpt", "overrides": recipe["model"]["overrides"]}
    b = train(TrainConfig.from_dict(recipe), tmp_path / "b").model
    assert_close(a, b, atol=0)


def test_model_from_beside_a_preset_or_config_is_refused_by_name():
    with pytest.raises(ConfigError, match="model.from.*no model.preset beside it"):
        TrainConfig.from_dict({"model": {"from": "runs/x", "preset": "char_gpt"}})
    with pytest.raises(ConfigError, match="model.from.*no model.config beside it"):
        TrainConfig.from_dict({"model": {"from": "runs/x", "config": {"width": 32}}})


def test_a_missing_start_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="model.from.*a run directory, a saved model, a Hugging Face directory"):
        train(text_recipe(tmp_path, str(tmp_path / "nowhere")), tmp_path / "run")


def test_data_the_start_cannot_read_is_refused(tmp_path):
    torch.manual_seed(0)
    formerkit.save(formerkit.build_model(token_config(vocab_size=256, max_seq_len=8, num_heads=2)), tmp_path / "m")
    with pytest.raises(ConfigError, match=r"data.seq_len.*at most the starting model's max_seq_len \(8\)"):
        train(text_recipe(tmp_path, str(tmp_path / "m")), tmp_path / "run")
    formerkit.save(formerkit.build_model(token_config(vocab_size=100, max_seq_len=16, num_heads=2)), tmp_path / "v")
    with pytest.raises(ConfigError, match="vocabulary holds the data's 256 token ids"):
        train(text_recipe(tmp_path, str(tmp_path / "v")), tmp_path / "run2")


def test_the_shipped_instruct_recipe_starts_from_a_run_with_lora():
    recipe = load_recipe("instruct-lm")
    assert recipe.model.from_ == "runs/char-lm" and recipe.data.source == "instruct"
    assert recipe.adapt["method"] == "lora"


def test_overrides_that_would_change_the_starts_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    formerkit.save(formerkit.build_model(token_config(vocab_size=256, max_seq_len=16, num_heads=2)), tmp_path / "m")
    with pytest.raises(ConfigError, match=r"model.overrides.*keep the weights.*would not come from the start"):
        train(text_recipe(tmp_path, str(tmp_path / "m"), **{"model.width": 64}), tmp_path / "run")
    # dropout keeps every weight: allowed, and the run starts from the saved weights
    result = train(text_recipe(tmp_path, str(tmp_path / "m"), **{"model.dropout": 0.1}), tmp_path / "run2")
    assert result.model.config.dropout == 0.1
    assert_close(result.model, formerkit.load(tmp_path / "m"))
