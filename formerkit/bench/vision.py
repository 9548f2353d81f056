"""``formerkit bench vision``: image classifiers in formerkit against vit-pytorch and timm, on identical work.

Two models: CCT-7/3x1 on 32x32 images (a convolutional tokenizer, 256 tokens, sequence pooling) and ViT-tiny at
224x224 (16x16 patches, a class token). Contenders (skipped with a note when not importable):

- ``formerkit``: the ``cct_7_3x1_32`` and ``vit_tiny_patch16_224`` presets, trained with formerkit's optimizer;
- ``vit-pytorch``: its ``CCT`` and ``ViT`` classes (its package ``__init__`` imports torchvision for DINO; where
  torchvision is missing, the two modules, which need only torch and einops, are loaded from their files);
- ``timm``: ``vit_tiny_patch16_224`` (timm has no CCT).

Every contender: no dropout, no stochastic depth, random weights, the same classes; peers step with
``torch.optim.AdamW`` at its defaults. Metrics per precision: training images/s (forward + cross-entropy + backward +
optimizer step), inference images/s, and the peak resident memory a fresh process gains from building the model and
training. Medians over ``rounds``, contenders taking turns within each round.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from formerkit.bench.common import (
    PRECISIONS,
    autocast,
    check_choices,
    in_fresh_process,
    markdown_table,
    parameter_count,
    record,
    seconds,
    train_step,
    training_memory,
)
from formerkit.errors import InputError
from formerkit.models.registry import create_model
from formerkit.train.config import OptimConfig
from formerkit.train.trainer import build_optimizer

__all__ = ["LIBRARIES", "VisionSpec", "default_specs", "vision_benchmark", "vit_pytorch_module"]

LIBRARIES = ("formerkit", "vit-pytorch", "timm")


@dataclass(frozen=True)
class VisionSpec:
    """One classifier: ``kind`` cct (a one-convolution tokenizer with max-pooling) or vit (patches + class token)."""

    name: str
    kind: str
    image: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    classes: int
    batch: int
    patch: int = 16  # vit only

    def check(self) -> None:
        if self.kind not in ("cct", "vit"):
            raise InputError(f"bench vision: kind must be cct or vit, got {self.kind!r}")
        for field in ("image", "width", "layers", "heads", "classes", "batch", "patch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"bench vision: {field} must be an integer >= 1, got {value!r}")
        if self.width % self.heads:
            raise InputError(f"bench vision: width {self.width} is not divisible by heads {self.heads}")
        if self.kind == "vit" and self.image % self.patch:
            raise InputError(f"bench vision: image {self.image} is not divisible by patch {self.patch}")

    @property
    def shape(self) -> str:
        layout = f"patch {self.patch}" if self.kind == "vit" else "conv tokenizer"
        return (f"{self.kind} {self.image}x{self.image} ({layout}), {self.layers} layers, width {self.width}, "
                f"{self.heads} heads, mlp x{self.mlp_ratio:g}, {self.classes} classes; batch {self.batch}")


def default_specs() -> list[VisionSpec]:
    return [VisionSpec("CCT-7/3x1", "cct", 32, 256, 7, 4, 2.0, 10, batch=64),
            VisionSpec("ViT-tiny/16", "vit", 224, 192, 12, 3, 4.0, 1000, batch=32)]


def _formerkit(spec: VisionSpec) -> nn.Module:
    common = {"width": spec.width, "num_layers": spec.layers, "num_heads": spec.heads, "num_classes": spec.classes,
              "drop_path": 0.0, "dropout": 0.0, "attention.dropout": 0.0, "feedforward.ratio": spec.mlp_ratio}
    if spec.kind == "cct":
        return create_model("cct_7_3x1_32", image_size=(spec.image, spec.image), **common)
    return create_model("vit_tiny_patch16_224", image_size=(spec.image, spec.image), patch_size=spec.patch,
                        **common)


def vit_pytorch_module(name: str):
    """vit-pytorch's module ``name`` (cct, vit), loaded from its file where the package cannot be imported (its
    ``__init__`` needs torchvision)."""
    try:
        return importlib.import_module(f"vit_pytorch.{name}")
    except ImportError:
        package = importlib.util.find_spec("vit_pytorch")
        path = Path(package.submodule_search_locations[0]) / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"formerkit_bench_vit_pytorch_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _vit_pytorch(spec: VisionSpec) -> nn.Module:
    if spec.kind == "cct":
        cct = vit_pytorch_module("cct")
        return cct.CCT(img_size=spec.image, embedding_dim=spec.width, n_conv_layers=1, kernel_size=3, stride=1,
                       padding=1, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=spec.layers,
                       num_heads=spec.heads, mlp_ratio=spec.mlp_ratio, num_classes=spec.classes,
                       positional_embedding="learnable", dropout_rate=0.0, attention_dropout=0.0,
                       stochastic_depth_rate=0.0)
    vit = vit_pytorch_module("vit")
    return vit.ViT(image_size=spec.image, patch_size=spec.patch, num_classes=spec.classes, dim=spec.width,
                   depth=spec.layers, heads=spec.heads, mlp_dim=int(spec.width * spec.mlp_ratio),
                   dim_head=spec.width // spec.heads, dropout=0.0, emb_dropout=0.0)


def _timm(spec: VisionSpec) -> nn.Module | None:
    if spec.kind != "vit":
        return None  # timm has no CCT
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=spec.image, patch_size=spec.patch,
                             embed_dim=spec.width, depth=spec.layers, num_heads=spec.heads,
                             mlp_ratio=spec.mlp_ratio, num_classes=spec.classes)


def _available(library: str) -> str | None:
    if library == "formerkit":
        return None
    module = {"vit-pytorch": "vit_pytorch", "timm": "timm"}[library]
    if importlib.util.find_spec(module) is None:
        return f"{library} is not installed"
    if library == "timm":
        try:
            importlib.import_module("timm")
        except ImportError as error:  # timm imports torchvision, which may not install beside this torch
            return f"timm is installed but does not import ({error})"
    return None


def _build(library: str, spec: VisionSpec) -> nn.Module | None:
    return {"formerkit": _formerkit, "vit-pytorch": _vit_pytorch, "timm": _timm}[library](spec)


def _optimizer(library: str, model: nn.Module) -> torch.optim.Optimizer:
    if library == "formerkit":
        return build_optimizer(model, OptimConfig())
    return torch.optim.AdamW(model.parameters())


def _batch(spec: VisionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(spec.batch, 3, spec.image, spec.image, generator=generator)
    return images, torch.randint(0, spec.classes, (spec.batch,), generator=generator)


def memory_child(library: str, spec: dict, precision: str, steps: int) -> float:
    """In a fresh process: the peak resident memory (MB) that building the model and ``steps`` training steps add
    to what the imports hold."""
    vision_spec = VisionSpec(**spec)
    if library == "timm":
        import timm  # noqa: F401  (imports are not the model's memory)
    elif library == "vit-pytorch":
        vit_pytorch_module("cct" if vision_spec.kind == "cct" else "vit")
    images, labels = _batch(vision_spec)

    def build():
        model = _build(library, vision_spec)
        return model, _optimizer(library, model)

    def warm_up():
        tiny = replace(vision_spec, image=2 * vision_spec.patch if vision_spec.kind == "vit" else 16, width=32,
                       layers=1, heads=2, batch=2)
        model = _build(library, tiny)
        return (model, _optimizer(library, model), *_batch(tiny))

    return training_memory(build, images, labels, precision, steps, warm_up)


def _peak_memory(library: str, spec: VisionSpec, precision: str, steps: int = 2) -> float:
    code = ("import json; from formerkit.bench.vision import memory_child; "
            f"print(json.dumps(memory_child({library!r}, {json.dumps(asdict(spec))}, {precision!r}, {steps})))")
    return float(in_fresh_process(code, f"the memory of {library} ({spec.name}, {precision})"))


def vision_benchmark(specs: list[VisionSpec] | None = None, *, libraries=LIBRARIES, precisions=PRECISIONS,
                     rounds: int = 5, memory: bool = True,
                     progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """Measures every available library on every spec; returns the records and notes (what was skipped, why)."""
    specs = default_specs() if specs is None else specs
    for spec in specs:
        spec.check()
    check_choices("vision", libraries, LIBRARIES, precisions, {"rounds": rounds})
    say = progress or (lambda text: None)
    notes = []
    present = []
    for library in libraries:
        why = _available(library)
        if why is None:
            present.append(library)
        else:
            notes.append(f"skipped {library}: {why}")
    records: list[dict] = []
    for spec in specs:
        torch.manual_seed(0)
        models = {library: model for library in present if (model := _build(library, spec)) is not None}
        params = {library: parameter_count(model) for library, model in models.items()}
        images, labels = _batch(spec)
        bench = f"vision {spec.name}"
        for precision in precisions:
            optimizers = {library: _optimizer(library, model) for library, model in models.items()}
            for library, model in models.items():
                say(f"warming up {library} {spec.name} ({precision})")
                model.train()
                for _ in range(2):
                    train_step(model, optimizers[library], images, labels, precision)
            train = {library: [] for library in models}
            infer = {library: [] for library in models}
            for round_ in range(rounds):
                for library, model in models.items():
                    say(f"round {round_ + 1}/{rounds}: {library} {spec.name} ({precision})")
                    model.train()
                    train[library].append(seconds(train_step, model, optimizers[library], images, labels,
                                                  precision))
                    model.eval()
                    with torch.inference_mode(), autocast(precision):
                        if round_ == 0:
                            model(images)  # warm-up: inference picks its own kernels
                        infer[library].append(seconds(model, images))
            for library in models:
                records.append(record(bench, library, precision, "train_img_per_s",
                                      spec.batch / statistics.median(train[library]), "images/s", params[library],
                                      spec.shape))
                records.append(record(bench, library, precision, "infer_img_per_s",
                                      spec.batch / statistics.median(infer[library]), "images/s", params[library],
                                      spec.shape))
            if memory:
                for library in models:
                    say(f"peak memory of {library} {spec.name} ({precision}), in a fresh process")
                    records.append(record(bench, library, precision, "peak_rss_mb",
                                          _peak_memory(library, spec, precision), "MB", params[library], spec.shape))
    return records, notes


METRICS = [("train_img_per_s", "train img/s"), ("infer_img_per_s", "infer img/s"),
           ("peak_rss_mb", "peak memory MB")]


def format_vision(records: list[dict]) -> str:
    parts = []
    for bench in dict.fromkeys(r["bench"] for r in records):
        chosen = [r for r in records if r["bench"] == bench]
        title = f"**{bench.removeprefix('vision ')}** ({chosen[0]['shape']})"
        parts.append(title + "\n\n" + markdown_table(chosen, METRICS))
    return "\n\n".join(parts)
