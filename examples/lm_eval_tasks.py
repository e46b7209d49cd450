"""Write two local lm-eval tasks over the held-out plays (examples/data/valid.txt), for `compress eval
--lm-eval-tasks` or `python -m compressor.harness`; nothing is downloaded.

- shakespeare_next_line (multiple_choice, acc / acc_norm): the speaker and up to three lines of a speech;
  which of four lines comes next? The three wrong lines are drawn from other speeches of the held-out
  plays, with lengths within 30% of the right one's (chance: 25%).
- shakespeare_next_word (generate_until, exact_match): the speaker, the speech's previous lines and a
  line cut before one of its words; the model writes on (greedy, up to 4 tokens or the end of the line)
  and its first word must be the text's (letters and apostrophes, case-sensitive). The cut is never
  followed by a space in the prompt, which would tokenize unlike the training text.

Each task keeps `--items` documents (default 300), drawn with a fixed seed. The YAML files name the data
by absolute path, so run the script on the machine that evaluates:

    python examples/lm_eval_tasks.py --out runs/lm_eval_tasks
    compress eval examples/model --lm-eval-tasks shakespeare_next_line,shakespeare_next_word \\
        --include-path runs/lm_eval_tasks
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A speaker's header line: "MACBETH.", "FIRST WITCH.", "SIR TOBY."
SPEAKER = re.compile(r"^[A-Z][A-Z' \-]*[A-Z]\.$")
CONTEXT_LINES = 3  # lines of a speech shown before the line to guess
WORD = re.compile(r"[A-Za-z']+")  # a word to guess, as the task's answer filter reads it


def read_speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker header, verse/prose lines) for every speech; stage directions in brackets are left out."""
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in block.strip("\n").split("\n")]
        lines = [line for line in lines if line and not line.lstrip().startswith("[")]
        if len(lines) >= 2 and SPEAKER.match(lines[0]):
            speeches.append((lines[0], lines[1:]))
    return speeches


def next_line_items(speeches, rng: random.Random, count: int) -> list[dict]:
    lines = [line for _, body in speeches for line in body]
    items = []
    for speaker, body in speeches:
        for i in range(1, len(body)):
            answer = body[i]
            near = [line for line in lines if abs(len(line) - len(answer)) <= 0.3 * len(answer) and line != answer]
            if len(answer) < 12 or len(near) < 3:
                continue
            context = "\n".join([speaker, *body[max(0, i - CONTEXT_LINES) : i]])
            choices = [answer, *rng.sample(near, 3)]
            rng.shuffle(choices)
            items.append({"context": context, "choices": choices, "answer": choices.index(answer)})
    return rng.sample(items, min(count, len(items)))


def next_word_items(speeches, rng: random.Random, count: int) -> list[dict]:
    items = []
    for speaker, body in speeches:
        for i, line in enumerate(body):
            # words after the line's first, with the text before them (no trailing space)
            for match in list(WORD.finditer(line))[1:]:
                prefix = line[: match.start()].rstrip()
                if line[len(prefix) : match.start()] == " ":  # a word after a plain space
                    context = "\n".join([speaker, *body[max(0, i - CONTEXT_LINES + 1) : i], prefix])
                    items.append({"context": context, "answer": match.group()})
    return rng.sample(items, min(count, len(items)))


YAML = {
    "shakespeare_next_line": """task: shakespeare_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: "\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "shakespeare_next_word": """task: shakespeare_next_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "{word}"
      - function: take_first
metric_list:
  - metric: exact_match
""",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lm_eval_tasks")
    parser.add_argument("--source", type=Path, default=ROOT / "examples" / "data" / "valid.txt")
    parser.add_argument("--items", type=int, default=300, help="documents per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    speeches = read_speeches(args.source.read_text())
    rng = random.Random(args.seed)
    items = {
        "shakespeare_next_line": next_line_items(speeches, rng, args.items),
        "shakespeare_next_word": next_word_items(speeches, rng, args.items),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, docs in items.items():
        data = (args.out / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (args.out / f"{name}.yaml").write_text(YAML[name].format(data=data, word=WORD.pattern))
        print(f"{name}: {len(docs)} documents -> {data}")


if __name__ == "__main__":
    main()
