"""Distributed set-up, applied from outside the model: torchrun env:// init, DDP or FSDP2.

Launch multi-GPU or multi-node runs with torchrun, e.g.
    torchrun --nproc-per-node 8 -m sddit train --config configs/sd-dit-xl2.toml
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT --nproc-per-node 8 ...
The model is written for one device; this module wraps it. Nothing here is a launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model import LossInputs


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0, what: str = "run.device"
                   ) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> this rank's device ('auto': CUDA when available). The one
    place that decides; `what` names the setting in errors (ValueError for a bad value,
    RuntimeError for 'cuda' without a CUDA device)."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{what} = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if preference == "cpu":
        return torch.device("cpu")
    raise ValueError(f"{what} must be 'auto', 'cpu' or 'cuda', got {preference!r}")


def init_distributed(device_preference: str = "auto", what: str = "run.device") -> DistInfo:
    """Joins the process group that torchrun describes in the environment (env://), on
    this rank's device (resolve_device; `what` names the setting in its errors)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank, what)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    global _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a small float tensor (loss parts, flags)."""
    if not info.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_HOST_GROUP = None


def any_rank(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each flag OR-ed over ranks, through a CPU (gloo) group so that agreeing on host-side
    events (a signal, a time budget) never waits for the GPU."""
    if not info.distributed:
        return list(flags)
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    values = torch.tensor([float(f) for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return [v > 0 for v in values.tolist()]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


class LossModule(nn.Module):
    """Routes forward() to net.training_losses, so that DDP and FSDP see a forward call
    (DDP prepares its gradient reducer there)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor, inputs: LossInputs
                ) -> dict[str, torch.Tensor]:
        return self.net.training_losses(x, y, inputs)


def find_block_lists(net: nn.Module) -> list[nn.ModuleList]:
    """The model's repeated blocks: every ModuleList whose items all share one class
    (encoder, decoder, teacher encoder), outermost only. They are the units for activation
    checkpointing and FSDP sharding; nothing more is asked of the model."""
    found: dict[str, nn.ModuleList] = {}
    for name, module in net.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(item) for item in module}) != 1:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue  # inside a block that is already a unit
        found[name] = module
    return list(found.values())


def apply_activation_checkpointing(net: nn.Module) -> int:
    """Wraps each transformer block so that its activations are recomputed in backward.
    The wrapper keeps state-dict keys unchanged. Returns the number of blocks wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    count = 0
    for blocks in find_block_lists(net):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            count += 1
    if count == 0:
        raise ValueError("activation checkpointing: the model has no ModuleList of blocks")
    return count


def shard_fsdp2(root: nn.Module, info: DistInfo) -> None:
    """FSDP2 shard groups: each sub-layer of each block (its direct children with
    parameters), then the rest under `root`. FSDP2 gathers a group's parameters in its
    forward hook, so the groups are modules that are called (a block's attention, MLP and
    adaLN modulation each are), and `root` must be the module whose forward() runs (the
    LossModule)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for blocks in find_block_lists(root):
        for block in blocks:
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            for child in inner.children():
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh)
    fully_shard(root, mesh=mesh)


def wrap_for_training(net: nn.Module, info: DistInfo, strategy: str,
                      find_unused_parameters: bool = False) -> nn.Module:
    """Returns the module whose forward(x, y) gives the loss dict: DDP-wrapped, or FSDP2
    sharded in place (the net's parameters become DTensor shards), or plain."""
    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"distributed.strategy must be 'ddp' or 'fsdp2', got {strategy!r}")
    loss_module = LossModule(net)
    if not info.distributed:
        return loss_module
    if strategy == "fsdp2":
        shard_fsdp2(loss_module, info)
        return loss_module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(loss_module, device_ids=device_ids,
                                   find_unused_parameters=find_unused_parameters)


def is_sharded(net: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in net.parameters())


def full_model_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU (collective under FSDP2; every rank must call it)."""
    if not is_sharded(net):
        return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))


def load_full_model_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not is_sharded(net):
        net.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if not is_sharded(net):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(net, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    if not is_sharded(net):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(net, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
