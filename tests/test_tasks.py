import importlib.util
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from compressor.config import HybridConfig
from compressor.data import load_tokenizer
from compressor.errors import CompressorError, OptionError
from compressor.model import HybridLM
from compressor.presets import get_preset
from compressor.tasks import (
    RetrievalConfig,
    TaskScorer,
    TaskSpec,
    TaskVocabulary,
    block_drop_effect,
    evaluate_task,
    make_examples,
    parse_contexts,
    score,
)

VALID_TEXT = "examples/data/valid.txt"

# A hand-made vocabulary of 128 tokens: digits 0-9, ":" 10, newline 11, words 12..127.
V = 128
DIGITS, COLON, NEWLINE = np.arange(10), 10, 11
VOCAB = TaskVocabulary(
    words=np.arange(12, V),
    digits=DIGITS,
    colon=COLON,
    newline=NEWLINE,
    eos=NEWLINE,
    needle_prefix=np.array([12, 13]),
    needle_verb=np.array([14]),
    needle_end=np.array([COLON]),
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("examples/data/tokenizer.json")


def copier() -> HybridLM:
    """A two-block model whose weights are set by hand so that it copies: an induction head.

    The residual stream holds four one-hot subspaces of V dims: the token, the previous token, the one
    before it, and the copied token. Block 0 (Mamba) writes the previous two tokens through its causal
    convolution (B = C = 0, so the SSM adds nothing and y = D * conv(x)). Block 1 (attention) at position
    p attends to the positions q whose previous token is p's token and whose token two back is p's previous
    token (weight 1 and 0.5), and copies q's token; the head reads the copied token. It therefore answers
    MQAR (one-token keys) and phonebooks of one-word names and one-digit numbers exactly. Without the
    copy, the head prefers the newline, never an answer.
    """
    tok, prev1, prev2, copy = (slice(i * V, (i + 1) * V) for i in range(4))
    config = HybridConfig(
        hybrid_override_pattern="M*",
        vocab_size=V,
        hidden_size=4 * V,
        intermediate_size=8,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=2 * V,
        mamba_num_heads=2,
        mamba_head_dim=V,
        n_groups=1,
        ssm_state_size=4,
        conv_kernel=4,
        chunk_size=16,
    )
    model = HybridLM(config).eval()
    eye = torch.eye(V)
    norm_scale = math.sqrt(4 * V)  # RMSNorm of a single one-hot in 4V dims
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                param.fill_(1.0)
        model.backbone.embeddings.weight[:, tok] = eye
        mamba = model.backbone.layers[0].mixer
        inner = 2 * V  # x channels: V for the previous token, V for the one before
        w = mamba.in_proj.weight  # rows: z (inner), x (inner), B, C (4 each), dt (2)
        w[:inner, tok] = 1.0  # z: a large positive gate, the same for every channel
        w[inner : inner + V, tok] = eye / norm_scale
        w[inner + V : inner + 2 * V, tok] = eye / norm_scale
        mamba.conv1d.weight[:V, 0, 2] = 1.0  # lag 1
        mamba.conv1d.weight[V : 2 * V, 0, 1] = 1.0  # lag 2
        # the gated norm leaves sqrt(V) on each of the two one-hots; write unit one-hots
        mamba.out_proj.weight[prev1, :V] = eye / math.sqrt(V)
        mamba.out_proj.weight[prev2, V:] = eye / math.sqrt(V)
        attention = model.backbone.layers[1].mixer
        attention.q_proj.weight[:V, tok] = 4.0 * eye
        attention.q_proj.weight[V:, prev1] = 2.0 * eye
        attention.k_proj.weight[:V, prev1] = eye
        attention.k_proj.weight[V:, prev2] = eye
        attention.v_proj.weight[:V, tok] = eye
        attention.o_proj.weight[copy, :V] = eye / math.sqrt(4 * V / 3)
        model.lm_head.weight[:, copy] = 10.0 * eye
        model.lm_head.weight[NEWLINE, tok] = 0.1
    return model


def test_generators_are_deterministic_by_seed_and_fill_each_context(tokenizer):
    vocab = TaskVocabulary.from_tokenizer(tokenizer)
    for task in ("phonebook", "mqar", "needle"):
        spec = TaskSpec(task, sequences=5, queries=4, data=VALID_TEXT)
        for context in (256, 1024):
            first = make_examples(spec, tokenizer, context, vocab)
            again = make_examples(spec, tokenizer, context, vocab)
            other = make_examples(spec.replace(seed=1), tokenizer, context, vocab)
            assert first.tokens.shape == first.query.shape == (5, context)
            assert torch.equal(first.tokens, again.tokens) and torch.equal(first.query, again.query)
            assert not torch.equal(first.tokens, other.tokens)
            per_sequence = 1 if task == "needle" else 4
            assert first.num_queries == 5 * per_sequence
            assert sorted(first.query[first.query >= 0].unique().tolist()) == list(range(first.num_queries))


@pytest.mark.parametrize("task", ["phonebook", "mqar"])
def test_every_answer_follows_its_key_once_in_the_book(tokenizer, task):
    spec = TaskSpec(task, sequences=3, queries=6)
    for context in (512, 4096):
        examples = make_examples(spec, tokenizer, context)
        for row, query in zip(examples.tokens.tolist(), examples.query.tolist(), strict=True):
            starts = [p for p in range(1, context) if query[p] >= 0 and query[p - 1] != query[p]]
            assert len(starts) == 6
            answer_len = sum(q == query[starts[0]] for q in query)
            key_len = spec.name_words + 1 if task == "phonebook" else starts[1] - starts[0] - answer_len
            book = row[: starts[0] - key_len]
            for start in starts:
                key, answer = row[start - key_len : start], row[start : start + answer_len]
                found = [i for i in range(len(book) - key_len + 1) if book[i : i + key_len] == key]
                assert len(found) == 1
                assert row[found[0] + key_len : found[0] + key_len + answer_len] == answer


def test_mqar_keys_grow_when_the_word_list_is_too_small():
    spec = TaskSpec("mqar", sequences=2, queries=4)
    small = make_examples(spec, None, 64, VOCAB)  # 28 pairs from 58 one-token keys
    large = make_examples(spec, None, 512, VOCAB)  # 252 pairs need two-token keys
    assert (small.query[0] >= 0).nonzero()[1, 0] - (small.query[0] >= 0).nonzero()[0, 0] == 2
    assert (large.query[0] >= 0).nonzero()[1, 0] - (large.query[0] >= 0).nonzero()[0, 0] == 3


def test_needle_sits_at_its_depth_and_is_asked_at_the_end(tokenizer):
    vocab = TaskVocabulary.from_tokenizer(tokenizer)
    spec = TaskSpec("needle", sequences=3, depths=(0.0, 0.5, 1.0), data=VALID_TEXT)
    examples = make_examples(spec, tokenizer, 600, vocab)
    prefix = vocab.needle_prefix.tolist()
    for i, row in enumerate(examples.tokens.tolist()):
        found = [p for p in range(len(row)) if row[p : p + len(prefix)] == prefix]
        assert len(found) == 2
        sentence = row[found[1] :]
        assert row[found[0] : found[0] + len(sentence)] == sentence
        filler = 600 - 2 * len(sentence) - 1
        assert found[0] == round(spec.depths[i] * filler)
        answer = [p for p, q in enumerate(examples.query[i].tolist()) if q >= 0]
        assert answer == list(range(600 - 1 - 4, 600 - 1))  # four digits before the final "."
        assert all(row[p] in vocab.digits for p in answer)


def test_needle_filler_reads_no_further_into_the_data_than_its_picks_need(tokenizer, tmp_path):
    # a long data source is not packed whole for a few sequences: its filler comes from the first
    # FILLER_ROWS rows, so twice the data gives the same needle rows (a whole read would pick among twice
    # as many rows)
    from pathlib import Path

    from compressor import tasks

    vocab = TaskVocabulary.from_tokenizer(tokenizer)
    text = Path(VALID_TEXT).read_text()
    rows = []
    for copies in (3, 6):
        data = tmp_path / f"x{copies}.txt"
        data.write_text(text * copies)
        rows.append(make_examples(TaskSpec("needle", sequences=2, data=str(data)), tokenizer, 128, vocab).tokens)
    assert torch.equal(rows[0], rows[1])
    assert len(tokenizer.encode(text).ids) * 3 > tasks.FILLER_ROWS * 128  # the data is longer than that


def test_copier_answers_every_query_and_without_attention_none():
    model = copier()
    for task, context in (("phonebook", 256), ("mqar", 128)):
        spec = TaskSpec(task, sequences=4, queries=8, digits=1, name_words=1)
        examples = make_examples(spec, None, context, VOCAB)
        result = score(model, examples, batch_size=3, prefill_chunk=50)
        assert result.accuracy == 1.0 and result.queries == 32
        assert result.log_likelihood > -1e-3
        without = score(model, examples, skip_blocks={1})
        assert without.accuracy == 0.0 and without.log_likelihood < -4.0


def test_drop_one_effect_marks_both_blocks_of_the_copier():
    spec = TaskSpec("phonebook", sequences=2, queries=8, digits=1, name_words=1)
    scorer = TaskScorer(make_examples(spec, None, 200, VOCAB))
    assert scorer(copier()) == 1.0
    assert block_drop_effect(copier(), scorer).tolist() == [1.0, 1.0]


def test_chunked_prefill_equals_one_forward_with_full_logits():
    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny")).eval()
    spec = TaskSpec("phonebook", sequences=3, queries=5, digits=2, name_words=1)
    examples = make_examples(spec, None, 150, VOCAB)
    with torch.no_grad():
        logp = model(examples.tokens).float().log_softmax(-1)[:, :-1]  # (b, t - 1, vocab)
    labels = examples.tokens[:, 1:]
    answer = examples.query[:, 1:] >= 0
    token_logp = logp.gather(-1, labels[..., None])[..., 0][answer]
    hit = logp.argmax(-1).eq(labels)[answer]
    per_query = torch.zeros(examples.num_queries).index_add_(0, examples.query[:, 1:][answer], (~hit).float())
    expected_accuracy = float(per_query.eq(0).float().mean())
    for chunk, batch in ((7, 2), (16, 1), (150, 3)):
        result = score(model, examples, batch_size=batch, prefill_chunk=chunk)
        assert result.accuracy == expected_accuracy
        assert result.log_likelihood == pytest.approx(float(token_logp.mean()), abs=1e-4)


def test_scorer_metrics_and_evaluate_task(tokenizer):
    torch.manual_seed(0)
    model = HybridLM(get_preset("small").replace(hybrid_override_pattern="M*", hidden_size=64)).eval()
    spec = TaskSpec("phonebook", sequences=2, queries=4)
    results = evaluate_task(model, tokenizer, spec, parse_contexts("256,1k"))
    assert [(r.task, r.context, r.queries) for r in results] == [("phonebook", 256, 8), ("phonebook", 1024, 8)]
    assert results[0].to_dict()["context"] == 256
    scorer = TaskScorer.build(spec, "examples/model", 256, metric="log_likelihood")
    assert scorer(model) == pytest.approx(results[0].log_likelihood)


def test_bad_inputs_raise_one_line_errors(tokenizer):
    cases = [
        (lambda: TaskSpec("phone"), "unknown task 'phone': choose phonebook, mqar, needle"),
        (lambda: TaskSpec("needle"), "pass data"),
        (lambda: TaskSpec(queries=0), "queries must be a positive integer"),
        (lambda: parse_contexts("1k,4q"), "context length"),
        (lambda: parse_contexts(""), "no context lengths"),
        (lambda: make_examples(TaskSpec(), tokenizer, 100), "too short for phonebook with 16 queries"),
        (lambda: make_examples(TaskSpec(name_words=1), None, 4096, VOCAB), "distinct names"),
        (lambda: make_examples(TaskSpec("needle", data=VALID_TEXT), tokenizer, 20), "too short for the needle"),
        (lambda: TaskScorer(make_examples(TaskSpec(), tokenizer, 512), metric="f1"), "unknown retrieval metric"),
    ]
    for call, message in cases:
        with pytest.raises(CompressorError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    small = HybridLM(get_preset("tiny"))  # vocabulary 512, the tokenizer's ids reach 4095
    with pytest.raises(CompressorError, match="model's own tokenizer"):
        score(small, make_examples(TaskSpec(), tokenizer, 512))


def test_a_tokenizer_without_the_task_tokens_is_refused():
    words = {f"w{i}": i for i in range(100)} | {"[UNK]": 100}
    plain = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(CompressorError, match="single-token words"):
        TaskVocabulary.from_tokenizer(plain)


def retrieving_model(mlp_scale: float = 0.05) -> HybridLM:
    """The copier with a third block, an MLP of small random weights: dropping it costs much KL on text and
    no retrieval, dropping the attention block costs less KL and all of the retrieval."""
    source = copier()
    model = HybridLM(source.config.replace(hybrid_override_pattern="M*-")).eval()
    weights = source.state_dict()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
            elif name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0, mlp_scale)
    return model


def retrieval_probe() -> TaskScorer:
    spec = TaskSpec("phonebook", sequences=2, queries=8, digits=1, name_words=1)
    return TaskScorer(make_examples(spec, None, 200, VOCAB), "log_likelihood")


def test_retrieval_config_builds_a_log_likelihood_probe():
    scorer = RetrievalConfig("mqar", 256, sequences=2).scorer("examples/model")
    assert scorer.metric == "log_likelihood" and tuple(scorer.examples.tokens.shape) == (2, 256)
    assert RetrievalConfig("needle", 512, 1).scorer("examples/model", VALID_TEXT).examples.task == "needle"
    for call, message in [
        (lambda: RetrievalConfig("needle", 512).scorer("examples/model"), "pass data"),
        (lambda: RetrievalConfig("lookup"), "unknown task 'lookup'"),
        (lambda: RetrievalConfig(context=0), "retrieval context must be a positive integer"),
    ]:
        with pytest.raises(CompressorError, match=message):
            call()


def test_eval_task_compares_models_by_context(tmp_path):
    from typer.testing import CliRunner

    import cli
    from compressor.pipelines.evaluating import RetrievalEval, evaluate_checkpoints

    config = RetrievalEval("phonebook", "256,512", task_sequences=1)
    with pytest.raises(OptionError, match="examples/model is given twice: give each once"):
        evaluate_checkpoints(["examples/model", "examples/model"], config)
    data = evaluate_checkpoints(["examples/model"], config).to_dict()
    assert data["task"] == "phonebook" and list(data["models"]) == ["examples/model"]
    runs = data["models"]["examples/model"]
    assert [r["context"] for r in runs] == [256, 512] and all(r["queries"] == 16 for r in runs)
    runner = CliRunner()
    args = ["eval", "examples/model", "--task", "phonebook", "--ctx", "256,512", "--task-sequences", "1"]
    table = runner.invoke(cli.app, args)
    assert table.exit_code == 0 and "phonebook: 16 queries per context" in " ".join(table.output.split())
    for bad, message in [
        (["--task", "lookup"], "unknown task 'lookup'"),
        (["--task", "phonebook", "--ctx", "1x"], "context length '1x'"),
        (["--task", "needle"], "pass data (e.g. --data FILE.txt)"),
        (["--task", "phonebook", "--task-sequences", "0"], "--task-sequences must be at least 1"),
        ([], "--data is needed"),
    ]:
        result = runner.invoke(cli.app, ["eval", "examples/model", *bad])
        assert result.exit_code == 1 and message in " ".join(result.output.split()), (bad, result.output)
        assert "Traceback" not in result.output


def _example_script(name: str):
    spec = importlib.util.spec_from_file_location(name, f"examples/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_training_rows_point_each_answer_at_the_token_it_copies():
    example = _example_script("train_example")
    rng = np.random.default_rng(0)
    for make in (example.phonebook_rows, example.copy_rows):
        rows, source = make(VOCAB, 3, 96, rng)
        assert rows.shape == source.shape == (3, 96)
        row, position = np.nonzero(source >= 0)
        assert len(position) > 0 and (source[row, position] <= position).all()
        # the token each answering position predicts is the one at its source
        assert (rows[row, source[row, position]] == rows[row, position + 1]).all()
    rows, source = example.phonebook_rows(VOCAB, 2, 96, rng)
    entry = example.NAME_WORDS + 1 + example.DIGITS + 1
    for row, position in zip(*np.nonzero(source >= 0), strict=True):
        asked, found = position + 1, source[row, position]
        # the queried entry's name is the name before the source: a lookup, not any earlier digit
        name = example.NAME_WORDS
        assert (rows[row, asked - asked % entry : asked - asked % entry + name] ==
                rows[row, found - found % entry : found - found % entry + name]).all()  # fmt: skip
    assert (source >= 0).sum() == 2 * (96 // entry // 2) * example.DIGITS


def test_guidance_loss_is_low_for_a_head_that_attends_to_the_copied_token():
    example = _example_script("train_example")
    rows, source = example.copy_rows(VOCAB, 4, 16, np.random.default_rng(1))
    rows, source = rows[::2], source[::2]  # the word rows (odd rows repeat digits: ambiguous matches)
    losses = []
    for model in (copier(), HybridLM(copier().config)):
        inputs = example.capture_attention_inputs(model)
        with torch.no_grad():
            model(torch.from_numpy(rows))
            losses.append(float(example.guidance_loss(model, inputs, torch.from_numpy(source))))
    assert losses[0] < 0.1 < 1.0 < losses[1], losses


def test_example_training_weight_average_is_the_mean_of_its_snapshots_and_survives_a_resume(tmp_path):
    example = _example_script("train_example")
    model = copier()
    optimizer = torch.optim.AdamW(model.parameters())
    average = example.WeightAverage(model, start=1, every=2)
    snapshots = []
    for step in range(1, 7):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        average.update(model, step)
        if step in (3, 5):
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    assert average.count == 2
    for name, value in average.mean.items():
        torch.testing.assert_close(value, (snapshots[0][name] + snapshots[1][name]) / 2)
    assert not torch.equal(average.mean["lm_head.weight"], model.state_dict()["lm_head.weight"])
    example.save_checkpoint(tmp_path / "checkpoint", model, optimizer, 6, "examples/model", average)
    resumed = example.WeightAverage(copier(), start=1, every=2)
    step = example.load_checkpoint(tmp_path / "checkpoint", copier(), optimizer, resumed)
    assert step == 6 and resumed.count == 2
    for name, value in average.mean.items():
        assert torch.equal(resumed.mean[name], value)
