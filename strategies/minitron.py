"""Minitron: uniform widths plus per-type depth, searched on a grid and ranked by a cheap proxy.

The grid (ModelOpt's `mcore_minitron` search space, extended with per-type depth):
- hidden size, MLP ffn size and Mamba head_dim: multiples of a divisor from the original value down to
  (1 - max_width_pruning) of it. ModelOpt's divisors are 256, 512 and 8; for small models a divisor is
  capped at the largest power of two not above an eighth of the value (256 for hidden 5120, 32 for
  hidden 256) so the grid still has choices;
- Mamba heads: multiples of n_groups (the same count kept in every group), down to (1 - max_width_pruning);
- depth: how many Mamba, attention and MLP blocks to remove, up to max_depth_pruning of all blocks
  together; the blocks removed of each type are that type's least important (block importance).

Every grid point is costed analytically: parameters, weights, caches and states are additive over blocks,
so each is the cost of the embeddings plus the per-block cost of each kind times the number of blocks
of that kind, with per-block costs from `compressor.budget` on one-block configs; the prefill activation
allowance is the largest kind's. This evaluates the whole grid with numpy (about two million points for
the 12B-v2 preset in seconds). The largest fitting candidates (by parameters) are then checked exactly
by the budget model (throughput included) and the `top_k` of them are scored; the best score wins.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compressor.budget import Budget, format_bytes, num_parameters
from compressor.config import ATTENTION, MAMBA, MLP, HybridConfig
from compressor.errors import BudgetError, CompressorError
from compressor.importance import Importance
from compressor.prune import Target
from strategies.base import Candidate, Scorer, Strategy
from strategies.costs import BlockCosts

AXES = ("hidden", "ffn", "mamba_heads", "mamba_head_dim", "depth")


@dataclass(frozen=True)
class MinitronOptions:
    max_width_pruning: float = 0.4
    max_depth_pruning: float = 0.2  # of all blocks together
    max_kind_pruning: float = 0.5  # of the blocks of each kind (keeps attention and Mamba in the hybrid)
    hidden_divisor: int | None = None  # None: ModelOpt's, capped for small models (module docstring)
    ffn_divisor: int | None = None
    head_dim_divisor: int | None = None
    top_k: int = 10
    depth_scores: str = "auto"  # influence | drop | auto (drop-one scores when the importance has them)
    # what the grid varies; Nano-v2 (12B -> 9B) pruned hidden, ffn and depth; 8B -> 4B also Mamba heads
    axes: tuple[str, ...] = ("hidden", "ffn", "depth")

    def __post_init__(self) -> None:
        if not all(0 <= v < 1 for v in (self.max_width_pruning, self.max_depth_pruning, self.max_kind_pruning)):
            raise CompressorError("max width / depth pruning must be in [0, 1)")
        if self.top_k < 1:
            raise CompressorError("top_k must be at least 1")
        if self.depth_scores not in ("auto", "influence", "drop"):
            raise CompressorError(f"depth_scores {self.depth_scores!r}: use auto, influence or drop")
        unknown = set(self.axes) - set(AXES)
        if unknown or not self.axes:
            raise CompressorError(f"unknown pruning axes {sorted(unknown)}: choose from {', '.join(AXES)}")


def divisor_for(value: int, default: int) -> int:
    """ModelOpt's divisor, capped at the largest power of two <= value / 8 (at least 1)."""
    cap = 2 ** max(0, math.floor(math.log2(max(value / 8, 1))))
    return max(1, min(default, cap))


def width_choices(value: int, divisor: int, max_pruning: float) -> list[int]:
    """The original value and the multiples of `divisor` below it down to (1 - max_pruning) * value."""
    low = math.ceil(value * (1 - max_pruning))
    choices = {value} | {v for v in range(divisor * (value // divisor), low - 1, -divisor) if v >= max(low, 1)}
    return sorted(choices, reverse=True)


class MinitronStrategy(Strategy):
    name = "minitron"

    def __init__(self, **options) -> None:
        self.options = MinitronOptions(**options)

    def grid(self, source: HybridConfig) -> dict[str, list[int]]:
        """The width choices of each axis."""
        o = self.options
        if not source.is_uniform:
            raise CompressorError("the Minitron strategy searches uniform widths: start from a uniform model")
        heads_low = math.ceil(source.mamba_num_heads * (1 - o.max_width_pruning))
        grid = {
            "hidden": width_choices(
                source.hidden_size, o.hidden_divisor or divisor_for(source.hidden_size, 256), o.max_width_pruning
            ),
            "ffn": width_choices(
                source.intermediate_size,
                o.ffn_divisor or divisor_for(source.intermediate_size, 512),
                o.max_width_pruning,
            ),
            "mamba_heads": [
                h for h in range(source.mamba_num_heads, 0, -source.n_groups) if h >= max(heads_low, source.n_groups)
            ],
            "head_dim": width_choices(
                source.mamba_head_dim,
                o.head_dim_divisor or divisor_for(source.mamba_head_dim, 8),
                o.max_width_pruning,
            ),
        }
        fixed = {"hidden": source.hidden_size, "ffn": source.intermediate_size}
        fixed.update(mamba_heads=source.mamba_num_heads, head_dim=source.mamba_head_dim)
        axis_of = {"hidden": "hidden", "ffn": "ffn", "mamba_heads": "mamba_heads", "head_dim": "mamba_head_dim"}
        return {k: (v if axis_of[k] in o.axes else [fixed[k]]) for k, v in grid.items()}

    def depth_choices(self, source: HybridConfig) -> list[tuple[int, int, int]]:
        """(Mamba, attention, MLP) block counts to remove: together at most max_depth_pruning of all blocks,
        of each kind at most max_kind_pruning of that kind's blocks."""
        limit = math.floor(self.options.max_depth_pruning * source.num_blocks) if "depth" in self.options.axes else 0
        counts = (source.count(MAMBA), source.count(ATTENTION), source.count(MLP))
        per_kind = [min(limit, math.floor(self.options.max_kind_pruning * c)) for c in counts]
        return [
            combo
            for combo in itertools.product(*(range(n + 1) for n in per_kind))
            if sum(combo) <= limit and sum(combo) < source.num_blocks
        ]

    def search(
        self,
        source: HybridConfig,
        importance: Importance,
        budget: Budget,
        scorer: Scorer | None,
        *,
        on_progress: Callable[[str], None] | None = None,
    ) -> list[Candidate]:
        say = on_progress or (lambda text: None)
        ranked, total = self.fitting(source, importance, budget)
        say(f"{total:,} grid points; {len(ranked):,} considered fit the budget analytically")
        candidates = []
        for target in ranked:
            config = target.config(source)
            if budget.violations(config, source):  # exact check (and throughput, when asked)
                continue
            memory = budget.memory_of(config).total if budget.memory is not None else None
            candidates.append(
                Candidate(
                    target=target,
                    config=config,
                    params=num_parameters(config),
                    memory=memory,
                    speedup=budget.speedup_of(config, source),
                    label=describe(source, config),
                )
            )
            if len(candidates) == self.options.top_k:
                break
        if not candidates:
            raise BudgetError(f"no candidate meets the budget ({budget.describe()}); {self._smallest(source, budget)}")
        if scorer is not None:
            for i, candidate in enumerate(candidates, start=1):
                say(f"scoring {i}/{len(candidates)}: {candidate.label}")
                candidate.score = scorer(candidate.target)
            candidates.sort(key=lambda c: c.score)
        return candidates

    def fitting(self, source: HybridConfig, importance: Importance | None, budget: Budget) -> tuple[list[Target], int]:
        """Targets of the grid that fit the memory and parameter budgets analytically, in the order they
        are considered (see `_stratified`), and the number of grid points."""
        grid = self.grid(source)
        depth = np.array(self.depth_choices(source))  # (D, 3)
        costs = BlockCosts(source, budget)
        hidden, ffn, heads, head_dim = (np.array(grid[k]) for k in ("hidden", "ffn", "mamba_heads", "head_dim"))
        # per-grid-point arrays, shape (hidden, ffn, heads, head_dim)
        shape = (len(hidden), len(ffn), len(heads), len(head_dim))
        base = np.zeros((2, *shape))
        unit = {kind: np.zeros((3, *shape)) for kind in (MAMBA, ATTENTION, MLP)}  # params, bytes, activations
        for (a, h), (b, f), (c, n), (d, p) in itertools.product(
            *(enumerate(x.tolist()) for x in (hidden, ffn, heads, head_dim))
        ):
            base[:, a, b, c, d] = costs.base(h)
            unit[MAMBA][:, a, b, c, d] = costs.block(MAMBA, h, f, n, p)
            unit[ATTENTION][:, a, b, c, d] = costs.block(ATTENTION, h, f, n, p)
            unit[MLP][:, a, b, c, d] = costs.block(MLP, h, f, n, p)
        counts = {
            MAMBA: source.count(MAMBA) - depth[:, 0],
            ATTENTION: source.count(ATTENTION) - depth[:, 1],
            MLP: source.count(MLP) - depth[:, 2],
        }
        params = base[0][..., None] + sum(unit[k][0][..., None] * counts[k] for k in counts)
        fits = np.ones(params.shape, dtype=bool)
        if budget.memory is not None:
            nbytes = base[1][..., None] + sum(unit[k][1][..., None] * counts[k] for k in counts)
            activations = np.max(np.stack([np.where(counts[k] > 0, unit[k][2][..., None], 0) for k in counts]), axis=0)
            fits &= nbytes + activations <= budget.memory
        if budget.params is not None:
            fits &= params <= budget.params
        drop_order = _drop_order(source, importance, self.options.depth_scores)
        targets = []
        for a, b, c, d, e in _stratified(np.where(fits, params, -1), depth[:, 1]):
            removed = [drop_order[kind][: depth[e, i]] for i, kind in enumerate((MAMBA, ATTENTION, MLP))]
            targets.append(
                Target.uniform(
                    source,
                    hidden_size=int(hidden[a]),
                    intermediate_size=int(ffn[b]),
                    mamba_num_heads=int(heads[c]),
                    mamba_head_dim=int(head_dim[d]),
                    drop_blocks=tuple(i for part in removed for i in part),
                )
            )
            if len(targets) >= max(50 * self.options.top_k, 500):
                break
        return targets, params.size

    def _smallest(self, source: HybridConfig, budget: Budget) -> str:
        """The smallest footprint the grid reaches, for the error message."""
        grid = self.grid(source)
        deepest = max(self.depth_choices(source), key=sum)
        drop = {MAMBA: deepest[0], ATTENTION: deepest[1], MLP: deepest[2]}
        kept, pattern = dict(drop), []
        for char in reversed(source.pattern):  # drop from the end; any choice of blocks costs the same
            kind = {"M": MAMBA, "*": ATTENTION, "-": MLP}[char]
            if kept[kind]:
                kept[kind] -= 1
            else:
                pattern.append(char)
        smallest = source.replace(
            hybrid_override_pattern="".join(reversed(pattern)),
            hidden_size=grid["hidden"][-1],
            intermediate_size=grid["ffn"][-1],
            mamba_num_heads=grid["mamba_heads"][-1],
            mamba_head_dim=grid["head_dim"][-1],
        )
        memory = budget.memory_of(smallest).total
        return (
            f"the smallest architecture within the pruning limits needs {format_bytes(memory)} and has "
            f"{num_parameters(smallest):,} parameters: loosen the budget or raise --max-width-pruning / "
            "--max-depth-pruning"
        )


def _stratified(params: np.ndarray, attention_removed: np.ndarray, per_combo: int = 3):
    """Grid points (indices) in the order candidates are taken: each depth combination contributes its
    largest fitting widths (then its runners-up), and the depth combinations are interleaved across how
    many attention blocks they remove. At long contexts the KV cache makes "fewer attention blocks, wider
    blocks" the dominant trade, which parameter counts cannot judge; interleaving lets the scorer see
    every side of it. `params` is -1 where a point does not fit; its last axis is the depth combination."""
    width_shape, combos = params.shape[:-1], params.shape[-1]
    flat = params.reshape(-1, combos)  # (width points, depth combos)
    best = np.argsort(-flat, axis=0, kind="stable")[:per_combo]  # (per_combo, depth combos)
    strata: dict[int, list[int]] = {}
    for combo in np.argsort(-flat.max(axis=0), kind="stable"):  # combinations, largest first
        if flat[best[0, combo], combo] >= 0:
            strata.setdefault(int(attention_removed[combo]), []).append(int(combo))
    for rank in range(per_combo):
        for position in range(max((len(v) for v in strata.values()), default=0)):
            for members in strata.values():
                if position < len(members):
                    combo = members[position]
                    point = best[rank, combo]
                    if flat[point, combo] >= 0:
                        yield (*np.unravel_index(point, width_shape), combo)


def _drop_order(source: HybridConfig, importance: Importance | None, method: str) -> dict[str, list[int]]:
    """Blocks of each kind, least important first (without scores: the last blocks first, which costs the
    same as any other choice, for a config-only look at the search space)."""
    if importance is None:
        scores = [-i for i in range(source.num_blocks)]
    else:
        if method == "auto":
            method = "drop" if importance.block_drop is not None else "influence"
        scores = importance.block_scores(method).tolist()
    order: dict[str, list[int]] = {MAMBA: [], ATTENTION: [], MLP: []}
    for index in sorted(range(source.num_blocks), key=lambda i: scores[i]):
        order[source.block(index).kind].append(index)
    return order


def describe(source: HybridConfig, config: HybridConfig) -> str:
    """What a pruned config changed, in a few words: 'hidden 192, ffn 576, -1M, -1*'."""
    parts = []
    for name, short in (("hidden_size", "hidden"), ("intermediate_size", "ffn")):
        if getattr(config, name) != getattr(source, name):
            parts.append(f"{short} {getattr(config, name)}")
    if (config.mamba_num_heads, config.mamba_head_dim) != (source.mamba_num_heads, source.mamba_head_dim):
        parts.append(f"mamba {config.mamba_num_heads}x{config.mamba_head_dim}")
    for kind, char in ((MAMBA, "M"), (ATTENTION, "*"), (MLP, "-")):
        removed = source.count(kind) - config.count(kind)
        if removed:
            parts.append(f"-{removed}{char}")
    return ", ".join(parts) or "unpruned"
