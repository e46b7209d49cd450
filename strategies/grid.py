"""Helpers both built-in strategies use: ModelOpt's width grid, valid expert counts and the order in which
blocks are dropped."""

from __future__ import annotations

import math

from compressor.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig
from compressor.importance import Importance

# The block kinds a depth choice counts, in this order: (Mamba, attention, MLP, MoE) blocks removed.
DEPTH_KINDS = (MAMBA, ATTENTION, MLP, MOE)


def divisor_for(value: int, default: int) -> int:
    """ModelOpt's divisor, capped at the largest power of two <= value / 8 (at least 1)."""
    cap = 2 ** max(0, math.floor(math.log2(max(value / 8, 1))))
    return max(1, min(default, cap))


def width_choices(value: int, divisor: int, max_pruning: float) -> list[int]:
    """The original value and the multiples of `divisor` below it down to (1 - max_pruning) * value."""
    low = math.ceil(value * (1 - max_pruning))
    choices = {value} | {v for v in range(divisor * (value // divisor), low - 1, -divisor) if v >= max(low, 1)}
    return sorted(choices, reverse=True)


def fewest_experts(config: HybridConfig) -> int:
    """The fewest routed experts an MoE block of `config` may keep: a multiple of n_group with at least 2 per
    group (nemotron_h ranks a group by its two best experts) and enough in the topk_group best groups for
    the num_experts_per_tok a token picks (`HybridConfig` validation)."""
    per_group = max(2, math.ceil(config.num_experts_per_tok / config.topk_group))
    return config.n_group * per_group


def expert_choices(config: HybridConfig, experts: int, divisor: int, max_pruning: float) -> list[int]:
    """Routed-expert counts from `experts` down to (1 - max_pruning) of it: multiples of the least common
    multiple of `divisor` and n_group (the same count kept in every routing group), none below
    `fewest_experts`."""
    step = math.lcm(divisor, config.n_group)
    return [e for e in width_choices(experts, step, max_pruning) if e >= fewest_experts(config)] or [experts]


def drop_order(source: HybridConfig, importance: Importance | None, method: str = "auto") -> dict[str, list[int]]:
    """Blocks of each kind, least important first by `importance.block_scores(method)`. Without scores (a
    config alone) the last blocks come first, which costs the same as any other choice."""
    scores = [-i for i in range(source.num_blocks)] if importance is None else importance.block_scores(method).tolist()
    order: dict[str, list[int]] = {kind: [] for kind in DEPTH_KINDS}
    for index in sorted(range(source.num_blocks), key=lambda i: scores[i]):
        order[source.block(index).kind].append(index)
    return order
