"""MiniPuzzle: per-block architectures (MoE expert choices too) under a budget, from importance or a config alone."""

import dataclasses

import pytest
import torch

from compressor.budget import Budget, BudgetError, active_parameters, num_parameters, parse_params, parse_size
from compressor.checkpoint import load_model, save_model
from compressor.errors import OptionError
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


def test_servable_candidates_share_widths_per_kind(model, scores, moe_model, moe_scores, tmp_path):
    """--servable uniform (or the earlier `true`): every candidate writes the standard uniform format
    (transformers loads it), narrows or drops something, and meets the budget. vllm: per-block MLP / MoE
    widths, one Mamba width (the Puzzle format vLLM serves); any: per-block Mamba heads too (compressor only);
    auto: vllm's candidates."""
    transformers = pytest.importorskip("transformers")
    for source, importance in ((model, scores), (moe_model, moe_scores)):
        budget = Budget(params=int(0.75 * num_parameters(source.config)))
        options = MiniPuzzleOptions(ffn_fractions=(1, 0.75, 0.5), mamba_head_fractions=(1, 0.5), servable="true")
        assert options.servable == "uniform"
        candidates = _search(options, source.config, importance, budget)
        assert candidates
        for c in candidates:
            config = c.target.config(source.config)
            assert config.is_uniform and not budget.violations(config, source.config), c.label
        formats = {}
        for mode in ("vllm", "any", "auto"):
            strategy = MiniPuzzleStrategy(dataclasses.replace(options, servable=mode))
            targets = strategy.propose(source.config, importance, budget)
            formats[mode] = [t.config(source.config).served_format for t in targets]
            assert strategy.stats["servable"] == ("vllm" if mode == "auto" else mode)
        assert "nemotron_h_compressor" not in formats["vllm"] and "nemotron_h_puzzle" in formats["vllm"]
        assert set(formats["any"]) - {"nemotron_h"} and formats["auto"] == formats["vllm"]
    with pytest.raises(OptionError, match="'all' is not one of auto, uniform, vllm, any"):
        MiniPuzzleOptions(servable="all")
    save_model(prune(moe_model, moe_scores, candidates[0].target), tmp_path / "servable")  # an MoE candidate
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = (
            transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "servable").eval()(ids, use_cache=False).logits
        )
        assert (load_model(tmp_path / "servable")(ids) - theirs).abs().max() < 1e-3  # the dt floor aside


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


# ----- MoE blocks ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_model():
    from tests.conftest import randomize_routers

    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny-moe").replace(n_group=2, topk_group=1)).eval()
    randomize_routers(model)
    return model


@pytest.fixture(scope="module")
def moe_scores(moe_model):
    gen = torch.Generator().manual_seed(0)
    return estimate(moe_model, [torch.randint(0, 512, (2, 24), generator=gen) for _ in range(2)])


def test_moe_blocks_choose_their_experts_under_active_and_total_budgets(moe_model, moe_scores, tmp_path):
    source = moe_model.config
    full = Budget(memory=1, context=2048, prefill_chunk=0).memory_of(source).total  # weights and caches
    options = MiniPuzzleOptions(expert_fractions=(1, 0.75, 0.5), ffn_fractions=(1, 0.75, 0.5))
    budgets = (
        Budget(active_params=int(0.85 * active_parameters(source))),
        Budget(params=int(0.75 * num_parameters(source))),
        Budget(
            memory=int(0.8 * full), context=2048, prefill_chunk=0, active_params=int(0.9 * active_parameters(source))
        ),
    )
    fewer_experts = []
    for budget in budgets:
        candidates = _search(options, source, moe_scores, budget)
        assert candidates
        for c in candidates:
            config = c.target.config(source)
            assert not budget.violations(config, source), c.label
            fewer_experts += [
                (c, s.index) for s in config.blocks if s.kind == "moe" and s.n_routed_experts < source.n_routed_experts
            ]
    assert fewer_experts, "no MoE block kept fewer experts"
    per_block = [c for c, _ in fewer_experts if not c.target.config(source).is_uniform]
    assert per_block and "experts" in per_block[0].label
    pruned = prune(moe_model, moe_scores, per_block[0].target)
    save_model(pruned, tmp_path / "moe")
    loaded = load_model(tmp_path / "moe")
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), pruned(ids))
    assert loaded.num_parameters() == num_parameters(per_block[0].target.config(source))


def test_expert_damage_follows_the_routing_mass(moe_model, moe_scores):
    """Two MoE blocks alike but for their routing: one sends every token to half of its experts, the other
    spreads them evenly. A budget that halves one block's experts halves the concentrated one."""
    source = moe_model.config
    blocks = [s.index for s in source.blocks if s.kind == "moe"]
    concentrated, spread = blocks[1], blocks[0]
    routing = dict(moe_scores.expert_routing)
    for index in blocks:
        routing[index] = torch.ones(source.n_routed_experts)
    routing[concentrated] = torch.tensor([1.0, 1.0, 1e-3, 1e-3, 1.0, 1.0, 1e-3, 1e-3])  # 2 of each group of 4
    scores = dataclasses.replace(
        moe_scores,
        block_influence=torch.ones(source.num_blocks),
        expert_routing=routing,
        expert_ffn={i: torch.ones_like(t) for i, t in moe_scores.expert_ffn.items()},
    )
    one_expert = 2 * source.hidden_size * source.moe_intermediate_size + source.hidden_size  # its FFN, router row
    budget = Budget(params=num_parameters(source) - 4 * one_expert)
    options = MiniPuzzleOptions(expert_fractions=(1, 0.5), ffn_fractions=(1,), max_depth_pruning=0, hidden_choices=1)
    (target,) = MiniPuzzleStrategy(options).propose(source, scores, budget)
    experts = {b.source: b.n_routed_experts for b in target.blocks if b.kind == "moe"}
    assert experts[concentrated] == 4 and all(experts[i] == 8 for i in blocks if i != concentrated)
    assert experts[spread] == 8
    kept = scores.keep_experts(concentrated, 4, source.n_group)
    assert kept.tolist() == [0, 1, 4, 5]  # what pruning keeps: the experts tokens go to


def test_nano3_config_alone_under_an_active_parameter_budget():
    nano = get_preset("nano3-30b")
    budget = Budget(active_params=parse_params("3B"))
    candidates = _search(MiniPuzzleOptions(), nano, None, budget)
    assert candidates
    for c in candidates:
        config = c.target.config(nano)  # every MoE block's widths filled in: a valid config
        assert active_parameters(config) <= budget.active_params
        assert all(s.n_routed_experts >= nano.num_experts_per_tok for s in config.blocks if s.kind == "moe")
