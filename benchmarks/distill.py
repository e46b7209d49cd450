"""Distillation costs: memory of the chunked loss vs the naive one, and the overhead of a distillation step.

1. Loss memory (vocab 131072): forward KL(teacher || student) over `--tokens` positions and its backward,
   naive (full fp32 logits of both models) vs `compressor.losses.head_loss` at several chunk sizes. Each
   runs in a fresh process; peak memory is the rise of the peak RSS during the loss and its backward
   (Linux /proc/self/clear_refs), with glibc returning freed memory at once (MALLOC_MMAP_THRESHOLD_).
2. Step overhead: one distillation step (teacher forward + student forward/backward through the KD loss)
   against the teacher forward and the student's forward/backward on a plain LM loss, timed separately.

    python benchmarks/distill.py            # the tables in docs/distillation.md
    python benchmarks/distill.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def loss_memory(mode: str, tokens: int, hidden: int, vocab: int, chunk: int) -> tuple[float, float]:
    """Runs in a subprocess: (peak MiB above the inputs, seconds) of one loss forward + backward."""
    import torch
    import torch.nn.functional as F

    from compressor.losses import LossSpec, TeacherLogits, head_loss

    torch.manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, requires_grad=True)
    student_weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden)
    teacher_weight = torch.randn(vocab, hidden) * 0.02
    # the gradient buffers of the inputs exist in both modes: allocate them before measuring
    student_hidden.grad = torch.zeros_like(student_hidden)
    student_weight.grad = torch.zeros_like(student_weight)
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if mode == "naive":
        student_logp = F.log_softmax(student_hidden @ student_weight.T, dim=-1)
        teacher_logp = F.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
        loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") / tokens
    else:
        teacher = TeacherLogits(teacher_hidden, teacher_weight)
        loss = head_loss(student_hidden, student_weight, LossSpec(chunk_tokens=chunk), teacher=teacher) / tokens
    loss.backward()
    seconds = time.perf_counter() - start
    return (_rss_kib("VmHWM") - base) / 1024, seconds


def _subprocess(mode: str, tokens: int, hidden: int, vocab: int, chunk: int) -> tuple[float, float]:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.distill import loss_memory; "
        f"print(*loss_memory({mode!r}, {tokens}, {hidden}, {vocab}, {chunk}))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    peak, seconds = out.stdout.split()
    return float(peak), float(seconds)


def step_overhead(teacher_path: str, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    """Median seconds of: teacher forward, student forward/backward (LM loss), a full distillation step."""
    import torch

    from compressor.checkpoint import load_model
    from compressor.evaluate import teacher_targets
    from compressor.losses import LossSpec, head_loss, next_token_labels
    from compressor.model import HybridLM

    teacher = load_model(teacher_path, dtype="float32").requires_grad_(False)
    config = teacher.config.replace(hidden_size=teacher.config.hidden_size // 2)
    torch.manual_seed(0)
    student = HybridLM(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    labels = next_token_labels(ids)
    spec = LossSpec()

    def teacher_forward():
        teacher_targets(teacher, ids)

    def student_lm_step():
        student.zero_grad(set_to_none=True)
        student(ids, head=lambda h, w: head_loss(h.flatten(0, 1), w, spec, labels=labels)).backward()

    def distill_step():
        student.zero_grad(set_to_none=True)
        target = teacher_targets(teacher, ids)
        student(ids, head=lambda h, w: head_loss(h.flatten(0, 1), w, spec, labels=labels, teacher=target)).backward()

    times = {}
    for name, fn in (
        ("teacher forward", teacher_forward),
        ("student fwd+bwd", student_lm_step),
        ("distill step", distill_step),
    ):
        fn()  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--teacher", default=str(ROOT / "examples" / "model"))
    args = parser.parse_args()
    import torch

    from compressor.losses import LossSpec

    tokens, hidden, vocab = (512, 256, 131072) if args.quick else (2048, 512, 131072)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32")
    print(f"\nloss + backward over {tokens} tokens, hidden {hidden}, vocab {vocab:,}")
    print("| loss | peak MiB | vs naive | seconds |")
    print("|---|---:|---:|---:|")
    naive_peak, naive_time = _subprocess("naive", tokens, hidden, vocab, 0)
    print(f"| naive (full logits) | {naive_peak:,.0f} | 100% | {naive_time:.2f} |", flush=True)
    default = LossSpec().rows_per_chunk(vocab)
    for chunk in (1024, default) if not args.quick else (default,):
        peak, seconds = _subprocess("chunked", tokens, hidden, vocab, chunk)
        label = f"chunked, {chunk} tokens" + (" (default)" if chunk == default else "")
        print(f"| {label} | {peak:,.0f} | {100 * peak / naive_peak:.0f}% | {seconds:.2f} |", flush=True)

    batch, seq_len = (2, 64) if args.quick else (8, 256)
    times = step_overhead(args.teacher, batch, seq_len, repeats=3 if args.quick else 5)
    separate = times["teacher forward"] + times["student fwd+bwd"]
    print(f"\none step, {batch} x {seq_len} tokens, teacher {args.teacher}, student at half its width")
    print("| measured | seconds |")
    print("|---|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"| teacher forward + student fwd+bwd | {separate:.3f} |")
    print(f"\ndistillation overhead: {100 * (times['distill step'] / separate - 1):+.1f}%")


if __name__ == "__main__":
    main()
