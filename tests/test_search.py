"""The pruning pipeline behind `compress prune`: budget in, checkpoint + compression.json out."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from compressor.budget import Budget, parse_size
from compressor.checkpoint import load_model, save_model
from compressor.errors import CompressorError
from compressor.evaluate import evaluate
from compressor.importance import Importance
from compressor.model import HybridLM
from compressor.presets import get_preset
from compressor.search import prune_to_budget

runner = CliRunner()
SEQ = 32


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    save_model(HybridLM(get_preset("tiny").replace(hidden_size=128, intermediate_size=256)), root / "model")
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", (np.cumsum(rng.choice([1, 1, 2], size=48 * SEQ)) % 512).astype(np.int32))
    return root


def _budget(workspace, share=0.8):
    model = load_model(workspace / "model")
    full = Budget(memory=1, context=512).memory_of(model.config).total
    return Budget(memory=int(full * share), context=512), full


def _run(workspace, out, **kwargs):
    defaults = dict(
        data=str(workspace / "tokens.npy"), samples=16, score_samples=8, seq_len=SEQ, batch_size=4, device="cpu"
    )
    return prune_to_budget(workspace / "model", out, **{**defaults, **kwargs})


def test_pruned_checkpoint_fits_and_records_the_search(workspace, tmp_path):
    budget, full = _budget(workspace)
    record = _run(workspace, tmp_path / "out", budget=budget, strategy_options={"top_k": 4})
    pruned = load_model(tmp_path / "out")
    assert budget.memory_of(pruned.config).total <= budget.memory < full
    saved = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert saved["chosen"] == record["chosen"] and len(saved["candidates"]) == 4
    assert saved["source"]["fingerprint"] and saved["importance"]["samples"] == 16
    scores = [c["score"] for c in saved["candidates"]]
    assert scores == sorted(scores) and saved["chosen"]["score"] == scores[0]
    export = json.loads((tmp_path / "out" / "export_config.json").read_text())
    assert export["hidden_size"] == pruned.config.hidden_size and export["num_layers"] == pruned.config.num_blocks


def test_the_score_is_the_kl_of_the_pruned_model_on_held_out_data(workspace, tmp_path):
    budget, _ = _budget(workspace)
    record = _run(workspace, tmp_path / "out", budget=budget, strategy_options={"top_k": 2})
    original, pruned = load_model(workspace / "model"), load_model(tmp_path / "out")
    held_out = torch.from_numpy(np.load(workspace / "tokens.npy")[: 24 * SEQ].reshape(24, SEQ)[16:].astype(np.int64))
    result = evaluate(pruned, [held_out[:4], held_out[4:]], teacher=original)
    assert record["chosen"]["score"] == pytest.approx(result.kl, rel=1e-4)


def test_export_config_prunes_to_the_named_shape(workspace, tmp_path):
    export = {"hidden_size": 96, "ffn_hidden_size": 128, "num_layers": 7}
    record = _run(workspace, tmp_path / "out", budget=None, export=export)
    config = load_model(tmp_path / "out").config
    assert (config.hidden_size, config.intermediate_size, config.num_blocks) == (96, 128, 7)
    assert record["strategy"]["name"] == "export_config" and record["chosen"]["score"] is not None
    with pytest.raises(CompressorError, match="unknown export_config key"):
        _run(workspace, tmp_path / "bad", budget=None, export={"layers": 3})


def test_importance_folder_is_reused_and_checked(workspace, tmp_path):
    budget, _ = _budget(workspace)
    result = runner.invoke(
        cli.app,
        ["importance", str(workspace / "model"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
         "--seq-len", str(SEQ), "--out", str(tmp_path / "scores"), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = _run(
        workspace, tmp_path / "out", budget=budget, importance_dir=tmp_path / "scores", strategy_options={"top_k": 2}
    )
    assert record["importance"]["folder"] == str(tmp_path / "scores")
    torch.manual_seed(9)
    save_model(HybridLM(load_model(workspace / "model").config), tmp_path / "other")
    with pytest.raises(CompressorError, match="computed for another model"):
        prune_to_budget(tmp_path / "other", tmp_path / "x", budget=budget, importance_dir=tmp_path / "scores")
    assert Importance.load(tmp_path / "scores").meta["samples"] == 16


def test_infeasible_budget_fails_cleanly_and_writes_nothing(workspace, tmp_path):
    with pytest.raises(CompressorError, match="no candidate meets the budget.*smallest architecture"):
        _run(workspace, tmp_path / "out", budget=Budget(memory=parse_size("1MiB"), context=512))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_cli_prune(workspace, tmp_path):
    _, full = _budget(workspace)
    args = ["prune", str(workspace / "model"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
            "--score-samples", "8", "--seq-len", str(SEQ), "--batch-size", "4", "--ctx", "512", "--device", "cpu",
            "--top-k", "3"]  # fmt: skip
    result = runner.invoke(cli.app, [*args, "--target-mem", f"{int(full * 0.8)}B", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "candidates (minitron), best first" in result.output and "wrote the pruned model" in result.output
    result = runner.invoke(cli.app, [*args, "--target-mem", "1KiB", "--out", str(tmp_path / "b")])
    assert (
        result.exit_code == 1 and "no candidate meets the budget" in result.output and "Traceback" not in result.output
    )
    result = runner.invoke(cli.app, [*args, "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "give a budget" in result.output
    result = runner.invoke(cli.app, [*args, "--target-mem", "22GB/s", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and "bandwidth" in result.output
    assert not any((tmp_path / n).exists() for n in "bcd")


def test_dry_run_lists_fitting_candidates_of_a_preset():
    result = runner.invoke(
        cli.app,
        ["prune", "12b-v2", "--target-mem", "19.66GiB", "--ctx", "128k", "--dry-run", "--top-k", "60", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["grid_points"] == 44_370 and data["seconds"] < 20
    assert all(c["memory_bytes"] <= parse_size("19.66GiB") for c in data["candidates"])
    assert any(c["num_layers"] == 56 and abs(c["hidden_size"] - 4480) <= 256 for c in data["candidates"])
    result = runner.invoke(cli.app, ["prune", "12b-v2", "--target-mem", "19.66GiB", "--ctx", "128k", "--dry-run"])
    assert result.exit_code == 0 and "grid points costed" in result.output


def _search(workspace, out, **kwargs):
    from compressor.search import DistillSettings, run_search

    budget, _ = _budget(workspace, 0.85)
    settings = DistillSettings(
        tokens=2 * 8 * SEQ, seq_len=SEQ, batch_size=8, micro_batch_size=4, lr=1e-3, eval_sequences=4, valid_fraction=0.2
    )
    defaults = dict(
        budget=budget, data=str(workspace / "tokens.npy"), strategy="minipuzzle", finalists=2, distill=settings,
        samples=16, score_samples=8, batch_size=4, device="cpu",
        strategy_options={"mamba_head_fractions": (1.0, 0.5), "top_k": 4},
    )  # fmt: skip
    return run_search(workspace / "model", out, **{**defaults, **kwargs})


def test_search_distills_finalists_ranks_them_and_resumes(workspace, tmp_path, monkeypatch):
    record = _search(workspace, tmp_path / "s")
    finalists = [e for e in record["candidates"] if e["finalist"]]
    assert len(finalists) == 2 and all(e["distilled"] for e in finalists)
    kls = [next(e for e in finalists if e["index"] == i)["distilled"]["val_kl"] for i in record["ranking"]]
    assert kls == sorted(kls)
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 1000
    assert json.loads((tmp_path / "s" / "pareto.json").read_text())["memory"]
    budget, _ = _budget(workspace, 0.85)
    source = load_model(workspace / "model").config
    for e in record["candidates"]:
        from compressor.prune import Target

        assert not budget.violations(Target.from_dict(e["target"]).config(source), source)
    # deterministic for a fixed seed
    again = _search(workspace, tmp_path / "again")
    assert again["ranking"] == record["ranking"]
    assert [e["distilled"] for e in again["candidates"]] == [e["distilled"] for e in record["candidates"]]
    # resume skips what finished: only the candidate whose result is gone is distilled again
    (tmp_path / "s" / "candidates" / str(record["ranking"][0]) / "result.json").unlink()
    import compressor.train

    calls = []
    real = compressor.train.train
    monkeypatch.setattr(compressor.train, "train", lambda config, *a: calls.append(config.out) or real(config, *a))
    resumed = _search(workspace, tmp_path / "s", resume=True)
    assert len(calls) == 1 and resumed["ranking"] == record["ranking"]


def test_materialize_any_candidate(workspace, tmp_path):
    from compressor.search import materialize

    record = _search(workspace, tmp_path / "s", finalists=1)
    last = record["candidates"][-1]
    materialize(tmp_path / "s", last["index"], tmp_path / "pruned")
    assert load_model(tmp_path / "pruned").num_parameters() == last["params"]
    best = record["ranking"][0]
    materialize(tmp_path / "s", best, tmp_path / "distilled", distilled=True)
    result = runner.invoke(
        cli.app, ["materialize", str(tmp_path / "s"), str(last["index"]), "--out", str(tmp_path / "x"), "--distilled"]
    )
    assert result.exit_code == 1 and "was not distilled" in result.output
    result = runner.invoke(cli.app, ["materialize", str(tmp_path / "s"), "99", "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "no candidate 99" in result.output
