"""Retrieval of the example model (and of any models given): phonebook accuracy at 1k and 4k tokens, the
same model with every attention block skipped, and the 16k case's time and peak memory.

    python benchmarks/retrieval.py                                   # the example model
    python benchmarks/retrieval.py original=examples/model pruned=runs/quickstart/pruned \\
        distilled=runs/quickstart/distilled/model --teacher examples/model   # side by side, + loss and KL

Models are `LABEL=PATH` or a bare path. Phonebook (`compressor.tasks`): two-word names, four-digit
numbers, 16 queries per sequence, teacher-forced exact match (every digit the argmax) and the answers'
mean log-likelihood; the same sequences for every model (seed 0). With `--teacher`, each model's loss on
`--data` (held-out plays) and its KL to the teacher sit beside, the table docs/long-context.md's
retrieval-aware comparison needs: give the original, the candidate chosen by KL alone and the one chosen
with retrieval in the score, before and after the same distillation, as LABEL=PATH.

The long case runs in a fresh process per model so its peak resident memory (ru_maxrss of that process,
Python and torch included) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.checkpoint import load_model  # noqa: E402
from compressor.config import ATTENTION  # noqa: E402
from compressor.data import load_sequences, load_tokenizer  # noqa: E402
from compressor.evaluate import evaluate  # noqa: E402
from compressor.tasks import TaskSpec, TaskVocabulary, make_examples, parse_contexts, score  # noqa: E402

MIB = 1 << 20


def attention_blocks(model) -> set[int]:
    return {spec.index for spec in model.config.blocks if spec.kind == ATTENTION}


def parse_models(items: list[str]) -> dict[str, Path]:
    models = {}
    for item in items:
        label, _, path = item.rpartition("=")
        models[label or Path(path).name] = Path(path)
    return models


def long_case(path: Path, args) -> dict:
    """The long context in a child process; its own result, wall time and peak RSS."""
    command = [sys.executable, __file__, "--child", str(path), "--long", args.long]
    command += ["--sequences", str(args.long_sequences), "--batch-size", str(args.batch_size)]
    command += ["--prefill-chunk", str(args.prefill_chunk)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        sys.exit(f"the long case of {path} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "wall": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024}


def child(args) -> None:
    model = load_model(args.child, dtype="float32")
    tokenizer = load_tokenizer(args.child)
    spec = TaskSpec("phonebook", sequences=args.sequences)
    examples = make_examples(spec, tokenizer, parse_contexts(args.long)[0])
    result = score(model, examples, batch_size=args.batch_size, prefill_chunk=args.prefill_chunk)
    print(json.dumps(result.to_dict()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[f"example={ROOT / 'examples' / 'model'}"])
    parser.add_argument("--contexts", default="1k,4k", help="contexts of the main table")
    parser.add_argument("--long", default="16k", help="the long context, timed with its peak memory ('' skips)")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per context (16 queries each)")
    parser.add_argument("--long-sequences", type=int, default=4, help="sequences at the long context")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--teacher", help="adds each model's loss on --data and its KL to this teacher")
    parser.add_argument("--data", default=str(ROOT / "examples" / "data" / "valid.txt"))
    parser.add_argument("--lm-sequences", type=int, default=128, help="sequences of 256 tokens for loss and KL")
    parser.add_argument("--no-ablation", action="store_true", help="skip the rows without attention")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    models = parse_models(args.models)
    contexts = parse_contexts(args.contexts)
    spec = TaskSpec("phonebook", sequences=args.sequences)
    first = next(iter(models.values()))
    tokenizer = load_tokenizer(first)
    vocab = TaskVocabulary.from_tokenizer(tokenizer)
    examples = {context: make_examples(spec, tokenizer, context, vocab) for context in contexts}
    teacher = load_model(args.teacher, dtype="float32") if args.teacher else None
    held_out = None
    if teacher is not None:
        held_out = load_sequences(args.data, seq_len=256, tokenizer=tokenizer, max_sequences=args.lm_sequences)

    columns = ["model", "parameters"]
    if teacher is not None:
        columns += ["loss", "KL to teacher"]
    for context in contexts:
        columns += [f"phonebook {context // 1024}k", f"log-lik {context // 1024}k", f"s {context // 1024}k"]
    print(f"phonebook: {args.sequences} sequences x 16 queries per context, two-word names, four digits; "
          f"batch {args.batch_size}, prefill chunk {args.prefill_chunk}\n")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    for label, path in models.items():
        model = load_model(path, dtype="float32")
        variants = [(label, ())]
        if not args.no_ablation and attention_blocks(model):
            variants.append((f"{label} without attention ({len(attention_blocks(model))} blocks skipped)",
                             tuple(sorted(attention_blocks(model)))))  # fmt: skip
        for name, skipped in variants:
            cells = [name, f"{model.num_parameters():,}"]
            if teacher is not None:
                lm = evaluate(model, held_out.batches(8, shuffle=False, drop_last=False), teacher=teacher)
                cells += [f"{lm.loss:.4f}", f"{lm.kl:.4f}"] if not skipped else ["", ""]
            for context in contexts:
                result = score(
                    model, examples[context], batch_size=args.batch_size, prefill_chunk=args.prefill_chunk,
                    skip_blocks=skipped,
                )  # fmt: skip
                cells += [f"{result.accuracy:.1%}", f"{result.log_likelihood:.3f}", f"{result.seconds:.1f}"]
            print("| " + " | ".join(cells) + " |", flush=True)

    if args.long:
        print(f"\n{args.long} tokens, {args.long_sequences} sequences x 16 queries, one fresh process per model")
        print("| model | phonebook | log-lik | scoring s | process s | peak RSS |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, path in models.items():
            long = long_case(path, args)
            print(f"| {label} | {long['accuracy']:.1%} | {long['log_likelihood']:.3f} | {long['seconds']:.1f} | "
                  f"{long['wall']:.1f} | {long['peak_rss'] / MIB:,.0f} MiB |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
