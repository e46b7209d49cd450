"""Pluggable architecture-search strategies and their registry.

Built in: `minitron` (uniform widths and per-type depth, the k largest fitting candidates scored by a
cheap proxy) and `minipuzzle` (per-block choices from importance, a knapsack under the budget).
A strategy only proposes candidate architectures (`Strategy.propose`); checking them against the budget,
scoring and ranking is shared (`compressor.pipelines.ranking`). Third-party packages add their own by
subclassing `strategies.base.Strategy` and declaring it in the `compressor.strategies` entry-point group:

    [project.entry-points."compressor.strategies"]
    mine = "my_package.search:MyStrategy"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from compressor.errors import OptionError
from strategies.base import Strategy, build_options, option_fields

ENTRY_POINT_GROUP = "compressor.strategies"


def _builtin() -> dict[str, type[Strategy]]:
    from strategies.minipuzzle import MiniPuzzleStrategy
    from strategies.minitron import MinitronStrategy

    return {MinitronStrategy.name: MinitronStrategy, MiniPuzzleStrategy.name: MiniPuzzleStrategy}


def available() -> dict[str, type[Strategy]]:
    """Every strategy by name: the built-in ones, then those installed packages register (a plug-in that
    fails to load is left out; asking for it by name says why)."""
    found = _builtin()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            continue
        try:
            found[entry.name] = entry.load()
        except Exception as exc:  # a broken plug-in must not break the other commands
            _broken[entry.name] = f"{type(exc).__name__}: {exc}"
    return found


_broken: dict[str, str] = {}


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under `name`."""
    strategies = available()
    if name in _broken:
        raise OptionError("strategy", f"{name!r} is installed but failed to load ({_broken[name]})")
    if name not in strategies:
        raise OptionError("strategy", f"{name!r} is unknown: choose one of {', '.join(sorted(strategies))}")
    return strategies[name]


__all__ = ["Strategy", "available", "build_options", "get_strategy", "option_fields"]
