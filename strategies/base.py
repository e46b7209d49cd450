"""The interface every architecture-search strategy implements: it proposes, nothing else.

A strategy turns a source architecture, its importance scores (None for a look at a config alone) and a
budget into candidate `Target`s, most promising first. What follows is the same for every strategy and
lives in the pipeline layer (`compressor.pipelines.ranking.rank`): the exact budget check, the costs,
scoring the first `top_k` that fit with a proxy, sorting.

Each strategy declares its options as a frozen dataclass (`Options`); a field's `metadata["help"]`
documents it. The command line offers one flag per field of every registered strategy, so a plug-in's
options appear in `compress prune --help` without touching the CLI; `build_options` turns the flags'
text into the dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from compressor.budget import Budget
from compressor.config import HybridConfig
from compressor.errors import OptionError
from compressor.target import Target

if TYPE_CHECKING:
    from compressor.importance import Importance

DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class NoOptions:
    """A strategy without options."""


class Strategy(ABC):
    """Subclass, give it a `name` (and an `Options` dataclass), implement `propose`, and register it (built
    in, or through the `compressor.strategies` entry-point group of your package) to make it available as
    `--strategy NAME`."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        # counts the last proposal found worth reporting, e.g. {"grid_points": 44370}; shown by dry runs
        self.stats: dict[str, int] = {}

    @abstractmethod
    def propose(self, source: HybridConfig, importance: Importance | None, budget: Budget | None) -> Iterable[Target]:
        """Candidate architectures, most promising first. They should meet `budget` (the caller checks
        every one exactly and skips those that do not). `importance` is None for a config-only look."""

    @property
    def top_k(self) -> int:
        """How many fitting candidates to score (and to list in a dry run)."""
        return getattr(self.options, "top_k", DEFAULT_TOP_K)

    def smallest(self, source: HybridConfig) -> HybridConfig | None:
        """The smallest architecture this strategy can reach from `source` within its limits (for the
        message when nothing fits), or None if it cannot say."""
        return None


# ----- options from text ----------------------------------------------------------------------------------
def option_fields(options_cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{field name: (resolved type, field)} of a strategy's Options dataclass."""
    hints = typing.get_type_hints(options_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(options_cls)}


def build_options(strategy: type[Strategy], values: dict[str, Any]) -> Any:
    """The strategy's Options with `values` set, each given as text ('0.4', 'hidden,ffn', '1,0.75,0.5') or
    already typed; unknown names and unreadable values raise an OptionError naming the option."""
    fields = option_fields(strategy.Options)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise OptionError(unknown[0], f"is not an option of the {strategy.name} strategy (its options: {known})")
    typed = {name: _convert(name, value, fields[name][0]) for name, value in values.items()}
    return strategy.Options(**typed)


def options_to_dict(options: Any) -> dict[str, Any]:
    """The options in JSON terms (tuples as lists); `build_options` reads them back."""
    return json.loads(json.dumps(dataclasses.asdict(options)))


def _convert(name: str, value: Any, kind: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    if not isinstance(value, str):
        return value
    text = value.strip()
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        if text.lower() in ("none", ""):
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return tuple(_convert(name, part, args[0]) for part in text.split(",") if part.strip())
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError(text)
            return number
    except ValueError:
        raise OptionError(name, f"takes a {kind.__name__}, got {value!r}") from None
    return text


def value_syntax(kind: Any) -> str:
    """How `build_options` reads a value of this field type, for a flag's help: 'true|false', 'int',
    'float,...' (a comma list); `X | None` reads as X (or 'none')."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        return f"{value_syntax(typing.get_args(kind)[0])},..."
    if kind is bool:
        return "true|false"
    return getattr(kind, "__name__", "str")


def describe_stats(stats: dict[str, int | str]) -> str:
    """A strategy's `stats` for a progress line: '12 proposed, servable vllm'."""
    return ", ".join(
        f"{value:,} {name.replace('_', ' ')}" if isinstance(value, int) else f"{name.replace('_', ' ')} {value}"
        for name, value in stats.items()
    )
