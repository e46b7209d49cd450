"""Distilling from a teacher cache: sampled targets against top-k ones and the teacher in memory.

The quick start's student (the example pruned to 20 MiB at 4k, as `examples/quickstart.sh` prunes it) is
distilled from the example model for `--tokens` tokens with the quick start's settings, once per row:
- online: the teacher in memory (full logits);
- top-k K: `--cache-teacher --cache-targets top-k --top-k K` (the K most likely tokens, the rest one bucket);
- sampled K: `--cache-teacher --top-k K` (K draws from the teacher's distribution, the default targets).
Each student is then evaluated on the held-out plays (examples/data/valid.txt, 128 x 256 tokens) against
the teacher. "gap closed" is the share of top-k 64's excess KL over online that a row removes; the wall time
is the distillation's (the cache rows: one teacher pass, then training without the teacher).

    python benchmarks/teacher_cache.py                      # the table in docs/distillation.md
    python benchmarks/teacher_cache.py --tokens 20k --rows online,sampled-16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPRESS = [sys.executable, str(ROOT / "cli.py")]
DATA, VALID, TEACHER = ROOT / "examples/data/sample.txt", ROOT / "examples/data/valid.txt", ROOT / "examples/model"
ROWS = {
    "online": [],
    "top-k-64": ["--cache-teacher", "--cache-targets", "top-k", "--top-k", "64"],
    "sampled-64": ["--cache-teacher", "--top-k", "64"],
    "sampled-16": ["--cache-teacher", "--top-k", "16"],
}


def compress(*args: str) -> str:
    run = subprocess.run([*COMPRESS, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"compress {' '.join(map(str, args))} failed:\n{run.stderr[-2000:]}")
    return run.stdout


def student(work: Path) -> Path:
    """The quick start's pruned model (pruned once into `work`)."""
    pruned = work / "pruned"
    if not (pruned / "config.json").is_file():
        compress("prune", TEACHER, "--out", pruned, "--target-mem", "20MiB", "--ctx", "4k", "--axes",
                 "hidden,ffn,mamba_heads,mamba_head_dim,depth", "--data", DATA, "--samples", "64",
                 "--score-samples", "32", "--seq-len", "256", "--batch-size", "8")  # fmt: skip
    return pruned


def distill(work: Path, row: str, tokens: str) -> dict:
    out, pruned = work / row, student(work)
    start = time.perf_counter()
    compress("distill", TEACHER, pruned, "--data", DATA, "--out", out, "--overwrite", "--tokens", tokens, "--seq-len",
             "256", "--batch-size", "16", "--micro-batch-size", "8", "--lr", "1e-3", "--eval-every", "100000",
             "--save-every", "100000", "--eval-sequences", "32", "--quiet", *ROWS[row])  # fmt: skip
    seconds = time.perf_counter() - start
    cache = out / "teacher_cache"
    disk = sum(f.stat().st_size for f in cache.glob("*.safetensors")) if cache.is_dir() else 0
    cached_tokens = 0
    if disk:
        meta = json.loads((cache / "teacher_cache.json").read_text())
        cached_tokens = sum(meta["sequences"].values()) * meta["seq_len"]
    result = json.loads(compress("eval", out / "model", "--teacher", TEACHER, "--data", VALID, "--seq-len", "256",
                                 "--max-sequences", "128", "--json"))  # fmt: skip
    return {"seconds": seconds, "bytes_per_token": disk / cached_tokens if disk else 0.0, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="100k", help="distillation tokens per row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        sys.exit(f"unknown row {unknown[0]!r}: choose from {', '.join(ROWS)}")
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        results = {row: distill(work, row, args.tokens) for row in rows}
    print(f"distilled for {args.tokens} tokens each; held-out: {VALID.name}, 128 x 256 tokens")
    print("| teacher | disk per token | wall time | held-out loss | held-out KL | top-1 | gap closed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    online, top_k = results.get("online"), results.get("top-k-64")
    for row, r in results.items():
        closed = ""
        if online and top_k and row not in ("online", "top-k-64") and top_k["kl"] > online["kl"]:
            closed = f"{(top_k['kl'] - r['kl']) / (top_k['kl'] - online['kl']):.0%}"
        disk = f"{r['bytes_per_token']:.0f} B" if r["bytes_per_token"] else "-"
        print(f"| {row} | {disk} | {r['seconds']:.0f} s | {r['loss']:.4f} | {r['kl']:.4f} | "
              f"{100 * r['top1_agreement']:.1f}% | {closed} |")  # fmt: skip


if __name__ == "__main__":
    main()
