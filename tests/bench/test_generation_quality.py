"""The sample judge of ``formerkit bench samples``: the Fréchet distance against its closed form, the recognized
fraction on known labels, the mean-image baseline, and the judge's preprocessing against ``formerkit predict``'s."""

import json
import math

import pytest
import torch

from formerkit.bench.generation import (
    SampleJudge,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    judge_samples,
    load_samples,
    mean_image_baseline,
    recognized_fraction,
)
from formerkit.errors import InputError


def _with_statistics(mean: torch.Tensor, cov: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` points whose sample mean and (unbiased) covariance are exactly ``mean`` and ``cov``: random points,
    centred and whitened by their own covariance, then coloured by the Cholesky factor of ``cov``."""
    points = torch.randn(count, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    points = points - points.mean(0)
    whiten = torch.linalg.inv(torch.linalg.cholesky(torch.cov(points.T)))
    return points @ whiten.T @ torch.linalg.cholesky(cov.double()).T + mean.double()


def test_the_frechet_distance_of_one_dimensional_gaussians_is_the_mean_and_deviation_gaps_squared():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    value = frechet_distance_from_statistics(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]),
                                             torch.tensor([[9.0]]))
    assert value == pytest.approx(1.5**2 + (2 - 3) ** 2, abs=1e-9)


def test_the_frechet_distance_of_non_commuting_covariances_matches_the_two_by_two_closed_form():
    # For 2x2 covariances the eigenvalues of A B are real and >= 0, and tr((A B)^(1/2)) =
    # sqrt(tr(A B) + 2 sqrt(det A det B)) (the square root's eigenvalues are the roots of A B's).
    mean_a = torch.tensor([0.3, -1.0], dtype=torch.float64)
    mean_b = torch.tensor([1.1, 0.5], dtype=torch.float64)
    cov_a = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    cov_b = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=torch.float64)
    cross = math.sqrt(torch.trace(cov_a @ cov_b) + 2 * math.sqrt(torch.det(cov_a) * torch.det(cov_b)))
    expected = float(((mean_a - mean_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)
    assert frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, abs=1e-9)
    # The same from point sets whose statistics are exactly these.
    points_a = _with_statistics(mean_a, cov_a, 40, seed=1)
    points_b = _with_statistics(mean_b, cov_b, 25, seed=2)
    mean, cov = gaussian_statistics(points_a)
    assert torch.allclose(mean, mean_a.double()) and torch.allclose(cov, cov_a)
    assert frechet_distance(points_a, points_b) == pytest.approx(expected, abs=1e-9)


def test_the_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=generator) @ torch.randn(6, 6, generator=generator)
    b = torch.randn(30, 6, generator=generator) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0
    # Fewer points than dimensions: singular covariances still give a finite, non-negative value.
    assert 0 <= frechet_distance(a[:3], b[:4]) < float("inf")


def test_the_recognized_fraction_counts_matches_overall_and_per_requested_class():
    requested = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3, 3])
    predicted = torch.tensor([0, 2, 0, 1, 1, 3, 0, 3, 3, 1])
    overall, per_class = recognized_fraction(predicted, requested, num_classes=4)
    assert overall == pytest.approx(7 / 10)
    assert per_class[2] is None  # class 2 was never requested
    assert per_class[0] == pytest.approx(2 / 3) and per_class[1] == 1.0 and per_class[3] == pytest.approx(3 / 5)


def test_the_baseline_is_the_class_mean_plus_noise_clipped_to_the_raw_range():
    images = torch.tensor([[[[0.0, 16.0]]], [[[4.0, 8.0]]], [[[10.0, 2.0]]]])  # [3, 1, 1, 2]
    labels = torch.tensor([0, 0, 1])
    wanted = torch.tensor([1, 0, 0])
    plain = mean_image_baseline(images, labels, wanted, noise=0.0, maximum=16)
    assert torch.equal(plain, torch.tensor([[[[10.0, 2.0]]], [[[2.0, 12.0]]], [[[2.0, 12.0]]]]))
    noisy = mean_image_baseline(images, labels, wanted.repeat(2000), noise=3.0, maximum=16, seed=1)
    assert noisy.min() >= 0 and noisy.max() <= 16
    # Where the mean is far from both limits (pixel 10 of class 1, 3 deviations below 16 and above 0 barely
    # touched), the noise has the asked deviation.
    class_one = noisy[wanted.repeat(2000) == 1][:, 0, 0, 0]
    assert class_one.std().item() == pytest.approx(3.0, rel=0.1)
    with pytest.raises(InputError, match="no training images of classes \\[2\\]"):
        mean_image_baseline(images, labels, torch.tensor([2]), noise=1.0, maximum=16)
    with pytest.raises(InputError, match="noise"):
        mean_image_baseline(images, labels, wanted, noise=-1.0, maximum=16)


def test_bad_features_and_labels_are_refused_with_the_argument_named():
    with pytest.raises(InputError, match="features"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(InputError, match="N >= 2"):
        gaussian_statistics(torch.zeros(1, 3))
    with pytest.raises(InputError, match="labels"):
        recognized_fraction(torch.zeros(3), torch.zeros(4), 2)


def test_a_samples_file_without_labels_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"images": torch.zeros(2, 1, 8, 8)}, str(tmp_path / "samples.safetensors"))
    with pytest.raises(InputError, match="no labels"):
        load_samples(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_samples(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_the_judge_preprocesses_like_predict_and_scores_real_test_images_as_themselves(trained_run, tmp_path):
    from safetensors.torch import save_file

    from formerkit.predict import load_run
    from formerkit.runs import image_input

    run = trained_run("cct-digits")
    judge = SampleJudge(run)
    mean = torch.tensor(judge.preprocessing["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(judge.preprocessing["std"]).view(1, -1, 1, 1)
    test_raw = (judge.test_inputs * std + mean) * judge.maximum
    assert 0 <= test_raw.min() and test_raw.max() <= 16.0001  # digits: raw units 0-16
    # The judge's preprocessing is predict's (image_input) image by image.
    for image in test_raw[:3]:
        assert torch.allclose(judge.normalize(image[None])[0], image_input(image, judge.preprocessing), atol=1e-5)
    # The real test images, judged as samples of their own labels: FD 0 and the classifier's own accuracy.
    save_file({"images": test_raw, "labels": judge.test_labels}, str(tmp_path / "samples.safetensors"))
    images, labels = load_samples(tmp_path)
    report = judge_samples(images, labels, judge, baseline_noise=2.0)
    answers = load_run(run)(list(test_raw[:, 0].numpy()))
    accuracy = sum(int(answer["label"]) == int(label) for answer, label in zip(answers, labels, strict=True))
    assert report.recognized == pytest.approx(accuracy / len(labels))
    assert report.fd_samples == pytest.approx(0.0, abs=1e-6) and report.fd_train > 0 and report.fd_baseline > 0
    assert "recognized" in report.markdown()
    # The command prints the table and writes the same figures.
    from formerkit.cli import main

    assert main(["bench", "samples", str(tmp_path), "--classifier", str(run), "--json", str(tmp_path / "q.json")]) == 0
    written = json.loads((tmp_path / "q.json").read_text())
    assert written["recognized"] == pytest.approx(report.recognized) and written["count"] == len(labels)
    with pytest.raises(InputError, match="classes 0..9"):
        judge_samples(images[:4], torch.tensor([0, 1, 2, 10]), judge)
