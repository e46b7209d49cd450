"""Memory plans before launch (compressor/planning.py) and the dry runs that print them."""

import json

import pytest
import torch
from typer.testing import CliRunner

import cli
from compressor import planning
from compressor.budget import GIB, get_gpu, num_parameters
from compressor.model import HybridLM
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
    assert not any("teacher" in name for name in planning.training_plan(config, student, teacher, "cpu").terms(1))
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


def _dry_run(*args):
    result = runner.invoke(cli.app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_56b_plans_on_h100():
    """The README's plans: MiniPuzzle 56B -> 47B, 8k sequences, H100 80GB."""
    importance = _dry_run("importance", "56b", "--dry-run", "--gpu", "h100", "--seq-len", "8192", "--drop-one", "kl")
    assert importance["smallest_nproc"] == 3 and importance["total"] <= importance["memory"]
    search = _dry_run("search", "56b", "--dry-run", "--target-mem", "88.83GiB", "--ctx", "8k", "--gpu", "h100",
                      "--seq-len", "8192", "--micro-batch-size", "1", "--top-k", "3")  # fmt: skip
    stages = {plan["stage"]: plan for plan in search["memory_plans"]}
    assert stages["importance"]["smallest_nproc"] == 2 and stages["scoring"]["smallest_nproc"] == 4
    assert len(search["candidates"]) == 3
    distill = ["distill", "56b", "47b", "--dry-run", "--gpu", "h100", "--seq-len", "8192", "--micro-batch-size", "1"]
    result = runner.invoke(cli.app, [*distill, "--activation-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "smallest number of H100 SXM that fits: 20" in result.output and "teacher weights" in result.output
    result = runner.invoke(cli.app, distill)
    assert result.exit_code == 0 and "no number of H100 SXM fits" in result.output


def test_dry_run_errors():
    result = runner.invoke(cli.app, ["importance", "tiny", "--dry-run", "--nproc", "0"])
    assert result.exit_code == 1 and "--nproc must be at least 1" in result.output
    result = runner.invoke(cli.app, ["importance", "tiny", "--dry-run", "--gpu", "tpu"])
    assert result.exit_code == 1 and "unknown GPU 'tpu'" in result.output
    result = runner.invoke(cli.app, ["importance", "tiny", "--samples", "4"])
    assert result.exit_code == 1 and "--data is needed" in result.output


@pytest.mark.parametrize("nproc", [1, 4])
def test_the_table_shows_the_asked_process_count(nproc):
    result = runner.invoke(cli.app, ["importance", "12b-v2", "--dry-run", "--gpu", "a10g", "--nproc", str(nproc)])
    assert result.exit_code == 0, result.output
    assert f"per process of {nproc}" in result.output and "smallest number of A10G that fits: 2" in result.output
