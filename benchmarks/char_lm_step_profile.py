"""Where a char-lm training step's milliseconds go, fp32 against bf16 autocast (issue 22, "Quality sooner").

Builds the char-lm recipe's model (4 layers, width 192, RoPE, context 256) and optimizer as ``formerkit train``
does, takes two warm-up steps and then profiles ``--steps`` steps (forward, cross-entropy, backward, AdamW) on one
random batch of the recipe's size in each precision; prints the median step time of each and torch.profiler's table
of the operators with the most self time.

    python benchmarks/char_lm_step_profile.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from formerkit.models.transformer import build_model
from formerkit.train.config import load_recipe
from formerkit.train.trainer import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4, help="profiled steps per precision")
    parser.add_argument("--rows", type=int, default=12, help="operators shown per table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_recipe("char-lm")
    seq_len, batch = config.data.seq_len, config.schedule.batch_size
    model = build_model(config.model.resolve({"vocab_size": 256, "max_seq_len": seq_len}))
    optimizer = build_optimizer(model, config.optim)
    tokens = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = model(tokens[:, :-1])
            logits = getattr(output, "logits", output)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for bf16 in (False, True):
        for _ in range(2):
            step(bf16)
        times = []
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(args.steps):
                start = time.perf_counter()
                step(bf16)
                times.append(time.perf_counter() - start)
        name = "bf16 autocast" if bf16 else "fp32"
        print(f"\n{name}: {1000 * statistics.median(times):.0f} ms per step (median of {args.steps}, profiled), "
              f"batch {batch} x {seq_len}, {torch.get_num_threads()} threads")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                            max_name_column_width=44))


if __name__ == "__main__":
    main()
