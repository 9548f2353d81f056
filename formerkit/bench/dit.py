"""``formerkit bench dit``: training a diffusion Transformer in formerkit (a Transformer with adaLN-Zero
conditioning, ``condition.kind: adaln_zero``, a patch stem and a patch head) against the reference DiT of
``formerkit.bench.dit_reference`` (the original DiT code's layout), measured in one run on identical work.

Contenders:

- ``formerkit``: the model built from a ModelConfig of the benchmark's sizes, stepped with formerkit's own optimizer
  (fused AdamW from ``formerkit.train``);
- ``dit-reference``: the original's layout with its own explicit attention softmax (timm's ``Attention`` as DiT was
  released with it, timm 0.6);
- ``dit-reference-sdpa``: the same with ``F.scaled_dot_product_attention`` (timm >= 0.9's ``fused_attn`` default,
  what installing DiT's dependencies gives today).

Both references step with ``torch.optim.AdamW(lr=1e-4, weight_decay=0)``, DiT's training script's optimizer. Every
contender: the same width, depth, heads, patch size, image size and channels, MLP ratio 4 with tanh-GELU, a class
embedding with a null class (label dropout 0.1), no learned sigma; random weights. One training step: a batch of
images ``x0``, noise, a timestep ``t`` per image, ``x_t = (1 - t) x0 + t noise`` and the mean squared error of the
model's output against the velocity ``noise - x0`` (rectified flow), backward, optimizer step. Metrics: training
images/s (median over ``rounds``, the contenders taking turns) and the peak resident memory a fresh process gains
from building the model and training (imports and a tiny warm-up excluded).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.bench.common import (
    autocast,
    check_choices,
    in_fresh_process,
    markdown_table,
    parameter_count,
    peak_rss_mb,
    record,
    reset_peak_rss,
    seconds,
    status_mb,
)
from formerkit.bench.dit_reference import ReferenceDiT
from formerkit.errors import InputError

__all__ = ["LIBRARIES", "DiTSpec", "dit_benchmark", "format_dit"]

LIBRARIES = ("formerkit", "dit-reference", "dit-reference-sdpa")


@dataclass(frozen=True)
class DiTSpec:
    """The work: a DiT-S-width model (384 wide, 6 heads) at a third of DiT-S's depth on 16x16x4 latent-sized inputs with
    patch 2 (64 tokens), small enough to measure on a CPU."""

    image: int = 16
    channels: int = 4
    patch: int = 2
    width: int = 384
    depth: int = 4
    heads: int = 6
    classes: int = 10
    batch: int = 16

    def check(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"bench dit: {name} must be an integer >= 1, got {value!r}")
        if self.image % self.patch:
            raise InputError(f"bench dit: image {self.image} is not divisible by patch {self.patch}")
        if self.width % self.heads or self.width % 4:
            raise InputError(f"bench dit: width {self.width} must divide by heads {self.heads} and by 4 (the 2-D "
                             f"sine-cosine positions)")

    @property
    def shape(self) -> str:
        tokens = (self.image // self.patch) ** 2
        return (f"{self.depth} layers, width {self.width}, {self.heads} heads, MLP x4 tanh-GELU, adaLN-Zero; "
                f"{self.image}x{self.image}x{self.channels} images, patch {self.patch} ({tokens} tokens), "
                f"{self.classes} classes; batch {self.batch}")


def formerkit_config(spec: DiTSpec):
    """formerkit's ModelConfig of the benchmark's DiT: pre-norm LayerNorm (eps 1e-6) blocks conditioned by
    adaLN-Zero on a timestep and a class, fixed 2-D sine-cosine positions, a patch stem and a patch head."""
    from formerkit.config import (
        AttentionConfig,
        ConditionConfig,
        FeedForwardConfig,
        HeadConfig,
        ModelConfig,
        NormConfig,
        PositionConfig,
        StemConfig,
    )

    return ModelConfig(
        arch="encoder", width=spec.width, num_layers=spec.depth, max_seq_len=None,
        attention=AttentionConfig(num_heads=spec.heads, qkv_bias=True),
        feedforward=FeedForwardConfig(activation="gelu_tanh", ratio=4.0),
        norm=NormConfig(kind="layernorm", placement="pre", eps=1e-6),
        position=PositionConfig(kind="sincos2d"),
        stem=StemConfig(kind="patches", image_size=(spec.image, spec.image), patch_size=spec.patch,
                        in_channels=spec.channels),
        head=HeadConfig(kind="patches", pooling="none"),
        condition=ConditionConfig(kind="adaln_zero", timesteps=True, classes=spec.classes, label_dropout=0.1),
    )


class _FormerkitDiT(nn.Module):
    """formerkit's model called as the reference is: ``(x, t, y) -> velocity``."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        from formerkit.models.transformer import build_model

        self.inner = build_model(formerkit_config(spec))

    def forward(self, x, t, y):
        return self.inner(x, timesteps=t, labels=y)


def _build(library: str, spec: DiTSpec) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    if library == "formerkit":
        from formerkit.train.config import OptimConfig
        from formerkit.train.trainer import build_optimizer

        model = _FormerkitDiT(spec)
        return model, build_optimizer(model, OptimConfig())
    model = ReferenceDiT(image_size=spec.image, patch=spec.patch, channels=spec.channels, width=spec.width,
                         depth=spec.depth, heads=spec.heads, classes=spec.classes,
                         attention="sdpa" if library == "dit-reference-sdpa" else "explicit")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)


def _batch(spec: DiTSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.batch, spec.channels, spec.image, spec.image)
    return {"x0": torch.randn(shape, generator=generator), "noise": torch.randn(shape, generator=generator),
            "t": torch.rand(spec.batch, generator=generator),
            "y": torch.randint(0, spec.classes, (spec.batch,), generator=generator)}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               precision: str = "fp32") -> None:
    """One rectified-flow training step, the same for every contender (see the module docstring); the timestep is
    passed as ``1000 t``, DiT's timestep scale."""
    t = batch["t"].view(-1, 1, 1, 1)
    noisy = (1 - t) * batch["x0"] + t * batch["noise"]
    with autocast(precision):
        out = model(noisy, batch["t"] * 1000, batch["y"])
        loss = F.mse_loss(out.float(), batch["noise"] - batch["x0"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_child(library: str, spec: dict, steps: int) -> float:
    """In a fresh process: the peak resident memory (MB) that building the model and ``steps`` training steps add
    to what the process holds after its imports and one step of a tiny model of the same library (which loads what
    the first step of any model loads: ``torch._dynamo``, the math libraries' buffers)."""
    dit_spec = DiTSpec(**spec)
    tiny = DiTSpec(image=4, channels=dit_spec.channels, patch=2, width=32, depth=1, heads=2, classes=dit_spec.classes,
                   batch=2)
    model, optimizer = _build(library, tiny)
    train_step(model, optimizer, _batch(tiny))
    del model, optimizer
    batch = _batch(dit_spec)
    reset_peak_rss()
    base = status_mb("VmRSS") or 0.0
    model, optimizer = _build(library, dit_spec)
    for _ in range(steps):
        train_step(model, optimizer, batch)
    return max(peak_rss_mb() - base, 0.0)


def _peak_memory(library: str, spec: DiTSpec, steps: int = 2) -> float:
    code = ("import json; from formerkit.bench.dit import memory_child; "
            f"print(json.dumps(memory_child({library!r}, {json.dumps(asdict(spec))}, {steps})))")
    return float(in_fresh_process(code, f"the DiT training memory of {library}"))


def dit_benchmark(spec: DiTSpec = DiTSpec(), *, libraries=LIBRARIES, rounds: int = 5, memory: bool = True,
                  progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """Measures every contender (fp32); returns the records and notes."""
    spec.check()
    check_choices("dit", libraries, LIBRARIES, ["fp32"], {"rounds": rounds})
    say = progress or (lambda text: None)
    built = {library: _build(library, spec) for library in libraries}
    batch = _batch(spec)
    times: dict[str, list[float]] = {name: [] for name in built}
    for name, (model, optimizer) in built.items():  # warm-up: first steps allocate state and pick kernels
        say(f"warming up {name}")
        model.train()
        for _ in range(2):
            train_step(model, optimizer, batch)
    for round_ in range(rounds):
        for name, (model, optimizer) in built.items():
            say(f"round {round_ + 1}/{rounds}: {name}")
            times[name].append(seconds(train_step, model, optimizer, batch))
    records = []
    for name, (model, _) in built.items():
        params = parameter_count(model)
        records.append(record("dit", name, "fp32", "train_img_per_s", spec.batch / statistics.median(times[name]),
                              "images/s", params, spec.shape))
        if memory:
            say(f"peak memory of {name}, in a fresh process")
            records.append(record("dit", name, "fp32", "peak_rss_mb", _peak_memory(name, spec), "MB", params,
                                  spec.shape))
    return records, []


METRICS = [("train_img_per_s", "train images/s"), ("peak_rss_mb", "peak memory MB")]


def format_dit(records: list[dict]) -> str:
    return markdown_table(records, METRICS)
