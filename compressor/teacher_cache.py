"""Offline teacher: the teacher's top-k next-token log-probs, computed once and read back during training.

`write_teacher_cache` runs the teacher over every sequence of the given splits (train, valid) and stores,
per token, its k most likely token ids (int32) and their log-probs at the run's temperature (float32:
half precision would bias small KL values by about 1%). That is 8 x k bytes a token (64 x 8 = 512 bytes
at k = 64): choose k for the disk at hand. Training then needs no teacher in memory; the loss treats the
mass outside the top k as one bucket (see `compressor.losses`).

Layout of the cache folder (written to a temporary folder and renamed into place when complete):
- `teacher_cache.json`: k, temperature, sequence length and the number of sequences per split;
- `{split}-r{rank}-p{part}.safetensors`: `sequence` (s,) int64 positions in the split, `indices`
  (s, seq_len, k) int32, `log_probs` (s, seq_len, k) float32.
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
from compressor.losses import TeacherTopK
from compressor.model import HybridLM
from compressor.outputs import check_record, open_tensors, read_json, save_tensors

META = "teacher_cache.json"
PART_SEQUENCES = 256  # sequences per file


def write_teacher_cache(
    folder: Path,
    teacher: HybridLM,
    splits: dict[str, tuple[TokenSequences, np.ndarray]],
    top_k: int,
    temperature: float,
    world: distributed.World,
    *,
    batch_size: int = 16,
) -> None:
    """Compute and store the teacher's top-k log-probs for the sequences at the given positions of each
    split ({"train": (sequences, positions), ...}): a run caches only the sequences it will train on."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    distributed.barrier(world)
    k = min(top_k, teacher.config.vocab_size)
    for name, (sequences, positions) in splits.items():
        batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        rounds = -(-len(batches) // world.size)
        parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        rows = part = 0
        for r in range(rounds):
            j = r * world.size + world.rank
            # every process runs the same number of forwards (sharded weights are gathered collectively)
            indices = batches[j] if j < len(batches) else batches[0]
            ids = sequences.take(indices).to(world.device)
            with torch.no_grad():
                log_probs, top = teacher(ids, head=lambda h, w: _top_k(h, w, k, temperature))
            if j >= len(batches):
                continue
            parts.append((indices, top.to(torch.int32).cpu(), log_probs.float().cpu()))
            rows += len(indices)
            if rows >= PART_SEQUENCES:
                _write_part(partial, name, world.rank, part, parts)
                parts, rows, part = [], 0, part + 1
        if parts:
            _write_part(partial, name, world.rank, part, parts)
    distributed.barrier(world)
    if world.is_main:
        meta = {
            "top_k": k,
            "vocab_size": teacher.config.vocab_size,
            "temperature": temperature,
            "seq_len": next(iter(splits.values()))[0].seq_len,
            "sequences": {name: len(positions) for name, (_, positions) in splits.items()},
            "complete": True,
        }
        (partial / META).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    distributed.barrier(world)


def _top_k(hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float):
    """Top-k log-probs per position, a sequence at a time so only one sequence's logits exist."""
    values, indices = [], []
    for sequence in hidden:
        log_probs = F.log_softmax((sequence.float() @ weight.float().T) / temperature, dim=-1)
        top = log_probs.topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.stack(values), torch.stack(indices)


def _write_part(folder: Path, split: str, rank: int, part: int, parts) -> None:
    save_tensors(
        {
            "sequence": torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.int64)),
            "indices": torch.cat([p[1] for p in parts]).contiguous(),
            "log_probs": torch.cat([p[2] for p in parts]).contiguous(),
        },
        folder / f"{split}-r{rank}-p{part}.safetensors",
    )


@dataclass
class CacheMeta:
    """`teacher_cache.json` as `write_teacher_cache` writes it (checked when read back)."""

    top_k: int
    vocab_size: int
    temperature: float
    seq_len: int
    sequences: dict[str, int]
    complete: bool = False


class TeacherCache:
    """Reads a cache written by `write_teacher_cache`, as untrusted input: its metadata's types, and each
    part's tensors (names, shapes) before the run reads them."""

    def __init__(self, folder: Path, top_k: int, temperature: float) -> None:
        folder = Path(folder)
        if not self.is_complete(folder):
            raise CompressorError(f"{folder} is not a complete teacher cache: rerun with --cache-teacher")
        meta = _read_meta(folder)
        if meta.temperature != temperature:
            raise CompressorError(
                f"the teacher cache in {folder} was written at temperature {meta.temperature}, "
                f"the run uses {temperature}: delete the cache to rebuild it"
            )
        if meta.top_k < min(top_k, meta.vocab_size):
            raise CompressorError(
                f"the teacher cache in {folder} holds top-{meta.top_k}, fewer than --top-k {top_k}: "
                "delete it to rebuild"
            )
        self.top_k = top_k
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

    def get(self, split: str, positions: np.ndarray, device: torch.device) -> TeacherTopK:
        """The cached targets of the sequences at `positions` of `split`, flattened to (tokens, k)."""
        indices, log_probs = [], []
        for position in positions.tolist():
            file, row = self.where[split][position]
            handle = self.files[split][file]
            indices.append(handle.get_slice("indices")[row : row + 1, :, : self.top_k])
            log_probs.append(handle.get_slice("log_probs")[row : row + 1, :, : self.top_k])
        return TeacherTopK(
            indices=torch.cat(indices).flatten(0, 1).to(device=device, dtype=torch.int64),
            log_probs=torch.cat(log_probs).flatten(0, 1).to(device=device, dtype=torch.float32),
        )


def _read_meta(folder: Path) -> CacheMeta:
    raw = read_json(folder / META, "a teacher cache's metadata")
    check_record(CacheMeta, raw, str(folder / META))
    return CacheMeta(**{k: v for k, v in raw.items() if k in CacheMeta.__dataclass_fields__})


def _check_part(path: Path, handle, meta: CacheMeta) -> None:
    """A part holds `sequence` (s,), `indices` and `log_probs` (s, seq_len, top_k), as written."""
    names = ("sequence", "indices", "log_probs")
    if set(handle.keys()) != set(names):  # noqa: SIM118 (safe_open is not a dict)
        raise CompressorError(f"{path} is not a part of a teacher cache: delete the cache to rebuild it")
    shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    rows = shapes["sequence"][0] if len(shapes["sequence"]) == 1 else -1
    per_token = (rows, meta.seq_len, meta.top_k)
    if shapes != {"sequence": (rows,), "indices": per_token, "log_probs": per_token}:
        raise CompressorError(
            f"{path} is not a part of this teacher cache (shapes {shapes}): delete the cache to rebuild it"
        )
