"""Pluggable architecture-search strategies and their registry.

Built in: `minitron` (uniform widths and per-type depth, the k largest fitting candidates scored by a
cheap proxy) and `minipuzzle` (per-block choices from importance, a knapsack under the budget).
Third-party packages add their own by subclassing `strategies.base.Strategy` and declaring it in the
`compressor.strategies` entry-point group:

    [project.entry-points."compressor.strategies"]
    mine = "my_package.search:MyStrategy"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from compressor.errors import CompressorError
from strategies.base import Candidate, Scorer, Strategy

ENTRY_POINT_GROUP = "compressor.strategies"


def _builtin() -> dict[str, type[Strategy]]:
    from strategies.minipuzzle import MiniPuzzleStrategy
    from strategies.minitron import MinitronStrategy

    return {MinitronStrategy.name: MinitronStrategy, MiniPuzzleStrategy.name: MiniPuzzleStrategy}


def available() -> dict[str, type[Strategy]]:
    """Every strategy by name: the built-in ones, then those installed packages register."""
    found = _builtin()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry.load())
    return found


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under `name`."""
    strategies = available()
    if name not in strategies:
        raise CompressorError(f"unknown strategy {name!r}: choose one of {', '.join(sorted(strategies))}")
    return strategies[name]


__all__ = ["Candidate", "Scorer", "Strategy", "available", "get_strategy"]
