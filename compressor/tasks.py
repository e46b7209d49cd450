"""Synthetic retrieval tasks: phonebook, multi-query associative recall (MQAR) and needle in a haystack.

The tasks are built from a checkpoint's tokenizer, deterministic by seed, and need no download. They
measure what next-token loss on short text does not: whether a model can find and copy something it saw
far back in its context, the job hybrids keep attention for.

Vocabulary (`TaskVocabulary`): words are the tokenizer's single-token words (a token that decodes to a
space and 3+ letters and encodes back to itself), numbers are single digit tokens 0-9, plus the tokens of
":" and a newline. Sequences are written as token ids, so names and numbers are unambiguous whatever the
tokenizer would merge in running text.

Every generator fills each requested context with exactly `context` tokens, the number of entries
growing with the context; what is left after the last query (fewer tokens than one entry) is EOS.

- phonebook: entries `first last:dddd\\n` (a name of `name_words` random words, a number of `digits`
  digit tokens; names distinct within a sequence), then `queries` entries of the book repeated in the
  same form, in random order. The answer of a query is its number.
- mqar: key/value pairs `k v k v ...` (keys and values from disjoint halves of the word list; a key has
  as many tokens as needed for the pairs to have distinct keys, one when the word list suffices), then
  `queries` distinct keys of the book, each followed by its value. The answer is the value.
- needle: filler text from `data` (read with `compressor.data`, e.g. examples/data/valid.txt) with the
  sentence ` The secret number of first last is dddd.` inserted at a depth (the share of the filler
  before it; the sequences cycle through `depths`), and at the end a newline and the same sentence
  again. The answer is the number; one query per sequence.

Scoring is teacher-forced (`score`): a query is correct when every answer token is the model's argmax
given the true prefix (exact match); the log-likelihood is the mean log-probability of the answer tokens
(nats per token). The prefill runs chunk by chunk through the model's `HybridCache`, and logits are formed
only at the positions that predict an answer token, so memory stays at the cache plus one chunk's
activations (16k tokens of the example model: well under 1 GiB).

Three entry points: `evaluate_task` (every context, a `TaskResult` each: `compress eval --task`),
`TaskScorer` (one task and context, `scorer(model) -> float`, for candidate scoring; `skip_blocks` scores
the model with blocks skipped), and `block_drop_effect` (the score each block's removal costs: a drop-one
importance signal measured on retrieval). `RetrievalConfig` is how the decisions ask for a scorer (task,
context, sequences, seed): importance's `--drop-one retrieval`, prune/search `--score ...+retrieval` and
distillation's `--eval-task`.

Decisions rank by the answer log-likelihood, not by accuracy: exact match moves in steps of one query and
is flat (zero) on a model that does not retrieve at all, while the log-likelihood of the answers falls
smoothly as the blocks that carry retrieval are removed. Accuracy is recorded beside it.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from compressor.budget import Precision, check_fits, estimate_memory, parse_context
from compressor.data import find_eos_id, load_sequences
from compressor.errors import CompressorError
from compressor.model import HybridLM

TASKS = ("phonebook", "mqar", "needle")
METRICS = ("accuracy", "log_likelihood")
# A single-token word: the token decodes to one space and at least three ASCII letters.
WORD = re.compile(r" [A-Za-z]{3,}")
# Fewest single-token words a tokenizer must have: names and keys are drawn from them.
MIN_WORDS = 64
NEEDLE_PREFIX = " The secret number of"
NEEDLE_VERB = " is"
NEEDLE_END = "."
FILLER_ROWS = 256  # the needle's filler is drawn from the first of these (at least 4 per sequence) of the data


@dataclass(frozen=True)
class TaskSpec:
    """What to generate: the task, how many sequences per context and the shape of each.

    sequences: sequences per context; queries: queries per sequence (phonebook, mqar; needle has one);
    digits: digit tokens per number (phonebook, needle); name_words: words per name (phonebook, needle);
    depths: needle depths, cycled over the sequences; data: the needle's filler text.
    """

    task: str = "phonebook"
    sequences: int = 8
    queries: int = 16
    digits: int = 4
    name_words: int = 2
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    data: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CompressorError(f"unknown task {self.task!r}: choose {', '.join(TASKS)}")
        for name in ("sequences", "queries", "digits", "name_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressorError(f"task {name} must be a positive integer, got {value!r}")
        if not self.depths or any(not 0.0 <= depth <= 1.0 for depth in self.depths):
            raise CompressorError(f"needle depths must lie in 0..1, got {self.depths}")
        if self.task == "needle" and self.data is None:
            raise CompressorError("the needle task hides its sentence in filler text: pass data (e.g. --data FILE.txt)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CompressorError(f"task seed must be a non-negative integer, got {self.seed!r}")

    def replace(self, **changes) -> TaskSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TaskVocabulary:
    """The tokens the tasks are written with, found in a tokenizer."""

    words: np.ndarray  # (W,) int64 ids of single-token words
    digits: np.ndarray  # (10,) int64 ids of "0".."9"
    colon: int
    newline: int
    eos: int  # fills the tail of a sequence (the tokenizer's EOS, or the newline)
    needle_prefix: np.ndarray  # tokens of NEEDLE_PREFIX
    needle_verb: np.ndarray
    needle_end: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> TaskVocabulary:
        """Find the task tokens; a tokenizer lacking them raises CompressorError naming what is missing."""
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        texts = tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=True)
        candidates = [i for i, text in enumerate(texts) if WORD.fullmatch(text)]
        encoded = tokenizer.encode_batch([texts[i] for i in candidates], add_special_tokens=False)
        words = np.array([i for i, enc in zip(candidates, encoded, strict=True) if enc.ids == [i]], dtype=np.int64)
        if len(words) < MIN_WORDS:
            raise CompressorError(
                f"the tokenizer has {len(words)} single-token words (a space and 3+ letters), fewer than the "
                f"{MIN_WORDS} the retrieval tasks draw names and keys from; use a checkpoint with a larger vocabulary"
            )
        digits = [_single_token(tokenizer, str(d), "digit") for d in range(10)]
        newline = _single_token(tokenizer, "\n", "newline")
        eos = find_eos_id(tokenizer)

        def encode(text: str) -> np.ndarray:
            return np.array(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

        return cls(
            words=words,
            digits=np.array(digits, dtype=np.int64),
            colon=_single_token(tokenizer, ":", "colon"),
            newline=newline,
            eos=newline if eos is None else eos,
            needle_prefix=encode(NEEDLE_PREFIX),
            needle_verb=encode(NEEDLE_VERB),
            needle_end=encode(NEEDLE_END),
        )


def _single_token(tokenizer: Tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise CompressorError(
            f"the tokenizer splits the {what} {text!r} into {len(ids)} tokens; the retrieval tasks need it as one token"
        )
    return ids[0]


@dataclass
class TaskExamples:
    """Generated sequences of one task at one context, and where their answers are.

    `query[i, p]` is the query (numbered over the whole set) whose answer token sits at position p of
    sequence i, or -1 where no answer token is.
    """

    task: str
    context: int
    tokens: torch.Tensor  # (sequences, context) int64
    query: torch.Tensor  # (sequences, context) int64
    num_queries: int

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class TaskResult:
    """One model on one task at one context.

    accuracy: share of queries whose every answer token is the argmax (teacher-forced exact match);
    log_likelihood: mean log-probability of the answer tokens (nats per token); seconds: scoring time.
    """

    task: str
    context: int
    accuracy: float
    log_likelihood: float
    queries: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TaskResult:
        return cls(**raw)


def parse_contexts(text: str | Sequence[str | int]) -> tuple[int, ...]:
    """Context lengths from '1k,4k,16k' (or a list of such): token counts, k = 1024, in the given order."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    contexts = tuple(part if isinstance(part, int) else parse_context(part.strip()) for part in parts if part != "")
    if not contexts:
        raise CompressorError(f"no context lengths in {text!r}: write them like 1k,4k,16k")
    return contexts


@dataclass(frozen=True)
class RetrievalConfig:
    """A retrieval probe for decisions: `sequences` sequences of `task` at `context` tokens (16 queries each)."""

    task: str = "phonebook"
    context: int = 1024
    sequences: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CompressorError(f"unknown task {self.task!r}: choose {', '.join(TASKS)}")
        _check_positive("retrieval context", self.context)
        _check_positive("retrieval sequences", self.sequences)

    def scorer(
        self,
        tokenizer: Tokenizer | str | Path,
        data: str | None = None,
        *,
        model: HybridLM | None = None,
        parameter: str = "retrieval_ctx",
    ) -> TaskScorer:
        """Its examples generated once, scored by answer log-likelihood (`data`: the needle's filler text).
        With the `model` it will score, the context is first checked against the free memory
        (`check_task_fits`, refusing with an OptionError naming `parameter`)."""
        if model is not None:
            check_task_fits(
                model, self.sequences, [self.context], batch_size=TaskScorer.batch_size, parameter=parameter
            )
        spec = TaskSpec(self.task, sequences=self.sequences, data=data, seed=self.seed)
        return TaskScorer.build(spec, tokenizer, self.context, "log_likelihood")


# --- generators -------------------------------------------------------------------------------------------


def make_examples(
    spec: TaskSpec, tokenizer: Tokenizer | None, context: int, vocab: TaskVocabulary | None = None
) -> TaskExamples:
    """`spec.sequences` sequences of `context` tokens each; the same (spec, tokenizer, context) gives the same.

    `vocab` (default: found in `tokenizer`) is reused across calls; the needle also reads its filler
    with `tokenizer`, the other tasks need only `vocab`.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise CompressorError(f"context must be a positive number of tokens, got {context!r}")
    if tokenizer is None and (vocab is None or spec.task == "needle"):
        raise CompressorError(f"the {spec.task} task needs the model's tokenizer")
    vocab = vocab if vocab is not None else TaskVocabulary.from_tokenizer(tokenizer)
    rng = np.random.default_rng([spec.seed, TASKS.index(spec.task), context])
    if spec.task == "needle":
        rows, answers = _needle(spec, tokenizer, vocab, context, rng)
    else:
        generate = _phonebook if spec.task == "phonebook" else _mqar
        rows, answers = zip(*(generate(spec, vocab, context, rng) for _ in range(spec.sequences)), strict=True)
    tokens = np.stack(rows)  # (sequences, context)
    query = np.full(tokens.shape, -1, dtype=np.int64)
    count = 0
    for i, positions in enumerate(answers):  # positions: (queries, answer_len) in sequence i
        query[i, positions] = count + np.arange(len(positions))[:, None]
        count += len(positions)
    return TaskExamples(spec.task, context, torch.from_numpy(tokens), torch.from_numpy(query), count)


def _phonebook(spec: TaskSpec, vocab: TaskVocabulary, context: int, rng: np.random.Generator):
    """One phonebook sequence and its answer positions (queries, digits)."""
    name_len, digits = spec.name_words, spec.digits
    entry_len = name_len + 1 + digits + 1  # name, ":", number, newline
    entries = context // entry_len - spec.queries
    _check_room(spec, context, entries, entry_len * 2 * spec.queries)
    names = _distinct_tuples(rng, vocab.words, name_len, entries)  # (entries, name_len)
    numbers = vocab.digits[rng.integers(0, 10, size=(entries, digits))]
    book = np.concatenate(
        [names, np.full((entries, 1), vocab.colon), numbers, np.full((entries, 1), vocab.newline)], axis=1
    )  # (entries, entry_len)
    asked = rng.choice(entries, spec.queries, replace=False)
    sequence = _fill(np.concatenate([book.ravel(), book[asked].ravel()]), context, vocab.eos)
    starts = entries * entry_len + np.arange(spec.queries) * entry_len + name_len + 1
    return sequence, starts[:, None] + np.arange(digits)


def _mqar(spec: TaskSpec, vocab: TaskVocabulary, context: int, rng: np.random.Generator):
    """One MQAR sequence and its answer positions (queries, 1)."""
    half = len(vocab.words) // 2
    keys_from, values_from = vocab.words[:half], vocab.words[half:]
    key_len = 1
    while half**key_len < context // (key_len + 1) - spec.queries:  # too few distinct keys of this length
        key_len += 1
    pair_len = key_len + 1
    pairs = context // pair_len - spec.queries
    _check_room(spec, context, pairs, pair_len * 2 * spec.queries)
    keys = _distinct_tuples(rng, keys_from, key_len, pairs)  # (pairs, key_len)
    values = values_from[rng.integers(0, len(values_from), size=(pairs, 1))]
    book = np.concatenate([keys, values], axis=1)  # (pairs, pair_len)
    asked = rng.choice(pairs, spec.queries, replace=False)
    sequence = _fill(np.concatenate([book.ravel(), book[asked].ravel()]), context, vocab.eos)
    answers = pairs * pair_len + np.arange(spec.queries) * pair_len + key_len
    return sequence, answers[:, None]


def _needle(spec: TaskSpec, tokenizer: Tokenizer, vocab: TaskVocabulary, context: int, rng: np.random.Generator):
    """All needle sequences and their answer positions ((1, digits) each)."""
    sentence_len = len(vocab.needle_prefix) + spec.name_words + len(vocab.needle_verb) + spec.digits
    sentence_len += len(vocab.needle_end)
    filler_len = context - 2 * sentence_len - 1  # filler, needle, newline, the sentence again
    if filler_len < 1:
        raise CompressorError(
            f"context {context} is too short for the needle task: use at least {2 * sentence_len + 2} tokens"
        )
    rows = max(FILLER_ROWS, 4 * spec.sequences)  # read no further into the data than the picks need
    filler = load_sequences(spec.data, seq_len=filler_len, tokenizer=tokenizer, max_sequences=rows).to_numpy()
    picked = rng.integers(0, len(filler), size=spec.sequences)
    rows, answers = [], []
    for i in range(spec.sequences):
        name = _distinct_tuples(rng, vocab.words, spec.name_words, 1)[0]
        number = vocab.digits[rng.integers(0, 10, size=spec.digits)]
        lead = np.concatenate([vocab.needle_prefix, name, vocab.needle_verb])
        sentence = np.concatenate([lead, number, vocab.needle_end])
        at = round(spec.depths[i % len(spec.depths)] * filler_len)
        text = filler[picked[i]].astype(np.int64)
        rows.append(np.concatenate([text[:at], sentence, text[at:], [vocab.newline], sentence]))
        start = context - sentence_len + len(lead)
        answers.append(start + np.arange(spec.digits)[None, :])
    return rows, answers


def _distinct_tuples(rng: np.random.Generator, pool: np.ndarray, length: int, count: int) -> np.ndarray:
    """`count` distinct tuples of `length` tokens from `pool`, as a (count, length) array."""
    if count > len(pool) ** length:
        raise CompressorError(
            f"{len(pool)} words make only {len(pool) ** length} distinct names of {length} word(s), fewer than "
            f"the {count} entries this context needs: use more words per name or a shorter context"
        )
    codes = rng.choice(len(pool) ** length, size=count, replace=False)
    places = len(pool) ** np.arange(length - 1, -1, -1)
    return pool[(codes[:, None] // places) % len(pool)]


def _fill(tokens: np.ndarray, context: int, eos: int) -> np.ndarray:
    """`tokens` followed by EOS up to `context` tokens."""
    return np.concatenate([tokens, np.full(context - len(tokens), eos, dtype=np.int64)])


# Host bytes per token of one generated sequence: its tokens and answer map (int64 each), plus the arrays
# a generator builds it from (the book, its repeat, the filled row) while it runs.
EXAMPLE_BYTES_PER_TOKEN = 2 * 8
GENERATION_BYTES_PER_TOKEN = 4 * 8


def check_task_fits(
    model: HybridLM, sequences: int, contexts: Sequence[int], *, batch_size: int = 4, parameter: str = "contexts"
) -> None:
    """Refuse (an OptionError naming `parameter`) a context whose examples (`sequences` of it, on the host)
    and scoring cache (`batch_size` of them, on the model's device) would not fit the free memory, before
    anything of that size is generated: `compressor.budget.check_fits`, the check `compress generate`
    runs for its tokens."""
    device = model.lm_head.weight.device
    weight = {torch.float32: "fp32", torch.float16: "fp16"}.get(model.lm_head.weight.dtype, "bf16")
    batch = min(batch_size, sequences)
    for context in contexts:
        host = (EXAMPLE_BYTES_PER_TOKEN * sequences + GENERATION_BYTES_PER_TOKEN) * context
        cache = estimate_memory(model.config, context, batch, precision=Precision(weight), prefill_chunk=0).cache
        what = f"{sequences} sequences of {context:,} tokens"
        if device.type == "cpu":  # examples and cache share the host's memory
            host, what = host + cache, f"{what} and their cache"
        else:
            check_fits(cache, device, parameter=parameter, what=f"the cache for {what}", too="long")
        check_fits(host, "cpu", parameter=parameter, what=f"memory for {what}", too="long")


def _check_room(spec: TaskSpec, context: int, entries: int, needed: int) -> None:
    if entries < spec.queries:
        raise CompressorError(
            f"context {context} is too short for {spec.task} with {spec.queries} queries per sequence: "
            f"use at least {needed} tokens or fewer queries"
        )


# --- scoring ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def score(
    model: HybridLM,
    examples: TaskExamples,
    *,
    batch_size: int = 4,
    prefill_chunk: int = 1024,
    skip_blocks: Collection[int] = (),
) -> TaskResult:
    """Teacher-forced exact match and answer log-likelihood of `model` on `examples`.

    Each batch is prefilled `prefill_chunk` tokens at a time through a `HybridCache`; only the positions
    that predict an answer token go through the output head. `skip_blocks` (block indices) are passed
    over, as if removed, without copying the model.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("prefill_chunk", prefill_chunk)
    vocab_size = model.config.vocab_size
    if int(examples.tokens.max()) >= vocab_size:
        raise CompressorError(
            f"the task uses token ids up to {int(examples.tokens.max())} but the model's vocabulary has "
            f"{vocab_size}: build the task from the model's own tokenizer"
        )
    start = time.perf_counter()
    device = model.lm_head.weight.device
    hits = torch.zeros(examples.num_queries, dtype=torch.int64)  # answer tokens that are the argmax
    lengths = torch.zeros(examples.num_queries, dtype=torch.int64)  # answer tokens per query
    log_likelihood = torch.zeros((), dtype=torch.float64)
    for first in range(0, len(examples), batch_size):
        ids = examples.tokens[first : first + batch_size]
        # position p is scored when its next token is an answer token
        target_query = examples.query[first : first + batch_size, 1:]  # (b, context - 1)
        last = int(torch.nonzero(target_query.ge(0).any(0)).max()) + 1  # positions after it need no prefill
        cache = model.allocate_cache(ids.shape[0], last)
        for begin in range(0, last, prefill_chunk):
            end = min(begin + prefill_chunk, last)
            chunk_query = target_query[:, begin:end]
            scored = chunk_query.ge(0)
            labels = ids[:, begin + 1 : end + 1][scored]
            out = model(
                ids[:, begin:end].to(device),
                cache,
                skip_blocks=skip_blocks,
                head=lambda hidden, weight, scored=scored, labels=labels: _answer_head(hidden, weight, scored, labels),
            )
            if out is None:
                continue
            logp, hit = out
            queries = chunk_query[scored]
            hits.index_add_(0, queries, hit.cpu().long())
            lengths.index_add_(0, queries, torch.ones_like(queries))
            log_likelihood += logp.double().sum().cpu()
    return TaskResult(
        task=examples.task,
        context=examples.context,
        accuracy=float(hits.eq(lengths).double().mean()),
        log_likelihood=float(log_likelihood / lengths.sum()),
        queries=examples.num_queries,
        seconds=time.perf_counter() - start,
    )


def _answer_head(hidden: torch.Tensor, weight: torch.Tensor, scored: torch.Tensor, labels: torch.Tensor):
    """Log-probability of each answer token and whether it is the argmax, from the scored positions only."""
    if not bool(scored.any()):
        return None
    rows = hidden[scored.to(hidden.device)].float()  # (answers, hidden)
    logp = (rows @ weight.float().T).log_softmax(-1)  # (answers, vocab)
    labels = labels.to(logp.device)
    return logp.gather(1, labels[:, None])[:, 0], logp.argmax(-1).eq(labels)


def evaluate_task(
    model: HybridLM,
    tokenizer: Tokenizer,
    spec: TaskSpec,
    contexts: Sequence[int],
    *,
    batch_size: int = 4,
    prefill_chunk: int = 1024,
    skip_blocks: Collection[int] = (),
) -> list[TaskResult]:
    """`model` on `spec`'s task at each context (the same sequences for every model given the same spec).
    Every context is checked against the free memory first (`check_task_fits`)."""
    check_task_fits(model, spec.sequences, contexts, batch_size=batch_size)
    vocab = TaskVocabulary.from_tokenizer(tokenizer)
    return [
        score(
            model,
            make_examples(spec, tokenizer, context, vocab),
            batch_size=batch_size,
            prefill_chunk=prefill_chunk,
            skip_blocks=skip_blocks,
        )
        for context in contexts
    ]


@dataclass
class TaskScorer:
    """One number per model (higher is better) on fixed examples: for ranking pruning candidates.

    `scorer(model)` is the accuracy or the answer log-likelihood (`metric`); `scorer.result(model)` the
    whole `TaskResult`. Both take `skip_blocks` to score the model with those blocks skipped.
    """

    examples: TaskExamples
    metric: Literal["accuracy", "log_likelihood"] = "accuracy"
    batch_size: int = 4
    prefill_chunk: int = 1024

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise CompressorError(f"unknown retrieval metric {self.metric!r}: choose {', '.join(METRICS)}")

    @classmethod
    def build(
        cls,
        spec: TaskSpec,
        tokenizer: Tokenizer | str | Path,
        context: int,
        metric: Literal["accuracy", "log_likelihood"] = "accuracy",
        **options,
    ) -> TaskScorer:
        """Generate the examples once (`tokenizer` may be a checkpoint folder or tokenizer.json)."""
        if not isinstance(tokenizer, Tokenizer):
            from compressor.data import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        return cls(make_examples(spec, tokenizer, context), metric, **options)

    def result(self, model: HybridLM, skip_blocks: Collection[int] = ()) -> TaskResult:
        return score(
            model, self.examples, batch_size=self.batch_size, prefill_chunk=self.prefill_chunk, skip_blocks=skip_blocks
        )

    def __call__(self, model: HybridLM, skip_blocks: Collection[int] = ()) -> float:
        return getattr(self.result(model, skip_blocks), self.metric)


def block_drop_effect(model: HybridLM, scorer: TaskScorer) -> torch.Tensor:
    """(blocks,) how much the score falls when each block alone is skipped (higher: the block matters more)."""
    full = scorer(model)
    return torch.tensor([full - scorer(model, skip_blocks={i}) for i in range(model.config.num_blocks)])


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CompressorError(f"{name} must be a positive integer, got {value!r}")
