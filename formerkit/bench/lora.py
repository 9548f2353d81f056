"""``formerkit bench lora``: LoRA fine-tuning of one LLaMA-layout decoder in formerkit (``formerkit.add_adapters``)
and in ``transformers`` + ``peft`` (``get_peft_model``), measured in one run on identical work.

Both contenders: the same layers, width, heads, grouped key/value heads, SwiGLU width, vocabulary and context, no
dropout, random weights; LoRA of the same rank and alpha on the same projections (query and value by default), the
base frozen; the loss is the cross-entropy of every position's next token; AdamW over the trainable (LoRA)
parameters at its defaults. Metrics: training tokens/s (forward + backward + optimizer step; median over ``rounds``,
the contenders taking turns) and the peak resident memory a fresh process gains from building the model, adding the
adapters and training (imports excluded).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from formerkit.bench.common import (
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

__all__ = ["LIBRARIES", "LoRASpec", "format_lora", "lora_benchmark"]

LIBRARIES = ("formerkit", "transformers+peft")
# formerkit's target names and the Hugging Face LLaMA module names PEFT targets.
_PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj", "gate": "gate_proj", "fc_in": "up_proj",
               "fc_out": "down_proj"}


@dataclass(frozen=True)
class LoRASpec:
    """The work: a small LLaMA-style decoder adapted with LoRA."""

    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    width: int = 512
    hidden: int = 1376
    context: int = 256
    vocab: int = 256
    batch: int = 8
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q", "v")

    def check(self) -> None:
        for name, value in asdict(self).items():
            if name == "targets":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"bench lora: {name} must be an integer >= 1, got {value!r}")
        if self.width % self.heads or self.heads % self.kv_heads:
            raise InputError(f"bench lora: width {self.width} must divide by heads {self.heads}, and heads by "
                             f"kv_heads {self.kv_heads}")
        unknown = [t for t in self.targets if t not in _PEFT_NAMES]
        if unknown or not self.targets:
            raise InputError(f"bench lora: targets: expected some of {', '.join(_PEFT_NAMES)}, got "
                             f"{list(self.targets)}")

    @property
    def shape(self) -> str:
        return (f"{self.layers} layers, width {self.width}, {self.heads} heads ({self.kv_heads} key/value), SwiGLU "
                f"{self.hidden}, vocab {self.vocab}; batch {self.batch} x {self.context} tokens; LoRA rank "
                f"{self.rank} alpha {self.alpha} on {','.join(self.targets)}")


def _formerkit(spec: LoRASpec) -> nn.Module:
    import formerkit

    model = formerkit.create_model("llama_tiny", width=spec.width, num_layers=spec.layers, num_heads=spec.heads,
                                   num_kv_heads=spec.kv_heads, hidden_size=spec.hidden, vocab_size=spec.vocab,
                                   max_seq_len=spec.context)
    return formerkit.add_adapters(model, method="lora", targets=spec.targets, rank=spec.rank, alpha=spec.alpha)


def _transformers(spec: LoRASpec) -> nn.Module:
    import peft
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=spec.layers, hidden_size=spec.width,
                                      num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                                      intermediate_size=spec.hidden, vocab_size=spec.vocab,
                                      max_position_embeddings=spec.context, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    lora = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                           target_modules=[_PEFT_NAMES[t] for t in spec.targets])
    model = peft.get_peft_model(base, lora)

    class Logits(nn.Module):  # the model's logits alone, like formerkit's forward
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(input_ids=ids, use_cache=False).logits

    return Logits()


def _build(library: str, spec: LoRASpec) -> nn.Module:
    torch.manual_seed(0)
    return _formerkit(spec) if library == "formerkit" else _transformers(spec)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def _available(library: str) -> str | None:
    import importlib.util

    if library == "transformers+peft":
        missing = [name for name in ("transformers", "peft") if importlib.util.find_spec(name) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install 'formerkit[bench]')"
    return None


def _batch(spec: LoRASpec, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab, (spec.batch, spec.context + 1), generator=generator)


def memory_child(library: str, spec: dict, steps: int) -> float:
    """In a fresh process: the peak resident memory (MB) that building the model, adding LoRA and ``steps`` training
    steps add to what the imports hold."""
    lora_spec = LoRASpec(**{**spec, "targets": tuple(spec["targets"])})
    if library == "transformers+peft":
        import peft  # noqa: F401  (imports are not the model's memory)
        import transformers  # noqa: F401
    else:
        import formerkit  # noqa: F401
    batch = _batch(lora_spec)

    def build():
        model = _build(library, lora_spec)
        return model, _optimizer(model)

    def warm_up():
        tiny = LoRASpec(layers=1, heads=2, kv_heads=1, width=32, hidden=48, context=16, vocab=lora_spec.vocab,
                        batch=2, rank=2, alpha=4, targets=lora_spec.targets)
        model, tokens = _build(library, tiny), _batch(tiny)
        return model, _optimizer(model), tokens[:, :-1], tokens[:, 1:]

    return training_memory(build, batch[:, :-1], batch[:, 1:], "fp32", steps, warm_up)


def _peak_memory(library: str, spec: LoRASpec, steps: int = 2) -> float:
    code = ("import json; from formerkit.bench.lora import memory_child; "
            f"print(json.dumps(memory_child({library!r}, {json.dumps(asdict(spec))}, {steps})))")
    return float(in_fresh_process(code, f"the LoRA training memory of {library}"))


def lora_benchmark(spec: LoRASpec = LoRASpec(), *, libraries=LIBRARIES, rounds: int = 5, memory: bool = True,
                   progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """Measures every available library (fp32); returns the records and notes (what was skipped and why)."""
    spec.check()
    check_choices("lora", libraries, LIBRARIES, ["fp32"], {"rounds": rounds})
    say = progress or (lambda text: None)
    notes, models = [], {}
    for library in libraries:
        why = _available(library)
        if why is not None:
            notes.append(f"skipped {library}: {why}")
            continue
        models[library] = _build(library, spec)
    batch = _batch(spec)
    tokens = spec.batch * spec.context
    optimizers = {name: _optimizer(model) for name, model in models.items()}
    trainable = {name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, model in models.items()}
    total = {name: parameter_count(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up: first steps allocate state and pick kernels
        say(f"warming up {name}")
        model.train()
        for _ in range(2):
            train_step(model, optimizers[name], batch[:, :-1], batch[:, 1:], "fp32")
    for round_ in range(rounds):
        for name, model in models.items():
            say(f"round {round_ + 1}/{rounds}: {name}")
            times[name].append(seconds(train_step, model, optimizers[name], batch[:, :-1], batch[:, 1:], "fp32"))
    records = []
    for name in models:
        records.append(record("lora", name, "fp32", "train_tok_per_s", tokens / statistics.median(times[name]),
                              "tokens/s", total[name], spec.shape))
        records.append(record("lora", name, "fp32", "trainable_params", trainable[name], "parameters", total[name],
                              spec.shape))
        if memory:
            say(f"peak memory of {name}, in a fresh process")
            records.append(record("lora", name, "fp32", "peak_rss_mb", _peak_memory(name, spec), "MB", total[name],
                                  spec.shape))
    return records, notes


METRICS = [("train_tok_per_s", "LoRA train tok/s"), ("trainable_params", "trainable parameters"),
           ("peak_rss_mb", "peak memory MB")]


def format_lora(records: list[dict]) -> str:
    return markdown_table(records, METRICS)
