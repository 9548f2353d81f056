"""Diffusion: the noise schedules, the samplers and classifier-free guidance, as functions of a prediction.

Two ways to turn noise into data, in data units (images scaled to [-1, 1]):

- Flow matching (rectified flow: Liu et al., 2023; Lipman et al., 2023): x_t = (1 - t) x0 + t noise for t in
  [0, 1]; the model predicts the velocity v = noise - x0 (so dx_t/dt = v), and sampling integrates the ODE from t = 1
  (noise) to t = 0 (data) with Euler or Heun steps.
- DDPM (Ho et al., 2020): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for t = 0 .. T - 1, abar_t the cumulative
  product of 1 - beta_t (a linear beta schedule, or Nichol & Dhariwal's cosine one); the model predicts the noise
  (epsilon); sampling takes DDIM steps (Song et al., 2021: deterministic with eta = 0).

A sampler takes ``predict(x, t) -> Tensor``: the velocity (flow matching, t a float tensor [batch] in [0, 1]) or the
noise (DDPM, t an integer tensor [batch]). ``guided`` makes one from a class-conditioned model with classifier-free
guidance (Ho & Salimans, 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from formerkit.errors import InputError

__all__ = ["NoiseSchedule", "ddim_invert", "ddim_sample", "ddim_step", "euler_sample", "flow_interpolate",
           "guided", "heun_sample", "sampler_times"]

Predict = Callable[[Tensor, Tensor], Tensor]


# ----- flow matching -----


def flow_interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, the velocity target): x_t = (1 - t) x0 + t noise and v = noise - x0, ``t`` [batch] in [0, 1]."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise, noise - x0


def sampler_times(steps: int) -> Tensor:
    """The ``steps + 1`` times a flow sampler visits, from 1 (noise) down to 0 (data), evenly spaced."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps: expected an integer >= 1, got {steps!r}")


def _at(x: Tensor, value: float) -> Tensor:
    return torch.full((x.shape[0],), float(value), dtype=torch.float32, device=x.device)


def euler_sample(predict: Predict, noise: Tensor, steps: int) -> Tensor:
    """x at t = 0 from ``noise`` at t = 1 in ``steps`` Euler steps: x_{t-h} = x_t - h v(x_t, t)."""
    _check_steps(steps)
    times = sampler_times(steps).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        x = x - (t - t_next) * predict(x, _at(x, t))
    return x


def heun_sample(predict: Predict, noise: Tensor, steps: int) -> Tensor:
    """x at t = 0 in ``steps`` Heun steps (two predictions each): an Euler step to x', then the step taken again with
    the mean of the velocities at both ends, x_{t-h} = x_t - h (v(x_t, t) + v(x', t - h)) / 2 (Karras et al., 2022,
    use it for the same ODE)."""
    _check_steps(steps)
    times = sampler_times(steps).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        h = t - t_next
        velocity = predict(x, _at(x, t))
        guess = x - h * velocity
        x = x - h * (velocity + predict(guess, _at(x, t_next))) / 2
    return x


# ----- DDPM -----


class NoiseSchedule:
    """DDPM's betas and their cumulative products abar_t = prod_{s <= t} (1 - beta_s), t = 0 .. steps - 1, in
    float64.

    linear: beta from 1e-4 to 0.02 (Ho et al., 2020, for 1,000 steps; scaled by 1000 / steps for other counts, as
    improved DDPM does). cosine: abar_t = f(t + 1) / f(0), f(t) = cos^2((t / steps + s) / (1 + s) * pi / 2), s = 0.008,
    each beta clipped at 0.999 (Nichol & Dhariwal, 2021, "Improved Denoising Diffusion Probabilistic Models").
    """

    def __init__(self, kind: str = "cosine", steps: int = 1000):
        if kind not in ("cosine", "linear"):
            raise InputError(f"noise_schedule: expected 'cosine' or 'linear', got {kind!r}")
        _check_steps(steps)
        self.kind, self.steps = kind, steps
        if kind == "linear":
            scale = 1000 / steps
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64)
        else:
            s = 0.008
            f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.betas = betas
        self.alphas_bar = torch.cumprod(1 - betas, dim=0)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """abar at integer timesteps ``t`` (-1 is the clean data: 1)."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_bar])
        return padded[t.long().cpu() + 1]

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, ``t`` [batch] integer timesteps."""
        abar = self.alpha_bar(t).to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def timesteps(self, steps: int) -> list[int]:
        """The ``steps`` timesteps a DDIM sampler visits, from T - 1 down to 0, evenly spaced."""
        _check_steps(steps)
        if steps > self.steps:
            raise InputError(f"steps: at most the schedule's {self.steps} diffusion steps, got {steps}")
        return torch.linspace(self.steps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def ddim_step(x: Tensor, epsilon: Tensor, abar: float, abar_next: float, *, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM step (Song et al., 2021, eq. 12) from x at abar to abar_next, given the predicted noise:
    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar); sigma = eta sqrt((1 - abar_next) / (1 - abar)) sqrt(1 - abar /
    abar_next); x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next - sigma^2) eps + sigma noise. The same formula
    with abar_next > abar (and eta 0) is the inversion step."""
    x0 = (x - math.sqrt(1 - abar) * epsilon) / math.sqrt(abar)
    sigma = eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)) if eta else 0.0
    out = math.sqrt(abar_next) * x0 + math.sqrt(max(1 - abar_next - sigma ** 2, 0.0)) * epsilon
    if sigma:
        out = out + sigma * noise
    return out


def ddim_sample(predict: Predict, noise: Tensor, schedule: NoiseSchedule, steps: int, *, eta: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """x0 from ``noise`` (x at t = T - 1) in ``steps`` DDIM steps over ``schedule.timesteps(steps)``, the last one to
    the clean data. eta > 0 adds fresh noise at each step (eta 1 is DDPM's ancestral sampling)."""
    times = schedule.timesteps(steps)
    x = noise
    for t, t_next in zip(times, times[1:] + [-1]):
        epsilon = predict(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        abar, abar_next = (float(schedule.alpha_bar(torch.tensor(v))) for v in (t, t_next))
        fresh = (torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                 if eta and t_next >= 0 else None)
        x = ddim_step(x, epsilon, abar, abar_next, eta=eta if t_next >= 0 else 0.0, noise=fresh)
    return x


def ddim_invert(predict: Predict, x: Tensor, schedule: NoiseSchedule, steps: int) -> Tensor:
    """DDIM inversion: x at the first of ``schedule.timesteps(steps)`` (the noisiest) from x at the last (the
    least noisy), the deterministic steps taken backwards, each predicting the noise where it starts.
    ``ddim_sample``'s steps between those timesteps undo it (up to the change of the prediction over a step)."""
    times = schedule.timesteps(steps)[::-1]
    for t, t_next in zip(times[:-1], times[1:]):
        epsilon = predict(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        abar, abar_next = (float(schedule.alpha_bar(torch.tensor(v))) for v in (t, t_next))
        x = ddim_step(x, epsilon, abar, abar_next)
    return x


# ----- guidance -----


def guided(model, labels: Tensor, null_class: int, guidance: float, *, timestep_scale: float = 1.0) -> Predict:
    """``predict(x, t)`` of a class-conditioned ``model`` with classifier-free guidance (Ho & Salimans, 2022):
    uncond + guidance * (cond - uncond), both passes in one batch; guidance 1 is the conditional prediction alone
    (one pass), 0 the unconditional one. The model sees timesteps ``t * timestep_scale``."""

    def predict(x: Tensor, t: Tensor) -> Tensor:
        timesteps = t.float() * timestep_scale
        if guidance == 1.0:
            return model(x, timesteps=timesteps, labels=labels)
        null = torch.full_like(labels, null_class)
        if guidance == 0.0:
            return model(x, timesteps=timesteps, labels=null)
        both = model(torch.cat([x, x]), timesteps=torch.cat([timesteps, timesteps]),
                     labels=torch.cat([labels, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    return predict
