"""Synthetic sequence-to-sequence tasks: copy, reverse and sort sequences of symbols.

Token ids: 0 padding, 1 begin-of-sequence, 2 end-of-sequence, then the symbols 3, 4, ... A target is the task applied
to the source followed by end-of-sequence; the decoder reads begin-of-sequence followed by the target shifted right.
"""

from __future__ import annotations

import torch

from formerkit.data.base import ArraySplit, DataBundle, step_generator

__all__ = ["BOS", "EOS", "PAD", "synthetic_bundle", "synthetic_task"]

PAD, BOS, EOS = 0, 1, 2
SPECIAL = 3


def synthetic_task(task: str, count: int, num_symbols: int, min_len: int, max_len: int,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator)
    symbols = torch.randint(SPECIAL, SPECIAL + num_symbols, (count, max_len), generator=generator)
    positions = torch.arange(max_len)
    source = torch.where(positions < lengths.unsqueeze(1), symbols, PAD)
    if task == "copy":
        result = source.clone()
    elif task == "reverse":
        # Reverse the first `length` symbols of each row: index length-1-i for i < length.
        index = (lengths.unsqueeze(1) - 1 - positions).clamp(min=0)
        result = torch.where(positions < lengths.unsqueeze(1), source.gather(1, index), PAD)
    else:
        padded = torch.where(source == PAD, SPECIAL + num_symbols, source)
        result = torch.where(positions < lengths.unsqueeze(1), padded.sort(dim=1).values, PAD)
    target = torch.full((count, max_len + 1), PAD)
    target[:, :max_len] = result
    target[torch.arange(count), lengths] = EOS
    decoder_input = torch.full_like(target, PAD)
    decoder_input[:, 0] = BOS
    decoder_input[:, 1:] = target[:, :-1]
    source_full = torch.full((count, max_len + 1), PAD)
    source_full[:, :max_len] = source
    return {"source": source_full, "decoder_input": decoder_input, "target": target}


def synthetic_bundle(config, seed: int) -> DataBundle:
    max_len = config.seq_len
    make = lambda count, purpose: ArraySplit(synthetic_task(  # noqa: E731
        config.task, count, config.num_symbols, config.min_len, max_len, step_generator(seed, 3, purpose)))
    held_out = max(256, config.num_examples // 10)
    return DataBundle(
        train=make(config.num_examples, 0), valid=make(held_out, 1), test=make(held_out, 2),
        model_fields={"vocab_size": SPECIAL + config.num_symbols, "max_seq_len": max_len + 1},
        preprocessing={"task": config.task, "pad_id": PAD, "bos_id": BOS, "eos_id": EOS, "first_symbol_id": SPECIAL,
                       "num_symbols": config.num_symbols, "max_len": max_len},
        unit="examples",
        description=f"synthetic {config.task}: {config.num_examples} training sequences of {config.min_len} to "
                    f"{max_len} symbols over {config.num_symbols} symbols",
    )
