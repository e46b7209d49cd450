"""A search's library of blockwise-distilled block variants (`compress search --bld TOKENS`): Puzzle's
first two stages on one machine.

1. activations: one pass of the source over `tokens` tokens of calibration sequences (those not held out
   for scoring) stores its hidden states at every block boundary (`bld.write_activations`);
2. variants: every option the strategy offers a block (`ChoiceTable`: narrower widths, at each hidden
   size it considers) other than the parent block itself is pruned from the source
   (`prune.pruned_block`) and trained by blockwise local distillation (`bld.train_variant`); dropping a
   block needs no training. Each variant's weights go to `blocks/h{hidden}-b{block}-{n}.safetensors` and
   its entry (widths, error before and after) is appended to `entries.jsonl` as it finishes, so a killed
   build resumes at the next variant; the activations are deleted once every variant is trained. With
   `stream` (`--bld-stream`) nothing is stored: rounds of as many variants as fit in memory train together
   from the source's own passes (`bld.train_streamed`), each round saving its state every
   `ROUND_SAVE_SECONDS` (`RoundCheckpoint`), so a killed build continues its round from the last save;
3. scores (`score_library`): per hidden size, the model assembled from the kept-whole variants, and each
   option's damage: the proxy score (KL to the source on the held-out batches) of that model with the
   block replaced by the option, less the assembled model's own (Puzzle's replacement score; a dropped
   block is skipped). The solver then picks per block by these damages, and candidates are assembled
   from the trained variants (`Library.assemble`), scored whole, and distilled from there.

`library.json` records what the library was built from (source and data fingerprints, the BLD settings,
the options): a build whose record differs starts again.

Under torchrun (a sharded source) every process takes part in the source's passes (activations, scores)
and the variants are shared out: each round prunes its variants (one per process, or a streamed round's
many, dealt out in turn) from the gathered parent blocks and each process trains its own; the main process
writes the records (`entries.jsonl`, `scores.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor import distributed
from compressor.bld import Activations, BLDConfig, train_streamed, train_variant, write_activations
from compressor.budget import available_memory
from compressor.budget.counts import parameter_counts
from compressor.checkpoint import empty_model, materialize
from compressor.config import OVERRIDABLE
from compressor.errors import CompressorError
from compressor.evaluate import reduce_stats
from compressor.importance import Importance
from compressor.losses import LossSpec, LossStats, head_loss, next_token_labels
from compressor.model import HybridLM
from compressor.outputs import check_record, open_tensors, read_json, refuse_links, save_tensors
from compressor.pipelines.ranking import ProxyScorer
from compressor.pipelines.records import write_json
from compressor.pipelines.source import Source
from compressor.prune import pruned_block, pruned_tensors
from compressor.target import BlockTarget, Target
from strategies.minipuzzle import ChoiceTable
from strategies.solver import BlockChoice

LIBRARY_FILE = "library.json"
ENTRIES_FILE = "entries.jsonl"
SCORES_FILE = "scores.json"
ACTIVATIONS_DIR = "activations"
BLOCKS_DIR = "blocks"
ROUND_DIR = "round"  # a streamed round's last saved state
ROUND_FILE = "round.json"
ROUND_SAVE_SECONDS = 600.0  # how often a streamed round saves; COMPRESSOR_BLD_SAVE_SECONDS overrides it


@dataclass
class Variant:
    """One trained block variant: where it sits (hidden size, source block), its widths, its normalised
    error (`bld`) before and after training, and its weights file (relative to the library)."""

    hidden: int
    block: int
    widths: dict[str, int]
    initial_error: float
    error: float
    steps: int
    file: str

    @property
    def key(self) -> tuple:
        return (self.hidden, self.block, tuple(sorted(self.widths.items())))


def variant_key(hidden: int, block: BlockTarget) -> tuple:
    """What names a variant: the hidden size, the source block and every width of its kind."""
    return (hidden, block.source, tuple(sorted(block.widths.items())))


class Library:
    """The trained variants of a library folder, and the models assembled from them."""

    def __init__(self, folder: Path, variants: dict[tuple, Variant]) -> None:
        self.folder, self.variants = Path(folder), variants

    @classmethod
    def read(cls, folder: Path) -> Library:
        """The finished entries of `folder` (a torn last line, from a kill while it was appended, is skipped)."""
        variants: dict[tuple, Variant] = {}
        path = Path(folder) / ENTRIES_FILE
        if path.is_file():
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    raw = json.loads(line)
                except ValueError:
                    if number == len(lines):
                        break  # torn by a kill while it was appended
                    raise CompressorError(f"{path} line {number} is not JSON: delete the library") from None
                check_record(Variant, raw, f"{path} line {number}")
                variant = Variant(**raw)
                if not _inside(variant.file):
                    raise CompressorError(f"{path} line {number} names a file outside {BLOCKS_DIR}/: {variant.file}")
                variants[variant.key] = variant
        return cls(folder, variants)

    def block(self, model: HybridLM, importance: Importance, block: BlockTarget, hidden: int) -> nn.Module:
        """Source block `block.source` at `block`'s widths and hidden size `hidden`: the trained variant when
        the library holds one, else the pruned parent block (the parent itself at full size)."""
        built = pruned_block(model, importance, block, hidden)
        variant = self.variants.get(variant_key(hidden, block))
        if variant is not None:
            self._load(built, variant)
        return built

    def _load(self, block: nn.Module, variant: Variant) -> None:
        reference = block.state_dict()
        state = self._state(variant, {k: v.shape for k, v in reference.items()})
        block.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})

    def _state(self, variant: Variant, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """A variant's weights, checked against the block they replace (tensor names and `shapes`)."""
        path = self.folder / variant.file
        with open_tensors(path, "a library variant") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        if set(state) != set(shapes) or any(state[k].shape != shapes[k] for k in shapes):
            raise CompressorError(f"{path} does not hold the variant its entry describes: delete the library")
        return state

    def tensors(self, model: HybridLM, importance: Importance, target: Target) -> Iterator[tuple[str, torch.Tensor]]:
        """The assembled model's tensors as (name, tensor), one block at a time: `prune.pruned_tensors`
        with every kept block that has a trained variant given the variant's weights (every process of a
        sharded source walks the whole stream: its blocks are gathered as they are sliced)."""
        for position, names in _by_block(pruned_tensors(model, importance, target)):
            variant = None
            if position is not None:
                variant = self.variants.get(variant_key(target.hidden_size, target.blocks[position]))
            if variant is None:  # else the pruned block is the parent's, as `block` would build it
                yield from names
                continue
            prefix = f"backbone.layers.{position}."
            state = self._state(variant, {name[len(prefix) :]: tensor.shape for name, tensor in names})
            yield from ((prefix + name, tensor) for name, tensor in state.items())

    def assemble(
        self, model: HybridLM, importance: Importance, target: Target, *, world: distributed.World | None = None
    ) -> HybridLM:
        """The pruned model of `target` with every kept block replaced by its trained variant, in the
        source's dtype (sharded across `world`'s processes when it has several, as `prune.prune` does)."""
        world = world or distributed.World(device=model.lm_head.weight.device)
        assembled = empty_model(target.config(model.config), model.backbone.embeddings.weight.dtype)
        distributed.shard(assembled, world, frozen=True)
        materialize(assembled, self.tensors(model, importance, target), world)
        return assembled.eval()


def _by_block(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[int | None, list]]:
    """(block position, its tensors) in stream order; the tensors outside the blocks one by one with None."""
    position, names = None, []
    for name, tensor in tensors:
        parts = name.split(".")
        here = int(parts[2]) if name.startswith("backbone.layers.") else None
        if names and (here is None or here != position):
            yield position, names
            names = []
        if here is None:
            yield None, [(name, tensor)]
        else:
            position = here
            names.append((name, tensor))
    if names:
        yield position, names


def _inside(name: str) -> bool:
    """Whether a variant's file name stays in the library's blocks folder (a record read back is untrusted)."""
    parts = Path(name).parts
    return len(parts) == 2 and parts[0] == BLOCKS_DIR and parts[1] not in ("..", ".") and not Path(name).is_absolute()


def library_sequences(source: Source, tokens: int) -> np.ndarray:
    """Positions of the calibration sequences the library trains on: `tokens` worth of whole sequences,
    skipping those held out for scoring (the scores of the library's variants are measured on them)."""
    calibration = source.config
    count = max(1, tokens // calibration.seq_len)
    first_held_out = 0 if calibration.importance_dir else calibration.samples
    held = range(first_held_out, first_held_out + calibration.score_samples)
    positions = [i for i in range(len(source.sequences)) if i not in held][:count]
    if len(positions) < count:
        raise CompressorError(
            f"the library needs {count} sequences of {calibration.seq_len} tokens beside the "
            f"{calibration.score_samples} held out for scoring; the data holds {len(positions)}: use more data "
            "or fewer library tokens"
        )
    return np.asarray(positions)


def build_library(
    source: Source,
    tables: list[ChoiceTable],
    config: BLDConfig,
    folder: Path,
    say: Callable[[str], None] = print,
) -> Library:
    """Train every variant of `tables` not in `folder` yet (module docstring) and return the library."""
    folder, world = Path(folder), source.world
    positions = library_sequences(source, config.tokens)
    settings = {
        "source": source.fingerprint,
        "data": source.sequences.fingerprint(),
        "bld": dataclasses.asdict(config),
        "positions": positions.tolist(),
        "options": [[table.hidden, [[o.key for o in opts] for opts in table.options]] for table in tables],
    }
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    if world.is_main:
        _prepare(folder, settings, say)
    distributed.barrier(world)
    library = Library.read(folder)
    jobs = enumerate(_jobs(source, tables))
    todo = [(n, hidden, block) for n, (hidden, block) in jobs if variant_key(hidden, block) not in library.variants]
    activations_dir = folder / ACTIVATIONS_DIR
    if todo and not config.stream and not Activations.is_complete(activations_dir):
        say(f"library: storing the source's activations on {len(positions)} sequences")
        write_activations(source.model, source.sequences.take(positions), activations_dir, world=world)
    started, done = time.monotonic(), 0
    rounds = _stream_rounds(source, todo, folder) if config.stream else _rounds(todo, world.size)
    for count, jobs in enumerate(rounds, 1):
        if config.stream:
            say(f"library: round {count}/{len(rounds)}, {len(jobs)} variants trained together over "
                f"{1 + 2 * config.epochs} passes of the source on {len(positions)} sequences")  # fmt: skip
        mine = []  # a variant each process in turn; every process prunes every one (the gathers)
        for offset, (number, hidden, block) in enumerate(jobs):
            variant = pruned_block(source.model, source.importance, block, hidden)
            if offset % world.size == world.rank:
                mine.append((number, hidden, block, variant))
        saving = RoundCheckpoint(folder, [job[0] for job in jobs], world, say=say) if config.stream else None
        gathered = distributed.gather_objects(_train(mine, source, config, folder, positions, saving), world)
        finished = sorted((e for part in gathered for e in part), key=lambda e: e[0])
        eta = _eta(time.monotonic() - started, done + len(finished), len(todo))  # a round's variants end together
        for _, entry, result in finished:
            if world.is_main:
                with open(folder / ENTRIES_FILE, "a") as f:
                    f.write(json.dumps(dataclasses.asdict(entry)) + "\n")
            library.variants[entry.key] = entry
            done += 1
            say(
                f"library {done}/{len(todo)}: block {entry.block} ({source.model.config.block(entry.block).kind}) "
                f"{_describe_widths(entry.widths)} at hidden {entry.hidden}: error {result[0]:.3f} -> "
                f"{result[1]:.3f}, {eta}"
            )
        if saving is not None:
            saving.clear()  # after the entries: a kill between leaves a save of finished variants, ignored
    if world.is_main:
        shutil.rmtree(activations_dir, ignore_errors=True)
    distributed.barrier(world)
    return library


def _rounds(todo: list[tuple], size: int) -> list[list[tuple]]:
    """The stored-activations rounds: one variant per process."""
    return [todo[first : first + size] for first in range(0, len(todo), size)]


def _stream_rounds(source: Source, todo: list[tuple], folder: Path) -> list[list[tuple]]:
    """The streamed rounds: first the round a killed build saved (when its variants are all still to train
    and as many processes run), then as many variants as fit on each process in half the memory free
    beside the source (the least of any process), each variant's fp32 weights, gradients, AdamW's two
    moments and best weights' copy taking 20 bytes a parameter; at least one variant a process."""
    model, world = source.model, source.world
    saved = RoundCheckpoint.saved_jobs(folder, world)
    numbers = {job[0] for job in todo}
    if saved is not None and not set(saved) <= numbers:
        saved = None
        if world.is_main:  # its variants were finished after the save
            shutil.rmtree(folder / ROUND_DIR, ignore_errors=True)
    resumed = set(saved or ())
    first = [job for job in todo if job[0] in resumed]
    todo = [job for job in todo if job not in first]
    known = [free for free in distributed.gather_objects(available_memory(world.device), world) if free is not None]
    room = min(known) / 2 if known else math.inf
    rounds: list[list[tuple]] = []
    loads = [0] * world.size
    for job in todo:
        _, hidden, block = job
        cost = 20 * (parameter_counts(Target(hidden, (block,)).config(model.config))[block.kind] + hidden)
        rank = len(rounds[-1]) % world.size if rounds else 0
        if not rounds or (loads[rank] + cost > room and len(rounds[-1]) >= world.size):
            rounds.append([])
            loads, rank = [0] * world.size, 0
        rounds[-1].append(job)
        loads[rank] += cost
    return [first, *rounds] if first else rounds


class RoundCheckpoint:
    """A streamed round's progress in `library/round/` (`bld.train_streamed`'s checkpoint): every process
    writes the state of its own variants (`rank{r}-{save}.safetensors` and `.json`), then the main process
    names that save in `round.json` with the round's job numbers and processes, and each process deletes
    its older saves: a kill at any point leaves the last named save whole. A save is due every `every`
    seconds of the main process's clock (all processes save together). `say` hears when a round continues
    from a save."""

    def __init__(
        self,
        folder: Path,
        jobs: list[int],
        world: distributed.World,
        every: float | None = None,
        say: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.folder, self.jobs, self.world, self.say = Path(folder) / ROUND_DIR, jobs, world, say
        if every is None:
            every = float(os.environ.get("COMPRESSOR_BLD_SAVE_SECONDS", ROUND_SAVE_SECONDS))
        self.every = every
        self.last, self.number = time.monotonic(), 0

    @staticmethod
    def saved_jobs(folder: Path, world: distributed.World) -> list[int] | None:
        """The job numbers of the round saved in `folder`, when as many processes saved it."""
        saved = RoundCheckpoint._saved(Path(folder) / ROUND_DIR, world)
        return saved[0] if saved is not None else None

    @staticmethod
    def _saved(folder: Path, world: distributed.World) -> tuple[list[int], int] | None:
        """(job numbers, save number) that `round.json` in `folder` names, when as many processes saved it."""
        try:
            record = read_json(folder / ROUND_FILE, "a streamed round's record")
        except CompressorError:
            return None
        jobs, processes, number = (record.get(k) for k in ("jobs", "processes", "save"))
        if not (isinstance(jobs, list) and all(type(j) is int for j in jobs) and type(number) is int):
            return None
        return (jobs, number) if processes == world.size else None

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """This process's part of the last save of this round; None (on every process) when there is none or
        any process cannot read its part."""
        state, saved = None, self._saved(self.folder, self.world)
        if saved is not None and saved[0] == self.jobs:
            number = saved[1]
            name = f"rank{self.world.rank}-{number}"
            try:
                with open_tensors(self.folder / f"{name}.safetensors", "a streamed round's saved state") as f:
                    tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
                meta = read_json(self.folder / f"{name}.json", "a streamed round's saved state")
                state, self.number = (tensors, meta), number
            except CompressorError:
                state = None
        whole = distributed.all_reduce_sum([float(state is None)], self.world)[0] == 0
        if whole:
            self.say(f"library: the round continues from its last save (save {self.number})")
        return state if whole else None

    def due(self) -> bool:
        due = self.world.is_main and time.monotonic() - self.last >= self.every
        return distributed.all_reduce_sum([float(due)], self.world)[0] > 0 if self.world.distributed else due

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.number += 1
        name = f"rank{self.world.rank}-{self.number}"
        if self.world.is_main:
            self.folder.mkdir(exist_ok=True)
        distributed.barrier(self.world)
        save_tensors(tensors, self.folder / f"{name}.safetensors.tmp")
        os.replace(self.folder / f"{name}.safetensors.tmp", self.folder / f"{name}.safetensors")
        write_json(self.folder / f"{name}.json", meta)
        distributed.barrier(self.world)
        if self.world.is_main:
            record = {"jobs": self.jobs, "processes": self.world.size, "save": self.number}
            write_json(self.folder / ROUND_FILE, record)
        distributed.barrier(self.world)
        for old in self.folder.glob(f"rank{self.world.rank}-*"):
            if old.name.split(".")[0] != name:
                old.unlink(missing_ok=True)
        self.last = time.monotonic()

    def clear(self) -> None:
        """The round is done: its saves go."""
        if self.world.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
        distributed.barrier(self.world)


def _prepare(folder: Path, settings: dict[str, Any], say: Callable[[str], None]) -> None:
    """The library folder, started again when it was built for another source, data or settings."""
    if folder.exists():
        refuse_links(folder, "a library folder")  # what it writes and deletes stays inside it
    if folder.exists() and _settings(folder) != settings:
        say(f"{folder} was built for another source, data or settings: building it again")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BLOCKS_DIR).mkdir(exist_ok=True)
    if not (folder / LIBRARY_FILE).is_file():
        write_json(folder / LIBRARY_FILE, settings)


def _train(
    jobs: list[tuple],
    source: Source,
    config: BLDConfig,
    folder: Path,
    positions: np.ndarray,
    saving: RoundCheckpoint | None = None,
) -> list[tuple[int, Variant, tuple[float, float]]]:
    """Train this process's `(number, hidden, block, variant)` jobs (from the stored activations, or together
    from the source's passes over the library's `positions` with `config.stream`, saved by `saving`; a
    streamed round runs those passes also with no jobs) and save their weights: (job number, entry, errors)
    each."""
    channels = [source.importance.keep_hidden(hidden).cpu() for _, hidden, _, _ in jobs]
    if config.stream:
        fits = [(variant, block.source, kept) for (_, _, block, variant), kept in zip(jobs, channels, strict=True)]
        results = train_streamed(source.model, source.sequences.take(positions), fits, config, saving)
    else:
        activations = Activations(folder / ACTIVATIONS_DIR) if jobs else None
        results = [
            train_variant(variant, activations, block.source, kept, config)
            for (_, _, block, variant), kept in zip(jobs, channels, strict=True)
        ]
    done = []
    for (number, hidden, block, variant), result in zip(jobs, results, strict=True):
        name = f"{BLOCKS_DIR}/h{hidden}-b{block.source}-{number}.safetensors"
        tmp = folder / f"{name}.tmp"
        save_tensors({k: v.contiguous() for k, v in variant.state_dict().items()}, tmp)
        os.replace(tmp, folder / name)
        entry = Variant(hidden, block.source, block.widths, result.initial_error, result.error, result.steps, name)
        done.append((number, entry, (result.initial_error, result.error)))
    return done


def _settings(folder: Path) -> dict[str, Any] | None:
    try:
        return read_json(folder / LIBRARY_FILE, "a library record")
    except CompressorError:
        return None


def _jobs(source: Source, tables: list[ChoiceTable]) -> list[tuple[int, BlockTarget]]:
    """(hidden, block) of every variant to train: kept options other than the parent block itself."""
    model, jobs = source.model, []
    for table in tables:
        for index, options in enumerate(table.options):
            for option in options:
                if not option.dropped and not (option.whole and table.hidden == model.config.hidden_size):
                    jobs.append((table.hidden, _block_target(model, index, option)))
    return jobs


def _describe_widths(widths: dict[str, int]) -> str:
    return ", ".join(f"{name} {value}" for name, value in widths.items()) or "whole"


def _eta(elapsed: float, done: int, total: int) -> str:
    left = elapsed / done * (total - done)
    return f"{elapsed:.0f} s so far, about {left:.0f} s left"


class _Skip(nn.Module):
    """A dropped block in an assembled model: passes the residual stream through."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        return hidden


def score_library(
    source: Source,
    tables: list[ChoiceTable],
    library: Library,
    scorer: ProxyScorer,
    folder: Path,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Set every option's damage in `tables` to its replacement score (module docstring) and return what
    was measured ({hidden: {"base": score, "damage": [[per option] per block]}}), reading it back from
    `scores.json` when this library was scored already."""
    path = Path(folder) / SCORES_FILE
    scores = read_json(path, "library scores") if path.is_file() else {}
    model, importance = source.model, source.importance
    for table in tables:
        key = str(table.hidden)
        if key not in scores:
            started = time.monotonic()
            references = [_reference(options) for options in table.options]
            whole = Target(table.hidden, tuple(_block_target(model, i, o) for i, o in enumerate(references)))
            replacing = _Replacements(scorer, library.assemble(model, importance, whole, world=source.world))
            base = replacing.score(0)
            damage = []
            for index, options in enumerate(table.options):
                row = []
                for option in options:
                    if option is references[index]:
                        row.append(0.0)
                    elif option.dropped:
                        row.append(replacing.score(index, _Skip(index)) - base)
                    else:
                        block = library.block(model, importance, _block_target(model, index, option), table.hidden)
                        row.append(replacing.score(index, block) - base)
                damage.append(row)
            scores[key] = {"base": base, "damage": damage}  # the same on every process (summed over them)
            if source.world.is_main:
                write_json(path, scores)
            seconds = time.monotonic() - started
            say(f"library scores at hidden {table.hidden}: assembled whole {base:.4f} ({seconds:.0f} s)")
        measured = scores[key]["damage"]
        if [len(row) for row in measured] != [len(opts) for opts in table.options]:
            raise CompressorError(f"{path} does not match the library's options: delete it to score again")
        for options, row in zip(table.options, measured, strict=True):
            for option, value in zip(options, row, strict=True):
                option.damage = float(value) if math.isfinite(value) else _UNUSABLE
    return scores


class _Replacements:
    """The proxy score of a model with one block replaced, each block's input computed once: the model's
    residual stream at every block boundary is kept for the scorer's held-out batches, and a replacement
    of block i runs from its input on. A sharded model's processes each keep their share of the batches
    (an idle batch where a share is short, so that every process runs the same blocks' collectives) and
    the sums are reduced. Scores with a retrieval term run the whole model instead."""

    def __init__(self, scorer: ProxyScorer, model: HybridLM) -> None:
        self.scorer, self.model = scorer, model
        self.resumable = scorer.spec.text is not None and not scorer.spec.retrieval
        self.inputs: list[list[torch.Tensor]] = []
        if self.resumable:
            from compressor.bld import boundaries

            idle = distributed.IDLE_IDS.to(scorer.world.device)
            with torch.no_grad():
                self.inputs = [list(boundaries(model, idle if ids is None else ids))[:-1] for ids in scorer.batches]

    def score(self, index: int, block: nn.Module | None = None) -> float:
        layers = self.model.backbone.layers
        original = layers[index]
        if block is not None:
            layers[index] = block.to(original.norm.weight.dtype).eval()
        try:
            if not self.resumable:
                return self.scorer.score_model(self.model).value
            return self._from(index)
        finally:
            layers[index] = original

    @torch.no_grad()
    def _from(self, index: int) -> float:
        backbone, stats = self.model.backbone, LossStats()
        spec = LossSpec()
        for batch, (ids, inputs) in enumerate(zip(self.scorer.batches, self.inputs, strict=True)):
            hidden = inputs[index]
            for layer in backbone.layers[index:]:
                hidden = layer(hidden)
            if ids is None:  # an idle batch: only the blocks' collectives
                continue
            final = backbone.norm_f(hidden.to(backbone.norm_f.weight.dtype))
            teacher = self.scorer.references[batch] if self.scorer.references else None
            head_loss(final.flatten(0, 1), self.model.lm_head.weight, spec, labels=next_token_labels(ids),
                      teacher=teacher, stats=stats)  # fmt: skip
        stats = reduce_stats(stats, self.scorer.world)
        if self.scorer.spec.text == "kl":
            return float(stats.divergence) / stats.tokens
        return float(stats.cross_entropy) / stats.label_tokens


_UNUSABLE = 1e6  # the damage of an option whose model scored NaN or infinity (the solver needs finite costs)


def _reference(options: list[BlockChoice]) -> BlockChoice:
    """The option the assembled reference model takes for a block: whole, else its widest kept one."""
    return next((o for o in options if o.whole), next(o for o in options if not o.dropped))


def _block_target(model: HybridLM, index: int, option: BlockChoice) -> BlockTarget:
    spec = model.config.block(index)
    widths = {name: getattr(spec, name) for name in OVERRIDABLE[spec.kind]} | dict(option.widths)
    return BlockTarget(index, spec.kind, **widths)
