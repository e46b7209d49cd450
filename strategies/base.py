"""The interface every architecture-search strategy implements.

A strategy receives the source architecture, its importance scores, a budget and a scorer, and proposes
candidate architectures that meet the budget, best first. It decides which architectures to consider
and how to rank them; the scorer is the expensive part it spends wisely (Minitron: a cheap proxy on the
k largest fitting candidates; MiniPuzzle: short distillation of a few).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from compressor.budget import Budget
from compressor.config import HybridConfig
from compressor.importance import Importance
from compressor.prune import Target


class Scorer(Protocol):
    """Quality proxy of a pruned architecture: lower is better (KL to the original model, or LM loss)."""

    name: str

    def __call__(self, target: Target) -> float: ...


@dataclass
class Candidate:
    """A proposed architecture with what the budget model says of it and, once scored, its score."""

    target: Target
    config: HybridConfig
    params: int
    memory: int | None = None  # bytes at the budget's context and batch
    speedup: float | None = None  # tokens/s relative to the source model
    score: float | None = None  # the scorer's value, lower is better
    label: str = ""  # short description, e.g. "hidden 4480, ffn 15680, -2 attention"

    def to_dict(self, source: HybridConfig) -> dict[str, Any]:
        return {
            "label": self.label,
            "params": self.params,
            "memory_bytes": self.memory,
            "speedup": self.speedup,
            "score": self.score,
            "pattern": self.config.pattern,
            "architecture": self.target.summary(source),
        }


class Strategy(ABC):
    """Subclass, give it a `name`, and register it (built in, or through the `compressor.strategies`
    entry-point group of your package) to make it available as `--strategy NAME`."""

    name: ClassVar[str]

    @abstractmethod
    def search(
        self,
        source: HybridConfig,
        importance: Importance,
        budget: Budget,
        scorer: Scorer | None,
        *,
        on_progress: Callable[[str], None] | None = None,
    ) -> list[Candidate]:
        """Candidates that meet `budget`, best first; scored with `scorer` when one is given."""
