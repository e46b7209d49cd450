"""Evaluation: mean next-token loss and perplexity, and how closely a model follows a teacher.

Losses go through `compressor.losses.head_loss`, which forms logits a chunk of tokens at a time, so full
fp32 logits for a whole batch (tokens x vocab) never exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from compressor import distributed
from compressor.errors import CompressorError, DataError
from compressor.losses import CachedTeacher, LossSpec, LossStats, TeacherLogits, head_loss, next_token_labels
from compressor.model import HybridLM


@dataclass
class EvalResult:
    """Token-weighted means over the evaluated data.

    loss/perplexity: next-token cross-entropy of the model (positions 0..t-2 of each sequence).
    kl: KL(teacher || model) of the next-token distributions at every position, in nats.
    top1_agreement: share of positions where both models rank the same token first.
    """

    loss: float
    perplexity: float
    tokens: int
    teacher_loss: float | None = None
    teacher_perplexity: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_stats(
        cls, stats: LossStats, teacher_stats: LossStats | None = None, *, with_teacher: bool = False
    ) -> EvalResult:
        """Means from summed statistics (see `batch_stats`); `with_teacher` adds KL and agreement."""
        if stats.label_tokens == 0:
            raise DataError("no tokens to evaluate: the data is empty or sequences are shorter than 2 tokens")
        loss = float(stats.cross_entropy) / stats.label_tokens
        result = cls(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=stats.tokens)
        if teacher_stats is not None:
            result.teacher_loss = float(teacher_stats.cross_entropy) / teacher_stats.label_tokens
            result.teacher_perplexity = math.exp(min(result.teacher_loss, 700.0))
        if with_teacher or teacher_stats is not None:
            result.kl = float(stats.divergence) / stats.tokens
            result.top1_agreement = int(stats.agreement) / stats.tokens
        return result


def check_same_vocab(teacher: HybridLM, student: HybridLM) -> None:
    """Teacher and student must share a tokenizer; a vocabulary size mismatch (padding included) is refused."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise CompressorError(
            f"teacher vocabulary ({teacher.config.vocab_size}) differs from the model's "
            f"({student.config.vocab_size}): they must share a tokenizer (and the same padded vocab size)"
        )


def teacher_targets(teacher: HybridLM, ids: torch.Tensor) -> TeacherLogits:
    """The teacher's final hidden states and head weight for `ids`, without gradients."""
    with torch.no_grad():
        return teacher(ids, head=lambda hidden, weight: TeacherLogits(hidden.flatten(0, 1), weight))


def batch_stats(
    model: HybridLM,
    ids: torch.Tensor,
    stats: LossStats,
    *,
    teacher: TeacherLogits | CachedTeacher | None = None,
    chunk_tokens: int | None = None,
) -> None:
    """Add one batch's cross-entropy (and divergence/agreement to `teacher`) to `stats`, without gradients."""
    labels = next_token_labels(ids)
    spec = LossSpec(chunk_tokens=chunk_tokens)
    with torch.no_grad():
        model(
            ids,
            head=lambda hidden, weight: head_loss(
                hidden.flatten(0, 1), weight, spec, labels=labels, teacher=teacher, stats=stats
            ),
        )


def reduce_stats(stats: LossStats, world: distributed.World) -> LossStats:
    """`stats` summed over all processes (as they are on one)."""
    if not world.distributed:
        return stats
    fields = [float(stats.divergence), float(stats.cross_entropy), float(stats.agreement)]
    divergence, cross_entropy, agreement, tokens, label_tokens = distributed.all_reduce_sum(
        [*fields, stats.tokens, stats.label_tokens], world
    )
    return LossStats(divergence, cross_entropy, agreement, int(tokens), int(label_tokens))


@dataclass
class CachedBatch:
    """A batch of token ids (batch, seq_len) with the teacher's targets for it read from a teacher cache
    (`TeacherCache.get`): the model is compared with a teacher that is not in memory."""

    ids: torch.Tensor
    teacher: CachedTeacher


@torch.no_grad()
def evaluate(
    model: HybridLM,
    batches: Iterable[torch.Tensor | CachedBatch | None],
    *,
    teacher: HybridLM | None = None,
    chunk_tokens: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    world: distributed.World | None = None,
) -> EvalResult:
    """Evaluate `model` (and its agreement with `teacher`) on batches of token ids (batch, seq_len).

    The one evaluation loop: `compress eval` and training's validation both run it. A `CachedBatch` brings
    the teacher's cached targets instead of `teacher` (KL and agreement are measured, the teacher's own loss
    is not). `on_batch(tokens)` is called after each batch (progress display). Under several processes
    (models sharded across `world`), give each its share of the batches from `distributed.share` (None: a
    padding pass): the sums are reduced over all processes and every one returns the whole result. The
    model's mode (eval / train) and autocast are the caller's.
    """
    world = world or distributed.World(device=model.lm_head.weight.device)
    if teacher is not None:
        check_same_vocab(teacher, model)
    stats, teacher_stats = LossStats(), (LossStats() if teacher is not None else None)
    cached = False
    for batch in batches:
        if batch is None:
            for each in (teacher, model):
                if each is not None:
                    distributed.idle_pass(each, world)
            continue
        targets = None
        if isinstance(batch, CachedBatch):
            batch, targets, cached = batch.ids, batch.teacher, True
        ids = batch.to(world.device)
        if teacher is not None:
            targets = teacher_targets(teacher, ids)
            spec = LossSpec(chunk_tokens=chunk_tokens)
            head_loss(targets.hidden, targets.weight, spec, labels=next_token_labels(ids), stats=teacher_stats)
        batch_stats(model, ids, stats, teacher=targets, chunk_tokens=chunk_tokens)
        if on_batch is not None:
            on_batch(ids.numel())
    if teacher_stats is not None:
        teacher_stats = reduce_stats(teacher_stats, world)
    return EvalResult.from_stats(reduce_stats(stats, world), teacher_stats, with_teacher=cached)
