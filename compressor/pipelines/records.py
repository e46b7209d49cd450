"""What the pipelines write down: typed records with one JSON round trip each.

- `Candidate`: one proposed architecture with its costs and, once measured, its zero-shot score and (in a
  search) its result after the short distillation;
- `CompressionRecord`: `compression.json` next to a pruned checkpoint (how it was chosen);
- `SearchRecord`: `search.json` of a search folder (every candidate, the ranking, the Pareto fronts).

`to_dict` gives the JSON form, `from_dict` reads it back; both keep every field, so a record written and
read again is equal to the original (tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.budget import Budget
from compressor.config import HybridConfig
from compressor.errors import CompressorError
from compressor.importance import Importance
from compressor.prune import kept_attention_heads
from compressor.target import Target
from strategies.export_config import export_config

COMPRESSION_FILE = "compression.json"  # a CompressionRecord, next to the pruned checkpoint


@dataclass
class Distilled:
    """A finalist after the search's short distillation (validation on the run's held-out split)."""

    val_loss: float
    val_ppl: float
    val_kl: float
    val_top1_agreement: float
    retrieval: dict[str, Any] | None = None  # TaskResult.to_dict of the distilled model (with a probe)

    def metric(self, rank_by: str) -> float:
        """Lower is better: the validation KL or loss, or (`retrieval`) the probe's error rate, 1 - accuracy."""
        if rank_by == "retrieval":
            return retrieval_error(self.retrieval)
        return self.val_kl if rank_by == "kl" else self.val_loss


@dataclass
class Candidate:
    """A proposed architecture: the target, what the budget model says of it, and its scores."""

    target: Target
    label: str  # what it changes, e.g. "hidden 4480, ffn 15680, -2*"
    pattern: str
    params: int
    memory_bytes: int | None  # at the budget's context and batch (None without a memory budget)
    speedup: float | None  # tokens/s over the source's (None without a GPU)
    architecture: dict[str, Any]  # Target.summary: the export_config keys, kept blocks, uniform
    score: float | None = None  # the zero-shot proxy (KL to the source or LM loss), lower is better
    index: int = 0  # position in its record
    finalist: bool = False  # search: put through the short distillation
    distilled: Distilled | None = None
    active_params: int | None = None  # parameters a token uses (differs from params with MoE blocks)
    retrieval: dict[str, Any] | None = None  # TaskResult.to_dict of the pruned model (with a retrieval probe)

    def quality(self, rank_by: str) -> float:
        """Lower is better: `Distilled.metric` after the short distillation, else the zero-shot measure
        (the proxy score, or the pruned model's retrieval error when ranking by retrieval)."""
        if self.distilled is not None:
            return self.distilled.metric(rank_by)
        if rank_by == "retrieval":
            return retrieval_error(self.retrieval)
        return self.score if self.score is not None else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["target"] = self.target.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Candidate:
        raw = dict(raw)
        raw["target"] = Target.from_dict(raw["target"])
        if raw.get("distilled") is not None:
            raw["distilled"] = Distilled(**raw["distilled"])
        return cls(**raw)


@dataclass
class SourceInfo:
    """The checkpoint a record was made from."""

    path: str
    fingerprint: str
    params: int


@dataclass
class CompressionRecord:
    """`compression.json`: how a pruned checkpoint was chosen. `candidates` are best first; the first is
    the one written."""

    source: SourceInfo
    budget: Budget | None
    strategy: str
    strategy_options: dict[str, Any]
    score_metric: str | None  # kl | loss | (kl+|loss+)retrieval; None when nothing was scored
    importance: dict[str, Any]  # the folder it came from (None: computed) and how it was computed
    candidates: list[Candidate]
    export_config: dict[str, int] | None  # the chosen shape in ModelOpt's keys (uniform models only)
    seconds: float = 0.0
    retrieval: dict[str, Any] | None = None  # the probe, its weight in the score and the source's result
    attention_heads: dict[str, list[int]] = field(default_factory=dict)  # `prune.kept_attention_heads`

    @classmethod
    def of(
        cls,
        source: SourceInfo,
        architecture: HybridConfig,
        importance: Importance,
        importance_dir: str | Path | None,
        candidates: list[Candidate],
        **fields: Any,
    ) -> CompressionRecord:
        """The record of `candidates` (best first) pruned from a source of `architecture` with `importance`
        (read from `importance_dir`, or computed: None): the chosen shape in ModelOpt's keys when it is
        uniform, and the heads each kept attention block keeps. `fields`: budget, strategy,
        strategy_options, score_metric, retrieval, seconds."""
        target = candidates[0].target
        chosen = target.config(architecture)
        return cls(
            source=source,
            importance={"folder": str(importance_dir) if importance_dir else None, **importance.meta},
            candidates=candidates,
            export_config=export_config(chosen) if chosen.is_uniform else None,
            attention_heads=kept_attention_heads(importance, target, architecture),
            **fields,
        )

    @property
    def chosen(self) -> Candidate:
        return self.candidates[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": dataclasses.asdict(self.source),
            "budget": self.budget.to_dict() if self.budget is not None else None,
            "strategy": self.strategy,
            "strategy_options": self.strategy_options,
            "score_metric": self.score_metric,
            "importance": self.importance,
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": self.chosen.to_dict(),
            "export_config": self.export_config,
            "seconds": self.seconds,
            "retrieval": self.retrieval,
            "attention_heads": self.attention_heads,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CompressionRecord:
        raw = {k: v for k, v in raw.items() if k != "chosen"}
        raw["source"] = SourceInfo(**raw["source"])
        raw["budget"] = Budget.from_dict(raw["budget"]) if raw["budget"] is not None else None
        raw["candidates"] = [Candidate.from_dict(c) for c in raw["candidates"]]
        return cls(**raw)


@dataclass
class SearchRecord:
    """`search.json`: a search in progress or finished. `calibration` and `distill` hold what is needed to
    resume it (the calibration and the short-distillation template, as dicts)."""

    source: SourceInfo
    budget: Budget
    strategy: str
    strategy_options: dict[str, Any]
    calibration: dict[str, Any]
    distill: dict[str, Any]
    rank_by: str
    candidates: list[Candidate]
    data_fingerprint: str = ""  # of the calibration / distillation sequences (`TokenSequences.fingerprint`)
    score_metric: str = "kl"  # the zero-shot proxy (`ranking.SCORE_METRICS`)
    retrieval: dict[str, Any] | None = None  # the probe, its weight and the source's result (`retrieval_record`)
    ranking: list[int] = field(default_factory=list)  # finished finalists, best first
    pareto: dict[str, list[int]] = field(default_factory=dict)
    bld: dict[str, Any] | None = None  # the blockwise-distilled library's settings (`bld.BLDConfig`), if one
    library: dict[str, Any] | None = None  # what the library holds: variants, errors, the assembled scores
    share_teacher: bool = False  # the finalists distil from one teacher cache (written once)
    # rank correlation of the score that picked the finalists with their result after distillation
    correlation: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by stage (library, scoring, teacher, ...)

    def candidate(self, index: int) -> Candidate:
        for candidate in self.candidates:
            if candidate.index == index:
                return candidate
        raise CompressorError(f"the search has no candidate {index}: choose one of 0..{len(self.candidates) - 1}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["source"] = dataclasses.asdict(self.source)
        out["budget"] = self.budget.to_dict()
        out["candidates"] = [c.to_dict() for c in self.candidates]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchRecord:
        raw = dict(raw)
        raw["source"] = SourceInfo(**raw["source"])
        raw["budget"] = Budget.from_dict(raw["budget"])
        raw["candidates"] = [Candidate.from_dict(c) for c in raw["candidates"]]
        record = cls(**raw)
        record.check_indices()
        return record

    def check_indices(self) -> None:
        """A candidate's index names its folder (`candidates/<index>`) and the ranking and the fronts name
        candidates: each index a distinct whole number >= 0, each ranked or Pareto index a candidate's."""
        indices = [c.index for c in self.candidates]
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise CompressorError(f"candidate index {index!r} is not a whole number >= 0")
        if len(set(indices)) != len(indices):
            raise CompressorError("two candidates have the same index")
        known, named = set(indices), [*self.ranking, *(i for front in self.pareto.values() for i in front)]
        unknown = sorted({i for i in named if i not in known}, key=repr)
        if unknown:
            raise CompressorError(f"the ranking or the Pareto fronts name no candidate's index {unknown[0]!r}")


def retrieval_error(result: dict[str, Any] | None) -> float:
    """1 - accuracy of a TaskResult dict; 1.0 where nothing was measured."""
    return 1.0 - result["accuracy"] if result is not None else 1.0


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file whole or not at all (a temporary sibling renamed over it; a file or link already
    at the temporary name is removed first, never written through)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "x") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
