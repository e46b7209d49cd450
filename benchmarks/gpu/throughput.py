"""Engine throughput and peak memory on CUDA: compressor's kernel path against its torch path, bf16, at 4k
and 32k tokens, forward and forward + backward.

    python benchmarks/gpu/throughput.py [--tokens 4096,32768] [--repeats 3] [--table FILE]

The model has Nemotron-H 4B's widths (hidden 3072, 112 Mamba heads x 64, state 128, chunk 128, 32 attention
heads) in 9 blocks (`M-M*-M-M-`) with a 32k vocabulary, so the Mamba mixers rather than the output head
set the pace. Each path runs in its own process (the torch path with COMPRESSOR_DISABLE_KERNELS=1) over
every case: one warm-up pass (it compiles and autotunes the Triton kernels), one pass whose peak memory is
read (the rise of the allocator's peak over what was allocated before it: activations and workspace), then
`--repeats` timed passes (tokens/s of the median). A pass that runs out of memory is shown as OOM.
Prints a markdown table and, last, a one-line summary of the ratios (kernels / torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = dict(hybrid_override_pattern="M-M*-M-M-", vocab_size=32768)  # on the nemotron-h-4b preset
PATHS = ("kernels", "torch")
PASSES = ("forward", "fwd+bwd")


def one_pass(model, ids, train: bool) -> None:
    import torch

    if train:
        model.zero_grad(set_to_none=True)
        model(ids).float().logsumexp(-1).mean().backward()
    else:
        with torch.inference_mode():
            model(ids)
    torch.cuda.synchronize()


def measure_case(model, ids, train: bool, repeats: int) -> dict:
    """tokens/s of the median timed pass and the peak MiB of one pass, after a warm-up; OOM noted."""
    import torch

    case = {"tokens": ids.numel(), "pass": PASSES[train], "tok_s": None, "peak_mib": None}
    model.train(train)
    try:
        one_pass(model, ids, train)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_pass(model, ids, train)
        case["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            one_pass(model, ids, train)
            times.append(time.perf_counter() - start)
        case["tok_s"] = ids.numel() / statistics.median(times)
    except torch.cuda.OutOfMemoryError:
        case["oom"] = True
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return case


def measure(tokens: list[int], repeats: int) -> dict:
    """In the child process: {"fast_ops": [...], "cases": [{tokens, pass, tok_s, peak_mib} ...]}."""
    import torch

    from compressor import kernels
    from compressor.model import HybridLM
    from compressor.presets import get_preset

    torch.manual_seed(0)
    config = get_preset("4b").replace(**MODEL)
    fast = kernels.backend(torch.device("cuda"), torch.bfloat16, config.conv_kernel).fast_ops()
    with torch.device("cuda"):
        model = HybridLM(config).to(torch.bfloat16)
    cases = []
    for count in tokens:
        ids = torch.randint(0, config.vocab_size, (1, count), device="cuda")
        cases += [measure_case(model, ids, train, repeats) for train in (False, True)]
    return {"fast_ops": fast, "cases": cases}


def run_path(path: str, tokens: list[int], repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("COMPRESSOR_DISABLE_KERNELS", None)
    if path == "torch":
        env["COMPRESSOR_DISABLE_KERNELS"] = "1"
    command = [sys.executable, __file__, "--child", "--tokens", ",".join(map(str, tokens)), "--repeats", str(repeats)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"the {path} path failed (exit {out.returncode}); its error is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell(value: float | None, case: dict, form: str) -> str:
    return "OOM" if case.get("oom") else form.format(value)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,32768", help="sequence lengths (batch 1), comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.child:
        print(json.dumps(measure(tokens, args.repeats)))
        return
    results = {path: run_path(path, tokens, args.repeats) for path in PATHS}
    fast = results["kernels"]["fast_ops"]
    lines = [
        f"kernel path: {', '.join(fast) or 'no kernel ops'}; model: nemotron-h-4b widths, {MODEL}, bf16, batch 1",
        "",
        "| tokens | pass | kernels tok/s | torch tok/s | speed | kernels peak MiB | torch peak MiB | memory |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for fast_case, slow_case in zip(results["kernels"]["cases"], results["torch"]["cases"], strict=True):
        speed = ratio(fast_case["tok_s"], slow_case["tok_s"])
        memory = ratio(fast_case["peak_mib"], slow_case["peak_mib"])
        lines.append(
            f"| {fast_case['tokens']:,} | {fast_case['pass']} | {cell(fast_case['tok_s'], fast_case, '{:,.0f}')} "
            f"| {cell(slow_case['tok_s'], slow_case, '{:,.0f}')} | {speed} "
            f"| {cell(fast_case['peak_mib'], fast_case, '{:,.0f}')} "
            f"| {cell(slow_case['peak_mib'], slow_case, '{:,.0f}')} | {memory} |"
        )
        oom = [path for path, case in zip(PATHS, (fast_case, slow_case), strict=True) if case.get("oom")]
        what = f"OOM ({'/'.join(oom)})" if oom else f"{speed} speed, {memory} memory"
        summary.append(f"{fast_case['tokens'] // 1024}k {fast_case['pass']} {what}")
    table = "\n".join(lines)
    print(table)
    if args.table:
        args.table.write_text(table + "\n")
    ops = f"{len(fast)} kernel ops" if fast else "NO kernel ops"
    print(f"kernels vs torch ({ops}): " + "; ".join(summary))
    sys.exit(0 if fast else 1)


if __name__ == "__main__":
    main()
