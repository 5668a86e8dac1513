"""Distributed helpers of the training loop: torchrun process groups and FSDP2 sharded copies."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

__all__ = ["world", "init_distributed", "shard_copy", "gather_into", "full_params", "average_grads"]


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def shard_copy(module: nn.Module, frozen: Sequence[str]) -> nn.Module:
    """A copy of ``module`` sharded with FSDP2 (``fully_shard``): every LM transformer block is its
    own unit, then the rest; parameters named in ``frozen`` (the vision tower, and whatever
    ``TrainConfig.freeze`` holds) stay whole on every rank.  A copy, so that ``module`` itself
    stays a plain module for saving and serving."""
    sharded = copy.deepcopy(module)
    mesh = init_device_mesh(next(module.parameters()).device.type, (dist.get_world_size(),))
    names: set[str] = set()
    for child in sharded.modules():
        names |= set(getattr(child, "_no_split_modules", None) or [])
    for child in list(sharded.modules()):
        if child is not sharded and type(child).__name__ in names:
            fully_shard(child, mesh=mesh)
    ignored = {p for n, p in sharded.named_parameters() if n in set(frozen)}
    fully_shard(sharded, mesh=mesh, ignored_params=ignored or None)
    return sharded


def gather_into(sharded: nn.Module, module: nn.Module) -> None:
    """Copy the full (all-gathered) weights of a sharded copy back into the plain ``module``."""
    state = {}
    for name, tensor in sharded.state_dict().items():
        state[name] = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    module.load_state_dict(state)


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model``'s parameters are complete.  :func:`train` always leaves a plain
    model, so this only keeps distributed callers reading the same under DDP and FSDP."""
    yield model


def average_grads(module: nn.Module) -> None:
    """Average the gradients of a module that is not wrapped in DDP (the auxiliary heads)."""
    size = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= size
