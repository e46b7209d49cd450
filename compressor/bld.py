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
order, resumed one at a time, and shared among processes. The states are stored in the dtype the parent
computes its residual stream in (bf16 for a bf16 parent without `residual_in_fp32`), so storing loses
nothing; training reads them as fp32.

Without the disk for them, `train_streamed` trains a group of variants together from the parent's own
forward passes instead: every micro-batch of the parent's boundaries feeds one step of every variant of
the group, so 1 + 2 x epochs passes of the parent (the first error, then per epoch a training pass and an
error pass) replace the stored activations. Its batches come in one order for all variants (the stored
path shuffles per variant), and the grouping does not change any variant's result. With a checkpoint it
saves its state as it goes and continues from the last save after a kill.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compressor.distributed import World, barrier
from compressor.errors import CompressorError, OptionError, first_line
from compressor.model import HybridLM
from compressor.outputs import check_free_space, open_tensors, read_json, save_tensors

META = "activations.json"
PART_BYTES = 2**30  # an activations file holds about this much (at least one sequence)


def part_sequences(seq_len: int, hidden_size: int, blocks: int, itemsize: int = 4) -> int:
    """Sequences per activations file: every block boundary of a sequence (`itemsize` bytes a value), up to
    `PART_BYTES`."""
    return max(1, PART_BYTES // (seq_len * hidden_size * (blocks + 1) * itemsize))


def stored_itemsize(residual_in_fp32: bool, dtype: torch.dtype) -> int:
    """Bytes per stored activation value: the residual stream's dtype, fp32 with `residual_in_fp32`, else
    the parent's `dtype`."""
    return 4 if residual_in_fp32 else torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class BLDConfig:
    """How each variant is trained: on `tokens` tokens of parent activations (whole sequences), for
    `epochs` passes, `micro_batch_size` sequences per step, AdamW at `lr` with a cosine decay."""

    tokens: int
    epochs: int = 2
    lr: float = 1e-3
    micro_batch_size: int = 8
    seed: int = 0
    stream: bool = False  # train from the parent's forward passes (`train_streamed`), nothing stored

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
    """Run the parent over `sequences` (n, t) and store h_0 ... h_L (in the residual stream's dtype) in parts
    of about `PART_BYTES`; written to a temporary sibling and renamed into place when complete, so a folder that
    exists is whole. A sharded parent (`world` of several processes) runs on every process, each block
    gathered in turn, and the main process writes."""
    world = world or World()
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    device, parts, config = model.lm_head.weight.device, 0, model.config
    itemsize = stored_itemsize(config.residual_in_fp32, model.lm_head.weight.dtype)
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        needed = sequences.numel() * config.hidden_size * (config.num_blocks + 1) * itemsize
        what = "storing the parent's activations (fewer --bld tokens need less, --bld-stream none)"
        check_free_space(partial, needed, what)
    step = part_sequences(sequences.shape[1], config.hidden_size, config.num_blocks, itemsize)
    for start in range(0, len(sequences), step):
        chunk = sequences[start : start + step]
        states: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_blocks + 1)]
        for i in range(0, len(chunk), batch_size):
            for level, hidden in enumerate(boundaries(model, chunk[i : i + batch_size].to(device))):
                if world.is_main:  # the others run the pass only for its collectives
                    states[level].append(hidden.cpu())
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
        """(input, target) micro-batches of block `block`, on the kept `channels`, in fp32: one part in memory
        at a time, parts and sequences within a part shuffled by `generator` (in order without one)."""
        order = torch.randperm(self.parts, generator=generator) if generator is not None else range(self.parts)
        for part in order:
            with open_tensors(self.folder / f"part-{int(part)}.safetensors", "stored activations") as handle:
                inputs = handle.get_tensor(f"h{block}")[..., channels].float()
                targets = handle.get_tensor(f"h{block + 1}")[..., channels].float()
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


class _Error:
    """The normalised error (module docstring) of a block, summed over micro-batches."""

    def __init__(self) -> None:
        self.missed = self.contribution = 0.0

    @torch.no_grad()
    def add(self, block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.missed += float((block(x).float() - y).square().sum())
        self.contribution += float((y - x).square().sum())

    def take(self) -> float:
        """The error of what was added, and a fresh start."""
        error = self.missed / max(self.contribution, 1e-30)
        self.missed = self.contribution = 0.0
        return error


class _Fit:
    """One variant's training, fed (input, target) micro-batches from outside: stored activations
    (`train_variant`) or the parent's forward passes (`train_streamed`). Errors accumulate over a pass of
    `measure` calls; `keep` after each pass holds on to the weights of the lowest error so far."""

    def __init__(self, block: nn.Module, index: int, channels: torch.Tensor, config: BLDConfig, steps: int) -> None:
        self.block, self.index, self.config, self.total = block.float().train(), index, config, steps
        self.device = next(block.parameters()).device
        self.channels = channels.to(self.device)
        self.trainable = [p for p in block.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=0.0)
        self.steps, self.errors = 0, _Error()
        self.initial: float | None = None
        self.best, self.best_state = math.inf, {}
        self.stopped = False  # a non-finite loss ends the epoch

    def pair(self, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This variant's (input, target) on its kept channels, in fp32, from one batch of the parent's
        boundaries."""
        x, y = states[self.index], states[self.index + 1]
        return x[..., self.channels].float(), y[..., self.channels].float()

    def measure(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.errors.add(self.block, x.to(self.device), y.to(self.device))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One AdamW step, the learning rate on a cosine from lr to lr / 10 over all epochs."""
        if self.stopped:
            return
        x, y = x.to(self.device), y.to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * (0.55 + 0.45 * math.cos(math.pi * self.steps / max(self.total, 1)))
        loss = (self.block(x).float() - y).square().sum() / (y - x).square().sum().clamp(min=1e-30)
        if not torch.isfinite(loss):
            self.stopped = True
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.steps += 1

    def keep(self) -> None:
        """End a measuring pass: its error, the first one the initial; the weights if it is the lowest."""
        error = self.errors.take()
        if self.initial is None or error < self.best:  # the initial weights are kept whatever their error
            self.best, self.best_state = error, {k: v.clone() for k, v in self.block.state_dict().items()}
        if self.initial is None:
            self.initial = error
        self.stopped = False

    SCALARS = ("steps", "initial", "best", "stopped")

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resumed fit needs (tensors named under `prefix`, and scalars): the weights, the best
        weights so far, AdamW's moments, and the step, errors and partial sums of the pass."""
        tensors = {f"{prefix}block.{k}": v for k, v in self.block.state_dict().items()}
        tensors |= {f"{prefix}best.{k}": v for k, v in self.best_state.items()}
        for i, entry in self.optimizer.state_dict()["state"].items():
            tensors |= {f"{prefix}adam.{i}.{field}": value for field, value in entry.items()}
        scalars = {name: getattr(self, name) for name in self.SCALARS}
        scalars |= {"missed": self.errors.missed, "contribution": self.errors.contribution}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, scalars

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], prefix: str) -> None:
        """Take back what `state` saved."""

        def part(name: str) -> dict[str, torch.Tensor]:
            start = prefix + name
            return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}

        self.block.load_state_dict(part("block."))
        self.best_state = {k: v.to(self.device) for k, v in part("best.").items()}
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in part("adam.").items():
            index, field = key.split(".", 1)
            moments.setdefault(int(index), {})[field] = value
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": moments, "param_groups": groups})
        for name in self.SCALARS:
            setattr(self, name, scalars[name])
        self.errors.missed, self.errors.contribution = scalars["missed"], scalars["contribution"]

    def result(self) -> VariantResult:
        """The kept weights loaded, the block in eval mode."""
        self.block.load_state_dict(self.best_state)
        self.block.eval()
        return VariantResult(self.initial, self.best, self.steps)


def block_error(block: nn.Module, activations: Activations, index: int, channels: torch.Tensor, micro: int) -> float:
    """The normalised error (module docstring) of `block` in place of parent block `index`, over all
    stored sequences."""
    device, errors = next(block.parameters()).device, _Error()
    for x, y in activations.pairs(index, channels, micro):
        errors.add(block, x.to(device), y.to(device))
    return errors.take()


def train_variant(
    block: nn.Module, activations: Activations, index: int, channels: torch.Tensor, config: BLDConfig
) -> VariantResult:
    """Fit `block` (float32, in place) to parent block `index`'s output on the kept `channels` (module
    docstring) from stored activations; the weights after the epoch with the lowest error are kept, its
    initial ones if no epoch improves on them."""
    micro = config.micro_batch_size
    per_epoch = math.ceil(activations.sequences / micro) if activations.parts else 0
    fit = _Fit(block, index, channels, config, per_epoch * config.epochs)

    def measured() -> None:
        for x, y in activations.pairs(index, fit.channels.cpu(), micro):
            fit.measure(x, y)
        fit.keep()

    measured()
    generator = torch.Generator().manual_seed(config.seed + index)
    for _ in range(config.epochs):
        for x, y in activations.pairs(index, fit.channels.cpu(), micro, generator):
            fit.step(x, y)
            if fit.stopped:
                break
        measured()
    return fit.result()


class StreamCheckpoint(Protocol):
    """Where `train_streamed` keeps a round's progress (`pipelines.library.RoundCheckpoint`)."""

    folder: Path  # named in the message when a saved state does not fit

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None: ...  # (tensors, meta) or None

    def due(self) -> bool: ...  # whether to save now (the same answer on every process)

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...


def train_streamed(
    model: HybridLM,
    sequences: torch.Tensor,
    variants: list[tuple[nn.Module, int, torch.Tensor]],
    config: BLDConfig,
    checkpoint: StreamCheckpoint | None = None,
) -> list[VariantResult]:
    """Fit every `(block, parent block index, kept channels)` of `variants` together (float32, in place)
    from the parent's forward passes over `sequences` (n, t), as `train_variant` does from stored
    activations (module docstring): `config.micro_batch_size` sequences a pass step, one shuffled order for
    all variants. A sharded parent runs its passes on every process: call it on each, also on one with no
    variants of its own. With a `checkpoint`, every variant's state and the position in the passes are
    saved whenever it is due, and a run that finds a saved state continues from it: a kill loses only the
    micro-batches since the last save, and the result is the one of an uninterrupted run."""
    micro, device, n = config.micro_batch_size, model.lm_head.weight.device, len(sequences)
    fits = [_Fit(b, i, c, config, math.ceil(n / micro) * config.epochs) for b, i, c in variants]
    generator = torch.Generator().manual_seed(config.seed)
    in_order = torch.arange(n)
    plan = [("measure", in_order)]  # the passes: the first errors, then per epoch a training and an error pass
    for _ in range(config.epochs):
        plan += [("train", torch.randperm(n, generator=generator)), ("measure", in_order)]
    start = (0, 0)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        tensors, meta = saved
        try:
            if len(meta["fits"]) != len(fits):
                raise ValueError(f"{len(meta['fits'])} variants saved, {len(fits)} to train")
            for k, fit in enumerate(fits):
                fit.restore(tensors, meta["fits"][k], f"{k}.")
            start = (int(meta["position"][0]), int(meta["position"][1]))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CompressorError(
                f"the streamed round saved in {checkpoint.folder} does not fit its variants ({first_line(exc)}): "
                "delete that folder to train the round from its start"
            ) from None
    for number, (kind, order) in enumerate(plan):
        if number < start[0]:
            continue
        for batch, first in enumerate(range(0, n, micro)):
            if (number, batch) < start:
                continue
            with torch.no_grad():
                states = list(boundaries(model, sequences[order[first : first + micro]].to(device)))
            for fit in fits:  # outside no_grad: the training steps need autograd
                (fit.measure if kind == "measure" else fit.step)(*fit.pair(states))
            if checkpoint is not None and checkpoint.due():
                kept = [fit.state(f"{k}.") for k, fit in enumerate(fits)]
                tensors = {name: t for own, _ in kept for name, t in own.items()}
                checkpoint.save(tensors, {"position": [number, batch + 1], "fits": [scalars for _, scalars in kept]})
        if kind == "measure":
            for fit in fits:
                fit.keep()
    return [fit.result() for fit in fits]
