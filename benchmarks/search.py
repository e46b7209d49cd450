"""MiniPuzzle against Minitron on the example model: the same budget, calibration data, finalists and
distillation tokens for both; each strategy's best finalist after the short distillation is evaluated on
the held-out plays.

    python benchmarks/search.py                        # the table in docs/search.md (about 15 minutes on 2 CPU cores)
    python benchmarks/search.py --distill-tokens 100k  # shorter
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.budget import Budget, parse_context, parse_size, parse_tokens  # noqa: E402
from compressor.checkpoint import load_model  # noqa: E402
from compressor.data import load_sequences  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.pipelines.search import SearchConfig, run_search  # noqa: E402
from compressor.pipelines.source import CalibrationConfig, calibrate  # noqa: E402
from compressor.train import TrainConfig  # noqa: E402

STRATEGIES = {
    "minitron": {"axes": ("hidden", "ffn", "mamba_heads", "mamba_head_dim", "depth"), "top_k": 10},
    "minipuzzle": {"mamba_head_fractions": (1.0, 0.75, 0.5), "top_k": 12},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "model"))
    parser.add_argument("--target-mem", default="20MiB")
    parser.add_argument("--ctx", default="4k")
    parser.add_argument("--finalists", type=int, default=3)
    parser.add_argument("--distill-tokens", default="200k")
    args = parser.parse_args()
    budget = Budget(memory=parse_size(args.target_mem), context=parse_context(args.ctx))
    template = TrainConfig(
        student="", out="", data="", tokens=parse_tokens(args.distill_tokens), seq_len=256, batch_size=16,
        micro_batch_size=8, lr=1e-3, min_lr=1e-4, eval_sequences=32, eval_every=10**9, save_every=10**9,
    )  # fmt: skip
    calibration = CalibrationConfig(
        args.model, str(ROOT / "examples/data/sample.txt"), samples=64, score_samples=32, seq_len=256, batch_size=8,
        all_sequences=True,
    )  # fmt: skip
    source = calibrate(calibration)
    teacher = load_model(args.model)
    valid = load_sequences(ROOT / "examples/data/valid.txt", seq_len=256, tokenizer=args.model, max_sequences=128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in STRATEGIES.items():
            config = SearchConfig(budget, template, name, options, finalists=args.finalists)
            record = run_search(
                source, config, Path(tmp) / name, say=lambda text, n=name: print(f"[{n}] {text}", flush=True)
            )
            best = record.candidate(record.ranking[0])
            model = load_model(Path(tmp) / name / "candidates" / str(best.index) / "distill" / "model")
            result = evaluate(model, valid.batches(8, shuffle=False, drop_last=False), teacher=teacher)
            rows.append((name, best, len(record.candidates), result))
    print(f"\nbudget {budget.describe()}; {args.finalists} finalists each distilled for {template.tokens:,} tokens")
    columns = ["strategy", "best finalist", "parameters", "memory", "zero-shot KL", "KL after distillation"]
    print("\n| " + " | ".join([*columns, "held-out loss", "held-out KL"]) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, best, proposed, result in rows:
        print(
            f"| {name} ({proposed} scored) | {best.label} | {best.params:,} | {best.memory_bytes / 2**20:.2f} MiB "
            f"| {best.score:.4f} | {best.distilled.val_kl:.4f} | {result.loss:.4f} | {result.kl:.4f} |"
        )


if __name__ == "__main__":
    main()
