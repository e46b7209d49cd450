"""Budget terms as values (compressor/budget/terms.py): the registry, Budget's limits by term name, the
deployment Precision, records written before terms were values, and the strategies' loops over the terms."""

import dataclasses
import json
import pickle

import pytest
from typer.testing import CliRunner

import cli
from compressor.budget import (
    TERMS,
    Budget,
    BudgetError,
    GPUSpec,
    Precision,
    estimate_memory,
    format_bytes,
    get_gpu,
    num_parameters,
    parse_size,
)
from compressor.config import ATTENTION
from compressor.presets import get_preset
from strategies.costs import BlockCosts, share
from strategies.minipuzzle import MiniPuzzleOptions, MiniPuzzleStrategy
from strategies.minitron import MinitronOptions, MinitronStrategy

# A record's budget as `Budget.to_dict` wrote it before terms were values (a search with a speedup floor).
OLD_RECORD = {
    "memory": 21109786132, "context": 131072, "batch": 1, "weight_dtype": "bf16", "kv_dtype": "fp8",
    "ssm_dtype": None, "prefill_chunk": 2048, "params": None, "active_params": None,
    "gpu": {"name": "A10G", "memory_bandwidth": 600e9, "bf16_flops": 70e12, "memory": 24 * 2**30},
    "min_speedup": 1.5, "workload": {"input_tokens": 8192, "output_tokens": 1024, "batch": 1},
    "description": "19.66 GiB at 131,072 tokens x 1 (bf16); >= 1.50x tokens/s on A10G (8,192 in / 1,024 out)",
}  # fmt: skip


def test_a_record_written_before_reads_back_and_writes_the_same_keys():
    budget = Budget.from_dict(OLD_RECORD)
    assert budget.memory == 21109786132 and budget.min_speedup == 1.5 and budget.params is None
    assert budget.precision == Precision("bf16", "fp8", None) and budget.kv_dtype == "fp8"
    assert budget.gpu == GPUSpec("A10G", 600e9, 70e12, 24 * 2**30)
    written = budget.to_dict()
    assert {key: written[key] for key in OLD_RECORD} == OLD_RECORD
    assert Budget.from_dict(written) == budget


@pytest.mark.parametrize("value", ["20GiB", -5, True, [1]])
def test_a_record_with_a_limit_that_is_not_a_positive_number_is_refused(value):
    with pytest.raises(BudgetError, match="a budget record's memory must be a positive number"):
        Budget.from_dict({**OLD_RECORD, "memory": value})
    with pytest.raises(BudgetError, match="unknown key 'target_mem'"):
        Budget.from_dict({**OLD_RECORD, "target_mem": "20GiB"})


def test_limits_by_term_name_and_the_precision_in_one_value():
    budget = Budget(memory=parse_size("20GiB"), params=9_000_000_000, weight_dtype="bfloat16", ssm_dtype="float16")
    assert budget.limits == (("memory", 20 * 2**30), ("params", 9_000_000_000))  # in TERMS order
    assert budget.limit("params") == budget.params == 9_000_000_000 and budget.active_params is None
    assert budget.precision == Precision("bf16", None, "fp16") and budget.weight_dtype == "bf16"
    assert budget.precision.keywords() == {"weight_dtype": "bf16", "kv_dtype": None, "ssm_dtype": "fp16"}
    assert [term.name for term, _ in budget.additive_terms()] == ["memory", "params"]
    with pytest.raises(AttributeError):
        budget.memory_limit  # noqa: B018
    with pytest.raises(TypeError, match="unknown term 'memroy'"):
        Budget(memroy=1)
    with pytest.raises(BudgetError, match="unknown KV cache dtype 'int4'"):
        Precision(kv="int4")


def test_replace_sets_and_clears_terms_and_keeps_the_setting():
    budget = Budget(params=10**9, context=4096, gpu=get_gpu("a10g"), min_speedup=1.2, kv_dtype="fp8")
    surrogate = dataclasses.replace(budget, memory=2**30, min_speedup=None, gpu=None)
    assert surrogate.limits == (("memory", 2**30), ("params", 10**9)) and surrogate.gpu is None
    assert surrogate.context == 4096 and surrogate.precision == budget.precision
    assert dataclasses.replace(budget, prefill_chunk=0).limits == budget.limits
    assert hash(budget) == hash(dataclasses.replace(budget))
    assert pickle.loads(pickle.dumps(budget)) == budget  # torchrun processes receive it pickled


def test_violations_and_words_come_from_each_term_in_order():
    config = get_preset("9b-v2")
    budget = Budget(memory=parse_size("10GiB"), params=1_000_000_000, context=8192)
    assert budget.violations(config, config) == [
        f"memory {TERMS['memory'].format(budget.memory_of(config).total)} > 10.00 GiB",
        f"parameters {num_parameters(config):,} > 1,000,000,000",
    ]
    assert budget.describe() == "10.00 GiB at 8,192 tokens x 1 (bf16); <= 1,000,000,000 parameters"
    with pytest.raises(BudgetError, match=r"no budget given: .*\(--target-mem, --target-params"):
        Budget(context=8192)


def test_every_term_has_its_generated_flag_and_from_options_keyword():
    flags = {parameter.name for parameter in cli.BUDGET_OPTIONS}
    assert {term.option for term in TERMS.values()} <= flags
    for term in TERMS.values():
        budget = Budget.from_options(**{term.option: term.example}, gpu="a10g")
        assert budget.limit(term.name) == term.parse(term.example) and len(budget.limits) == 1
        assert str(term.example) in term.help


@pytest.mark.parametrize("preset", ["tiny", "8b"])
def test_block_shares_of_every_additive_term_add_up_to_its_measure(preset):
    """BlockCosts' per-block shares plus the fixed part equal each additive term's measure (memory: but the
    activation allowance, which is the widest block's)."""
    source = get_preset(preset)
    budget = Budget(params=1, context=4096, batch=2, kv_dtype="fp8")
    costs = BlockCosts(source, budget)
    for term in (term for term in TERMS.values() if term.additive):
        parts = [costs.block(spec.kind, source.hidden_size) for spec in source.blocks]
        total = share(costs.base(source.hidden_size), term) + sum(share(part, term) for part in parts)
        assert total == term.share(budget, source)


# ----- the KV-cache term (--target-kv): a term added as one class ---------------------------------------------
def test_kv_cache_term_is_the_attention_blocks_cache_at_the_context():
    config = get_preset("9b-v2")
    budget = Budget(kv_cache=parse_size("1GiB"), context=131072, batch=2, kv_dtype="fp8")
    kv = TERMS["kv_cache"].measure(budget, config)
    attention = [spec for spec in config.blocks if spec.kind == ATTENTION]
    assert kv == sum(2 * s.num_key_value_heads * s.head_dim for s in attention) * 131072 * 2  # fp8: 1 byte
    assert kv == estimate_memory(config, 131072, 2, precision=Precision(kv="fp8")).kv_cache
    assert budget.violations(config, config) == [f"KV cache {format_bytes(kv)} > 1.00 GiB"]
    assert budget.describe() == "KV cache <= 1.00 GiB at 131,072 tokens x 2"
    assert Budget.from_dict(budget.to_dict()) == budget and budget.to_dict()["kv_cache"] == 2**30
    without_attention = config.replace(hybrid_override_pattern=config.pattern.replace("*", "-"))
    assert Budget(kv_cache=1).violations(without_attention, config) == []


def test_the_strategies_meet_a_kv_cache_budget():
    source = get_preset("8b")  # 4 attention blocks: 128 MiB of bf16 KV cache at 8k
    budget = Budget(kv_cache=parse_size("100MiB"), context=8192)
    proposals = MinitronStrategy(MinitronOptions(top_k=5)).propose(source, None, budget)
    assert proposals and all(not budget.violations(t.config(source), source) for t in proposals[:50])
    assert max(t.config(source).count(ATTENTION) for t in proposals[:50]) == 3
    tiny = get_preset("tiny")
    tight = Budget(kv_cache=TERMS["kv_cache"].measure(Budget(kv_cache=1, context=512), tiny) - 1, context=512)
    chosen = MiniPuzzleStrategy(MiniPuzzleOptions()).propose(tiny, None, tight)
    assert chosen and all(t.config(tiny).count(ATTENTION) < tiny.count(ATTENTION) for t in chosen)


def test_prune_dry_run_with_target_kv():
    runner = CliRunner()
    assert "--target-kv" in runner.invoke(cli.app, ["prune", "--help"], env={"COLUMNS": "200"}).output
    result = runner.invoke(cli.app, ["prune", "8b", "--dry-run", "--target-kv", "100MiB", "--ctx", "8k", "--json"])
    assert result.exit_code == 0, result.output
    candidates = json.loads(result.output)["candidates"]
    kinds = [[block["kind"] for block in c["target"]["blocks"]] for c in candidates]
    assert kinds and all(blocks.count(ATTENTION) <= 3 for blocks in kinds)
    refused = runner.invoke(cli.app, ["prune", "8b", "--dry-run", "--target-kv", "100"])
    assert refused.exit_code == 1 and "memory size '100' has no unit" in refused.output


def test_a_request_longer_than_the_context_is_refused():
    """estimate sized memory at --ctx and throughput at a longer --isl + --osl request without a word."""
    result = CliRunner().invoke(cli.app, ["estimate", "9b-v2", "--ctx", "1k", "--isl", "4k", "--gpu", "h100-sxm"])
    assert result.exit_code == 1
    assert "4,096 prompt and 512 generated tokens does not fit the context of 1,024" in result.output
    result = CliRunner().invoke(cli.app, ["prune", "9b-v2", "--dry-run", "--target-mem", "9GiB", "--ctx", "16k",
                                          "--isl", "8k", "--osl", "16k", "--gpu", "h100-sxm"])  # fmt: skip
    assert result.exit_code == 1 and "give a --ctx of at least 24,576" in result.output
    result = CliRunner().invoke(cli.app, ["estimate", "9b-v2", "--ctx", "8k", "--isl", "4k"])  # no GPU
    assert result.exit_code == 1 and "--isl sizes the throughput request: give a GPU" in result.output
