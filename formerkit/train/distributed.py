"""Running one training script as several processes (torchrun): process group, model wrapping, collective helpers.

Without torchrun (no WORLD_SIZE in the environment, or 1) everything here is a no-op, so the trainer reads the same
either way. gloo is the backend on CPU, nccl on CUDA.
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from formerkit.models.transformer import build_model
from formerkit.nn.block import TransformerBlock

__all__ = ["Distributed", "setup"]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """True when FSDP shards the parameters (several processes and run.strategy fsdp)."""
        return self.active and self.strategy == "fsdp"

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: the model itself, or its DDP/FSDP form when several processes run.

        FSDP replaces the parameters by sharded DTensors in place (the returned module is ``model``): build the
        optimizer, and restore checkpoints, after wrapping.
        """
        if not self.active:
            return model
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for block in _blocks(model):
                fully_shard(block)
            fully_shard(model)
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Some objectives leave parameters out of the loss (MAE pretraining does not use the encoder's head).
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def no_sync(self, model: nn.Module, sync: bool):
        """Skips the gradient all-reduce (DDP) or reduce-scatter (FSDP) on micro-batches before the last of an
        accumulation: the gradients accumulate locally and the last micro-batch reduces their sum."""
        if self.active and not sync and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        if self.sharded:
            model.set_requires_gradient_sync(sync)
        return nullcontext()

    def seed_rank(self, seed: int) -> None:
        """Gives each process but rank 0 its own global RNG stream (dropout, drop path). Call it once the model is
        built, identically on every rank; otherwise every process would draw the same masks for its different rows.
        Rank 0, and a single process, keep the stream they have."""
        if self.rank:
            value = seed & 0xFFFFFFFF
            for key in (9, self.rank):  # the FNV-style mix of formerkit.data.base.step_generator
                value = ((value ^ key) * 0x100000001B3) & 0x7FFFFFFFFFFFFFFF
            torch.manual_seed(value)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        value = value.detach().clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value / self.world_size

    def any_flag(self, flag: bool) -> bool:
        """True on every process if any process raised the flag (a stop signal reaches them at different steps)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def full_model(self, module: nn.Module, root: nn.Module) -> nn.Module:
        """``module`` (``root`` or one of its submodules) with whole weights, e.g. to save it.

        Unsharded (one process, DDP) that is ``module`` itself. Under FSDP the weights are gathered from every
        process (a collective: every rank must call this); rank 0 gets a plain copy of ``module`` holding them,
        the other ranks ``module`` unchanged.
        """
        if not self.sharded:
            return module
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return module
        prefix = "" if module is root else next(n for n, m in root.named_modules() if m is module) + "."
        plain = _with_same_adapters(build_model(module.config), module)
        plain.load_state_dict({name[len(prefix):]: tensor for name, tensor in full.items()
                               if name.startswith(prefix)})
        return plain.to(next(module.parameters()).device)

    def teardown(self) -> None:
        """Ends a stage. The process group setup() created stays up until the program exits: the next stage of a
        recipe (``then``) joins it again, and creating a new group after FSDP used one hangs (torch 2.13)."""
        return None


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, TransformerBlock)]


def _destroy_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def setup(strategy: str = "ddp") -> Distributed:
    """Joins the process group torchrun describes in the environment (if any).

    On CPU, several processes each with PyTorch's default thread count (one per core) oversubscribe the machine:
    unless OMP_NUM_THREADS says otherwise (torchrun sets it to 1 when it is unset), each process gets its share of
    the cores. run.threads, applied after this, overrides either.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Distributed(device=device, strategy=strategy)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, _cpu_count() // local_world_size))
    owns = not torch_dist.is_initialized()
    if owns:
        torch_dist.init_process_group(backend=backend)
        atexit.register(_destroy_group)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device, strategy=strategy,
                       owns_group=owns)


def _with_same_adapters(plain: nn.Module, module: nn.Module) -> nn.Module:
    """``plain`` given the adapters ``module`` carries (formerkit.add_adapters, the same calls and active ones), so
    the gathered state of an adapted model loads into it."""
    from formerkit.adapt.api import active_adapters, adapter_records, add_adapters, set_adapter

    records = adapter_records(module)
    for name, record in records.items():
        add_adapters(plain, method=record["method"], targets=record["targets"], layers=record["layers"], name=name,
                     **record["options"])
    if records:
        set_adapter(plain, active_adapters(module))
    return plain
