"""save/load: identical models, atomic files, corrupted or truncated files refused."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit
from formerkit import CheckpointError


def _models():
    yield formerkit.model_config("char_gpt", num_layers=2, width=64, num_heads=4)  # tied head
    yield formerkit.model_config("llama_tiny", num_layers=2, width=64, num_heads=4, num_kv_heads=2, hidden_size=96,
                                 vocab_size=50, max_seq_len=32)
    yield formerkit.model_config("cct_2_3x2_32")
    yield formerkit.model_config("bert_base_mlm", num_layers=1, width=32, num_heads=2, vocab_size=40)


def _inputs(config):
    if config.stem.kind == "tokens":
        return torch.randint(0, config.stem.vocab_size, (2, 12))
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("config", list(_models()), ids=lambda c: f"{c.arch}-{c.stem.kind}-{c.head.kind}")
def test_save_then_load_gives_identical_outputs_and_config(config, tmp_path):
    torch.manual_seed(0)
    model = formerkit.build_model(config).eval()
    formerkit.save(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = formerkit.load(tmp_path / "m").eval()
    assert loaded.config == config
    x = _inputs(config)
    assert torch.equal(model(x), loaded(x))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    if config.head.tie_embeddings:
        assert loaded.head.projection.weight is loaded.stem.tokens.weight


def test_saved_weights_are_safetensors_not_pickle(tmp_path):
    formerkit.save(formerkit.create_model("cct_2_3x2_32"), tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_length])
    assert "layers" in "".join(header)  # tensor names in a JSON header
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]


def test_saved_files_get_the_permissions_of_a_plain_write(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        formerkit.save(formerkit.create_model("cct_2_3x2_32"), tmp_path)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        for name in ("model.safetensors", "config.json"):
            assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(mask)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    formerkit.save(formerkit.create_model("cct_2_3x2_32"), tmp_path)
    return tmp_path


def test_truncated_weights_are_refused(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        formerkit.load(saved)


def test_corrupted_weights_are_refused(saved):
    path = saved / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        formerkit.load(saved)


def test_corrupted_config_is_refused(saved):
    path = saved / "config.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        formerkit.load(saved)


def test_config_that_does_not_match_the_weights_is_refused(saved):
    path = saved / "config.json"
    document = json.loads(path.read_text())
    document["model"]["width"] = 64
    document["model"]["attention"]["num_heads"] = 2
    del document["weights"]["sha256"], document["weights"]["bytes"]
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="does not hold this model's weights"):
        formerkit.load(saved)


def test_invalid_config_in_a_saved_model_names_the_file(saved):
    path = saved / "config.json"
    document = json.loads(path.read_text())
    document["model"]["width"] = -1
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"config.json: invalid model config: width"):
        formerkit.load(saved)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        formerkit.load(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        formerkit.load(tmp_path)


def test_save_leaves_no_temporary_files_and_overwrites_cleanly(tmp_path):
    model = formerkit.create_model("cct_2_3x2_32")
    formerkit.save(model, tmp_path)
    formerkit.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
