"""Token data: read text or token files, tokenize, pack into fixed-length sequences, batch.

Every step that runs a model on data (calibration, quantization, training, evaluation) names it with one
`DataSpec` (path, tokenizer, text field, sequence length, limits) and reads it with `read_sequences`, which
also refuses token ids the model cannot take and fewer sequences than the step needs.

Sources (`load_sequences` and `stream_sequences` pick the reader from the source):

- Text, read through the `datasets` library and tokenized with a `tokenizers.Tokenizer`:
  - `.txt`: the whole file is one document. A folder of `.txt` files gives one document per file,
    in file-name order.
  - `.jsonl` / `.json`: one document per record, from the field `text_field` (default "text").
  - `.parquet`: one document per row, from `text_field`.
  - A folder of `.jsonl` or `.parquet` shards (one kind per folder), read in file-name order. In a
    folder, `.json` files are ignored: they are usually metadata such as `tokenizer.json`.
  - A folder written by `datasets.Dataset.save_to_disk` (a saved `DatasetDict` gives its
    `dataset_split`).
  - Anything that is not a local path: a dataset name for
    `datasets.load_dataset(name, split=dataset_split, streaming=True)`, which needs network access.
- Token ids, already tokenized (no tokenizer needed, `eos_id` is not used):
  - `.npy`: a 1-D token stream or a 2-D (n, seq_len) array of packed sequences, memory-mapped.
  - `.safetensors`: a tensor named "tokens", or the only tensor in the file, read into memory.

Packing: each document is encoded without the tokenizer's template tokens (no BOS) and followed by
one EOS id when there is one (`eos_id`, or else the tokenizer's own `</s>`, `<|endoftext|>`, ...).
Empty documents are skipped. The documents are concatenated into one stream that is cut into rows of
exactly `seq_len` tokens; the tail shorter than `seq_len` is dropped. A 2-D token array whose rows
are not `seq_len` long is read as its flattened stream and cut again. Token ids are int32.

Split and order conventions (all seeded; nothing reads global random state):

- `TokenSequences.split(valid_fraction, seed)`: a permutation of the row indices drawn from `seed`
  alone; its first `round(n * valid_fraction)` rows (at least one) are validation, the rest train.
- `TokenSequences.batches(batch_size, seed=, epoch=, start=)`: rows in the order of a permutation
  drawn from (seed, epoch); `start` skips that many batches, so a run resumes exactly where it stopped.
- `stream_sequences(..., split=, valid_fraction=, seed=)`: sequence i (counted in source order) is
  validation when a hash of (seed, i) falls below `valid_fraction`, so train and valid are disjoint
  and fixed without knowing the corpus size; a seeded shuffle buffer then mixes the kept sequences.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from compressor.errors import DataError, first_line
from compressor.outputs import confined, silenced

# Special tokens that end a document, in the order they are looked for.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
# The `datasets` builder that reads each text file format.
TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Data files read from a folder; `.json` is left out, as folders often hold metadata in it.
FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".npy", ".safetensors")
# Text every tokenizer must encode and decode when loaded: letters, digits, punctuation, accents, whitespace.
PROBE_TEXT = "Hello, world! 0123456789 caf\u00e9 \u00c0 la carte\n\tend."
# Documents per `encode_batch` call: enough to keep the tokenizer's threads busy, few enough that
# `max_sequences` stops reading soon after it is reached.
DOCUMENT_BATCH = 256
# Rows per block when copying or streaming token arrays, so memory-mapped files are read piecewise.
ROW_BLOCK = 4096
INT32_MAX = np.iinfo(np.int32).max

TokenizerLike = Tokenizer | str | Path


def tokenizer_file(path: str | Path | None) -> Path | None:
    """The tokenizer.json a tokenizer option names: the file itself, or the one in a folder (which must be
    the folder's own file, not a link out of it, as every file of a checkpoint folder)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    confined(path / "tokenizer.json", path, what="tokenizer.json")
    return path / "tokenizer.json"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizers.Tokenizer` from a `tokenizer.json` file or a checkpoint folder holding one."""
    file = tokenizer_file(path)
    if not file.is_file():
        raise DataError(
            f"no tokenizer at {file}: pass a checkpoint folder containing tokenizer.json, "
            "or the tokenizer.json file itself"
        )
    with tokenizer_panics(file):
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(
                f"cannot read tokenizer {file} ({first_line(err)}); it must be a Hugging Face tokenizers JSON file"
            ) from None
        # a broken normalizer or pre-tokenizer (e.g. a regex that splits inside a character) shows on the first
        # text it sees: find it here, not inside a long run (Rust's report of a panic to stderr is held back)
        with silenced(2):
            try:
                tokenizer.decode(tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids)
            except Exception as err:
                raise DataError(f"the tokenizer {file} fails on plain text ({first_line(err)})") from None
    return tokenizer


@contextlib.contextmanager
def tokenizer_panics(file: str | Path) -> Iterator[None]:
    """Report a panic inside tokenizers' Rust code (pyo3's PanicException, which derives from BaseException,
    not Exception) of the tokenizer `file` as one DataError."""
    try:
        yield
    except BaseException as err:
        if type(err).__name__ != "PanicException":
            raise
        raise DataError(f"the tokenizer {file} failed ({first_line(err)}): its tokenizer.json is broken") from None


def check_same_tokenizer(
    first: str | Path, second: str | Path, why: str = "teacher and student must share one tokenizer"
) -> None:
    """Refuse two checkpoints (or tokenizer files) whose tokenizers map tokens to different ids, saying `why`
    they must not; a side without a tokenizer.json is not checked. Equal sizes are not enough: the
    vocabularies are compared."""
    files = [tokenizer_file(p) for p in (first, second)]
    if not all(f.is_file() for f in files):
        return
    if files[0].read_bytes() == files[1].read_bytes():
        return
    a, b = (load_tokenizer(f).get_vocab(with_added_tokens=True) for f in files)
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])[:1]
        example = f" (e.g. {differ[0][0]!r})" if differ else ""
        raise DataError(f"the tokenizers of {first} and {second} differ{example}: {why}")


def find_eos_id(tokenizer: Tokenizer) -> int | None:
    """The id of the tokenizer's end-of-document special token (`</s>`, `<|endoftext|>`, ...), or None."""
    special = {token.content: id_ for id_, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    for content in EOS_TOKENS:
        if content in special:
            return special[content]
    return None


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, *, eos_id: int | None = None) -> np.ndarray:
    """Pack tokenized documents into an (n, seq_len) int32 array.

    Each document is followed by `eos_id` (when not None), the documents are concatenated and cut
    into rows of `seq_len` tokens, and the tail shorter than `seq_len` is dropped (n may be 0).
    """
    _check_positive("seq_len", seq_len)
    stream = _join_documents([list(doc) for doc in documents], eos_id)
    num_rows = stream.size // seq_len
    return stream[: num_rows * seq_len].reshape(num_rows, seq_len)


class TokenSequences:
    """Packed token sequences: an (n, seq_len) int32 array, in memory or memory-mapped.

    `rows` optionally selects rows of `tokens` (a split is such a selection, so splitting a
    memory-mapped file copies nothing).
    """

    def __init__(self, tokens: np.ndarray, rows: np.ndarray | None = None):
        if tokens.ndim != 2 or tokens.dtype != np.int32:
            raise DataError(
                f"token sequences must be a 2-D int32 array, got {tokens.ndim}-D {tokens.dtype}; "
                "convert with array.astype(np.int32).reshape(-1, seq_len)"
            )
        self.tokens = tokens
        self.rows = rows

    @classmethod
    def from_stream(cls, sequences: Iterable[np.ndarray], max_sequences: int | None = None) -> TokenSequences:
        """Collect sequences (each (seq_len,) or a (k, seq_len) block) in memory, at most `max_sequences`.

        Stops pulling from `sequences` once `max_sequences` are collected, so a stream is read no
        further than needed.
        """
        if max_sequences is not None:
            _check_positive("max_sequences", max_sequences)
        blocks, count = [], 0
        for item in sequences:
            block = np.atleast_2d(np.asarray(item, dtype=np.int32))
            if max_sequences is not None:
                block = block[: max_sequences - count]
            blocks.append(block)
            count += len(block)
            if max_sequences is not None and count >= max_sequences:
                break
        if count == 0:
            raise DataError("the data stream gave no sequences; use more data or a smaller seq_len")
        return cls(np.concatenate(blocks))

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.tokens.shape[0]

    def __repr__(self) -> str:
        where = "memory-mapped" if isinstance(self.tokens, np.memmap) else "in memory"
        return f"TokenSequences({len(self)} x {self.seq_len} tokens, {where})"

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return self.tokens.shape[1]

    @property
    def num_tokens(self) -> int:
        """Tokens in all sequences together."""
        return len(self) * self.seq_len

    def to_numpy(self) -> np.ndarray:
        """The (n, seq_len) int32 array (a copy when this is a selection of rows)."""
        return self.tokens if self.rows is None else self.tokens[self.rows]

    def split(self, valid_fraction: float, seed: int = 0) -> tuple[TokenSequences, TokenSequences]:
        """Split into (train, valid) by a permutation drawn from `seed` only; rows keep their order."""
        if not 0 < valid_fraction < 1:
            raise DataError(f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction}")
        _check_seed(seed)
        count = len(self)
        num_valid = max(1, round(count * valid_fraction))
        if num_valid >= count:
            raise DataError(
                f"cannot split {count} sequence(s) with valid_fraction={valid_fraction}: nothing would be "
                "left to train on; use more data, a smaller seq_len or a smaller valid_fraction"
            )
        order = np.random.default_rng(seed).permutation(count)
        return self._select(np.sort(order[num_valid:])), self._select(np.sort(order[:num_valid]))

    def head(self, count: int) -> TokenSequences:
        """The first `count` sequences (all of them when there are fewer)."""
        _check_positive("count", count)
        return self._select(np.arange(min(count, len(self))))

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches in one epoch of `batches(batch_size, drop_last=drop_last)`."""
        _check_positive("batch_size", batch_size)
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batch_indices(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        drop_last: bool = True,
    ) -> Iterator[np.ndarray]:
        """Yield the sequence indices (positions in this set, 0..len-1) of each batch of one epoch.

        With `shuffle`, the order is a permutation drawn from (seed, epoch) alone; `start` skips that
        many batches, so resuming at a saved (epoch, start) continues exactly where a run stopped.
        Arguments are checked at the call, not at the first batch.
        """
        total = self.num_batches(batch_size, drop_last)
        if total == 0:
            raise DataError(
                f"batch_size={batch_size} is larger than the {len(self)} sequence(s); "
                "use a smaller batch_size or more data"
            )
        if not 0 <= start <= total:
            raise DataError(f"start={start} is outside the {total} batches of an epoch; check the resume position")
        _check_seed(seed)
        _check_seed(epoch, name="epoch")
        order = np.random.default_rng([seed, epoch]).permutation(len(self)) if shuffle else np.arange(len(self))
        return (order[index * batch_size : (index + 1) * batch_size] for index in range(start, total))

    def take(self, indices: np.ndarray) -> torch.Tensor:
        """The sequences at `indices` (positions in this set) as a (len(indices), seq_len) int64 tensor."""
        rows = indices if self.rows is None else self.rows[indices]
        return torch.from_numpy(self.tokens[rows].astype(np.int64))

    def batches(self, batch_size: int, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Yield (batch_size, seq_len) int64 tensors for one epoch; options as `batch_indices`."""
        return (self.take(picked) for picked in self.batch_indices(batch_size, **kwargs))

    def save(self, path: str | Path) -> Path:
        """Write the sequences to a `.npy` file (int32, shape (n, seq_len)), block by block."""
        path = Path(path)
        if path.suffix != ".npy":
            raise DataError(f"token sequences are saved as .npy; got {path}, use a path ending in .npy")
        source = getattr(self.tokens, "filename", None)  # set for a memory-mapped file
        if source is not None and Path(source).resolve() == path.resolve():
            raise DataError(f"cannot save token sequences over {path}, the file they are read from; pick another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(len(self), self.seq_len))
        for begin in range(0, len(self), ROW_BLOCK):
            rows = slice(begin, begin + ROW_BLOCK)
            out[rows] = self.tokens[rows] if self.rows is None else self.tokens[self.rows[rows]]
        out.flush()
        del out  # close the memory map before anyone reopens the file
        return path

    def blocks(self) -> Iterator[np.ndarray]:
        """The rows in blocks of ROW_BLOCK (a memory-mapped file is read piecewise)."""
        for begin in range(0, len(self), ROW_BLOCK):
            rows = slice(begin, begin + ROW_BLOCK)
            yield np.asarray(self.tokens[rows] if self.rows is None else self.tokens[self.rows[rows]])

    def fingerprint(self) -> str:
        """A short hash of the token ids: the same sequences in the same order, the same fingerprint."""
        digest = hashlib.sha256(f"{len(self)}x{self.seq_len}".encode())
        for block in self.blocks():
            digest.update(np.ascontiguousarray(block).tobytes())
        return digest.hexdigest()[:16]

    def check_ids(self, vocab_size: int, source: str | Path) -> None:
        """Refuse token ids outside [0, vocab_size): they would index past the embedding table."""
        low, high = 0, -1
        for block in self.blocks():
            if block.size:
                low, high = min(low, int(block.min())), max(high, int(block.max()))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise DataError(
                f"{source} holds token id {bad}, outside the model's vocabulary of {vocab_size}: the data was "
                "tokenized for another model (use its tokenizer, or --tokenizer with this model's)"
            )

    def _select(self, indices: np.ndarray) -> TokenSequences:
        return TokenSequences(self.tokens, indices if self.rows is None else self.rows[indices])


def load_sequences(
    source: str | Path,
    *,
    seq_len: int,
    tokenizer: TokenizerLike | None = None,
    text_field: str = "text",
    max_sequences: int | None = None,
    eos_id: int | None = None,
    dataset_split: str = "train",
) -> TokenSequences:
    """Read `source` into packed sequences, stopping once `max_sequences` are packed.

    `source` is a text source (needs `tokenizer`, a Tokenizer or a path for `load_tokenizer`) or a
    token file; see the module docstring. An int32 `.npy` file stays memory-mapped.
    """
    _check_positive("seq_len", seq_len)
    if max_sequences is not None:
        _check_positive("max_sequences", max_sequences)
    path = local_path(source)
    if path is not None and path.suffix.lower() in TOKEN_SUFFIXES:
        return TokenSequences(_as_int32(_token_rows(path, seq_len)[:max_sequences], path))
    blocks = _packed_blocks(source, path, seq_len, tokenizer, text_field, eos_id, dataset_split)
    return TokenSequences.from_stream(blocks, max_sequences)


Split = Literal["all", "train", "valid"]


@dataclass(frozen=True)
class Need:
    """The fewest sequences a step runs on, and how its refusal names them: `words`, what they are for
    ('--samples 8'), and `fewer`, what to ask less of ('--samples')."""

    count: int
    words: str
    fewer: str


@dataclass(frozen=True)
class DataSpec:
    """Which data a step reads, and how much of it.

    `path` is a text source or a token file (module docstring); text is tokenized with `tokenizer` (default:
    the model folder's tokenizer.json) from the field `text_field`. Sequences are `seq_len` tokens. Limits:
    at most `max_sequences` of `split` ("train" / "valid": that part of `TokenSequences.split(valid_fraction,
    seed)` of the whole source; "all": the first ones, read no further) and at least `need.count` of them.
    """

    path: str | Path
    seq_len: int
    tokenizer: str | Path | None = None
    text_field: str = "text"
    max_sequences: int | None = None
    split: Split = "all"
    valid_fraction: float = 0.1
    seed: int = 0
    need: Need | None = None

    def __post_init__(self) -> None:
        if self.split not in ("all", "train", "valid"):
            raise DataError(f"split must be 'all', 'train' or 'valid', got {self.split!r}")


def read_sequences(
    spec: DataSpec, model_dir: str | Path, *, eos_id: int | None, vocab_size: int | None = None
) -> TokenSequences:
    """The sequences of `spec` as the checkpoint in `model_dir` sees them: text tokenized with
    `spec.tokenizer` (default: the folder's tokenizer.json) with the model's `eos_id` after each document,
    token files as they are. With `vocab_size`, ids the model's embedding cannot take are refused; fewer
    sequences than `spec.need` are refused."""
    path = local_path(spec.path)
    token_file = path is not None and path.suffix.lower() in TOKEN_SUFFIXES
    tokenizer = spec.tokenizer
    if not token_file and tokenizer is None:
        if not (Path(model_dir) / "tokenizer.json").is_file():
            raise DataError(f"{model_dir} has no tokenizer.json: pass --tokenizer, or give tokenized data (.npy)")
        tokenizer = model_dir
    sequences = load_sequences(
        spec.path,
        seq_len=spec.seq_len,
        tokenizer=None if token_file else tokenizer,
        text_field=spec.text_field,
        max_sequences=spec.max_sequences if spec.split == "all" else None,  # a split is drawn from all of it
        eos_id=eos_id,
    )
    if vocab_size is not None:
        sequences.check_ids(vocab_size, spec.path)
    if spec.split != "all":
        train, valid = sequences.split(spec.valid_fraction, spec.seed)
        sequences = valid if spec.split == "valid" else train
        if spec.max_sequences is not None:
            sequences = sequences.head(spec.max_sequences)
    need = spec.need
    if need is not None and len(sequences) < need.count:
        raise DataError(
            f"{spec.path} holds {len(sequences)} sequences of {spec.seq_len} tokens, fewer than {need.words}: "
            f"use more data, a smaller --seq-len or fewer {need.fewer}"
        )
    return sequences


def stream_sequences(
    source: str | Path,
    *,
    seq_len: int,
    tokenizer: TokenizerLike | None = None,
    text_field: str = "text",
    eos_id: int | None = None,
    split: Literal["all", "train", "valid"] = "all",
    valid_fraction: float = 0.0,
    seed: int = 0,
    shuffle_buffer: int = 0,
    dataset_split: str = "train",
) -> Iterator[np.ndarray]:
    """Yield packed (seq_len,) int32 sequences from `source` without reading it all into memory.

    With `split` "train" or "valid", sequence i (in source order) belongs to valid when a hash of
    (seed, i) is below `valid_fraction`; the kept sequences then pass through a shuffle buffer of
    `shuffle_buffer` sequences seeded by `seed` (0 or 1: source order). Take the first N into memory
    with `TokenSequences.from_stream(stream, max_sequences=N)`.
    """
    _check_positive("seq_len", seq_len)
    if split not in ("all", "train", "valid"):
        raise DataError(f"split must be 'all', 'train' or 'valid', got {split!r}")
    if split != "all" and not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction must be between 0 and 1 (exclusive) for split={split!r}, got {valid_fraction}")
    if shuffle_buffer < 0:
        raise DataError(f"shuffle_buffer must be 0 or more, got {shuffle_buffer}")
    _check_seed(seed)
    path = local_path(source)
    blocks = _packed_blocks(source, path, seq_len, tokenizer, text_field, eos_id, dataset_split)
    rows = (np.array(row) for block in blocks for row in block)  # own copies: a block is not kept alive
    if split != "all":
        want_valid = split == "valid"
        rows = (row for index, row in enumerate(rows) if _in_valid(seed, index, valid_fraction) == want_valid)
    return _shuffled(rows, shuffle_buffer, seed)


def _in_valid(seed: int, index: int, valid_fraction: float) -> bool:
    """Whether streamed sequence `index` belongs to the validation split; fixed by (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2**64


def _shuffled(rows: Iterator[np.ndarray], buffer_size: int, seed: int) -> Iterator[np.ndarray]:
    """Yield `rows` through a seeded shuffle buffer of `buffer_size` (0 or 1: unchanged order)."""
    if buffer_size <= 1:
        yield from rows
        return
    rng = np.random.default_rng(seed)
    buffer: list[np.ndarray] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        slot = int(rng.integers(buffer_size))
        yield buffer[slot]
        buffer[slot] = row
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def _packed_blocks(
    source: str | Path,
    path: Path | None,
    seq_len: int,
    tokenizer: TokenizerLike | None,
    text_field: str,
    eos_id: int | None,
    dataset_split: str,
) -> Iterator[np.ndarray]:
    """(k, seq_len) int32 blocks of packed sequences from any source, in source order."""
    if path is not None and path.suffix.lower() in TOKEN_SUFFIXES:
        rows = _token_rows(path, seq_len)
        return (_as_int32(rows[begin : begin + ROW_BLOCK], path) for begin in range(0, len(rows), ROW_BLOCK))
    if tokenizer is None:
        raise DataError(
            f"{source} is text and needs a tokenizer: pass a checkpoint folder containing tokenizer.json "
            "or a tokenizer.json file"
        )
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    eos_id = _resolve_eos_id(tokenizer, eos_id)
    dataset, field = _open_text(source, path, text_field, dataset_split)
    documents = _document_batches(dataset, field, source)
    return _cut_rows(_encode(documents, tokenizer, eos_id), seq_len, source)


def local_path(source: str | Path) -> Path | None:
    """The local file or folder `source` names, or None for a Hub dataset name. A DataError for a path
    that does not exist or a file of a format not read: what a dry run checks of its `--data` too."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix not in TEXT_BUILDERS and suffix not in TOKEN_SUFFIXES:
        raise DataError(
            f"unknown data format {suffix or '(no extension)'!r} for {source}: use .txt, .jsonl, .json, "
            ".parquet, a saved dataset folder (text) or .npy, .safetensors (token ids)"
        )
    if path.exists():
        return path
    looks_local = isinstance(source, Path) or str(source).startswith((".", "/", "~"))
    if looks_local or suffix in TEXT_BUILDERS or suffix in TOKEN_SUFFIXES:
        raise DataError(f"data not found: {source} does not exist; check the path")
    return None


def _open_text(source: str | Path, path: Path | None, text_field: str, dataset_split: str) -> tuple[Any, str]:
    """The `datasets` dataset holding the documents of a text source, and the field with the text."""
    import datasets  # imported here: it takes about a second and only text sources need it
    import huggingface_hub

    # what goes wrong reading a source is one DataError line: datasets' own log of a malformed file and the
    # Hub client's retry warnings would print above it
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    huggingface_hub.utils.logging.set_verbosity(huggingface_hub.utils.logging.CRITICAL)
    if path is None:
        try:
            return datasets.load_dataset(str(source), split=dataset_split, streaming=True), text_field
        except Exception as err:  # network, auth, unknown names and splits all raise differently
            raise DataError(
                f"cannot load dataset {source!r} (split {dataset_split!r}) from the Hugging Face Hub: "
                f"{first_line(err)}; check the name and network access, or pass a local file"
            ) from err
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if dataset_split not in dataset:
                raise DataError(
                    f"saved dataset {path} has no split {dataset_split!r} (splits: {', '.join(dataset)}); "
                    "pass dataset_split naming one of them"
                )
            dataset = dataset[dataset_split]
        return dataset, text_field
    files = [path] if path.is_file() else _data_files(path)
    builder = TEXT_BUILDERS[files[0].suffix.lower()]
    options = {"sample_by": "document"} if builder == "text" else {}
    dataset = datasets.load_dataset(
        builder, data_files=[str(file) for file in files], split="train", streaming=True, **options
    )
    return dataset, "text" if builder == "text" else text_field


def _data_files(folder: Path) -> list[Path]:
    """The text data files directly inside `folder`, sorted by name; all of one format."""
    files = sorted(file for file in folder.iterdir() if file.is_file() and file.suffix.lower() in FOLDER_SUFFIXES)
    if not files:
        raise DataError(
            f"folder {folder} holds no .txt, .jsonl or .parquet files and is not a saved dataset; "
            "pass a folder of text files or a single file"
        )
    builders = {TEXT_BUILDERS[file.suffix.lower()] for file in files}
    if len(builders) > 1:
        raise DataError(
            f"folder {folder} mixes data formats ({', '.join(sorted(builders))}); keep one format per folder"
        )
    return files


def _document_batches(dataset: Any, field: str, source: str | Path) -> Iterator[list[str]]:
    """Lists of non-empty documents from a `datasets` dataset, DOCUMENT_BATCH at a time."""
    if dataset.features is not None and field not in dataset.features:
        raise _missing_field(source, field, list(dataset.features))
    try:
        for batch in dataset.iter(batch_size=DOCUMENT_BATCH):
            if field not in batch:
                raise _missing_field(source, field, list(batch))
            documents = []
            for text in batch[field]:
                if text is None or text == "":  # a record without text adds nothing
                    continue
                if not isinstance(text, str):
                    raise DataError(
                        f"field {field!r} of {source} holds {type(text).__name__} values, not text; "
                        "pass text_field naming the field with the documents"
                    )
                documents.append(text)
            yield documents
    except (ValueError, OSError) as err:  # malformed JSON/parquet, bad encoding, unreadable file
        raise DataError(f"cannot read {source}: {first_line(err)}") from err


def _missing_field(source: str | Path, field: str, fields: list[str]) -> DataError:
    return DataError(
        f"{source} has no {field!r} field (fields: {', '.join(fields) or 'none'}); "
        "pass text_field naming the field with the documents"
    )


def _encode(batches: Iterable[list[str]], tokenizer: Tokenizer, eos_id: int | None) -> Iterator[np.ndarray]:
    """Flat int32 token chunks: each document's ids followed by `eos_id` (when not None)."""
    # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which packing never reads: 2x faster.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    for documents in batches:
        if documents:
            with tokenizer_panics("in use"):
                encodings = encode_batch(documents, add_special_tokens=False)
            yield _join_documents([encoding.ids for encoding in encodings], eos_id)


def _join_documents(ids: list[list[int]], eos_id: int | None) -> np.ndarray:
    """Concatenate token id lists into one int32 stream, with `eos_id` after each list."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if stream.size and (stream.min() < 0 or stream.max() > INT32_MAX):
        raise DataError(f"token ids must lie in 0..{INT32_MAX}, got {stream.min()}..{stream.max()}")
    stream = stream.astype(np.int32)
    if eos_id is None:
        return stream
    return np.insert(stream, np.cumsum(lengths), np.int32(eos_id))


def _cut_rows(chunks: Iterable[np.ndarray], seq_len: int, source: str | Path) -> Iterator[np.ndarray]:
    """Cut a stream of flat token chunks into (k, seq_len) blocks, carrying each tail to the next chunk.

    Raises DataError at the end when the whole stream was shorter than one sequence.
    """
    tail = np.empty(0, dtype=np.int32)
    seen_tokens, packed_any = 0, False
    for chunk in chunks:
        seen_tokens += chunk.size
        stream = np.concatenate([tail, chunk])
        num_rows = stream.size // seq_len
        if num_rows:
            packed_any = True
            yield stream[: num_rows * seq_len].reshape(num_rows, seq_len)
        tail = stream[num_rows * seq_len :]
    if not packed_any:
        _raise_too_short(source, seen_tokens, seq_len)


def _raise_too_short(source: str | Path, num_tokens: int, seq_len: int) -> None:
    if num_tokens == 0:
        raise DataError(f"{source} is empty after tokenization: no tokens; check the data and text_field")
    raise DataError(
        f"{source} has only {num_tokens} tokens, fewer than seq_len={seq_len}; use a smaller seq_len or more data"
    )


def _token_rows(path: Path, seq_len: int) -> np.ndarray:
    """A token file as an (n, seq_len) integer array; a view of the memory map for `.npy`."""
    tokens = _read_token_array(path)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path} holds {tokens.dtype} values, not integer token ids; save the ids as int32")
    if tokens.ndim == 2 and tokens.shape[1] == seq_len:
        rows = tokens
    elif tokens.ndim in (1, 2):
        stream = tokens.reshape(-1)
        num_rows = stream.size // seq_len
        rows = stream[: num_rows * seq_len].reshape(num_rows, seq_len)
    else:
        raise DataError(
            f"{path} holds an array of shape {tokens.shape}; token arrays must be 1-D (a token stream) "
            "or 2-D (sequences, seq_len)"
        )
    if len(rows) == 0:
        _raise_too_short(path, tokens.size, seq_len)
    return rows


def _read_token_array(path: Path) -> np.ndarray:
    """The token array in a `.npy` (memory-mapped, never unpickled) or `.safetensors` file."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with safe_open(str(path), framework="numpy") as file:
            names = list(file.keys())
            if "tokens" in names:
                return file.get_tensor("tokens")
            if len(names) == 1:
                return file.get_tensor(names[0])
    except (ValueError, OSError, SafetensorError) as err:
        raise DataError(f"cannot read token file {path}: {first_line(err)}") from err
    raise DataError(
        f"{path} holds tensors {names or 'none'} but none named 'tokens'; "
        "name the token tensor 'tokens' or keep only one tensor in the file"
    )


def _as_int32(rows: np.ndarray, path: Path) -> np.ndarray:
    """`rows` as int32, checking that the ids fit."""
    if rows.dtype == np.int32:
        return rows
    if rows.size and rows.min() < 0:
        raise DataError(f"{path} has negative token ids (the least is {rows.min()}); token ids count from 0")
    if rows.size and rows.max() > INT32_MAX:
        raise DataError(f"{path} has token ids above {INT32_MAX} (the largest is {rows.max()}); they must fit int32")
    return rows.astype(np.int32)


def _resolve_eos_id(tokenizer: Tokenizer, eos_id: int | None) -> int | None:
    """`eos_id` checked against the vocabulary, or the tokenizer's own EOS when None."""
    if eos_id is None:
        return find_eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"eos_id={eos_id} is outside the tokenizer's vocabulary (0..{vocab_size - 1})")
    return eos_id


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def _check_seed(value: int, name: str = "seed") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"{name} must be a non-negative integer, got {value!r}")
