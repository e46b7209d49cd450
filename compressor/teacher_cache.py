"""Offline teacher: the teacher's next-token targets, computed once and read back during training.

`write_teacher_cache` runs the teacher over every sequence of the given splits (train, valid) and stores,
per token, k token ids (int32) and their log-probs at the run's temperature (float32: half precision would
bias small KL values by about 1%), in one of two forms (`TARGETS`; see `compressor.losses`):
- "sampled": k draws from the teacher's distribution; the distinct ids drawn, with the share of the draws
  each took (`weights`, float32; the slots left over hold weight 0), in k + 1 slots (at most vocab): one
  more than the draws can fill, so the teacher's most likely token is always among them (top-1 agreement
  is exact). 12 x (k + 1) bytes a token (780 at k = 64).
  The draws of a sequence depend on the seed and its place in the split only, not on its batch or process.
- "top-k": the k most likely ids; the loss treats the mass outside them as one bucket. 8 x k bytes a token.
Training then needs no teacher in memory. Choose k for the disk at hand.

Layout of the cache folder (written to a temporary folder and renamed into place when complete):
- `teacher_cache.json`: the form, k, slots a token, temperature, seed, sequence length, the sequences per
  split, the teacher's fingerprint (checked when read back, as is that the cache holds every sequence the
  run reads) and a digest of the sequences' positions (a killed write resumes only into the same);
- `{split}-r{rank}-p{part}.safetensors`: `sequence` (s,) int64 positions in the split, `indices`
  (s, seq_len, slots) int32, `log_probs` (s, seq_len, slots) float32, and for sampled targets `weights`
  (the same).
Several processes each write their share; the output folder must be on a file system they all see. A write
that is killed resumes from its last whole part (about `PART_SEQUENCES` sequences a process).
`extend_teacher_cache` adds sequences to a complete cache (a shared one a longer run reads) as parts
`{split}-e{n}-r{rank}-p{part}.safetensors`, the n-th extension's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor import distributed
from compressor.data import TokenSequences
from compressor.distributed import all_reduce_sum
from compressor.errors import CompressorError
from compressor.losses import CHUNK_LOGITS, CachedTeacher, TeacherSample, TeacherTopK
from compressor.model import HybridLM
from compressor.outputs import (
    check_apart,
    check_free_space,
    check_record,
    open_tensors,
    read_json,
    save_tensors,
    swap_in,
)

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
    teacher_id: str = "",
    data: dict[str, str] | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> None:
    """Compute and store the teacher's `targets` (k = `top_k` draws or most likely tokens) for the sequences
    at the given positions of each split ({"train": (sequences, positions), ...}): a run caches only the
    sequences it will train on. `teacher_id` (the teacher's fingerprint) and `data` (each split's sequences'
    fingerprint, computed when not given) are recorded to be checked when read.

    A write that was killed resumes: the parts already in the partial folder of a write with the same meta,
    processes and batch size are kept. `say` gets a line of progress about once a minute."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    vocab = teacher.config.vocab_size
    k = top_k if targets == "sampled" else min(top_k, vocab)
    meta = CacheMeta(
        top_k=k,
        vocab_size=vocab,
        temperature=temperature,
        seq_len=next(iter(splits.values()))[0].seq_len,
        sequences={name: len(positions) for name, (_, positions) in splits.items()},
        targets=targets,
        seed=seed,
        slots=slots_per_token(k, vocab, targets),
        teacher=teacher_id,
        positions=positions_digest({name: positions for name, (_, positions) in splits.items()}),
        data=data if data is not None else {name: sequences.fingerprint() for name, (sequences, _) in splits.items()},
    )
    layout = {"processes": world.size, "batch_size": batch_size}
    plan = {**dataclasses.asdict(meta), **layout}
    if world.is_main:
        if not _same_plan(partial, plan):
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            (partial / META).write_text(json.dumps(plan, indent=2) + "\n")
        per_token = bytes_per_token(meta.slots, targets)
        written = sum(path.stat().st_size for path in partial.glob("*.safetensors"))
        total = sum(meta.sequences.values()) * meta.seq_len * per_token
        what = f"the teacher cache ({per_token} bytes a token; a lower --top-k needs less)"
        check_free_space(partial, total - written, what)
    distributed.barrier(world)
    progress = _Progress(sum(meta.sequences.values()), meta.seq_len, say)
    per_part = -(-PART_SEQUENCES // batch_size)  # rounds a part holds (every process writes a part per group)
    for split_number, (name, (sequences, positions)) in enumerate(splits.items()):
        batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        rounds = -(-len(batches) // world.size)
        for part, first in enumerate(range(0, rounds, per_part)):
            # every process runs the same rounds (sharded weights are gathered collectively); the last ones pad
            # with the first batch and store nothing
            mine = [r * world.size + world.rank for r in range(first, min(first + per_part, rounds))]
            own = np.concatenate([batches[j] for j in mine if j < len(batches)] or [np.zeros(0, np.int64)])
            path = partial / f"{name}-r{world.rank}-p{part}.safetensors"
            done = len(own) == 0 or _holds(path, own)
            held, missing = all_reduce_sum([len(own), 0.0 if done else 1.0], world)
            if not missing:  # every process has its part of this group from an earlier write
                progress.kept(int(held))
                continue
            found = []
            for j in mine:
                indices = batches[j] if j < len(batches) else batches[0]
                ids = sequences.take(indices).to(world.device)
                # one generator seed per sequence, within the 64 bits torch takes
                seeds = [((seed * len(splits) + split_number) * 2**32 + int(p)) % 2**63 for p in indices]
                with torch.no_grad():
                    targets_of = teacher(ids, head=lambda h, w, s=seeds: _targets(h, w, k, temperature, targets, s))
                if j < len(batches):
                    found.append({"sequence": torch.from_numpy(np.asarray(indices, dtype=np.int64)), **targets_of})
            if found:
                _write_part(path, found)
            progress.made(int(held))
    distributed.barrier(world)
    if world.is_main:
        complete = {**plan, "complete": True}
        (partial / META).write_text(json.dumps(complete, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    distributed.barrier(world)


def extend_teacher_cache(
    folder: Path, positions: dict[str, np.ndarray], world: distributed.World, write: Callable[[Path], None]
) -> None:
    """Add to the complete cache in `folder` the sequences at `positions` (per split), which it lacks (a
    shared cache a longer run reads). `write(target)` writes their targets as a cache of its own in `target`
    (`write_teacher_cache` with the cache's settings: the same targets a whole write gives, since a
    sequence's draws depend on its place in the split only; resumable after a kill), beside `folder`. Then a
    copy of the cache holding its parts (hard links), the new ones (`{split}-e{n}-r{rank}-p{part}`) and the
    metadata of both takes its place (`outputs.swap_in`: a kill leaves the old cache or the new one). The
    caller holds the folder's lock; every process calls it."""
    folder = Path(folder)
    extension = folder.with_name(f".{folder.name}.extension")
    digest = positions_digest(positions)
    done = world.is_main and TeacherCache.is_complete(extension) and _read_meta(extension).positions == digest
    if not all_reduce_sum([float(done)], world)[0]:  # written whole before a kill stopped the merge: merged as it is
        write(extension)
    if world.is_main:
        _merge(folder, extension)
    distributed.barrier(world)


def _merge(folder: Path, extension: Path) -> None:
    """`folder`'s cache with `extension`'s parts, put in its place (`extend_teacher_cache`)."""
    meta = _read_meta(folder)
    generations = [int(p.name.split("-")[1][1:]) for p in folder.glob("*-e*-r*-p*.safetensors")]
    tag = f"e{max(generations, default=0) + 1}"
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # a merge killed before its swap (the lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    parts = [(path, staged / path.name) for path in sorted(folder.glob("*-r*-p*.safetensors"))]
    for path in sorted(extension.glob("*-r*-p*.safetensors")):
        split, rest = path.name.split("-", 1)
        parts.append((path, staged / f"{split}-{tag}-{rest}"))
    try:
        _link_all(parts)
    except CompressorError:  # no room for a copy: the cache stays as it was, the written extension is kept
        shutil.rmtree(staged)
        raise
    held: dict[str, list[np.ndarray]] = {}
    for path in sorted(staged.glob("*.safetensors")):
        with open_tensors(path, "a teacher cache part") as handle:
            held.setdefault(path.name.split("-")[0], []).append(handle.get_tensor("sequence").numpy())
    union = {split: np.sort(np.concatenate(parts)) for split, parts in held.items()}
    merged = dataclasses.replace(
        meta,
        sequences={split: len(positions) for split, positions in union.items()},
        positions=positions_digest(union),
        complete=True,
    )
    (staged / META).write_text(json.dumps(dataclasses.asdict(merged), indent=2) + "\n")
    swap_in(staged, folder)
    shutil.rmtree(extension, ignore_errors=True)


def _link_all(parts: list[tuple[Path, Path]]) -> None:
    """Each (source, target) of `parts`: the target a hard link of the source (no copy of a large part); on a
    file system that refuses hard links, a copy, once the disk is known to hold them all."""
    try:
        for source, target in parts:
            os.link(source, target)
    except OSError:
        left = [(source, target) for source, target in parts if not target.exists()]
        needed = sum(source.stat().st_size for source, _ in left)
        check_free_space(left[0][1], needed, "copying the teacher cache (this file system refuses hard links)")
        for source, target in left:
            shutil.copy2(source, target)


def check_cache_folder(folder: Path, inputs: tuple[str | Path | None, ...]) -> None:
    """Refuse a teacher cache folder that a write would harm: a file, a link, a folder holding anything but a
    cache (a rebuild replaces the folder), or one inside an input (inputs are never written)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CompressorError(f"--teacher-cache {folder} is not a folder: give a new folder or a teacher cache")
    if folder.is_dir() and not (folder / META).exists() and any(folder.iterdir()):
        raise CompressorError(
            f"--teacher-cache {folder} holds files that are not a teacher cache: give a new folder, or one a "
            "--cache-teacher run wrote"
        )
    for source in inputs:
        check_apart(folder, source)


def slots_per_token(k: int, vocab: int, targets: str) -> int:
    """What a token stores: for sampled targets the distinct ids of k draws (at most k) and the most likely
    token, for top-k ones the k most likely; at most the vocabulary."""
    return min(k + 1 if targets == "sampled" else k, vocab)


def per_token_names(targets: str) -> tuple[str, ...]:
    """The tensors a part holds per token."""
    return ("indices", "log_probs", "weights") if targets == "sampled" else ("indices", "log_probs")


def bytes_per_token(slots: int, targets: str) -> int:
    """What the cache stores a token: int32 ids and float32 log-probs, and float32 shares for sampled targets."""
    return (12 if targets == "sampled" else 8) * slots


def positions_digest(positions: dict[str, np.ndarray]) -> str:
    """A short hash of which sequences (positions) of which split a cache holds."""
    digest = hashlib.sha256()
    for name, held in positions.items():
        digest.update(name.encode() + b":" + np.ascontiguousarray(held, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _same_plan(partial: Path, plan: dict) -> bool:
    """Whether `partial` holds the parts of an interrupted write of this very cache (complete or not: a kill
    can come between the last metadata and the rename)."""
    try:
        return {**json.loads((partial / META).read_text()), "complete": False} == plan
    except (OSError, ValueError, TypeError):
        return False


def _holds(path: Path, positions: np.ndarray) -> bool:
    """Whether the part at `path` was written whole, for the sequences at `positions` (a killed write's
    parts are kept; `save_tensors` renames a part into place only once it is complete)."""
    if not path.is_file():
        return False
    try:
        with open_tensors(path, "a teacher cache part") as handle:
            return np.array_equal(handle.get_tensor("sequence").numpy(), positions)
    except (CompressorError, OSError, KeyError):
        return False


class _Progress:
    """Progress lines of a long teacher pass: sequences done, the rate and the time left, about a minute apart."""

    EVERY = 60.0  # seconds

    def __init__(self, total: int, seq_len: int, say: Callable[[str], None]) -> None:
        self.total, self.seq_len, self.say = total, seq_len, say
        self.done = self.computed = 0
        self.start = self.last = time.monotonic()

    def kept(self, sequences: int) -> None:
        if sequences and self.done == self.computed == 0:
            self.say("teacher cache: resuming an interrupted write")
        self.done += sequences

    def made(self, sequences: int) -> None:
        self.done += sequences
        self.computed += sequences
        now = time.monotonic()
        if now - self.last < self.EVERY or self.done >= self.total:
            return
        self.last = now
        rate = self.computed * self.seq_len / (now - self.start)
        left = (self.total - self.done) * self.seq_len / rate
        left_text = f"{left / 60:.0f} min" if left >= 60 else f"{left:.0f} s"
        self.say(
            f"teacher cache: {self.done:,} of {self.total:,} sequences, {rate:,.0f} tokens/s, about {left_text} left"
        )


def _targets(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, targets: str, seeds: list[int]
) -> dict[str, torch.Tensor]:
    """A batch's targets (module docstring) as CPU tensors (batch, seq_len, slots), formed `CHUNK_LOGITS`
    logits at a time (the training loss's bound: a long sequence never holds seq_len x vocab logits);
    sequence i draws from a generator seeded with seeds[i], chunk after chunk."""
    found: dict[str, list[torch.Tensor]] = {name: [] for name in per_token_names(targets)}
    rows = max(1, CHUNK_LOGITS // max(weight.shape[0], k))  # logits, or draws (k above the vocabulary)
    for sequence, seed in zip(hidden, seeds, strict=True):
        generator = torch.Generator(device=sequence.device).manual_seed(seed)
        for start in range(0, sequence.shape[0], rows):
            chunk = sequence[start : start + rows].float() @ weight.float().T
            log_probs = F.log_softmax(chunk / temperature, dim=-1)
            if targets == "sampled":
                draws = torch.multinomial(log_probs.exp(), k, replacement=True, generator=generator)
                counts = torch.zeros_like(log_probs).scatter_add_(
                    1, draws, torch.ones_like(draws, dtype=log_probs.dtype)
                )
                # the ids drawn first (by count), then the most likely id if it was not drawn, then unused slots
                ranked = counts.scatter_add(
                    1, log_probs.argmax(-1, keepdim=True), counts.new_full((len(counts), 1), 0.5)
                )
                top = ranked.topk(slots_per_token(k, counts.shape[-1], targets), dim=-1)
                found["weights"].append((counts.gather(-1, top.indices) / k).cpu())
                chosen = log_probs.gather(-1, top.indices)
            else:
                top = log_probs.topk(k, dim=-1)
                chosen = top.values
            found["indices"].append(top.indices.to(torch.int32).cpu())
            found["log_probs"].append(chosen.cpu())
    batch, seq_len = hidden.shape[:2]
    return {name: torch.cat(tensors).view(batch, seq_len, -1) for name, tensors in found.items()}


def _write_part(path: Path, parts: list[dict[str, torch.Tensor]]) -> None:
    tensors = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
    save_tensors(tensors, path)


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
    slots: int = 0  # per token (0: not recorded, then min(top_k, vocab_size), as written before k + 1)
    teacher: str = ""  # the teacher's fingerprint (not recorded before it was checked)
    positions: str = ""  # `positions_digest` of the sequences held (likewise)
    data: dict[str, str] = dataclasses.field(default_factory=dict)  # each split's `TokenSequences.fingerprint`


class TeacherCache:
    """Reads a cache written by `write_teacher_cache`, as untrusted input: its metadata's types, and each
    part's tensors (names, shapes) before the run reads them. It must have been written with the run's
    targets, temperature (and for sampled targets k and seed) and, where both are known, by the run's teacher
    (`teacher`, a fingerprint) for the run's splits (`data`: their fingerprints), and hold every sequence the
    run reads (`needed`: positions per split)."""

    def __init__(
        self,
        folder: Path,
        top_k: int,
        temperature: float,
        targets: str = "top-k",
        seed: int = 0,
        *,
        teacher: str = "",
        needed: dict[str, np.ndarray] | None = None,
        data: dict[str, str] | None = None,
    ) -> None:
        folder = Path(folder)
        if not self.is_complete(folder):
            raise CompressorError(f"{folder} is not a complete teacher cache: rerun with --cache-teacher")
        meta = _read_meta(folder)
        if meta.teacher and teacher and meta.teacher != teacher:
            raise CompressorError(
                f"the teacher cache in {folder} was written by another teacher (fingerprint {meta.teacher}, the "
                f"run's teacher {teacher}): delete the cache to rebuild it"
            )
        for split, fingerprint in (data or {}).items():
            if meta.data and meta.data.get(split) != fingerprint:
                raise CompressorError(
                    f"the teacher cache in {folder} was written for other {split} sequences (another --data, "
                    "--seq-len, --max-sequences, --valid-fraction or --seed): delete the cache to rebuild it"
                )
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
        self.targets = targets
        self.slots = meta.slots if targets == "sampled" else top_k  # read per token
        self.written = False  # set by whoever wrote it just now (a run reports the time it took)
        self.files: dict[str, list] = {}
        self.where: dict[str, dict[int, tuple[int, int]]] = {}
        self._open = contextlib.ExitStack()  # the parts stay open (memory-mapped) for the run
        for path in sorted(folder.glob("*-r*-p*.safetensors")):
            split = path.name.split("-")[0]  # {split}-r{rank}-p{part}, or {split}-e{n}-r... for an extension's
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
        for split, absent in self.lacking(needed or {}).items():
            if len(absent):
                raise CompressorError(
                    f"the teacher cache in {folder} lacks {len(absent):,} of the {len(needed[split]):,} {split} "
                    "sequences the run reads (it was written for other --data, --steps, --batch-size or --seed): "
                    "delete the cache to rebuild it"
                )

    @staticmethod
    def is_complete(folder: Path) -> bool:
        """Whether `folder` holds a complete cache (a damaged one is not: it is written again)."""
        if not (Path(folder) / META).exists():
            return False
        try:
            return _read_meta(Path(folder)).complete
        except CompressorError:
            return False

    def lacking(self, needed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The positions of `needed` (per split) that the cache does not hold."""
        return {
            split: np.array([p for p in positions.tolist() if p not in self.where.get(split, {})], dtype=np.int64)
            for split, positions in needed.items()
        }

    def close(self) -> None:
        """Let go of the parts (a cache opened only to see what it lacks)."""
        self._open.close()

    def get(self, split: str, positions: np.ndarray, device: torch.device) -> CachedTeacher:
        """The cached targets of the sequences at `positions` of `split`, flattened to (tokens, k)."""
        names = per_token_names(self.targets)
        read: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for position in positions.tolist():
            file, row = self.where[split][position]
            handle = self.files[split][file]
            for name in names:
                read[name].append(handle.get_slice(name)[row : row + 1, :, : self.slots])
        found = {name: torch.cat(tensors).flatten(0, 1).to(device) for name, tensors in read.items()}
        found["indices"] = found["indices"].long()
        return TeacherSample(**found) if self.targets == "sampled" else TeacherTopK(**found)


def _read_meta(folder: Path) -> CacheMeta:
    raw = read_json(folder / META, "a teacher cache's metadata")
    check_record(CacheMeta, raw, str(folder / META))
    meta = CacheMeta(**{k: v for k, v in raw.items() if k in CacheMeta.__dataclass_fields__})
    return dataclasses.replace(meta, slots=meta.slots or min(meta.top_k, meta.vocab_size))


def _check_part(path: Path, handle, meta: CacheMeta) -> None:
    """A part holds `sequence` (s,), `indices` and `log_probs` (and for sampled targets `weights`)
    (s, seq_len, slots), as written."""
    stored = per_token_names(meta.targets)
    names = ("sequence", *stored)
    if set(handle.keys()) != set(names):  # noqa: SIM118 (safe_open is not a dict)
        raise CompressorError(f"{path} is not a part of a teacher cache: delete the cache to rebuild it")
    shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    rows = shapes["sequence"][0] if len(shapes["sequence"]) == 1 else -1
    per_token = (rows, meta.seq_len, meta.slots)
    if shapes != {"sequence": (rows,), **dict.fromkeys(stored, per_token)}:
        raise CompressorError(
            f"{path} is not a part of this teacher cache (shapes {shapes}): delete the cache to rebuild it"
        )
