"""Nemotron Nano 2 (9B-v2) against Qwen3-8B: the roofline estimate beside the paper's throughput claim.

The report (NVIDIA, "NVIDIA Nemotron Nano 2: An Accurate and Efficient Hybrid Mamba-Transformer Reasoning
Model", arXiv 2508.14444, abstract): "Compared to existing similarly-sized models (e.g., Qwen3-8B), we show
that Nemotron-Nano-9B-v2 achieves on-par or better accuracy on reasoning benchmarks while achieving up to 6x
higher inference throughput in reasoning settings like 8k input and 16k output tokens." (Summaries of its
Figure 1 quote "up to 6.3x".) Here: `compressor.baselines.compare` on the 9b-v2 preset and Qwen3-8B's
config.json, bf16 weights and KV cache, 8k (8,192) input and 16k (16,384) output tokens, at batch 1 and at
the largest batch each model fits in the GPU's memory. No model is built: this is arithmetic, it runs in
well under a second on a CPU.

    python benchmarks/baselines.py                          # docs/budgets.md's table (H100 SXM, A10G)
    python benchmarks/baselines.py --baseline llama-3.1-8b  # another baseline (a name or a config.json)
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import baselines  # noqa: E402
from compressor.budget import (  # noqa: E402
    GIB,
    Workload,
    estimate_memory,
    get_gpu,
    kv_bytes_per_token,
    num_parameters,
    ssm_state_bytes,
)
from compressor.presets import get_preset  # noqa: E402

GPUS = ("h100-sxm", "a10g")
PAPER = "up to 6x (8k in / 16k out)"

NOTES = (
    "What the roofline captures: each decoding step reads every weight once for the whole batch ({hybrid_w:.2f} "
    "GiB for 9B-v2, {baseline_w:.2f} GiB for {baseline}), plus each sequence's KV cache ({baseline_kv:,} bytes "
    "a token for {baseline}, {hybrid_kv:,} for 9B-v2's 4 attention blocks) and 9B-v2's fixed SSM state "
    "({ssm:.2f} GiB a sequence); the largest batch is the one whose weights, caches and prefill allowance fit "
    "the GPU's memory. At batch 1 the weights dominate and the two models run alike (9B-v2 reads more weights, "
    "{baseline} more KV cache). The ratio grows with the batch because the KV cache limits the transformer's "
    "batch: at 8k + 16k tokens one {baseline} sequence needs {baseline_seq:.2f} GiB of KV cache, one 9B-v2 "
    "sequence {hybrid_seq:.2f} GiB of cache in all, so 9B-v2 fits several times more sequences, spreads each "
    "weight read over them, and each of its sequences reads a smaller cache per step.",
    "What it does not capture: real kernels reach a fraction of the datasheet bandwidth and FLOP/s (Mamba's "
    "scan and small kernels less than large GEMMs, above all at batch 1), launch and scheduling overhead, "
    "continuous batching (sequences at different lengths, not in lockstep), paged-KV fragmentation, the "
    "engine's memory reservation (e.g. vLLM's gpu_memory_utilization) and prefill interleaved with decoding. "
    "Trust the ratios more than the absolute tokens/s; the paper's figure comes from real serving runs, not "
    "from a roofline.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="qwen3-8b", help="A published name or a config.json.")
    args = parser.parse_args()
    hybrid = get_preset("9b-v2")
    baseline = baselines.load_baseline(args.baseline)
    name = "Qwen3-8B" if args.baseline == "qwen3-8b" else args.baseline
    isl, osl = 8192, 16384

    print(
        f"9B-v2 ({num_parameters(hybrid):,} parameters) vs {name} "
        f"({baselines.num_parameters(baseline):,}), {isl:,} in / {osl:,} out, bf16, roofline at datasheet peaks\n"
    )
    print(f"| GPU | batch (9B-v2 / {name}) | 9B-v2 tokens/s | {name} tokens/s | ratio | paper |")
    print("|---|---|---:|---:|---:|---|")
    for gpu_name in GPUS:
        gpu = get_gpu(gpu_name)
        for batch in (1, "max"):
            result = baselines.compare(hybrid, baseline, Workload(isl, osl, batch), gpu)
            batches = f"{result.hybrid.batch} / {result.baseline.batch}"
            label = "1" if batch == 1 else f"max: {batches}"
            paper = PAPER if batch == "max" and name == "Qwen3-8B" else "-"
            print(
                f"| {gpu.name} | {label} | {result.hybrid.tokens_per_s:,.1f} | {result.baseline.tokens_per_s:,.1f} "
                f"| {result.speedup:.2f}x | {paper} |"
            )
    context = isl + osl
    values = dict(
        baseline=name,
        hybrid_w=estimate_memory(hybrid, context).weights / GIB,
        baseline_w=baselines.weight_bytes(baseline) / GIB,
        baseline_kv=baselines.kv_bytes_per_token(baseline),
        hybrid_kv=kv_bytes_per_token(hybrid),
        ssm=ssm_state_bytes(hybrid) / GIB,
        baseline_seq=baselines.kv_bytes_per_token(baseline) * context / GIB,
        hybrid_seq=estimate_memory(hybrid, context).cache / GIB,
    )
    for note in NOTES:
        print()
        print(textwrap.fill(note.format(**values), width=110))


if __name__ == "__main__":
    main()
