"""A tour of formerkit on data already on this machine: the Python standard library's own source code.

Builds the byte-level `char_gpt` preset, trains it for a short while on stdlib source files, saves and reloads it,
and checks the reloaded model gives the same outputs. Runs in about a minute on a laptop CPU.
"""

from __future__ import annotations

import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import formerkit


def stdlib_bytes(limit: int = 2_000_000) -> bytes:
    """Concatenated source of the standard library's top-level modules, sorted by name (no tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"\n".join(chunks)


def main() -> None:
    torch.manual_seed(0)
    data = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8).long()
    split = int(0.95 * len(data))
    train, valid = data[:split], data[split:]
    config = formerkit.model_config("char_gpt", num_layers=2, max_seq_len=128, dropout=0.0)
    model = formerkit.build_model(config)
    print(f"char_gpt (2 layers): {model.num_parameters():,} parameters; {len(train):,} bytes of stdlib source")

    def batch(source: torch.Tensor, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(source) - config.max_seq_len - 1, (size,))
        rows = torch.stack([source[s: s + config.max_seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def loss_on(source: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            generator_state = torch.get_rng_state()
            torch.manual_seed(1)
            losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in
                      (batch(source) for _ in range(8))]
            torch.set_rng_state(generator_state)
        model.train()
        return sum(losses) / len(losses)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    start = time.time()
    print(f"step   0  validation loss {loss_on(valid):.3f} (uniform guessing: {torch.log(torch.tensor(256.0)):.3f})")
    for step in range(1, 201):
        x, y = batch(train)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:3d}  train loss {loss.item():.3f}  validation loss {loss_on(valid):.3f}  "
                  f"({time.time() - start:.0f}s)")

    with tempfile.TemporaryDirectory() as directory:
        formerkit.save(model, directory)
        again = formerkit.load(directory)
        x, _ = batch(valid, 2)
        model.eval()
        same = torch.equal(model(x), again(x))
        print(f"saved to config.json + model.safetensors and reloaded: identical outputs = {same}")

    prompt = b"def "
    ids = torch.tensor([list(prompt)])
    torch.manual_seed(2)
    with torch.no_grad():
        for _ in range(80):
            logits = model(ids[:, -config.max_seq_len:])[0, -1]
            next_id = torch.multinomial((logits / 0.7).softmax(-1), 1)
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    print("sample (temperature 0.7):", bytes(ids[0].tolist()).decode("utf-8", errors="replace").replace("\n", "\\n"))


if __name__ == "__main__":
    main()
