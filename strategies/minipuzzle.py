"""MiniPuzzle: heterogeneous architectures built block by block from importance, under a budget.

Every block gets its own choice: keep it, drop it (Mamba, attention or MLP), or, for MLP blocks, narrow
its FFN to one of a few widths (and Mamba blocks their heads, when asked); the hidden size is shared and
taken from a few sizes of the Minitron grid. Each choice has
- a cost from the budget model (parameters; weights + KV cache + SSM / conv state bytes), additive over
  blocks, with the prefill activation allowance of the widest block set aside;
- an importance-based damage: dropping block i costs its block score d_i (the drop-one KL when the
  importance has it, else block influence); keeping a fraction of its FFN neurons (or Mamba heads) costs
  d_i times the share of the block's squared activation importance that the removed ones carry.

For each hidden size the cheapest-damage assignment within the budget is a multiple-choice knapsack,
solved by Lagrangian relaxation (each block takes argmin damage + lambda * cost; lambda is bisected to
the smallest that fits) followed by a greedy fill of what budget remains; the depth limits are enforced
by forbidding the most damaging surplus drops and solving again. Four variants per hidden size (free,
widths only, depth only, attention kept) over the `hidden_choices` largest hidden sizes that admit a
solution give a diverse set, which is checked exactly against the budget (throughput
included) and scored zero-shot by the scorer. `compress search` then distills the best few briefly and
ranks them again (Nemotron-H's 56B -> 47B MiniPuzzle step).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from compressor.budget import Budget, parameter_counts
from compressor.config import ATTENTION, KIND_CHARS, MAMBA, MLP, HybridConfig
from compressor.errors import CompressorError, OptionError
from compressor.importance import Importance
from compressor.prune import BlockTarget, Target
from strategies.base import Strategy
from strategies.costs import BlockCosts
from strategies.grid import divisor_for, width_choices


@dataclass(frozen=True)
class MiniPuzzleOptions:
    top_k: int = field(default=12, metadata={"help": "Candidates to score zero-shot."})
    hidden_choices: int = field(default=3, metadata={"help": "MiniPuzzle: hidden sizes tried (the largest)."})
    max_width_pruning: float = field(default=0.4, metadata={"help": "At most this share of a width removed."})
    ffn_fractions: tuple[float, ...] = field(
        default=(1.0, 0.75, 0.5), metadata={"help": "MiniPuzzle: FFN widths an MLP block may keep, e.g. 1,0.75,0.5."}
    )
    mamba_head_fractions: tuple[float, ...] = field(
        default=(1.0,), metadata={"help": "MiniPuzzle: Mamba head shares a block may keep, e.g. 1,0.75,0.5."}
    )
    max_depth_pruning: float = field(default=0.3, metadata={"help": "At most this share of all blocks removed."})
    max_kind_pruning: float = field(
        default=0.5, metadata={"help": "At most this share of each kind's blocks removed (keeps the hybrid)."}
    )
    depth_scores: str = field(
        default="auto", metadata={"help": "Block ranking: influence, drop (drop-one) or auto (drop when measured)."}
    )

    def __post_init__(self) -> None:
        for name in ("ffn_fractions", "mamba_head_fractions"):
            values = getattr(self, name)
            if not values or not all(0 < f <= 1 for f in values):
                raise OptionError(name, f"must be fractions in (0, 1], got {','.join(map(str, values)) or 'none'}")
        for name in ("hidden_choices", "top_k"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_width_pruning", "max_depth_pruning", "max_kind_pruning"):
            if not 0 <= getattr(self, name) < 1:
                raise OptionError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.depth_scores not in ("auto", "influence", "drop"):
            raise OptionError("depth_scores", f"{self.depth_scores!r} is not one of auto, influence, drop")


@dataclass
class _Option:
    kind: str
    width: int  # FFN size (MLP), heads (Mamba); 0 when the block is dropped; 1 for a kept attention block
    params: int
    nbytes: int
    activations: int
    damage: float


class MiniPuzzleStrategy(Strategy):
    name = "minipuzzle"
    Options = MiniPuzzleOptions

    def propose(self, source: HybridConfig, importance: Importance | None, budget: Budget | None) -> list[Target]:
        """Distinct targets from the knapsack over per-block choices, for each hidden size and variant.

        A throughput-only budget has no additive cost to pack against; decode speed follows the bytes a
        step reads, so the knapsack is run against a ladder of memory targets (95% ... 50% of the
        original's) and the caller keeps what reaches the speedup."""
        if budget is None:
            raise OptionError(
                "budget", "is needed by the minipuzzle strategy: give a memory, parameter or speedup target"
            )
        if not source.is_uniform:
            raise CompressorError("MiniPuzzle starts from a uniform model")
        if budget.memory is None and budget.params is None:
            full = budget.memory_of(source).total
            targets: list[Target] = []
            for share in (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
                surrogate = dataclasses.replace(budget, memory=int(share * full), min_speedup=None, gpu=None)
                targets += [t for t in self.propose(source, importance, surrogate) if t not in targets]
            self.stats = {"proposed": len(targets)}
            return targets
        o = self.options
        hidden_grid = width_choices(source.hidden_size, divisor_for(source.hidden_size, 256), o.max_width_pruning)
        costs = BlockCosts(source, budget)
        damage = _block_damage(source, importance, o.depth_scores)
        limits = self._drop_limits(source)
        seen, targets, hidden_used = set(), [], 0
        for hidden in hidden_grid:  # the largest hidden sizes that admit a solution
            options = [self._options(source, importance, costs, damage, i, hidden) for i in range(source.num_blocks)]
            base_params, base_bytes = costs.base(hidden)
            found = False
            for variant in VARIANTS:
                allowed = [[x for x in opts if _allowed(x, opts, variant)] for opts in options]
                choice = _solve(allowed, budget, base_params, base_bytes, limits, source)
                if choice is None:
                    continue
                found = True
                target = _target(source, hidden, choice)
                key = (target.hidden_size, target.blocks)
                if key not in seen:
                    seen.add(key)
                    targets.append(target)
            hidden_used += found
            if hidden_used == o.hidden_choices:
                break
        self.stats = {"proposed": len(targets)}
        return targets

    def _drop_limits(self, source: HybridConfig) -> dict[str, int]:
        total = math.floor(self.options.max_depth_pruning * source.num_blocks)
        limits = {
            kind: math.floor(self.options.max_kind_pruning * source.count(kind)) for kind in (MAMBA, ATTENTION, MLP)
        }
        limits["total"] = total
        return limits

    def _options(
        self, source, importance, costs: BlockCosts, damage: list[float], index: int, hidden: int
    ) -> list[_Option]:
        spec = source.block(index)
        kind = spec.kind
        options = [_Option(kind, 0, 0, 0, 0, damage[index])]  # dropped
        if kind == MLP:
            scores = importance.ffn[index] if importance is not None else torch.ones(spec.intermediate_size)
            divisor = divisor_for(spec.intermediate_size, 512)
            widths = {
                min(spec.intermediate_size, max(divisor, round(spec.intermediate_size * f / divisor) * divisor))
                for f in self.options.ffn_fractions
            }
            widths.add(spec.intermediate_size)
            for width in sorted(widths, reverse=True):
                params, nbytes, act = costs.block(MLP, hidden, width, spec.mamba_num_heads, spec.mamba_head_dim)
                options.append(_Option(kind, width, params, nbytes, act, damage[index] * _removed_share(scores, width)))
        elif kind == MAMBA:
            groups = source.n_groups
            head_scores = (
                importance.mamba[index].norm(dim=1) if importance is not None else torch.ones(spec.mamba_num_heads)
            )
            counts = {
                min(spec.mamba_num_heads, max(groups, round(spec.mamba_num_heads * f / groups) * groups))
                for f in self.options.mamba_head_fractions
            }
            counts.add(spec.mamba_num_heads)
            for heads in sorted(counts, reverse=True):
                params, nbytes, act = costs.block(MAMBA, hidden, spec.intermediate_size, heads, spec.mamba_head_dim)
                share = _removed_share_grouped(head_scores, heads, groups)
                options.append(_Option(kind, heads, params, nbytes, act, damage[index] * share))
        else:
            params, nbytes, act = costs.block(
                ATTENTION, hidden, spec.intermediate_size, spec.mamba_num_heads, spec.mamba_head_dim
            )
            options.append(_Option(kind, 1, params, nbytes, act, 0.0))
        return options


# free: every choice; widths: no block dropped; depth: blocks kept whole or dropped; attention kept: no
# attention block dropped (long-context recall), everything else free.
VARIANTS = ("free", "widths", "depth", "attention kept")


def _allowed(option: _Option, options: list[_Option], variant: str) -> bool:
    full = max(x.width for x in options)
    if variant == "widths":
        return option.width > 0
    if variant == "depth":
        return option.width in (0, full)
    if variant == "attention kept":
        return option.kind != ATTENTION or option.width > 0
    return True


def _solve(options, budget: Budget, base_params: int, base_bytes: int, limits: dict[str, int], source: HybridConfig):
    """The least-damage choice per block within the budget, or None. options[i]: the choices of block i."""
    options = [list(o) for o in options]
    for _ in range(len(options) + 1):
        choice = _lagrangian(options, budget, base_params, base_bytes)
        if choice is None:
            return None
        surplus = _surplus_drops(choice, limits)
        if surplus is None:
            return choice
        options[surplus] = [x for x in options[surplus] if x.width > 0]  # keep this block, solve again
    return None


def _capacity(choice, budget: Budget, base_params: int, base_bytes: int) -> tuple[bool, float]:
    params = base_params + sum(x.params for x in choice)
    nbytes = base_bytes + sum(x.nbytes for x in choice) + max((x.activations for x in choice), default=0)
    fits = (budget.memory is None or nbytes <= budget.memory) and (budget.params is None or params <= budget.params)
    return fits, nbytes


def _lagrangian(options, budget: Budget, base_params: int, base_bytes: int):
    """Bisect lambda so that argmin(damage + lambda * cost) per block fits; then spend what is left greedily."""
    use_memory = budget.memory is not None
    scale = float(budget.memory if use_memory else (budget.params or 1))

    def cost(x: _Option) -> float:  # additive part only; the activation allowance is a maximum, not a sum
        return (x.nbytes if use_memory else x.params) / scale

    def pick(lam: float):
        return [min(opts, key=lambda x: (x.damage + lam * cost(x), cost(x))) for opts in options]

    cheapest = [min(opts, key=cost) for opts in options]
    if not _capacity(cheapest, budget, base_params, base_bytes)[0]:
        return None
    low, high = 0.0, 1.0
    while not _capacity(pick(high), budget, base_params, base_bytes)[0]:
        high *= 4
        if high > 1e12:
            return None
    for _ in range(60):
        middle = (low + high) / 2
        if _capacity(pick(middle), budget, base_params, base_bytes)[0]:
            high = middle
        else:
            low = middle
    choice = pick(high)
    # greedy fill: the upgrade with the best damage saved per cost added, while anything still fits
    params = base_params + sum(x.params for x in choice)
    nbytes = base_bytes + sum(x.nbytes for x in choice)
    activations = max((x.activations for x in choice), default=0)
    while True:
        best, best_gain = None, 0.0
        for i, opts in enumerate(options):
            for x in opts:
                saved = choice[i].damage - x.damage
                added = cost(x) - cost(choice[i])
                if saved <= 0 or added <= 0 or saved / added <= best_gain:
                    continue
                new_params = params - choice[i].params + x.params
                new_bytes = nbytes - choice[i].nbytes + x.nbytes + max(activations, x.activations)
                if (budget.memory is None or new_bytes <= budget.memory) and (
                    budget.params is None or new_params <= budget.params
                ):
                    best, best_gain = (i, x), saved / added
        if best is None:
            return choice
        i, x = best
        params += x.params - choice[i].params
        nbytes += x.nbytes - choice[i].nbytes
        activations = max(activations, x.activations)
        choice[i] = x


def _surplus_drops(choice, limits: dict[str, int]) -> int | None:
    """A dropped block beyond the depth limits (the most damaging such drop), or None if within them."""
    dropped = [i for i, x in enumerate(choice) if x.width == 0]
    by_kind = {kind: [i for i in dropped if choice[i].kind == kind] for kind in (MAMBA, ATTENTION, MLP)}
    over = [i for kind, idx in by_kind.items() if len(idx) > limits[kind] for i in idx]
    if not over and len(dropped) > limits["total"]:
        over = dropped
    if not over:
        return None
    return max(over, key=lambda i: choice[i].damage)


def _target(source: HybridConfig, hidden: int, choice: list[_Option]) -> Target:
    blocks = []
    for index, option in enumerate(choice):
        if option.width == 0:
            continue
        spec = source.block(index)
        widths = dict(
            intermediate_size=spec.intermediate_size,
            mamba_num_heads=spec.mamba_num_heads,
            mamba_head_dim=spec.mamba_head_dim,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
        )
        if option.kind == MLP:
            widths["intermediate_size"] = option.width
        elif option.kind == MAMBA:
            widths["mamba_num_heads"] = option.width
        blocks.append(BlockTarget(source=index, kind=option.kind, **widths))
    return Target(hidden_size=hidden, blocks=tuple(blocks))


def _block_damage(source: HybridConfig, importance: Importance | None, method: str) -> list[float]:
    """Damage of dropping each block: its block score scaled to mean 1. Without importance (a config
    alone) the prior is the block's share of the parameters: every parameter is worth the same, so what
    separates the choices is how much memory each parameter brings with it (KV cache, SSM state)."""
    if importance is None:
        sizes = []
        for index in range(source.num_blocks):
            kind = source.block(index).kind
            one = source.replace(hybrid_override_pattern=KIND_CHARS[kind], block_overrides={})
            sizes.append(parameter_counts(one)[kind])
        mean = sum(sizes) / len(sizes)
        return [size / mean for size in sizes]
    scores = importance.block_scores(method).double()
    scores = scores - min(0.0, float(scores.min()))  # iterative removal ranks can be negative
    return (scores / scores.mean().clamp(min=1e-12)).tolist()


def _removed_share(scores: torch.Tensor, keep: int) -> float:
    """Share of the squared importance carried by all but the `keep` highest scores."""
    squared = scores.double().square()
    return float(1 - squared.topk(keep).values.sum() / squared.sum().clamp(min=1e-30))


def _removed_share_grouped(head_scores: torch.Tensor, keep: int, groups: int) -> float:
    squared = head_scores.double().square().view(groups, -1)
    kept = squared.topk(keep // groups, dim=1).values.sum()
    return float(1 - kept / squared.sum().clamp(min=1e-30))
