"""Costs of architectures block by block, from the budget model, for strategies that search many of them."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import NamedTuple

from compressor.budget import Budget, activation_bytes, active_parameters, compute_dtype, num_parameters
from compressor.config import KIND_CHARS, MLP, OVERRIDABLE, HybridConfig


class BlockCost(NamedTuple):
    """What one block (or the fixed part of a model) adds: parameters, active parameters (a token's share:
    an MoE block's num_experts_per_tok routed experts, everything else in full), weight + cache bytes, and
    the prefill activation allowance of a model whose largest block it is (0 for the fixed part)."""

    params: int
    active_params: int
    nbytes: int
    activations: int


class BlockCosts:
    """Per-block and fixed costs of an architecture from the budget model, cached by the widths they
    depend on.

    Parameters, active parameters, weights, KV cache and SSM / conv states are additive over blocks, so a
    block's cost is the difference between a one-block config (`-`, an MLP block) and a two-block one (`-`
    and the block); the activation allowance is the largest block's, so each block reports its own and the
    caller takes the maximum."""

    def __init__(self, source: HybridConfig, budget: Budget) -> None:
        self.source = source
        self.budget = budget
        self.additive = dataclasses.replace(budget, prefill_chunk=0)  # the activation allowance is not additive
        self.base = lru_cache(maxsize=None)(self._base)
        self._block_cost = lru_cache(maxsize=None)(self._kind_cost)

    def _config(self, pattern: str, hidden: int, widths: tuple[tuple[str, int], ...]) -> HybridConfig:
        return self.source.replace(hybrid_override_pattern=pattern, hidden_size=hidden, **dict(widths))

    def _totals(self, config: HybridConfig) -> tuple[int, int, int]:
        memory = self.additive.memory_of(config)
        return num_parameters(config), active_parameters(config), memory.weights + memory.cache

    def _base(self, hidden: int) -> BlockCost:
        """Embeddings, lm_head and norm_f: one MLP block's config minus that block."""
        one = self._totals(self._config("-", hidden, ()))
        block = self.block(MLP, hidden)
        return BlockCost(*(total - part for total, part in zip(one, block[:3], strict=True)), 0)

    def _kind_cost(self, kind: str, hidden: int, widths: tuple[tuple[str, int], ...]) -> BlockCost:
        char = KIND_CHARS[kind]
        one = self._totals(self._config("-", hidden, widths))
        two = self._totals(self._config("-" + char, hidden, widths))
        b = self.budget
        alone = self._config(char, hidden, widths)
        act = activation_bytes(
            alone, b.context, b.batch, dtype=compute_dtype(b.weight_dtype), prefill_chunk=b.prefill_chunk
        )
        return BlockCost(*(t - o for t, o in zip(two, one, strict=True)), act)

    def block(self, kind: str, hidden: int, **widths: int) -> BlockCost:
        """Cost of one block of `kind` at hidden size `hidden`; `widths` are HybridConfig width fields
        (`intermediate_size`, `mamba_num_heads`, `n_routed_experts`, ...), the source's where not given.
        Only the fields of the block's kind (`OVERRIDABLE`) matter, and only they are part of the cache key."""
        key = tuple((name, widths.get(name, getattr(self.source, name))) for name in OVERRIDABLE[kind])
        return self._block_cost(kind, hidden, key)
