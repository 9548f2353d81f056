"""Structured pruning: remove whole attention heads, feed-forward channels and layers, physically.

A pruned model is an ordinary model: its config lists each layer's head count (``attention.layer_heads``) and
feed-forward hidden size (``feedforward.layer_hidden_sizes``), its weight matrices are smaller, and it saves, loads,
trains and exports like any other. Nothing is masked at run time, so what is removed costs nothing.

Scores (higher = more important; the lowest go):

- ``magnitude``: the L2 norm of the weights that belong to the structure: a head's query, key and value rows of the
  fused projection and its columns of the output projection; a channel's row(s) of the first feed-forward layer (gate
  and up for gated ones) and its column of the second; a layer's Linear weights together.
- ``taylor``: first-order Taylor saliency (Molchanov et al., 2019): ``|sum over the structure's weights of w * dL/dw|``,
  the first-order estimate of how much the loss changes when the structure is zeroed, with the gradients of the run's
  own training loss accumulated over a few batches of its training data.

``--heads r`` and ``--ffn r`` remove ``round(r * n)`` of the ``n`` heads (channels) of every layer, layer by layer, so
every layer keeps its share; ``--layers N`` removes the N lowest-scoring layers first. A pruned model can then be
fine-tuned briefly with its run's recipe (``finetune_steps``).

Supported: encoders and decoders with multi-head attention and dense feed-forward layers. Refused with the reason:
grouped-query attention, ALiBi (one slope per head shared by every layer), the Gaussian-mixture mask,
mixture-of-experts feed-forward layers, encoder-decoders and shared layers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from formerkit.checkpoint import save
from formerkit.data import build_data
from formerkit.errors import ConfigError, InputError
from formerkit.models.transformer import build_model
from formerkit.nn.int8 import is_quantized
from formerkit.runs import load_run_model, model_dir
from formerkit.train.config import TrainConfig
from formerkit.train.objectives import make_objective
from formerkit.train.trainer import train_stage

__all__ = ["SCORES", "prune", "prune_run", "structure_scores"]

SCORES = ("magnitude", "taylor")


def _stack(model: nn.Module) -> tuple[str, nn.Module]:
    name = "encoder" if model.config.arch == "encoder" else "decoder"
    return name, getattr(model, name)


def check_prunable(config, *, heads: bool, ffn: bool, layers: bool) -> None:
    """Raises InputError naming what this model has that pruning cannot reduce."""
    attention, reasons = config.attention, []
    if config.arch == "encoder_decoder":
        reasons.append("an encoder-decoder (prune encoders and decoders)")
    if config.num_unique_layers is not None:
        reasons.append("shared layers (num_unique_layers): one block serves several depths")
    if heads:
        if attention.kv_heads != attention.num_heads:
            reasons.append("grouped-query attention (num_kv_heads < num_heads): heads share keys and values")
        if config.position.kind == "alibi":
            reasons.append("alibi positions (one slope per head, shared by every layer)")
        if config.position.kind == "relative":
            reasons.append("relative positions (one bias per head, shared by every layer)")
        if attention.gaussian_mixture:
            reasons.append("attention.gaussian_mixture (parameters per head)")
    if (ffn or layers) and config.feedforward.mixture:
        reasons.append("mixture-of-experts feed-forward layers")
    if reasons:
        raise InputError("prune: this model cannot be pruned as asked: " + "; ".join(reasons))


def _head_rows(chosen: list[int], heads: int, dim: int) -> list[int]:
    """The rows of a fused q/k/v projection of ``heads`` heads that belong to the ``chosen`` heads, in the fused
    layout: their queries, then their keys, then their values."""
    return [part * heads * dim + h * dim + offset for part in range(3) for h in chosen for offset in range(dim)]


def _head_columns(chosen: list[int], dim: int) -> list[int]:
    """The columns of the output projection that read the ``chosen`` heads."""
    return [h * dim + offset for h in chosen for offset in range(dim)]


def _layer_parts(block: nn.Module, config) -> dict[str, Any]:
    attention, feedforward = block.attention, block.feedforward
    return {"heads": attention.num_heads, "dim": attention.head_dim, "qkv": attention.qkv, "out": attention.out,
            "fc_in": feedforward.fc_in, "fc_out": feedforward.fc_out, "gated": config.feedforward.gated,
            "hidden": feedforward.fc_out.in_features}


def _structure_values(block: nn.Module, config, value) -> tuple[Tensor, Tensor, Tensor]:
    """Per head, per channel and for the whole layer: ``value(weight) -> Tensor of the same shape`` summed over the
    structure's weights (biases of the rows included)."""
    parts = _layer_parts(block, config)
    heads, dim, hidden = parts["heads"], parts["dim"], parts["hidden"]
    qkv = value(parts["qkv"].weight).sum(1)
    if parts["qkv"].bias is not None:
        qkv = qkv + value(parts["qkv"].bias)
    out = value(parts["out"].weight).sum(0)
    head = torch.stack([qkv[_head_rows([h], heads, dim)].sum() + out[_head_columns([h], dim)].sum()
                        for h in range(heads)])
    fc_in = value(parts["fc_in"].weight).sum(1)
    if parts["fc_in"].bias is not None:
        fc_in = fc_in + value(parts["fc_in"].bias)
    if parts["gated"]:
        fc_in = fc_in[:hidden] + fc_in[hidden:]
    channel = fc_in + value(parts["fc_out"].weight).sum(0)
    layer = sum(value(module.weight).sum() for module in block.modules() if isinstance(module, nn.Linear))
    return head, channel, layer


def structure_scores(model: nn.Module, method: str = "magnitude", batches=None, objective=None
                     ) -> dict[str, list[Tensor] | Tensor]:
    """``{"heads": [per layer: Tensor[heads]], "channels": [per layer: Tensor[hidden]], "layers": Tensor[layers]}``.

    ``taylor`` needs ``batches`` (an iterable of training batches) and the run's ``objective``; its gradients are
    accumulated over them, in eval mode (``model`` is left with no gradients, in the mode it was in)."""
    if method not in SCORES:
        raise InputError(f"prune: score must be one of {', '.join(SCORES)}, got {method!r}")
    _, stack = _stack(model)
    config = model.config
    if method == "magnitude":
        squares = [_structure_values(block, config, lambda w: w.detach().float() ** 2) for block in stack.blocks]
        return {"heads": [h.sqrt() for h, _, _ in squares], "channels": [c.sqrt() for _, c, _ in squares],
                "layers": torch.stack([layer.sqrt() for _, _, layer in squares])}
    if batches is None or objective is None:
        raise InputError("prune: taylor scores need training batches and the run's objective")
    # Eval mode: no dropout or stochastic depth, so the scores are a function of the weights and the batches.
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    count = 0
    for batch in batches:
        objective.loss(model, batch, generator).backward()
        count += 1
    if count == 0:
        raise InputError("prune: taylor scores need at least one training batch")
    with torch.no_grad():
        values = [_structure_values(block, config, lambda w: (w * w.grad).float() if w.grad is not None
                                    else torch.zeros_like(w, dtype=torch.float32)) for block in stack.blocks]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {"heads": [h.abs() for h, _, _ in values], "channels": [c.abs() for _, c, _ in values],
            "layers": torch.stack([layer.abs() for _, _, layer in values])}


def _check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"prune: --{name} is the fraction of each layer's {name} to remove, in [0, 1), got "
                         f"{value!r}")


def _remap(indices, kept_layers: list[int]):
    """A layer-index list of the config after removing layers (None stays None)."""
    if indices is None:
        return None
    return tuple(kept_layers.index(i) for i in indices if i in kept_layers)


def prune(model: nn.Module, *, heads: float = 0.0, ffn: float = 0.0, layers: int = 0,
          scores: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` (left unchanged) and a record of what was removed. ``scores`` come from
    ``structure_scores`` (magnitude scores by default)."""
    if is_quantized(model):
        raise InputError("prune: the model is quantized; prune the float model, then quantize")
    _check_ratio("heads", heads)
    _check_ratio("ffn", ffn)
    config = model.config
    depth = config.num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers < depth:
        raise InputError(f"prune: --layers is how many whole layers to remove, in [0, {depth}) for this "
                         f"{depth}-layer model, got {layers!r}")
    check_prunable(config, heads=heads > 0, ffn=ffn > 0, layers=layers > 0)
    scores = scores if scores is not None else structure_scores(model, "magnitude")
    stack_name, stack = _stack(model)
    layer_order = torch.argsort(scores["layers"], stable=True).tolist()
    kept_layers = sorted(set(range(depth)) - set(layer_order[:layers]))

    def kept(layer: int, ratio: float, kind: str, flag: str, total: int) -> list[int]:
        """The indices of ``kind`` that layer ``layer`` keeps: all but the ``round(ratio * total)`` lowest-scored."""
        count = round(ratio * total)
        if count >= total:
            raise InputError(f"prune: --{flag} {ratio} would remove all {total} {kind} of layer {layer}; lower "
                             f"--{flag}" + (", or remove whole layers with --layers" if flag == "heads" else ""))
        return sorted(torch.argsort(scores[kind][layer], stable=True).tolist()[count:])

    kept_heads, kept_channels = {}, {}
    for layer in kept_layers:
        parts = _layer_parts(stack.blocks[layer], config)
        kept_heads[layer] = kept(layer, heads, "heads", "heads", parts["heads"])
        kept_channels[layer] = kept(layer, ffn, "channels", "ffn", parts["hidden"])

    attention, feedforward = config.attention, config.feedforward
    per_layer_heads = tuple(len(kept_heads[layer]) for layer in kept_layers)
    per_layer_hidden = tuple(len(kept_channels[layer]) for layer in kept_layers)
    changes: dict[str, Any] = {"num_layers": len(kept_layers)}
    changes["attention.layer_heads"] = (None if all(h == attention.num_heads for h in per_layer_heads)
                                        and attention.layer_heads is None else per_layer_heads)
    changes["feedforward.layer_hidden_sizes"] = (None if all(n == config.feedforward_size for n in per_layer_hidden)
                                                 and feedforward.layer_hidden_sizes is None else per_layer_hidden)
    for name, values in (("attention.sliding_window_layers", attention.sliding_window_layers),
                         ("attention.kind_layers", attention.kind_layers),
                         ("feedforward.moe_layers", feedforward.moe_layers)):
        if values is not None:
            changes[name] = _remap(values, kept_layers)
    try:
        pruned_config = config.replace(**changes)
    except ConfigError as error:
        raise InputError(f"prune: the pruned model's config is not valid ({error})") from error

    state = model.state_dict()
    new_state = {}
    prefix = f"{stack_name}.blocks."
    for key, tensor in state.items():
        if not key.startswith(prefix):
            new_state[key] = tensor
            continue
        layer_text, rest = key[len(prefix):].split(".", 1)
        layer = int(layer_text)
        if layer not in kept_layers:
            continue
        parts = _layer_parts(stack.blocks[layer], config)
        dim, heads_before, hidden = parts["dim"], parts["heads"], parts["hidden"]
        keep_h, keep_c = kept_heads[layer], kept_channels[layer]
        if rest.startswith("attention.qkv."):
            tensor = tensor[_head_rows(keep_h, heads_before, dim)]
        elif rest == "attention.out.weight":
            tensor = tensor[:, _head_columns(keep_h, dim)]
        elif rest.startswith("feedforward.fc_in."):
            index = keep_c + [hidden + c for c in keep_c] if parts["gated"] else keep_c
            tensor = tensor[index]
        elif rest == "feedforward.fc_out.weight":
            tensor = tensor[:, keep_c]
        new_state[f"{prefix}{kept_layers.index(layer)}.{rest}"] = tensor.clone()
    pruned = build_model(pruned_config)
    pruned.load_state_dict(new_state, strict=True)
    pruned.train(model.training)
    removed_heads = {layer: sorted(set(range(_layer_parts(stack.blocks[layer], config)["heads"])) -
                                   set(kept_heads[layer])) for layer in kept_layers}
    record = {"heads": heads, "ffn": ffn, "layers": layers,
              "removed_layers": sorted(set(range(depth)) - set(kept_layers)),
              "removed_heads": {str(k): v for k, v in removed_heads.items() if v},
              "parameters_before": sum(p.numel() for p in model.parameters()),
              "parameters_after": sum(p.numel() for p in pruned.parameters())}
    return pruned, record


def prune_run(target: str | Path, out: str | Path, *, heads: float = 0.0, ffn: float = 0.0, layers: int = 0,
              score: str = "magnitude", score_batches: int = 8, finetune_steps: int = 0, console=None) -> Path:
    """Prunes the model of a run (or a model directory a run saved) into ``out``: a model directory, or with
    ``finetune_steps`` a run directory whose model is the pruned one fine-tuned with the run's recipe (the pruned
    model before fine-tuning is kept in ``out/pruned``). Returns ``out``."""
    _check_ratio("heads", heads)
    _check_ratio("ffn", ffn)
    if score not in SCORES:
        raise InputError(f"prune: --score must be one of {', '.join(SCORES)}, got {score!r}")
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise InputError(f"prune: --finetune-steps must be an integer >= 0, got {finetune_steps!r}")
    directory = model_dir(target)
    model, recipe, extra = load_run_model(directory)
    if is_quantized(model):
        raise InputError(f"prune: {directory} is quantized; prune the float run, then quantize")
    check_prunable(model.config, heads=heads > 0, ffn=ffn > 0, layers=layers > 0)
    out = Path(out)
    if (out / "recipe.yaml").exists() or (out / "config.json").exists():
        raise InputError(f"prune: {out} already holds a run or a model; choose another --out")
    scores = None
    if score == "taylor":
        bundle = build_data(recipe.data)
        objective = make_objective(recipe.objective, bundle)
        size = recipe.schedule.batch_size
        batches = [bundle.train.take(bundle.train.sample_indices(size, recipe.run.seed, step))
                   for step in range(score_batches)]
        scores = structure_scores(model, "taylor", batches, objective)
    pruned, record = prune(model, heads=heads, ffn=ffn, layers=layers, scores=scores)
    record["score"] = score
    data = recipe.to_dict()
    data["model"] = {"config": pruned.config.to_dict()}
    pruned_recipe = TrainConfig.from_dict(data)
    tokenizer = directory / "tokenizer.json"
    target_dir = out / "pruned" if finetune_steps else out
    save(pruned.eval(), target_dir, extra={**extra, "recipe": pruned_recipe.to_dict(), "pruning": record})
    if tokenizer.exists():
        shutil.copyfile(tokenizer, target_dir / "tokenizer.json")
    if not finetune_steps:
        return out
    schedule = recipe.schedule
    every = max(1, min(recipe.eval.every, finetune_steps))
    tuned = pruned_recipe.with_overrides({
        "name": f"{recipe.name}-pruned", "schedule.steps": finetune_steps,
        "schedule.warmup_steps": min(schedule.warmup, finetune_steps // 10),
        "eval.every": every, "run.checkpoint_every": max(1, min(recipe.run.checkpoint_every, finetune_steps))})
    train_stage(tuned, out, console=console, initialize_from=target_dir, initialize_head=True)
    if tokenizer.exists():
        shutil.copyfile(tokenizer, out / "model" / "tokenizer.json")
    return out
