"""MiniPuzzle: heterogeneous architectures built block by block from importance, under a budget.

Every block gets its own choice: keep it, drop it (Mamba, attention, MLP or MoE), or, for MLP blocks, narrow
its FFN to one of a few widths (and Mamba blocks their heads, when asked); an MoE block keeps a share of its
routed experts (`expert_fractions`, the same count in every routing group) and narrows its routed experts'
and shared expert's FFN by one of the `ffn_fractions`. The hidden size is shared and taken from a few sizes
of the Minitron grid. Each choice has
- a cost from the budget model (parameters, active parameters; weights + KV cache + SSM / conv state
  bytes), additive over blocks, with the prefill activation allowance of the widest block set aside;
- an importance-based damage: dropping block i costs its block score d_i (the drop-one KL when the
  importance has it, else block influence); keeping a fraction of its FFN neurons (or Mamba heads) costs
  d_i times the share of the block's squared activation importance that the removed ones carry. In an MoE
  block the routed part keeps the routing mass of the kept experts (`Importance.expert_scores`) times the
  mass-weighted share of their squared FFN-neuron importance kept, the shared expert its share of squared
  neuron importance kept; the two are weighed by the parameters a token uses in each (top-k routed
  experts, the shared expert), and the damage is d_i times what is not kept.

For each hidden size the least-damage assignment within the budget is a multiple-choice knapsack with
side constraints (the depth limits, the widths a servability mode shares, pinned blocks), solved exactly
as a mixed-integer program (`strategies.solver`). Four variants per hidden size (free, widths only, depth
only, attention kept), each giving its `solutions` best distinct choices, over the `hidden_choices`
largest hidden sizes that admit a solution give a diverse set, which is checked exactly against the
budget (throughput included) and scored zero-shot by the scorer. `compress search` then distills the best
few briefly and ranks them again (Nemotron-H's 56B -> 47B MiniPuzzle step).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compressor.budget import Budget, parameter_counts
from compressor.config import ATTENTION, KIND_CHARS, MAMBA, MLP, MOE, OVERRIDABLE, BlockSpec, HybridConfig
from compressor.errors import CompressorError, OptionError
from compressor.target import BlockTarget, Target
from strategies import solver
from strategies.base import Strategy
from strategies.costs import BlockCost, BlockCosts
from strategies.grid import DEPTH_KINDS, divisor_for, fewest_experts, width_choices
from strategies.solver import BlockChoice

if TYPE_CHECKING:  # torch is imported where it runs: the command line builds its options from this module
    import torch

    from compressor.importance import Importance


@dataclass(frozen=True)
class MiniPuzzleOptions:
    top_k: int = field(default=12, metadata={"help": "Candidates to score zero-shot."})
    hidden_choices: int = field(default=3, metadata={"help": "MiniPuzzle: hidden sizes tried (the largest)."})
    max_width_pruning: float = field(default=0.4, metadata={"help": "At most this share of a width removed."})
    ffn_fractions: tuple[float, ...] = field(
        default=(1.0, 0.75, 0.5),
        metadata={"help": "MiniPuzzle: FFN widths an MLP block (or an MoE block's experts) may keep, e.g. 1,0.75,0.5."},
    )
    mamba_head_fractions: tuple[float, ...] = field(
        default=(1.0,), metadata={"help": "MiniPuzzle: Mamba head shares a block may keep, e.g. 1,0.75,0.5."}
    )
    expert_fractions: tuple[float, ...] = field(
        default=(1.0, 0.75, 0.5),
        metadata={"help": "MiniPuzzle: routed-expert shares an MoE block may keep, e.g. 1,0.75,0.5."},
    )
    max_depth_pruning: float = field(default=0.3, metadata={"help": "At most this share of all blocks removed."})
    max_kind_pruning: float = field(
        default=0.5, metadata={"help": "At most this share of each kind's blocks removed (keeps the hybrid)."}
    )
    depth_scores: str = field(
        default="auto", metadata={"help": "Block ranking: influence, drop (drop-one) or auto (drop when measured)."}
    )
    servable: str = field(
        default="auto",
        metadata={
            "help": "MiniPuzzle: the engines the candidates must run in. uniform: every engine (the kept blocks "
            "of a kind share their widths; blocks may be dropped); vllm: vLLM (per-block MLP and MoE widths, "
            "the kept Mamba blocks share their heads; written in the nemotron_h_puzzle format); any: compressor "
            "only (per-block Mamba heads too); auto: vllm, or any where vllm finds no candidate."
        },
    )

    solutions: int = field(
        default=1,
        metadata={"help": "MiniPuzzle: distinct choices per hidden size and variant (the solver's best first)."},
    )
    keep_blocks: tuple[int, ...] = field(
        default=(), metadata={"help": "MiniPuzzle: blocks never dropped (e.g. those retrieval needs), e.g. 3,7."}
    )

    def __post_init__(self) -> None:
        for name in ("ffn_fractions", "mamba_head_fractions", "expert_fractions"):
            values = getattr(self, name)
            if not values or not all(0 < f <= 1 for f in values):
                raise OptionError(name, f"must be fractions in (0, 1], got {','.join(map(str, values)) or 'none'}")
        for name in ("hidden_choices", "top_k", "solutions"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_width_pruning", "max_depth_pruning", "max_kind_pruning"):
            if not 0 <= getattr(self, name) < 1:
                raise OptionError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.depth_scores not in ("auto", "influence", "drop"):
            raise OptionError("depth_scores", f"{self.depth_scores!r} is not one of auto, influence, drop")
        servable = {True: "uniform", False: "any", "true": "uniform", "false": "any"}.get(self.servable, self.servable)
        if servable not in SHARED_KINDS and servable != "auto":
            raise OptionError("servable", f"{self.servable!r} is not one of auto, uniform, vllm, any")
        object.__setattr__(self, "servable", servable)  # true / false: the earlier yes-or-no spelling


@dataclass
class ChoiceTable:
    """Every block's options (`options[b]`) at one hidden size, and the fixed part's cost there."""

    hidden: int
    options: list[list[BlockChoice]]
    base: BlockCost


# The block kinds whose kept blocks share one width, per servability mode: what each engine reads globally.
SHARED_KINDS = {"uniform": frozenset((MAMBA, ATTENTION, MLP, MOE)), "vllm": frozenset((MAMBA,)), "any": frozenset()}


class MiniPuzzleStrategy(Strategy):
    name = "minipuzzle"
    Options = MiniPuzzleOptions

    def propose(self, source: HybridConfig, importance: Importance | None, budget: Budget | None) -> list[Target]:
        """Distinct targets from the knapsack over per-block choices, for each hidden size and variant, in
        the servability mode the options ask for (auto: vllm, else any)."""
        if budget is None:
            raise OptionError(
                "budget", "is needed by the minipuzzle strategy: give a memory, parameter or speedup target"
            )
        if not source.is_uniform:
            raise CompressorError("MiniPuzzle starts from a uniform model")
        for mode in self._modes():
            targets = self._propose(source, importance, budget, mode)
            if targets:
                break
        self.stats = {"proposed": len(targets), "servable": mode}
        return targets

    def servable_tables(
        self, source: HybridConfig, importance: Importance | None, budget: Budget
    ) -> tuple[str, list[ChoiceTable]]:
        """The per-block options (`tables`) of the first servability mode that admits a choice, and the
        mode: what a caller re-scores (a blockwise-distilled library) before `targets` solves again."""
        if not source.is_uniform:
            raise CompressorError("MiniPuzzle starts from a uniform model")
        for mode in self._modes():
            tables = self.tables(source, importance, budget, mode)
            if tables:
                break
        self.stats = {"servable": mode, "hidden sizes": len(tables)}
        return mode, tables

    def _modes(self) -> tuple[str, ...]:
        return ("vllm", "any") if self.options.servable == "auto" else (self.options.servable,)

    def _propose(self, source: HybridConfig, importance, budget: Budget, mode: str) -> list[Target]:
        """The targets of one servability mode (`SHARED_KINDS`).

        A throughput-only budget has no additive cost to pack against; decode speed follows the bytes a
        step reads, so the knapsack is run against a ladder of memory targets (95% ... 50% of the
        original's) and the caller keeps what reaches the speedup."""
        if not budget.additive_terms():
            full = budget.memory_of(source).total
            targets: list[Target] = []
            for share in (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
                surrogate = dataclasses.replace(budget, memory=int(share * full), min_speedup=None, gpu=None)
                targets += [t for t in self._propose(source, importance, surrogate, mode) if t not in targets]
            return targets
        return self.targets(source, self.tables(source, importance, budget, mode), budget, mode)

    def tables(self, source: HybridConfig, importance, budget: Budget, mode: str) -> list[ChoiceTable]:
        """Every block's options at each of the `hidden_choices` largest hidden sizes that admit a choice
        within the budget (its additive terms: memory, parameters, active parameters, ...)."""
        o = self.options
        hidden_grid = width_choices(source.hidden_size, divisor_for(source.hidden_size, 256), o.max_width_pruning)
        costs = BlockCosts(source, budget)
        damage = _block_damage(source, importance, o.depth_scores)
        limits = self._drop_limits(source)
        moe = {s.index: _MoEScores(source, s, importance) for s in source.blocks if s.kind == MOE}
        shared, pinned = SHARED_KINDS[mode], self._pinned(source)
        tables: list[ChoiceTable] = []
        for hidden in hidden_grid:
            options = [
                self._options(source, importance, moe.get(i), costs, damage, i, hidden)
                for i in range(source.num_blocks)
            ]
            table = ChoiceTable(hidden, options, costs.base(hidden))
            if solver.feasible(options, budget, table.base, limits, shared=shared, pinned=pinned):
                tables.append(table)
                if len(tables) == o.hidden_choices:
                    break
        return tables

    def targets(
        self, source: HybridConfig, tables: list[ChoiceTable], budget: Budget, mode: str, *, solutions: int = 0
    ) -> list[Target]:
        """The distinct targets the solver picks from `tables` (whose damages may come from elsewhere, e.g.
        a blockwise-distilled library): per hidden size and variant, the `solutions` least-damage ones (at
        least the options' `solutions`)."""
        limits, pinned, shared = self._drop_limits(source), self._pinned(source), SHARED_KINDS[mode]
        count = max(solutions, self.options.solutions)
        seen, targets = set(), []
        for table in tables:
            for variant in VARIANTS:
                allowed = [[x for x in opts if _allowed(x, variant)] for opts in table.options]
                if not all(allowed):
                    continue
                choices = solver.solve(allowed, budget, table.base, limits, shared=shared, pinned=pinned, count=count)
                for choice in choices:
                    target = _target(source, table.hidden, choice)
                    key = (target.hidden_size, target.blocks)
                    if key not in seen:
                        seen.add(key)
                        targets.append(target)
        return targets

    def _pinned(self, source: HybridConfig) -> frozenset[int]:
        outside = [i for i in self.options.keep_blocks if not 0 <= i < source.num_blocks]
        if outside:
            raise OptionError("keep_blocks", f"block {outside[0]} is not in a model of {source.num_blocks} blocks")
        return frozenset(self.options.keep_blocks)

    def _drop_limits(self, source: HybridConfig) -> dict[str, int]:
        total = math.floor(self.options.max_depth_pruning * source.num_blocks)
        limits = {kind: math.floor(self.options.max_kind_pruning * source.count(kind)) for kind in DEPTH_KINDS}
        limits["total"] = total
        return limits

    def _options(
        self,
        source,
        importance,
        moe: _MoEScores | None,
        costs: BlockCosts,
        damage: list[float],
        index: int,
        hidden: int,
    ) -> list[BlockChoice]:
        """The choices of one block: dropped, then each width it may keep (whole first)."""
        import torch

        spec = source.block(index)
        kind = spec.kind
        options = [BlockChoice(kind, None, False, 0, 0, 0, 0, damage[index])]
        if kind == MLP:
            scores = importance.ffn[index] if importance is not None else torch.ones(spec.intermediate_size)
            for width in _widths(spec.intermediate_size, self.options.ffn_fractions):
                share = _removed_share(scores, width)
                options.append(self._option(costs, spec, hidden, {"intermediate_size": width}, damage[index] * share))
        elif kind == MAMBA:
            groups = source.n_groups
            head_scores = (
                importance.mamba[index].norm(dim=1) if importance is not None else torch.ones(spec.mamba_num_heads)
            )
            counts = {
                min(spec.mamba_num_heads, max(groups, round(spec.mamba_num_heads * f / groups) * groups))
                for f in self.options.mamba_head_fractions
            }
            for heads in sorted(counts | {spec.mamba_num_heads}, reverse=True):
                share = _removed_share_grouped(head_scores, heads, groups)
                options.append(self._option(costs, spec, hidden, {"mamba_num_heads": heads}, damage[index] * share))
        elif kind == MOE:
            fractions = sorted(set(self.options.ffn_fractions) | {1.0}, reverse=True)
            for experts, fraction in itertools.product(_expert_counts(source, spec, self.options), fractions):
                widths = {
                    "n_routed_experts": experts,
                    "moe_intermediate_size": _width(spec.moe_intermediate_size, fraction),
                    "moe_shared_expert_intermediate_size": _width(spec.moe_shared_expert_intermediate_size, fraction),
                }
                options.append(self._option(costs, spec, hidden, widths, damage[index] * moe.removed_share(**widths)))
        else:
            options.append(self._option(costs, spec, hidden, {}, 0.0))
        return options

    @staticmethod
    def _option(costs: BlockCosts, spec: BlockSpec, hidden: int, widths: dict[str, int], damage: float) -> BlockChoice:
        cost = costs.block(spec.kind, hidden, **{n: getattr(spec, n) for n in OVERRIDABLE[spec.kind]} | widths)
        whole = all(getattr(spec, name) == value for name, value in widths.items())
        *named, others = cost
        return BlockChoice(spec.kind, widths, whole, *named, damage, dict(others))


def _width(full: int, fraction: float) -> int:
    """`fraction` of an FFN width `full`, rounded to ModelOpt's FFN divisor (`full` itself for 1)."""
    if fraction >= 1:
        return full
    divisor = divisor_for(full, 512)
    return min(full, max(divisor, round(full * fraction / divisor) * divisor))


def _widths(full: int, fractions: tuple[float, ...]) -> list[int]:
    """The FFN widths of these fractions of `full`, `full` itself first."""
    return sorted({_width(full, f) for f in fractions} | {full}, reverse=True)


def _expert_counts(source: HybridConfig, spec: BlockSpec, options: MiniPuzzleOptions) -> list[int]:
    """Routed-expert counts an MoE block may keep: each fraction of its experts rounded to a multiple of
    n_group, never fewer than `fewest_experts`; all of them first."""
    groups, experts = source.n_group, spec.n_routed_experts
    low = min(experts, fewest_experts(source))
    counts = {min(experts, max(low, round(experts * f / groups) * groups)) for f in options.expert_fractions}
    return sorted(counts | {experts}, reverse=True)


class _MoEScores:
    """What an MoE block's choices remove, from importance (uniform scores for a config alone); the
    per-expert shares of squared FFN importance kept by each width are summed once."""

    def __init__(self, source: HybridConfig, spec: BlockSpec, importance: Importance | None) -> None:
        import torch

        self.index, self.n_group, self.importance = spec.index, source.n_group, importance
        experts, ffn, shared = (
            spec.n_routed_experts,
            spec.moe_intermediate_size,
            spec.moe_shared_expert_intermediate_size,
        )
        if importance is None:  # every expert and neuron alike: the best w of n keep w / n
            self.mass = torch.ones(experts, dtype=torch.float64)
            self.ffn_kept = (torch.arange(1, ffn + 1, dtype=torch.float64) / ffn).expand(experts, ffn)
            self.shared_kept = torch.arange(1, shared + 1, dtype=torch.float64) / shared
        else:
            self.mass = importance.expert_scores(spec.index).double().clamp(min=0)
            # (experts, ffn): the share of each expert's squared neuron importance its best w neurons keep, at w - 1
            self.ffn_kept = _kept_shares(importance.expert_ffn[spec.index])  # present with the expert scores
            self.shared_kept = _kept_shares(importance.shared_ffn[spec.index][None])[0]  # (shared ffn,)
        width = source.moe_latent_size or source.hidden_size
        routed = source.num_experts_per_tok * 2 * width * ffn  # the routed parameters a token uses
        self.routed_weight = routed / (routed + 2 * source.hidden_size * shared)

    def removed_share(
        self, n_routed_experts: int, moe_intermediate_size: int, moe_shared_expert_intermediate_size: int
    ) -> float:
        import torch

        if self.importance is not None:
            kept = self.importance.keep_experts(self.index, n_routed_experts, self.n_group)
        else:
            kept = torch.arange(n_routed_experts)
        total = float(self.mass.sum())
        if total > 0:
            weights, mass_kept = self.mass[kept], float(self.mass[kept].sum()) / total
        else:  # no calibration token reached this block's experts
            weights, mass_kept = torch.ones(len(kept), dtype=torch.float64), n_routed_experts / len(self.mass)
        ffn_kept = float((weights * self.ffn_kept[kept, moe_intermediate_size - 1]).sum() / weights.sum())
        shared_kept = float(self.shared_kept[moe_shared_expert_intermediate_size - 1])
        return 1 - (self.routed_weight * mass_kept * ffn_kept + (1 - self.routed_weight) * shared_kept)


def _kept_shares(scores: torch.Tensor) -> torch.Tensor:
    """(rows, n) -> (rows, n): the share of each row's squared scores that its best w + 1 carry, at [:, w]."""
    squared = scores.double().square().sort(dim=-1, descending=True).values
    return squared.cumsum(-1) / squared.sum(-1, keepdim=True).clamp(min=1e-30)


# free: every choice; widths: no block dropped; depth: blocks kept whole or dropped; attention kept: no
# attention block dropped (long-context recall), everything else free.
VARIANTS = ("free", "widths", "depth", "attention kept")


def _allowed(option: BlockChoice, variant: str) -> bool:
    if variant == "widths":
        return not option.dropped
    if variant == "depth":
        return option.dropped or option.whole
    if variant == "attention kept":
        return option.kind != ATTENTION or not option.dropped
    return True


def _target(source: HybridConfig, hidden: int, choice: list[BlockChoice]) -> Target:
    blocks = []
    for index, option in enumerate(choice):
        if option.dropped:
            continue
        spec = source.block(index)
        names = [f.name for f in dataclasses.fields(BlockTarget) if f.name not in ("source", "kind")]
        widths = {name: getattr(spec, name) for name in names} | option.widths
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
