"""Running on several processes: `torchrun --nproc-per-node N` (and multi-node) for data parallelism with the
student and teacher sharded by FSDP2 (`fully_shard`), one Mamba/attention/MLP/MoE block per unit (an MoE
block's fp32 router one more).

A single process (no WORLD_SIZE in the environment) uses none of this and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from compressor.config import MOE
from compressor.errors import CompressorError
from compressor.model import HybridLM


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N', checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CompressorError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError(f"device {name!r} asked for, but no CUDA device is available: use --device cpu")
    return device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: torch.device) -> World:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return World(rank=rank, size=size, device=device)


def shard(model: HybridLM, world: World, *, frozen: bool = False) -> HybridLM:
    """Shard every block and then the rest (embeddings, norm_f, lm_head) across the world.

    A frozen model (the teacher) keeps its root parameters gathered for the whole run: the distillation
    loss reads the teacher's head weight outside the teacher's own forward.
    """
    if not world.distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    for block in model.backbone.layers:
        if block.kind == MOE:  # the router stays fp32: a unit of its own (FSDP wants one dtype per unit)
            fully_shard(block.mixer.gate)
        fully_shard(block)
    fully_shard(model)
    if frozen:
        model.unshard()
    return model


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few numbers over all processes."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
