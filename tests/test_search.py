"""The search pipeline behind `compress search` (compressor/pipelines/search.py): candidates scored
zero-shot, finalists distilled briefly and ranked, resumable; any candidate materialized."""

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import cli
from compressor.budget import Budget, parse_size
from compressor.checkpoint import load_model
from compressor.errors import CompressorError, OptionError
from compressor.pipelines.plots import plot_pareto
from compressor.pipelines.records import SearchRecord
from compressor.pipelines.search import (
    PLOT_FILE,
    SearchConfig,
    finalist_training,
    load_search,
    materialize,
    resume_calibration,
    run_search,
)
from compressor.pipelines.source import CalibrationConfig, calibrate
from compressor.target import Target
from compressor.train import TrainConfig
from tests.conftest import PIPELINE_SEQ as SEQ

runner = CliRunner()


def _budget(workspace, share=0.85):
    full = Budget(memory=1, context=512).memory_of(load_model(workspace / "model").config).total
    return Budget(memory=int(full * share), context=512)


def _config(workspace, *, strategy="minipuzzle", options=None, finalists=2):
    template = finalist_training(workspace / "model", tokens=2 * 8 * SEQ, seq_len=SEQ, batch_size=8,
                                 micro_batch_size=4, lr=1e-3, device="cpu")  # fmt: skip
    template = dataclasses.replace(template, eval_sequences=4, valid_fraction=0.2)
    options = options if options is not None else {"mamba_head_fractions": (1.0, 0.5), "top_k": 4}
    return SearchConfig(_budget(workspace), template, strategy, options, finalists=finalists)


def _calibration(workspace):
    return CalibrationConfig(
        str(workspace / "model"), str(workspace / "tokens.npy"), samples=16, score_samples=8, seq_len=SEQ,
        batch_size=4, all_sequences=True, device="cpu",
    )  # fmt: skip


def _search(workspace, out, *, resume=False, **kwargs):
    model, data = str(workspace / "model"), str(workspace / "tokens.npy")
    calibration = resume_calibration(out, model=model, data=data) if resume else _calibration(workspace)
    return run_search(calibrate(calibration), _config(workspace, **kwargs), out, resume=resume, say=lambda t: None)


def test_search_distills_finalists_ranks_them_and_resumes(workspace, tmp_path, monkeypatch):
    record = _search(workspace, tmp_path / "s")
    assert SearchRecord.from_dict(json.loads((tmp_path / "s" / "search.json").read_text())) == record
    finalists = [c for c in record.candidates if c.finalist]
    assert len(finalists) == 2 and all(c.distilled for c in finalists)
    for c in finalists:  # each validates once, at its end: a ranking reads nothing before the distillation
        metrics = (tmp_path / "s" / "candidates" / str(c.index) / "distill" / "metrics.jsonl").read_text()
        records = [json.loads(line) for line in metrics.splitlines()]
        last_step = max(r["step"] for r in records if r["kind"] == "train")
        assert [r["step"] for r in records if r["kind"] == "eval"] == [last_step]
    kls = [record.candidate(i).distilled.val_kl for i in record.ranking]
    assert kls == sorted(kls)
    assert not (tmp_path / "s" / PLOT_FILE).exists()  # the figure is the command line's
    plot_pareto(record, tmp_path / "s" / PLOT_FILE)
    assert (tmp_path / "s" / PLOT_FILE).stat().st_size > 1000
    assert json.loads((tmp_path / "s" / "pareto.json").read_text())["memory"]
    budget, source = _budget(workspace), load_model(workspace / "model").config
    for c in record.candidates:
        assert not budget.violations(c.target.config(source), source)
        assert Target.from_dict(c.target.to_dict()) == c.target
    # deterministic for a fixed seed
    again = _search(workspace, tmp_path / "again")
    assert again.ranking == record.ranking
    assert [c.distilled for c in again.candidates] == [c.distilled for c in record.candidates]
    # resume skips what finished: only the candidate whose result is gone is distilled again
    (tmp_path / "s" / "candidates" / str(record.ranking[0]) / "result.json").unlink()
    import compressor.pipelines.search as pipeline

    calls = []
    real = pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda config, *a, **k: calls.append(config.out) or real(config, *a, **k))
    resumed = _search(workspace, tmp_path / "s", resume=True)
    assert len(calls) == 1 and resumed.ranking == record.ranking


def test_the_source_is_loaded_and_tokenized_once(workspace, tmp_path, monkeypatch):
    import compressor.pipelines.search as search_pipeline
    import compressor.pipelines.source as source_pipeline
    import compressor.train as recipe
    from compressor import data

    loads, reads = [], []
    for module in (source_pipeline, recipe, search_pipeline):
        real = module.load_model
        monkeypatch.setattr(
            module, "load_model", lambda path, *a, r=real, **k: loads.append(str(path)) or r(path, *a, **k)
        )
    real = data.load_sequences  # what every reader of a model's data (`data.read_sequences`) reads through
    monkeypatch.setattr(data, "load_sequences", lambda *a, r=real, **k: reads.append(a[0]) or r(*a, **k))
    record = _search(workspace, tmp_path / "s", strategy="minitron", options={"top_k": 4}, finalists=4)
    finalists = sum(c.finalist for c in record.candidates)
    assert finalists == len(record.ranking) >= 3
    assert loads.count(str(workspace / "model")) == 1  # the source, once
    assert len(loads) <= 1 + finalists  # plus each finalist's pruned student
    assert len(reads) == 1


def test_search_refuses_a_different_source_on_resume(workspace, tmp_path):
    _search(workspace, tmp_path / "s", finalists=1)
    other = _calibration(workspace)
    from compressor.checkpoint import save_model
    from compressor.model import HybridLM

    torch.manual_seed(9)
    save_model(HybridLM(load_model(workspace / "model").config), tmp_path / "other")
    other = CalibrationConfig(**{**other.to_dict(), "model": str(tmp_path / "other"), "importance": other.importance})
    with pytest.raises(CompressorError, match="is not the model this search started from"):
        run_search(calibrate(other), _config(workspace, finalists=1), tmp_path / "s", resume=True)


def test_materialize_any_candidate(workspace, tmp_path):
    record = _search(workspace, tmp_path / "s", finalists=1)
    last = record.candidates[-1]
    materialize(tmp_path / "s", last.index, tmp_path / "pruned")
    assert load_model(tmp_path / "pruned").num_parameters() == last.params
    materialize(tmp_path / "s", record.ranking[0], tmp_path / "distilled", distilled=True)
    result = runner.invoke(
        cli.app, ["materialize", str(tmp_path / "s"), str(last.index), "--out", str(tmp_path / "x"), "--distilled"]
    )
    assert result.exit_code == 1 and "was not distilled" in result.output
    result = runner.invoke(
        cli.app, ["materialize", str(tmp_path / "s"), str(last.index), "--out", str(tmp_path / "e"), "--hf-exact"]
    )
    assert result.exit_code == 1 and "--hf-exact is retired: transformers 5.25 and newer" in result.output
    assert not (tmp_path / "e").exists()
    result = runner.invoke(cli.app, ["materialize", str(tmp_path / "s"), str(last.index), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    config = load_model(tmp_path / "e").config
    assert config.time_step_limit == (0.0, math.inf)  # as the source says
    where = {
        "nemotron_h": "compressor, transformers, vLLM, llama.cpp)",
        "nemotron_h_puzzle": "compressor, vLLM (trust_remote_code), llama.cpp)",
        "nemotron_h_compressor": "compressor)",
    }[config.served_format]
    assert f"(loads in: {where}" in " ".join(result.output.split())
    result = runner.invoke(cli.app, ["materialize", str(tmp_path / "s"), "99", "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "no candidate 99" in result.output
    result = runner.invoke(cli.app, ["materialize", str(tmp_path), "0", "--out", str(tmp_path / "z")])
    assert result.exit_code == 1 and "is not a search folder" in result.output


def test_search_with_retrieval_records_it_before_and_after_distillation(tmp_path):
    from compressor.tasks import RetrievalConfig

    calibration = CalibrationConfig(
        "examples/model", "examples/data/sample.txt", samples=4, score_samples=2, seq_len=64, batch_size=2,
        all_sequences=True, device="cpu", retrieval=RetrievalConfig("phonebook", 256, sequences=1),
    )  # fmt: skip
    template = TrainConfig(student="", out="", data="", steps=2, seq_len=64, batch_size=2, micro_batch_size=2,
                           eval_sequences=2, eval_every=10**9, max_sequences=64, device="cpu")  # fmt: skip
    config = SearchConfig(Budget(memory=parse_size("20MiB"), context=1024), template, "minipuzzle", {"top_k": 3},
                          finalists=1, score="kl+retrieval", retrieval_weight=0.5)  # fmt: skip
    out = tmp_path / "search"
    source = calibrate(calibration)
    record = run_search(source, config, out, say=lambda t: None)
    assert record.score_metric == "kl+retrieval" and record.retrieval["weight"] == 0.5
    assert all(c.retrieval is not None and c.retrieval["context"] == 256 for c in record.candidates)
    finalist = next(c for c in record.candidates if c.finalist)
    assert finalist.distilled.retrieval["queries"] == 16
    distilled = load_model(out / "candidates" / str(finalist.index) / "distill" / "model")
    again = source.retrieval.result(distilled)  # the run's last validation measured the saved weights
    assert finalist.distilled.retrieval["log_likelihood"] == pytest.approx(again.log_likelihood, abs=1e-6)
    assert finalist.distilled.retrieval["accuracy"] == again.accuracy
    plot_pareto(record, out / PLOT_FILE)  # with the retrieval panel
    assert (out / PLOT_FILE).stat().st_size > 0
    again = SearchConfig.from_record(load_search(out))
    assert (again.score, again.retrieval_weight) == ("kl+retrieval", 0.5)
    assert resume_calibration(out, model=calibration.model, data=calibration.data).retrieval == calibration.retrieval


def test_search_ranks_by_retrieval_after_distillation_with_attention_transfer(tmp_path):
    from compressor.attention_transfer import Pair, attention_pairs
    from compressor.config import ATTENTION
    from compressor.pipelines.records import CompressionRecord
    from compressor.tasks import RetrievalConfig
    from tests.conftest import train_records

    calibration = CalibrationConfig(
        "examples/model", "examples/data/sample.txt", samples=4, score_samples=2, seq_len=64, batch_size=2,
        all_sequences=True, device="cpu", retrieval=RetrievalConfig("phonebook", 256, sequences=1),
    )  # fmt: skip
    template = TrainConfig(student="", out="", data="", teacher="examples/model", steps=2, seq_len=64, batch_size=2,
                           micro_batch_size=2, eval_sequences=2, eval_every=10**9, log_every=1, max_sequences=64,
                           device="cpu", attention_loss=1.0, attention_queries=16)  # fmt: skip
    config = SearchConfig(Budget(memory=parse_size("20MiB"), context=1024), template, "minitron", {"top_k": 3},
                          finalists=3, rank_by="retrieval")  # fmt: skip
    out = tmp_path / "search"
    record = run_search(calibrate(calibration), config, out, say=lambda t: None)
    finalists = [c for c in record.candidates if c.finalist]
    assert len(record.ranking) == len(finalists) == 3
    keys = [(1 - c.distilled.retrieval["accuracy"], c.distilled.val_kl) for c in map(record.candidate, record.ranking)]
    assert keys == sorted(keys)
    source = load_model("examples/model").config
    for c in finalists:
        folder = out / "candidates" / str(c.index)
        compression = CompressionRecord.from_dict(json.loads((folder / "pruned" / "compression.json").read_text()))
        assert compression.chosen.target == c.target and compression.source == record.source
        pairs = attention_pairs(folder / "pruned", load_model(folder / "pruned").config, "examples/model", source)
        assert pairs == tuple(Pair(i, b.source) for i, b in enumerate(c.target.blocks) if b.kind == ATTENTION)
        assert all(r["attention_kl"] > 0 for r in train_records(folder / "distill"))  # the transfer ran
    # the ranking goes by retrieval, not KL: finished results, rewritten so the two disagree, are ranked again
    for rank, c in enumerate(finalists):
        result = {**json.loads((out / "candidates" / str(c.index) / "result.json").read_text()), "val_kl": 1.0 - rank}
        result["retrieval"] = {**result["retrieval"], "accuracy": rank / 4}
        (out / "candidates" / str(c.index) / "result.json").write_text(json.dumps(result))
    resumed = resume_calibration(out, model=calibration.model, data=calibration.data)
    again = run_search(calibrate(resumed), SearchConfig.from_record(load_search(out)), out, resume=True,
                       say=lambda t: None)  # fmt: skip
    assert again.ranking == [c.index for c in reversed(finalists)]
    assert again.pareto["memory"]  # the front is taken on retrieval error
    materialize(out, again.ranking[0], tmp_path / "chosen")
    chosen = CompressionRecord.from_dict(json.loads((tmp_path / "chosen" / "compression.json").read_text()))
    assert chosen.chosen.target == again.candidate(again.ranking[0]).target


def test_ranking_by_retrieval_needs_the_probe(workspace, tmp_path):
    template = _config(workspace).distill
    config = SearchConfig(_budget(workspace), template, "minitron", {"top_k": 2}, finalists=1, rank_by="retrieval")
    with pytest.raises(OptionError, match="rank_by retrieval needs the retrieval probe"):
        run_search(calibrate(_calibration(workspace)), config, tmp_path / "s", say=lambda t: None)
