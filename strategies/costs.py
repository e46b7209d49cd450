"""Costs of architectures block by block, from the budget model, for strategies that search many of them."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import NamedTuple

from compressor.budget import TERMS, Budget, Term, activation_bytes
from compressor.config import KIND_CHARS, MLP, OVERRIDABLE, HybridConfig

# The additive terms whose per-block shares `BlockCost` and `solver.BlockChoice` name as fields (strategies
# and records read them); every other additive term's share is in `others`, by the term's name.
NAMED_SHARES = {"params": "params", "active_params": "active_params", "memory": "nbytes"}


def share(cost, term: Term) -> int:
    """`term`'s share in a per-block cost (a `BlockCost` or a `solver.BlockChoice`)."""
    field = NAMED_SHARES.get(term.name)
    return getattr(cost, field) if field is not None else cost.others.get(term.name, 0)


class BlockCost(NamedTuple):
    """What one block (or the fixed part of a model) adds of each additive budget term (`Term.share`):
    parameters, active parameters (a token's share: an MoE block's num_experts_per_tok routed experts,
    everything else in full), weight + cache bytes, the other additive terms' shares by name (`others`),
    and the prefill activation allowance of a model whose largest block it is (0 for the fixed part)."""

    params: int
    active_params: int
    nbytes: int
    activations: int
    others: Mapping[str, int] = MappingProxyType({})


class BlockCosts:
    """Per-block and fixed costs of an architecture from the budget's additive terms, cached by the widths
    they depend on.

    Every additive term (parameters, active parameters, weights + KV cache + SSM / conv states, ...) sums
    over blocks, so a block's cost is the difference between a one-block config (`-`, an MLP block) and a
    two-block one (`-` and the block); the activation allowance is the largest block's, so each block
    reports its own and the caller takes the maximum."""

    def __init__(self, source: HybridConfig, budget: Budget) -> None:
        self.source = source
        self.budget = budget
        self.terms = [term for term in TERMS.values() if term.additive]
        self.base = lru_cache(maxsize=None)(self._base)
        self._block_cost = lru_cache(maxsize=None)(self._kind_cost)

    def _config(self, pattern: str, hidden: int, widths: tuple[tuple[str, int], ...]) -> HybridConfig:
        return self.source.replace(hybrid_override_pattern=pattern, hidden_size=hidden, **dict(widths))

    def _totals(self, config: HybridConfig) -> dict[str, int]:
        return {term.name: term.share(self.budget, config) for term in self.terms}

    def _cost(self, shares: dict[str, int], activations: int) -> BlockCost:
        named = [shares[name] for name in NAMED_SHARES]
        others = {name: value for name, value in shares.items() if name not in NAMED_SHARES}
        return BlockCost(*named, activations, MappingProxyType(others))

    def _base(self, hidden: int) -> BlockCost:
        """Embeddings, lm_head and norm_f: one MLP block's config minus that block."""
        one = self._totals(self._config("-", hidden, ()))
        block = self.block(MLP, hidden)
        return self._cost({term.name: one[term.name] - share(block, term) for term in self.terms}, 0)

    def _kind_cost(self, kind: str, hidden: int, widths: tuple[tuple[str, int], ...]) -> BlockCost:
        char = KIND_CHARS[kind]
        one = self._totals(self._config("-", hidden, widths))
        two = self._totals(self._config("-" + char, hidden, widths))
        b = self.budget
        alone = self._config(char, hidden, widths)
        act = activation_bytes(alone, b.context, b.batch, dtype=b.precision.compute, prefill_chunk=b.prefill_chunk)
        return self._cost({name: two[name] - one[name] for name in one}, act)

    def block(self, kind: str, hidden: int, **widths: int) -> BlockCost:
        """Cost of one block of `kind` at hidden size `hidden`; `widths` are HybridConfig width fields
        (`intermediate_size`, `mamba_num_heads`, `n_routed_experts`, ...), the source's where not given.
        Only the fields of the block's kind (`OVERRIDABLE`) matter, and only they are part of the cache key."""
        key = tuple((name, widths.get(name, getattr(self.source, name))) for name in OVERRIDABLE[kind])
        return self._block_cost(kind, hidden, key)
