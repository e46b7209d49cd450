"""`compress search` on the example model: what each way of choosing the finalists gives after the same
short distillation, and what the teacher costs as finalists are added.

Rows (`--rows`, each a full search at the same budget, calibration data and seed; the best finalist is
evaluated on the held-out plays):
- zero-shot: MiniPuzzle candidates scored by the KL of the freshly pruned model, `--finalists` distilled
  for `--distill-tokens` each, each finalist running the teacher itself (the search before the library);
- bld: a library of blockwise-distilled variants on `--bld` tokens (`--bld-epochs` passes each, over the
  `--bld-hidden-choices` largest hidden sizes that fit) scores every block option by replacement, the
  exact solver picks, candidates are assembled from the trained blocks, and the finalists share one
  teacher cache; their distillation tokens are cut so that library plus finalists use the zero-shot
  row's total (`--bld` + finalists x tokens = finalists x `--distill-tokens`);
- bld-own: the bld row with each finalist running the teacher itself (full logits, as the zero-shot row);
- bld-stream: the bld-own row with the library streamed (`--bld-stream`: no stored activations);
- minitron: Minitron's uniform candidates, as the zero-shot row otherwise.
Each row reports the Spearman / Kendall rank correlation between the score that picked its finalists and
their KL after distillation, and its wall time with the teacher's part (every teacher forward timed).

`--correlation N`: how well each score predicts, on more than the best few: a zero-shot search and a
library search (`--bld` tokens, each finalist its own teacher) each distill N of their candidates spread
evenly over their score order (the best, the worst and between, `--correlation-tokens` each), and report the
Spearman / Kendall rank correlation between the score and the KL after distillation.

`--library-paths`: the library alone (`--bld` tokens, `--bld-epochs`), built from stored activations and
streamed (`--bld-stream`): its wall time, the disk its activations take, and the variants' mean error
before and after training.

`--teacher-share K1,K2`: zero-shot searches with K1 and K2 finalists (`--share-distill-tokens` each), with
the shared teacher cache and without it: the teacher's seconds and share of the search.

    python benchmarks/search.py --teacher-share 1,4              # the docs tables
    python benchmarks/search.py --rows bld --bld 8k              # one row
    python benchmarks/search.py --rows none --teacher-share 1,4  # the teacher's share only
    python benchmarks/search.py --rows none --correlation 6      # the scores' rank correlation
    python benchmarks/search.py --rows none --library-paths      # stored against streamed library

Run alone: other work on the machine changes the times (not the KL figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.bld import BLDConfig  # noqa: E402
from compressor.budget import Budget, parse_context, parse_size, parse_tokens  # noqa: E402
from compressor.checkpoint import load_model  # noqa: E402
from compressor.data import load_sequences  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.pipelines.search import SearchConfig, run_search  # noqa: E402
from compressor.pipelines.source import CalibrationConfig, calibrate  # noqa: E402
from compressor.train import TrainConfig  # noqa: E402

# two distinct choices per hidden size and variant: the exact solver's variants often coincide, and the
# zero-shot row needs `--finalists` candidates
MINIPUZZLE = {"mamba_head_fractions": (1.0, 0.75, 0.5), "top_k": 12, "solutions": 2}
MINITRON = {"axes": ("hidden", "ffn", "mamba_heads", "mamba_head_dim", "depth"), "top_k": 10}


class TeacherClock:
    """Seconds spent in the source model's forward passes (teacher targets, cache writing, scoring)."""

    def __init__(self, model) -> None:
        self.seconds, self.model, forward = 0.0, model, model.forward

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        model.forward = timed

    def lap(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "examples" / "model"))
    parser.add_argument("--target-mem", default="20MiB")
    parser.add_argument("--ctx", default="4k")
    parser.add_argument("--finalists", type=int, default=3)
    parser.add_argument("--distill-tokens", default="200k")
    parser.add_argument("--bld", default="16k", help="library tokens")
    parser.add_argument("--bld-epochs", type=int, default=2)

    parser.add_argument("--bld-hidden-choices", type=int, default=1, help="hidden sizes the library covers")
    parser.add_argument(
        "--rows",
        default="zero-shot,bld,bld-own",
        help="zero-shot, bld, bld-own, bld-stream, minitron (comma-separated) or none",
    )
    parser.add_argument("--teacher-share", default="", help="finalist counts, e.g. 1,4")
    parser.add_argument("--share-distill-tokens", default="25k")
    parser.add_argument("--correlation", type=int, default=0, help="candidates distilled per score, e.g. 6")
    parser.add_argument("--correlation-tokens", default="50k", help="distillation tokens per candidate")
    parser.add_argument("--library-paths", action="store_true", help="the library stored and streamed")
    args = parser.parse_args()
    budget = Budget(memory=parse_size(args.target_mem), context=parse_context(args.ctx))
    calibration = CalibrationConfig(
        args.model, str(ROOT / "examples/data/sample.txt"), samples=64, score_samples=32, seq_len=256, batch_size=8,
        all_sequences=True, dtype="float32",  # the docs' figures calibrate in fp32
    )  # fmt: skip
    started = time.perf_counter()
    source = calibrate(calibration)
    print(f"calibration (importance on 64 sequences): {time.perf_counter() - started:.0f} s", flush=True)
    clock = TeacherClock(source.model)
    valid = load_sequences(ROOT / "examples/data/valid.txt", seq_len=256, tokenizer=args.model, max_sequences=128)
    held_out_teacher = load_model(args.model, dtype="float32")
    finalists, distill_tokens = args.finalists, parse_tokens(args.distill_tokens)
    total = finalists * distill_tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in [r for r in args.rows.split(",") if r and r != "none"]:
            options = dict(MINITRON if row == "minitron" else MINIPUZZLE)
            bld, tokens = None, distill_tokens
            if row.startswith("bld"):
                options["hidden_choices"] = args.bld_hidden_choices
                bld = BLDConfig(parse_tokens(args.bld), epochs=args.bld_epochs, micro_batch_size=8,
                                stream=row == "bld-stream")  # fmt: skip
                tokens = (total - bld.tokens) // finalists
            config = SearchConfig(
                budget, _template(tokens), "minitron" if row == "minitron" else "minipuzzle", options,
                finalists=finalists, bld=bld, share_teacher=row == "bld",  # bld-own: each finalist its teacher
            )  # fmt: skip
            record, seconds, teacher = _search(source, config, Path(tmp) / row, clock, row)
            best = record.candidate(record.ranking[0])
            model = load_model(Path(tmp) / row / "candidates" / str(best.index) / "distill" / "model")
            result = evaluate(model, valid.batches(8, shuffle=False, drop_last=False), teacher=held_out_teacher)
            rows.append((row, record, best, result, seconds, teacher, tokens))
        if rows:
            _print_rows(rows, budget, finalists, total)
        if args.teacher_share:
            _teacher_share(source, budget, clock, args, Path(tmp))
        if args.correlation:
            _correlation(source, budget, clock, args, Path(tmp))
        if args.library_paths:
            _library_paths(source, budget, args, Path(tmp))


def _template(tokens: int) -> TrainConfig:
    return TrainConfig(
        student="", out="", data="", tokens=tokens, seq_len=256, batch_size=16, micro_batch_size=8, lr=1e-3,
        min_lr=1e-4, eval_sequences=32, eval_every=10**9, save_every=10**9,
    )  # fmt: skip


def _search(source, config, out, clock, name, resume=False):
    clock.lap()
    started = time.perf_counter()
    record = run_search(source, config, out, resume=resume, say=lambda text: print(f"[{name}] {text}", flush=True))
    return record, time.perf_counter() - started, clock.lap()


def _print_rows(rows, budget, finalists, total) -> None:
    print(f"\nbudget {budget.describe()}; {finalists} finalists; {total:,} tokens per row (library + distillation)")
    print(
        "\n| search | best finalist | parameters | memory | picked by | its score | KL after distillation "
        "| held-out loss | held-out KL | Spearman | Kendall | wall time | teacher |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, record, best, result, seconds, teacher, tokens in rows:
        picked = "library KL" if record.bld else "zero-shot KL"
        if record.bld:
            library = record.library
            label = f"{name}: {library['variants']} variants, {library['tokens'] // 1000}k + {tokens // 1000}k tokens"
        else:
            label = f"{name}: {tokens // 1000}k"
        r = record.correlation or {"spearman": float("nan"), "kendall": float("nan")}
        print(
            f"| {label} | {best.label} | {best.params:,} | {best.memory_bytes / 2**20:.2f} MiB | {picked} "
            f"| {best.score:.4f} | {best.distilled.val_kl:.4f}{' (cached)' if record.share_teacher else ''} "
            f"| {result.loss:.4f} | {result.kl:.4f} "
            f"| {r['spearman']:.2f} | {r['kendall']:.2f} | {seconds:.0f} s | {teacher:.0f} s |"
        )
    if any(record.share_teacher for _, record, *_ in rows):
        print("(cached): measured against the shared teacher cache (64 draws a token: an estimate of the exact KL); "
              "the held-out columns are exact for every row")  # fmt: skip
    for name, record, *_ in rows:
        stages = ", ".join(f"{stage} {s:.0f} s" for stage, s in record.seconds.items())
        print(f"{name}: {stages}; finalists {[c.index for c in record.candidates if c.finalist]}", end="")
        print(f", KL after distillation {[round(record.candidate(i).distilled.val_kl, 4) for i in record.ranking]}")


def _library_paths(source, budget, args, tmp: Path) -> None:
    """The same library from stored activations and streamed: wall time, activations on disk (measured
    when the first variant is done, before they are deleted), mean error before and after training."""
    from compressor.pipelines.library import ACTIVATIONS_DIR, build_library

    options = MINIPUZZLE | {"hidden_choices": args.bld_hidden_choices}
    config = SearchConfig(budget, _template(1000), "minipuzzle", options)
    tables = config.build_strategy().servable_tables(source.model.config, source.importance, budget)[1]
    rows = []
    for stream in (False, True):
        folder, disk = tmp / f"library-{'streamed' if stream else 'stored'}", []

        def say(text: str, folder=folder, disk=disk) -> None:
            print(f"[library] {text}", flush=True)
            if text.startswith("library 1/"):
                files = (folder / ACTIVATIONS_DIR).glob("*")
                disk.append(sum(f.stat().st_size for f in files))

        bld = BLDConfig(parse_tokens(args.bld), epochs=args.bld_epochs, micro_batch_size=8, stream=stream)
        started = time.perf_counter()
        library = build_library(source, tables, bld, folder, say)
        seconds = time.perf_counter() - started
        variants = list(library.variants.values())
        before = sum(v.initial_error for v in variants) / len(variants)
        after = sum(v.error for v in variants) / len(variants)
        path = "streamed (`--bld-stream`)" if stream else "stored activations"
        stored = f"{disk[0] / 2**20:.1f} MiB"
        rows.append(f"| {path} | {len(variants)} | {seconds:.0f} s | {stored} | {before:.4f} | {after:.4f} |")
    print(f"\nlibrary of the example at {budget.describe()}: {args.bld} tokens, {args.bld_epochs} epochs")
    print("\n| path | variants | wall time | activations on disk | mean error before | mean error after |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


def _teacher_share(source, budget, clock, args, tmp: Path) -> None:
    tokens = parse_tokens(args.share_distill_tokens)
    options = dict(MINIPUZZLE)
    print(f"\nthe teacher's share of a zero-shot search ({tokens // 1000}k distillation tokens per finalist)")
    print("\n| finalists | teacher | teacher passes | teacher time | search time | teacher share |")
    print("|---:|---|---:|---:|---:|---:|")
    for count in [int(k) for k in args.teacher_share.split(",")]:
        for shared in (False, True):
            config = SearchConfig(budget, _template(tokens), "minipuzzle", options, finalists=count,
                                  share_teacher=shared)  # fmt: skip
            name = f"k{count}-{'shared' if shared else 'own'}"
            _, seconds, teacher = _search(source, config, tmp / name, clock, name)
            passes = 1 if shared else count
            kind = "one cache, read by all" if shared else "each finalist its own"
            print(f"| {count} | {kind} | {passes} | {teacher:.0f} s | {seconds:.0f} s | {teacher / seconds:.0%} |",
                  flush=True)  # fmt: skip


def _correlation(source, budget, clock, args, tmp: Path) -> None:
    """Each score against the KL after distillation, over `args.correlation` candidates spread over its order:
    the search distills its best one, the others are then marked finalists in its record and the search
    resumed, which distills exactly the marked ones."""
    count, tokens = args.correlation, parse_tokens(args.correlation_tokens)
    results = []
    for row in ("zero-shot", "bld"):
        # the same pool for both scores: the library's hidden sizes, `count` distinct choices per variant
        options = dict(MINIPUZZLE, hidden_choices=args.bld_hidden_choices, solutions=count)
        bld = None
        if row == "bld":
            bld = BLDConfig(parse_tokens(args.bld), epochs=args.bld_epochs, micro_batch_size=8)
        config = SearchConfig(budget, _template(tokens), "minipuzzle", options, finalists=1, bld=bld)
        out = tmp / f"correlation-{row}"
        _search(source, config, out, clock, row)
        record_file = out / "search.json"
        raw = json.loads(record_file.read_text())
        order = sorted(raw["candidates"], key=lambda c: c["score"])
        if len(order) < 3:
            print(f"{row}: only {len(order)} candidates fit, no correlation")
            continue
        picks = {round(i * (len(order) - 1) / (min(count, len(order)) - 1)) for i in range(min(count, len(order)))}
        for position in picks:
            order[position]["finalist"] = True
        record_file.write_text(json.dumps(raw))
        record, *_ = _search(source, config, out, clock, row, resume=True)
        results.append((row, record))
    print(f"\nhow well each score predicts: candidates spread over its order, {tokens // 1000}k distillation "
          f"tokens each, budget {budget.describe()}")  # fmt: skip
    print("\n| score | candidates | score range | KL after distillation | Spearman | Kendall |")
    print("|---|---:|---|---|---:|---:|")
    for row, record in results:
        done = sorted((c for c in record.candidates if c.distilled is not None), key=lambda c: c.score)
        r = record.correlation or {"spearman": float("nan"), "kendall": float("nan")}
        name = "zero-shot KL (freshly pruned)" if row == "zero-shot" else "library KL (assembled from BLD blocks)"
        print(f"| {name} | {len(done)} | {done[0].score:.3f} to {done[-1].score:.3f} "
              f"| {done[0].distilled.val_kl:.4f} to {done[-1].distilled.val_kl:.4f} "
              f"| {r['spearman']:.2f} | {r['kendall']:.2f} |")  # fmt: skip
    for row, record in results:
        done = sorted((c for c in record.candidates if c.distilled is not None), key=lambda c: c.score)
        pairs = ", ".join(f"{c.score:.3f}->{c.distilled.val_kl:.4f}" for c in done)
        print(f"{row} (score -> KL after): {pairs}")


if __name__ == "__main__":
    main()
