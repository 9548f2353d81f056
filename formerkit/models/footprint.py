"""What a model's parameters weigh before any is allocated, and the refusal of a model the machine cannot hold.

``Transformer(config)`` first builds the model on PyTorch's ``meta`` device (shapes only: no memory, no values) under
``meta_build()``, which also skips the random initializations (they are meaningless without values, and the first one
would import ``torch._dynamo``, a second of start-up). ``check_fits`` then compares the parameters' bytes with the
memory available and refuses, naming the largest parts and the config fields that size them, a model that would not
fit, instead of letting the allocator fail (or the kernel kill the process) halfway through the build.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

__all__ = ["available_memory", "check_fits", "meta_build", "part_bytes", "part_of", "rough_parameter_bytes"]

_PART_PATTERNS = [
    (r"^(stem|embedding_norm|decoder_embedding_norm)\.", "embedding"),
    (r"^(decoder_)?positions\.", "positions"),
    (r"^(encoder|decoder)\.blocks\.\d+\.attention\.", r"\1 attention"),
    (r"^(encoder|decoder)\.blocks\.\d+\.cross_attention\.", r"\1 cross-attention"),
    (r"^(encoder|decoder)\.blocks\.\d+\.feedforward\.", r"\1 feed-forward"),
    (r"^(encoder|decoder)\.blocks\.\d+\.\w+_residual\.", r"\1 norms and scales"),
    (r"^(encoder|decoder)\.final_norm\.", r"\1 final norm"),
    # adaLN-Zero: each block's and the final norm's shift/scale/gate regressions.
    (r"^(encoder|decoder)\.(blocks\.\d+\.modulation|final_modulation)\.", r"\1 modulation"),
    (r"^head\.", "head"),
]


def part_of(name: str) -> str:
    """The part of the model a parameter name belongs to: "embedding", "decoder attention", "head", ..."""
    for pattern, label in _PART_PATTERNS:
        match = re.match(pattern, name)
        if match:
            return match.expand(label)
    return name.split(".")[0]


def part_bytes(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """{part: bytes of its parameters, at their dtype}, in the model's order."""
    parts: dict[str, int] = {}
    for name, parameter in named_parameters:
        part = part_of(name)
        parts[part] = parts.get(part, 0) + parameter.numel() * parameter.element_size()
    return parts


# The random initializations (Tensor methods and torch.nn.init functions) a meta build skips.
_RANDOM_INITS = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_", "sparse_", "bernoulli_", "exponential_", "random_",
                 "log_normal_", "cauchy_", "geometric_"}


def _meta_arange(*args, dtype=None, device=None, **kwargs) -> torch.Tensor:
    """torch.arange's result on the meta device, sized by hand (the meta kernel is Python that imports dynamo)."""
    start, end, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
    if dtype is None:
        exact = all(isinstance(value, int) for value in (start, end, step))
        dtype = torch.int64 if exact else torch.get_default_dtype()
    length = max(0, math.ceil((end - start) / step))
    return torch.empty(length, dtype=dtype, device="meta", requires_grad=kwargs.get("requires_grad", False))


# Operations whose meta kernels are Python code that imports torch._dynamo (a second or more): the tables of fixed
# positions (rotary, sinusoidal, ALiBi) use them. On small tensors a meta build runs them on zero-filled CPU stand-ins
# and keeps the result's shape and dtype (PyTorch's own rules, no copy of them); the values are meaningless on the
# meta device anyway.
_PROXIED = {"div", "__truediv__", "__rtruediv__", "__rdiv__", "exp", "pow", "__pow__", "__rpow__", "mul", "__mul__",
            "__rmul__", "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "neg", "__neg__", "cat", "stack",
            "cos", "sin", "log", "sqrt", "repeat", "repeat_interleave", "outer", "meshgrid", "where", "clamp"}
_PROXY_LIMIT = 2**22  # elements: larger tables go to the meta kernels


def _meta_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_meta else []
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _meta_tensors(item)]
    return []


def _replace(value, convert):
    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(item, convert) for item in value)
    return value


def _on_cpu(func, args: tuple, kwargs: dict):
    stand_in = _replace(args, lambda tensor: torch.zeros(tensor.shape, dtype=tensor.dtype, device="cpu"))
    with torch.device("cpu"):
        result = func(*stand_in, **kwargs)
    return _replace(result, lambda tensor: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))


class _SkipRandomInit(TorchFunctionMode):
    """Inside a torch.device("meta") context: the random initializations do nothing, torch.arange sizes its result
    without computing it, the operations above run on CPU stand-ins of small tensors. The rest runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        first = args[0] if args else kwargs.get("tensor")
        if name in _RANDOM_INITS and isinstance(first, torch.Tensor) and first.is_meta:
            return first
        if (func is torch.arange and kwargs.get("device") in (None, "meta") and "out" not in kwargs
                and not any(isinstance(value, torch.Tensor) for value in args) and 1 <= len(args) <= 3):
            return _meta_arange(*args, **kwargs)
        if name in _PROXIED and "out" not in kwargs and kwargs.get("device") in (None, "meta"):
            tensors = _meta_tensors(args)
            if tensors and sum(tensor.numel() for tensor in tensors) <= _PROXY_LIMIT:
                return _on_cpu(func, args, kwargs)
        return func(*args, **kwargs)


@contextmanager
def meta_build() -> Iterator[None]:
    """Builds on the meta device, without running the random initializations: ``with meta_build(): build_model(c)``
    gives the model's parameters' shapes and dtypes at almost no cost."""
    with torch.device("meta"), _SkipRandomInit():
        yield


def rough_parameter_bytes(config: ModelConfig) -> int:
    """The bytes of the largest weight matrices (embedding, positions, attention and feed-forward projections, head)
    by formula: a quick lower estimate that lets ``Transformer`` skip the exact meta-device count for the models that
    are far from filling the memory (all ordinary ones)."""
    width, attention = config.width, config.attention
    inner = config.head_dim * (attention.num_heads + 2 * config.attention.kv_heads) + config.head_dim * \
        attention.num_heads
    experts = max(1, config.feedforward.num_experts or 1)
    feedforward = (3 if config.feedforward.gated else 2) * config.feedforward_size * experts
    layers = config.num_layers + (2 * config.decoder_layers if config.arch == "encoder_decoder" else 0)
    rows = (config.stem.vocab_size or 0) + (config.head.num_classes or 0) + (config.head.output_dim or 0)
    positions = config.num_positions if config.stem.kind != "linear" or config.max_seq_len else 0
    count = width * (rows + (positions or 0) + layers * (inner + feedforward))
    return count * torch.empty((), dtype=torch.get_default_dtype(), device="meta").element_size()


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now: free GPU memory, or MemAvailable of /proc/meminfo (elsewhere
    the free physical pages os.sysconf reports); None when unknown (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(size: float) -> str:
    return f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def _sizing_fields(config: ModelConfig, part: str) -> list[tuple[str, int]]:
    """The config fields (name, value) a part's size grows with, roughly linearly each, width aside."""
    side, _, kind = part.partition(" ")
    layers = ("num_decoder_layers", config.decoder_layers) if side == "decoder" and config.arch == "encoder_decoder" \
        else ("num_layers", config.num_layers)
    if kind in ("attention", "cross-attention"):
        return [("attention.head_dim", config.head_dim), ("attention.num_heads", config.attention.num_heads),
                layers, ("width", config.width)]
    if kind == "feed-forward":
        fields = [("feedforward.hidden_size", config.feedforward_size)]
        if config.feedforward.num_experts:
            fields.append(("feedforward.num_experts", config.feedforward.num_experts))
        return [*fields, layers, ("width", config.width)]
    stem = config.stem
    if part == "embedding" and stem.kind == "tokens":
        return [("stem.vocab_size", stem.vocab_size), ("width", config.width)]
    if part == "embedding" and stem.kind == "linear":
        return [("stem.input_dim", stem.input_dim), ("width", config.width)]
    if part == "embedding" and stem.kind == "patches":
        return [("stem.patch_size", stem.patch_size), ("stem.in_channels", stem.in_channels), ("width", config.width)]
    if part == "positions":
        return [("max_seq_len", config.num_positions), ("width", config.width)]
    if part == "head":
        outputs = [(f"head.{name}", getattr(config.head, name)) for name in ("num_classes", "output_dim")
                   if getattr(config.head, name)]
        return [*(outputs or [("stem.vocab_size", stem.vocab_size)]), ("width", config.width)]
    return [("width", config.width), layers]


def check_fits(config: ModelConfig, parts: dict[str, int], device: torch.device, *,
               available: int | None = None) -> None:
    """Raises a ConfigError when the parameters (``parts``: {part: bytes}, from ``part_bytes``) need more than the
    memory ``device`` has available (``available_memory``, unless given). The message names the size, the largest
    parts with the fields that size them, and how much would fit."""
    total = sum(parts.values())
    if available is None:
        available = available_memory(device)
    if available is None or total <= available:
        return
    ranked = sorted(parts.items(), key=lambda item: -item[1])
    largest, largest_bytes = ranked[0]
    fields = _sizing_fields(config, largest)
    listed = ", ".join(f"{part} {_gib(size)}" for part, size in ranked[:3])
    room = available - (total - largest_bytes)  # what the largest part may take if the others stay as they are
    caps = [f"{name} at most {value * room // largest_bytes:,}" for name, value in fields
            if name != "width" and value and 1 <= value * room // largest_bytes < value]
    fits = (f"with the rest unchanged, {' or '.join(caps)} would fit" if caps
            else f"the other parts alone need {_gib(total - largest_bytes)}" if room <= 0
            else f"{largest} must shrink to {_gib(room)}")
    raise ConfigError(
        " / ".join(name for name, _ in fields if name != "width") or "width", dict(fields),
        f"a model whose parameters fit in the {_gib(available)} of memory available on {device.type}",
        hint=f"the parameters need {_gib(total)} in {torch.get_default_dtype()}; largest parts: {listed}; {fits}")
