"""Diffusion schedules and samplers (formerkit.generation.diffusion) against their equations: the schedules'
alpha-bar and x_t's marginals, one Euler and one Heun step by hand, DDIM's step and its deterministic inversion on an
analytic toy, and classifier-free guidance."""

import math

import pytest
import torch

from formerkit.errors import InputError
from formerkit.generation.diffusion import (
    NoiseSchedule,
    ddim_invert,
    ddim_sample,
    ddim_step,
    euler_sample,
    flow_interpolate,
    guided,
    heun_sample,
)


def test_cosine_alpha_bar_is_the_improved_ddpm_formula():
    schedule = NoiseSchedule("cosine", 50)
    f = [math.cos((t / 50 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(51)]
    expected, product = [], 1.0
    for t in range(50):
        product *= 1 - min(1 - f[t + 1] / f[t], 0.999)
        expected.append(product)
    assert schedule.alphas_bar.tolist() == pytest.approx(expected, rel=1e-12)
    # Unclipped, abar_t is f(t + 1) / f(0): checked away from the clipped end.
    assert schedule.alphas_bar[:40].tolist() == pytest.approx([f[t + 1] / f[0] for t in range(40)], rel=1e-9)


def test_linear_alpha_bar_is_the_product_of_one_minus_beta():
    schedule = NoiseSchedule("linear", 1000)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert schedule.betas.tolist() == pytest.approx(betas, rel=1e-9)
    assert float(schedule.alphas_bar[-1]) == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    assert float(schedule.alpha_bar(torch.tensor(-1))) == 1.0


def test_noised_data_has_the_marginal_mean_and_variance():
    schedule = NoiseSchedule("cosine", 100)
    generator = torch.Generator().manual_seed(0)
    count, mu, sigma = 50_000, 0.7, 0.5
    x0 = mu + sigma * torch.randn(count, generator=generator, dtype=torch.float64)
    noise = torch.randn(count, generator=generator, dtype=torch.float64)
    for t in (0, 30, 99):
        x_t = schedule.add_noise(x0, noise, torch.full((count,), t))
        abar = float(schedule.alphas_bar[t])
        assert float(x_t.mean()) == pytest.approx(math.sqrt(abar) * mu, abs=0.015)
        assert float(x_t.var()) == pytest.approx(abar * sigma ** 2 + 1 - abar, abs=0.02)


def test_flow_interpolation_and_velocity():
    x0, noise, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([0.0, 0.25, 1.0])
    x_t, velocity = flow_interpolate(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(x_t[i], (1 - ti) * x0[i] + ti * noise[i])
    assert torch.equal(velocity, noise - x0)


def velocity_field(x, t):
    """A made-up velocity that depends on x and t, so Euler and Heun differ."""
    return torch.sin(x) * (1 + t.view(-1, 1))


def test_one_euler_step_by_hand():
    noise = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    expected = noise - 1.0 * velocity_field(noise, torch.ones(2))
    assert torch.allclose(euler_sample(velocity_field, noise, 1), expected)
    # Two steps: t = 1 -> 0.5 -> 0.
    half = noise - 0.5 * velocity_field(noise, torch.ones(2))
    second = half - 0.5 * velocity_field(half, torch.full((2,), 0.5))
    assert torch.allclose(euler_sample(velocity_field, noise, 2), second)


def test_one_heun_step_by_hand():
    noise = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    v1 = velocity_field(noise, torch.ones(2))
    guess = noise - v1
    v2 = velocity_field(guess, torch.zeros(2))
    assert torch.allclose(heun_sample(velocity_field, noise, 1), noise - (v1 + v2) / 2)


def test_flow_samplers_are_exact_for_straight_paths():
    # Data concentrated at one point c: the true velocity (x_t - c) / t is constant along each straight path, so one
    # Euler step lands on c.
    c = torch.tensor([[1.5, -0.5]])

    def exact(x, t):
        return (x - c) / t.view(-1, 1).clamp(min=1e-12)

    noise = torch.randn(4, 2)
    assert torch.allclose(euler_sample(exact, noise, 1), c.expand(4, 2), atol=1e-6)


def test_ddim_step_is_the_formula():
    x, epsilon, noise = torch.randn(5), torch.randn(5), torch.randn(5)
    abar, abar_next, eta = 0.3, 0.6, 0.5
    x0 = (x - math.sqrt(1 - abar) * epsilon) / math.sqrt(abar)
    sigma = eta * math.sqrt((1 - abar_next) / (1 - abar)) * math.sqrt(1 - abar / abar_next)
    expected = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next - sigma ** 2) * epsilon + sigma * noise
    assert torch.allclose(ddim_step(x, epsilon, abar, abar_next, eta=eta, noise=noise), expected)
    assert torch.allclose(ddim_step(x, epsilon, abar, 1.0), x0)


def test_ddim_inversion_is_undone_by_sampling_with_an_exact_denoiser():
    # Data at one point c: the exact noise prediction (x_t - sqrt(a) c) / sqrt(1 - a) stays the same along every
    # deterministic DDIM path, so inverting and sampling back are exact.
    schedule = NoiseSchedule("cosine", 1000)
    c = torch.tensor([[0.5, -0.25, 1.0]], dtype=torch.float64)

    def predict(x, t):
        a = schedule.alpha_bar(t).to(x.dtype).view(-1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    times = schedule.timesteps(25)
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a0 = float(schedule.alphas_bar[times[-1]])
    x_start = math.sqrt(a0) * c + math.sqrt(1 - a0) * noise  # the data seen at the sampler's last timestep
    encoded = ddim_invert(predict, x_start, schedule, 25)
    a_top = float(schedule.alphas_bar[times[0]])
    assert torch.allclose(encoded, math.sqrt(a_top) * c + math.sqrt(1 - a_top) * noise, atol=1e-9)
    x = encoded
    for t, t_next in zip(times[:-1], times[1:]):
        x = ddim_step(x, predict(x, torch.full((4,), t)), float(schedule.alphas_bar[t]),
                      float(schedule.alphas_bar[t_next]))
    assert torch.allclose(x, x_start, atol=1e-9)
    assert torch.allclose(ddim_sample(predict, encoded, schedule, 25), c.expand(4, 3), atol=1e-9)


def test_ddim_samples_gaussian_data_with_its_exact_denoiser():
    # Data N(mu, sigma^2): E[noise | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a); deterministic DDIM
    # with it turns N(0, 1) noise into samples with the data's mean and spread (a little less spread in few steps:
    # 0.63 in 10 steps, 0.78 in 200, here).
    schedule = NoiseSchedule("linear", 1000)
    mu, sigma = 0.5, 0.8

    def predict(x, t):
        a = schedule.alpha_bar(t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sigma ** 2 + 1 - a)

    noise = torch.randn(4000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    samples = ddim_sample(predict, noise / noise.std(), schedule, 200)
    assert float(samples.mean()) == pytest.approx(mu, abs=0.03)
    assert float(samples.std()) == pytest.approx(sigma, abs=0.025)


class CountingModel(torch.nn.Module):
    """A 'model' whose output depends on the label (the null class 10 gives 0), counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, *, timesteps, labels):
        self.calls += 1
        return x * 0 + torch.where(labels == 10, 0.0, labels.float() + timesteps).view(-1, 1)


def test_guidance_one_is_the_conditional_prediction_in_one_pass():
    model, labels = CountingModel(), torch.tensor([1, 4])
    x, t = torch.zeros(2, 3), torch.tensor([0.5, 0.5])
    out = guided(model, labels, 10, 1.0, timestep_scale=2.0)(x, t)
    assert model.calls == 1
    assert torch.equal(out, model(x, timesteps=t * 2.0, labels=labels))
    # Scale 3: uncond + 3 (cond - uncond), both from one doubled batch.
    model.calls = 0
    guided_out = guided(model, labels, 10, 3.0)(x, t)
    assert model.calls == 1
    assert torch.allclose(guided_out, 3.0 * (labels.float() + t).view(-1, 1).expand(2, 3))


@pytest.mark.parametrize("steps", [0, -1, 1.5])
def test_steps_below_one_are_refused(steps):
    with pytest.raises(InputError, match="^steps:"):
        euler_sample(velocity_field, torch.zeros(1, 2), steps)
    with pytest.raises(InputError, match="^steps:"):
        NoiseSchedule("cosine", 10).timesteps(steps)
