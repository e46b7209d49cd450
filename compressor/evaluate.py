"""Evaluation: mean next-token loss and perplexity, and how closely a model follows a teacher.

Logits are formed from the final hidden states a chunk of tokens at a time and reduced at once, so full
fp32 logits for a whole batch (tokens x vocab) never exist; sums are kept in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from compressor.errors import CompressorError, DataError
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


@torch.inference_mode()
def evaluate(
    model: HybridLM,
    batches: Iterable[torch.Tensor],
    *,
    teacher: HybridLM | None = None,
    chunk_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate `model` (and its agreement with `teacher`) on batches of token ids (batch, seq_len).

    `on_batch(tokens)` is called after each batch (progress display).
    """
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise CompressorError(
            f"teacher vocabulary ({teacher.config.vocab_size}) differs from the model's "
            f"({model.config.vocab_size}): they must share a tokenizer"
        )
    device = model.lm_head.weight.device
    sums = {"loss": 0.0, "teacher_loss": 0.0, "kl": 0.0, "agree": 0.0}
    loss_tokens = kl_tokens = 0
    for batch in batches:
        ids = batch.to(device)
        b, t = ids.shape
        hidden = model.backbone(ids).reshape(b * t, -1)
        teacher_hidden = None
        if teacher is not None:
            teacher_hidden = teacher.backbone(ids.to(teacher.lm_head.weight.device)).reshape(b * t, -1)
        # next-token labels; the last position of each sequence has none (-100 is ignored)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)
        for start in range(0, b * t, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logp = F.log_softmax(model.lm_head(hidden[rows]).float(), dim=-1)
            sums["loss"] += F.nll_loss(logp, labels[rows], reduction="sum", ignore_index=-100).item()
            if teacher_hidden is not None:
                teacher_logp = F.log_softmax(teacher.lm_head(teacher_hidden[rows]).float(), dim=-1).to(device)
                sums["teacher_loss"] += F.nll_loss(
                    teacher_logp, labels[rows], reduction="sum", ignore_index=-100
                ).item()
                sums["kl"] += F.kl_div(logp, teacher_logp, log_target=True, reduction="sum").item()
                sums["agree"] += (logp.argmax(-1) == teacher_logp.argmax(-1)).sum().item()
        loss_tokens += b * (t - 1)
        kl_tokens += b * t
        if on_batch is not None:
            on_batch(b * t)
    if loss_tokens == 0:
        raise DataError("no tokens to evaluate: the data is empty or sequences are shorter than 2 tokens")
    loss = sums["loss"] / loss_tokens
    result = EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=kl_tokens)
    if teacher is not None:
        result.teacher_loss = sums["teacher_loss"] / loss_tokens
        result.teacher_perplexity = math.exp(min(result.teacher_loss, 700.0))
        result.kl = sums["kl"] / kl_tokens
        result.top1_agreement = sums["agree"] / kl_tokens
    return result
