"""The pruning pipeline behind `compress prune` (compressor/pipelines/pruning.py): budget in, checkpoint +
compression.json out."""

import json
import subprocess
import sys

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
from compressor.pipelines.pruning import PruneConfig, prune_to_budget
from compressor.pipelines.records import CompressionRecord
from compressor.pipelines.source import CalibrationConfig, calibrate
from tests.conftest import PIPELINE_SEQ, assert_transformers_agrees

runner = CliRunner()
SEQ = PIPELINE_SEQ  # tokens per sequence of the workspace data


def _budget(workspace, share=0.8):
    model = load_model(workspace / "model")
    full = Budget(memory=1, context=512).memory_of(model.config).total
    return Budget(memory=int(full * share), context=512), full


def _calibrate(workspace, model="model", **kwargs):
    defaults = dict(data=str(workspace / "tokens.npy"), samples=16, score_samples=8, seq_len=SEQ, batch_size=4)
    return calibrate(CalibrationConfig(str(workspace / model), **{**defaults, **kwargs}, device="cpu"))


def _run(workspace, out, *, budget=None, options=None, export=None, **calibration):
    config = PruneConfig(budget, options=options or {}, export=export)
    return prune_to_budget(_calibrate(workspace, **calibration), config, out, say=lambda text: None)


def test_pruned_checkpoint_fits_and_records_the_search(workspace, tmp_path):
    budget, full = _budget(workspace)
    record = _run(workspace, tmp_path / "out", budget=budget, options={"top_k": 4})
    pruned = load_model(tmp_path / "out")
    assert budget.memory_of(pruned.config).total <= budget.memory < full
    saved = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert CompressionRecord.from_dict(saved) == record  # one JSON round trip
    assert saved["chosen"] == record.chosen.to_dict() and len(saved["candidates"]) == 4
    assert saved["source"]["fingerprint"] and saved["importance"]["samples"] == 16
    scores = [c["score"] for c in saved["candidates"]]
    assert scores == sorted(scores) and saved["chosen"]["score"] == scores[0]
    assert record.chosen.params == pruned.num_parameters() and record.chosen.label != "unpruned"
    export = json.loads((tmp_path / "out" / "export_config.json").read_text())
    assert export["hidden_size"] == pruned.config.hidden_size and export["num_layers"] == pruned.config.num_blocks
    assert "num_query_groups" not in export  # ModelOpt no longer accepts it
    layers = json.loads((tmp_path / "out" / "export_layers.json").read_text())
    source = load_model(workspace / "model").config
    assert layers["hybrid_override_pattern"] == pruned.config.pattern
    assert "".join(source.pattern[i] for i in layers["kept_blocks"]) == pruned.config.pattern
    assert sorted(layers["layers_to_drop"] + [i + 1 for i in layers["kept_blocks"]]) == list(range(1, 10))


def test_the_score_is_the_kl_of_the_pruned_model_on_held_out_data(workspace, tmp_path):
    budget, _ = _budget(workspace)
    record = _run(workspace, tmp_path / "out", budget=budget, options={"top_k": 2})
    original, pruned = load_model(workspace / "model"), load_model(tmp_path / "out")
    held_out = torch.from_numpy(np.load(workspace / "tokens.npy")[: 24 * SEQ].reshape(24, SEQ)[16:].astype(np.int64))
    result = evaluate(pruned, [held_out[:4], held_out[4:]], teacher=original)
    assert record.chosen.score == pytest.approx(result.kl, rel=1e-4)


def test_export_config_prunes_to_the_named_shape(workspace, tmp_path):
    export = {"hidden_size": 96, "ffn_hidden_size": 128, "num_layers": 7}
    record = _run(workspace, tmp_path / "out", export=export)
    config = load_model(tmp_path / "out").config
    assert (config.hidden_size, config.intermediate_size, config.num_blocks) == (96, 128, 7)
    assert record.strategy == "export_config" and record.chosen.score is not None
    with pytest.raises(CompressorError, match="export_config has unknown key"):
        PruneConfig(export={"layers": 3})
    with pytest.raises(CompressorError, match="hidden_size must be a positive whole number"):
        PruneConfig(export={"hidden_size": 0})
    budget, _ = _budget(workspace, 0.5)
    with pytest.raises(CompressorError, match="names a shape that misses the budget: memory"):
        _run(workspace, tmp_path / "over", budget=budget, export={"hidden_size": 128})


def test_importance_folder_is_reused_and_checked(workspace, tmp_path):
    budget, _ = _budget(workspace)
    result = runner.invoke(
        cli.app,
        ["importance", str(workspace / "model"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
         "--seq-len", str(SEQ), "--out", str(tmp_path / "scores"), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = _run(
        workspace, tmp_path / "out", budget=budget, importance_dir=str(tmp_path / "scores"), options={"top_k": 2}
    )
    assert record.importance["folder"] == str(tmp_path / "scores")
    torch.manual_seed(9)
    save_model(HybridLM(load_model(workspace / "model").config), workspace / "other")
    with pytest.raises(CompressorError, match="computed for another model"):
        _calibrate(workspace, model="other", importance_dir=str(tmp_path / "scores"))
    assert Importance.load(tmp_path / "scores").meta["samples"] == 16


def test_infeasible_budget_fails_cleanly_and_writes_nothing(workspace, tmp_path):
    with pytest.raises(CompressorError, match="no candidate meets the budget.*smallest architecture.*--axes"):
        _run(workspace, tmp_path / "out", budget=Budget(memory=parse_size("1MiB"), context=512))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_cli_prune(workspace, tmp_path):
    _, full = _budget(workspace)
    args = ["prune", str(workspace / "model"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
            "--score-samples", "8", "--seq-len", str(SEQ), "--batch-size", "4", "--ctx", "512", "--device", "cpu",
            "--top-k", "3"]  # fmt: skip
    result = runner.invoke(
        cli.app, [*args, "--target-mem", f"{int(full * 0.8)}B", "--out", str(tmp_path / "a"), "--hf-exact"]
    )
    assert result.exit_code == 1 and "--hf-exact is retired" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a").exists()
    result = runner.invoke(cli.app, [*args, "--target-mem", f"{int(full * 0.8)}B", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "candidates (minitron), best first" in result.output and "wrote the pruned model" in result.output
    assert "(loads in: compressor, transformers, vLLM, llama.cpp)" in " ".join(result.output.split())
    assert_transformers_agrees(tmp_path / "a", tmp_path / "a-bounds")
    result = runner.invoke(cli.app, [*args, "--target-mem", "1KiB", "--out", str(tmp_path / "b")])
    assert (
        result.exit_code == 1 and "no candidate meets the budget" in result.output and "Traceback" not in result.output
    )
    result = runner.invoke(cli.app, [*args, "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "give a budget" in result.output
    result = runner.invoke(cli.app, [*args, "--target-mem", "22GB/s", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and "bandwidth" in result.output
    assert not any((tmp_path / n).exists() for n in "bcd")


def test_two_processes_score_and_prune_as_one(workspace, tmp_path):
    # the source and every candidate sharded over two gloo processes, the held-out batches split among them
    _, full = _budget(workspace)
    args = ["prune", str(workspace / "model"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
            "--score-samples", "12", "--seq-len", str(SEQ), "--batch-size", "5", "--ctx", "512", "--device", "cpu",
            "--top-k", "3", "--target-mem", f"{int(full * 0.8)}B", "--json"]  # fmt: skip
    one = runner.invoke(cli.app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", cli.__file__]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    records = [json.loads((tmp_path / run / "compression.json").read_text()) for run in ("one", "two")]
    assert [c["label"] for c in records[0]["candidates"]] == [c["label"] for c in records[1]["candidates"]]
    np.testing.assert_allclose(
        [c["score"] for c in records[1]["candidates"]], [c["score"] for c in records[0]["candidates"]], rtol=1e-5
    )
    a, b = load_model(tmp_path / "one").state_dict(), load_model(tmp_path / "two").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_prune_an_moe_checkpoint_to_an_active_parameter_budget(workspace, tmp_path):
    from compressor.budget import active_parameters, num_parameters
    from compressor.presets import get_preset
    from tests.conftest import randomize_routers

    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny-moe").replace(hidden_size=96))
    randomize_routers(model)
    save_model(model, tmp_path / "moe")
    limit = int(0.8 * active_parameters(model.config))
    args = ["prune", str(tmp_path / "moe"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
            "--score-samples", "8", "--seq-len", str(SEQ), "--batch-size", "4", "--device", "cpu", "--top-k", "3",
            "--target-active-params", str(limit), "--axes", "hidden,moe_experts,moe_ffn,moe_shared_ffn,depth",
            "--out", str(tmp_path / "pruned")]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "active" in result.output and "wrote the pruned model" in result.output
    pruned = load_model(tmp_path / "pruned").config
    assert active_parameters(pruned) <= limit and num_parameters(pruned) < num_parameters(model.config)
    record = json.loads((tmp_path / "pruned" / "compression.json").read_text())
    assert record["budget"]["active_params"] == limit and record["candidates"][0]["active_params"] <= limit
    export = json.loads((tmp_path / "pruned" / "export_config.json").read_text())
    assert export["moe_ffn_hidden_size"] == pruned.moe_intermediate_size


def test_dry_run_lists_fitting_candidates_of_a_preset():
    result = runner.invoke(
        cli.app,
        ["prune", "12b-v2", "--target-mem", "19.66GiB", "--ctx", "128k", "--dry-run", "--top-k", "60", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["stats"]["grid_points"] == 24_021 and data["strategy"] == "minitron"  # even block counts (ModelOpt)
    assert all(c["memory_bytes"] <= parse_size("19.66GiB") for c in data["candidates"])
    architectures = [c["architecture"] for c in data["candidates"]]
    assert any(a["num_layers"] == 56 and abs(a["hidden_size"] - 4480) <= 256 for a in architectures)
    result = runner.invoke(cli.app, ["prune", "12b-v2", "--target-mem", "19.66GiB", "--ctx", "128k", "--dry-run"])
    assert result.exit_code == 0 and "24,021 grid points" in result.output
    # any strategy, through the same pipeline; nothing fitting is one clear line
    args = ["prune", "12b-v2", "--target-mem", "19.66GiB", "--ctx", "128k", "--dry-run", "--strategy", "minipuzzle"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0 and "minipuzzle" in result.output, result.output
    result = runner.invoke(cli.app, ["prune", "12b-v2", "--target-mem", "1GiB", "--ctx", "128k", "--dry-run"])
    assert result.exit_code == 1 and "no candidate meets the budget" in result.output


def test_dry_run_on_nano3_under_an_active_parameter_budget():
    args = ["prune", "nemotron-3-nano-30b-a3b", "--target-active-params", "3B", "--dry-run", "--top-k", "5"]
    args += ["--axes", "hidden,moe_experts,moe_ffn,moe_shared_ffn,depth"]
    result = runner.invoke(cli.app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    candidates = json.loads(result.output)["candidates"]
    assert len(candidates) == 5
    for c in candidates:
        assert c["active_params"] <= 3_000_000_000 < c["params"]
        assert c["architecture"]["num_moe_experts"] <= 128 and c["architecture"]["moe_ffn_hidden_size"] <= 1856
    assert any(c["architecture"]["moe_shared_expert_intermediate_size"] < 3712 for c in candidates)
    # at ModelOpt's scale the candidates keep to its search space by default, so their export_config loads there
    from compressor.presets import get_preset
    from strategies.export_config import modelopt_problems
    from strategies.grid import modelopt_violations

    source = get_preset("nemotron-3-nano-30b-a3b")
    original = {k: v for k, v in candidates[0]["architecture"].items() if k in ("num_moe_experts",)}
    assert original and json.loads(result.output)["warnings"] == []
    for c in candidates:
        shape = {k: c["architecture"][k] for k in ("num_moe_experts", "moe_ffn_hidden_size", "hidden_size")}
        groups = {"mamba_num_heads": source.n_groups, "num_attention_heads": source.num_key_value_heads}
        assert not modelopt_violations(shape, {"num_moe_experts": 128, "moe_ffn_hidden_size": 1856,
                                               "hidden_size": 2688}, groups), c["label"]  # fmt: skip
    free = runner.invoke(cli.app, [*args, "--modelopt-compatible", "false", "--json"])
    warnings = json.loads(free.output)["warnings"]
    assert len(warnings) == 1 and "ModelOpt refuses their export_config" in warnings[0], warnings
    assert modelopt_problems(source, source) == []
    result = runner.invoke(cli.app, [*args, "--modelopt-compatible", "false"])
    assert "warning: " in result.output and "candidates have shapes ModelOpt's mcore_minitron cannot" in result.output
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0 and "<= 3,000,000,000 active parameters" in " ".join(result.output.split())
    assert "M/*/-/E blocks" in result.output and "active" in result.output and "shared ffn" in result.output
    for strategy in ("minipuzzle", "minitron"):  # default axes too: hidden and depth
        result = runner.invoke(cli.app, [*args[:-2], "--strategy", strategy, "--json"])
        assert result.exit_code == 0, result.output
        assert all(c["active_params"] <= 3_000_000_000 for c in json.loads(result.output)["candidates"])


def test_strategy_options_come_from_the_strategy_and_are_checked(workspace, tmp_path):
    base = ["prune", "12b-v2", "--target-mem", "19.66GiB", "--ctx", "128k", "--dry-run", "--json"]
    narrow = json.loads(runner.invoke(cli.app, [*base, "--axes", "hidden", "--top-k", "3"]).output)
    assert len(narrow["candidates"]) == 3
    assert all(c["architecture"]["num_layers"] == 62 for c in narrow["candidates"])  # depth not pruned
    cases = [
        (["--hidden-choices", "2"], "--hidden-choices is not an option of the minitron strategy"),
        (["--top-k", "two"], "--top-k takes a int, got 'two'"),
        (["--axes", "hidden,width"], "--axes width: choose from"),
        (["--strategy", "minipuzzle", "--ffn-fractions", "a,b"], "--ffn-fractions takes a float, got 'a'"),
        (["--strategy", "minipuzzle", "--ffn-fractions", "1.5"], "--ffn-fractions must be fractions in (0, 1]"),
        (["--strategy", "nope"], "--strategy 'nope' is unknown: choose one of"),
        (["--max-width-pruning", "1"], "--max-width-pruning must be in [0, 1)"),
    ]
    for extra, message in cases:
        result = runner.invoke(cli.app, [*base[:-1], *extra])
        assert result.exit_code == 1 and message in " ".join(result.output.split()), (extra, result.output)
        assert "Traceback" not in result.output


def test_retrieval_in_the_score_keeps_the_block_that_retrieves():
    from compressor.importance import estimate
    from compressor.pipelines.ranking import ProxyScorer, rank
    from compressor.target import Target
    from tests.test_tasks import V, retrieval_probe, retrieving_model

    model, probe = retrieving_model(), retrieval_probe()  # blocks: Mamba, attention (the copy), MLP
    ids = torch.randint(12, V, (4, 64), generator=torch.Generator().manual_seed(0))
    importance = estimate(model, [ids])
    proposals = [Target.uniform(model.config, drop_blocks=(1,)), Target.uniform(model.config, drop_blocks=(2,))]

    def ranked(metric):
        scorer = ProxyScorer(model, importance, [ids], metric, retrieval=probe, retrieval_weight=0.5)
        return scorer, rank(proposals, model.config, None, limit=2, scorer=scorer)

    _, by_kl = ranked("kl")
    scorer, by_both = ranked("kl+retrieval")
    assert [c.label for c in by_kl] == ["-1*", "-1-"]  # on text the attention block matters least ...
    assert [c.label for c in by_both] == ["-1-", "-1*"]  # ... but it is the one that retrieves
    assert scorer.source_retrieval.accuracy == 1.0
    kl = {c.label: c.score for c in by_kl}
    for c in by_both:
        assert c.retrieval["accuracy"] == (0.0 if c.label == "-1*" else 1.0)
        lost = max(0.0, scorer.source_retrieval.log_likelihood - c.retrieval["log_likelihood"])
        assert c.score == pytest.approx(kl[c.label] + 0.5 * lost, rel=1e-6)
    with pytest.raises(CompressorError, match="needs a retrieval task"):
        ProxyScorer(model, importance, [ids], "retrieval")


def test_cli_prune_with_retrieval_in_the_score(tmp_path):
    args = ["prune", "examples/model", "--data", "examples/data/sample.txt", "--samples", "4", "--score-samples", "2",
            "--seq-len", "64", "--target-mem", "20MiB", "--ctx", "1k", "--top-k", "2", "--score", "kl+retrieval",
            "--retrieval-weight", "2", "--retrieval-ctx", "256", "--retrieval-sequences", "1",
            "--axes", "hidden,ffn,mamba_heads,mamba_head_dim,depth"]  # fmt: skip
    result = runner.invoke(cli.app, [*args, "--out", str(tmp_path / "pruned")])
    assert result.exit_code == 0, result.output
    assert "phonebook @256 (acc, ll)" in " ".join(result.output.split())
    record = json.loads((tmp_path / "pruned" / "compression.json").read_text())
    assert record["score_metric"] == "kl+retrieval"
    assert record["retrieval"]["weight"] == 2 and record["retrieval"]["source"]["queries"] == 16
    assert all(c["retrieval"]["context"] == 256 for c in record["candidates"])
    for (flag, value), message in [
        (("--score", "recall"), "--score 'recall' is not one of kl, loss, retrieval, kl+retrieval"),
        (("--retrieval-weight", "-1"), "--retrieval-weight must be a finite number >= 0"),
        (("--retrieval-task", "lookup"), "unknown task 'lookup'"),
    ]:
        given = args.index(flag) if flag in args else len(args)  # the value replaced, or the option added
        bad = [*args[:given], flag, value, *args[given + 2 :]]
        result = runner.invoke(cli.app, [*bad, "--out", str(tmp_path / "x")])
        assert result.exit_code == 1 and message in " ".join(result.output.split()), (flag, result.output)
        assert not (tmp_path / "x").exists()
