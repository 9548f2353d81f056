"""formerkit.fit: the recipe trainer's loop on the caller's own tensors, Dataset or DataLoader."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import formerkit
from formerkit import InputError, build_model
from formerkit.errors import ConfigError
from formerkit.train import RunError, train

from ..conftest import token_config

VOCAB = 11


def lm_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(token_config(vocab_size=VOCAB, width=16, num_layers=1, num_heads=2, max_seq_len=8))


def classifier(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(token_config("encoder", vocab_size=VOCAB, width=16, num_layers=1, num_heads=2, max_seq_len=8,
                                    head={"kind": "classification", "num_classes": 3}))


def token_rows(n: int = 24, t: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


SETTINGS = dict(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1)


class Rows(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def weights(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_tensor_dataset_and_dataloader_train_the_same_weights():
    rows = token_rows()
    results = []
    for data in (rows, Rows(rows), DataLoader(Rows(rows), batch_size=5, shuffle=True)):
        model = lm_model()
        before = weights(model)
        result = formerkit.fit(model, data, **SETTINGS)
        assert result.model is model  # trained in place
        results.append(weights(model))
    assert any(not torch.equal(before[n], results[0][n]) for n in before)
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])


def test_a_different_seed_trains_other_weights():
    rows = token_rows()
    a, b = lm_model(), lm_model()
    formerkit.fit(a, rows, **SETTINGS)
    formerkit.fit(b, rows, **SETTINGS, seed=1)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_writes_the_run_and_reports_the_last_evaluation(tmp_path):
    rows, held_out = token_rows(), token_rows(8, seed=2)
    model = lm_model()
    result = formerkit.fit(model, rows, eval_data=held_out, eval_every=3, out_dir=tmp_path / "run", **SETTINGS)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert result.metrics["valid_loss"] == evals[-1]["valid_loss"]
    # the reference: the mean next-token cross-entropy of the trained model over the held-out rows
    with torch.no_grad():
        logits = model.eval()(held_out[:, :-1])
        reference = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), held_out[:, 1:].reshape(-1))
    assert result.metrics["valid_loss"] == pytest.approx(float(reference), rel=1e-5)
    saved = formerkit.load(tmp_path / "run" / "model")
    assert_same(weights(saved), weights(model))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_resume_after_stop_equals_an_uninterrupted_run_bitwise(tmp_path):
    rows = token_rows()
    options = dict(SETTINGS, steps=8, checkpoint_every=100, ema_decay=0.9)
    whole = lm_model()
    formerkit.fit(whole, rows, out_dir=tmp_path / "whole", **options)

    stopped = lm_model()
    first = formerkit.fit(stopped, rows, out_dir=tmp_path / "parts", stop_after=3, **options)
    assert first.summary["status"] == "interrupted" and first.summary["steps"] == 3
    resumed = lm_model(seed=5)  # any starting weights: the checkpoint restores them
    second = formerkit.fit(resumed, rows, out_dir=tmp_path / "parts", **options)
    assert second.summary["status"] == "completed" and second.summary["steps"] == 8
    assert_same(weights(resumed), weights(whole))
    assert_same(weights(formerkit.load(tmp_path / "parts" / "model")), weights(formerkit.load(tmp_path / "whole" /
                                                                                                  "model")))
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text() .splitlines()
    whole_lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in ("elapsed", "tokens_per_s")}  # noqa: E731
    assert [strip(line) for line in lines] == [strip(line) for line in whole_lines]


def test_resume_with_other_settings_is_refused_by_name(tmp_path):
    rows = token_rows()
    formerkit.fit(lm_model(), rows, out_dir=tmp_path / "run", stop_after=2, **SETTINGS)
    with pytest.raises(RunError, match="optim.lr"):
        formerkit.fit(lm_model(), rows, out_dir=tmp_path / "run", **{**SETTINGS, "lr": 5e-3})


def test_only_parameters_with_requires_grad_change():
    model = lm_model()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("decoder.blocks.0.attention"))
    before = weights(model)
    formerkit.fit(model, token_rows(), **SETTINGS)
    after = weights(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("decoder.blocks.0.attention") for name in changed)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable


def test_nothing_trainable_is_refused():
    model = lm_model().requires_grad_(False)
    with pytest.raises(InputError, match="requires_grad"):
        formerkit.fit(model, token_rows(), **SETTINGS)


def test_classification_pairs_in_every_form_train_the_same_weights():
    inputs = torch.randint(VOCAB, (20, 6), generator=torch.Generator().manual_seed(3))
    labels = torch.randint(3, (20,), generator=torch.Generator().manual_seed(4))
    results = []
    for data in ((inputs, labels), TensorDataset(inputs, labels), DataLoader(TensorDataset(inputs, labels),
                                                                             batch_size=3)):
        model = classifier()
        result = formerkit.fit(model, data, eval_data=(inputs, labels), **SETTINGS)
        results.append(weights(model))
        assert set(result.metrics) >= {"valid_loss", "valid_accuracy"}
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])
    with torch.no_grad():
        predicted = model.eval()(inputs).argmax(-1)
    assert result.metrics["valid_accuracy"] == pytest.approx(float((predicted == labels).float().mean()))


def test_fit_equals_the_recipe_trainer_on_the_same_batches(tmp_path):
    """A recipe run and fit share one loop: the synthetic-task recipe's data, handed to fit as a tensor, trains the
    same weights as the recipe itself (same model init, seed, batches and schedule)."""
    from formerkit.data import build_data
    from formerkit.train.config import TrainConfig

    recipe = TrainConfig.from_dict({
        "name": "same", "model": {"preset": "char_gpt", "overrides": {"num_layers": 1, "width": 16, "num_heads": 2,
                                                                  "dropout": 0.0}},
        "data": {"source": "text", "path": str(_corpus(tmp_path)), "tokenizer": "byte", "seq_len": 8, "pack": False,
                 "valid_fraction": 0.0},
        "schedule": {"steps": 4, "batch_size": 4, "warmup_steps": 1},
        "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "run": {"progress": False, "log_every": 1}})
    from_recipe = train(recipe, tmp_path / "recipe").model
    bundle = build_data(recipe.data)
    # The same windows, in the form fit takes: the recipe draws window starts per step; every start, as rows.
    starts = torch.arange(len(bundle.train))
    rows = bundle.train.take(starts)["tokens"]
    torch.manual_seed(0)
    model = build_model(from_recipe.config)
    # fit draws epochs of a permutation of the rows where the token stream draws random starts; equal weights need
    # equal batches, so both read through the same ArraySplit here.
    from formerkit.data.base import TokenSplit

    assert isinstance(bundle.train, TokenSplit)
    with pytest.MonkeyPatch.context() as patch:
        import formerkit.data.base as base

        patch.setattr(base.ArraySplit, "sample_indices",
                      lambda self, batch_size, seed, step: torch.randint(len(rows), (batch_size,),
                                                                         generator=base.step_generator(seed, 2, step)))
        formerkit.fit(model, rows, steps=4, batch_size=4, lr=1e-2, warmup_steps=1, weight_decay=0.0)
    assert_same(weights(model), weights(from_recipe))


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    return path


@pytest.mark.parametrize("data, message", [
    (torch.rand(4, 9), "integer token ids; got torch.float32"),
    (torch.randint(VOCAB, (4,)), r"shape \[N, T\]; got shape \[4\]"),
    (torch.full((4, 9), VOCAB), r"token ids from 11 to 11, outside the model's vocabulary \[0, 11\)"),
    (torch.randint(VOCAB, (4, 12)), "more than the model's max_seq_len"),
    ((torch.randint(VOCAB, (4, 9)), torch.zeros(4)), "not \\(inputs, labels\\) pairs"),
    ("corpus.txt", "got str"),
])
def test_bad_language_model_data_is_refused_by_name(data, message):
    with pytest.raises(InputError, match=message):
        formerkit.fit(lm_model(), data, **SETTINGS)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 1, 3, 2]), r"labels must be in \[0, 3\).*from 0 to 3"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), "integer class ids"),
    (torch.tensor([0, 1, 2]), "4 inputs but 3 labels"),
])
def test_bad_labels_are_refused_by_name(labels, message):
    with pytest.raises(InputError, match=message):
        formerkit.fit(classifier(), (torch.randint(VOCAB, (4, 6)), labels), **SETTINGS)


def test_an_unknown_objective_is_refused():
    with pytest.raises(ConfigError, match="objective"):
        formerkit.fit(lm_model(), token_rows(), objective="ranking", **SETTINGS)


def test_train_with_a_dataloader_points_to_fit():
    with pytest.raises(RunError, match="formerkit.fit"):
        train(DataLoader(Rows(token_rows())), "unused")


def test_regression_pairs_train_with_mean_squared_error():
    from ..conftest import image_config

    torch.manual_seed(0)
    model = build_model(image_config(head={"kind": "regression", "output_dim": 2}, num_layers=1, width=16,
                                     num_heads=2))
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = torch.rand(12, 2, generator=torch.Generator().manual_seed(1))
    result = formerkit.fit(model, (images, targets), eval_data=(images, targets), **SETTINGS)
    with torch.no_grad():
        reference = torch.nn.functional.mse_loss(model.eval()(images), targets)
    assert result.metrics["valid_loss"] == pytest.approx(float(reference), rel=1e-5)
    with pytest.raises(InputError, match="must hold 2 values each"):
        formerkit.fit(model, (images, targets[:, :1]), **SETTINGS)
    with pytest.raises(InputError, match="floating point"):
        formerkit.fit(model, (images, targets.long()), **SETTINGS)


def test_a_masked_lm_head_implies_the_masked_lm_objective():
    torch.manual_seed(0)
    model = build_model(token_config("encoder", vocab_size=VOCAB + 1, width=16, num_layers=1, num_heads=2,
                                     max_seq_len=8, head="masked_lm"))
    objective = formerkit.train.fit._objective_kind(model.config, None)
    assert objective == "masked_lm"
    result = formerkit.fit(model, token_rows(), eval_data=token_rows(8, seed=2), **SETTINGS)
    assert set(result.metrics) >= {"valid_loss", "valid_accuracy"}


def test_fit_on_a_finished_run_loads_its_weights_without_training(tmp_path):
    rows = token_rows()
    trained = lm_model()
    formerkit.fit(trained, rows, out_dir=tmp_path / "run", eval_data=rows, **SETTINGS)
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = lm_model(seed=9)
    result = formerkit.fit(again, rows, out_dir=tmp_path / "run", eval_data=rows, **SETTINGS)
    assert_same(weights(again), weights(trained))
    assert result.summary["status"] == "completed" and "valid_loss" in result.metrics
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == records  # nothing ran again


def test_an_iterable_dataset_is_read_in_its_order():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    rows = token_rows()
    a, b = lm_model(), lm_model()
    formerkit.fit(a, rows, **SETTINGS)
    formerkit.fit(b, DataLoader(Stream(rows), batch_size=7), **SETTINGS)
    assert_same(weights(a), weights(b))


def test_activation_checkpointing_trains_the_same_weights():
    rows = token_rows()
    a, b = lm_model(), lm_model()
    formerkit.fit(a, rows, **SETTINGS)
    formerkit.fit(b, rows, activation_checkpointing=True, **SETTINGS)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), name


def _signal_at_training_call(model, signum: int, call: int):
    """Sends ``signum`` to this process from the model's ``call``-th training forward pass (a signal mid-run)."""
    import os

    calls = []

    def hook(module, args):
        if module.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signum)

    return model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_then_reaches_the_caller_and_the_run_resumes(tmp_path, signame):
    import signal

    rows = token_rows()
    whole = lm_model()
    formerkit.fit(whole, rows, out_dir=tmp_path / "whole", **SETTINGS)
    model = lm_model()
    handle = _signal_at_training_call(model, getattr(signal, signame), 2)
    expected = KeyboardInterrupt if signame == "SIGINT" else SystemExit
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(expected) as stopped:
        formerkit.fit(model, rows, out_dir=tmp_path / "run", **SETTINGS)
    handle.remove()
    if signame == "SIGTERM":
        assert stopped.value.code == 128 + signal.SIGTERM
    else:
        assert "resumes it" in str(stopped.value) and str(tmp_path / "run") in str(stopped.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signame and summary["steps"] == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the handlers given back
    resumed = formerkit.fit(lm_model(seed=3), rows, out_dir=tmp_path / "run", **SETTINGS)
    assert resumed.summary["status"] == "completed"
    assert_same(weights(resumed.model), weights(whole))


def test_plots_are_drawn_only_for_a_run_directory_someone_keeps(tmp_path, monkeypatch):
    import formerkit.train.trainer as trainer

    drawn = []
    monkeypatch.setattr(trainer, "plot_run", lambda run_dir: drawn.append(run_dir))
    formerkit.fit(lm_model(), token_rows(), **SETTINGS)
    assert drawn == []
    formerkit.fit(lm_model(), token_rows(), out_dir=tmp_path / "kept", **SETTINGS)
    assert drawn == [tmp_path / "kept"]
