"""Where a weight-level method (LoRA, DoRA) acts: projection names and layers resolved to rows of the model's Linears.

formerkit fuses projections that papers and other libraries keep apart: ``attention.qkv`` stacks [q | k | v] along
its output rows and a gated MLP's ``fc_in`` stacks [gate | up]. A target names one of those parts, and a ``Site`` is
that part in one block: the Linear holding it and its rows. One adapter per site keeps the layout of libraries that
hold q, k and v apart (PEFT's q_proj/k_proj/v_proj) one-to-one with ours.

Targets per block: ``q``, ``k``, ``v`` (self-attention), ``qkv`` (the three together, one adapter over the fused
projection: what a LoRA on GPT-2's ``c_attn`` is), ``out`` (its output projection), ``cross_q``, ``cross_k``,
``cross_v``, ``cross_out`` (an encoder-decoder's cross-attention), ``fc_in`` (a gated MLP's up half; a plain MLP's
whole first projection), ``gate`` (a gated MLP's gate half), ``fc_out``. In a mixture-of-experts block the
feed-forward targets name every expert's projection (each expert gets adapters of its own; the router is left alone).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from formerkit.errors import InputError

__all__ = ["TARGETS", "Site", "chosen_depths", "resolve_sites"]

ATTENTION_TARGETS = ("q", "k", "v", "qkv", "out")
CROSS_TARGETS = ("cross_q", "cross_k", "cross_v", "cross_out")
FEEDFORWARD_TARGETS = ("fc_in", "gate", "fc_out")
TARGETS = ATTENTION_TARGETS + CROSS_TARGETS + FEEDFORWARD_TARGETS


@dataclass(frozen=True)
class Site:
    """One target in one block: rows ``start:stop`` of the Linear at ``layer`` (its path in the model)."""

    target: str
    layer: str
    start: int
    stop: int
    in_features: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def stacks(model) -> list[tuple[str, nn.Module]]:
    """(name, stack) for each stack of a formerkit Transformer: the encoder first, then the decoder."""
    from formerkit.models.transformer import Transformer

    if not isinstance(model, Transformer):
        raise InputError(f"add_adapters: expected a formerkit Transformer, got {type(model).__name__}")
    return [(side, getattr(model, side)) for side in ("encoder", "decoder") if getattr(model, side, None) is not None]


def chosen_depths(depth: int, layers, where: str) -> list[int]:
    """The depths ``layers`` names in a stack of ``depth`` layers: None (all), an index, indices or a range;
    negative indices count from the last layer."""
    if layers is None:
        return list(range(depth))
    try:
        depths = [int(layers)] if isinstance(layers, int) else [int(index) for index in layers]
    except (TypeError, ValueError):
        raise InputError(f"{where}: layers: expected None, a layer index, indices or a range, got {layers!r}") from None
    bad = [index for index in depths if not -depth <= index < depth]
    if bad:
        raise InputError(f"{where}: layers: {bad} out of range for a stack of {depth} layers (0..{depth - 1}, or "
                         "negative from the last)")
    if not depths:
        raise InputError(f"{where}: layers: names no layer")
    return sorted({index % depth for index in depths})


def _size(linear: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or formerkit's int8 Linear."""
    return linear.out_features, linear.in_features


def _block_sites(block: nn.Module, path: str, target: str, where: str, depth: int) -> list[Site]:
    from formerkit.nn.feedforward import GatedMLP

    if target in ATTENTION_TARGETS or target in CROSS_TARGETS:
        cross = target in CROSS_TARGETS
        attention = block.cross_attention if cross else block.attention
        if attention is None:
            raise InputError(f"{where}: target {target!r}: layer {depth} has no cross-attention (only an "
                             "encoder-decoder's decoder does)")
        part = target.removeprefix("cross_")
        prefix = f"{path}.{'cross_attention' if cross else 'attention'}"
        q_rows = attention.num_heads * attention.head_dim
        kv_rows = attention.num_kv_heads * attention.head_dim
        if part == "out":
            out_features, in_features = _size(attention.out)
            return [Site(target, f"{prefix}.out", 0, out_features, in_features)]
        if cross:
            if part == "q":
                return [Site(target, f"{prefix}.q", 0, q_rows, _size(attention.q)[1])]
            start = 0 if part == "k" else kv_rows
            return [Site(target, f"{prefix}.kv", start, start + kv_rows, _size(attention.kv)[1])]
        if part == "qkv":
            out_features, in_features = _size(attention.qkv)
            return [Site(target, f"{prefix}.qkv", 0, out_features, in_features)]
        start = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[part]
        rows = q_rows if part == "q" else kv_rows
        return [Site(target, f"{prefix}.qkv", start, start + rows, _size(attention.qkv)[1])]
    feedforward = block.feedforward
    if getattr(block, "mixture", False):
        experts = [(f"{path}.feedforward.experts.{i}", expert) for i, expert in enumerate(feedforward.experts)]
    else:
        experts = [(f"{path}.feedforward", feedforward)]
    sites = []
    for prefix, mlp in experts:
        gated = isinstance(mlp, GatedMLP)
        if target == "gate" and not gated:
            raise InputError(f"{where}: target 'gate': layer {depth}'s feed-forward is not gated (no gate "
                             "projection: a gated MLP's activation is swiglu, geglu or geglu_tanh); use fc_in")
        if target == "fc_out":
            out_features, in_features = _size(mlp.fc_out)
            sites.append(Site(target, f"{prefix}.fc_out", 0, out_features, in_features))
            continue
        out_features, in_features = _size(mlp.fc_in)
        if gated:  # [gate | up]: fc_in names the up half, gate the gate half
            half = out_features // 2
            start, stop = (0, half) if target == "gate" else (half, out_features)
        else:
            start, stop = 0, out_features
        sites.append(Site(target, f"{prefix}.fc_in", start, stop, in_features))
    return sites


def resolve_sites(model, targets, layers, *, rank: int | None, where: str) -> list[Site]:
    """The sites of ``targets`` at ``layers`` in every stack of ``model``, checked before any tensor is made: unknown
    targets, layers out of range and a rank larger than a site's rows or inputs are refused by name. A block shared
    across depths (``num_unique_layers``) is adapted once."""
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, Iterable) or not targets:
        raise InputError(f"{where}: targets: expected projection names from {', '.join(TARGETS)}, got {targets!r}")
    targets = list(dict.fromkeys(targets))
    unknown = [target for target in targets if target not in TARGETS]
    if unknown:
        raise InputError(f"{where}: targets: {unknown[0]!r} is not a projection name; expected some of "
                         f"{', '.join(TARGETS)}")
    sites: list[Site] = []
    seen: set[int] = set()
    for side, stack in stacks(model):
        for depth in chosen_depths(stack.num_layers, layers, where):
            block = stack.block_at(depth)
            if id(block) in seen:
                continue
            seen.add(id(block))
            path = f"{side}.blocks.{depth % len(stack.blocks)}"
            for target in targets:
                if target in CROSS_TARGETS and block.cross_attention is None:
                    continue  # an encoder's blocks have no cross-attention: the decoder's get it
                sites += _block_sites(block, path, target, where, depth)
    if not sites:
        raise InputError(f"{where}: targets {targets} name no projection of this model (cross-attention targets "
                         "need an encoder-decoder)")
    if rank is not None:
        for site in sites:
            if rank > min(site.rows, site.in_features):
                raise InputError(f"{where}: rank {rank} is larger than target {site.target!r} at {site.layer} "
                                 f"({site.rows} rows x {site.in_features} inputs); at most "
                                 f"{min(site.rows, site.in_features)}")
    return sites
