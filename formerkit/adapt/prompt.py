"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

``num_virtual_tokens`` learned embeddings go before every input's token embeddings; the rest of the model is frozen.

How the virtual tokens meet the rest of the model:
- positions: they are the first tokens of the sequence: positions 0..n-1, the real tokens n, n+1, ... (absolute
  tables and rotary tables alike), so a model with ``max_seq_len`` L reads at most L - n real tokens;
- masks: every real token attends to them (they come first in the causal order; padding never covers them, and
  left padding sits between them and a row's first real token, where positions count real tokens only, as usual);
  in a decoder they attend to each other causally and never to the real tokens; a sliding window leaves them behind
  as it would any other tokens;
- outputs: the logits, ``last_hidden_state`` and pooled outputs cover the real tokens only; ``hidden_states`` and
  ``attentions`` (when asked for) keep the virtual tokens' rows and columns first;
- caches and generation: a cache's first pass holds them (a cache needs n more slots: ``generate`` adds them), later
  passes continue after them; cached decoding computes what a full recompute does.
Refused: models whose stem is not a tokens stem, encoder_decoder models, and, in a call, a custom ``mask``,
``position_ids`` or ``merge_tokens`` (each names positions or tokens the virtual tokens shift).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from formerkit.adapt.blocks import float_like, model_stacks
from formerkit.adapt.methods import AdapterModule, register_method
from formerkit.adapt.slots import PromptSlot, check_name, slot
from formerkit.errors import InputError

__all__ = ["InputPrompt", "apply_prompt"]


class InputPrompt(AdapterModule):
    """The learned virtual token embeddings: ``forward()`` returns them [num_virtual_tokens, width]."""

    def __init__(self, num_virtual_tokens: int, width: int, *, init: Tensor | None = None, init_std: float = 0.02,
                 device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        if init is None:
            init = torch.randn(num_virtual_tokens, width, device=device, dtype=dtype) * init_std
        self.embedding = nn.Parameter(init.detach().clone().to(device=device, dtype=dtype))

    def forward(self) -> Tensor:
        return self.embedding


@register_method("prompt")
def apply_prompt(model, *, targets=None, layers=None, name: str = "default", num_virtual_tokens: int = 20,
                 init: str = "vocabulary", seed: int = 0) -> None:
    """Puts ``num_virtual_tokens`` learned embeddings before every input (``InputPrompt``, in the model's
    ``input_prompt``, a ``PromptSlot``: several active prompts go one after another). ``init``: "vocabulary" starts
    them as the embeddings of tokens drawn from the vocabulary (with ``seed``; Lester et al. found that better than
    random), "random" as N(0, init_std^2). ``targets`` and ``layers``
    are not read (the prompt is one, before the first layer)."""
    check_name(name, "prompt")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise InputError(f"add_adapters(method='prompt'): num_virtual_tokens: expected an integer >= 1, got "
                         f"{num_virtual_tokens!r}")
    if init not in ("vocabulary", "random"):
        raise InputError(f"add_adapters(method='prompt'): init: expected 'vocabulary' or 'random', got {init!r}")
    if layers is not None:
        raise InputError("add_adapters(method='prompt'): takes no layers (the prompt goes before the first layer; "
                         "method='prefix' has one per layer)")
    model_stacks(model)
    config = model.config
    if config.stem.kind != "tokens":
        raise InputError(f"add_adapters(method='prompt'): needs a tokens stem (this model's stem is "
                         f"{config.stem.kind!r})")
    if config.arch == "encoder_decoder":
        raise InputError("add_adapters(method='prompt'): encoder_decoder models are not supported (use "
                         "method='prefix')")
    if model.input_prompt is not None and name in model.input_prompt:
        raise InputError(f"add_adapters(method='prompt'): the model already has a prompt named {name!r}")
    if num_virtual_tokens >= config.num_positions and config.position.kind in ("learned", "sinusoidal", "rope"):
        raise InputError(f"add_adapters(method='prompt'): num_virtual_tokens {num_virtual_tokens} leaves no room in "
                         f"max_seq_len {config.num_positions}")
    device, dtype = float_like(model.stem)
    start = None
    if init == "vocabulary":  # the stem's output for these tokens: on the scale the layers expect (Gemma scales it)
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.stem.tokens.num_embeddings, (1, num_virtual_tokens), generator=generator)
        with torch.no_grad():
            start = model.stem(ids.to(device))[0]
    prompt = InputPrompt(num_virtual_tokens, config.width, init=start, init_std=config.init_std, device=device,
                         dtype=dtype)
    prompt.adapter_name = name
    slot(model, "input_prompt", PromptSlot)[name] = prompt
