"""Training on packed rows (data.pack): each document computes exactly what it computes alone in a padded row, the loss
never predicts across a document boundary nor at padding, and packed runs train and evaluate end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import formerkit
from formerkit.data.packing import PackedSplit, one_document_per_row, pack_documents
from formerkit.train import train
from formerkit.train.config import ObjectiveConfig
from formerkit.train.objectives import make_objective

from ..conftest import token_config

ROW = 25  # tokens per row: the model reads 24 of them (max_seq_len), the last is only predicted
VOCAB = 40


def tiny_decoder(position: str, randomize) -> formerkit.Transformer:
    config = token_config(vocab_size=VOCAB, max_seq_len=ROW - 1, num_heads=2, position=position)
    model = formerkit.build_model(config)
    randomize(model, 0)
    return model.eval()


def documents(count: int = 14, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, ROW + 1, (count,), generator=generator).tolist() + [ROW + 9]  # one cut in two
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]


def as_batch(rows) -> dict[str, torch.Tensor]:
    return PackedSplit(rows).take(torch.arange(len(rows.tokens)))


def unpacked_logits(model, unpacked) -> torch.Tensor:
    """Plain unpacked processing: one piece per right-padded row, padding given as attention_mask."""
    tokens, keep = unpacked.tokens[:, :-1].long(), unpacked.document_ids[:, :-1] >= 0
    return model(tokens, attention_mask=keep)


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_each_packed_document_gets_the_logits_it_gets_alone_in_a_padded_row(position, randomize):
    model = tiny_decoder(position, randomize)
    docs = documents()
    packed, unpacked = pack_documents(docs, ROW, seed=0), one_document_per_row(docs, ROW)
    assert len(packed.tokens) < len(unpacked.tokens)  # packing saved rows
    objective = make_objective(ObjectiveConfig(kind="causal_lm"), None)
    inputs, _, kwargs = objective.inputs_and_targets(as_batch(packed))
    with torch.no_grad():
        packed_logits = model(inputs, **kwargs)
        alone = unpacked_logits(model, unpacked)
    # Pieces in document order are the unpacked rows, in order.
    order = sorted(range(len(packed.pieces)), key=lambda i: tuple(packed.pieces[i, :2].tolist()))
    compared = 0
    for alone_row, index in enumerate(order):
        _, _, row, column, length = packed.pieces[index].tolist()
        readable = min(length, ROW - 1 - column)  # the row's last token is only a target
        got = packed_logits[row, column:column + readable]
        expected = alone[alone_row, :readable]
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (position, index, (got - expected).abs().max())
        compared += readable
    assert compared > 100


def test_the_packed_loss_is_the_unpacked_loss_averaged_over_the_same_tokens(randomize):
    model = tiny_decoder("rope", randomize)
    docs = documents(seed=1)
    packed, unpacked = pack_documents(docs, ROW, seed=0), one_document_per_row(docs, ROW)
    objective = make_objective(ObjectiveConfig(kind="causal_lm"), None)
    with torch.no_grad():
        logits = unpacked_logits(model, unpacked)
        # By hand: within each document, every token after the first predicted from those before it.
        targets = unpacked.tokens[:, 1:].long().masked_fill(unpacked.document_ids[:, 1:] < 0, -100)
        per_token = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
        count = int((targets != -100).sum())
        assert count == sum(len(d) for d in docs) - len(unpacked.tokens)  # every piece's first token is context
        expected = per_token.sum() / count
        loss = objective.loss(model, as_batch(packed), torch.Generator())
        metrics = objective.evaluate(model, PackedSplit(packed).eval_batches(2))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)


def test_no_target_crosses_a_document_boundary_or_lies_in_padding():
    objective = make_objective(ObjectiveConfig(kind="causal_lm"), None)
    batch = {"tokens": torch.tensor([[11, 12, 13, 21, 22, 0, 0]]),
             "document_ids": torch.tensor([[0, 0, 0, 1, 1, -1, -1]]),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0]])}
    inputs, targets, kwargs = objective.inputs_and_targets(batch)
    assert inputs.tolist() == [[11, 12, 13, 21, 22, 0]]
    # 13 does not predict 21 (another document); 22 predicts nothing (padding follows); padding predicts nothing.
    assert targets.tolist() == [[12, 13, -100, 22, -100, -100]]
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert kwargs["attention_mask"].tolist() == [[True] * 5 + [False]]
    assert objective.units(batch) == 5


def test_padding_in_packed_rows_is_left_out_of_expert_routing(randomize):
    config = token_config(vocab_size=VOCAB, num_layers=1, max_seq_len=ROW - 1, num_heads=2,
                          feedforward={"num_experts": 4})
    model = formerkit.build_model(config).eval()
    packed = pack_documents(documents(seed=2), ROW, seed=0)
    objective = make_objective(ObjectiveConfig(kind="causal_lm"), None)
    inputs, _, kwargs = objective.inputs_and_targets(as_batch(packed))
    out = model(inputs, return_outputs=True, **kwargs)
    real = int(kwargs["attention_mask"].sum())
    assert real < inputs.numel()
    assert int(out.expert_counts[0].sum()) == real * config.feedforward.experts_per_token


# ----- end to end -----

FOUR_STEPS = {"schedule.steps": 4, "eval.every": 2, "eval.batches": 2}


@pytest.mark.slow
def test_char_lm_trains_and_evaluates_on_packed_stdlib_files(tmp_path, tiny, console):
    overrides = tiny("char-lm", **FOUR_STEPS, **{"data.seq_len": 64, "data.pack": True})
    result = train("char-lm", tmp_path / "run", overrides=overrides, console=console)
    assert result.summary["status"] == "completed"
    assert math.isfinite(result.summary["valid_loss"])
    # The summary's throughput is the mean of the train records' (each one > 0).
    rates = [json.loads(line)["tokens_per_s"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert rates and all(rate > 0 for rate in rates)
    assert result.summary["train_tokens_per_s"] == round(sum(rates) / len(rates), 1)
    # The run says how the documents were packed, and that files longer than a row were cut, not truncated.
    assert re.search(r"training documents \([\d,]+ tokens\) packed into [\d,]+ rows of 65 \([\d.]+% filled; \d+ "
                     r"documents longer than a row cut into pieces\)", console.file.getvalue())
    extra = formerkit.load_extra(tmp_path / "run" / "model")
    assert extra["preprocessing"]["packed"] is True and extra["recipe"]["data"]["pack"] is True


@pytest.mark.slow
def test_a_jsonl_corpus_trains_packed_with_the_masked_lm_objective_too(tmp_path, tiny):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}():\n    return {'x' * (i % 37)!r}\n"}) + "\n"
                            for i in range(80)))
    for recipe in ("char-lm", "mlm-stdlib"):
        overrides = tiny(recipe, **FOUR_STEPS, **{"data.source": "jsonl", "data.path": str(path),
                                                 "data.seq_len": 32, "data.pack": True})
        result = train(recipe, tmp_path / recipe, overrides=overrides)
        records = [json.loads(line) for line in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
        assert result.summary["status"] == "completed" and math.isfinite(result.summary["valid_loss"])
        assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
