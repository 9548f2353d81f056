"""formerkit compare: variants of one run measured together, the Pareto front, and the files written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from formerkit.checkpoint import load, save
from formerkit.cli import main
from formerkit.compress.compare import Variant, compare, pareto_front
from formerkit.errors import FormerkitError
from formerkit.runs import evaluate_run, load_run_model


def _variant(name, value, latency, megabytes):
    return Variant(name=name, path=name, metric="test_accuracy", value=value, parameters=1, megabytes=megabytes,
                   latency_ms={64: latency})


def test_pareto_front_keeps_exactly_the_undominated_variants():
    variants = [_variant("base", 0.95, 10.0, 10.0), _variant("int8", 0.949, 5.0, 3.0),
                _variant("worse", 0.94, 6.0, 4.0), _variant("tie", 0.95, 10.0, 10.0),
                _variant("slow-best", 0.97, 20.0, 12.0)]
    # "worse" is beaten by int8 on all three; "base" and "tie" are equal (neither dominates the other).
    assert pareto_front(variants, higher_is_better=True) == [True, True, False, True, True]
    # With loss (lower is better) the quality order flips: "worse" (0.94) is now the best quality.
    assert pareto_front(variants, higher_is_better=False) == [False, True, True, False, False]


def _halved_copy(run, out):
    """A variant of the run: the same model with its last layer's feed-forward output halved (a different model
    with the same shapes) saved with the run's recipe."""
    model, _, extra = load_run_model(run)
    with torch.no_grad():
        model.encoder.blocks[-1].feedforward.fc_out.weight.mul_(0.5)
    save(model, out, extra=extra)
    return out


@pytest.mark.slow
def test_compare_measures_every_variant_with_its_own_metric(tiny_classifier_run, tmp_path):
    variant = _halved_copy(tiny_classifier_run, tmp_path / "halved")
    result = compare([tiny_classifier_run, variant], batch_sizes=(1, 8), repeats=2, warmup=1)
    first, second = result["variants"]
    assert result["metric"] == "test_accuracy" and result["higher_is_better"]
    # The quality is the run's own evaluation of each model.
    assert first.value == evaluate_run(tiny_classifier_run, ["test"])["test_accuracy"]
    assert second.value == evaluate_run(variant, ["test"])["test_accuracy"]
    assert first.name == tiny_classifier_run.name and second.name == "halved"
    assert first.parameters == second.parameters == load(tiny_classifier_run / "model").num_parameters()
    weights = (tiny_classifier_run / "model" / "model.safetensors").stat().st_size
    assert first.megabytes == weights / 1e6
    assert set(first.latency_ms) == {1, 8} and all(v > 0 for v in first.latency_ms.values())


@pytest.mark.slow
def test_cli_compare_writes_table_plot_and_json(tiny_classifier_run, tmp_path, capsys):
    variant = _halved_copy(tiny_classifier_run, tmp_path / "halved")
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_classifier_run), str(variant), "--names", "float,half", "--out", str(out),
                 "--batch-sizes", "2", "--repeats", "2"]) == 0
    table = (out / "compare.md").read_text()
    assert table.splitlines()[0].startswith("| variant | test_accuracy |")
    assert "| float |" in table and "| half |" in table and table in capsys.readouterr().out
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads((out / "compare.json").read_text())
    assert [v["name"] for v in records["variants"]] == ["float", "half"]
    assert records["batch_sizes"] == [2]


@pytest.mark.slow
def test_compare_refuses_variants_of_different_tasks(tiny_classifier_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_classifier_run / "model", other)
    document = json.loads((other / "config.json").read_text())
    document["extra"]["recipe"]["data"]["augment"] = False
    (other / "config.json").write_text(json.dumps(document))
    with pytest.raises(FormerkitError, match="not a variant"):
        compare([tiny_classifier_run, other], repeats=1)


@pytest.mark.parametrize("kwargs, message", [({"names": ["a", "b"]}, "1 targets"),
                                             ({"batch_sizes": (0,)}, "positive integers"),
                                             ({"repeats": 0}, "repeats must be")])
@pytest.mark.slow
def test_compare_refuses_bad_arguments_before_loading(tiny_classifier_run, kwargs, message):
    with pytest.raises(FormerkitError, match=message):
        compare([tiny_classifier_run], **kwargs)


def test_compare_refuses_a_directory_that_is_no_model(tmp_path):
    with pytest.raises(FormerkitError, match="neither a run directory"):
        compare([tmp_path])
