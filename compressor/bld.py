"""Blockwise local distillation (BLD, Puzzle's first stage): each block variant trained alone to reproduce
its parent block, from the parent's own activations.

One pass of the parent over the library's sequences stores the hidden states at every block boundary
(`write_activations`: h_0 the embeddings' output, h_i block i's input, h_L the last block's output) in
parts on disk, so the data can be longer than memory. A variant of block i is the parent block pruned to
its widths and, at a smaller hidden size d', to the parent's d' most important hidden channels
(`prune.pruned_block`); its input is h_i restricted to those channels and its target h_{i+1} restricted
likewise (the child's residual stream starts as the parent's on the kept channels). `train_variant` fits
it with AdamW to the normalised error

    e = sum ||block'(x) - y||^2 / sum ||y - x||^2

the share of the parent block's contribution to the residual stream the variant fails to reproduce: 0
is the parent block itself, 1 is what dropping the block does. Only one block, its optimiser state and
one micro-batch of activations are in memory; variants are independent, so they can be trained in any
order, resumed one at a time, and shared among processes.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.distributed import World, barrier
from compressor.errors import CompressorError, OptionError
from compressor.model import HybridLM
from compressor.outputs import check_free_space, open_tensors, read_json, save_tensors

META = "activations.json"
PART_BYTES = 2**30  # an activations file holds about this much (at least one sequence)


def part_sequences(seq_len: int, hidden_size: int, blocks: int) -> int:
    """Sequences per activations file: every block boundary of a sequence in fp32, up to `PART_BYTES`."""
    return max(1, PART_BYTES // (seq_len * hidden_size * (blocks + 1) * 4))


@dataclass(frozen=True)
class BLDConfig:
    """How each variant is trained: on `tokens` tokens of parent activations (whole sequences), for
    `epochs` passes, `micro_batch_size` sequences per step, AdamW at `lr` with a cosine decay."""

    tokens: int
    epochs: int = 2
    lr: float = 1e-3
    micro_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("bld_tokens", self.tokens >= 1, "must be at least 1"),
            ("bld_epochs", self.epochs >= 1, "must be at least 1"),
            ("bld_lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive number"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be at least 1"),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise OptionError(name, problem)


@torch.no_grad()
def write_activations(
    model: HybridLM, sequences: torch.Tensor, folder: Path, *, batch_size: int = 8, world: World | None = None
) -> Activations:
    """Run the parent over `sequences` (n, t) and store h_0 ... h_L (float32) in parts of about
    `PART_BYTES`; written to a temporary sibling and renamed into place when complete, so a folder that
    exists is whole. A sharded parent (`world` of several processes) runs on every process, each block
    gathered in turn, and the main process writes."""
    world = world or World()
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    device, parts, config = model.lm_head.weight.device, 0, model.config
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        needed = sequences.numel() * config.hidden_size * (config.num_blocks + 1) * 4
        check_free_space(partial, needed, "storing the parent's activations (fewer --bld tokens need less)")
    step = part_sequences(sequences.shape[1], config.hidden_size, config.num_blocks)
    for start in range(0, len(sequences), step):
        chunk = sequences[start : start + step]
        states: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_blocks + 1)]
        for i in range(0, len(chunk), batch_size):
            for level, hidden in enumerate(boundaries(model, chunk[i : i + batch_size].to(device))):
                if world.is_main:  # the others run the pass only for its collectives
                    states[level].append(hidden.float().cpu())
        if world.is_main:
            tensors = {f"h{level}": torch.cat(s) for level, s in enumerate(states)}
            save_tensors(tensors, partial / f"part-{parts}.safetensors")
        parts += 1
    if not world.is_main:
        barrier(world)
        return Activations(folder)
    meta = {
        "blocks": model.config.num_blocks,
        "hidden_size": model.config.hidden_size,
        "sequences": len(sequences),
        "seq_len": sequences.shape[1],
        "parts": parts,
        "complete": True,
    }
    (partial / META).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    barrier(world)
    return Activations(folder)


def boundaries(model: HybridLM, ids: torch.Tensor) -> Iterator[torch.Tensor]:
    """The residual stream before each block and after the last (as `Backbone.forward` computes it), for a
    model whose layers may be replaced (a pass-through in place of a dropped block)."""
    backbone = model.backbone
    hidden = backbone.embeddings(ids)
    if backbone.residual_in_fp32:
        hidden = hidden.float()
    yield hidden
    for block in backbone.layers:
        hidden = block(hidden)
        yield hidden


class Activations:
    """Reads the parent activations `write_activations` stored."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.is_complete(self.folder):
            raise CompressorError(f"{self.folder} holds no complete activations: delete it to rebuild")
        meta = read_json(self.folder / META, "a record of stored activations")
        counts = [meta.get(name) for name in ("blocks", "hidden_size", "sequences", "seq_len", "parts")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise CompressorError(f"{self.folder / META} is damaged: delete {self.folder} to rebuild")
        self.blocks, self.hidden_size, self.sequences, self.seq_len, self.parts = counts

    @staticmethod
    def is_complete(folder: Path) -> bool:
        try:
            return read_json(Path(folder) / META, "a record of stored activations").get("complete") is True
        except CompressorError:
            return False

    def pairs(
        self, block: int, channels: torch.Tensor, micro_batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input, target) micro-batches of block `block`, on the kept `channels`: one part in memory at a
        time, parts and sequences within a part shuffled by `generator` (in order without one)."""
        order = torch.randperm(self.parts, generator=generator) if generator is not None else range(self.parts)
        for part in order:
            with open_tensors(self.folder / f"part-{int(part)}.safetensors", "stored activations") as handle:
                inputs = handle.get_tensor(f"h{block}")[..., channels]
                targets = handle.get_tensor(f"h{block + 1}")[..., channels]
            rows = torch.randperm(len(inputs), generator=generator) if generator is not None else range(len(inputs))
            rows = torch.as_tensor(rows)
            for i in range(0, len(rows), micro_batch_size):
                take = rows[i : i + micro_batch_size]
                yield inputs[take], targets[take]


@dataclass(frozen=True)
class VariantResult:
    """A trained variant: its normalised error before and after training (the lower is kept)."""

    initial_error: float
    error: float
    steps: int


def block_error(block: nn.Module, activations: Activations, index: int, channels: torch.Tensor, micro: int) -> float:
    """The normalised error (module docstring) of `block` in place of parent block `index`, over all
    stored sequences."""
    device = next(block.parameters()).device
    missed = contribution = 0.0
    with torch.no_grad():
        for x, y in activations.pairs(index, channels, micro):
            x, y = x.to(device), y.to(device)
            missed += float((block(x).float() - y).square().sum())
            contribution += float((y - x).square().sum())
    return missed / max(contribution, 1e-30)


def train_variant(
    block: nn.Module, activations: Activations, index: int, channels: torch.Tensor, config: BLDConfig
) -> VariantResult:
    """Fit `block` (float32, in place) to parent block `index`'s output on the kept `channels` (module
    docstring); the weights after the epoch with the lowest error are kept, its initial ones if no epoch
    improves on them."""
    micro = config.micro_batch_size
    block.float().train()
    initial = best = block_error(block, activations, index, channels, micro)
    best_state = {k: v.clone() for k, v in block.state_dict().items()}
    trainable = [p for p in block.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    per_epoch = math.ceil(activations.sequences / micro) if activations.parts else 0
    total, step = per_epoch * config.epochs, 0
    generator = torch.Generator().manual_seed(config.seed + index)
    device = next(block.parameters()).device
    for _ in range(config.epochs):
        for x, y in activations.pairs(index, channels, micro, generator):
            x, y = x.to(device), y.to(device)
            for group in optimizer.param_groups:  # cosine from lr to lr / 10
                group["lr"] = config.lr * (0.55 + 0.45 * math.cos(math.pi * step / max(total, 1)))
            loss = (block(x).float() - y).square().sum() / (y - x).square().sum().clamp(min=1e-30)
            if not torch.isfinite(loss):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            step += 1
        error = block_error(block, activations, index, channels, micro)
        if error < best:
            best, best_state = error, {k: v.clone() for k, v in block.state_dict().items()}
    block.load_state_dict(best_state)
    block.eval()
    return VariantResult(initial, best, step)
