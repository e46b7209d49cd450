"""NVFP4 on CUDA: post-training quantization (PTQ) and a short quantization-aware distillation (QAD) of the
example's distilled model, and the share of the KL increase that QAD recovers.

    python benchmarks/gpu/qad.py --data DIR --work WORK [--student MODEL] [--tokens 40k]

DIR holds sample-256.npy and valid-256.npy (benchmarks/gpu/tokenize_data.py). The distilled model is the
README's Commands' one, made here unless `--student` names it: `compress prune examples/model --target-mem
20MiB --ctx 4k ...`, then `compress distill` of 40k tokens. Then, at once (all three only read it):
- PTQ: `compress quantize DISTILLED --format nvfp4` (16 calibration sequences);
- QAD: `compress distill examples/model DISTILLED --quantize nvfp4` for `--tokens`, exported to qad/quantized;
- control: the same distillation without --quantize. QAD also trains, so the quantization's cost after it
  is its distance to the control: the share recovered is 1 - (KL(QAD) - KL(control)) / (KL(PTQ) - KL(distilled)).
Last, `compress eval` of the four against examples/model on the held-out plays (128 x 256 tokens, fp32, the
quantized ones as deployed: weights dequantized, activations fake-quantized). Prints their table and a
one-line summary; the commands' output goes to WORK/*.log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHER = "examples/model"
SEQ = ["--seq-len", "256"]


def compress(args: list[str], log: Path, *, wait: bool = True, stdout: Path | None = None) -> subprocess.Popen:
    """`compress ARGS` from the repository root, its output in `log` (its stdout in `stdout` if given);
    waited for unless `wait` is False."""
    print("compress " + " ".join(args), flush=True)
    command = [sys.executable, "cli.py", *args]
    with open(log, "w") as errors:
        if stdout is None:
            process = subprocess.Popen(command, cwd=ROOT, stdout=errors, stderr=subprocess.STDOUT)
        else:
            with open(stdout, "w") as out:
                process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=errors)
    if wait:
        finish(process, log)
    return process


def finish(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        print("\n".join(tail))
        raise SystemExit(f"{log.stem} failed (exit {process.returncode}); see {log}")


def student_commands(work: Path, sample: str) -> dict[str, list[str]]:
    """The README Commands' distilled model: the Minitron prune to 20 MiB at 4k, then 40k tokens of
    distillation (into WORK/distilled/model)."""
    return {
        "prune": ["prune", TEACHER, "--target-mem", "20MiB", "--ctx", "4k",
                  "--axes", "hidden,ffn,mamba_heads,mamba_head_dim,depth", "--data", sample, "--samples", "64",
                  "--score-samples", "16", *SEQ, "--batch-size", "8", "--out", str(work / "pruned"), "--overwrite"],
        "distill": ["distill", TEACHER, str(work / "pruned"), "--data", sample, "--tokens", "40k", *SEQ,
                    "--batch-size", "8", "--eval-sequences", "8", "--out", str(work / "distilled"), "--overwrite"],
    }  # fmt: skip


def run_commands(student: Path, work: Path, sample: str, tokens: str) -> dict[str, list[str]]:
    """The three runs from `student`, each into WORK/name: NVFP4 PTQ, QAD and the unquantized control."""
    train = ["--data", sample, "--tokens", tokens, *SEQ, "--batch-size", "8", "--eval-sequences", "8"]
    ptq = ["--format", "nvfp4", "--data", sample, "--samples", "16", *SEQ]
    qad = ["--quantize", "nvfp4", "--calib-sequences", "16", *train]
    runs = {
        "ptq": ["quantize", str(student), *ptq],
        "qad": ["distill", TEACHER, str(student), *qad],
        "control": ["distill", TEACHER, str(student), *train],
    }
    return {name: [*command, "--out", str(work / name), "--overwrite"] for name, command in runs.items()}


def eval_command(models: list[Path], valid: str) -> list[str]:
    """`compress eval` of `models` against the teacher on the held-out plays, in fp32, as JSON."""
    return ["eval", *map(str, models), "--teacher", TEACHER, "--data", valid, *SEQ, "--max-sequences", "128",
            "--dtype", "float32", "--json"]  # fmt: skip


def summary(kl: dict[str, float], tokens: str) -> str:
    """The KL increase PTQ causes and the share of it QAD recovers. QAD trains as well as it adapts to the
    quantization, so its cost is measured against the same distillation unquantized (the control): the
    share recovered is 1 - (KL(QAD) - KL(control)) / (KL(PTQ) - KL(distilled))."""
    increase = kl["ptq"] - kl["distilled"]
    remaining = kl["qad"] - kl["control"]
    recovered = f"{1 - remaining / increase:.0%}" if increase > 0 else "n/a (PTQ raised nothing)"
    return (
        f"NVFP4 PTQ: KL to the teacher {kl['distilled']:.4f} -> {kl['ptq']:.4f} (+{increase:.4f}); after QAD "
        f"of {tokens} tokens {kl['qad']:.4f}, {remaining:+.4f} from the same distillation unquantized "
        f"({kl['control']:.4f}): {recovered} of the increase recovered"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of sample-256.npy and valid-256.npy")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--student", type=Path, help="the distilled model (default: made here)")
    parser.add_argument("--tokens", default="40k", help="QAD (and control) token budget")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sample, valid = str(args.data.resolve() / "sample-256.npy"), str(args.data.resolve() / "valid-256.npy")
    student = args.student.resolve() if args.student else None
    if student is None:
        for name, command in student_commands(work, sample).items():
            compress(command, work / f"{name}.log")
        student = work / "distilled" / "model"
    runs = run_commands(student, work, sample, args.tokens)
    processes = {name: compress(command, work / f"{name}.log", wait=False) for name, command in runs.items()}
    for process in processes.values():  # all three end before any failure is reported: none is left running
        process.wait()
    for name, process in processes.items():
        finish(process, work / f"{name}.log")
    models = {"distilled": student, "ptq": work / "ptq", "qad": work / "qad" / "quantized",
              "control": work / "control" / "model"}  # fmt: skip
    compress(eval_command(list(models.values()), valid), work / "eval.log", stdout=work / "eval.json")
    rows = json.loads((work / "eval.json").read_text())
    print("\n| model | weights | loss | perplexity | KL to teacher | top-1 agreement |\n|---|---|---:|---:|---:|---:|")
    kl = {}
    for (name, _), row in zip(models.items(), rows, strict=True):
        kl[name] = row["kl"]
        print(f"| {name} | {row['format']} | {row['loss']:.4f} | {row['perplexity']:.2f} | {row['kl']:.4f} "
              f"| {row['top1_agreement']:.1%} |")  # fmt: skip
    print(summary(kl, args.tokens))


if __name__ == "__main__":
    main()
