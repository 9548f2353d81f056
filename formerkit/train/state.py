"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``checkpoints/step-NNNNNNNN/`` holding safetensors files (model, optimizer tensors, EMA,
RNG states) and ``state.json`` (step, scheduler, optimizer hyper-parameters, best metric, SHA-256 of every file).
It is written into a temporary directory, each file fsynced, then renamed into place: a kill at any moment leaves
either the complete new checkpoint or none, and the previous one untouched. Loading verifies every checksum and
falls back to the newest checkpoint that verifies.

The files hold whole (unsharded) tensors whatever the run's layout: a model sharded by FSDP is gathered to rank 0
for saving and split again when restored, so a checkpoint written by one layout (one process, DDP, FSDP) resumes in
any other with the same model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from formerkit.checkpoint import sha256_file, with_default_permissions
from formerkit.errors import CheckpointError

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        plain[str(index)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous()
            else:
                plain[str(index)][name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in rest["plain"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _is_sharded(model: torch.nn.Module) -> bool:
    """True if FSDP sharded ``model``'s parameters (they are DTensors): its state must be gathered and split."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict (tied tensors once). Sharded, it is gathered: every rank must call this; rank 0
    gets the tensors (on the CPU), the other ranks an empty dict."""
    if not _is_sharded(model):
        return _unique_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    seen, names = set(), set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # tied parameters are the same object
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.add(name)
    return {name: tensor.detach().contiguous() for name, tensor in full.items() if name in names}


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()``; for a sharded model the gathered one (collective, rank 0 gets it), converted from
    torch.distributed.checkpoint's parameter names back to the optimizer's own parameter numbers."""
    if not _is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not full:
        return {}
    number = {name: index for index, name in enumerate(n for group in full["param_groups"] for n in group["params"])}
    return {"state": {number[name]: values for name, values in full["state"].items()},
            "param_groups": [{**group, "params": [number[n] for n in group["params"]]}
                             for group in full["param_groups"]]}


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not _is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[index]: values for index, values in state["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())


def _load_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """Like ``model.load_state_dict(tensors, strict=False)``; a sharded model takes its own shards of the tensors."""
    if not _is_sharded(model):
        return model.load_state_dict(tensors, strict=False)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    expected = model.state_dict().keys()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if not unexpected:  # (a mismatch is reported by the caller; a tied name keeps its twin's freshly loaded value)
        set_model_state_dict(model, dict(tensors), options=_full_options(strict=False))
    return missing, unexpected


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _rng_states() -> dict[str, torch.Tensor]:
    """The global RNG states (dropout, drop path): this process's, and in a distributed run every process's
    (collective), rank r's under "rank{r}." (each rank draws its own stream, see Distributed.seed_rank)."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{index}"] = value
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, rng)
        for rank, states in enumerate(everyone[1:], start=1):
            rng.update({f"rank{rank}.{key}": value for key, value in states.items()})
    return rng


def _unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with shared (tied) tensors kept once, under their first name, as safetensors requires."""
    seen, out = set(), {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_checkpoint(directory: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, ema: torch.nn.Module | None, extra: dict[str, Any], keep: int = 2,
                    write: bool = True) -> Path | None:
    """Writes checkpoint ``step`` under ``directory`` atomically and prunes older ones (keeping ``keep``).

    In a distributed run every process calls this (an FSDP-sharded state is gathered collectively) and only the one
    with ``write`` (rank 0) writes; the others return None.
    """
    model_state, optimizer_state = _model_state(model), _optimizer_state(model, optimizer)
    rng = _rng_states()
    if not write:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    optimizer_tensors, optimizer_rest = _flatten_optimizer(optimizer_state)
    files = {"model.safetensors": model_state, "optimizer.safetensors": optimizer_tensors,
             "rng.safetensors": rng}
    if ema is not None:
        files["ema.safetensors"] = _unique_state(ema)
    checksums = {}
    for name, tensors in files.items():
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / name))
        with_default_permissions(tmp / name)
        _fsync(tmp / name)
        checksums[name] = sha256_file(tmp / name)
    state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": optimizer_rest, "files": checksums,
             **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    _fsync(tmp / "state.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(directory)
    for old in sorted(p for p in directory.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _verify(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{checkpoint}: state.json is missing or corrupted ({error})") from error
    for name, digest in state.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CheckpointError(f"{path}: missing or does not match its recorded checksum (corrupted)")
    return state


def latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under ``directory`` whose files all verify, or None."""
    if not directory.is_dir():
        return None
    for checkpoint in sorted((p for p in directory.glob("step-*") if p.is_dir()), reverse=True):
        try:
            return checkpoint, _verify(checkpoint)
        except CheckpointError:
            continue
    return None


def load_checkpoint(checkpoint: Path, state: dict[str, Any], *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, ema: torch.nn.Module | None) -> None:
    """Restores model, optimizer, scheduler, EMA and RNG states from a verified checkpoint.

    In a distributed run every process calls this after wrapping the model and building the optimizer (an FSDP
    -sharded model and its optimizer take their shards of the whole tensors); all restore the same RNG state.
    """
    device = next(model.parameters()).device
    try:
        missing, unexpected = _load_model(model, load_file(str(checkpoint / "model.safetensors"),
                                                           device=str(device)))
        if unexpected or any(not _tied(model, name) for name in missing):
            raise CheckpointError(f"{checkpoint}: the checkpoint's model does not match this run's model "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        tensors = load_file(str(checkpoint / "optimizer.safetensors"), device=str(device))
        _load_optimizer(model, optimizer, _unflatten_optimizer(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(load_file(str(checkpoint / "ema.safetensors"), device=str(device)), strict=False)
        rng = load_file(str(checkpoint / "rng.safetensors"))
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{checkpoint}: cannot restore the run ({error})") from error
    rank = _rank()
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if rank and k.startswith(f"rank{rank}.")}
    if not mine:  # rank 0, or a run resumed with more processes than it had
        mine = {k: v for k, v in rng.items() if not k.startswith("rank")}
    torch.set_rng_state(mine["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [mine[k] for k in sorted(mine) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _tied(model: torch.nn.Module, name: str) -> bool:
    """True if parameter ``name`` shares its storage with another (saved once, restored through the other)."""
    tensors = dict(model.state_dict(keep_vars=True))
    target = tensors.get(name)
    if target is None:
        return False
    return any(other is target for key, other in tensors.items() if key != name)
