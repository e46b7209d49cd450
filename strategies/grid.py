"""Helpers both built-in strategies use: ModelOpt's width grid, what ModelOpt can express, and the order in
which blocks are dropped."""

from __future__ import annotations

import math

from compressor.config import ATTENTION, MAMBA, MLP, HybridConfig
from compressor.importance import Importance

# ModelOpt's `mcore_minitron` search space for hybrid models (nvidia-modelopt 0.47,
# modelopt/torch/prune/plugins/mcore_minitron.py `MCoreMinitronConfig` rules for
# "megatron.core.models.hybrid.HybridModel", applied in modelopt/torch/nas/plugins/megatron.py `modify`):
# a pruned value must be the original or a multiple of its divisor (`make_divisible` results);
# mamba_num_heads are multiples of n_groups (`MambaNumHeadsHp`), num_attention_heads multiples of the KV
# groups (`NumAttentionHeadsHp`); export_config accepts only `SUPPORTED_HPARAMS` (no num_query_groups).
MODELOPT_DIVISORS = {"hidden_size": 256, "ffn_hidden_size": 512, "mamba_head_dim": 8, "num_layers": 2}


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


def drop_order(source: HybridConfig, importance: Importance | None, method: str = "auto") -> dict[str, list[int]]:
    """Blocks of each kind, least important first by `importance.block_scores(method)`. Without scores (a
    config alone) the last blocks come first, which costs the same as any other choice."""
    scores = [-i for i in range(source.num_blocks)] if importance is None else importance.block_scores(method).tolist()
    order: dict[str, list[int]] = {MAMBA: [], ATTENTION: [], MLP: []}
    for index in sorted(range(source.num_blocks), key=lambda i: scores[i]):
        order[source.block(index).kind].append(index)
    return order
