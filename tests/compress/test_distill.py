"""Distillation: the loss against hand-computed values, its wiring into the objectives, the CLI, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

import formerkit
from formerkit.cli import main
from formerkit.compress.distill import Distillation, distillation_loss, mix_images
from formerkit.config import ModelConfig
from formerkit.errors import FormerkitError
from formerkit.runs import evaluate_run, load_run_model

from ..conftest import token_config
from .conftest import TINY_CLASSIFIER


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _by_hand(student: list[list[float]], teacher: list[list[float]], targets: list[int], temperature: float,
             alpha: float) -> float:
    """The distillation loss written out: mean over the kept rows of (1 - alpha) * -log p_s[y] + alpha * T^2 *
    sum_c q_t[c] * (log q_t[c] - log q_s[c]), with q the softmax at temperature T; rows with target -100 skipped."""
    total, count = 0.0, 0
    for s, t, y in zip(student, teacher, targets):
        if y == -100:
            continue
        hard = -math.log(_softmax(s)[y])
        q_s = _softmax([v / temperature for v in s])
        q_t = _softmax([v / temperature for v in t])
        kl = sum(qt * (math.log(qt) - math.log(qs)) for qt, qs in zip(q_t, q_s))
        total += (1 - alpha) * hard + alpha * temperature ** 2 * kl
        count += 1
    return total / count


def test_distillation_loss_equals_the_hand_computed_value_for_classification():
    student = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]]
    teacher = [[1.0, 0.0, -2.0], [3.0, -1.0, 0.0]]
    targets = [0, 2]
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), temperature=2.0,
                            alpha=0.3)
    assert got.item() == pytest.approx(_by_hand(student, teacher, targets, 2.0, 0.3), rel=1e-6)


def test_distillation_loss_for_tokens_skips_ignored_targets():
    # [batch 1, 3 tokens, vocab 4]: the middle token is not predicted (-100), as at a packed document's border.
    student = [[0.5, -0.5, 1.0, 0.0], [9.0, -9.0, 9.0, -9.0], [0.0, 1.0, 2.0, 3.0]]
    teacher = [[1.0, 1.0, 0.0, -1.0], [-9.0, 9.0, -9.0, 9.0], [2.0, 0.0, 0.0, 1.0]]
    targets = [2, -100, 1]
    got = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([targets]),
                            temperature=4.0, alpha=0.7)
    assert got.item() == pytest.approx(_by_hand(student, teacher, targets, 4.0, 0.7), rel=1e-6)


def test_distillation_loss_at_the_extremes():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 7, (5,), generator=torch.Generator().manual_seed(1))
    other = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    # alpha 0: the labels alone (with label smoothing as the task has it).
    torch.testing.assert_close(distillation_loss(logits, other, targets, temperature=3.0, alpha=0.0, smoothing=0.1),
                               torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1))
    # alpha 1 and a student equal to its teacher: nothing to learn.
    assert distillation_loss(logits, logits, targets, temperature=3.0, alpha=1.0).abs().item() < 1e-6


def test_distillation_loss_with_mixed_labels_equals_the_hand_computed_value():
    student = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [1.0, 1.0, -1.0]]
    teacher = [[1.0, 0.0, -2.0], [3.0, -1.0, 0.0], [0.0, 2.0, 0.0]]
    targets, partners, weights = [0, 2, 1], [2, 0, 0], [0.25, 1.0, 0.6]
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), temperature=2.0,
                            alpha=0.3, mixed=(torch.tensor([targets[p] for p in partners]), torch.tensor(weights)))
    expected = 0.0
    for s, t, y, other, w in zip(student, teacher, targets, [targets[p] for p in partners], weights):
        hard = -w * math.log(_softmax(s)[y]) - (1 - w) * math.log(_softmax(s)[other])
        q_s, q_t = _softmax([v / 2.0 for v in s]), _softmax([v / 2.0 for v in t])
        kl = sum(qt * (math.log(qt) - math.log(qs)) for qt, qs in zip(q_t, q_s))
        expected += (0.7 * hard + 0.3 * 4.0 * kl) / 3
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mix_images_mixes_each_example_with_a_partner_of_the_batch():
    images = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mixed, partner, weights = mix_images(images, torch.Generator().manual_seed(5))
    assert sorted(partner.tolist()) == list(range(6))
    assert ((weights >= 0) & (weights <= 1)).all() and weights.unique().numel() == 6
    for i in range(6):
        torch.testing.assert_close(mixed[i], weights[i] * images[i] + (1 - weights[i]) * images[partner[i]])
    again = mix_images(images, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip((mixed, partner, weights), again))  # the step's generator decides


def _tiny_run_objective(run):
    from formerkit.data import build_data
    from formerkit.train.objectives import make_objective

    teacher, recipe, _ = load_run_model(run)
    bundle = build_data(recipe.data)
    return teacher, recipe, make_objective(recipe.objective, bundle), bundle


@pytest.mark.slow
def test_distillation_objective_feeds_the_teacher_and_student_the_same_batch(tiny_classifier_run, randomize):
    teacher, recipe, base, bundle = _tiny_run_objective(tiny_classifier_run)
    student = formerkit.build_model(teacher.config.replace(num_layers=1))
    randomize(student, 4)
    batch = bundle.train.take(torch.arange(8))
    distilled = Distillation(base, teacher, temperature=3.0, alpha=0.6)
    got = distilled.loss(student, batch, torch.Generator())
    with torch.no_grad():
        expected = distillation_loss(student(batch["inputs"]), teacher(batch["inputs"]), batch["labels"],
                                     temperature=3.0, alpha=0.6, smoothing=recipe.objective.label_smoothing)
    torch.testing.assert_close(got, expected)
    # alpha 0 is the task's own loss.
    plain = Distillation(base, teacher, alpha=0.0).loss(student, batch, torch.Generator())
    torch.testing.assert_close(plain, base.loss(student, batch, torch.Generator()))
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen


@pytest.mark.slow
def test_mixup_distillation_feeds_both_models_the_same_mixed_images(tiny_classifier_run, randomize):
    teacher, recipe, base, bundle = _tiny_run_objective(tiny_classifier_run)
    student = formerkit.build_model(teacher.config.replace(num_layers=1))
    randomize(student, 4)
    batch = bundle.train.take(torch.arange(8))
    got = Distillation(base, teacher, temperature=3.0, alpha=0.6, mixup=True).loss(
        student, batch, torch.Generator().manual_seed(11))
    mixed, partner, weights = mix_images(batch["inputs"], torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = distillation_loss(student(mixed), teacher(mixed), batch["labels"], temperature=3.0, alpha=0.6,
                                     smoothing=recipe.objective.label_smoothing,
                                     mixed=(batch["labels"][partner], weights))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(mixed, batch["inputs"])


@pytest.mark.slow
def test_mixup_is_refused_where_inputs_cannot_be_mixed(tiny_classifier_run, randomize):
    from formerkit.train.objectives import CausalLM

    class Settings:
        label_smoothing = 0.0

    config = token_config(vocab_size=12, width=16, num_layers=1, max_seq_len=8, num_heads=2)
    with pytest.raises(FormerkitError, match="mixup mixes images"):
        Distillation(CausalLM(Settings(), None), formerkit.build_model(config), mixup=True)
    teacher, _, base, bundle = _tiny_run_objective(tiny_classifier_run)
    with pytest.raises(FormerkitError, match="mixup must be true or false"):
        Distillation(base, teacher, mixup=0.2)


def test_language_model_distillation_predicts_next_tokens(randomize):
    from formerkit.train.objectives import CausalLM

    config = token_config(vocab_size=20, num_layers=1, num_heads=2)
    teacher, student = formerkit.build_model(config), formerkit.build_model(config.replace(width=16))
    randomize(teacher, 1), randomize(student, 2)

    class Settings:
        label_smoothing = 0.0

    base = CausalLM(Settings(), None)
    tokens = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(3))
    distilled = Distillation(base, teacher, temperature=2.0, alpha=0.5, hidden_weight=0.25)
    trained = distilled.wrap_model(student)
    assert distilled.unwrap_model(trained) is student
    got = distilled.loss(trained, {"tokens": tokens}, torch.Generator())
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        teacher_out = teacher(inputs, return_outputs=True)
    student_out = student(inputs, return_outputs=True)
    projected = trained.projection(student_out.last_hidden_state)
    expected = distillation_loss(student_out.logits, teacher_out.logits, targets, temperature=2.0, alpha=0.5) + \
        0.25 * torch.nn.functional.mse_loss(projected, teacher_out.last_hidden_state)
    torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_cli_distill_trains_a_student_run_that_eval_accepts(tiny_classifier_run, tmp_path):
    out = tmp_path / "student"
    sets = [f"{key}={value}" for key, value in TINY_CLASSIFIER.items() if key != "model.width"]
    argv = ["distill", "--teacher", str(tiny_classifier_run), "--student", "cct-digits", "--out", str(out),
            "--temperature", "3", "--alpha", "0.7", "--hidden-weight", "0.1", "--set", "model.width=16"]
    for pair in sets:
        argv += ["--set", pair]
    assert main(argv) == 0
    document = json.loads((out / "model" / "config.json").read_text())
    assert document["extra"]["distillation"] == {"teacher": str(tiny_classifier_run.resolve()), "temperature": 3.0,
                                                 "alpha": 0.7, "hidden_weight": 0.1, "mixup": False}
    assert document["model"]["width"] == 16
    # The saved student is the student alone (no projection), and eval reads it as any run.
    student, _, _ = load_run_model(out)
    assert set(student.state_dict()) == set(formerkit.build_model(student.config).state_dict())
    summary = json.loads((out / "summary.json").read_text())
    assert evaluate_run(out, ["test"])["test_accuracy"] == pytest.approx(summary["test_accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "temperature must be a number > 0"),
    (["--alpha", "1.5"], "alpha .* must be in \\[0, 1\\]"),
    (["--student", "char-lm"], "trains 'causal_lm', the teacher was trained for 'classification'"),
    (["--set", "data.augment=false"], "reads other data than the teacher"),
    (["--student", "no-such-thing"], "neither a recipe"),
])
@pytest.mark.slow
def test_cli_distill_refuses_bad_settings(tiny_classifier_run, tmp_path, capsys, argv, message):
    base = {"--teacher": str(tiny_classifier_run), "--student": "cct-digits", "--out": str(tmp_path / "s")}
    for flag in ("--student",):
        if flag in argv:
            base.pop(flag)
    args = ["distill"] + [item for pair in base.items() for item in pair] + argv
    assert main(args) != 0
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_student_with_another_label_set_is_refused(tiny_classifier_run):
    teacher, _, base, _ = _tiny_run_objective(tiny_classifier_run)
    distilled = Distillation(base, teacher)
    with pytest.raises(FormerkitError, match="teacher's number of classes"):
        distilled.check_model(teacher.config.replace(**{"head.num_classes": 3}))


def _deit(kind: str, randomize) -> torch.nn.Module:
    """A ViT (class and distillation tokens) or a CCT (distillation token, sequence pooling) over 8x8 images."""
    stem = ({"kind": "patches", "image_size": [8, 8], "patch_size": 2, "in_channels": 1, "class_token": True,
             "distill_token": True} if kind == "vit" else
            {"kind": "conv", "image_size": [8, 8], "in_channels": 1, "pool_kernel": 0, "distill_token": True})
    config = ModelConfig(arch="encoder", width=32, num_layers=1, attention={"num_heads": 2}, stem=stem,
                         head={"kind": "classification", "num_classes": 10,  # digits' classes
                               "pooling": "cls" if kind == "vit" else "sequence"})
    model = formerkit.build_model(config)
    randomize(model, 9)
    return model.eval()


@pytest.mark.parametrize("kind, index", [("vit", 1), ("cct", 0)])
def test_the_distillation_token_has_its_own_head_and_the_logits_average_the_two(kind, index, randomize, tmp_path):
    model = _deit(kind, randomize)
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        output = model(images, return_outputs=True)
        hidden = output.last_hidden_state
        by_class = model.head.projection(model.head.pool(hidden, None))
        by_token = model.head.distill_projection(hidden[:, index])  # the token right after the class token, if any
        torch.testing.assert_close(output.head_logits[0], by_class)
        torch.testing.assert_close(output.head_logits[1], by_token)
        torch.testing.assert_close(output.logits, (by_class + by_token) / 2)
    # The distillation token has a position (registers would not): the grid's tokens + the class and distill tokens.
    rows, cols = model.config.stem.grid_size
    assert model.positions.weight.shape[0] == rows * cols + index + 1
    assert formerkit.summary.count_parameters(model.config) == sum(p.numel() for p in model.parameters())
    formerkit.save(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(formerkit.load(tmp_path / "m")(images), model(images))


@pytest.mark.slow
def test_distillation_splits_labels_and_teacher_between_the_two_heads(tiny_classifier_run, randomize):
    teacher, recipe, base, bundle = _tiny_run_objective(tiny_classifier_run)
    student = _deit("cct", randomize).train()
    batch = bundle.train.take(torch.arange(6))
    got = Distillation(base, teacher, temperature=2.0, alpha=0.4).loss(student, batch, torch.Generator())
    with torch.no_grad():
        teacher_logits = teacher(batch["inputs"])
    class_logits, distill_logits = student(batch["inputs"], return_outputs=True).head_logits
    smoothing = recipe.objective.label_smoothing
    expected = 0.6 * torch.nn.functional.cross_entropy(class_logits, batch["labels"], label_smoothing=smoothing) + \
        0.4 * 4.0 * torch.nn.functional.kl_div(torch.log_softmax(distill_logits / 2, -1),
                                               torch.log_softmax(teacher_logits / 2, -1), log_target=True,
                                               reduction="batchmean")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("stem, head, message", [
    ({"kind": "tokens", "vocab_size": 10, "distill_token": True}, {"kind": "classification", "num_classes": 2},
     "applies only to stem.kind in \\('patches', 'conv'\\)"),
    ({"kind": "patches", "image_size": [8, 8], "patch_size": 2, "in_channels": 1, "distill_token": True},
     {"kind": "regression", "output_dim": 1}, "false unless head.kind is 'classification'"),
])
def test_a_distillation_token_where_it_means_nothing_is_refused(stem, head, message):
    with pytest.raises(FormerkitError, match=message):
        ModelConfig(arch="encoder", width=32, num_layers=1, attention={"num_heads": 2}, max_seq_len=16, stem=stem,
                    head=head)
