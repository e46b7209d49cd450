"""Costs of architectures block by block, from the budget model, for strategies that search many of them."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from compressor.budget import Budget, activation_bytes, compute_dtype, num_parameters
from compressor.config import ATTENTION, KIND_CHARS, MAMBA, MLP, HybridConfig


class BlockCosts:
    """Per-block and fixed costs of an architecture from the budget model, cached by the widths they
    depend on: (parameters, weight + cache bytes, activation allowance when that kind is present).

    Parameters, weights, KV cache and SSM / conv states are additive over blocks, so a block's cost is
    the difference between a one-block and a two-block config; the activation allowance is the largest
    block's, so each block reports its own and the caller takes the maximum."""

    def __init__(self, source: HybridConfig, budget: Budget) -> None:
        self.source = source
        self.budget = budget
        self.additive = dataclasses.replace(budget, prefill_chunk=0)  # the activation allowance is not additive
        self.base = lru_cache(maxsize=None)(self._base)
        self._block_cost = lru_cache(maxsize=None)(self._kind_cost)

    def _config(self, pattern: str, hidden: int, ffn: int, heads: int, head_dim: int) -> HybridConfig:
        return self.source.replace(
            hybrid_override_pattern=pattern,
            hidden_size=hidden,
            intermediate_size=ffn,
            mamba_num_heads=heads,
            mamba_head_dim=head_dim,
        )

    def _totals(self, config: HybridConfig) -> tuple[int, int]:
        memory = self.additive.memory_of(config)
        return num_parameters(config), memory.weights + memory.cache

    def _base(self, hidden: int) -> tuple[int, int]:
        """Embeddings, lm_head and norm_f: one MLP block's config minus that block."""
        s = self.source
        one = self._totals(self._config("-", hidden, s.intermediate_size, s.mamba_num_heads, s.mamba_head_dim))
        block = self._kind_cost(MLP, hidden, s.intermediate_size, s.mamba_num_heads, s.mamba_head_dim)
        return one[0] - block[0], one[1] - block[1]

    def _kind_cost(self, kind: str, hidden: int, ffn: int, heads: int, head_dim: int) -> tuple[int, int, int]:
        char = KIND_CHARS[kind]
        one = self._totals(self._config("-", hidden, ffn, heads, head_dim))
        two = self._totals(self._config("-" + char, hidden, ffn, heads, head_dim))
        b = self.budget
        alone = self._config(char, hidden, ffn, heads, head_dim)
        act = activation_bytes(
            alone, b.context, b.batch, dtype=compute_dtype(b.weight_dtype), prefill_chunk=b.prefill_chunk
        )
        return two[0] - one[0], two[1] - one[1], act

    def block(self, kind: str, hidden: int, ffn: int, heads: int, head_dim: int) -> tuple[int, int, int]:
        """Cost of one block of `kind`; only the widths it depends on are part of the cache key."""
        s = self.source
        key = {
            MAMBA: (hidden, s.intermediate_size, heads, head_dim),
            ATTENTION: (hidden, s.intermediate_size, s.mamba_num_heads, s.mamba_head_dim),
            MLP: (hidden, ffn, s.mamba_num_heads, s.mamba_head_dim),
        }[kind]
        return self._block_cost(kind, *key)
