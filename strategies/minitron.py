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
by the budget model (throughput included) and the `top_k` of them are scored (`compressor.pipelines.ranking`);
the best score wins.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from compressor.budget import Budget
from compressor.config import ATTENTION, MAMBA, MLP, PATTERN_CHARS, HybridConfig
from compressor.errors import CompressorError, OptionError
from compressor.importance import Importance
from compressor.prune import Target
from strategies.base import Strategy
from strategies.costs import BlockCosts
from strategies.grid import divisor_for, drop_order, width_choices

AXES = ("hidden", "ffn", "mamba_heads", "mamba_head_dim", "depth")


@dataclass(frozen=True)
class MinitronOptions:
    top_k: int = field(default=10, metadata={"help": "Candidates to score (the largest that fit)."})
    max_width_pruning: float = field(default=0.4, metadata={"help": "At most this share of a width removed."})
    max_depth_pruning: float = field(default=0.2, metadata={"help": "At most this share of all blocks removed."})
    max_kind_pruning: float = field(
        default=0.5, metadata={"help": "At most this share of each kind's blocks removed (keeps the hybrid)."}
    )
    # what the grid varies; Nano-v2 (12B -> 9B) pruned hidden, ffn and depth; 8B -> 4B also Mamba heads
    axes: tuple[str, ...] = field(
        default=("hidden", "ffn", "depth"),
        metadata={"help": f"What Minitron prunes, from {','.join(AXES)}."},
    )
    hidden_divisor: int | None = field(default=None, metadata={"help": "Hidden-size step (default: ModelOpt's)."})
    ffn_divisor: int | None = field(default=None, metadata={"help": "FFN-size step (default: ModelOpt's)."})
    head_dim_divisor: int | None = field(default=None, metadata={"help": "Mamba head_dim step (default: 8)."})
    depth_scores: str = field(
        default="auto", metadata={"help": "Block ranking: influence, drop (drop-one) or auto (drop when measured)."}
    )
    modelopt_compatible: bool | None = field(
        default=None,
        metadata={
            "help": "Only shapes ModelOpt's mcore_minitron can express (its divisors, an even block count); "
            "default: on when its divisors fit the model's sizes."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_width_pruning", "max_depth_pruning", "max_kind_pruning"):
            if not 0 <= getattr(self, name) < 1:
                raise OptionError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.top_k < 1:
            raise OptionError("top_k", f"must be at least 1, got {self.top_k}")
        for name in ("hidden_divisor", "ffn_divisor", "head_dim_divisor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.depth_scores not in ("auto", "influence", "drop"):
            raise OptionError("depth_scores", f"{self.depth_scores!r} is not one of auto, influence, drop")
        unknown = sorted(set(self.axes) - set(AXES))
        if unknown or not self.axes:
            raise OptionError("axes", f"{','.join(unknown) or 'empty'}: choose from {','.join(AXES)}")


class MinitronStrategy(Strategy):
    name = "minitron"
    Options = MinitronOptions

    def grid(self, source: HybridConfig) -> dict[str, list[int]]:
        """The width choices of each axis."""
        o = self.options
        if not source.is_uniform:
            raise CompressorError("the minitron strategy searches uniform widths: start from a uniform model")
        heads_low = math.ceil(source.mamba_num_heads * (1 - o.max_width_pruning))
        strict = self.modelopt_compatible(source)  # ModelOpt's own divisors, not capped for small models
        hidden_step = o.hidden_divisor or (256 if strict else divisor_for(source.hidden_size, 256))
        ffn_step = o.ffn_divisor or (512 if strict else divisor_for(source.intermediate_size, 512))
        head_dim_step = o.head_dim_divisor or (8 if strict else divisor_for(source.mamba_head_dim, 8))
        grid = {
            "hidden": width_choices(source.hidden_size, hidden_step, o.max_width_pruning),
            "ffn": width_choices(source.intermediate_size, ffn_step, o.max_width_pruning),
            "mamba_heads": [
                h for h in range(source.mamba_num_heads, 0, -source.n_groups) if h >= max(heads_low, source.n_groups)
            ],
            "head_dim": width_choices(source.mamba_head_dim, head_dim_step, o.max_width_pruning),
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
        even = self.modelopt_compatible(source)  # ModelOpt's num_layers divisor is 2 for hybrids
        return [
            combo
            for combo in itertools.product(*(range(n + 1) for n in per_kind))
            if sum(combo) <= limit and sum(combo) < source.num_blocks
            and not (even and sum(combo) and (source.num_blocks - sum(combo)) % 2)
        ]  # fmt: skip

    def modelopt_compatible(self, source: HybridConfig) -> bool:
        """Whether candidates are restricted to what ModelOpt can express: as asked, else (None) when its
        divisors fit this model's sizes, i.e. when the restriction costs (almost) nothing."""
        if self.options.modelopt_compatible is not None:
            return self.options.modelopt_compatible
        return all(
            divisor_for(value, step) == step
            for value, step in ((source.hidden_size, 256), (source.intermediate_size, 512), (source.mamba_head_dim, 8))
        )

    def propose(self, source: HybridConfig, importance: Importance | None, budget: Budget | None) -> list[Target]:
        """Targets of the grid that fit the memory and parameter budgets analytically, in the order they
        are considered (see `_stratified`). `stats` gets the number of grid points and of those that fit."""
        if budget is None:
            raise OptionError(
                "budget", "is needed by the minitron strategy: give a memory, parameter or speedup target"
            )
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
            for kind in (MAMBA, ATTENTION, MLP):
                unit[kind][:, a, b, c, d] = costs.block(kind, h, f, n, p)
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
        order = drop_order(source, importance, self.options.depth_scores)
        targets = []
        for a, b, c, d, e in _stratified(np.where(fits, params, -1), depth[:, 1]):
            removed = [order[kind][: depth[e, i]] for i, kind in enumerate((MAMBA, ATTENTION, MLP))]
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
        self.stats = {"grid_points": int(params.size), "fit_analytically": int(fits.sum())}
        return targets

    def smallest(self, source: HybridConfig) -> HybridConfig:
        """Every axis at its smallest grid value and the most blocks removed (from the end: any choice of
        blocks costs the same)."""
        grid = self.grid(source)
        deepest = max(self.depth_choices(source), key=sum)
        left = {MAMBA: deepest[0], ATTENTION: deepest[1], MLP: deepest[2]}
        pattern = []
        for char in reversed(source.pattern):
            kind = PATTERN_CHARS[char]
            if left[kind]:
                left[kind] -= 1
            else:
                pattern.append(char)
        return source.replace(
            hybrid_override_pattern="".join(reversed(pattern)),
            hidden_size=grid["hidden"][-1],
            intermediate_size=grid["ffn"][-1],
            mamba_num_heads=grid["mamba_heads"][-1],
            mamba_head_dim=grid["head_dim"][-1],
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
