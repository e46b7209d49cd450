"""Write a token file of Shakespeare mixed with synthetic retrieval sequences, for `compress train` or `distill`.

Each row is `--seq-len` tokens: either a piece of the training text (examples/data/train.txt, tokenized
with the example tokenizer, documents separated by EOS) or one sequence of a retrieval task from
`compressor.tasks` (phonebook, MQAR, needle in Shakespeare filler). Retrieval rows are drawn in groups,
each group with its own seed and shape (queries per sequence, words per name, digits per number), so
the model sees the evaluation format among variations of it. Task seeds start at 1000: the evaluation's
default seed (0) never appears in training. The rows are shuffled and written as an (n, seq_len) int32
`.npy` file; `compress train --data FILE.npy --seq-len SEQ_LEN` reads it as it is. When more text rows
are asked for than the text holds, the text is packed again from a shifted start, so no row repeats.

Usage:
    python examples/mix_retrieval.py --seq-len 1024 --rows 4000 --retrieval-share 0.3 --out runs/mix-1k.npy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from compressor.data import find_eos_id, load_sequences, load_tokenizer
from compressor.tasks import TaskSpec, TaskVocabulary, make_examples

# Share of the retrieval rows each task gets.
TASK_SHARES = {"phonebook": 0.5, "mqar": 0.3, "needle": 0.2}
# Retrieval sequences generated with one seed and one shape.
GROUP = 16
# Shapes a group draws from; the evaluation's (16 queries, two-word names, four digits) is among them.
QUERIES = (8, 16, 32, 64)
NAME_WORDS = (1, 2, 2, 3)
DIGITS = (3, 4, 4, 5, 6)
FIRST_SEED = 1000


def text_rows(text: Path, tokenizer, seq_len: int, count: int) -> np.ndarray:
    """`count` rows of packed text; the stream is repacked from shifted starts when one pass is not enough."""
    stream = load_sequences(text, seq_len=seq_len, tokenizer=tokenizer, eos_id=find_eos_id(tokenizer))
    stream = stream.to_numpy().reshape(-1)
    passes = -(-count // (len(stream) // seq_len - 1))
    rows = []
    for index in range(passes):
        shift = index * seq_len // passes
        usable = (len(stream) - shift) // seq_len * seq_len
        rows.append(stream[shift : shift + usable].reshape(-1, seq_len))
    return np.concatenate(rows)[:count]


def retrieval_rows(tokenizer, seq_len: int, count: int, data: Path, rng: np.random.Generator) -> np.ndarray:
    """`count` retrieval sequences of `seq_len` tokens, tasks in TASK_SHARES, shapes varied by group."""
    vocab = TaskVocabulary.from_tokenizer(tokenizer)
    rows, seed = [], FIRST_SEED
    for task, share in TASK_SHARES.items():
        wanted = round(count * share)
        while wanted > 0:
            queries = int(rng.choice([q for q in QUERIES if q * 2 * 12 <= seq_len] or [1]))
            spec = TaskSpec(
                task,
                sequences=min(GROUP, wanted),
                queries=queries,
                name_words=int(rng.choice(NAME_WORDS)),
                digits=int(rng.choice(DIGITS)),
                data=str(data),
                seed=seed,
            )
            rows.append(make_examples(spec, tokenizer, seq_len, vocab).tokens.numpy().astype(np.int32))
            wanted -= spec.sequences
            seed += 1
    return np.concatenate(rows)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    parser.add_argument("--rows", type=int, required=True, help="rows in the file")
    parser.add_argument("--retrieval-share", type=float, default=0.3, help="share of the rows that are retrieval")
    parser.add_argument("--text", type=Path, default=Path("examples/data/train.txt"), help="training text")
    parser.add_argument("--tokenizer", type=Path, default=Path("examples/data/tokenizer.json"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes and of the row order")
    parser.add_argument("--out", type=Path, required=True, help="the .npy file to write")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    rng = np.random.default_rng(args.seed)
    retrieval = round(args.rows * args.retrieval_share)
    parts = [
        text_rows(args.text, tokenizer, args.seq_len, args.rows - retrieval),
        retrieval_rows(tokenizer, args.seq_len, retrieval, args.text, rng),
    ]
    rows = np.concatenate(parts)
    rows = rows[rng.permutation(len(rows))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, rows)
    share = retrieval / len(rows)
    print(f"wrote {args.out}: {len(rows)} x {args.seq_len} tokens, {retrieval} retrieval rows ({share:.0%})")


if __name__ == "__main__":
    main()
