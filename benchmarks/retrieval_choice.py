"""The candidate chosen by KL alone against those chosen with retrieval in the decision, before and after the
same distillation, on the quick start's budget (20 MiB at a 4k context):

    python benchmarks/retrieval_choice.py                      # the example model, 400k distillation tokens
    python benchmarks/retrieval_choice.py --tokens 100k --out runs/choice
    python benchmarks/retrieval_choice.py --attention-loss 0 --no-search   # logit distillation alone
    python benchmarks/retrieval_choice.py --distill-data text  # distill on the calibration text alone

Runs the `compress` commands a user would: `compress importance` once (on the calibration text), then
three ways to choose from it:
- `compress prune --score kl` (KL alone), then `compress distill`;
- `compress prune --score kl+retrieval` (the zero-shot retrieval probe in the score), then the same
  `compress distill`;
- `compress search --rank-by retrieval`: the best `--candidates` by zero-shot KL each put through that same
  distillation, ranked by the phonebook probe at 4k after it; `compress materialize` writes the winner,
  pruned and distilled.
Then `compress eval` for held-out loss and KL to the original, and `compress eval --task phonebook` at 1k
and 4k tokens, and one table (`--no-search`: the two prune choices only).

The distillation data is, by default, the calibration text (`examples/data/sample.txt`) mixed with 30%
retrieval rows at 1024 tokens (`examples/mix_retrieval.py`, as in the example model's training mix):
distillation only passes on what its data exercises. `--distill-data text` distills on the text alone.
The distillation transfers the attention too (`--attention-loss`, default 5): by logits alone the pruned
students' retrieval comes back less, or not at all (`--attention-loss 0`). Reruns reuse finished steps in
`--out`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
AXES = "hidden,ffn,mamba_heads,mamba_head_dim,depth"  # attention heads stay whole
IMPORTANCE = ["--data", str(DATA / "sample.txt"), "--samples", "64", "--seq-len", "256", "--batch-size", "8"]
PRUNE = ["--target-mem", "20MiB", "--ctx", "4k", "--axes", AXES, "--data", str(DATA / "sample.txt"),
         "--score-samples", "32", "--seq-len", "256", "--batch-size", "8"]  # fmt: skip
DISTILL = ["--lr", "1e-3", "--min-lr", "1e-4", "--eval-every", "1000", "--save-every", "50", "--quiet"]
# 4,096 tokens per step either way
DISTILL_DATA = {"text": ["--seq-len", "256", "--batch-size", "16", "--micro-batch-size", "8"],
                "mix": ["--seq-len", "1024", "--batch-size", "4", "--micro-batch-size", "4"]}  # fmt: skip
SEARCH = ["--strategy", "minitron", "--target-mem", "20MiB", "--ctx", "4k", "--axes", AXES, "--score-samples", "32",
          "--lr", "1e-3", "--min-lr", "1e-4", "--rank-by", "retrieval"]  # fmt: skip
MIX_ROWS = 1000  # 1M tokens: more than 400k distillation tokens read once
ATTENTION_LOSS = "5"  # compress distill --attention-loss: the attention transfer that brings retrieval back


def compress(*args: str) -> str:
    """Run `compress ARGS` (this checkout's CLI) and return its standard output."""
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"compress {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def write_mix(tokenizer: Path, out: Path) -> None:
    """The calibration text with 30% retrieval rows, MIX_ROWS x 1024 tokens (examples/mix_retrieval.py)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "examples" / "mix_retrieval.py"), "--text", str(DATA / "sample.txt"),
               "--tokenizer", str(tokenizer), "--seq-len", "1024", "--rows", str(MIX_ROWS), "--retrieval-share",
               "0.3", "--out", str(out)]  # fmt: skip
    if subprocess.run(command, cwd=ROOT, capture_output=True, text=True).returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed")


def search_choice(args: argparse.Namespace, search: Path, data: Path, importance: Path) -> dict[str, Path]:
    """`compress search --rank-by retrieval` (resumed when interrupted) and its winner materialized, pruned
    and distilled: {label: checkpoint}."""
    if not (search / "pareto.json").is_file():
        resume = ["--resume"] if (search / "search.json").is_file() else ["--overwrite"]
        compress("search", args.model, "--data", str(data), *SEARCH, "--importance", str(importance),
                 *DISTILL_DATA[args.distill_data], "--candidates", args.candidates, "--distill-tokens", args.tokens,
                 "--attention-loss", args.attention_loss, "--out", str(search), *resume)  # fmt: skip
    record = json.loads((search / "search.json").read_text())
    best = record["ranking"][0]
    finalists = sum(c["finalist"] for c in record["candidates"])
    label = f"search, best of {finalists} by retrieval: {record['candidates'][best]['label']}"
    for kind, extra in (("pruned", []), ("distilled", ["--distilled"])):
        compress("materialize", str(search), str(best), "--out", f"{search}-best-{kind}", *extra, "--overwrite")
    return {label: Path(f"{search}-best-pruned"), f"{label}, distilled": Path(f"{search}-best-distilled")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "model"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "retrieval_choice")
    parser.add_argument("--tokens", default="400k", help="distillation tokens per candidate")
    parser.add_argument("--retrieval-ctx", default="1k", help="context of the probe in the score")
    parser.add_argument("--weight", default="1", help="--retrieval-weight")
    parser.add_argument("--candidates", default="4", help="compress search --candidates (finalists distilled)")
    parser.add_argument("--no-search", action="store_true", help="only the two prune choices")
    parser.add_argument(
        "--attention-loss",
        default=ATTENTION_LOSS,
        help="compress distill --attention-loss (0: logit distillation alone)",
    )
    parser.add_argument(
        "--distill-data",
        choices=sorted(DISTILL_DATA),
        default="mix",
        help="distill on the calibration text mixed with retrieval rows, or on the text alone",
    )
    args = parser.parse_args()
    data = DATA / "sample.txt"
    if args.distill_data == "mix":
        data = args.out / "mix-1k.npy"
        if not data.is_file():
            write_mix(Path(args.model) / "tokenizer.json", data)
    importance = args.out / "importance"
    if not (importance / "importance.json").is_file():
        compress("importance", args.model, *IMPORTANCE, "--out", str(importance), "--overwrite")
    distill = [*DISTILL, "--data", str(data), *DISTILL_DATA[args.distill_data], "--attention-loss", args.attention_loss]
    suffix = args.distill_data + ("" if float(args.attention_loss) == 0 else f"-attention{args.attention_loss}")
    models = {"original": Path(args.model)}
    for label, score in (("KL alone", "kl"), ("KL + retrieval", "kl+retrieval")):
        pruned, run = args.out / f"{score}-pruned", args.out / f"{score}-distilled-{suffix}"
        if not (pruned / "config.json").is_file():
            compress("prune", args.model, *PRUNE, "--importance", str(importance), "--score", score,
                     "--retrieval-ctx", args.retrieval_ctx, "--retrieval-weight", args.weight, "--out", str(pruned),
                     "--overwrite")  # fmt: skip
        if not (run / "model" / "config.json").is_file() or not (run / "done").is_file():
            compress("distill", args.model, str(pruned), *distill, "--tokens", args.tokens, "--out", str(run),
                     "--overwrite")  # fmt: skip
            (run / "done").write_text("")
        chosen = json.loads((pruned / "compression.json").read_text())["chosen"]["label"]
        models[f"{label}: {chosen}"] = pruned
        models[f"{label}: {chosen}, distilled"] = run / "model"
    search = args.out / f"search-{suffix}"
    if not args.no_search:
        models.update(search_choice(args, search, data, importance))
    paths = [str(p) for p in models.values()]
    losses = json.loads(compress("eval", *paths, "--teacher", args.model, "--data", str(DATA / "valid.txt"),
                                 "--seq-len", "256", "--max-sequences", "128", "--json"))  # fmt: skip
    tasks = json.loads(compress("eval", *paths, "--task", "phonebook", "--ctx", "1k,4k", "--task-sequences", "8",
                                "--json"))["models"]  # fmt: skip
    print(
        f"quick start budget (20 MiB at 4k), distillation {args.tokens} tokens each on the {args.distill_data} "
        f"({DISTILL_DATA[args.distill_data][1]} tokens per sequence), --attention-loss {args.attention_loss}; "
        "phonebook 128 queries"
    )
    print("| model | parameters | loss | KL to original | phonebook 1k | log-lik 1k | phonebook 4k | log-lik 4k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (label, path), loss in zip(models.items(), losses, strict=True):
        one, four = tasks[str(path)]
        print(f"| {label} | {loss['params']:,} | {loss['loss']:.4f} | {loss['kl']:.4f} | "
              f"{100 * one['accuracy']:.1f}% | {one['log_likelihood']:.3f} | {100 * four['accuracy']:.1f}% | "
              f"{four['log_likelihood']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
