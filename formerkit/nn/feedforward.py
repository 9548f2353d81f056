"""Position-wise feed-forward parts: a plain MLP and the gated variants of Shazeer (2020), "GLU Variants Improve
Transformer"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.nn.projection import autocasting, hook_owners, project_parts
from formerkit.nn.recompute import saved_tensors_kept_as_they_are

__all__ = ["GatedMLP", "MLP", "activation", "build_feedforward"]


def _squared_relu(x: Tensor) -> Tensor:
    # So et al., 2021, "Primer".
    return F.relu(x).square()


def activation(name: str):
    """The element-wise function behind an activation name (the gated names use their gate's function)."""
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "squared_relu": _squared_relu,
        "silu": F.silu,
        "swiglu": F.silu,
        "geglu": F.gelu,
        "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's GeGLU
    }[name]


# Each activation's derivative as a function of its input and the incoming gradient, for the recomputing backward.
_DERIVATIVES = {
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    "gelu_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "relu": lambda g, h: g * (h > 0),
    "squared_relu": lambda g, h: g * 2 * F.relu(h),
    "silu": lambda g, h: torch.ops.aten.silu_backward(g, h),
    "swiglu": lambda g, h: torch.ops.aten.silu_backward(g, h),
    "geglu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    "geglu_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
}


# The element-wise function each gated name applies to its gate.
_GATE_FUNCTION = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def _derivative_in_place(name: str, grad: Tensor, h: Tensor) -> Tensor:
    """The activation's derivative applied to ``grad`` (a fresh tensor of ours) written over it where a kernel can:
    one hidden-sized tensor alive in the backward pass instead of two."""
    name = _GATE_FUNCTION.get(name, name)
    if name in ("gelu", "gelu_tanh", "silu") and grad.dtype == h.dtype:
        _derivative_into(name, grad, h, grad)
        return grad
    return _DERIVATIVES[name](grad, h)


# Where ``_RecomputedActivationOut.forward``'s ``*factors`` start among its inputs (after gate, up, weight, bias, name,
# overwritable, by_blocks): their gradients' places in ``needs_input_grad``.
_FIRST_FACTOR = 7


class _RecomputedActivationOut(torch.autograd.Function):
    """``fc_out(act(h))`` -- or ``fc_out(act(gate) * up)`` for a gated MLP -- that keeps only ``h`` (``gate`` and
    ``up``) for the backward pass and recomputes the activation there.

    Autograd would keep both ``h`` (for the activation's derivative) and the activation's output (for fc_out's weight
    gradient): with an MLP four times the model's width that is 8 x width floats per token per layer, the largest
    thing a block keeps. Recomputing the element-wise activation costs one extra pass over ``h`` in the backward.
    ``factors`` (LoRA's A matrices on fc_out, ``formerkit.adapt.lora``) are further products of the activation's
    output, returned after fc_out's: their input is recomputed like fc_out's instead of being kept.
    Works under autocast: the products run in the dtype the forward's ran in, gradients return in each input's.
    With ``by_blocks`` (the MLP's ``by_blocks``: the last depth's MLP of a stack) the hidden activation goes by blocks
    (``_block_count``): of rows in the forward pass, of columns in a plain MLP's backward pass, which writes h's
    gradient over h where ``overwritable`` (``_overwritable``) allows it (``_backward_by_columns``)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor | None, weight: Tensor, bias: Tensor | None, name: str,
                overwritable: bool, by_blocks: bool, *factors: Tensor) -> tuple[Tensor, ...]:
        count = _block_count(gate.shape[-1], weight.shape[0]) if by_blocks else 1
        blocks = _blocks(gate.shape[0], count)
        if len(blocks) > 1 and gate.dim() == 2 and not autocasting(gate) and all(
                tensor.dtype == gate.dtype for tensor in (up, weight, bias, *factors) if tensor is not None):
            # By blocks of rows: the hidden activation, which nothing keeps, is never whole (it would be at the top
            # of the forward pass's memory); the products are the same rows' products, bit for bit.
            out = gate.new_empty(gate.shape[0], weight.shape[0])
            products = tuple(gate.new_empty(gate.shape[0], factor.shape[0]) for factor in factors)
            buffer = gate.new_empty(blocks[0][1], gate.shape[1]) if up is None else None
            for start, stop in blocks:
                if up is None:  # one buffer for every block
                    hidden = _activate_into(name, gate[start:stop], buffer[:stop - start])
                else:
                    hidden = _activate(gate[start:stop], up[start:stop], name)
                if bias is None:
                    torch.mm(hidden, weight.t(), out=out[start:stop])
                else:
                    torch.addmm(bias, hidden, weight.t(), out=out[start:stop])
                for product, factor in zip(products, factors):
                    torch.mm(hidden, factor.t(), out=product[start:stop])
                del hidden
        else:
            hidden = _activate(gate, up, name)
            out = F.linear(hidden, weight, bias)
            products = tuple(F.linear(hidden, factor) for factor in factors)
            del hidden
        ctx.save_for_backward(gate, up, weight, *factors)
        ctx.name, ctx.has_bias, ctx.overwritable, ctx.by_blocks = name, bias is not None, overwritable, by_blocks
        ctx.dtype = out.dtype
        return (out, *products)

    @staticmethod
    def backward(ctx, grad: Tensor, *grad_products: Tensor):
        gate, up, weight, *factors = ctx.saved_tensors
        act = activation(ctx.name)
        grad = grad.to(ctx.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        grad_products = [g.to(ctx.dtype).reshape(-1, g.shape[-1]) for g in grad_products]
        if _by_columns(ctx, gate, up, weight, factors):
            return _backward_by_columns(ctx, flat, gate, weight, factors, grad_products)
        needs_hidden = ctx.needs_input_grad[2] or any(ctx.needs_input_grad[_FIRST_FACTOR:])
        gated_input_grad = up is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        activated = act(gate) if needs_hidden or gated_input_grad else None
        grad_gate = grad_up = grad_weight = grad_bias = None
        grad_factors = [None] * len(factors)
        if needs_hidden:  # fc_out's weight or LoRA's factors train: they need the activation's output, recomputed
            hidden = activated if up is None else activated * up
            hidden = hidden.reshape(-1, hidden.shape[-1]).to(ctx.dtype)
            if ctx.needs_input_grad[2]:
                grad_weight = (flat.t() @ hidden).to(weight.dtype)
            for i, (factor, grad_product) in enumerate(zip(factors, grad_products)):
                if ctx.needs_input_grad[_FIRST_FACTOR + i]:
                    grad_factors[i] = (grad_product.t() @ hidden).to(factor.dtype)
            del hidden
            if up is None:  # not needed below: freed before the hidden-sized gradient is made
                activated = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_hidden = flat @ weight.to(ctx.dtype)
            for factor, grad_product in zip(factors, grad_products):
                grad_hidden.addmm_(grad_product, factor.to(ctx.dtype))
            grad_hidden = grad_hidden.view(*grad.shape[:-1], -1).to(gate.dtype)
            if up is None:
                grad_gate = _derivative_in_place(ctx.name, grad_hidden, gate)
            else:
                # grad_up = grad_hidden * act(gate), grad_gate = act'(gate) * grad_hidden * up, written over the
                # tensors this backward made itself (the recomputed activation and grad_hidden): one hidden-sized
                # tensor allocated instead of four, four passes over the hidden features after the product.
                if ctx.needs_input_grad[1]:
                    grad_up = activated.mul_(grad_hidden) if activated.dtype == up.dtype else activated * grad_hidden
                del activated
                if ctx.needs_input_grad[0]:
                    grad_gate = _derivative_in_place(ctx.name, grad_hidden.mul_(up), gate)
        return grad_gate, grad_up, grad_weight, grad_bias, None, None, None, *grad_factors


def _by_columns(ctx, gate: Tensor, up: Tensor | None, weight: Tensor, factors: list[Tensor]) -> bool:
    """Whether this backward pass goes by blocks of hidden columns (``_backward_by_columns``): an MLP that goes by
    blocks, plain (not gated), with everything in one dtype (no autocast)."""
    return (ctx.by_blocks and up is None and gate.dim() == 2 and gate.dtype == weight.dtype == ctx.dtype
            and all(factor.dtype == ctx.dtype for factor in factors))


def _overwrites(ctx) -> bool:
    """Whether h's gradient may be written over h: fc_in's output that nothing else holds (``overwritable``, decided
    in the forward pass), its gradient wanted, and a graph that is freed after this pass (a second backward pass
    over a retained graph reads h again; ``create_graph`` retains it too)."""
    return (ctx.overwritable and ctx.needs_input_grad[0]
            and not torch._C._autograd._get_current_graph_task_keep_graph())


def _block_count(hidden: int, width: int) -> int:
    """Into how many blocks the hidden activation of an MLP that goes by blocks is cut: blocks at most twice the size
    of the residual stream (2 for a GPT-2 MLP four times the width). A whole hidden activation is at the top of the
    memory of a training step only in the last depth's MLP (at the end of the forward pass, everything saved before
    it is alive; the backward pass starts there), so only that MLP goes by blocks (``MLP.by_blocks``, set by the
    stack): the bench LM's peak 332.6 -> 326.5 MB. Every MLP by blocks cost ~0.8% of a step for the same peak;
    blocks of a megabyte (170 rows) 1-3% (bench/RESULTS.md)."""
    return max(-(-hidden // (2 * max(width, 1))), 1)


def _blocks(size: int, count: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting ``size`` into ``count`` (nearly) equal blocks."""
    step = max(-(-size // count), 1)
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _activate_into(name: str, h: Tensor, out: Tensor) -> Tensor:
    """``activation(name)(h)`` written into ``out``."""
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu.out(h, approximate="tanh" if name == "gelu_tanh" else "none", out=out)
    if name == "silu":
        return torch.ops.aten.silu.out(h, out=out)
    return out.copy_(activation(name)(h))


def _derivative_into(name: str, grad: Tensor, h: Tensor, out: Tensor) -> None:
    """The activation's derivative at ``h`` times ``grad``, written into ``out`` (which may be ``h`` itself)."""
    if name in ("gelu", "gelu_tanh"):
        approximate = "tanh" if name == "gelu_tanh" else "none"
        torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=out)
    elif name == "silu":
        torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=out)
    else:
        out.copy_(_DERIVATIVES[name](grad, h))


def _backward_by_columns(ctx, flat: Tensor, h: Tensor, weight: Tensor, factors: list[Tensor],
                         grad_products: list[Tensor]):
    """The backward pass of ``fc_out(act(h))`` (and LoRA's ``act(h) A^T``) a block of hidden columns at a time,
    writing h's gradient over h itself where it may (``_overwrites``).

    Done whole, the backward pass holds two hidden-sized tensors besides h: the recomputed activation (for the weight
    gradients) and then the hidden gradient. h's gradient is an element-wise function of h and of the hidden
    gradient, and h is read for the last time there: so each block of columns recomputes its activation (for its
    columns of the weight gradients), forms its columns of the hidden gradient in the same buffer, and writes the
    derivative over its columns of h. One block-sized buffer (see ``_block_count``) instead of a hidden-sized tensor:
    the top of the backward pass drops by the hidden activation less a block. Where h must stay (a retained graph, a
    tensor someone else holds), h's gradient goes to a tensor of its own by the same arithmetic, so the gradients do
    not depend on which. The products are the whole products' columns (the same dot products, no sums split), the
    element-wise kernels the same."""
    h = h.detach()
    needs = ctx.needs_input_grad
    grad_h = (h if _overwrites(ctx) else h.new_empty(h.shape)) if needs[0] else None
    grad_weight = weight.new_empty(weight.shape) if needs[2] else None
    grad_factors = [factor.new_empty(factor.shape) if needs[_FIRST_FACTOR + i] else None
                    for i, factor in enumerate(factors)]
    blocks = _blocks(h.shape[1], _block_count(h.shape[1], weight.shape[0]))
    buffer = h.new_empty(h.shape[0], blocks[0][1])
    for start, stop in blocks:
        part, block = h[:, start:stop], buffer[:, :stop - start]
        if grad_weight is not None or any(found is not None for found in grad_factors):
            _activate_into(ctx.name, part, block)
            if grad_weight is not None:
                torch.mm(flat.t(), block, out=grad_weight[:, start:stop])
            for grad_factor, grad_product in zip(grad_factors, grad_products):
                if grad_factor is not None:
                    torch.mm(grad_product.t(), block, out=grad_factor[:, start:stop])
        if grad_h is not None:
            torch.mm(flat, weight[:, start:stop], out=block)
            for factor, grad_product in zip(factors, grad_products):
                block.addmm_(grad_product, factor[:, start:stop])
            _derivative_into(ctx.name, block, part, grad_h[:, start:stop])
    grad_bias = flat.sum(0) if ctx.has_bias and needs[3] else None
    return grad_h, None, grad_weight, grad_bias, None, None, None, *grad_factors


def _activate(gate: Tensor, up: Tensor | None, name: str) -> Tensor:
    # act(gate) is a fresh tensor: the product with up is written over it (one hidden-sized tensor made, not two).
    activated = activation(name)(gate)
    if up is None:
        return activated
    return activated.mul_(up) if activated.dtype == torch.promote_types(activated.dtype, up.dtype) else activated * up


def _recomputes(module: nn.Module, h: Tensor) -> bool:
    """Whether this call takes the recomputing path: training with gradients, no dropout between the activation
    and fc_out, a plain Linear fc_out (not a quantized or wrapped one), eager (a compiler makes its own choice)."""
    # The type first: an int8 fc_out has no .weight.
    return (module.recompute and torch.is_grad_enabled() and type(module.fc_out) is nn.Linear
            and (h.requires_grad or module.fc_out.weight.requires_grad)
            and not (module.dropout is not None and module.training)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def _overwritable(module: nn.Module, gate: Tensor, up: Tensor | None) -> bool:
    """Whether the backward pass may write fc_in's output over with its gradient: a plain MLP whose fc_in is a plain
    Linear (or one adapted by LoRA, whose hooks keep no reference to it) that made ``gate`` just now as a tensor of
    its own (not part of a larger storage, not a view of the input), and no saved-tensors hooks but the norm's
    (``formerkit.nn.recompute``, which passes this tensor through untouched): checkpointing or offloading hooks
    would hand back a copy or a recomputation."""
    if up is not None or type(module.fc_in) is not nn.Linear or hook_owners(module.fc_in, "recomputable") is None:
        return False
    if gate.grad_fn is None or not gate.is_contiguous() or gate.storage_offset() != 0 or (
            gate.untyped_storage().nbytes() != gate.numel() * gate.element_size()):
        return False
    return saved_tensors_kept_as_they_are()


def _recomputed_out(module: nn.Module, gate: Tensor, up: Tensor | None) -> Tensor | None:
    """fc_out(act(...)) through ``_RecomputedActivationOut``, or None where this call cannot take that path. fc_out's
    forward hooks take part if the objects they are bound to provide ``recomputable(linear)`` (the factors whose
    products with fc_out's input they need, or None) and ``add_recomputed(linear, output, products)`` (flat tensors,
[tokens, features]): LoRA's do
    (formerkit.adapt.lora), so LoRA on fc_out keeps the memory this path saves; any other hook is skipped by it."""
    if not _recomputes(module, gate):
        return None
    fc_out = module.fc_out
    owners = hook_owners(fc_out, "recomputable")
    if owners is None:
        return None
    factors = [owner.recomputable(fc_out) for owner in owners]
    if any(found is None for found in factors):
        return None
    # Flat [tokens, features] inputs: the outputs are then not views, so the hooks may add to them in place.
    shape = gate.shape[:-1]
    out, *products = _RecomputedActivationOut.apply(
        gate.reshape(-1, gate.shape[-1]), None if up is None else up.reshape(-1, up.shape[-1]), fc_out.weight,
        fc_out.bias, module.activation_name, _overwritable(module, gate, up), module.by_blocks,
        *(factor for found in factors for factor in found))
    for owner, found in zip(owners, factors):
        out = owner.add_recomputed(fc_out, out, products[:len(found)])
        products = products[len(found):]
    return out if len(shape) == 1 else out.view(*shape, -1)


class MLP(nn.Module):
    """fc_out(dropout(act(fc_in(x)))). With ``recompute`` (the default) training keeps fc_in's output only and
    recomputes the activation in the backward pass (see ``_RecomputedActivationOut``): the same gradients, a
    quarter less activation memory for a GPT-2 block, for one more element-wise pass."""

    def __init__(self, width: int, hidden_size: int, activation_name: str, bias: bool = True, dropout: float = 0.0,
                 recompute: bool = True):
        super().__init__()
        self.fc_in = nn.Linear(width, hidden_size, bias=bias)
        self.fc_out = nn.Linear(hidden_size, width, bias=bias)
        self.activation_name = activation_name
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.recompute = recompute
        # The hidden activation by blocks in training (see ``_block_count``): set on the last depth's MLP of a stack.
        self.by_blocks = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        out = _recomputed_out(self, h, None)
        if out is not None:
            return out
        hidden = self.act(h)
        if self.dropout is not None and self.training:
            hidden = self.dropout(hidden)
        return self.fc_out(hidden)


class GatedMLP(nn.Module):
    """fc_out(act(gate) * up), with gate and up computed by one fused projection (first half gate, second half up);
    ``recompute`` as for ``MLP`` (it saves two hidden-sized tensors per token here)."""

    def __init__(self, width: int, hidden_size: int, activation_name: str, bias: bool = True, dropout: float = 0.0,
                 recompute: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.fc_in = nn.Linear(width, 2 * hidden_size, bias=bias)
        self.fc_out = nn.Linear(hidden_size, width, bias=bias)
        self.activation_name = activation_name
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.recompute = recompute
        # The hidden activation by blocks in training (see ``_block_count``): set on the last depth's MLP of a stack.
        self.by_blocks = False

    def forward(self, x: Tensor) -> Tensor:
        # gate and up as two products (formerkit.nn.projection): no [gate | up] gradient to concatenate backward.
        gate, up = project_parts(self.fc_in, x, [self.hidden_size, self.hidden_size])
        out = _recomputed_out(self, gate, up)
        if out is not None:
            return out
        hidden = self.act(gate) * up
        if self.dropout is not None and self.training:
            hidden = self.dropout(hidden)
        return self.fc_out(hidden)


def build_feedforward(config, index: int = 0) -> nn.Module:
    """The feed-forward part of layer ``index`` (its hidden size may be its own in a pruned model)."""
    ff = config.feedforward
    cls = GatedMLP if ff.gated else MLP
    return cls(config.width, config.layer_feedforward_size(index), ff.activation, ff.bias, ff.dropout)
