"""Helpers both built-in strategies use: ModelOpt's width grid, what ModelOpt can express, valid expert
counts and the order in which blocks are dropped."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from compressor.config import ATTENTION, MAMBA, MLP, MOE, HybridConfig

if TYPE_CHECKING:
    from compressor.importance import Importance

# The block kinds a depth choice counts, in this order: (Mamba, attention, MLP, MoE) blocks removed.
DEPTH_KINDS = (MAMBA, ATTENTION, MLP, MOE)

# ModelOpt's `mcore_minitron` search space for hybrid models (nvidia-modelopt 0.47,
# modelopt/torch/prune/plugins/mcore_minitron.py `MCoreMinitronConfig` rules for
# "megatron.core.models.hybrid.HybridModel", applied in modelopt/torch/nas/plugins/megatron.py `modify`):
# a pruned value must be the original or a multiple of its divisor (`make_divisible` results);
# mamba_num_heads are multiples of n_groups (`MambaNumHeadsHp`), num_attention_heads multiples of the KV
# groups (`NumAttentionHeadsHp`); export_config accepts only `SUPPORTED_HPARAMS` (no num_query_groups).
# Routed experts go by `num_moe_experts_divisor`; expert and shared-expert FFN widths are MLPs modified with
# `ffn_hidden_size_divisor`.
MODELOPT_DIVISORS = {
    "hidden_size": 256,
    "ffn_hidden_size": 512,
    "mamba_head_dim": 8,
    "num_layers": 2,
    "num_moe_experts": 8,
    "moe_ffn_hidden_size": 512,
    "moe_shared_expert_intermediate_size": 512,
}


def modelopt_violations(shape: dict[str, int], source: dict[str, int], groups: dict[str, int]) -> list[str]:
    """What in an export_config `shape` ModelOpt's hybrid search space cannot express (empty: all of it
    can). `source` holds the original values, `groups` the group sizes (mamba_num_heads: n_groups,
    num_attention_heads: KV heads)."""
    problems = []
    for key, value in shape.items():
        if value == source.get(key):
            continue
        step = MODELOPT_DIVISORS.get(key) or groups.get(key)
        if step and value % step:
            problems.append(f"{key} {value} is not the original {source.get(key)} or a multiple of {step}")
    return problems


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
