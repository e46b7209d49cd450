"""The exact choice of one option per block under a budget: a mixed-integer program (HiGHS, via SciPy).

Each block offers a few options (keep whole, narrow, drop), each with a damage (what it costs in quality:
an importance estimate, or a measured KL increase from the blockwise-distilled library) and its costs
(its share of each additive budget term, `compressor.budget.Term.share`, and its prefill activation
allowance). With binary x[b, o] (block b takes option o) the program is

    minimise   sum damage[b, o] x[b, o]
    subject to sum_o x[b, o] = 1                                   one option per block
               sum cost_t[b, o] x[b, o] (+ a for memory) <= cap_t  each additive budget term t set
               a >= sum_o activations[b, o] x[b, o]                a: the widest kept block's allowance
               sum_{b of kind k} x[b, drop] <= limit_k, and in all <= limit_total
               x[b, o] <= y[k, w(o)], sum_w y[k, w] <= 1            kinds whose kept blocks share widths
               x[b, drop] = 0                                      pinned blocks
               sum_o o x[b, o] <= sum_o o x[b', o]                 b before b', interchangeable
               sum_{(b, o) in S} x[b, o] <= blocks - distance      each earlier solution S (diversity)

a multiple-choice knapsack with side constraints, solved exactly. Interchangeable blocks (the same options
at the same costs and damages, both pinned or neither: blocks of a kind when a config alone is searched)
take their options in order, so the solver weighs one choice per permutation of them instead of ruling out
each: the same least damage, found in a fraction of the time, and distinct choices that differ in more than
which of equal blocks changes. `solve` returns the best `count` distinct
choices, best first; every one is checked again in integers against the budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from compressor.budget import Budget
from compressor.errors import CompressorError
from compressor.outputs import silenced
from strategies.costs import share
from strategies.grid import DEPTH_KINDS

# HiGHS accepts rows up to ~1e-7 over their bound (its primal feasibility tolerance), which at a 90 GiB cap
# is kilobytes: a choice that the integer check finds over the budget is solved again with the budget rows
# this much (in units of their cap) tighter, then ten times that, ...
_MARGINS = (0.0, 1e-7, 1e-6, 1e-5)


@dataclass
class BlockChoice:
    """One option for one block: its widths (BlockTarget fields it changes; None when dropped), whether it
    keeps the block whole, its costs (`strategies.costs.BlockCost`'s: the named shares, the activation
    allowance, the other additive terms' shares in `others`) and damage."""

    kind: str
    widths: dict[str, int] | None
    whole: bool
    params: int
    active_params: int
    nbytes: int
    activations: int
    damage: float
    others: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> bool:
        return self.widths is None

    @property
    def key(self) -> tuple:
        """The widths as a hashable value (() when dropped)."""
        return tuple(sorted(self.widths.items())) if self.widths is not None else ()


def fits(choice: Sequence[BlockChoice], budget: Budget, base) -> bool:
    """Whether the choice (one option per block) plus the fixed part `base` meets every additive term the
    budget sets, the activation allowance of its widest block counted where the term has one (memory)."""
    activations = max((x.activations for x in choice), default=0)
    for term, limit in budget.additive_terms():
        used = share(base, term) + sum(share(x, term) for x in choice)
        used += activations if term.allowance else 0
        if used > limit:
            return False
    return True


def within_depth_limits(choice: Sequence[BlockChoice], limits: dict[str, int]) -> bool:
    dropped = [x for x in choice if x.dropped]
    return len(dropped) <= limits["total"] and all(
        sum(x.kind == kind for x in dropped) <= limits[kind] for kind in DEPTH_KINDS
    )


def shares_widths(choice: Sequence[BlockChoice], shared: frozenset[str]) -> bool:
    return all(len({x.key for x in choice if x.kind == kind and not x.dropped}) <= 1 for kind in shared)


def solve(
    options: Sequence[Sequence[BlockChoice]],
    budget: Budget,
    base,
    limits: dict[str, int],
    *,
    shared: frozenset[str] = frozenset(),
    pinned: frozenset[int] = frozenset(),
    count: int = 1,
    distance: int = 1,
    time_limit: float = 30.0,
    objective: bool = True,
) -> list[list[BlockChoice]]:
    """The `count` least-damage choices (one option per block, module docstring), best first, each at
    least `distance` blocks different from the others; fewer when fewer exist ([] when none fits).
    options[b]: the options of block b; `base`: the fixed part's cost (`BlockCosts.base`); `limits`: the
    most blocks dropped per kind (`DEPTH_KINDS`) and in all ("total"); `shared`: kinds whose kept blocks
    must share their widths; `pinned`: blocks that may not be dropped. Without `objective` any choice that
    fits will do (`feasible`)."""
    program = _Program(options, budget, base, limits, shared, pinned)
    if not objective:
        program.cost = np.zeros_like(program.cost)
    solutions: list[list[BlockChoice]] = []
    while len(solutions) < count:
        for margin in _MARGINS:
            picked = program.solve(time_limit, margin)
            if picked is None:
                return solutions
            choice = [options[b][o] for b, o in picked]
            if fits(choice, budget, base):
                break
        else:
            raise CompressorError("the solver's choices exceed the budget (numerical trouble): report it")
        if not (within_depth_limits(choice, limits) and shares_widths(choice, shared)):
            raise CompressorError("the solver returned a choice outside the depth or width limits: report it")
        solutions.append(choice)
        program.exclude(picked, distance)
    return solutions


def feasible(
    options: Sequence[Sequence[BlockChoice]],
    budget: Budget,
    base,
    limits: dict[str, int],
    *,
    shared: frozenset[str] = frozenset(),
    pinned: frozenset[int] = frozenset(),
) -> bool:
    """Whether any choice (`solve`'s arguments) fits: the program without its objective, so the first
    feasible point ends the search instead of a proof of the least damage."""
    return bool(solve(options, budget, base, limits, shared=shared, pinned=pinned, objective=False))


def _interchangeable(options: Sequence[Sequence[BlockChoice]], pinned: frozenset[int]) -> list[list[int]]:
    """The groups of two or more blocks that any choice may swap without changing its damage or costs: the
    same options (widths, costs and damage, in the same order), all pinned or none."""
    groups: dict[tuple, list[int]] = {}
    for b, opts in enumerate(options):
        signature = tuple(
            (x.kind, x.key, x.whole, x.params, x.active_params, x.nbytes, x.activations, x.damage,
             tuple(sorted(x.others.items())))
            for x in opts
        )  # fmt: skip
        groups.setdefault((b in pinned, signature), []).append(b)
    return [blocks for blocks in groups.values() if len(blocks) > 1]


class _Program:
    """The program's matrices, built once; `exclude` adds a diversity row after each solution."""

    def __init__(self, options, budget: Budget, base, limits: dict[str, int], shared, pinned) -> None:
        self.blocks = len(options)
        self.infeasible = False  # the fixed part alone exceeds a limit
        self.budget_rows: list[int] = []
        self.index = [(b, o) for b, opts in enumerate(options) for o in range(len(opts))]
        flat = [options[b][o] for b, o in self.index]
        n = len(flat)
        widths = sorted({(x.kind, x.key) for x in flat if x.kind in shared and not x.dropped})
        self.width_var = {w: n + 1 + i for i, w in enumerate(widths)}  # after the x's and a
        size = n + 1 + len(widths)
        self.size = size
        rows: list[tuple[np.ndarray, float, float]] = []

        def row() -> np.ndarray:
            return np.zeros(size)

        for b in range(self.blocks):  # one option per block
            r = row()
            r[[i for i, (bb, _) in enumerate(self.index) if bb == b]] = 1
            rows.append((r, 1, 1))
        allowance = n  # the variable a, in units of the memory cap (HiGHS drops coefficients below 1e-9)
        for term, cap in budget.additive_terms():  # one row per additive term set
            room = cap - share(base, term)
            if room < 0:
                self.infeasible = True
            scale = max(abs(cap), 1)  # rows in units of the cap keep HiGHS's tolerances meaningful
            r = row()
            r[:n] = [share(x, term) / scale for x in flat]
            if term.allowance:
                r[allowance] = 1
                for b in range(self.blocks):  # a >= the block's allowance
                    ra = row()
                    for i, (bb, _) in enumerate(self.index):
                        if bb == b:
                            ra[i] = flat[i].activations / scale
                    ra[allowance] = -1
                    rows.append((ra, -np.inf, 0))
            rows.append((r, -np.inf, room / scale))
            self.budget_rows.append(len(rows) - 1)
        for kind in (*DEPTH_KINDS, "total"):
            r = row()
            r[:n] = [x.dropped and (kind == "total" or x.kind == kind) for x in flat]
            if r.any():
                rows.append((r, -np.inf, limits[kind]))
        for (kind, key), var in self.width_var.items():
            for i, x in enumerate(flat):
                if x.kind == kind and not x.dropped and x.key == key:
                    r = row()
                    r[i], r[var] = 1, -1
                    rows.append((r, -np.inf, 0))
        for kind in shared:
            r = row()
            r[[var for (k, _), var in self.width_var.items() if k == kind]] = 1
            if r.any():
                rows.append((r, -np.inf, 1))
        position = {p: i for i, p in enumerate(self.index)}
        for blocks in _interchangeable(options, pinned):
            for b, later in itertools.pairwise(blocks):  # option numbers in order along the blocks
                r = row()
                for o in range(len(options[b])):
                    r[position[b, o]], r[position[later, o]] = o, -o
                rows.append((r, -np.inf, 0))
        self.rows = rows
        self.cost = np.zeros(size)
        self.cost[:n] = [x.damage for x in flat]
        self.upper = np.ones(size)
        self.upper[allowance] = np.inf
        for i, (b, _) in enumerate(self.index):
            if b in pinned and flat[i].dropped:
                self.upper[i] = 0
        self.integrality = np.ones(size)
        self.integrality[allowance] = 0

    def exclude(self, picked: list[tuple[int, int]], distance: int) -> None:
        r = np.zeros(self.size)
        r[[self.index.index(p) for p in picked]] = 1
        self.rows.append((r, -np.inf, self.blocks - distance))

    def solve(self, time_limit: float, margin: float = 0.0) -> list[tuple[int, int]] | None:
        from scipy.optimize import Bounds, LinearConstraint, milp  # imported here: the command line imports this module

        if self.infeasible:
            return None
        matrix = np.stack([r for r, _, _ in self.rows])
        upper = np.array([hi for _, _, hi in self.rows])
        upper[self.budget_rows] -= margin
        constraint = LinearConstraint(matrix, [lo for _, lo, _ in self.rows], upper)
        with silenced(1):  # HiGHS prints debugging lines to fd 1, into --json output
            result = milp(
                self.cost,
                integrality=self.integrality,
                bounds=Bounds(np.zeros(self.size), self.upper),
                constraints=constraint,
                options={"time_limit": time_limit},
            )
        if result.x is None or result.status not in (0, 1):  # 1: the time limit, with a feasible solution
            return None
        chosen = [self.index[i] for i in range(len(self.index)) if result.x[i] > 0.5]
        if len(chosen) != self.blocks or not all(math.isfinite(v) for v in result.x):
            return None
        return chosen
