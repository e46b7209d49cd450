"""Offline teacher: the teacher's next-token targets, computed once and read back during training.

`write_teacher_cache` runs the teacher over every sequence of the given splits (train, valid) and stores,
per token, k token ids (int32) and their log-probs at the run's temperature (float32: half precision would
bias small KL values by about 1%), in one of two forms (`TARGETS`; see `compressor.losses`):
- "sampled": k draws from the teacher's distribution; the distinct ids drawn, with the share of the draws
  each took (`weights`, float32; the slots left over hold weight 0). 12 x k bytes a token (768 at k = 64;
  at most vocab slots).
  The draws of a sequence depend on the seed and its place in the split only, not on its batch or process.
- "top-k": the k most likely ids; the loss treats the mass outside them as one bucket. 8 x k bytes a token.
Training then needs no teacher in memory. Choose k for the disk at hand.

Layout of the cache folder (written to a temporary folder and renamed into place when complete):
- `teacher_cache.json`: the form, k, temperature, seed, sequence length and the sequences per split;
- `{split}-r{rank}-p{part}.safetensors`: `sequence` (s,) int64 positions in the split, `indices`
  (s, seq_len, k) int32, `log_probs` (s, seq_len, k) float32, and for sampled targets `weights` (the same).
Several processes each write their share; the output folder must be on a file system they all see.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor import distributed
from compressor.data import TokenSequences
from compressor.errors import CompressorError
from compressor.losses import CachedTeacher, TeacherSample, TeacherTopK
from compressor.model import HybridLM
from compressor.outputs import check_record, open_tensors, read_json, save_tensors

META = "teacher_cache.json"
PART_SEQUENCES = 256  # sequences per file
TARGETS = ("sampled", "top-k")


def write_teacher_cache(
    folder: Path,
    teacher: HybridLM,
    splits: dict[str, tuple[TokenSequences, np.ndarray]],
    top_k: int,
    temperature: float,
    world: distributed.World,
    *,
    targets: str = "top-k",
    seed: int = 0,
    batch_size: int = 16,
) -> None:
    """Compute and store the teacher's `targets` (k = `top_k` draws or most likely tokens) for the sequences
    at the given positions of each split ({"train": (sequences, positions), ...}): a run caches only the
    sequences it will train on."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    distributed.barrier(world)
    k = top_k if targets == "sampled" else min(top_k, teacher.config.vocab_size)
    for split_number, (name, (sequences, positions)) in enumerate(splits.items()):
        batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        rounds = -(-len(batches) // world.size)
        parts: list[dict[str, torch.Tensor]] = []
        rows = part = 0
        for r in range(rounds):
            j = r * world.size + world.rank
            # every process runs the same number of forwards (sharded weights are gathered collectively)
            indices = batches[j] if j < len(batches) else batches[0]
            ids = sequences.take(indices).to(world.device)
            # one generator seed per sequence, within the 64 bits torch takes
            seeds = [((seed * len(splits) + split_number) * 2**32 + int(p)) % 2**63 for p in indices]
            with torch.no_grad():
                found = teacher(ids, head=lambda h, w, seeds=seeds: _targets(h, w, k, temperature, targets, seeds))
            if j >= len(batches):
                continue
            parts.append({"sequence": torch.from_numpy(np.asarray(indices, dtype=np.int64)), **found})
            rows += len(indices)
            if rows >= PART_SEQUENCES:
                _write_part(partial, name, world.rank, part, parts)
                parts, rows, part = [], 0, part + 1
        if parts:
            _write_part(partial, name, world.rank, part, parts)
    distributed.barrier(world)
    if world.is_main:
        meta = {
            "targets": targets,
            "top_k": k,
            "vocab_size": teacher.config.vocab_size,
            "temperature": temperature,
            "seed": seed,
            "seq_len": next(iter(splits.values()))[0].seq_len,
            "sequences": {name: len(positions) for name, (_, positions) in splits.items()},
            "complete": True,
        }
        (partial / META).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    distributed.barrier(world)


def _targets(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, targets: str, seeds: list[int]
) -> dict[str, torch.Tensor]:
    """A batch's targets (module docstring) as CPU tensors (batch, seq_len, k), a sequence at a time so only
    one sequence's logits exist; sequence i draws from a generator seeded with seeds[i]."""
    found: dict[str, list[torch.Tensor]] = {"indices": [], "log_probs": []}
    if targets == "sampled":
        found["weights"] = []
    for sequence, seed in zip(hidden, seeds, strict=True):
        log_probs = F.log_softmax((sequence.float() @ weight.float().T) / temperature, dim=-1)
        if targets == "sampled":
            generator = torch.Generator(device=log_probs.device).manual_seed(seed)
            draws = torch.multinomial(log_probs.exp(), k, replacement=True, generator=generator)
            counts = torch.zeros_like(log_probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=log_probs.dtype))
            top = counts.topk(min(k, counts.shape[-1]), dim=-1)  # the ids drawn first, then unused slots (count 0)
            found["weights"].append((top.values / k).cpu())
            chosen = log_probs.gather(-1, top.indices)
        else:
            top = log_probs.topk(k, dim=-1)
            chosen = top.values
        found["indices"].append(top.indices.to(torch.int32).cpu())
        found["log_probs"].append(chosen.cpu())
    return {name: torch.stack(tensors) for name, tensors in found.items()}


def _write_part(folder: Path, split: str, rank: int, part: int, parts: list[dict[str, torch.Tensor]]) -> None:
    tensors = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
    save_tensors(tensors, folder / f"{split}-r{rank}-p{part}.safetensors")


@dataclass
class CacheMeta:
    """`teacher_cache.json` as `write_teacher_cache` writes it (checked when read back; a cache written
    before sampled targets holds top-k ones)."""

    top_k: int
    vocab_size: int
    temperature: float
    seq_len: int
    sequences: dict[str, int]
    complete: bool = False
    targets: str = "top-k"
    seed: int = 0


class TeacherCache:
    """Reads a cache written by `write_teacher_cache`, as untrusted input: its metadata's types, and each
    part's tensors (names, shapes) before the run reads them."""

    def __init__(self, folder: Path, top_k: int, temperature: float, targets: str = "top-k", seed: int = 0) -> None:
        folder = Path(folder)
        if not self.is_complete(folder):
            raise CompressorError(f"{folder} is not a complete teacher cache: rerun with --cache-teacher")
        meta = _read_meta(folder)
        written = {"targets": meta.targets, "temperature": meta.temperature}
        if meta.targets == "sampled":  # fewer slots than drawn are not a sample of fewer draws
            written.update(top_k=meta.top_k, seed=meta.seed)
        asked = {"targets": targets, "temperature": temperature, "top_k": top_k, "seed": seed}
        for name, value in written.items():
            if value != asked[name]:
                raise CompressorError(
                    f"the teacher cache in {folder} was written with {name} {value}, the run uses {asked[name]}: "
                    "delete the cache to rebuild it"
                )
        if meta.top_k < min(top_k, meta.vocab_size):
            raise CompressorError(
                f"the teacher cache in {folder} holds top-{meta.top_k}, fewer than --top-k {top_k}: "
                "delete it to rebuild"
            )
        self.top_k, self.targets = top_k, targets
        self.written = False  # set by whoever wrote it just now (a run reports the time it took)
        self.files: dict[str, list] = {}
        self.where: dict[str, dict[int, tuple[int, int]]] = {}
        self._open = contextlib.ExitStack()  # the parts stay open (memory-mapped) for the run
        for path in sorted(folder.glob("*-r*-p*.safetensors")):
            split = path.name.split("-r")[0]
            handle = self._open.enter_context(open_tensors(path, "a teacher cache part"))
            _check_part(path, handle, meta)
            files = self.files.setdefault(split, [])
            where = self.where.setdefault(split, {})
            for row, position in enumerate(handle.get_tensor("sequence").tolist()):
                where[position] = (len(files), row)
            files.append(handle)
        for split, count in meta.sequences.items():
            if len(self.where.get(split, {})) != count:
                raise CompressorError(f"the teacher cache in {folder} is incomplete for {split}: delete it to rebuild")

    @staticmethod
    def is_complete(folder: Path) -> bool:
        """Whether `folder` holds a complete cache (a damaged one is not: it is written again)."""
        if not (Path(folder) / META).exists():
            return False
        try:
            return _read_meta(Path(folder)).complete
        except CompressorError:
            return False

    def get(self, split: str, positions: np.ndarray, device: torch.device) -> CachedTeacher:
        """The cached targets of the sequences at `positions` of `split`, flattened to (tokens, k)."""
        names = ("indices", "log_probs", "weights") if self.targets == "sampled" else ("indices", "log_probs")
        read: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for position in positions.tolist():
            file, row = self.where[split][position]
            handle = self.files[split][file]
            for name in names:
                read[name].append(handle.get_slice(name)[row : row + 1, :, : self.top_k])
        found = {name: torch.cat(tensors).flatten(0, 1).to(device) for name, tensors in read.items()}
        found["indices"] = found["indices"].long()
        return TeacherSample(**found) if self.targets == "sampled" else TeacherTopK(**found)


def _read_meta(folder: Path) -> CacheMeta:
    raw = read_json(folder / META, "a teacher cache's metadata")
    check_record(CacheMeta, raw, str(folder / META))
    return CacheMeta(**{k: v for k, v in raw.items() if k in CacheMeta.__dataclass_fields__})


def _check_part(path: Path, handle, meta: CacheMeta) -> None:
    """A part holds `sequence` (s,), `indices` and `log_probs` (and for sampled targets `weights`)
    (s, seq_len, top_k), as written."""
    per_token_names = ("indices", "log_probs", "weights") if meta.targets == "sampled" else ("indices", "log_probs")
    names = ("sequence", *per_token_names)
    if set(handle.keys()) != set(names):  # noqa: SIM118 (safe_open is not a dict)
        raise CompressorError(f"{path} is not a part of a teacher cache: delete the cache to rebuild it")
    shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    rows = shapes["sequence"][0] if len(shapes["sequence"]) == 1 else -1
    per_token = (rows, meta.seq_len, min(meta.top_k, meta.vocab_size))  # k draws fill at most vocab slots
    if shapes != {"sequence": (rows,), **dict.fromkeys(per_token_names, per_token)}:
        raise CompressorError(
            f"{path} is not a part of this teacher cache (shapes {shapes}): delete the cache to rebuild it"
        )
