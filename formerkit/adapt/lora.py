"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and DoRA (Liu et al. 2024, "DoRA:
Weight-Decomposed Low-Rank Adaptation") on the rows of a Linear.

LoRA adds a low-rank update to a frozen weight W: for the rows a target owns,

    y = W x + b + scale * B A dropout(x),      A: [rank, in], B: [rows, rank], scale = alpha / rank

with A drawn Kaiming-uniform and B zero, as PEFT initializes them, so a fresh adapter changes nothing. Rank-stabilized
LoRA (Kalajdzievski 2023) takes scale = alpha / sqrt(rank) (``rslora=True``).

DoRA splits the adapted weight into a magnitude per output row and a direction:

    W' = m * (W + scale B A) / ||W + scale B A||     (the norm per output row, over the inputs)

with m starting at ||W||, so a fresh adapter changes nothing either. The norm is a constant to the gradient (the
paper's section 4.3), and, as PEFT computes it, the output is
``W x + b + (m / norm - 1) W x' + (m / norm) scale B A x'`` where x' = dropout(x) (x' = x outside training or without
dropout, where ``W x`` is the base layer's output itself).

The adapters hang below the Linear they adapt (``qkv.adapters.<name>.<target>``) and a forward hook of that Linear adds
their terms, so the base model's parameter names, its int8 layers (``formerkit quantize``: the LoRA weights stay
float32 beside the int8 ones, the QLoRA idea of Dettmers et al. 2023) and every code path that reads ``qkv.weight``
stay as they were.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.adapt.methods import AdapterModule, register_method
from formerkit.adapt.targets import Site, resolve_sites
from formerkit.errors import InputError

__all__ = ["LoRA", "LoRAHost", "apply_dora", "apply_lora", "base_weight", "hosts", "merge_lora"]


def base_weight(linear: nn.Module) -> Tensor:
    """The float weight of a Linear, or the dequantized one of formerkit's int8 Linear."""
    if hasattr(linear, "weight_int8"):
        return linear.dequantized_weight(torch.float32)
    return linear.weight


class LoRA(AdapterModule):
    """The low-rank update of rows ``start:stop`` of one Linear (with ``dora``, also their magnitudes)."""

    def __init__(self, site: Site, rank: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                 dora_weight: Tensor | None = None, device=None, dtype=None):
        super().__init__()
        self.target, self.start, self.stop = site.target, site.start, site.stop
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.lora_A = nn.Parameter(torch.empty(rank, site.in_features, device=device, dtype=dtype))
        # PEFT's A is an nn.Linear(in, rank) initialized as such: Kaiming-uniform with a = sqrt(5).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(site.rows, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout else None
        # DoRA's magnitude: the norm of each output row of W (+ scale B A, which is 0 when fresh).
        self.magnitude = (None if dora_weight is None else
                          nn.Parameter(torch.linalg.vector_norm(dora_weight.detach().to(dtype), dim=1)))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def update(self) -> Tensor:
        """scale * B A: the change of the rows' weight (LoRA)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def delta(self, x: Tensor, base_rows: Tensor, weight_rows: Tensor, bias_rows: Tensor | None) -> Tensor:
        """What this adapter adds to its rows of the layer's output ``base_rows`` (= W x + b on those rows)."""
        dropped = self.dropout(x) if self.dropout is not None and self.training else x
        low_rank = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scale
        if self.magnitude is None:
            return low_rank
        weight = weight_rows.to(self.lora_A.dtype)
        norm = torch.linalg.vector_norm(weight + self.update().detach(), dim=1).detach()
        ratio = self.magnitude / norm
        if dropped is x:
            unbiased = base_rows if bias_rows is None else base_rows - bias_rows
        else:  # PEFT recomputes W x' on the dropped-out input
            unbiased = F.linear(dropped, weight)
        return (ratio - 1) * unbiased + ratio * low_rank

    def add_low_rank(self, output: Tensor, offset: int, x: Tensor) -> Tensor:
        """``output`` with scale * B A dropout(x) added to its features ``offset:offset + rows`` (plain LoRA)."""
        dropped = self.dropout(x) if self.dropout is not None and self.training else x
        return self.add_product(output, offset, F.linear(dropped.to(self.lora_A.dtype), self.lora_A))

    def add_product(self, output: Tensor, offset: int, product: Tensor) -> Tensor:
        """``output`` with scale * product B^T added to its features ``offset:offset + rows``, in place: one
        multiply-add (addmm) when the rows are all of a flat ``output`` and the dtypes agree."""
        rows = self.stop - self.start
        if (offset == 0 and rows == output.shape[-1] and output.dim() == 2 and product.dim() == 2
                and output.dtype == product.dtype == self.lora_B.dtype):
            output.addmm_(product, self.lora_B.t(), alpha=self.scale)
        else:
            output.narrow(-1, offset, rows).add_((F.linear(product, self.lora_B) * self.scale).to(output.dtype))
        return output

    def merged_update(self, weight_rows: Tensor) -> Tensor:
        """W' - W for the rows, computed against the original W (several adapters' updates then add up)."""
        update = self.update()
        if self.magnitude is None:
            return update
        adapted = weight_rows + update
        return (self.magnitude / torch.linalg.vector_norm(adapted, dim=1)).unsqueeze(1) * adapted - weight_rows

    def extra_repr(self) -> str:
        method = "DoRA" if self.magnitude is not None else "LoRA"
        return (f"{method} {self.target} rows {self.start}:{self.stop}, rank={self.rank}, alpha={self.alpha}"
                f"{', rslora' if self.rslora else ''}")


class LoRAHost(nn.ModuleDict):
    """The adapters of one Linear, ``linear.adapters[name][target]``; its ``hook`` (a forward hook of the Linear)
    adds the active ones' terms to the Linear's output."""

    def modules_active(self) -> list[LoRA]:
        return [lora for group in self.values() for lora in group.values() if lora.active]

    def hook(self, linear: nn.Module, args: tuple, output: Tensor) -> Tensor:
        active = self.modules_active()
        if not active:
            return output
        x = args[0]
        weight, bias = None, getattr(linear, "bias", None)
        width = output.shape[-1]
        pieces: list[tuple[int, int, Tensor]] = []
        for lora in active:
            inputs = x.to(lora.lora_A.dtype)
            weight_rows = bias_rows = None
            if lora.magnitude is not None:
                weight = base_weight(linear) if weight is None else weight
                weight_rows = weight[lora.start:lora.stop]
                bias_rows = None if bias is None else bias[lora.start:lora.stop]
            rows = output[..., lora.start:lora.stop].to(inputs.dtype)
            pieces.append((lora.start, lora.stop, lora.delta(inputs, rows, weight_rows, bias_rows).to(output.dtype)))
        if weight is not None:  # DoRA's terms keep the base rows for the backward pass: leave them unchanged
            return output + _assemble(pieces, width)
        # In place, on the rows each target owns: the Linear's backward needs its input and weight, not its output
        # (autograd's version counter would refuse the change otherwise), and no full-width tensor is made.
        for start, stop, delta in pieces:
            output.narrow(-1, start, stop - start).add_(delta)
        return output

    # The fast paths of formerkit.nn: a fused projection computed part by part (formerkit.nn.projection) and an
    # MLP's fc_out whose input is recomputed in the backward pass (formerkit.nn.feedforward).

    def splits_at(self, linear: nn.Module, starts: list[int], sizes: list[int]) -> bool:
        """Whether every active adapter's rows lie inside one part of the fused output."""
        return all(any(start <= lora.start and lora.stop <= start + size for start, size in zip(starts, sizes))
                   for lora in self.modules_active())

    def add_to_parts(self, linear: nn.Module, x: Tensor, parts: list[Tensor], starts: list[int]) -> list[Tensor]:
        """What ``hook`` does, on the fused output's parts (``splits_at`` said each adapter's rows lie in one)."""
        active = self.modules_active()
        if any(lora.magnitude is not None for lora in active):  # DoRA reads the base rows: the hook's own way
            return [self._hook_part(linear, x, part, start) for part, start in zip(parts, starts)]
        parts = list(parts)
        for lora in active:
            index = max(i for i, start in enumerate(starts) if start <= lora.start)
            parts[index] = lora.add_low_rank(parts[index], lora.start - starts[index], x)
        return parts

    def _hook_part(self, linear: nn.Module, x: Tensor, part: Tensor, start: int) -> Tensor:
        """``hook`` on one part [start, start + width) of the fused output, for the adapters whose rows lie there."""
        stop = start + part.shape[-1]
        mine = [lora for lora in self.modules_active() if start <= lora.start and lora.stop <= stop]
        if not mine:
            return part
        bias = getattr(linear, "bias", None)
        weight = base_weight(linear) if any(lora.magnitude is not None for lora in mine) else None
        pieces = []
        for lora in mine:
            inputs = x.to(lora.lora_A.dtype)
            weight_rows = bias_rows = None
            if lora.magnitude is not None:
                weight_rows = weight[lora.start:lora.stop]
                bias_rows = None if bias is None else bias[lora.start:lora.stop]
            rows = part[..., lora.start - start:lora.stop - start].to(inputs.dtype)
            pieces.append((lora.start - start, lora.stop - start,
                           lora.delta(inputs, rows, weight_rows, bias_rows).to(part.dtype)))
        return part + _assemble(pieces, part.shape[-1])

    def recomputable(self, linear: nn.Module) -> list[Tensor] | None:
        """The active adapters' A, if each is a plain LoRA on every row of ``linear`` with no dropout at work and the
        weight's dtype: the MLP's recomputing path then computes ``act(h) A^T`` beside ``act(h) W^T`` and
        ``add_recomputed`` finishes the terms; else None (the MLP keeps its input instead)."""
        weight = getattr(linear, "weight", None)
        active = self.modules_active()
        if weight is None or any(lora.magnitude is not None or (lora.dropout is not None and lora.training)
                                 or (lora.start, lora.stop) != (0, weight.shape[0])
                                 or lora.lora_A.dtype != weight.dtype for lora in active):
            return None
        return [lora.lora_A for lora in active]

    def add_recomputed(self, linear: nn.Module, output: Tensor, products: list[Tensor]) -> Tensor:
        """``output`` plus each active adapter's scale * (x A^T) B^T, given the products x A^T."""
        for lora, product in zip(self.modules_active(), products):
            output = lora.add_product(output, 0, product)
        return output


def _assemble(pieces: list[tuple[int, int, Tensor]], width: int) -> Tensor:
    """One tensor of ``width`` features holding each piece's delta on its rows (summed where they overlap: two
    adapters active on one target) and zero elsewhere: one addition to the Linear's output, whatever the targets."""
    pieces = sorted(pieces, key=lambda piece: piece[0])
    if len(pieces) == 1 and pieces[0][:2] == (0, width):
        return pieces[0][2]
    if any(start < previous_stop for (_, previous_stop, _), (start, _, _) in zip(pieces, pieces[1:])):
        total = 0
        for start, stop, delta in pieces:
            total = total + F.pad(delta, (start, width - stop))
        return total
    parts, position = [], 0
    for start, stop, delta in pieces:
        if start > position:
            parts.append(delta.new_zeros(*delta.shape[:-1], start - position))
        parts.append(delta)
        position = stop
    if position < width:
        parts.append(pieces[-1][2].new_zeros(*pieces[-1][2].shape[:-1], width - position))
    return torch.cat(parts, dim=-1)


def hosts(model: nn.Module) -> dict[str, tuple[nn.Module, LoRAHost]]:
    """Path -> (Linear, its LoRAHost) for every Linear of ``model`` that carries LoRA/DoRA adapters."""
    found = {}
    for path, module in model.named_modules():
        host = getattr(module, "adapters", None)
        if isinstance(host, LoRAHost):
            found[path] = (module, host)
    return found


def _host_of(linear: nn.Module) -> LoRAHost:
    host = getattr(linear, "adapters", None)
    if isinstance(host, LoRAHost):
        return host
    host = LoRAHost()
    linear.adapters = host
    linear.register_forward_hook(host.hook)
    return host


def detach_host(linear: nn.Module) -> None:
    """Removes a Linear's adapters and their forward hook."""
    host = linear.adapters
    for key, hook in list(linear._forward_hooks.items()):
        if getattr(hook, "__self__", None) is host:
            del linear._forward_hooks[key]
    del linear.adapters


def _check_number(value, name: str, where: str, *, low: float, integer: bool = False, below: float | None = None):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < low or (below is not None and value >= below):
        span = f">= {low}" + (f" and < {below}" if below is not None else "")
        raise InputError(f"{where}: {name}: expected {'an integer' if integer else 'a number'} {span}, got {value!r}")


def _apply(model: nn.Module, *, targets, layers, name: str, rank: int, alpha: float, dropout: float,
           rslora: bool, dora: bool) -> None:
    where = f"add_adapters(method={'dora' if dora else 'lora'!r})"
    _check_number(rank, "rank", where, low=1, integer=True)
    _check_number(alpha, "alpha", where, low=0)
    _check_number(dropout, "dropout", where, low=0, below=1)
    if not isinstance(rslora, bool):
        raise InputError(f"{where}: rslora: expected true or false, got {rslora!r}")
    quantization = getattr(model, "quantization", None)
    if quantization is not None and quantization.get("mode") != "weight-int8":
        raise InputError(f"{where}: this model is quantized with mode {quantization.get('mode')!r}, whose torch.ao "
                         "layers pass no gradient back to their input; quantize with mode 'weight-int8' for LoRA on "
                         "int8 weights")
    sites = resolve_sites(model, targets, layers, rank=rank, where=where)
    for site in sites:
        host = getattr(model.get_submodule(site.layer), "adapters", None)
        if isinstance(host, LoRAHost) and name in host and site.target in host[name]:
            raise InputError(f"{where}: {site.layer} already has an adapter {name!r} on {site.target!r}; add this "
                             "one under another name")
    for site in sites:
        linear = model.get_submodule(site.layer)
        weight = base_weight(linear)
        # LoRA weights in float32 over a half-precision or int8 base (QLoRA keeps its adapters in higher precision).
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        lora = LoRA(site, rank, float(alpha), dropout=float(dropout), rslora=rslora,
                    dora_weight=weight[site.start:site.stop] if dora else None, device=weight.device, dtype=dtype)
        lora.adapter_name = name
        lora.train(linear.training)  # a model in eval mode stays so (no LoRA dropout)
        host = _host_of(linear)
        if name not in host:
            host[name] = nn.ModuleDict()
        host[name][site.target] = lora


@register_method("lora")
def apply_lora(model: nn.Module, *, targets=("q", "v"), layers=None, name: str = "default", rank: int = 8,
               alpha: float = 16, dropout: float = 0.0, rslora: bool = False) -> None:
    """LoRA adapters on ``targets`` at ``layers`` (see ``formerkit.adapt.targets``): rank, alpha, dropout on the
    adapter's input, and ``rslora`` for the rank-stabilized scale alpha / sqrt(rank)."""
    _apply(model, targets=targets, layers=layers, name=name, rank=rank, alpha=alpha, dropout=dropout,
           rslora=rslora, dora=False)


@register_method("dora")
def apply_dora(model: nn.Module, *, targets=("q", "v"), layers=None, name: str = "default", rank: int = 8,
               alpha: float = 16, dropout: float = 0.0, rslora: bool = False) -> None:
    """DoRA adapters: LoRA's options, plus a trained magnitude per output row of each target."""
    _apply(model, targets=targets, layers=layers, name=name, rank=rank, alpha=alpha, dropout=dropout,
           rslora=rslora, dora=True)


def merge_lora(model: nn.Module) -> int:
    """Adds the active LoRA/DoRA adapters into their Linears' weights and removes every LoRA/DoRA adapter (active or
    not) with its hook; returns how many adapters were merged. int8 layers are refused before anything changes."""
    found = hosts(model)
    for path, (linear, host) in found.items():
        if host.modules_active() and not isinstance(getattr(linear, "weight", None), nn.Parameter):
            raise InputError(f"merge_adapters: {path} has int8 weights ({type(linear).__name__}); merging would "
                             "re-quantize them and change the outputs by the rounding. Load the adapter onto the "
                             "float base and merge there, or keep it separate")
    merged = 0
    with torch.no_grad():
        for linear, host in found.values():
            weight = linear.weight
            original = weight.detach().clone()
            for lora in host.modules_active():
                rows = original[lora.start:lora.stop].to(lora.lora_A.dtype)
                weight[lora.start:lora.stop] += lora.merged_update(rows).to(weight.dtype)
                merged += 1
            detach_host(linear)
    return merged
