"""Minitron: uniform widths plus per-type depth, searched on a grid and ranked by a cheap proxy.

The grid (ModelOpt's `mcore_minitron` search space, extended with per-type depth):
- hidden size, MLP ffn size and Mamba head_dim: multiples of a divisor from the original value down to
  (1 - max_width_pruning) of it. ModelOpt's divisors are 256, 512 and 8; for small models a divisor is
  capped at the largest power of two not above an eighth of the value (256 for hidden 5120, 32 for
  hidden 256) so the grid still has choices;
- Mamba heads: multiples of n_groups (the same count kept in every group), down to (1 - max_width_pruning);
- MoE blocks (ModelOpt's `num_moe_experts`, `moe_ffn_hidden_size` and `moe_shared_expert_intermediate_size`
  hparams, nvidia-modelopt 0.47 `modelopt/torch/prune/plugins/mcore_minitron.py` SUPPORTED_HPARAMS; their
  choices come from `_DynamicMoELayer.modify` in `modelopt/torch/nas/plugins/megatron.py`): routed experts
  per block in steps of `num_moe_experts_divisor` (8), also a multiple of n_group and never fewer than
  top-k routing needs (`strategies.grid.fewest_experts`); the routed experts' and the shared expert's FFN
  widths in steps of the FFN divisor (ModelOpt's `ffn_hidden_size_divisor` serves both);
- depth: how many Mamba, attention, MLP and MoE blocks to remove, up to max_depth_pruning of all blocks
  together; the blocks removed of each type are that type's least important (block importance).
An axis varies only when it is asked for (`axes`; Mamba heads and the MoE axes are off by default) and the
source has blocks it applies to.

Every grid point is costed analytically: parameters, active parameters, weights, caches and states are
additive over blocks, so each is the cost of the embeddings plus the per-block cost of each kind times the
number of blocks of that kind, with per-block costs from `compressor.budget` on one-block configs
(`strategies.costs.BlockCosts`); the prefill activation allowance is the largest kind's. This evaluates the
whole grid with numpy (about two million points for the 12B-v2 preset in seconds); `GridCosts` holds the
arrays, equal to the budget model's figures for every point (tested). The largest fitting candidates (by
parameters; under an active-parameter budget by active parameters first, as ModelOpt ranks by its first
constraint) are then checked exactly by the budget model (throughput included) and the `top_k` of them are
scored (`compressor.pipelines.ranking`); the best score wins.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from compressor.budget import Budget
from compressor.config import ATTENTION, MAMBA, MLP, MOE, PATTERN_CHARS, HybridConfig
from compressor.errors import CompressorError, OptionError
from compressor.target import Target
from strategies.base import Strategy
from strategies.costs import BlockCosts, share
from strategies.grid import DEPTH_KINDS, MODELOPT_DIVISORS, divisor_for, drop_order, expert_choices, width_choices

if TYPE_CHECKING:
    from compressor.importance import Importance

AXES = ("hidden", "ffn", "mamba_heads", "mamba_head_dim", "moe_experts", "moe_ffn", "moe_shared_ffn", "depth")
# grid key -> the HybridConfig field it sets (the grid's key for the mamba_head_dim axis is "head_dim")
GRID_FIELDS = {
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
    "mamba_heads": "mamba_num_heads",
    "head_dim": "mamba_head_dim",
    "moe_experts": "n_routed_experts",
    "moe_ffn": "moe_intermediate_size",
    "moe_shared_ffn": "moe_shared_expert_intermediate_size",
}
# the grid keys each block kind's cost depends on (besides the hidden size)
KIND_KEYS = {
    MAMBA: ("mamba_heads", "head_dim"),
    ATTENTION: (),
    MLP: ("ffn",),
    MOE: ("moe_experts", "moe_ffn", "moe_shared_ffn"),
}


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
    ffn_divisor: int | None = field(
        default=None, metadata={"help": "FFN-size step of MLP blocks and MoE experts (default: ModelOpt's)."}
    )
    head_dim_divisor: int | None = field(default=None, metadata={"help": "Mamba head_dim step (default: 8)."})
    experts_divisor: int | None = field(
        default=None, metadata={"help": "Routed-expert count step (default: ModelOpt's 8, and n_group)."}
    )
    depth_scores: str = field(
        default="auto", metadata={"help": "Block ranking: influence, drop (drop-one) or auto (drop when measured)."}
    )
    modelopt_compatible: bool | None = field(
        default=None,
        metadata={
            "help": "Only shapes ModelOpt's mcore_minitron can express (its divisors, an even block count); "
            "default: on from a hidden size of 2048 (ModelOpt's scale)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_width_pruning", "max_depth_pruning", "max_kind_pruning"):
            if not 0 <= getattr(self, name) < 1:
                raise OptionError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.top_k < 1:
            raise OptionError("top_k", f"must be at least 1, got {self.top_k}")
        for name in ("hidden_divisor", "ffn_divisor", "head_dim_divisor", "experts_divisor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.depth_scores not in ("auto", "influence", "drop"):
            raise OptionError("depth_scores", f"{self.depth_scores!r} is not one of auto, influence, drop")
        unknown = sorted(set(self.axes) - set(AXES))
        if unknown or not self.axes:
            raise OptionError("axes", f"{','.join(unknown) or 'empty'}: choose from {','.join(AXES)}")


@dataclass
class GridCosts:
    """The analytic cost of every grid point: arrays of shape (width choices of each grid key, in
    `GRID_FIELDS` order, then depth combinations), equal to what `compressor.budget` says of the point's
    config for each additive budget term (`Term.measure`: `num_parameters`, `active_parameters`,
    `Budget.memory_of(...).total`, ...)."""

    widths: dict[str, list[int]]  # grid key -> choices, largest first
    depth: np.ndarray  # (depth combinations, 4): blocks removed of each of DEPTH_KINDS
    totals: dict[str, np.ndarray]  # additive term name -> its measure at every point (memory: with activations)

    @property
    def params(self) -> np.ndarray:
        return self.totals["params"]

    @property
    def active_params(self) -> np.ndarray:
        return self.totals["active_params"]

    @property
    def memory(self) -> np.ndarray:
        """Bytes: weights + caches + the activation allowance."""
        return self.totals["memory"]

    def fits(self, budget: Budget) -> np.ndarray:
        """Where the point meets every additive term the budget sets (memory, parameters, ...)."""
        fits = np.ones(self.params.shape, dtype=bool)
        for term, limit in budget.additive_terms():
            fits &= term.met(self.totals[term.name], limit)
        return fits

    def target(self, source: HybridConfig, index: tuple[int, ...], order: dict[str, list[int]]) -> Target:
        """The grid point at `index` (one position per grid key, then the depth combination), dropping the
        first blocks of each kind in `order` (`strategies.grid.drop_order`)."""
        *positions, combo = index
        widths = {GRID_FIELDS[key]: self.widths[key][p] for key, p in zip(GRID_FIELDS, positions, strict=True)}
        removed = [order[kind][: self.depth[combo, i]] for i, kind in enumerate(DEPTH_KINDS)]
        hidden = widths.pop("hidden_size")
        return Target.uniform(
            source, hidden_size=hidden, drop_blocks=tuple(i for part in removed for i in part), **widths
        )


class MinitronStrategy(Strategy):
    name = "minitron"
    Options = MinitronOptions

    def grid(self, source: HybridConfig) -> dict[str, list[int]]:
        """The width choices of each grid key (`GRID_FIELDS`): one, the source's, for an axis not asked for
        or without blocks to apply to."""
        o = self.options
        if not source.is_uniform:
            raise CompressorError("the minitron strategy searches uniform widths: start from a uniform model")
        heads_low = math.ceil(source.mamba_num_heads * (1 - o.max_width_pruning))
        strict = self.modelopt_compatible(source)  # ModelOpt's own divisors, not capped for small models

        def step(given: int | None, value: int, divisor: int) -> int:
            return given or (divisor if strict else divisor_for(value, divisor))

        def ffn_choices(value: int) -> list[int]:
            return width_choices(value, step(o.ffn_divisor, value, 512), o.max_width_pruning)

        grid = {
            "hidden": width_choices(
                source.hidden_size, step(o.hidden_divisor, source.hidden_size, 256), o.max_width_pruning
            ),
            "ffn": ffn_choices(source.intermediate_size),
            "mamba_heads": [
                h for h in range(source.mamba_num_heads, 0, -source.n_groups) if h >= max(heads_low, source.n_groups)
            ],
            "head_dim": width_choices(
                source.mamba_head_dim, step(o.head_dim_divisor, source.mamba_head_dim, 8), o.max_width_pruning
            ),
            "moe_experts": expert_choices(
                source,
                source.n_routed_experts,
                step(o.experts_divisor, source.n_routed_experts, 8),
                o.max_width_pruning,
            ),
            "moe_ffn": ffn_choices(source.moe_intermediate_size),
            "moe_shared_ffn": ffn_choices(source.moe_shared_expert_intermediate_size),
        }
        axis_of = {key: key for key in grid} | {"head_dim": "mamba_head_dim"}
        present = {kind for kind in KIND_KEYS if source.count(kind)}
        used = {key for kind in present for key in KIND_KEYS[kind]} | {"hidden"}
        return {
            key: (values if axis_of[key] in o.axes and key in used else [getattr(source, GRID_FIELDS[key])])
            for key, values in grid.items()
        }

    def depth_choices(self, source: HybridConfig) -> list[tuple[int, ...]]:
        """Blocks to remove of each of DEPTH_KINDS (Mamba, attention, MLP, MoE): together at most
        max_depth_pruning of all blocks, of each kind at most max_kind_pruning of that kind's blocks."""
        limit = math.floor(self.options.max_depth_pruning * source.num_blocks) if "depth" in self.options.axes else 0
        counts = [source.count(kind) for kind in DEPTH_KINDS]
        per_kind = [min(limit, math.floor(self.options.max_kind_pruning * c)) for c in counts]
        even = self.modelopt_compatible(source)  # ModelOpt's num_layers divisor is 2 for hybrids
        return [
            combo
            for combo in itertools.product(*(range(n + 1) for n in per_kind))
            if sum(combo) <= limit and sum(combo) < source.num_blocks
            and not (even and sum(combo) and (source.num_blocks - sum(combo)) % 2)
        ]  # fmt: skip

    def modelopt_compatible(self, source: HybridConfig) -> bool:
        """Whether candidates are restricted to what ModelOpt can express: as asked, else (None) for a model at
        ModelOpt's scale (a hidden size its divisor of 256 leaves choices in: 2048 and up), whose exports
        ModelOpt would otherwise refuse; smaller models keep the finer, capped divisors (`divisor_for`)."""
        if self.options.modelopt_compatible is not None:
            return self.options.modelopt_compatible
        return divisor_for(source.hidden_size, MODELOPT_DIVISORS["hidden_size"]) == MODELOPT_DIVISORS["hidden_size"]

    def grid_costs(self, source: HybridConfig, budget: Budget) -> GridCosts:
        """Every grid point costed analytically (module docstring)."""
        grid = self.grid(source)
        depth = np.array(self.depth_choices(source)).reshape(-1, len(DEPTH_KINDS))  # (D, 4)
        costs = BlockCosts(source, budget)
        keys = list(GRID_FIELDS)
        shape = tuple(len(grid[k]) for k in keys)

        terms = costs.terms

        def table(kind: str | None) -> np.ndarray:
            """(terms + 1, *shape): the block's (or, for None, the fixed part's) share of each additive term,
            then its activation allowance, over the grid keys it depends on, size 1 along the others (they
            broadcast)."""
            own = ("hidden", *KIND_KEYS[kind]) if kind is not None else ("hidden",)
            out = np.zeros((len(terms) + 1, *(len(grid[k]) if k in own else 1 for k in keys)))
            for point in itertools.product(*(enumerate(grid[k]) if k in own else [(0, None)] for k in keys)):
                position = tuple(p for p, _ in point)
                values = {GRID_FIELDS[k]: v for k, (_, v) in zip(keys, point, strict=True) if v is not None}
                hidden = values.pop("hidden_size")
                cost = costs.base(hidden) if kind is None else costs.block(kind, hidden, **values)
                out[(slice(None), *position)] = [*(share(cost, term) for term in terms), cost.activations]
            return out

        totals = np.zeros((len(terms), *shape, len(depth)))
        totals += table(None)[:-1, ..., None]
        activations = np.zeros((*shape, len(depth)))
        for i, kind in enumerate(DEPTH_KINDS):
            if not source.count(kind):
                continue
            count = source.count(kind) - depth[:, i]  # (D,) blocks of this kind kept
            unit = table(kind)[..., None]
            totals += unit[:-1] * count
            activations = np.maximum(activations, np.where(count > 0, unit[-1], 0))
        allowance = [activations if term.allowance else 0 for term in terms]
        by_name = {term.name: total + extra for term, total, extra in zip(terms, totals, allowance, strict=True)}
        return GridCosts(grid, depth, by_name)

    def propose(self, source: HybridConfig, importance: Importance | None, budget: Budget | None) -> list[Target]:
        """Targets of the grid that fit the memory, parameter and active-parameter budgets analytically, in
        the order they are considered (see `_stratified`). `stats` gets the number of grid points and of
        those that fit."""
        if budget is None:
            raise OptionError(
                "budget", "is needed by the minitron strategy: give a memory, parameter or speedup target"
            )
        space = self.grid_costs(source, budget)
        fits = space.fits(budget)
        order = drop_order(source, importance, self.options.depth_scores)
        targets = []
        attention_removed = space.depth[:, DEPTH_KINDS.index(ATTENTION)]
        for index in _stratified(np.where(fits, _size(space, budget), -1), attention_removed):
            targets.append(space.target(source, index, order))
            if len(targets) >= max(50 * self.options.top_k, 500):
                break
        self.stats = {"grid_points": int(space.params.size), "fit_analytically": int(fits.sum())}
        return targets

    def smallest(self, source: HybridConfig) -> HybridConfig:
        """Every axis at its smallest grid value and the most blocks removed (from the end: any choice of
        blocks costs the same)."""
        grid = self.grid(source)
        deepest = max(self.depth_choices(source), key=sum)
        left = dict(zip(DEPTH_KINDS, deepest, strict=True))
        pattern = []
        for char in reversed(source.pattern):
            kind = PATTERN_CHARS[char]
            if left[kind]:
                left[kind] -= 1
            else:
                pattern.append(char)
        return source.replace(
            hybrid_override_pattern="".join(reversed(pattern)), **{GRID_FIELDS[k]: v[-1] for k, v in grid.items()}
        )


def _size(space: GridCosts, budget: Budget) -> np.ndarray:
    """How large each grid point counts as, for taking the largest first: its parameters; under an
    active-parameter budget its rank by active parameters (within 1% of the budget counted as equal,
    so that no expert is dropped only to save its router row), then by parameters."""
    if budget.active_params is None:
        return space.params
    active = np.floor(space.active_params / (0.01 * budget.active_params))
    order = np.lexsort((space.params.ravel(), active.ravel()))  # by active parameters, then parameters
    rank = np.empty(order.size)
    rank[order] = np.arange(order.size)
    return rank.reshape(space.params.shape)


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
