import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.errors import CompressorError
from compressor.losses import (
    IGNORE,
    LossSpec,
    LossStats,
    TeacherLogits,
    TeacherSample,
    TeacherTopK,
    divergence,
    head_loss,
    next_token_labels,
)

V, D, DT, N = 50, 12, 10, 23


def _tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(V, D, generator=gen) * 0.5
    t_hidden = torch.randn(N, DT, generator=gen)
    t_weight = torch.randn(V, DT, generator=gen) * 0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = IGNORE
    return hidden, weight, t_hidden, t_weight, labels


def _naive(hidden, weight, t_hidden, t_weight, labels, spec):
    """The unchunked definition, written out with full logits."""
    T = spec.temperature
    logits = hidden @ weight.T
    s = F.log_softmax(logits / T, -1)
    p = F.log_softmax(t_hidden @ t_weight.T / T, -1)
    if spec.divergence == "forward_kl":
        kd = F.kl_div(s, p, log_target=True, reduction="sum")
    elif spec.divergence == "reverse_kl":
        kd = F.kl_div(p, s, log_target=True, reduction="sum")
    else:
        b = spec.jsd_beta
        m = torch.log(b * p.exp() + (1 - b) * s.exp())
        kd = b * F.kl_div(m, p, log_target=True, reduction="sum") + (1 - b) * F.kl_div(
            m, s, log_target=True, reduction="sum"
        )
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return (1 - spec.lm_weight) * T * T * kd + spec.lm_weight * ce


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 999),
    kind=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]),
    temperature=st.sampled_from([1.0, 2.0, 0.7]),
    lm_weight=st.sampled_from([0.0, 0.3]),
    chunk=st.sampled_from([1, 5, 23, 100]),
    beta=st.sampled_from([0.5, 0.1]),
)
def test_chunked_loss_and_gradients_equal_naive(seed, kind, temperature, lm_weight, chunk, beta):
    beta = beta if kind == "jsd" else LossSpec.jsd_beta  # a beta of another divergence is refused
    spec = LossSpec(divergence=kind, temperature=temperature, lm_weight=lm_weight, chunk_tokens=chunk, jsd_beta=beta)
    hidden, weight, t_hidden, t_weight, labels = _tensors(seed)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = head_loss(h1, w1, spec, labels=labels, teacher=TeacherLogits(t_hidden, t_weight))
    (3 * loss).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = _naive(h2, w2, t_hidden, t_weight, labels, spec)
    (3 * want).backward()
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_plain_lm_loss_is_cross_entropy_and_stats_are_filled():
    hidden, weight, t_hidden, t_weight, labels = _tensors(1)
    stats = LossStats()
    loss = head_loss(hidden, weight, LossSpec(chunk_tokens=4), labels=labels, stats=stats)
    want = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, want)
    assert stats.tokens == N and stats.label_tokens == int((labels != IGNORE).sum())
    torch.testing.assert_close(torch.as_tensor(stats.cross_entropy), want)
    stats = LossStats()
    head_loss(hidden, weight, LossSpec(chunk_tokens=4), teacher=TeacherLogits(hidden, weight), stats=stats)
    assert abs(float(stats.divergence)) < 1e-5 and int(stats.agreement) == N


def test_gradient_accumulation_over_micro_batches_equals_one_batch():
    hidden, weight, t_hidden, t_weight, labels = _tensors(2)
    spec = LossSpec(chunk_tokens=6)
    w_full = weight.clone().requires_grad_()
    (head_loss(hidden, w_full, spec, labels=labels, teacher=TeacherLogits(t_hidden, t_weight)) / N).backward()
    w_acc = weight.clone().requires_grad_()
    for rows in (slice(0, 9), slice(9, N)):
        part = head_loss(
            hidden[rows], w_acc, spec, labels=labels[rows], teacher=TeacherLogits(t_hidden[rows], t_weight)
        )
        (part / N).backward()
    torch.testing.assert_close(w_acc.grad, w_full.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_with_all_tokens_equals_the_full_teacher(kind):
    hidden, weight, t_hidden, t_weight, _ = _tensors(3)
    spec = LossSpec(divergence=kind, temperature=2.0, chunk_tokens=7)
    full = head_loss(hidden, weight, spec, teacher=TeacherLogits(t_hidden, t_weight))
    logp = F.log_softmax(t_hidden @ t_weight.T / 2.0, -1)
    values, indices = logp.topk(V, dim=-1)
    cached = head_loss(hidden, weight, spec, teacher=TeacherTopK(indices, values))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_sampled_targets_give_the_full_gradient_in_expectation():
    # the loss is sum_i w_i (log p_i - log q_i); its gradient in the student's logits is T (q - w), which
    # averages to the full forward-KL gradient T (q - p) when the shares w come from draws of p
    hidden, weight, t_hidden, t_weight, _ = _tensors(5)
    T, draws = 2.0, 4000
    spec = LossSpec(temperature=T, chunk_tokens=7)
    teacher_logp = F.log_softmax(t_hidden @ t_weight.T / T, -1)
    picked = torch.multinomial(teacher_logp.exp(), draws, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(N, V).scatter_add_(1, picked, torch.ones(N, draws))
    shares, indices = counts.topk(V, dim=-1)
    sample = TeacherSample(indices, shares / draws, teacher_logp.gather(-1, indices))
    logits = (hidden @ weight.T).requires_grad_()
    got = head_loss(hidden, weight.clone().requires_grad_(), spec, teacher=sample)
    q = F.softmax(logits.detach() / T, -1)
    w = torch.zeros(N, V).scatter_(1, indices, shares / draws)
    want = (w * (teacher_logp - q.log())).sum() * T * T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    w_grad = weight.clone().requires_grad_()
    head_loss(hidden, w_grad, spec, teacher=sample).backward()
    torch.testing.assert_close(w_grad.grad, (T * (q - w)).T @ hidden, rtol=1e-4, atol=1e-5)
    w_full = weight.clone().requires_grad_()
    head_loss(hidden, w_full, spec, teacher=TeacherLogits(t_hidden, t_weight)).backward()
    torch.testing.assert_close(w_grad.grad, w_full.grad, rtol=0.1, atol=0.05)  # 4000 draws of p
    with pytest.raises(CompressorError, match="divergence must be forward_kl with sampled"):
        head_loss(hidden, weight, LossSpec(divergence="jsd"), teacher=sample)


def test_top_k_coarsens_to_k_plus_one_buckets():
    hidden, weight, t_hidden, t_weight, _ = _tensors(4)
    k = 5
    teacher_logp = F.log_softmax(t_hidden @ t_weight.T, -1)
    values, indices = teacher_logp.topk(k, dim=-1)
    stats = LossStats()
    got = head_loss(hidden, weight, LossSpec(chunk_tokens=4), teacher=TeacherTopK(indices, values), stats=stats)
    student = F.softmax(hidden @ weight.T, -1)
    q = student.gather(-1, indices)
    p = values.exp()
    want = (p * (p.log() - q.log())).sum() + ((1 - p.sum(-1)) * ((1 - p.sum(-1)).log() - (1 - q.sum(-1)).log())).sum()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    full = head_loss(hidden, weight, LossSpec(), teacher=TeacherLogits(t_hidden, t_weight))
    assert got <= full + 1e-5  # coarsening never increases the divergence
    assert int(stats.agreement) == int((student.argmax(-1) == indices[:, 0]).sum())


def test_divergences_are_zero_for_equal_distributions_and_jsd_is_bounded():
    logp = F.log_softmax(torch.randn(4, 9), -1)
    other = F.log_softmax(torch.randn(4, 9) * 3, -1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(logp, logp, kind, 0.5).abs().max() < 1e-6
        assert (divergence(logp, other, kind, 0.5) > 0).all()
    assert (divergence(logp, other, "jsd", 0.5) <= math.log(2) + 1e-6).all()


def test_next_token_labels():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert next_token_labels(ids).tolist() == [2, 3, IGNORE, 5, 6, IGNORE]


def test_matches_modelopt_logits_distillation_loss():
    mtd = pytest.importorskip("modelopt.torch.distill")
    hidden, weight, t_hidden, t_weight, _ = _tensors(5)
    ours = head_loss(hidden, weight, LossSpec(temperature=2.0), teacher=TeacherLogits(t_hidden, t_weight)) / N
    # reduction "none" gives the per-token KL x T^2 (the default "mean" also divides by the vocabulary size)
    per_token = mtd.LogitsDistillationLoss(temperature=2.0, reduction="none")(hidden @ weight.T, t_hidden @ t_weight.T)
    theirs = per_token.mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_invalid_specs():
    for fields, message in [
        ({"divergence": "kl"}, "divergence 'kl' is not one of"),
        ({"temperature": 0}, "temperature must be a positive number"),
        ({"temperature": float("nan")}, "temperature must be a positive number"),
        ({"lm_weight": 2}, "lm_weight must be in"),
        ({"jsd_beta": 1}, "jsd_beta must be strictly between"),
        ({"chunk_tokens": 0}, "chunk_tokens must be at least 1"),
    ]:
        with pytest.raises(CompressorError, match=message):
            LossSpec(**fields)
    with pytest.raises(ValueError, match="needs labels, a teacher"):
        head_loss(torch.zeros(2, 3), torch.zeros(4, 3), LossSpec())
