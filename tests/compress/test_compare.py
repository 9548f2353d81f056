"""formerkit compare: variants of one run measured together, the Pareto front, and the files written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from formerkit.checkpoint import load, save
from formerkit.cli import main
from formerkit.compress.compare import Variant, compare, latency_warnings, markdown_table, non_dominated, pareto_front
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


# ----- the Pareto front against its definition, the latency spread and its warning -----


def _brute_force_front(points):
    """On the front: no other point is <= on every axis and < on one (written out, point by point)."""
    front = []
    for i, mine in enumerate(points):
        beaten = False
        for j, other in enumerate(points):
            if j != i and all(o <= m for o, m in zip(other, mine)) and any(o < m for o, m in zip(other, mine)):
                beaten = True
        front.append(not beaten)
    return front


@pytest.mark.parametrize("seed", range(20))
def test_the_front_equals_the_brute_force_definition_with_many_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    # values from {0, 1, 2, 3}: many equal points and equal coordinates
    points = [tuple(float(x) for x in row) for row in torch.randint(0, 4, (12, 3), generator=generator).tolist()]
    assert non_dominated(points) == _brute_force_front(points)
    variants = [_variant(f"v{i}", q, latency, size) for i, (q, latency, size) in enumerate(points)]
    for higher, sign in ((True, -1), (False, 1)):
        assert pareto_front(variants, higher) == _brute_force_front([(sign * q, lat, s) for q, lat, s in points])
        assert pareto_front(variants, higher, axes=("latency",)) == _brute_force_front(
            [(sign * q, lat) for q, lat, _ in points])
        assert pareto_front(variants, higher, axes=("size",)) == _brute_force_front(
            [(sign * q, s) for q, _, s in points])


def test_a_variant_beaten_on_quality_and_latency_is_off_the_latency_panels_front():
    # The bug: "small" is on the three-axis front (nothing is smaller) but "fast" beats it on quality and latency;
    # the latency panel drew its front line through "small".
    variants = [_variant("base", 0.95, 10.0, 10.0), _variant("small", 0.90, 8.0, 2.0),
                _variant("fast", 0.93, 5.0, 6.0)]
    assert pareto_front(variants, higher_is_better=True) == [True, True, True]
    assert pareto_front(variants, higher_is_better=True, axes=("latency",)) == [True, False, True]
    assert pareto_front(variants, higher_is_better=True, axes=("size",)) == [True, True, True]


def _timed(name, spread):
    variant = _variant(name, 0.9, spread[2], 1.0)
    variant.latency_spread_ms = {64: spread}
    return variant


@pytest.mark.parametrize("iqr, warned", [(2.0, True), (1.0, False), (0.5, False), (1.01, True)])
def test_the_latency_warning_appears_exactly_when_the_spread_exceeds_the_difference(iqr, warned):
    # medians 10 and 11 (difference 1); "b" has the interquartile range under test, "a" a narrow one
    a = _timed("a", [9.9, 9.95, 10.0, 10.05, 10.1])
    b = _timed("b", [10.0, 11.0 - iqr / 2, 11.0, 11.0 + iqr / 2, 13.0])
    far = _timed("far", [29.0, 29.5, 30.0, 30.5, 31.0])
    warnings = latency_warnings([a, b, far])
    assert bool(warnings) == warned
    if warned:
        assert len(warnings) == 1 and warnings[0].startswith("batch 64:") and "a/b" in warnings[0]
        assert "far" not in warnings[0]
    result = {"metric": "test_accuracy", "higher_is_better": True, "batch_sizes": [64], "repeats": {64: 5},
              "threads": 1, "torch": torch.__version__, "variants": [a, b, far], "warnings": warnings}
    table = markdown_table(result)
    assert ("WARNING: batch 64:" in table) == warned
    assert f"| {11.0:.2f} [{11.0 - iqr / 2:.2f}–{11.0 + iqr / 2:.2f}] |" in table


@pytest.mark.slow
def test_the_number_of_timed_passes_follows_the_time_budget(tiny_classifier_run):
    budget = compare([tiny_classifier_run, tiny_classifier_run], batch_sizes=(1, 4), seconds=0.2, warmup=1)
    assert set(budget["repeats"]) == {1, 4} and all(n >= 5 for n in budget["repeats"].values())
    fixed = compare([tiny_classifier_run], batch_sizes=(2,), repeats=7)
    assert fixed["repeats"] == {2: 7}
    spread = fixed["variants"][0].latency_spread_ms[2]
    assert spread == sorted(spread) and spread[2] == fixed["variants"][0].latency_ms[2]
