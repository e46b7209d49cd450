"""MiniPuzzle: per-block architectures under a budget, from importance or from a config alone."""

import pytest
import torch

from compressor.budget import Budget, BudgetError, num_parameters, parse_params, parse_size
from compressor.checkpoint import load_model, save_model
from compressor.importance import estimate
from compressor.model import HybridLM
from compressor.pipelines.ranking import rank
from compressor.presets import get_preset
from compressor.prune import prune
from strategies.minipuzzle import MiniPuzzleOptions, MiniPuzzleStrategy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(get_preset("tiny").replace(hybrid_override_pattern="M-M*-M-M*M-M-", intermediate_size=256)).eval()


@pytest.fixture(scope="module")
def scores(model):
    gen = torch.Generator().manual_seed(0)
    return estimate(model, [torch.randint(0, 512, (2, 32), generator=gen) for _ in range(2)])


def _search(options, source, scores, budget):
    """The proposals through the shared budget check (what `compress prune --strategy minipuzzle` runs)."""
    strategy = MiniPuzzleStrategy(options)
    return rank(strategy.propose(source, scores, budget), source, budget, limit=strategy.top_k)


def test_every_candidate_meets_memory_and_parameter_budgets(model, scores):
    full = Budget(memory=1, context=2048).memory_of(model.config).total
    for budget in (
        Budget(memory=int(0.8 * full), context=2048),
        Budget(params=int(0.7 * num_parameters(model.config))),
        Budget(memory=int(0.85 * full), context=2048, params=int(0.8 * num_parameters(model.config))),
    ):
        candidates = _search(MiniPuzzleOptions(mamba_head_fractions=(1, 0.5)), model.config, scores, budget)
        assert candidates
        for c in candidates:
            assert not budget.violations(c.target.config(model.config), model.config), c.label


def test_candidates_are_heterogeneous_and_round_trip(model, scores, tmp_path):
    budget = Budget(params=int(0.75 * num_parameters(model.config)))
    options = MiniPuzzleOptions(ffn_fractions=(1, 0.75, 0.5), mamba_head_fractions=(1, 0.5))
    targets = MiniPuzzleStrategy(options).propose(model.config, scores, budget)
    hetero = [t for t in targets if not t.config(model.config).is_uniform]
    assert hetero, "no per-block widths among the proposals"
    pruned = prune(model, scores, hetero[0])
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    save_model(pruned, tmp_path / "hetero")
    loaded = load_model(tmp_path / "hetero")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), pruned(ids))
        cache = loaded.allocate_cache(2, 40)
        stepwise = torch.cat(
            [loaded(ids[:, :30], cache)] + [loaded(ids[:, i : i + 1], cache) for i in range(30, 40)], 1
        )
        torch.testing.assert_close(stepwise, pruned(ids), atol=1e-5, rtol=1e-4)


def test_damage_guides_the_choice(model, scores):
    """With drop damage from importance, the block dropped first is a low-importance one."""
    budget = Budget(params=int(0.9 * num_parameters(model.config)))
    targets = MiniPuzzleStrategy(MiniPuzzleOptions(ffn_fractions=(1.0,))).propose(model.config, scores, budget)
    depth_only = [t for t in targets if len(t.blocks) < model.config.num_blocks]
    assert depth_only
    kept = {b.source for b in depth_only[0].blocks}
    dropped = [i for i in range(model.config.num_blocks) if i not in kept]
    influence = scores.block_influence
    same_kind = [
        i for i in range(model.config.num_blocks) if model.config.block(i).kind == model.config.block(dropped[0]).kind
    ]
    assert influence[dropped[0]] <= sorted(influence[same_kind].tolist())[len(same_kind) // 2]


def test_56b_under_a_47b_memory_target_drops_attention_and_mamba_blocks():
    source, reference = get_preset("56b"), get_preset("47b")
    budget = Budget(memory=Budget(memory=1, context=8192).memory_of(reference).total, context=8192)
    targets = MiniPuzzleStrategy().propose(source, None, budget)
    configs = [t.config(source) for t in targets]
    assert all(budget.memory_of(c).total <= budget.memory for c in configs)
    assert any(
        c.count("attention") < source.count("attention") and c.count("mamba") < source.count("mamba") for c in configs
    )
    assert any(not c.is_uniform for c in configs)  # per-block FFN widths among them


def test_impossible_budget():
    with pytest.raises(BudgetError, match="no candidate meets the budget"):
        _search(MiniPuzzleOptions(), get_preset("9b-v2"), None, Budget(memory=parse_size("2GiB"), context=8192))
    assert parse_params("1B") == 10**9


def test_throughput_first_budget():
    from compressor.budget import Workload, get_gpu

    source = get_preset("12b-v2")
    budget = Budget(context=24576, gpu=get_gpu("a10g"), min_speedup=1.2, workload=Workload(8192, 16384, 1))
    candidates = _search(MiniPuzzleOptions(), source, None, budget)
    assert candidates and all(c.speedup >= 1.2 for c in candidates)
