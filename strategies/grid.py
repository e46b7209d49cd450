"""Helpers both built-in strategies use: ModelOpt's width grid and the order in which blocks are dropped."""

from __future__ import annotations

import math

from compressor.config import ATTENTION, MAMBA, MLP, HybridConfig
from compressor.importance import Importance


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
