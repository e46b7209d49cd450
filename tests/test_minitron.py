"""The Minitron strategy: grid (MoE axes too), analytic costs, budgets, and the 12B-v2 -> 9B-v2 search space."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.budget import (
    Budget,
    BudgetError,
    active_parameters,
    get_gpu,
    num_parameters,
    parse_context,
    parse_params,
    parse_size,
)
from compressor.importance import Importance, estimate
from compressor.model import HybridLM
from compressor.pipelines.ranking import rank
from compressor.presets import get_preset
from compressor.prune import prune
from strategies.grid import divisor_for, drop_order, width_choices
from strategies.minitron import MinitronOptions, MinitronStrategy


def _importance(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Importance(
        hidden=torch.rand(config.hidden_size, generator=gen),
        ffn={},
        mamba={},
        attention={},
        block_influence=torch.rand(config.num_blocks, generator=gen),
    )


def _search(options, source, budget, scorer=None):
    """The proposals through the shared check / score / sort (what `compress prune` runs)."""
    strategy = MinitronStrategy(options)
    proposals = strategy.propose(source, _importance(source), budget)
    return rank(proposals, source, budget, limit=strategy.top_k, scorer=scorer, smallest=strategy.smallest(source))


def test_grid_uses_modelopt_divisors_and_limits():
    grid = MinitronStrategy(MinitronOptions(axes=("hidden", "ffn", "mamba_heads", "mamba_head_dim", "depth"))).grid(
        get_preset("12b-v2")
    )
    assert grid["hidden"] == list(range(5120, 3071, -256))
    assert grid["ffn"] == list(range(20480, 12287, -512))
    assert grid["mamba_heads"] == list(range(128, 76, -8))  # multiples of n_groups = 8
    assert grid["head_dim"] == [80, 72, 64, 56, 48]
    assert width_choices(256, divisor_for(256, 256), 0.4) == [256, 224, 192, 160]
    fixed = MinitronStrategy().grid(get_preset("12b-v2"))  # default axes: hidden, ffn, depth
    assert fixed["mamba_heads"] == [128] and fixed["head_dim"] == [80]


def test_depth_choices_respect_both_limits():
    strategy = MinitronStrategy()
    config = get_preset("12b-v2")  # 28 M, 6 *, 28 -
    choices = strategy.depth_choices(config)
    assert max(sum(c) for c in choices) == 12  # 20% of 62
    assert max(c[1] for c in choices) == 3  # half of the attention blocks
    assert (0, 0, 0, 0) in choices and len(set(choices)) == len(choices)  # (Mamba, attention, MLP, MoE)


ALL_AXES = ("hidden", "ffn", "mamba_heads", "mamba_head_dim", "moe_experts", "moe_ffn", "moe_shared_ffn", "depth")
# what each example searches: a dense preset, Nemotron-3-Nano (Mamba axes off: its grid has millions of points),
# tiny MoE models with grouped routing, latent projections and biases
COST_CASES = {
    "9b-v2": (lambda: get_preset("9b-v2"), ALL_AXES),
    "nano3": (lambda: get_preset("nano3-30b"), ("hidden", "moe_experts", "moe_ffn", "moe_shared_ffn", "depth")),
    "tiny-moe": (lambda: get_preset("tiny-moe"), ALL_AXES),
    "tiny-moe grouped": (
        lambda: get_preset("tiny-moe").replace(n_group=2, topk_group=1, moe_latent_size=40, mlp_bias=True),
        ALL_AXES,
    ),
}


@settings(max_examples=24, deadline=None)
@given(
    seed=st.integers(0, 999),
    case=st.sampled_from(sorted(COST_CASES)),
    context=st.sampled_from(["4k", "32k", "128k"]),
    dtype=st.sampled_from(["bf16", "fp8", "fp4", "fp32"]),
)
def test_analytic_costs_equal_the_budget_model(seed, case, context, dtype):
    make, axes = COST_CASES[case]
    config = make()
    full = Budget(memory=1, context=parse_context(context), weight_dtype=dtype).memory_of(config).total
    budget = Budget(memory=int(0.8 * full), context=parse_context(context), weight_dtype=dtype)
    strategy = MinitronStrategy(MinitronOptions(axes=axes))
    space = strategy.grid_costs(config, budget)
    order = drop_order(config, _importance(config, seed))
    rng = np.random.default_rng(seed)
    for _ in range(6):  # grid points at random: the arrays hold exactly what the budget model says
        index = tuple(int(rng.integers(n)) for n in space.params.shape)
        pruned = space.target(config, index, order).config(config)
        assert int(space.params[index]) == num_parameters(pruned)
        assert int(space.active_params[index]) == active_parameters(pruned)
        assert int(space.memory[index]) == budget.memory_of(pruned).total
    targets = strategy.propose(config, _importance(config, seed), budget)
    for target in targets[seed % 7 :: 97][:5]:
        pruned = target.config(config)
        assert budget.memory_of(pruned).total <= budget.memory
        assert not budget.violations(pruned, config)


def test_moe_grid_follows_modelopt_and_valid_routing():
    nano = get_preset("nano3-30b")
    moe_axes = MinitronOptions(axes=("hidden", "moe_experts", "moe_ffn", "moe_shared_ffn", "depth"))
    grid = MinitronStrategy(moe_axes).grid(nano)
    assert grid["moe_experts"] == list(range(128, 79, -8))  # num_moe_experts_divisor 8, down to 60%
    # at ModelOpt's scale (hidden 2688) its own FFN divisor, 512, so that every export_config loads there
    assert grid["moe_ffn"] == [1856, 1536] and grid["moe_shared_ffn"] == [3712, 3584, 3072, 2560]
    free = MinitronStrategy(dataclasses.replace(moe_axes, modelopt_compatible=False)).grid(nano)
    assert free["moe_ffn"] == [1856, *range(1792, 1113, -128)]  # the FFN divisor 512 capped at 1856 / 8
    assert free["moe_shared_ffn"] == [3712, *range(3584, 2227, -256)]
    assert grid["ffn"] == [1856] and grid["mamba_heads"] == [64]  # no MLP blocks; Mamba axes not asked for
    assert MinitronStrategy().grid(nano)["moe_experts"] == [128]  # the MoE axes are off by default
    assert max(c[3] for c in MinitronStrategy().depth_choices(nano)) == 10  # MoE blocks removable: 20% of 52
    # expert counts are multiples of n_group, at least 2 per group and enough for top-k in topk_group groups
    grouped = get_preset("tiny-moe").replace(n_routed_experts=16, n_group=4, topk_group=1)
    options = MinitronOptions(axes=("moe_experts",), max_width_pruning=0.9)
    assert MinitronStrategy(options).grid(grouped)["moe_experts"] == [16, 12, 8]
    assert MinitronStrategy(options).grid(grouped.replace(topk_group=2))["moe_experts"] == [16, 12, 8]
    assert MinitronStrategy(options).grid(grouped.replace(num_experts_per_tok=6, topk_group=2))["moe_experts"] == [
        16,
        12,
    ]
    assert MinitronStrategy(MinitronOptions(axes=("moe_experts",))).grid(grouped)["moe_experts"] == [16, 12]
    assert MinitronStrategy(MinitronOptions(axes=("moe_experts",))).grid(get_preset("tiny"))["moe_experts"] == [8]


def test_active_parameter_budget_on_nano3_narrows_the_experts():
    nano = get_preset("nano3-30b")
    budget = Budget(active_params=parse_params("3B"))
    options = MinitronOptions(axes=("hidden", "moe_experts", "moe_ffn", "moe_shared_ffn", "depth"), top_k=20)
    candidates = _search(options, nano, budget)
    assert len(candidates) == 20
    for c in candidates:
        config = c.target.config(nano)
        assert active_parameters(config) <= budget.active_params < active_parameters(nano)
        assert c.params == num_parameters(config)
    narrowed = [c.target.config(nano) for c in candidates]
    assert any(
        config.moe_shared_expert_intermediate_size < nano.moe_shared_expert_intermediate_size for config in narrowed
    )
    assert any("moe ffn" in c.label or "shared ffn" in c.label for c in candidates)
    # the order keeps the most parameters: every expert stays when only active parameters are limited
    assert candidates[0].target.config(nano).n_routed_experts == 128
    # a total-parameter limit as well removes experts
    both = Budget(active_params=parse_params("3B"), params=parse_params("20B"))
    for c in _search(options, nano, both):
        assert not both.violations(c.target.config(nano), nano)


def test_moe_candidates_prune_to_what_was_costed():
    from tests.conftest import randomize_routers

    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny-moe").replace(n_group=2, topk_group=1)).eval()
    randomize_routers(model)
    gen = torch.Generator().manual_seed(0)
    scores = estimate(model, [torch.randint(0, 512, (2, 24), generator=gen) for _ in range(2)])
    source = model.config
    budget = Budget(active_params=int(0.85 * active_parameters(source)), params=int(0.8 * num_parameters(source)))
    strategy = MinitronStrategy(MinitronOptions(axes=ALL_AXES, top_k=3))
    candidates = rank(strategy.propose(source, scores, budget), source, budget, limit=3)
    ids = torch.randint(0, 512, (2, 20), generator=gen)
    for c in candidates:
        pruned = prune(model, scores, c.target)
        assert pruned.num_parameters() == c.params <= budget.params
        assert active_parameters(pruned.config) <= budget.active_params
        with torch.no_grad():
            assert torch.isfinite(pruned(ids)).all()


def test_12b_v2_search_space_has_9b_like_shapes():
    source = get_preset("12b-v2")
    budget = Budget(memory=parse_size("19.66GiB"), context=parse_context("128k"))
    strategy = MinitronStrategy()
    targets = strategy.propose(source, _importance(source), budget)
    assert strategy.stats["grid_points"] > 10_000
    near_9b = [
        t.config(source)
        for t in targets
        if t.config(source).num_blocks == 56
        and abs(t.hidden_size - 4480) <= 256
        and abs(t.config(source).intermediate_size - 15680) <= 512
    ]
    assert near_9b, "no candidate near the published 9B-v2 shape (hidden 4480, ffn 15680, 56 blocks)"
    assert all(budget.memory_of(c).total <= budget.memory for c in near_9b)
    # the published 9B-v2 itself fits the same budget (the Nano-v2 decision)
    assert budget.memory_of(get_preset("9b-v2")).total <= budget.memory


def test_every_candidate_meets_the_budget_and_scores_rank_them():
    source = get_preset("9b-v2")
    budget = Budget(memory=parse_size("14GiB"), context=parse_context("32k"), params=parse_params("7B"))
    scores = iter(range(100, 0, -1))
    candidates = _search(MinitronOptions(top_k=5), source, budget, scorer=lambda target: next(scores))
    assert len(candidates) == 5
    assert [c.score for c in candidates] == sorted(c.score for c in candidates)
    for c in candidates:
        assert not budget.violations(c.target.config(source), source)
        assert c.params == num_parameters(c.target.config(source)) <= budget.params


def test_throughput_budget_filters_candidates():
    source = get_preset("12b-v2")
    budget = Budget(context=parse_context("16k"), gpu=get_gpu("a10g"), min_speedup=1.25)
    candidates = _search(MinitronOptions(top_k=3), source, budget)
    assert all(c.speedup >= 1.25 for c in candidates)


def test_infeasible_budget_names_the_smallest_footprint():
    source = get_preset("12b-v2")
    with pytest.raises(
        BudgetError,
        match=r"no candidate meets the budget .* the smallest architecture within the pruning limits needs [\d.]+ GiB",
    ):
        _search(MinitronOptions(), source, Budget(memory=parse_size("5GiB"), context=8192))


def test_modelopt_compatible_candidates_are_inside_modelopts_hybrid_search_space():
    """On the Nano-v2 decision (12B-v2 under 19.66 GiB at 128k) every listed candidate is a shape ModelOpt's
    mcore_minitron can express (strategies.grid.MODELOPT_DIVISORS, cited there): an even block count,
    hidden / ffn / head_dim multiples of its divisors or unchanged, Mamba heads multiples of n_groups."""
    from strategies.grid import modelopt_violations

    source = get_preset("12b-v2")
    budget = Budget(memory=parse_size("19.66GiB"), context=parse_context("128k"))
    strategy = MinitronStrategy(MinitronOptions(axes=("hidden", "ffn", "mamba_heads", "mamba_head_dim", "depth")))
    assert strategy.modelopt_compatible(source)  # on by default at real sizes
    candidates = rank(strategy.propose(source, None, budget), source, budget, limit=60)
    original = {"hidden_size": 5120, "ffn_hidden_size": 20480, "mamba_head_dim": 80, "mamba_num_heads": 128,
                "num_attention_heads": 40, "num_layers": 62}  # fmt: skip
    groups = {"mamba_num_heads": source.n_groups, "num_attention_heads": source.num_key_value_heads}
    assert len(candidates) == 60
    for c in candidates:
        shape = {k: c.architecture[k] for k in original}
        assert not modelopt_violations(shape, original, groups), (c.label, modelopt_violations(shape, original, groups))
        assert shape["num_layers"] % 2 == 0
    # the rule itself bites, and small models keep the capped divisors unless asked
    assert modelopt_violations({"num_layers": 61, "hidden_size": 4500}, original, groups) == [
        "num_layers 61 is not the original 62 or a multiple of 2",
        "hidden_size 4500 is not the original 5120 or a multiple of 256",
    ]
    tiny = get_preset("tiny")
    assert not MinitronStrategy().modelopt_compatible(tiny)
    assert MinitronStrategy(MinitronOptions(modelopt_compatible=True)).grid(tiny)["hidden"] == [tiny.hidden_size]
