"""Memory plans before launch (compressor/planning.py) and the dry runs that print them."""

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

import cli
from compressor import planning
from compressor.budget import GIB, Budget, format_bytes, get_gpu, num_parameters
from compressor.data import DataError
from compressor.errors import CompressorError, OptionError
from compressor.importance import META_FILE, SCORES_FILE, ImportanceOptions, score_shapes
from compressor.model import HybridLM
from compressor.outputs import save_tensors
from compressor.pipelines.importance import ImportanceRunOptions, importance_or_preview
from compressor.pipelines.preview import CompressionStages, preview_compression, preview_importance, preview_training
from compressor.pipelines.pruning import PruneConfig, PruneOptions, prune_or_preview
from compressor.presets import get_preset
from compressor.train import TrainConfig

runner = CliRunner()


def _root_and_block(config):
    model = HybridLM(config)
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.backbone.layers]
    return model.num_parameters() - sum(blocks), max(blocks)


def test_distill_plan_counts_every_term():
    student, teacher = get_preset("tiny"), get_preset("tiny").replace(hidden_size=96)
    config = TrainConfig(student="s", out="o", data="d", teacher="t", seq_len=32, micro_batch_size=4)
    plan = planning.training_plan(config, student, teacher, "cpu")
    params, teacher_params = num_parameters(student), num_parameters(teacher)
    one = plan.terms(1)
    assert one["student weights"] == one["gradients"] == 4 * params
    teacher_weights = one["teacher weights (blocks)"] + one["teacher weights (embeddings, norm_f, lm_head)"]
    assert one["optimizer state (AdamW)"] == 8 * params and teacher_weights == 4 * teacher_params
    assert one["activations (one micro-batch)"] > 0
    assert one["loss chunk"] == 32 * 4 * student.vocab_size * 4 * 4  # rows x vocab x fp32 x 4 copies
    assert plan.total(1) == sum(one.values())
    config.cache_teacher = True
    cached = planning.training_plan(config, student, teacher, "cpu")
    assert not any("teacher" in name for name in cached.terms(1))
    # the cache's disk: 12 bytes a slot, 64 draws and the most likely token; the steps' tokens at most
    config.steps, config.batch_size = 10, 8
    (note,) = planning.training_plan(config, student, teacher, "cpu").notes
    tokens = 10 * 8 * 32
    said = f"teacher cache on disk: at most {format_bytes(tokens * 780)} for {tokens:,} training tokens at 780 bytes"
    assert note.startswith(f"{said} a token (sampled, 65 slots)")
    # checkpointing keeps each block's input and one block's tensors
    config.activation_checkpointing = True
    saved = planning.training_plan(config, student, teacher, "cpu").terms(1)
    assert 0 < saved["activations (block inputs + one block)"] < one["activations (one micro-batch)"]


def test_sharded_terms_divide_and_gathered_terms_appear_with_several_processes():
    config = get_preset("small")
    plan = planning.importance_plan(config, seq_len=64, dtype=torch.bfloat16, drop_one=True)
    one, four = plan.terms(1), plan.terms(4)
    params = num_parameters(config)
    root, block = _root_and_block(config)
    blocks, whole = "model weights (blocks)", "model weights (embeddings, norm_f, lm_head)"
    assert one[blocks] + one[whole] == 2 * params and one[whole] == four[whole] == 2 * root
    assert four[blocks] == -(-2 * (params - root) // 4)
    assert "model largest block (gathered)" not in one and four["model largest block (gathered)"] == 2 * 2 * block
    for name in ("activations (one forward)", "drop-one: block inputs", "loss chunk"):
        assert one[name] == four[name] > 0
    stream = 4 if config.residual_in_fp32 else 2
    assert one["drop-one: block inputs"] == config.num_blocks * 64 * config.hidden_size * stream


def test_smallest_nproc_is_the_fewest_that_fit():
    plan = planning.scoring_plan(get_preset("8b"), get_preset("4b"), seq_len=4096, batches=64, dtype=torch.bfloat16)
    memory = planning.device_memory(get_gpu("a10g"))
    n = plan.smallest_nproc(memory)
    assert n > 1 and plan.total(n) <= memory < plan.total(n - 1)
    assert plan.smallest_nproc(10**15) == 1
    assert plan.smallest_nproc(GIB) is None  # the per-process terms alone need more


def test_56b_plans_on_h100():
    """The README's plans: MiniPuzzle 56B -> 47B, 8k sequences, H100 80GB."""
    (importance,) = preview_importance("56b", seq_len=8192, batch_size=1, drop_one=True, gpu="h100").to_dict()
    assert importance["smallest_nproc"] == 3 and importance["total"] <= importance["memory"]
    budget = Budget.from_options(target_mem="88.83GiB", ctx="8k", gpu="h100")
    distill = TrainConfig(student="", out="", data="", teacher="56b", seq_len=8192, micro_batch_size=1)
    stages = CompressionStages(seq_len=8192, batch_size=1, score_samples=64, importance=True, distill=distill)
    search = preview_compression("56b", PruneConfig(budget, "minipuzzle", {"top_k": "3"}), stages).to_dict()
    plans = {plan["stage"]: plan for plan in search["memory_plans"]}
    assert plans["importance"]["smallest_nproc"] == 2 and plans["scoring"]["smallest_nproc"] == 4
    assert len(search["candidates"]) == 3
    config = TrainConfig(student="47b", out=None, data=None, teacher="56b", seq_len=8192, micro_batch_size=1,
                         activation_checkpointing=True)  # fmt: skip
    (plan,) = preview_training(config, gpu="h100").to_dict()
    assert plan["smallest_nproc"] == 20 and any("teacher weights" in term for term in plan["terms"])
    (plan,) = preview_training(dataclasses.replace(config, activation_checkpointing=False), gpu="h100").to_dict()
    assert plan["smallest_nproc"] is None


def test_the_asked_process_count_and_errors():
    for nproc in (1, 4):
        (stage,) = preview_importance("12b-v2", seq_len=4096, batch_size=1, drop_one=False, gpu="a10g",
                                      nproc=nproc).stages  # fmt: skip
        assert stage.nproc == nproc and stage.plan.smallest_nproc(stage.memory) == 2 and stage.device == "A10G"
    with pytest.raises(OptionError, match="nproc must be at least 1"):
        preview_importance("tiny", seq_len=64, batch_size=1, drop_one=False, nproc=0)
    with pytest.raises(CompressorError, match="neither a checkpoint folder, a config.json nor a preset name"):
        preview_importance("no-such-model", seq_len=64, batch_size=1, drop_one=False)


def test_importance_and_prune_dry_runs_through_their_pipelines(tmp_path):
    """`importance_or_preview` and `prune_or_preview` plan what `compress importance/prune --dry-run` print, and
    a run without its data or folder is refused before anything loads."""
    scoring = ImportanceOptions(drop_one="kl")
    options = ImportanceRunOptions(scoring=scoring, seq_len=8192, gpu="h100")
    preview = importance_or_preview("56b", None, options, dry_run=True).to_dict()
    assert preview == preview_importance("56b", seq_len=8192, batch_size=1, drop_one=True, gpu="h100").to_dict()
    with pytest.raises(OptionError, match="data is needed"):
        importance_or_preview("56b", tmp_path / "scores", ImportanceRunOptions())
    with pytest.raises(OptionError, match="out is needed"):
        importance_or_preview("56b", None, ImportanceRunOptions(data="text.txt"))

    budget = Budget.from_options(target_mem="88.83GiB", ctx="8k", gpu="h100")
    options = PruneOptions(budget=budget, strategy="minitron", strategy_options={"top_k": "3"}, seq_len=8192)
    preview = prune_or_preview("56b", None, options, dry_run=True).to_dict()
    stages = CompressionStages(seq_len=8192, batch_size=1, score_samples=64, importance=True)
    assert preview == {**preview_compression("56b", options.config(), stages).to_dict(), "seconds": preview["seconds"]}
    assert [plan["stage"] for plan in preview["memory_plans"]] == ["importance", "scoring"]
    scores = _importance_folder(tmp_path / "scores", get_preset("56b"))
    reused = prune_or_preview("56b", None, dataclasses.replace(options, importance_dir=scores), dry_run=True)
    assert [plan.plan.stage for plan in reused.memory.stages] == ["scoring"]  # importance reused, not planned
    with pytest.raises(OptionError, match="out is needed"):
        prune_or_preview("56b", None, options)
    with pytest.raises(OptionError, match="export_config is not a valid JSON object"):
        prune_or_preview("56b", tmp_path / "pruned", dataclasses.replace(options, export_config="{not json"))


def _importance_folder(folder, config) -> str:
    """An importance folder with a table of ones for each score of a model with `config`."""
    folder.mkdir()
    save_tensors({name: torch.ones(shape) for name, shape in score_shapes(config).items()}, folder / SCORES_FILE)
    (folder / META_FILE).write_text("{}")
    return str(folder)


def test_a_dry_run_checks_the_paths_it_is_given(tmp_path):
    """What a run would stop on before its long work stops its dry run too (`source.check_paths`): data not
    found, a folder that holds no scores or scores of another model, an output that exists or is an input.
    Paths left out are not needed to plan, and nothing is written."""
    (tmp_path / "text.txt").write_text("some text")
    budget = Budget.from_options(target_mem="88.83GiB", ctx="8k", gpu="h100")
    options = PruneOptions(budget=budget, strategy="minitron", seq_len=8192, data=str(tmp_path / "text.txt"))
    tiny_scores = _importance_folder(tmp_path / "tiny_scores", get_preset("tiny"))
    before = sorted(tmp_path.rglob("*"))
    assert prune_or_preview("56b", tmp_path / "new", options, dry_run=True).candidates
    for changed, error, message in (
        ({"data": str(tmp_path / "missing.txt")}, DataError, "data not found: .*missing.txt does not exist"),
        ({"importance_dir": str(tmp_path / "text.txt")}, CompressorError, "is not an importance folder"),
        ({"importance_dir": tiny_scores}, CompressorError, "tiny_scores do not fit this model"),
    ):
        with pytest.raises(error, match=message):
            prune_or_preview("56b", None, dataclasses.replace(options, **changed), dry_run=True)
    with pytest.raises(CompressorError, match="tiny_scores already exists: choose another path or pass --overwrite"):
        prune_or_preview("56b", tiny_scores, options, dry_run=True)
    with pytest.raises(CompressorError, match="holds the input"):
        prune_or_preview("56b", tmp_path, options, dry_run=True, overwrite=True)
    with pytest.raises(DataError, match="data not found"):
        importance_or_preview("56b", None, ImportanceRunOptions(data=str(tmp_path / "missing.txt")), dry_run=True)
    with pytest.raises(CompressorError, match="already exists"):
        importance_or_preview("56b", tiny_scores, ImportanceRunOptions(), dry_run=True)
    assert sorted(tmp_path.rglob("*")) == before


def test_dry_run_errors():
    result = runner.invoke(cli.app, ["importance", "tiny", "--dry-run", "--nproc", "0"])
    assert result.exit_code == 1 and "--nproc must be at least 1" in result.output
    result = runner.invoke(cli.app, ["importance", "tiny", "--dry-run", "--gpu", "tpu"])
    assert result.exit_code == 1 and "unknown GPU 'tpu'" in result.output
    result = runner.invoke(cli.app, ["importance", "tiny", "--samples", "4"])
    assert result.exit_code == 1 and "--data is needed" in result.output


def test_dry_run_tables():
    result = runner.invoke(cli.app, ["importance", "12b-v2", "--dry-run", "--gpu", "a10g", "--nproc", "4"])
    assert result.exit_code == 0, result.output
    assert "per process of 4" in result.output and "smallest number of A10G that fits: 2" in result.output
    result = runner.invoke(cli.app, ["distill", "56b", "47b", "--dry-run", "--gpu", "h100", "--seq-len", "8192",
                                     "--micro-batch-size", "1", "--activation-checkpointing"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "smallest number of H100 SXM that fits: 20" in result.output and "teacher weights" in result.output
