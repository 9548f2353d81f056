"""A norm's output kept once: the layers that read it do not save it for their backward pass, they recompute it there.

In a pre-norm block the norm keeps its input for its own backward pass, and the projection that reads its output
(attention's qkv, the MLP's fc_in) keeps that output for its weight gradient: two tensors of the model's width per
token for one sub-layer. The output is a cheap element-wise function of the input the norm keeps anyway, so inside
``recomputed_norm_output`` every tensor the branch saves that is the norm's output (or a view of it) is saved as a
recipe instead -- the norm module and its input -- and rebuilt by running the norm again when the backward pass asks
for it: a norm's output per sub-layer less to keep (a sixth of a GPT-2 block's saved activations), for one more
norm forward (element-wise) per sub-layer in the backward pass. The rebuilt output is the same kernel on the same
input, bit for bit what the forward computed, so the gradients are unchanged.

This works through ``torch.autograd.graph.saved_tensors_hooks``, which any operation inside the branch goes through
(LoRA's extra products included). Hooks do not nest (the innermost pair alone is used), so the path steps aside when
hooks are already in place (activation checkpointing, ``save_on_cpu``), and under a compiler, which makes its own
choice of what to keep.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor, nn

from formerkit.nn.projection import autocasting

__all__ = ["counting_recomputed_outputs", "recomputed_norm_output", "saved_tensors_kept_as_they_are"]

# Set by ``counting_recomputed_outputs``: the storages of the norm outputs this path would not keep.
_COUNTING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("formerkit_recomputed", default=None)


class _Rebuilt:
    """What is saved in place of a view of the norm's output: the view's geometry in the output's storage."""

    __slots__ = ("size", "stride", "offset")

    def __init__(self, tensor: Tensor):
        self.size, self.stride, self.offset = tensor.size(), tensor.stride(), tensor.storage_offset()


class _NormOutput:
    """The pack/unpack pair for one norm call ``output = norm(x)``."""

    def __init__(self, norm: nn.Module, x: Tensor, output: Tensor):
        # Not the output itself: holding it would keep it alive, which is what this avoids. The input is kept by the
        # norm's own backward anyway.
        self.norm, self.x = norm, x
        self.dtype, self.device, self.version = output.dtype, output.device, output._version
        self.pointer = output.untyped_storage().data_ptr()
        self.versions = self._versions()
        # Recipes packed and not yet unpacked, and the rebuilt output kept while some are: several operations save
        # the same output (the base projection and LoRA's products on q, k, v), and one rerun of the norm serves
        # them all. A graph kept for a second backward pass (pending below zero) reruns it at each unpack.
        self.pending, self.rebuilt = 0, None

    def _versions(self) -> tuple[int, ...]:
        return (self.x._version, *(p._version for p in self.norm.parameters(recurse=False)))

    def pack(self, tensor: Tensor):
        # The norm's output or a view of it (linear layers save a flattened view of a 3-d input): same storage, same
        # dtype, not written to since.
        if (tensor.dtype == self.dtype and tensor.device == self.device
                and tensor.untyped_storage().data_ptr() == self.pointer and tensor._version == self.version):
            self.pending += 1
            return _Rebuilt(tensor)
        return tensor

    def unpack(self, packed):
        if not isinstance(packed, _Rebuilt):
            return packed
        if self._versions() != self.versions:
            raise RuntimeError("a norm's input or weights were modified in place between the forward and the "
                               "backward pass: its output cannot be recomputed for the backward pass")
        rebuilt = self.rebuilt
        if rebuilt is None:
            with torch.no_grad():
                rebuilt = self.norm(self.x)
        self.pending -= 1
        self.rebuilt = rebuilt if self.pending > 0 else None
        return rebuilt.as_strided(packed.size, packed.stride, packed.offset)


def recomputed_norm_output(norm: nn.Module | None, x: Tensor, output: Tensor):
    """A context in which the operations that read ``output = norm(x)`` do not keep it for backward but recompute it
    (see the module's docstring); a context that does nothing where that does not apply: no norm, not recording
    gradients, autocast, a compiler, hooks already in place, or an output that is not its own contiguous tensor
    (where the norm's output is a view of something else, other parts of that storage are not the norm's
    output)."""
    # Under autocast the projections keep their own low-precision copy of the norm's output (nothing to gain), and
    # the rebuilt output would be computed outside the forward's autocast region.
    if (norm is None or output is x or not torch.is_grad_enabled() or not output.requires_grad
            or torch.compiler.is_compiling() or torch.jit.is_tracing() or autocasting(output)
            or not output.is_contiguous() or output.storage_offset() != 0
            or output.untyped_storage().nbytes() != output.numel() * output.element_size()):
        return contextlib.nullcontext()
    counted = _COUNTING.get()
    if counted is not None:  # formerkit.summary counting what a training step keeps: this output is not kept
        storage = output.untyped_storage()
        counted[storage._cdata] = storage  # held, so that no later tensor reuses its id during the count
        return contextlib.nullcontext()
    if (output.device.type == "meta" or not torch._C._autograd._saved_tensors_hooks_is_enabled()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
        return contextlib.nullcontext()
    hooks = _NormOutput(norm, x, output)
    return torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack)


@contextlib.contextmanager
def counting_recomputed_outputs():
    """For counting what a training step keeps (``formerkit.summary.saved_activation_bytes``, whose own saved-tensors
    hook would make this path step aside): within it, the norm outputs this path would recompute are not hooked but
    listed, in the dict this yields (their storages by id), for the count to leave out. Works on the meta device."""
    token = _COUNTING.set({})
    try:
        yield _COUNTING.get()
    finally:
        _COUNTING.reset(token)


def saved_tensors_kept_as_they_are() -> bool:
    """Whether a tensor saved for backward now is handed back as itself: no saved-tensors hooks in place, or only a
    norm's of ``recomputed_norm_output`` (which passes every tensor but the norm's output through untouched) --
    not activation checkpointing's or offloading's, which hand back a recomputation or a copy."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is None or getattr(hooks[0], "__func__", None) is _NormOutput.pack
