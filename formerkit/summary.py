"""What a model costs: parameters per part, forward FLOPs per token (or image), training activation memory.

FLOPs and memory are measured, not guessed: the model is built on PyTorch's ``meta`` device (shapes only, no data, no
time) and run once under ``torch.utils.flop_counter.FlopCounterMode`` while a saved-tensors hook adds up every tensor
autograd keeps for the backward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from formerkit.config import ModelConfig
from formerkit.models.footprint import meta_build, part_of
from formerkit.models.transformer import build_model
from formerkit.nn.recompute import counting_recomputed_outputs

__all__ = ["Summary", "count_parameters", "saved_activation_bytes", "summarize"]


@dataclass
class Summary:
    config: ModelConfig
    name: str
    parts: list[tuple[str, int]]
    total_parameters: int
    batch: int
    seq_len: int | None
    # "token" for sequence models, "image" for image models.
    unit: str
    forward_flops: int
    activation_bytes: int
    notes: list[str] = field(default_factory=list)
    # part -> how many blocks (layers) hold its parameters; parts outside the stacks (embedding, head) are absent.
    blocks: dict[str, int] = field(default_factory=dict)
    # Parameters that train (requires_grad), of total_parameters (adapters included); the rest are frozen. Adapter
    # name -> its parameters, for an adapted model.
    trainable_parameters: int | None = None
    adapters: dict[str, int] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return self.total_parameters if self.trainable_parameters is None else self.trainable_parameters

    @property
    def training_bytes(self) -> int:
        """Training memory in float32 with AdamW: every weight, a gradient and two moments per trainable parameter
        (a frozen weight has neither), and the activations kept for the backward pass."""
        return 4 * self.total_parameters + 4 * 3 * self.trainable + self.activation_bytes

    @property
    def units(self) -> int:
        return self.batch * (self.seq_len if self.unit == "token" else 1)

    @property
    def flops_per_unit(self) -> float:
        return self.forward_flops / self.units

    def format(self) -> str:
        width = max(len(name) for name, _ in self.parts) + 2
        lines = [f"{self.name}: {self.config.arch}, {self.total_parameters:,} parameters", ""]
        lines.append(f"{'part':<{width}}{'parameters':>14}{'share':>8}")
        for name, count in self.parts:
            share = 100.0 * count / self.total_parameters if self.total_parameters else 0.0
            lines.append(f"{name:<{width}}{count:>14,}{share:>7.1f}%")
        lines.append(f"{'total':<{width}}{self.total_parameters:>14,}")
        lines.append("")
        shape = f"batch {self.batch}" + (f", {self.seq_len} tokens" if self.unit == "token" else "")
        lines.append(f"forward FLOPs per {self.unit}: {_human(self.flops_per_unit)} "
                     f"(whole batch: {_human(self.forward_flops)}; {shape})")
        lines.append(f"training FLOPs per {self.unit} (forward + backward, ~3x): {_human(3 * self.flops_per_unit)}")
        lines.append(f"activation memory for training ({shape}, float32): {self.activation_bytes / 2**20:,.1f} MiB")
        lines.append(f"weights in float32: {4 * self.total_parameters / 2**20:,.1f} MiB")
        if self.trainable_parameters is not None:
            share = 100.0 * self.trainable / self.total_parameters if self.total_parameters else 0.0
            lines.append(f"trainable parameters: {self.trainable:,} ({share:.2f}%); frozen: "
                         f"{self.total_parameters - self.trainable:,}")
            lines += [f"adapter {name!r}: {count:,} parameters" for name, count in self.adapters.items()]
        lines.append(f"training memory (float32, AdamW: weights, gradients and 2 moments of the trainable "
                     f"parameters, activations): {self.training_bytes / 2**20:,.1f} MiB")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _human(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}FLOP"
    return f"{value:,.0f} FLOP"


def _example_inputs(config: ModelConfig, batch: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    stem = config.stem
    if stem.kind in ("patches", "conv"):
        return torch.zeros(batch, stem.in_channels, *stem.image_size), _example_condition(config, batch)
    if stem.kind == "linear":
        return torch.zeros(batch, seq_len, stem.input_dim), {}
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    if config.arch == "encoder_decoder":
        return ids, {"decoder_input_ids": ids}
    return ids, {}


def _example_condition(config: ModelConfig, batch: int) -> dict:
    """What a conditioned model (condition.kind) is called with: timesteps and labels, or a condition vector."""
    condition = config.condition
    if condition.kind is None:
        return {}
    kwargs = {}
    if condition.timesteps:
        kwargs["timesteps"] = torch.zeros(batch)
    if condition.classes:
        kwargs["labels"] = torch.zeros(batch, dtype=torch.long)
    return kwargs or {"condition": torch.zeros(batch, config.condition_dim)}


def saved_activation_bytes(model: torch.nn.Module, *args, **kwargs) -> int:
    """Bytes of the distinct storages that one call ``model(*args, **kwargs)`` keeps for the backward pass (counted by
    a saved-tensors hook; the model's parameters and the norm outputs a training step recomputes instead of keeping,
    ``formerkit.nn.recompute``, excluded). Works on the meta device."""
    parameter_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameter_storages:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with counting_recomputed_outputs() as recomputed, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args, **kwargs)
    return int(sum(size for storage, size in saved.items() if storage not in recomputed))


def count_parameters(config: ModelConfig) -> int:
    """The parameter count of the model a config describes (built on the meta device: no memory, no init cost)."""
    with meta_build():
        return build_model(config).num_parameters()


def summarize(model_or_config, *, batch: int = 1, seq_len: int | None = None, name: str | None = None,
              adapt: dict | None = None) -> Summary:
    """Summarizes a model (or a config, which is built on the meta device without allocating weights).

    An adapted model (``formerkit.add_adapters``), a model with frozen parameters, or ``adapt`` (the keyword
    arguments of ``add_adapters``, as a recipe's ``adapt:`` section) adds the trainable and frozen counts, and the
    training memory counts gradients and optimizer state for the trainable parameters only."""
    config = model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.config
    with meta_build():
        model = build_model(config)
    frozen_model = None if isinstance(model_or_config, ModelConfig) else model_or_config
    if frozen_model is not None and all(p.requires_grad for p in frozen_model.parameters()):
        frozen_model = None
    adapters: dict[str, int] = {}
    if frozen_model is not None or adapt is not None:
        from formerkit.adapt import add_adapters, parameter_counts
        from formerkit.adapt.api import adapter_records

        with torch.device("meta"):
            if frozen_model is not None:
                # the same adapters and the same trainable parameters as the model given, on the meta copy
                for record_name, record in adapter_records(frozen_model).items():
                    add_adapters(model, method=record["method"], targets=record["targets"], layers=record["layers"],
                                 name=record_name, **record["options"])
                wanted = {n for n, p in frozen_model.named_parameters() if p.requires_grad}
                for parameter_name, parameter in model.named_parameters():
                    parameter.requires_grad_(parameter_name in wanted)
            if adapt is not None:
                add_adapters(model, **adapt)
        adapters = parameter_counts(model).adapters
    counts: dict[str, int] = {}
    blocks: dict[str, set[str]] = {}
    for parameter_name, parameter in model.named_parameters():
        part = part_of(parameter_name)
        counts[part] = counts.get(part, 0) + parameter.numel()
        block = re.match(r"^\w+\.blocks\.(\d+)\.", parameter_name)
        if block:
            blocks.setdefault(part, set()).add(block.group(1))
    notes = []
    if config.head.tie_embeddings:
        notes.append("the head's weight is tied to the token embedding and counted once, under embedding")
    image = config.stem.kind in ("patches", "conv")
    if not image:
        seq_len = seq_len or config.max_seq_len
        if config.stem.kind == "linear" and config.stem.patch_size:
            seq_len -= seq_len % config.stem.patch_size
    inputs, kwargs = _example_inputs(config, batch, seq_len or 0)
    with torch.device("meta"):
        inputs = inputs.to("meta")
        kwargs = {key: value.to("meta") for key, value in kwargs.items()}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(inputs, **kwargs)
        flops = counter.get_total_flops()
        activation_bytes = saved_activation_bytes(model.train(), inputs, **kwargs)
    if config.arch == "decoder" or config.arch == "encoder_decoder":
        notes.append("causal attention is counted as full score matrices, as the kernel computes them")
    if config.feedforward.mixture:
        notes.append(f"parameters count all {config.feedforward.num_experts} experts of each mixture layer; FLOPs are "
                     f"those of {config.feedforward.experts_per_token} experts per token, as with perfectly even "
                     "routing (the meta device has no router values)")
    return Summary(config=config, name=name or "model", parts=list(counts.items()),
                   total_parameters=sum(counts.values()), batch=batch, seq_len=None if image else seq_len,
                   unit="image" if image else "token", forward_flops=int(flops),
                   activation_bytes=activation_bytes, notes=notes,
                   blocks={part: len(indices) for part, indices in blocks.items()},
                   trainable_parameters=(sum(p.numel() for p in model.parameters() if p.requires_grad)
                                         if frozen_model is not None or adapt is not None else None),
                   adapters=adapters)
