"""Tests for compressor/data.py: readers, packing, split, batches, streaming and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from compressor import data
from compressor.data import (
    DataSpec,
    Need,
    TokenSequences,
    find_eos_id,
    load_sequences,
    load_tokenizer,
    pack_documents,
    read_sequences,
    stream_sequences,
)
from compressor.errors import DataError

datasets.disable_progress_bars()

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine, or so the tailors say.",
    "Café owners open early; the bakers open earlier still.",
    "Rivers run to the sea, and the sea is never full.",
    "Two roads diverged in a wood, and I took the one less travelled by.",
    "All that glitters is not gold.",
    "The fox and the dog became friends after all.",
]
SEQ_LEN = 8
EOS = 2  # "</s>", the third special token of the fixture tokenizer


def train_tokenizer(special_tokens: list[str]) -> Tokenizer:
    """A tiny byte-level BPE (vocab 200) trained on DOCS, special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=200, special_tokens=special_tokens))
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """<pad>=0, <s>=1, </s>=2, as in nemotron_h."""
    return train_tokenizer(["<pad>", "<s>", "</s>"])


def reference_rows(tokenizer: Tokenizer, docs: list[str], seq_len: int, eos: int | None = EOS) -> np.ndarray:
    """Packing written out by hand: ids of each document, then eos, concatenated, cut, tail dropped."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc, add_special_tokens=False).ids + ([] if eos is None else [eos])
    num_rows = len(stream) // seq_len
    return np.array(stream[: num_rows * seq_len], dtype=np.int32).reshape(num_rows, seq_len)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_txt_folder(tmp: Path, docs: list[str]) -> Path:
    folder = tmp / "txt"
    folder.mkdir()
    for index, doc in enumerate(docs):
        (folder / f"doc_{index:02d}.txt").write_text(doc)
    (folder / "tokenizer.json").write_text("{}")  # metadata beside the text is not data
    return folder


def write_jsonl_file(tmp: Path, docs: list[str]) -> Path:
    return write_jsonl(tmp / "docs.jsonl", [{"id": i, "text": doc} for i, doc in enumerate(docs)])


def write_json_array(tmp: Path, docs: list[str]) -> Path:
    path = tmp / "docs.json"
    path.write_text(json.dumps([{"text": doc} for doc in docs]))
    return path


def write_parquet(tmp: Path, docs: list[str]) -> Path:
    path = tmp / "docs.parquet"
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
    return path


def write_jsonl_shards(tmp: Path, docs: list[str]) -> Path:
    folder = tmp / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-1.jsonl", [{"text": doc} for doc in docs[3:]])
    write_jsonl(folder / "part-0.jsonl", [{"text": doc} for doc in docs[:3]])  # name order, not write order
    return folder


def write_saved_dataset(tmp: Path, docs: list[str]) -> Path:
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp / "saved"))
    return tmp / "saved"


def write_saved_dataset_dict(tmp: Path, docs: list[str]) -> Path:
    splits = {
        "train": datasets.Dataset.from_dict({"text": docs}),
        "test": datasets.Dataset.from_dict({"text": ["x"]}),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp / "saved_dict"))
    return tmp / "saved_dict"


WRITERS = {
    "txt folder": write_txt_folder,
    "jsonl": write_jsonl_file,
    "json array": write_json_array,
    "parquet": write_parquet,
    "jsonl shards": write_jsonl_shards,
    "save_to_disk": write_saved_dataset,
    "save_to_disk dict": write_saved_dataset_dict,
}


# Readers and packing.


def test_load_tokenizer_from_folder_or_file(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        assert load_tokenizer(path).encode(DOCS[0]).ids == tokenizer.encode(DOCS[0]).ids


def test_find_eos_id(tokenizer):
    assert find_eos_id(tokenizer) == EOS
    gpt_style = Tokenizer(models.BPE())
    gpt_style.add_special_tokens(["<|pad|>", "<|endoftext|>"])
    assert find_eos_id(gpt_style) == 1
    assert find_eos_id(Tokenizer(models.BPE())) is None


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_text_format_gives_the_same_sequences(fmt, tokenizer, tmp_path, monkeypatch):
    # Two documents per tokenizer call, so sequences also straddle encode batches.
    monkeypatch.setattr(data, "DOCUMENT_BATCH", 2)
    source = WRITERS[fmt](tmp_path, DOCS)
    sequences = load_sequences(source, seq_len=SEQ_LEN, tokenizer=tokenizer)
    np.testing.assert_array_equal(sequences.to_numpy(), reference_rows(tokenizer, DOCS, SEQ_LEN))
    assert sequences.to_numpy().dtype == np.int32


def test_txt_file_is_one_document(tokenizer, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(DOCS))
    sequences = load_sequences(path, seq_len=SEQ_LEN, tokenizer=tokenizer)
    np.testing.assert_array_equal(sequences.to_numpy(), reference_rows(tokenizer, ["\n\n".join(DOCS)], SEQ_LEN))
    # One document means a single EOS, and it sits in the dropped tail unless the length divides evenly.
    assert (sequences.to_numpy() == EOS).sum() <= 1


def test_packing_is_exact(tokenizer, tmp_path):
    source = write_jsonl_file(tmp_path, DOCS)
    ids = [tokenizer.encode(doc, add_special_tokens=False).ids for doc in DOCS]
    stream = [token for doc_ids in ids for token in [*doc_ids, EOS]]
    for seq_len in (1, 5, SEQ_LEN, 13, len(stream)):
        rows = load_sequences(source, seq_len=seq_len, tokenizer=tokenizer).to_numpy()
        assert rows.shape == (len(stream) // seq_len, seq_len)
        assert rows.reshape(-1).tolist() == stream[: rows.size]
    # EOS follows each document: at the cumulative document ends of the stream.
    rows = load_sequences(source, seq_len=1, tokenizer=tokenizer).to_numpy().reshape(-1)
    assert np.flatnonzero(rows == EOS).tolist() == (np.cumsum([len(d) + 1 for d in ids]) - 1).tolist()


def test_eos_id_option_and_tokenizer_without_eos(tokenizer, tmp_path):
    source = write_jsonl_file(tmp_path, DOCS)
    with_bos = load_sequences(source, seq_len=SEQ_LEN, tokenizer=tokenizer, eos_id=1).to_numpy()
    np.testing.assert_array_equal(with_bos, reference_rows(tokenizer, DOCS, SEQ_LEN, eos=1))
    no_eos = train_tokenizer(["<pad>", "<s>"])
    assert find_eos_id(no_eos) is None
    rows = load_sequences(source, seq_len=SEQ_LEN, tokenizer=no_eos).to_numpy()
    np.testing.assert_array_equal(rows, reference_rows(no_eos, DOCS, SEQ_LEN, eos=None))


def test_template_tokens_are_not_added(tokenizer, tmp_path):
    with_bos = Tokenizer.from_str(tokenizer.to_str())
    with_bos.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert with_bos.encode(DOCS[0]).ids[0] == 1
    rows = load_sequences(write_jsonl_file(tmp_path, DOCS), seq_len=SEQ_LEN, tokenizer=with_bos).to_numpy()
    np.testing.assert_array_equal(rows, reference_rows(tokenizer, DOCS, SEQ_LEN))
    assert 1 not in rows


def test_empty_documents_are_skipped(tokenizer, tmp_path):
    records = [{"text": DOCS[0]}, {"text": ""}, {"text": None}, {"text": DOCS[1]}]
    source = write_jsonl(tmp_path / "gaps.jsonl", records)
    rows = load_sequences(source, seq_len=3, tokenizer=tokenizer).to_numpy()
    np.testing.assert_array_equal(rows, reference_rows(tokenizer, DOCS[:2], 3))


@settings(max_examples=200, deadline=None)
@given(
    documents=st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=12), max_size=8),
    seq_len=st.integers(1, 10),
    eos_id=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
)
def test_pack_documents_is_concatenate_cut_drop(documents, seq_len, eos_id):
    rows = pack_documents(documents, seq_len, eos_id=eos_id)
    stream = [token for doc in documents for token in [*doc, *([] if eos_id is None else [eos_id])]]
    assert rows.dtype == np.int32
    assert rows.shape == (len(stream) // seq_len, seq_len)
    assert rows.reshape(-1).tolist() == stream[: rows.size]


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 1000), max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    seq_len=st.integers(1, 9),
)
def test_packing_does_not_depend_on_chunk_boundaries(tokens, cuts, seq_len):
    stream = np.array(tokens, dtype=np.int32)
    chunks = np.split(stream, sorted(cut for cut in cuts if cut <= len(tokens)))
    if len(tokens) < seq_len:
        with pytest.raises(DataError):
            list(data._cut_rows(chunks, seq_len, "test"))
        return
    packed = np.concatenate(list(data._cut_rows(chunks, seq_len, "test")))
    np.testing.assert_array_equal(packed, pack_documents([tokens], seq_len))


def test_max_sequences_stops_reading_early(tokenizer, tmp_path):
    many = [DOCS[i % len(DOCS)] for i in range(3000)]
    source = write_jsonl(tmp_path / "many.jsonl", [{"text": doc} for doc in many])

    class CountingTokenizer:
        """Forwards to the real tokenizer and counts the documents it was asked to encode."""

        def __init__(self):
            self.documents = 0

        def encode_batch(self, documents, add_special_tokens=True):
            self.documents += len(documents)
            return tokenizer.encode_batch(documents, add_special_tokens=add_special_tokens)

        def get_added_tokens_decoder(self):
            return tokenizer.get_added_tokens_decoder()

    counting = CountingTokenizer()
    sequences = load_sequences(source, seq_len=SEQ_LEN, tokenizer=counting, max_sequences=3)
    assert len(sequences) == 3
    np.testing.assert_array_equal(sequences.to_numpy(), reference_rows(tokenizer, many[:20], SEQ_LEN)[:3])
    assert counting.documents <= data.DOCUMENT_BATCH < len(many)


def test_text_then_saved_tokens_round_trip(tokenizer, tmp_path):
    sequences = load_sequences(write_jsonl_file(tmp_path, DOCS), seq_len=SEQ_LEN, tokenizer=tokenizer)
    path = sequences.save(tmp_path / "out" / "tokens.npy")
    loaded = load_sequences(path, seq_len=SEQ_LEN)
    assert isinstance(loaded.tokens, np.memmap)
    np.testing.assert_array_equal(loaded.to_numpy(), sequences.to_numpy())
    train, valid = loaded.split(0.25, seed=3)
    np.testing.assert_array_equal(
        load_sequences(valid.save(tmp_path / "v.npy"), seq_len=SEQ_LEN).to_numpy(), valid.to_numpy()
    )


# Pre-tokenized sources.


def test_npy_token_stream_and_packed_array(tmp_path):
    stream = np.arange(50, dtype=np.int32)
    np.save(tmp_path / "stream.npy", stream)
    rows = load_sequences(tmp_path / "stream.npy", seq_len=8).to_numpy()
    np.testing.assert_array_equal(rows, stream[:48].reshape(6, 8))

    np.save(tmp_path / "packed.npy", stream[:48].reshape(6, 8))
    packed = load_sequences(tmp_path / "packed.npy", seq_len=8, max_sequences=4)
    assert isinstance(packed.tokens, np.memmap) and len(packed) == 4
    np.testing.assert_array_equal(packed.to_numpy(), rows[:4])
    # Rows of another length are read as their flattened stream and cut again.
    np.testing.assert_array_equal(
        load_sequences(tmp_path / "packed.npy", seq_len=12).to_numpy(), stream[:48].reshape(4, 12)
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.int32])
def test_token_dtypes_become_int32(tmp_path, dtype):
    np.save(tmp_path / "tokens.npy", np.arange(40, dtype=dtype))
    save_file(
        {"tokens": np.arange(40, dtype=dtype), "mask": np.ones(40, dtype=np.int8)},
        str(tmp_path / "t.safetensors"),
    )
    for name in ("tokens.npy", "t.safetensors"):
        sequences = load_sequences(tmp_path / name, seq_len=10)
        assert sequences.to_numpy().dtype == np.int32
        np.testing.assert_array_equal(sequences.to_numpy(), np.arange(40).reshape(4, 10))


def test_safetensors_only_tensor(tmp_path):
    save_file({"input_ids": np.arange(30, dtype=np.int32).reshape(3, 10)}, str(tmp_path / "ids.safetensors"))
    streamed = list(stream_sequences(tmp_path / "ids.safetensors", seq_len=10))
    assert [row.tolist() for row in streamed] == np.arange(30).reshape(3, 10).tolist()
    assert len(load_sequences(tmp_path / "ids.safetensors", seq_len=10, max_sequences=2)) == 2


# Split and batches.


def make_sequences(count: int = 20, seq_len: int = 4) -> TokenSequences:
    """Row i holds the ids i*seq_len ... so a row's first token names it."""
    return TokenSequences(np.arange(count * seq_len, dtype=np.int32).reshape(count, seq_len))


def row_ids(rows: np.ndarray | torch.Tensor, seq_len: int = 4) -> list[int]:
    return (np.asarray(rows)[:, 0] // seq_len).tolist()


def test_split_is_deterministic_disjoint_and_complete():
    sequences = make_sequences(20)
    train, valid = sequences.split(0.2, seed=7)
    np.random.seed(123)  # global random state must not matter
    torch.manual_seed(123)
    train_again, valid_again = make_sequences(20).split(0.2, seed=7)
    assert row_ids(train.to_numpy()) == row_ids(train_again.to_numpy())
    assert row_ids(valid.to_numpy()) == row_ids(valid_again.to_numpy())
    assert len(valid) == 4 and len(train) == 16
    assert set(row_ids(train.to_numpy())).isdisjoint(row_ids(valid.to_numpy()))
    assert sorted(row_ids(train.to_numpy()) + row_ids(valid.to_numpy())) == list(range(20))
    assert row_ids(valid.to_numpy()) != row_ids(sequences.split(0.2, seed=8)[1].to_numpy())


def test_batches_order_depends_only_on_seed_and_epoch():
    sequences = make_sequences(20)

    def order(seqs, **kwargs):
        return [row_ids(batch) for batch in seqs.batches(4, **kwargs)]

    first = order(sequences, seed=1, epoch=0)
    assert order(make_sequences(20), seed=1, epoch=0) == first
    assert order(sequences, seed=1, epoch=1) != first
    assert order(sequences, seed=2, epoch=0) != first
    assert sorted(sum(first, [])) == list(range(20))  # one epoch sees every row once
    assert order(sequences, shuffle=False) == [list(range(i, i + 4)) for i in range(0, 20, 4)]
    batch = next(sequences.batches(4))
    assert batch.dtype == torch.int64 and batch.shape == (4, 4)


def test_batches_start_resumes_exactly():
    sequences = make_sequences(23)
    full = [batch for batch in sequences.batches(5, seed=4, epoch=2)]
    assert len(full) == sequences.num_batches(5) == 4  # drop_last drops the 3 left over
    for start in range(len(full) + 1):
        resumed = list(sequences.batches(5, seed=4, epoch=2, start=start))
        assert len(resumed) == len(full) - start
        for got, want in zip(resumed, full[start:], strict=True):
            assert torch.equal(got, want)
    tail = list(sequences.batches(5, shuffle=False, drop_last=False))
    assert [len(batch) for batch in tail] == [5, 5, 5, 5, 3]


def test_batches_of_a_split_use_only_its_rows(tmp_path):
    path = make_sequences(30).save(tmp_path / "s.npy")
    train, valid = load_sequences(path, seq_len=4).split(0.3, seed=0)
    seen = [i for batch in valid.batches(3, drop_last=False) for i in row_ids(batch)]
    assert sorted(seen) == row_ids(valid.to_numpy())
    assert set(i for batch in train.batches(3) for i in row_ids(batch)) <= set(row_ids(train.to_numpy()))


# Streaming.


def test_stream_train_and_valid_are_disjoint_and_deterministic(tmp_path):
    path = make_sequences(200).save(tmp_path / "s.npy")

    def ids(**kwargs):
        return [row[0] // 4 for row in stream_sequences(path, seq_len=4, valid_fraction=0.2, seed=5, **kwargs)]

    train, valid = ids(split="train"), ids(split="valid")
    assert set(train).isdisjoint(valid) and sorted(train + valid) == list(range(200))
    assert 15 <= len(valid) <= 70  # about a fifth
    assert ids(split="valid") == valid
    shuffled = ids(split="train", shuffle_buffer=16)
    assert shuffled != train and sorted(shuffled) == train
    assert ids(split="train", shuffle_buffer=16) == shuffled
    other_seed = [row[0] // 4 for row in stream_sequences(path, seq_len=4, split="valid", valid_fraction=0.2, seed=6)]
    assert other_seed != valid


def test_stream_text_matches_load_and_takes_first_n(tokenizer, tmp_path):
    source = write_jsonl_file(tmp_path, DOCS)
    streamed = list(stream_sequences(source, seq_len=SEQ_LEN, tokenizer=tokenizer))
    np.testing.assert_array_equal(np.stack(streamed), reference_rows(tokenizer, DOCS, SEQ_LEN))
    first = TokenSequences.from_stream(stream_sequences(source, seq_len=SEQ_LEN, tokenizer=tokenizer), max_sequences=3)
    np.testing.assert_array_equal(first.to_numpy(), np.stack(streamed[:3]))


def test_hub_names_go_to_load_dataset(tokenizer, monkeypatch):
    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return datasets.Dataset.from_dict({"text": DOCS}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sequences = load_sequences("someone/corpus", seq_len=SEQ_LEN, tokenizer=tokenizer)
    assert calls == [("someone/corpus", "train", True)]
    np.testing.assert_array_equal(sequences.to_numpy(), reference_rows(tokenizer, DOCS, SEQ_LEN))


# User mistakes: each raises DataError saying what is wrong.


def error_message(call) -> str:
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_errors_for_missing_and_unknown_sources(tokenizer, tmp_path):
    assert "data not found" in error_message(
        lambda: load_sequences(tmp_path / "nope.jsonl", seq_len=4, tokenizer=tokenizer)
    )
    assert "nope.jsonl" in error_message(lambda: load_sequences(str(tmp_path / "nope.jsonl"), seq_len=4))
    (tmp_path / "table.csv").write_text("text\nhello\n")
    assert "unknown data format '.csv'" in error_message(lambda: load_sequences(tmp_path / "table.csv", seq_len=4))
    (tmp_path / "empty").mkdir()
    assert "holds no .txt" in error_message(lambda: load_sequences(tmp_path / "empty", seq_len=4, tokenizer=tokenizer))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("hi")
    write_jsonl(mixed / "b.jsonl", [{"text": "hi"}])
    assert "mixes data formats" in error_message(lambda: load_sequences(mixed, seq_len=4, tokenizer=tokenizer))
    assert "needs a tokenizer" in error_message(lambda: load_sequences(write_jsonl_file(tmp_path, DOCS), seq_len=4))
    assert "no tokenizer at" in error_message(lambda: load_tokenizer(tmp_path))
    (tmp_path / "bad_tokenizer.json").write_text("{bad")
    assert "cannot read tokenizer" in error_message(lambda: load_tokenizer(tmp_path / "bad_tokenizer.json"))


def test_hub_failure_is_a_data_error(tokenizer, monkeypatch):
    def unreachable(name, split, streaming):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    message = error_message(lambda: load_sequences("someone/corpus", seq_len=4, tokenizer=tokenizer))
    assert "cannot load dataset 'someone/corpus'" in message and "Couldn't reach" in message


def test_errors_for_bad_text_content(tokenizer, tmp_path):
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"content": "hello"}])
    message = error_message(lambda: load_sequences(no_text, seq_len=4, tokenizer=tokenizer))
    assert "no 'text' field" in message and "content" in message
    assert load_sequences(no_text, seq_len=1, tokenizer=tokenizer, text_field="content").num_tokens > 0
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": 5}])
    assert "holds int values, not text" in error_message(
        lambda: load_sequences(numbers, seq_len=4, tokenizer=tokenizer)
    )
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    assert "empty after tokenization" in error_message(lambda: load_sequences(empty, seq_len=4, tokenizer=tokenizer))
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "fox"}])
    assert "fewer than seq_len=4096" in error_message(lambda: load_sequences(short, seq_len=4096, tokenizer=tokenizer))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops\n')
    assert "cannot read" in error_message(lambda: load_sequences(broken, seq_len=1, tokenizer=tokenizer))
    saved = write_saved_dataset_dict(tmp_path, DOCS)
    message = error_message(lambda: load_sequences(saved, seq_len=4, tokenizer=tokenizer, dataset_split="valid"))
    assert "no split 'valid'" in message and "train" in message


def test_errors_for_bad_token_files(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    assert "cannot read token file" in error_message(lambda: load_sequences(tmp_path / "objects.npy", seq_len=1))
    np.save(tmp_path / "floats.npy", np.ones(10, dtype=np.float32))
    assert "not integer token ids" in error_message(lambda: load_sequences(tmp_path / "floats.npy", seq_len=2))
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 2), dtype=np.int32))
    assert "shape (2, 2, 2)" in error_message(lambda: load_sequences(tmp_path / "cube.npy", seq_len=2))
    np.save(tmp_path / "short.npy", np.arange(5, dtype=np.int32))
    assert "only 5 tokens, fewer than seq_len=8" in error_message(
        lambda: load_sequences(tmp_path / "short.npy", seq_len=8)
    )
    np.save(tmp_path / "negative.npy", np.array([-1, 3], dtype=np.int64))
    assert "negative token ids" in error_message(lambda: load_sequences(tmp_path / "negative.npy", seq_len=1))
    save_file(
        {"a": np.arange(4, dtype=np.int32), "b": np.arange(4, dtype=np.int32)},
        str(tmp_path / "two.safetensors"),
    )
    assert "none named 'tokens'" in error_message(lambda: load_sequences(tmp_path / "two.safetensors", seq_len=2))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert "cannot read token file" in error_message(lambda: load_sequences(tmp_path / "junk.safetensors", seq_len=2))


def test_errors_for_bad_numbers(tokenizer, tmp_path):
    sequences = make_sequences(10)
    source = write_jsonl_file(tmp_path, DOCS)
    assert "seq_len must be a positive integer" in error_message(lambda: load_sequences(source, seq_len=0))
    assert "max_sequences must be a positive" in error_message(
        lambda: load_sequences(source, seq_len=4, max_sequences=0)
    )
    assert "eos_id=999" in error_message(lambda: load_sequences(source, seq_len=4, tokenizer=tokenizer, eos_id=999))
    for fraction in (0, 1, 1.5, -0.1, float("nan")):
        assert "valid_fraction must be between 0 and 1" in error_message(lambda f=fraction: sequences.split(f))
    assert "nothing would be left to train on" in error_message(lambda: make_sequences(1).split(0.5))
    assert "valid_fraction must be between 0 and 1" in error_message(
        lambda: stream_sequences(source, seq_len=4, tokenizer=tokenizer, split="train", valid_fraction=0.0)
    )
    assert "split must be" in error_message(
        lambda: stream_sequences(source, seq_len=4, tokenizer=tokenizer, split="test")
    )
    assert "batch_size=11 is larger than the 10" in error_message(lambda: sequences.batches(11))
    assert "start=3 is outside the 2 batches" in error_message(lambda: sequences.batches(5, start=3))
    assert "seed must be a non-negative integer" in error_message(lambda: sequences.split(0.5, seed=-1))
    assert "ending in .npy" in error_message(lambda: sequences.save(tmp_path / "tokens.bin"))
    mapped = load_sequences(sequences.save(tmp_path / "tokens.npy"), seq_len=4)
    assert "the file they are read from" in error_message(lambda: mapped.save(tmp_path / "tokens.npy"))
    np.testing.assert_array_equal(load_sequences(tmp_path / "tokens.npy", seq_len=4).to_numpy(), sequences.to_numpy())


def test_head_takes_the_first_sequences_of_a_selection():
    rows = TokenSequences(np.arange(40, dtype=np.int32).reshape(10, 4))
    train, _ = rows.split(0.3, seed=1)
    head = train.head(2)
    assert len(head) == 2
    np.testing.assert_array_equal(head.to_numpy(), train.to_numpy()[:2])
    assert len(rows.head(50)) == 10
    with pytest.raises(DataError, match="count"):
        rows.head(0)


# The one reader of a model's data.


def test_read_sequences_reads_text_with_the_models_tokenizer_and_eos(tokenizer, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    tokenizer.save(str(model / "tokenizer.json"))
    text = write_jsonl_file(tmp_path, DOCS)
    sequences = read_sequences(DataSpec(text, SEQ_LEN, max_sequences=3), model, eos_id=EOS)
    np.testing.assert_array_equal(sequences.to_numpy(), reference_rows(tokenizer, DOCS, SEQ_LEN)[:3])
    assert "has no tokenizer.json: pass --tokenizer" in error_message(
        lambda: read_sequences(DataSpec(text, SEQ_LEN), tmp_path / "elsewhere", eos_id=EOS)
    )
    # a token file needs no tokenizer; ids past the model's vocabulary are refused
    tokens = TokenSequences(np.arange(40, dtype=np.int32).reshape(10, 4)).save(tmp_path / "tokens.npy")
    assert len(read_sequences(DataSpec(tokens, 4), tmp_path / "elsewhere", eos_id=None, vocab_size=40)) == 10
    assert "holds token id 39, outside the model's vocabulary of 39" in error_message(
        lambda: read_sequences(DataSpec(tokens, 4), model, eos_id=None, vocab_size=39)
    )


def test_read_sequences_takes_a_split_then_its_first_sequences(tmp_path):
    rows = TokenSequences(np.arange(80, dtype=np.int32).reshape(20, 4))
    tokens = rows.save(tmp_path / "tokens.npy")
    train, valid = rows.split(0.25, seed=3)
    for split, part in (("train", train), ("valid", valid)):
        spec = DataSpec(tokens, 4, max_sequences=2, split=split, valid_fraction=0.25, seed=3)
        np.testing.assert_array_equal(read_sequences(spec, tmp_path, eos_id=None).to_numpy(), part.to_numpy()[:2])
    whole = read_sequences(DataSpec(tokens, 4, max_sequences=2), tmp_path, eos_id=None)
    np.testing.assert_array_equal(whole.to_numpy(), rows.to_numpy()[:2])
    with pytest.raises(DataError, match="split must be 'all', 'train' or 'valid'"):
        DataSpec(tokens, 4, split="test")


def test_read_sequences_refuses_fewer_than_the_step_needs(tmp_path):
    tokens = TokenSequences(np.arange(40, dtype=np.int32).reshape(10, 4)).save(tmp_path / "tokens.npy")
    need = Need(12, "--samples 12", "--samples")
    message = error_message(lambda: read_sequences(DataSpec(tokens, 4, need=need), tmp_path, eos_id=None))
    assert message == (
        f"{tokens} holds 10 sequences of 4 tokens, fewer than --samples 12: use more data, a smaller --seq-len "
        "or fewer --samples"
    )
    assert len(read_sequences(DataSpec(tokens, 4, need=Need(10, "", "")), tmp_path, eos_id=None)) == 10
