"""The distillation loss through the output head, forward + backward: compressor's chunked loss against
Liger's fused one and against full logits, in time and peak memory, with their values and gradients compared.

    python benchmarks/gpu/kd_loss.py [--tokens 8192] [--vocab 131072] [--hidden 3072] [--teacher-hidden 4096]
                                     [--device cuda] [--repeats 3]

All three compute forward KL(teacher || student) per token, averaged over the tokens, from bf16 final hidden
states and bf16 head weights (the default sizes: Nemotron-H 4B's hidden size for the student, 8B's for the
teacher, Nemotron-H's vocabulary):
- chunked: `compressor.losses.head_loss` (fp32 logits a chunk of rows at a time, gradients formed in the
  forward pass);
- Liger: `LigerFusedLinearJSD` with jsd_beta 0 (forward KL; Triton, CUDA only);
- full logits: both logit matrices in fp32 and `F.kl_div`, the memory the other two avoid.
Peak memory is the rise of the allocator's peak over what the inputs and weights hold (CUDA only). Prints a
markdown table and, last, a one-line summary; exits 1 when a loss or gradient disagrees with the full-logits
reference or an implementation fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compressor.losses import LossSpec, TeacherLogits, head_loss  # noqa: E402

LOSS_TOLERANCE = 1e-3  # relative: all three form fp32 logits from the same bf16 values
GRAD_TOLERANCE = 2e-2  # relative in norm: the gradients are rounded to bf16


def chunked(student, weight, teacher, teacher_weight) -> torch.Tensor:
    return head_loss(student, weight, LossSpec(), teacher=TeacherLogits(teacher, teacher_weight)) / len(student)


def full_logits(student, weight, teacher, teacher_weight) -> torch.Tensor:
    student_logp = F.log_softmax(student.float() @ weight.float().T, dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher.float() @ teacher_weight.float().T, dim=-1)
    return F.kl_div(student_logp, teacher_logp, reduction="sum", log_target=True) / len(student)


def liger() -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    fused = LigerFusedLinearJSD(jsd_beta=0.0)  # beta 0: forward KL(teacher || student), mean over tokens
    return lambda student, weight, teacher, teacher_weight: fused(student, weight, teacher, teacher_weight, None)


def run(loss_fn, inputs, device: torch.device, repeats: int) -> dict:
    """The loss, the student hidden states' gradient, the median seconds of a forward + backward, peak MiB."""
    student, weight, teacher, teacher_weight = inputs

    def one_pass():
        student.grad = weight.grad = None
        loss = loss_fn(student, weight, teacher, teacher_weight)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach().float().item()

    loss = one_pass()  # warm-up: Triton compiles here
    peak = None
    if device.type == "cuda":
        student.grad = weight.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_pass()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return {"loss": loss, "grad": student.grad.float().clone(), "seconds": statistics.median(times), "peak": peak}


def relative(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--teacher-hidden", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(torch.bfloat16)

    weight = normal(args.vocab, args.hidden, scale=args.hidden**-0.5).requires_grad_()
    inputs = (
        normal(args.tokens, args.hidden).requires_grad_(),
        weight,
        normal(args.tokens, args.teacher_hidden),
        normal(args.vocab, args.teacher_hidden, scale=args.teacher_hidden**-0.5),
    )
    implementations: dict[str, Callable | str] = {"full logits (torch, fp32)": full_logits}
    implementations["chunked (compressor.losses)"] = chunked
    if device.type != "cuda":
        implementations["Liger LigerFusedLinearJSD"] = "needs CUDA"
    else:
        try:
            implementations["Liger LigerFusedLinearJSD"] = liger()
        except Exception as error:
            implementations["Liger LigerFusedLinearJSD"] = f"not importable ({type(error).__name__}: {error})"
    results: dict[str, dict | str] = {}
    for name, loss_fn in implementations.items():
        if isinstance(loss_fn, str):
            results[name] = loss_fn
            continue
        try:
            results[name] = run(loss_fn, inputs, device, args.repeats)
        except Exception as error:
            results[name] = f"failed ({type(error).__name__}: {error})"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    reference = results["full logits (torch, fp32)"]
    print(f"{args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden} (teacher {args.teacher_hidden}), bf16, "
          f"forward + backward on {device}")  # fmt: skip
    print("\n| implementation | seconds | peak MiB | KL | loss vs full | grad vs full |")
    print("|---|---:|---:|---:|---:|---:|")
    summary, failed = [], isinstance(reference, str)
    for name, result in results.items():
        short = name.split(" (")[0].split(" ")[0]
        if isinstance(result, str):
            print(f"| {name} | {result} | | | | |")
            summary.append(f"{short}: {result}")
            failed |= result != "needs CUDA"
            continue
        peak = f"{result['peak']:,.0f}" if result["peak"] is not None else "-"
        loss_diff = grad_diff = "-"
        if not isinstance(reference, str) and result is not reference:
            loss_error = relative(result["loss"], reference["loss"])
            grad_error = relative(result["grad"], reference["grad"])
            loss_diff, grad_diff = f"{loss_error:.1e}", f"{grad_error:.1e}"
            failed |= loss_error > LOSS_TOLERANCE or grad_error > GRAD_TOLERANCE
        print(f"| {name} | {result['seconds']:.4f} | {peak} | {result['loss']:.5f} | {loss_diff} | {grad_diff} |")
        memory = f" / {result['peak'] / 1024:.2f} GiB" if result["peak"] is not None else ""
        summary.append(f"{short} {1000 * result['seconds']:.0f} ms{memory}")
    agreement = "DISAGREE or failed" if failed else "values and gradients agree"
    print(f"{args.tokens} tokens x vocab {args.vocab}, fwd+bwd: " + ", ".join(summary) + f"; {agreement}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
