"""``formerkit bench attention``: what it measures and writes, at tiny sizes (times are never asserted)."""

from __future__ import annotations

import json

import pytest

from formerkit import InputError
from formerkit.bench.attention import attention_benchmark, format_table
from formerkit.cli import main


@pytest.mark.slow
def test_records_one_measurement_per_kind_and_length_with_the_documented_fields():
    records = attention_benchmark((150, 300), window=8, heads=2, head_dim=8, repeats=1)
    assert [(r["kind"], r["seq_len"]) for r in records] == [
        (kind, n) for n in (150, 300) for kind in ("full", "window", "linear")]
    for record in records:
        assert set(record) == {"kind", "seq_len", "fwd_ms", "fwd_bwd_ms", "peak_mb"}
        assert record["fwd_ms"] > 0 and record["fwd_bwd_ms"] > 0 and record["peak_mb"] >= 0
    table = format_table(records)
    assert table.count("\n") == 1 + len(records) and "| 300 | window |" in table


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json_lines_and_a_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.jsonl", tmp_path / "attention.png"
    assert main(["bench", "attention", "--seq-lens", "140", "--window", "8", "--heads", "2", "--head-dim", "8",
                 "--repeats", "1", "--no-memory", "--json", str(json_path), "--plot", str(plot_path)]) == 0
    records = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["full", "window", "linear"] and records[0]["peak_mb"] is None
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 140 | linear |" in capsys.readouterr().out


@pytest.mark.parametrize("arguments,message", [
    ({"window": 0}, "window must be an integer >= 1"),
    ({"kinds": ("full", "sparse")}, "unknown kinds"),
    ({"seq_lens": (0,)}, "sequence lengths"),
])
def test_bad_arguments_are_refused(arguments, message):
    options = {"seq_lens": (64,), **arguments}
    with pytest.raises(InputError, match=message):
        attention_benchmark(options.pop("seq_lens"), **options)
