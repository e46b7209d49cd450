"""Running on several processes: `torchrun --nproc-per-node N` (and multi-node) with every model sharded by
FSDP2 (`fully_shard`), one Mamba/attention/MLP/MoE block per unit (an MoE block's fp32 router one more), so
each process holds about 1/N of the blocks' weights. Two layouts (`shard`):
- trained (the student): the rest (embeddings, norm_f, lm_head) is the root unit, sharded too;
- frozen (importance, scoring, evaluation, a teacher): the rest stays whole on every process. Those passes
  read the head weight and call blocks outside the model's forward (drop-one scores, a teacher's logits),
  and gathering the root would briefly take twice its size (FSDP's all-gather buffer and the parameters);
  each block, a unit of its own, is gathered for its forward and resharded after it.

Models are sharded as they are built: `compressor.checkpoint.load_model(..., world=world)` and
`compressor.prune.prune(..., world=world)` shard the empty (meta) model first and then place each tensor's
rows of this process (`local_rows`), so no process ever holds a whole model. Passes over data split the
batches (`share`) and sum their statistics over the processes; a sharded forward is a collective (each
block is all-gathered as it runs), so every process runs the same number of them, padding its share with
`None` (`idle_pass`, whose results are dropped). Code that reads a block's weights directly (pruning)
gathers it for the moment (`gathered`).

A single process (no WORLD_SIZE in the environment) uses none of this and needs no process group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from compressor.config import MOE
from compressor.errors import CompressorError
from compressor.model import HybridLM

T = TypeVar("T")
# The input of a padding pass: one token, whose results are dropped.
IDLE_IDS = torch.zeros((1, 1), dtype=torch.long)


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


_joined = 0  # the `init`s not yet closed in this process: the process group ends with the outermost `close`


def init(device: torch.device) -> World:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); else a world of one.
    Nested joins (a search's session, then each finalist's training) share the group; `close` ends it
    with the outermost one."""
    global _joined
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device)
    if not dist.is_initialized():
        if device.type == "cpu":
            _return_freed_memory()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _joined = 0
    _joined += 1
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return World(rank=rank, size=size, device=device)


def shard(model: HybridLM, world: World, *, frozen: bool = False) -> HybridLM:
    """Shard every block (module docstring), and the rest too unless `frozen`; a model on the meta device is
    sharded before it has any memory (then `to_empty` and each process's rows)."""
    if not world.distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    # a frozen model has no root unit: each block is a root of its own, resharded after its forward
    reshard = True if frozen else None
    for block in model.backbone.layers:
        if block.kind == MOE:  # the router stays fp32: a unit of its own (FSDP wants one dtype per unit)
            fully_shard(block.mixer.gate, reshard_after_forward=reshard)
        fully_shard(block, reshard_after_forward=reshard)
    if not frozen:
        fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def local_rows(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """This process's rows of a whole parameter, as `fully_shard` lays it out (torch.chunk along dim 0, the
    last processes getting fewer rows or none)."""
    chunks = torch.chunk(tensor, world.size, dim=0) if tensor.ndim else (tensor,)
    return chunks[world.rank] if world.rank < len(chunks) else tensor[:0]


def idle_pass(model: HybridLM, world: World) -> None:
    """A padding pass: a forward on `IDLE_IDS` whose result is dropped, so that this process takes part in
    the collectives of the others' forwards."""
    with torch.no_grad():
        model(IDLE_IDS.to(world.device), head=lambda hidden, weight: None)


@contextmanager
def gathered(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module`'s parameters whole inside the context: its FSDP units (its own and those nested in it, e.g. a
    block and its MoE router) are all-gathered on entry and resharded on exit. A collective call (every
    process gathers the same modules in the same order); a no-op for a module that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield module
    finally:
        for unit in reversed(units):
            unit.reshard()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter (DTensor) gathered whole (a collective call); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def share(items: list[T], world: World) -> list[T | None]:
    """This process's share of `items` (every size-th, from its rank), padded with None to the longest
    share: every process then runs the same number of (collective) sharded forwards."""
    mine: list[T | None] = list(items[world.rank :: world.size])
    longest = -(-len(items) // world.size)
    return mine + [None] * (longest - len(mine))


def _return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the system at once. By default its threshold for that
    grows to the largest block freed (up to 32 MiB), after which such blocks stay in the heap; a sharded
    model gathers and frees each block in turn, so a CPU process would keep about the whole model (measured:
    a 2-process run holding more than one process). The same as MALLOC_MMAP_THRESHOLD_=131072."""
    import contextlib
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        ctypes.CDLL(name).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few numbers over all processes."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value: T, world: World) -> list[T]:
    """Every process's `value` (picklable, built by this program: never data read from a user's files),
    in rank order, on every process; `[value]` for a single process."""
    if not world.distributed:
        return [value]
    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close(world: World) -> None:
    """Leave the process group `init` joined; the outermost close ends it."""
    global _joined
    if world.distributed and dist.is_initialized():
        _joined -= 1
        if _joined <= 0:
            dist.destroy_process_group()


@contextmanager
def session(device: str | torch.device) -> Iterator[World]:
    """The world of a command's work (`init` on `device`, a name resolved by `resolve_device`), its process
    group closed when the work ends, also on an error."""
    world = init(resolve_device(device) if isinstance(device, str) else device)
    try:
        yield world
    finally:
        close(world)
