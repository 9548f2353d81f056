"""``formerkit bench lm``: a GPT-2-layout decoder in formerkit against the same decoder in the libraries users would
otherwise pick, measured in one run on identical work.

Contenders (a peer that is not installed is skipped with a note):

- ``formerkit``: the ``gpt2`` preset at the benchmark's sizes, trained as its trainer trains it by default
  (``formerkit.train``'s fused AdamW, the gradient norm clipped to ``optim.grad_clip``), decoding with
  ``generate(compile=True)``;
- ``transformers``: ``GPT2LMHeadModel`` with ``attn_implementation="sdpa"``, decoding with ``generate``;
- ``x-transformers``: ``TransformerWrapper`` + ``Decoder(attn_flash=True)`` with a tied head, decoding with its
  ``AutoregressiveWrapper.generate`` (key/value cache on);
- ``nanogpt``: the nanoGPT-style model of ``formerkit.bench.nanogpt``, decoding by recomputing the window.

Every contender: the same layers, width, heads, context and vocabulary, no dropout, random weights; the loss is the
cross-entropy of every position's next token computed the same way; peers step with ``torch.optim.AdamW`` at its
defaults (what a user of those libraries gets). Metrics, per precision (fp32, bf16 autocast): training tokens/s
(forward + backward + optimizer step), inference tokens/s (a forward pass without gradients), and the peak resident
memory a fresh process gains from building the model and training (imports excluded); in fp32 also batch-1 greedy
decoding tokens/s. Times are medians over ``rounds``, the contenders taking turns within each round so drift in the
machine's speed spreads over all of them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from formerkit.bench.common import (
    PRECISIONS,
    autocast,
    check_choices,
    in_fresh_process,
    markdown_table,
    matmul_limit,
    parameter_count,
    record,
    seconds,
    train_step,
    training_memory,
)
from formerkit.bench.nanogpt import NanoGPT
from formerkit.errors import InputError
from formerkit.models.registry import create_model, model_config
from formerkit.summary import summarize
from formerkit.train.config import OptimConfig
from formerkit.train.trainer import build_optimizer

__all__ = ["LIBRARIES", "LMSpec", "lm_benchmark"]

LIBRARIES = ("formerkit", "transformers", "x-transformers", "nanogpt")


@dataclass(frozen=True)
class LMSpec:
    """The work: nanoGPT's shakespeare-char decoder by default."""

    layers: int = 6
    heads: int = 6
    width: int = 384
    context: int = 256
    vocab: int = 65
    batch: int = 8
    prompt: int = 8
    new_tokens: int = 200

    def check(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"bench lm: {name} must be an integer >= 1, got {value!r}")
        if self.width % self.heads:
            raise InputError(f"bench lm: width {self.width} is not divisible by heads {self.heads}")
        if self.prompt + self.new_tokens > self.context:
            raise InputError(f"bench lm: prompt {self.prompt} + new tokens {self.new_tokens} exceed the context "
                             f"{self.context}")

    @property
    def gpt2_overrides(self) -> dict:
        """The ``gpt2`` preset's overrides that make formerkit's contender this model: this size, and nanoGPT's exact
        (erf) GELU, which every contender uses (GPT-2's own tanh approximation is 5x slower in PyTorch's CPU kernel
        than the exact one, so a mixed field would not be the same work)."""
        return {"width": self.width, "num_layers": self.layers, "num_heads": self.heads, "max_seq_len": self.context,
                "vocab_size": self.vocab, "feedforward.activation": "gelu"}

    @property
    def shape(self) -> str:
        return (f"{self.layers} layers, width {self.width}, {self.heads} heads, exact GELU, vocab {self.vocab}; batch "
                f"{self.batch} x {self.context} tokens; decode {self.prompt} + {self.new_tokens}")


@dataclass
class _Contender:
    library: str
    model: nn.Module
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    decode: Callable[[torch.Tensor, int], torch.Tensor]
    # The gradient norm clipped to this before each optimizer step (None: no clipping).
    grad_clip: float | None = None


def _formerkit(spec: LMSpec, decode_compile: bool) -> _Contender:
    model = create_model("gpt2", **spec.gpt2_overrides)
    return _Contender("formerkit", model, lambda m: build_optimizer(m, OptimConfig()),
                      lambda prompt, n: model.generate(prompt, n, temperature=0, compile=decode_compile),
                      OptimConfig().grad_clip)


def _transformers(spec: LMSpec) -> _Contender:
    import transformers

    config = transformers.GPT2Config(n_layer=spec.layers, n_head=spec.heads, n_embd=spec.width,
                                     n_positions=spec.context, vocab_size=spec.vocab, activation_function="gelu",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                     eos_token_id=None)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")

    class Logits(nn.Module):  # the model's logits alone, like every other contender's forward
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(ids, use_cache=False).logits

    def decode(prompt, n):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return _Contender("transformers", Logits(), lambda m: torch.optim.AdamW(m.parameters()), decode)


def _x_transformers(spec: LMSpec) -> _Contender:
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    model = TransformerWrapper(num_tokens=spec.vocab, max_seq_len=spec.context, tie_embedding=True,
                               attn_layers=Decoder(dim=spec.width, depth=spec.layers, heads=spec.heads,
                                                   attn_dim_head=spec.width // spec.heads, attn_flash=True))
    wrapper = AutoregressiveWrapper(model)

    def decode(prompt, n):
        return wrapper.generate(prompt, n, temperature=0.0, cache_kv=True)

    return _Contender("x-transformers", model, lambda m: torch.optim.AdamW(m.parameters()), decode)


def _nanogpt(spec: LMSpec) -> _Contender:
    model = NanoGPT(vocab_size=spec.vocab, context=spec.context, width=spec.width, layers=spec.layers,
                    heads=spec.heads)
    return _Contender("nanogpt", model, lambda m: torch.optim.AdamW(m.parameters()), model.generate)


def _build(library: str, spec: LMSpec, decode_compile: bool) -> _Contender:
    builders = {"formerkit": lambda: _formerkit(spec, decode_compile), "transformers": lambda: _transformers(spec),
                "x-transformers": lambda: _x_transformers(spec), "nanogpt": lambda: _nanogpt(spec)}
    return builders[library]()


def _available(library: str) -> str | None:
    """None if the library can be benchmarked here, else why not."""
    module = {"transformers": "transformers", "x-transformers": "x_transformers"}.get(library)
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"{library} is not installed (pip install 'formerkit[bench]')"
    return None


def _batch(spec: LMSpec, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab, (spec.batch, spec.context + 1), generator=generator)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, precision: str,
                grad_clip: float | None = None) -> None:
    train_step(model, optimizer, batch[:, :-1], batch[:, 1:], precision, grad_clip)


def memory_child(library: str, spec: dict, precision: str, steps: int) -> float:
    """In a fresh process: the peak resident memory (MB) that building the model and ``steps`` training steps add
    to what the imports hold."""
    lm_spec = LMSpec(**spec)
    if library == "transformers":
        import transformers  # noqa: F401  (imports are not the model's memory)
    elif library == "x-transformers":
        import x_transformers  # noqa: F401
    batch = _batch(lm_spec)

    def build():
        contender = _build(library, lm_spec, decode_compile=False)
        return contender.model, contender.optimizer(contender.model)

    def warm_up():
        tiny = LMSpec(layers=1, heads=2, width=32, context=16, vocab=lm_spec.vocab, batch=2, prompt=1, new_tokens=1)
        contender, tokens = _build(library, tiny, decode_compile=False), _batch(tiny)
        return contender.model, contender.optimizer(contender.model), tokens[:, :-1], tokens[:, 1:]

    grad_clip = OptimConfig().grad_clip if library == "formerkit" else None
    return training_memory(build, batch[:, :-1], batch[:, 1:], precision, steps, warm_up, grad_clip)


def _peak_memory(library: str, spec: LMSpec, precision: str, steps: int = 2) -> float:
    code = ("import json; from formerkit.bench.lm import memory_child; "
            f"print(json.dumps(memory_child({library!r}, {json.dumps(asdict(spec))}, {precision!r}, {steps})))")
    return float(in_fresh_process(code, f"the memory of {library} ({precision})"))


def lm_benchmark(spec: LMSpec = LMSpec(), *, libraries=LIBRARIES, precisions=PRECISIONS, rounds: int = 5,
                 decode_rounds: int = 3, decode: bool = True, decode_compile: bool = True, memory: bool = True,
                 progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """Measures every available library; returns the records and notes (what was skipped and why)."""
    spec.check()
    check_choices("lm", libraries, LIBRARIES, precisions, {"rounds": rounds, "decode_rounds": decode_rounds})
    say = progress or (lambda text: None)
    notes, contenders = [], {}
    for library in libraries:
        why = _available(library)
        if why is not None:
            notes.append(f"skipped {library}: {why}")
            continue
        torch.manual_seed(0)
        contenders[library] = _build(library, spec, decode_compile)
    params = {name: parameter_count(c.model) for name, c in contenders.items()}
    records: list[dict] = []
    tokens = spec.batch * spec.context
    batch = _batch(spec)
    # One forward pass's FLOPs, counted on formerkit's model (every contender computes the same products); a
    # training step is about three of them.
    flops_per_token = _forward_flops_per_token(spec)
    for precision in precisions:
        say(f"the {precision} matrix-multiply limit")
        limit = matmul_limit(precision)
        records.append(record("lm", "torch.mm 2048^3", precision, "matmul_gflops", limit, "GFLOP/s", 0,
                              "2048 x 2048 x 2048"))
        optimizers = {name: c.optimizer(c.model) for name, c in contenders.items()}
        train = {name: [] for name in contenders}
        infer = {name: [] for name in contenders}
        for name, contender in contenders.items():  # warm-up: first steps allocate state and pick kernels
            say(f"warming up {name} ({precision})")
            contender.model.train()
            for _ in range(2):
                _train_step(contender.model, optimizers[name], batch, precision, contender.grad_clip)
        for round_ in range(rounds):
            for name, contender in contenders.items():
                say(f"round {round_ + 1}/{rounds}: {name} ({precision})")
                contender.model.train()
                train[name].append(seconds(_train_step, contender.model, optimizers[name], batch, precision,
                                           contender.grad_clip))
                contender.model.eval()
                with torch.inference_mode(), autocast(precision):
                    if round_ == 0:
                        contender.model(batch[:, :-1])  # warm-up: inference picks its own kernels
                    infer[name].append(seconds(contender.model, batch[:, :-1]))
        for name in contenders:
            train_rate = tokens / statistics.median(train[name])
            records.append(record("lm", name, precision, "train_tok_per_s", train_rate, "tokens/s", params[name],
                                  spec.shape))
            records.append(record("lm", name, precision, "train_matmul_utilization",
                                  3 * flops_per_token * train_rate / (limit * 1e9), "fraction", params[name],
                                  spec.shape))
            records.append(record("lm", name, precision, "infer_tok_per_s", tokens / statistics.median(infer[name]),
                                  "tokens/s", params[name], spec.shape))
        if memory:
            for name in contenders:
                say(f"peak memory of {name} ({precision}), in a fresh process")
                records.append(record("lm", name, precision, "peak_rss_mb", _peak_memory(name, spec, precision),
                                      "MB", params[name], spec.shape))
    if decode:
        records.extend(_decode(spec, contenders, params, decode_rounds, say))
    return records, notes


def _forward_flops_per_token(spec: LMSpec) -> float:
    config = model_config("gpt2", **spec.gpt2_overrides)
    return summarize(config, batch=1, seq_len=spec.context).flops_per_unit


def _decode(spec: LMSpec, contenders: dict[str, _Contender], params: dict[str, int], rounds: int,
            say: Callable[[str], None]) -> list[dict]:
    """Batch-1 greedy decoding of ``new_tokens`` after a ``prompt``-token prompt, fp32."""
    prompt = torch.randint(0, spec.vocab, (1, spec.prompt), generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in contenders}
    for name, contender in contenders.items():
        say(f"warming up {name} decoding" + (" (compiling its decode step)" if name == "formerkit" else ""))
        contender.model.eval()
        with torch.inference_mode():
            out = contender.decode(prompt, spec.new_tokens)
        if out.shape[-1] not in (spec.new_tokens, spec.prompt + spec.new_tokens):
            raise RuntimeError(f"bench lm: {name} decoded {out.shape[-1]} tokens, expected {spec.new_tokens} new")
    for round_ in range(rounds):
        for name, contender in contenders.items():
            say(f"decode round {round_ + 1}/{rounds}: {name}")
            with torch.inference_mode():
                times[name].append(seconds(contender.decode, prompt, spec.new_tokens))
    return [record("lm", name, "fp32", "decode_tok_per_s", spec.new_tokens / statistics.median(values), "tokens/s",
                   params[name], spec.shape) for name, values in times.items()]


METRICS = [("train_tok_per_s", "train tok/s"), ("train_matmul_utilization", "train FLOP/s vs matmul limit"),
           ("infer_tok_per_s", "infer tok/s"), ("decode_tok_per_s", "decode tok/s (batch 1)"),
           ("peak_rss_mb", "peak memory MB")]


def format_lm(records: list[dict]) -> str:
    limits = [r for r in records if r["metric"] == "matmul_gflops"]
    lines = [markdown_table([r for r in records if r["metric"] != "matmul_gflops"], METRICS), ""]
    lines += [f"Matrix-multiply limit ({r['precision']}, {r['shape']}): {r['value']:,.0f} GFLOP/s" for r in limits]
    return "\n".join(lines)
