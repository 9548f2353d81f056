"""The compiled decode step: one new token per row through the decoder, with every input shape fixed.

``generate(..., compile=True)`` runs each step after the prefill through ``decode_step`` compiled ahead of time by
AOTInductor (a shared library with the weights frozen in, called with no Python guards or wrapper per step), or by
``torch.compile`` where AOTInductor cannot, or eagerly where neither can. The step goes through the model's own
forward path (``Transformer.prepare`` with the cache's ``StaticSlots``), so it computes what the eager step does;
the tests hold the two token for token equal.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import types
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from formerkit.nn.cache import KVCache, StaticSlots
from formerkit.nn.masks import KeyPaddingMask, PreparedMask, prepare_attention_mask

__all__ = ["CompiledDecoder", "DecodeStep", "bind_compiled_step", "compile_ahead_of_time", "decode_step",
           "flat_inputs", "gemm_configs"]


def decode_step(model, tokens: Tensor, slots: StaticSlots) -> tuple[Tensor, Tensor]:
    """One new token per row [batch, 1] through the decoder; returns its logits [batch, vocab] and their argmax
    [batch] (the greedy pick, cheaper here than as a call of its own). ``slots`` records the token and advances, in
    place, as ``KVCache.begin`` and ``commit`` would for one real token per row."""
    prepared = model.prepare(tokens, side="decoder", cache=slots)
    hidden = model.decoder(prepared).hidden
    slots.commit()
    logits = model.head(hidden)[:, -1]
    return logits, logits.argmax(dim=-1)


def flat_inputs(tokens: Tensor, slots: StaticSlots) -> list[Tensor]:
    """The decode step's inputs as one flat list of tensors, in the order ``DecodeStep`` reads them: tokens, slot,
    counts, keep, key positions, every layer's keys, every layer's values, the cross-attention keys and values of the
    layers that have them, and the memory mask's parts that are present."""
    flat = [tokens, slots.slot, slots.counts, slots.keep, slots.positions, *slots.keys, *slots.values]
    for kv in slots.cross:
        if kv is not None:
            flat.extend(kv)
    if slots.memory_mask is not None:
        flat.extend(t for t in (slots.memory_mask.value, slots.memory_mask.empty_rows) if t is not None)
    return flat


class DecodeStep(torch.nn.Module):
    """``decode_step`` over the flat tensors of ``flat_inputs``, as ``torch.export`` takes them (the cache buffers
    and bookkeeping are written in place). Which cross-attention layers and memory-mask parts are present is fixed
    at construction."""

    def __init__(self, model, slots: StaticSlots):
        super().__init__()
        self.model = model
        self.num_layers = len(slots.keys)
        self.cross_layers = [layer for layer, kv in enumerate(slots.cross) if kv is not None]
        memory_mask = slots.memory_mask
        self.memory_parts = None if memory_mask is None else (memory_mask.value is not None,
                                                              memory_mask.empty_rows is not None)

    def forward(self, *flat: Tensor) -> tuple[Tensor, Tensor]:
        tokens, slot, counts, keep, positions = flat[:5]
        layers = self.num_layers
        keys, values = list(flat[5:5 + layers]), list(flat[5 + layers:5 + 2 * layers])
        rest = list(flat[5 + 2 * layers:])
        cross: list = [None] * layers
        for layer in self.cross_layers:
            cross[layer], rest = (rest[0], rest[1]), rest[2:]
        memory_mask = None
        if self.memory_parts is not None:
            value = rest.pop(0) if self.memory_parts[0] else None
            memory_mask = PreparedMask(value=value, empty_rows=rest.pop(0) if self.memory_parts[1] else None)
        slots = StaticSlots.from_buffers(keys, values, cross, slot, keep, positions, counts, memory_mask)
        return decode_step(self.model, tokens, slots)


def _signature(slots: StaticSlots) -> tuple:
    """What an ahead-of-time compiled step is specialized to: the batch and cache length (``keep``'s shape), the
    cache's dtype and device, and the memory mask's shapes (every other input's shape follows from these)."""
    memory_mask = slots.memory_mask
    memory = None if memory_mask is None else tuple(None if t is None else tuple(t.shape)
                                                    for t in (memory_mask.value, memory_mask.empty_rows))
    return tuple(slots.keep.shape), slots.keys[0].dtype, slots.keys[0].device, memory


# Inductor's own C++ matrix kernels for the step's Linear layers (weights packed for them when frozen): for one
# token's matrix-vector products they measured ~5% faster per step than the matrix library call, whose ATen wrapper
# also costs a few small tensor operations per call. Where they cannot be built (a CPU without the vector
# instructions they use), the step is compiled again with the plain library call. (AOTInductor's experimental
# stack allocation of small intermediates was ~3% faster still, but gave wrong logits at batch 2: left out.)
_GEMM_CONFIGS = ({"cpp.weight_prepack": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"},
                 # No weight pre-packing for the library call: on CPU it swaps each Linear for a oneDNN kernel that,
                 # for matrix-vector products, measured ~2x slower than the plain call (addmm).
                 {"cpp.weight_prepack": False})
# From this many rows per step the plain library call goes first: the products are then matrix-matrix, where the
# matrix library's kernels beat inductor's templates (the bench LM, one thread: 8.7 against 10.0 ms per step at
# batch 8, 18.2 against 23.5 at batch 32, while at batch 1 the templates won, 4.0 against 5.9 ms; bench/RESULTS.md,
# issue 22). Between 1 and 8 rows it was not measured.
_LIBRARY_FROM_ROWS = 8


def gemm_configs(rows: int) -> tuple[dict, ...]:
    """The inductor settings for the step's Linear layers, in the order they are tried, for ``rows`` rows per step."""
    return _GEMM_CONFIGS if rows < _LIBRARY_FROM_ROWS else tuple(reversed(_GEMM_CONFIGS))


def compile_ahead_of_time(model, slots: StaticSlots, flat: list[Tensor]):
    """The decode step compiled by AOTInductor: exported once (``torch.export``) and compiled to a shared library with
    the weights frozen in. A call runs C++ from end to end, with none of the Python work per call of a
    ``torch.compile``d function (its guards and its Python wrapper around the kernels), which at batch 1 is a large
    part of a step's time. The package is loaded, then its file removed."""
    import torch._inductor  # the compiler, imported only by those who compile

    step = DecodeStep(model, slots).eval()
    directory = tempfile.mkdtemp(prefix="formerkit-decode-")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own internals, nothing the caller can act on
            program = torch.export.export(step, tuple(flat), strict=False)
            configs = gemm_configs(slots.keep.shape[0])
            for attempt, gemm in enumerate(configs):
                try:
                    path = torch._inductor.aoti_compile_and_package(
                        program, package_path=f"{directory}/step{attempt}.pt2",
                        inductor_configs={"freezing": True, **gemm})
                    return torch._inductor.aoti_load_package(path)
                except Exception:
                    if attempt + 1 == len(configs):
                        raise
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class CompiledDecoder:
    """The compiled decode step of one model, specialized to fixed shapes (one per batch size and cache length).

    AOTInductor first (see ``compile_ahead_of_time``); where it cannot compile the step, ``torch.compile`` (with
    guards and a Python wrapper, slower per step); where neither can, the caller decodes without compiling. Weights
    are frozen into the compiled code; a change to any parameter makes a fresh one."""

    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, model):
        self.fingerprint = self._fingerprint(model)
        self.model = weakref.ref(model)
        self.ahead: dict[tuple, object] = {}
        self.ahead_failed = False
        self.ahead_error: str | None = None  # why AOTInductor could not compile the step, for whoever wonders
        self.jit = None

    def bind(self, slots: StaticSlots) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """The step over one cache's buffers: a function of the new tokens [batch, 1] that returns their logits
        [batch, vocab] and argmax [batch] (compiling on first use of these shapes)."""
        if not self.ahead_failed:
            key = _signature(slots)
            tokens = torch.zeros(slots.keep.shape[0], 1, dtype=torch.long, device=slots.keep.device)
            flat = flat_inputs(tokens, slots)
            rest = flat[1:]
            runner = self.ahead.get(key)
            if runner is None:
                try:
                    runner = self.ahead[key] = compile_ahead_of_time(self.model(), slots, flat)
                except Exception as error:  # an export or compile this torch cannot do: torch.compile instead
                    self.ahead_failed, self.ahead_error = True, f"{type(error).__name__}: {error}"
            if runner is not None:
                # The runner's own __call__ re-reads its input/output specs (JSON) and walks pytrees on every call,
                # a sizeable share of a batch-1 step; the loader runs a fresh flat list (it takes the list's
                # contents) directly.
                run = getattr(getattr(runner, "loader", None), "boxed_run", None)
                if run is not None:
                    return lambda tokens: run([tokens, *rest])
                return lambda tokens: runner(tokens, *rest)
        return lambda tokens: self._jit_step(tokens, slots)

    def _jit_step(self, tokens: Tensor, slots: StaticSlots) -> tuple[Tensor, Tensor]:
        if self.jit is None:
            # A code object of its own for this model: torch.compile keeps its graphs (which hold this model's frozen
            # weights) per code object, so they are never shared with another model or an earlier version of this
            # one, and never count against another model's recompile limit.
            code = decode_step.__code__.replace()
            function = types.FunctionType(code, decode_step.__globals__, "formerkit_decode_step")
            self.jit = torch.compile(functools.partial(function, self.model()), dynamic=False)
        # Freezing is read from inductor's global config when a graph is compiled (passing it in torch.compile's
        # options does not reach the freezing pass), so it is set just around each call, not for the whole process;
        # the filled length, read from the slot tensor, is captured into the graph rather than breaking it.
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), dynamo_config.patch(capture_scalar_outputs=True):
            return self.jit(tokens, slots)

    @staticmethod
    def _fingerprint(model) -> tuple:
        # Which adapters are active (set_adapter, use_adapter) changes the computation without touching a parameter.
        from formerkit.adapt.methods import AdapterModule

        return (tuple((id(p), p._version, p.dtype, p.device) for p in model.parameters()),
                tuple((id(m), m.active) for m in model.modules() if isinstance(m, AdapterModule)))

    @classmethod
    def for_model(cls, model) -> CompiledDecoder:
        decoder = cls._by_model.get(model)
        if decoder is None or decoder.fingerprint != cls._fingerprint(model):
            decoder = cls._by_model[model] = cls(model)
        return decoder


def bind_compiled_step(model, cache: KVCache) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor]], StaticSlots]:
    """The compiled step over ``cache`` (after its prefill), and the slots it writes through."""
    memory_mask = None
    if cache.memory is not None:
        memory_mask = prepare_attention_mask(None if cache.memory_keep is None else KeyPaddingMask(cache.memory_keep),
                                             1, cache.memory.shape[1], device=cache.keep.device)
    slots = StaticSlots(cache, memory_mask)
    return CompiledDecoder.for_model(model).bind(slots), slots
