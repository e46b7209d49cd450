"""The exact solver (strategies/solver.py) against brute force on small random libraries."""

from __future__ import annotations

import itertools
import random

import pytest

from compressor.budget import Budget
from strategies import solver
from strategies.costs import BlockCost
from strategies.solver import BlockChoice

KINDS = ("mamba", "attention", "mlp")


def _library(seed: int, blocks: int = 6):
    """Random options per block: dropped (its damage, nothing to pay), whole, and one or two narrower widths
    (two width values shared by every block of a kind, so that shared-width constraints bite)."""
    rng = random.Random(seed)
    options = []
    for b in range(blocks):
        kind = KINDS[b % 3]
        drop = rng.uniform(0.5, 3.0)
        row = [BlockChoice(kind, None, False, 0, 0, 0, 0, drop)]
        for width, share in ((64, 1.0), (48, 0.75), (32, 0.5))[: rng.choice((2, 3))]:
            params = int(1000 * share * rng.uniform(0.8, 1.2))
            damage = 0.0 if share == 1 else drop * (1 - share) * rng.uniform(0.3, 1.5)
            activations = int(300 * share)
            row.append(BlockChoice(kind, {"width": width}, share == 1, params, params, 2 * params, activations, damage))
        options.append(row)
    return options


def _brute_force(options, budget, base, limits, shared, pinned, count):
    feasible = []
    for combo in itertools.product(*(range(len(o)) for o in options)):
        choice = [options[b][o] for b, o in enumerate(combo)]
        if any(choice[b].dropped for b in pinned):
            continue
        within = solver.within_depth_limits(choice, limits) and solver.shares_widths(choice, shared)
        if within and solver.fits(choice, budget, base):
            feasible.append((sum(x.damage for x in choice), combo))
    feasible.sort()
    return [d for d, _ in feasible[:count]]


@pytest.mark.parametrize("seed", range(12))
def test_solver_equals_brute_force(seed):
    rng = random.Random(100 + seed)
    options = _library(seed)
    base = BlockCost(500, 500, 1000, 0)
    full = sum(max(x.nbytes for x in o) for o in options)
    budget = Budget(memory=1000 + int(full * rng.uniform(0.45, 0.8)), params=500 + int(full / 2 * rng.uniform(0.5, 1)))
    limits = {"mamba": 1, "attention": 1, "mlp": rng.choice((0, 1, 2)), "moe": 0, "total": rng.choice((1, 2, 3))}
    shared = frozenset(rng.sample(KINDS, rng.choice((0, 1, 2))))
    pinned = frozenset(rng.sample(range(6), rng.choice((0, 1))))
    got = solver.solve(options, budget, base, limits, shared=shared, pinned=pinned, count=3)
    expected = _brute_force(options, budget, base, limits, shared, pinned, 3)
    assert [sum(x.damage for x in c) for c in got] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for choice in got:  # and each one is within every limit
        assert solver.fits(choice, budget, base) and solver.within_depth_limits(choice, limits)
        assert solver.shares_widths(choice, shared) and not any(choice[b].dropped for b in pinned)
    assert len({tuple(id(x) for x in c) for c in got}) == len(got)  # distinct
    assert solver.feasible(options, budget, base, limits, shared=shared, pinned=pinned) == bool(expected)


@pytest.mark.parametrize("seed", range(4))
def test_interchangeable_blocks_give_one_choice_per_permutation(seed):
    """Blocks with the same options (a config alone: a block's damage is its share) are searched once per
    permutation: the least damage is brute force's, and the next choices are the next-best multisets of
    options per group of equal blocks, not the best one moved to other equal blocks."""
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS[:2]) for _ in range(7)]
    template = {kind: _library(seed + 10 * i, 3)[KINDS.index(kind)] for i, kind in enumerate(KINDS[:2])}
    options = [list(template[kind]) for kind in kinds]
    pinned = frozenset({rng.randrange(7)})  # a pinned block is not interchangeable with the others
    base = BlockCost(500, 500, 1000, 0)
    full = sum(max(x.nbytes for x in o) for o in options)
    budget = Budget(memory=1000 + int(full * rng.uniform(0.5, 0.8)))
    limits = {"mamba": 2, "attention": 2, "mlp": 0, "moe": 0, "total": 3}
    got = solver.solve(options, budget, base, limits, pinned=pinned, count=4)

    def permutation(combo):  # the options each group of equal blocks takes, whatever the order
        return tuple(sorted((kinds[b], b in pinned, o) for b, o in enumerate(combo)))

    best: dict[tuple, float] = {}
    for combo in itertools.product(*(range(len(o)) for o in options)):
        choice = [options[b][o] for b, o in enumerate(combo)]
        if any(choice[b].dropped for b in pinned) or not solver.within_depth_limits(choice, limits):
            continue
        if solver.fits(choice, budget, base):
            best[permutation(combo)] = sum(x.damage for x in choice)
    expected = sorted(best.values())[:4]
    assert [sum(x.damage for x in c) for c in got] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    picked = [permutation([options[b].index(x) for b, x in enumerate(c)]) for c in got]
    assert len(set(picked)) == len(got)


def test_activation_allowance_is_the_widest_kept_block():
    """Memory counts the largest kept block's prefill allowance once: a choice whose blocks are small
    enough fits where the sum of allowances would not, and keeping the widest block costs its allowance."""
    wide = BlockChoice("mlp", {"width": 64}, True, 10, 10, 10, 100, 0.0)
    narrow = BlockChoice("mlp", {"width": 32}, False, 5, 5, 5, 10, 1.0)
    dropped = BlockChoice("mlp", None, False, 0, 0, 0, 0, 5.0)
    options = [[dropped, wide, narrow], [dropped, wide, narrow]]
    limits = {"mamba": 0, "attention": 0, "mlp": 2, "moe": 0, "total": 2}
    base = BlockCost(0, 0, 0, 0)
    # both wide: 20 bytes + 100 allowance = 120 fits a 120 budget (the allowance counted once, not 200)
    (choice,) = solver.solve(options, Budget(memory=120), base, limits)
    assert choice == [wide, wide]
    # at 119, one block must narrow: 15 bytes + 100 still fits with the other wide
    (choice,) = solver.solve(options, Budget(memory=119), base, limits)
    assert sorted(x.damage for x in choice) == [0.0, 1.0]
    # at 30, no wide block: two narrow ones (10 bytes + 10 allowance)
    (choice,) = solver.solve(options, Budget(memory=30), base, limits)
    assert choice == [narrow, narrow]


def test_nothing_fits():
    options = [[BlockChoice("mlp", {"width": 8}, True, 10, 10, 10, 0, 0.0)]]
    limits = {"mamba": 0, "attention": 0, "mlp": 0, "moe": 0, "total": 0}
    assert solver.solve(options, Budget(params=5), BlockCost(0, 0, 0, 0), limits) == []
    assert solver.solve(options, Budget(params=50), BlockCost(60, 0, 0, 0), limits) == []  # the fixed part alone
    assert not solver.feasible(options, Budget(params=5), BlockCost(0, 0, 0, 0), limits)
    assert solver.feasible(options, Budget(params=10), BlockCost(0, 0, 0, 0), limits)
