"""Attention transfer: distillation that also pulls the student's attention weights toward the teacher's.

Logit distillation passes on what the teacher predicts, not where its attention looks. A pruned hybrid
whose attention has lost the place to copy from (retrieval at the uniform guess) finds it again slowly,
or not at all, from next-token KL: on the example model's mix of text and phonebooks, 400k tokens bring
two pruned students from 0% to 72% and 2% at 1k by logits alone, to 89% and 43% with the transfer
(README, Long context). With `--attention-loss W` each of the student's attention
blocks adds W x KL(teacher's attention weights || student's) to the loss, the KL taken per query row and
averaged over the sampled queries, the heads and the blocks. It is the teacher-given form of the guidance
that trained the example model (examples/train_example.py), with no labels needed.

Pairs (`attention_pairs`): each student attention block is matched with the teacher block it was pruned
from, read from the student's `compression.json` (the chosen candidate's `source` indices) when that
record's source is this teacher (same fingerprint); otherwise the attention blocks pair in order when both
models have as many. Heads pair one to one: a block whose heads were pruned pairs its heads with the
teacher heads the record says were kept (`attention_heads`, `compressor.prune.kept_attention_heads`);
without that record a pair needs the same number of heads.

Memory: each map is (micro-batch, heads, queries, seq_len) in fp32, for the teacher and the student (with
its gradient), per attention block. `queries` is `--attention-queries` positions drawn per micro-batch
(all of them when the sequence is shorter), so the term grows with seq_len, not with its square
(`compressor.planning.distill_plan` counts it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from compressor.checkpoint import fingerprint
from compressor.config import ATTENTION, HybridConfig
from compressor.errors import CompressorError, OptionError
from compressor.model import HybridLM
from compressor.outputs import read_json


class Pair(NamedTuple):
    """A student attention block and the teacher block it learns from; `heads`: the teacher's query heads
    its heads pair with, in order (None: all of them)."""

    student: int
    teacher: int
    heads: tuple[int, ...] | None = None


def attention_pairs(
    student_dir: str | Path, student: HybridConfig, teacher_dir: str | Path, teacher: HybridConfig
) -> tuple[Pair, ...]:
    """A `Pair` for every attention block of the student (module docstring)."""
    student_blocks = [spec.index for spec in student.blocks if spec.kind == ATTENTION]
    teacher_blocks = [spec.index for spec in teacher.blocks if spec.kind == ATTENTION]
    if not student_blocks:
        raise OptionError("attention_loss", "needs a student with attention blocks; this one has none")
    sources, kept = _pruned_from(Path(student_dir), Path(teacher_dir))
    if sources is not None and len(sources) == student.num_blocks:
        pairs = [Pair(index, sources[index], kept.get(sources[index])) for index in student_blocks]
    elif len(student_blocks) == len(teacher_blocks):
        pairs = [Pair(s, t) for s, t in zip(student_blocks, teacher_blocks, strict=True)]
    else:
        raise OptionError(
            "attention_loss",
            f"cannot match the student's {len(student_blocks)} attention blocks with the teacher's "
            f"{len(teacher_blocks)}: the student has no compression.json from pruning this teacher",
        )
    for s, t, heads in pairs:
        s_heads, t_heads = student.blocks[s].num_attention_heads, teacher.blocks[t].num_attention_heads
        paired = len(heads) if heads is not None else t_heads
        if teacher.blocks[t].kind != ATTENTION or s_heads != paired:
            raise OptionError(
                "attention_loss",
                f"matches heads one to one: the student's block {s} has {s_heads} attention heads, the "
                f"teacher's block {t} {t_heads if teacher.blocks[t].kind == ATTENTION else 'is no attention block'}"
                " (a student with pruned heads needs the compression.json of `compress prune`, which names the "
                "heads it kept)",
            )
    return tuple(pairs)


def _pruned_from(student_dir: Path, teacher_dir: Path) -> tuple[list[int] | None, dict[int, tuple[int, ...]]]:
    """From compression.json when it records pruning this teacher: the source block of each student block,
    and the query heads kept in each attention block whose heads were pruned (source block -> heads)."""
    try:
        record = read_json(student_dir / "compression.json", "a compression record")
        if record["source"]["fingerprint"] != fingerprint(teacher_dir):
            return None, {}
        sources = [int(block["source"]) for block in record["chosen"]["target"]["blocks"]]
        kept = {int(block): tuple(int(h) for h in heads) for block, heads in record.get("attention_heads", {}).items()}
        return sources, kept
    except (CompressorError, ValueError, KeyError, TypeError, AttributeError):
        return None, {}  # no record (or not one of ours): pair in order


def sample_queries(seq_len: int, count: int, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    """`count` distinct query positions of a sequence, ascending (every position when there are fewer)."""
    if count >= seq_len:
        return torch.arange(seq_len, device=device)
    return torch.from_numpy(np.sort(rng.choice(seq_len, count, replace=False))).to(device)


@contextmanager
def recording(model: HybridLM, blocks: Sequence[int], queries: torch.Tensor) -> Iterator[Callable[[], dict]]:
    """Within the block, forwards of `model` keep the log attention weights of `queries` in the given
    attention blocks; the block gets a function returning the latest ones (block index -> (b, heads,
    queries, t)). Keep the backward inside the block: activation checkpointing recomputes them there."""
    mixers = {index: model.backbone.layers[index].mixer for index in blocks}
    for mixer in mixers.values():
        mixer.record_queries, mixer.recorded = queries, None
    try:
        yield lambda: {index: mixer.recorded for index, mixer in mixers.items()}
    finally:
        for mixer in mixers.values():
            mixer.record_queries, mixer.recorded = None, None


def attention_kl(
    teacher: dict[int, torch.Tensor], student: dict[int, torch.Tensor], pairs: Sequence[Pair]
) -> torch.Tensor:
    """Mean over pairs, heads and query rows of KL(teacher's attention weights || student's), in nats."""
    losses = []
    for s, t, heads in pairs:
        teacher_log, student_log = teacher[t], student[s]
        if heads is not None:  # the teacher's heads the student's were kept from, in the student's order
            teacher_log = teacher_log[:, list(heads)]
        visible = torch.isfinite(teacher_log)  # the causal mask is the same in both
        gap = torch.where(visible, teacher_log - student_log, 0.0)
        losses.append((teacher_log.exp() * gap).sum(-1).mean())
    return torch.stack(losses).mean()
