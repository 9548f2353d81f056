"""The CLI parses arguments and calls the library."""

from __future__ import annotations

import subprocess
import sys

import pytest

import formerkit
from formerkit.cli import main


def test_models_lists_every_preset_with_its_parameter_count(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in formerkit.list_models():
        assert name in out
    assert "124,439,808" in out


def test_summary_of_a_preset_a_saved_model_and_a_config_file(capsys, tmp_path):
    assert main(["summary", "char_gpt", "--batch", "2", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    assert "3,290,624 parameters" in out and "forward FLOPs per token" in out
    formerkit.save(formerkit.create_model("cct_2_3x2_32"), tmp_path / "model")
    assert main(["summary", str(tmp_path / "model")]) == 0
    assert "283,723" in capsys.readouterr().out
    formerkit.model_config("char_gpt", num_layers=1).to_yaml(tmp_path / "c.yaml")
    assert main(["summary", str(tmp_path / "c.yaml"), "--set", "width=128"]) == 0
    assert "width" not in capsys.readouterr().err


def test_summary_with_overrides_and_errors(capsys):
    assert main(["summary", "llama_tiny", "--set", "num_layers=1", "--set", "attention.num_kv_heads=1"]) == 0
    assert main(["summary", "gpt-2"]) == 2
    assert "did you mean 'gpt2'" in capsys.readouterr().err
    assert main(["summary", "char_gpt", "--seq", "100000"]) == 2
    assert "max_seq_len (256)" in capsys.readouterr().err
    assert main(["summary", "char_gpt", "--set", "nonsense"]) == 2
    assert main(["summary", "char_gpt", "--set", "widht=3"]) == 2
    assert "did you mean 'width'" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "formerkit.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and formerkit.__version__ in result.stdout


def test_set_reads_scientific_notation_as_a_number():
    from formerkit.cli import _parse_overrides

    # YAML 1.1 (PyYAML) reads 1e-3 as a string; --set optim.lr=1e-3 means the number.
    parsed = _parse_overrides(["optim.lr=1e-3", "optim.eps=-2.5E-9", "model.width=64", "name=run1e3"])
    assert parsed == {"optim.lr": 1e-3, "optim.eps": -2.5e-9, "model.width": 64, "name": "run1e3"}
