"""Process groups and model wrapping: one process, DistributedDataParallel, or FSDP2 (`fully_shard`).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; we only pick the backend (nccl on CUDA,
gloo on CPU) and the device. Every collective comes from torch.distributed; nothing is home-made.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str = "auto", backend: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (or run as one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistContext(device=device)
    owns = False
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


class DDP(DistributedDataParallel):
    """DDP that also exposes the model's head and config, so objectives call `model.logits(hidden)` as usual.

    The head runs outside DDP's forward; its gradients are still all-reduced by DDP's per-parameter hooks.
    """

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module.logits(hidden)

    @property
    def config(self):
        return self.module.config


def wrap(model: nn.Module, ctx: DistContext, strategy: str, reshard_after_forward: bool = True) -> nn.Module:
    """DDP or FSDP2 around `model` (already on ctx.device); the model itself in one process."""
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in model.layers:  # one all-gather / reduce-scatter unit per block
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(
            model, mesh=mesh, reshard_after_forward=reshard_after_forward
        )  # embeddings, final norm, head
        register_fsdp_forward_method(model, "logits")  # the head is called outside forward
        return model
    raise ValueError(f"dist.strategy={strategy!r}: expected ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on micro-steps that are not the last of a step."""
    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) as its full value; other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
