"""Distillation and LM losses computed chunk by chunk through the output head.

`head_loss` takes final hidden states (tokens, hidden) and the student's output-head weight, and sums a
per-token loss over all tokens while forming the logits only `chunk_tokens` rows at a time: full fp32
logits (tokens x vocab, 4 GiB for 8k tokens at vocab 131072) never exist, for the student or the teacher.
Gradients are produced chunk by chunk during the forward pass (each chunk's logits are formed, its loss
differentiated, and the logits freed) and handed to autograd as the gradient of the sum, so the result
and its gradient equal the unchunked computation.

Per-token terms, with p the teacher's and q the student's next-token distribution at temperature T:
- forward KL(p || q) (the Minitron default), reverse KL(q || p), or generalized JSD_beta:
  beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q; multiplied by T^2 so gradient
  magnitudes do not shrink with T;
- cross-entropy of the student (T = 1) on the next token, mixed in with weight `lm_weight`:
  loss = (1 - lm_weight) * divergence + lm_weight * cross-entropy.

The teacher comes as hidden states + head weight (`TeacherLogits`, exact) or cached (written at the run's
temperature, so T is already applied to the teacher side) in one of two forms:
- `TeacherTopK`, its k most likely tokens: both distributions are coarsened to k + 1 outcomes, the
  teacher's k tokens and one bucket holding all other tokens (teacher mass 1 - sum of its top-k
  probabilities, student mass 1 - sum of its probabilities on those tokens; both floored at 1e-6). The
  divergence between the coarsened distributions is exact for them, equals the full divergence when the
  teacher puts no mass outside its top k, and is a lower bound otherwise (coarsening never increases an
  f-divergence); the student's tail keeps its own shape.
- `TeacherSample`, tokens drawn from the teacher's distribution (random-sampling KD): with w_i the share of
  the draws that picked token i, sum_i w_i (log p_i - log q_i) is an unbiased estimate of forward KL(p || q)
  and its gradient T (q - w) one of the full gradient T (q - p), the tail included. Forward KL only: the
  other divergences need p on every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from compressor.errors import OptionError, check_applies

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
IGNORE = -100  # label of positions without a next token
# Smallest mass of the "all other tokens" bucket of a top-k target, on either side: sums of k float
# probabilities are only good to about 1e-7, and the floor keeps the bucket's gradient finite.
REST_FLOOR = 1e-6
# Logits per chunk when `chunk_tokens` is not set: 2^25 fp32 values (128 MiB), 256 rows at vocab 131072.
CHUNK_LOGITS = 2**25


@dataclass(frozen=True)
class LossSpec:
    """What to optimise. lm_weight 1 (or no teacher) is plain language-model training."""

    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    lm_weight: float = 0.0
    chunk_tokens: int | None = None  # None: CHUNK_LOGITS // vocab rows (128 MiB of fp32 logits a chunk)

    def __post_init__(self) -> None:
        if self.divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise OptionError("divergence", f"{self.divergence!r} is not one of forward_kl, reverse_kl, jsd")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise OptionError("temperature", f"must be a positive number, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise OptionError("jsd_beta", f"must be strictly between 0 and 1, got {self.jsd_beta}")
        check_applies(self, {"jsd_beta": ("--divergence jsd", self.divergence == "jsd")})
        if not 0 <= self.lm_weight <= 1:
            raise OptionError("lm_weight", f"must be in [0, 1], got {self.lm_weight}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise OptionError("chunk_tokens", f"must be at least 1, got {self.chunk_tokens}")

    def rows_per_chunk(self, vocab_size: int) -> int:
        return self.chunk_tokens or max(1, CHUNK_LOGITS // vocab_size)


@dataclass
class TeacherLogits:
    """An in-memory teacher: its final hidden states (tokens, hidden) and output-head weight."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def log_probs(self, rows: slice, temperature: float) -> torch.Tensor:
        logits = self.hidden[rows].float() @ self.weight.float().T
        return F.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)


@dataclass
class TeacherTopK:
    """A cached teacher: per token its k most likely token ids and their log-probs (at the run's T)."""

    indices: torch.Tensor  # (tokens, k) int64
    log_probs: torch.Tensor  # (tokens, k) float


@dataclass
class TeacherSample:
    """A cached teacher: per token the ids drawn from its distribution (at the run's T), the share of the
    draws each took (0 for unused slots) and their log-probs."""

    indices: torch.Tensor  # (tokens, slots) int64
    weights: torch.Tensor  # (tokens, slots) float, summing to 1 per token
    log_probs: torch.Tensor  # (tokens, slots) float


CachedTeacher = TeacherTopK | TeacherSample


@dataclass
class LossStats:
    """Sums over the tokens of `head_loss` calls (detached tensors, so logging costs no device sync)."""

    divergence: torch.Tensor | float = 0.0  # per-token divergences summed (without the T^2 factor)
    cross_entropy: torch.Tensor | float = 0.0  # summed over positions that have a label
    agreement: torch.Tensor | int = 0  # positions where student and teacher rank the same token first
    tokens: int = 0
    label_tokens: int = 0


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: Divergence, beta: float) -> torch.Tensor:
    """Per-row divergence between two distributions given as log-probs over the same outcomes."""
    if kind == "forward_kl":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse_kl":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    mix = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    to_teacher = (teacher_logp.exp() * (teacher_logp - mix)).sum(-1)
    to_student = (student_logp.exp() * (student_logp - mix)).sum(-1)
    return beta * to_teacher + (1 - beta) * to_student


def _with_rest(logp_topk: torch.Tensor) -> torch.Tensor:
    """Append the log of the mass outside the k outcomes, 1 - sum(exp(logp_topk)), floored at REST_FLOOR."""
    inside = torch.logsumexp(logp_topk, dim=-1, keepdim=True)
    rest = (-torch.expm1(inside)).clamp(min=REST_FLOOR)
    return torch.cat([logp_topk, rest.log()], dim=-1)


def _chunk_loss(
    logits: torch.Tensor,
    rows: slice,
    spec: LossSpec,
    labels: torch.Tensor | None,
    teacher: TeacherLogits | CachedTeacher | None,
    stats: LossStats,
) -> torch.Tensor:
    """The weighted loss summed over one chunk of rows, for autograd to differentiate; fills `stats`.
    Serves the losses `_fused_kl_ce` does not write out: reverse KL, JSD and cached teachers."""
    total = logits.new_zeros(())
    n = logits.shape[0]
    stats.tokens += n
    kd_weight = 0.0 if teacher is None else 1.0 - spec.lm_weight
    T = spec.temperature
    log_probs = None  # the student's log-probs at T = 1, shared by KD (when T = 1) and the LM loss
    if kd_weight > 0:
        student_logp = F.log_softmax(logits if T == 1 else logits / T, dim=-1)
        if T == 1:
            log_probs = student_logp
        if isinstance(teacher, TeacherLogits):
            with torch.no_grad():
                teacher_logp = teacher.log_probs(rows, T)
                teacher_top = teacher_logp.argmax(-1)
            per_token = divergence(student_logp, teacher_logp, spec.divergence, spec.jsd_beta)
            del teacher_logp
        elif isinstance(teacher, TeacherSample):
            if spec.divergence != "forward_kl":
                raise OptionError("divergence", "must be forward_kl with sampled teacher targets")
            index, teacher_logp = teacher.indices[rows], teacher.log_probs[rows].float()
            per_token = (teacher.weights[rows].float() * (teacher_logp - student_logp.gather(-1, index))).sum(-1)
            teacher_top = index.gather(-1, teacher_logp.argmax(-1, keepdim=True))[:, 0]
        else:
            index = teacher.indices[rows]
            coarse_student = _with_rest(student_logp.gather(-1, index))
            coarse_teacher = _with_rest(teacher.log_probs[rows].float())
            per_token = divergence(coarse_student, coarse_teacher, spec.divergence, spec.jsd_beta)
            teacher_top = index.gather(-1, teacher.log_probs[rows].argmax(-1, keepdim=True))[:, 0]
        kd = per_token.sum()
        total = total + kd_weight * T * T * kd
        stats.divergence += kd.detach()
        stats.agreement += (logits.argmax(-1) == teacher_top).sum()
    if labels is not None:
        chunk_labels = labels[rows]
        if log_probs is None:
            log_probs = F.log_softmax(logits, dim=-1)
        ce = F.nll_loss(log_probs, chunk_labels, ignore_index=IGNORE, reduction="sum")
        stats.cross_entropy += ce.detach()
        stats.label_tokens += n - int((chunk_labels == IGNORE).sum())
        ce_weight = 1.0 if teacher is None else spec.lm_weight
        if ce_weight > 0:
            total = total + ce_weight * ce
    return total


def _chunked(hidden, weight, spec, labels, teacher, stats, grad_hidden: bool, grad_weight: bool):
    """Sum the loss chunk by chunk; with grad_* also return d(sum)/d(hidden) and d(sum)/d(weight).

    Per chunk, the gradient with respect to the logits comes from `_fused_kl_ce` (forward KL and/or
    cross-entropy, in closed form, in place) or from autograd over logits -> loss (the other losses); the
    head's matmuls are differentiated by hand (d hidden = g W, d weight += g^T hidden) into one buffer."""
    need = grad_hidden or grad_weight
    d_hidden = torch.zeros_like(hidden) if grad_hidden else None
    d_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_weight else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    w = weight.detach().float()
    fused = teacher is None or (isinstance(teacher, TeacherLogits) and spec.divergence == "forward_kl")
    step = spec.rows_per_chunk(w.shape[0])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        chunk = hidden[rows].detach().float()
        logits = chunk @ w.T  # (rows, vocab) fp32, this chunk only
        if fused:
            loss, g = _fused_kl_ce(logits, rows, spec, labels, teacher, stats, need)
        else:
            logits.requires_grad_(need)
            with torch.enable_grad():
                loss = _chunk_loss(logits, rows, spec, labels, teacher, stats)
            g = torch.autograd.grad(loss, logits)[0] if need and loss.requires_grad else None
        del logits
        if g is not None:
            if grad_hidden:
                d_hidden[rows] = g @ w
            if grad_weight:
                d_weight.addmm_(g.T, chunk)
        total += loss.detach()
    return total, d_hidden, d_weight


def _fused_kl_ce(logits, rows, spec, labels, teacher, stats, need_grad: bool):
    """Forward KL to an in-memory teacher (x T^2) and/or cross-entropy, and d(loss)/d(logits), written out:
    d/dz [T^2 KL(p_T || q_T)] = T (q_T - p_T) and d/dz CE = q - onehot(label). In-place arithmetic keeps
    about three (rows, vocab) tensors alive at once."""
    n = logits.shape[0]
    stats.tokens += n
    T = spec.temperature
    kd_w = 0.0 if teacher is None else 1.0 - spec.lm_weight
    ce_w = 1.0 if teacher is None else spec.lm_weight
    total = logits.new_zeros(())
    student = prob = None
    if kd_w > 0:
        teacher_logp = teacher.log_probs(rows, T)
        stats.agreement += (logits.argmax(-1) == teacher_logp.argmax(-1)).sum()
        student = F.log_softmax(logits if T == 1 else logits / T, dim=-1)
        prob = teacher_logp.exp()
        kd = torch.vdot(prob.flatten(), teacher_logp.sub_(student).flatten())  # sum p (log p - log q)
        del teacher_logp
        stats.divergence += kd.detach()
        total = total + kd_w * T * T * kd
    ce_log = None  # log-probs at T = 1 for the labels
    if labels is not None:
        chunk_labels = labels[rows]
        labelled = chunk_labels != IGNORE
        index = chunk_labels.clamp(min=0)[:, None]
        ce_log = student if (student is not None and T == 1) else F.log_softmax(logits, dim=-1)
        picked = ce_log.gather(1, index)[:, 0]
        ce = -(picked * labelled).sum()
        stats.cross_entropy += ce.detach()
        stats.label_tokens += int(labelled.sum())
        if ce_w > 0:
            total = total + ce_w * ce
    if not need_grad:
        return total, None
    grad = None
    use_ce = labels is not None and ce_w > 0
    if kd_w > 0:
        shared = use_ce and ce_log is student  # T = 1: q serves both terms
        if shared:
            ignored_q = student[~labelled].exp()  # the few rows whose CE gradient must stay 0
        grad = student.exp_()  # q_T, in place of the log-probs
        if shared:
            grad.mul_(kd_w + ce_w).sub_(prob, alpha=kd_w)  # (kd_w + ce_w) q - kd_w p
            grad[~labelled] -= ce_w * ignored_q
            use_ce = False
            grad.scatter_add_(1, index, torch.where(labelled, -ce_w, 0.0)[:, None])
        else:
            grad.sub_(prob).mul_(kd_w * T)
        del prob
    if use_ce:
        ce_grad = ce_log.exp_() if ce_log is not student else ce_log.exp()
        ce_grad.scatter_add_(1, index, -torch.ones_like(index, dtype=ce_grad.dtype))
        ce_grad[~labelled] = 0
        grad = ce_grad.mul_(ce_w) if grad is None else grad.add_(ce_grad, alpha=ce_w)
    return total, grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """The chunked sum as one autograd node; its input gradients are computed during forward."""

    @staticmethod
    def forward(ctx, hidden, weight, spec, labels, teacher, stats):
        total, d_hidden, d_weight = _chunked(
            hidden, weight, spec, labels, teacher, stats, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(
            d_hidden if d_hidden is not None else hidden.new_empty(0),
            d_weight.to(weight.dtype) if d_weight is not None else weight.new_empty(0),
        )
        return total

    @staticmethod
    def backward(ctx, grad_output):
        d_hidden, d_weight = ctx.saved_tensors  # used once: scale in place rather than copy
        return (
            d_hidden.mul_(grad_output) if ctx.needs_input_grad[0] else None,
            d_weight.mul_(grad_output) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


def head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    spec: LossSpec,
    *,
    labels: torch.Tensor | None = None,
    teacher: TeacherLogits | CachedTeacher | None = None,
    stats: LossStats | None = None,
) -> torch.Tensor:
    """The summed loss over `hidden` (tokens, hidden) through the head `weight` (vocab, hidden).

    labels (tokens,) next-token ids with IGNORE where none; teacher as above. Without a teacher the loss
    is the cross-entropy (plain LM training). Divide by the token count of the whole (global) batch to
    get a mean whose gradients accumulate correctly over micro-batches and ranks.
    """
    if teacher is None and labels is None:
        raise ValueError("head_loss needs labels, a teacher, or both")
    stats = stats if stats is not None else LossStats()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedHeadLoss.apply(hidden, weight, spec, labels, teacher, stats)
    return _chunked(hidden, weight, spec, labels, teacher, stats, False, False)[0]


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) ids -> (batch * seq,) labels: each position's next token, IGNORE at the last one."""
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], IGNORE)], dim=1)
    return labels.reshape(-1)
