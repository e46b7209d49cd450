"""The dry runs (`--dry-run` of importance, prune, search, distill and train): what a run would hold in
memory per process, stage by stage, from a config alone (a checkpoint folder, a config.json or a preset:
nothing is loaded but the config).

Each stage's `planning.MemoryPlan` is taken at `nproc` processes (default: the fewest that fit the memory
there is: a GPU's, less its reserve, or the local device's free memory). Prune and search also list the
candidates that meet the budget (`plan`: the strategy's search on a config alone, no weights, no scores) and
plan the stages of the compression: importance (unless reused), the blockwise-distilled library (`bld`),
scoring the largest candidate and a finalist's distillation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from compressor import planning
from compressor.budget import Budget, GPUSpec, get_gpu
from compressor.config import HybridConfig
from compressor.errors import OptionError
from compressor.pipelines.ranking import rank
from compressor.pipelines.records import Candidate
from compressor.presets import load_config_or_preset
from strategies import Strategy
from strategies.export_config import modelopt_problems


class Choosing(Protocol):
    """What `plan` needs of a PruneConfig or a search's SearchConfig: the budget and the strategy."""

    budget: Budget | None

    def build_strategy(self) -> Strategy: ...


def modelopt_warning(candidates: list[Candidate], source: HybridConfig, strategy: Strategy) -> str | None:
    """A line naming the uniform candidates whose export_config ModelOpt's mcore_minitron would refuse, or None."""
    outside = [c for c in candidates if c.target.config(source).is_uniform]
    outside = [c for c in outside if modelopt_problems(source, c.target.config(source))]
    if not outside:
        return None
    first = modelopt_problems(source, outside[0].target.config(source))[0]
    advice = ""
    if hasattr(strategy.options, "modelopt_compatible"):
        advice = f"; the {strategy.name} option modelopt_compatible=true keeps to its search space"
    return (
        f"{len(outside)} of {len(candidates)} candidates have shapes ModelOpt's mcore_minitron cannot express "
        f"(#{outside[0].index}: {first}): ModelOpt refuses their export_config{advice}"
    )


@dataclass
class Plan:
    """A dry run: the candidates a strategy would consider on a config alone, costed, not scored."""

    strategy: str
    candidates: list[Candidate]
    stats: dict[str, int]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "stats": self.stats,
            "seconds": self.seconds,
            "candidates": [c.to_dict() for c in self.candidates],
            "warnings": self.warnings,
        }


def plan(source: HybridConfig, config: Choosing) -> Plan:
    """What `pruning.prune_to_budget` (or a search) would consider for an architecture with no weights (the
    importance prior: the last blocks of each kind go first), limited to the strategy's `top_k`. Raises
    when nothing meets the budget, before anything is loaded."""
    started = time.perf_counter()
    strategy = config.build_strategy()
    proposals = strategy.propose(source, None, config.budget)
    candidates = rank(proposals, source, config.budget, limit=strategy.top_k, smallest=strategy.smallest(source))
    warnings = [w for w in [modelopt_warning(candidates, source, strategy)] if w]
    return Plan(strategy.name, candidates, strategy.stats, time.perf_counter() - started, warnings)


@dataclass(frozen=True)
class CompressionStages:
    """The sizes of a compression's stages: sequences, scoring batches, and which stages run."""

    seq_len: int
    batch_size: int
    score_samples: int
    importance: bool  # estimated (not reused from a folder)
    dtype: str | None = None  # the weights' (default: the checkpoint's, else bf16)
    distill: Any = None  # a finalist's distillation, a train.TrainConfig
    bld: Any = None  # the blockwise-distilled library, a bld.BLDConfig


@dataclass
class StagePlan:
    """One stage's plan at `nproc` processes, against `memory` bytes (None: unknown) of `device`."""

    plan: planning.MemoryPlan
    nproc: int
    memory: int | None
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(self.nproc, self.memory), "device": self.device}


@dataclass
class MemoryPreview:
    """Every stage's plan, and the GPU they are planned for (None: the local device)."""

    stages: list[StagePlan]
    gpu: GPUSpec | None

    def to_dict(self) -> list[dict[str, Any]]:
        return [stage.to_dict() for stage in self.stages]


@dataclass
class CompressionPreview:
    """A prune's or search's dry run: the candidates that fit and the memory of each stage."""

    candidates: Plan
    memory: MemoryPreview

    def to_dict(self) -> dict[str, Any]:
        return {**self.candidates.to_dict(), "memory_plans": self.memory.to_dict()}


def plan_gpu(name: str | None) -> GPUSpec | None:
    """The GPU a dry run plans for, by name (None: the local device)."""
    return get_gpu(name) if name is not None else None


def plan_memory(
    plans: list[planning.MemoryPlan], *, nproc: int | None = None, gpu: GPUSpec | None = None, device: str = "auto"
) -> MemoryPreview:
    """Each plan at `nproc` processes (default: the fewest that fit `gpu`'s memory, else the local device's
    free memory; 1 when that is unknown or nothing fits)."""
    from compressor.distributed import resolve_device

    if nproc is not None and nproc < 1:
        raise OptionError("nproc", f"must be at least 1, got {nproc}")
    memory = planning.device_memory(gpu, resolve_device(device) if gpu is None else "cpu")
    label = gpu.name if gpu is not None else str(resolve_device(device))
    stages = []
    for plan in plans:
        count = nproc or (plan.smallest_nproc(memory) if memory is not None else None) or 1
        stages.append(StagePlan(plan, count, memory, label))
    return MemoryPreview(stages, gpu)


def preview_importance(
    model: str | Path,
    *,
    seq_len: int,
    batch_size: int,
    drop_one: bool,
    dtype: str | None = None,
    nproc: int | None = None,
    gpu: str | None = None,
    device: str = "auto",
) -> MemoryPreview:
    """`compress importance --dry-run`: the memory of scoring `model` (with a drop-one pass)."""
    arch, _ = load_config_or_preset(model)
    weights = planning.plan_dtype(arch, dtype)
    plan = planning.importance_plan(arch, seq_len=seq_len, batch_size=batch_size, dtype=weights, drop_one=drop_one)
    return plan_memory([plan], nproc=nproc, gpu=plan_gpu(gpu), device=device)


def preview_training(config, *, nproc: int | None = None, gpu: str | None = None) -> MemoryPreview:
    """`compress distill/train --dry-run`: the memory of training `config` (a train.TrainConfig) on `gpu`
    (else on its device)."""
    from compressor.distributed import resolve_device

    spec = plan_gpu(gpu)
    device = "cuda" if spec is not None else resolve_device(config.device)
    student, _ = load_config_or_preset(config.student)
    teacher = load_config_or_preset(config.teacher)[0] if config.teacher is not None else None
    plan = planning.training_plan(config, student, teacher, device)
    return plan_memory([plan], nproc=nproc, gpu=spec, device=config.device)


def preview_compression(
    model: str | Path,
    config: Choosing,  # a PruneConfig, or a search's
    stages: CompressionStages,
    *,
    nproc: int | None = None,
    device: str = "auto",
) -> CompressionPreview:
    """`compress prune/search --dry-run`: the candidates that meet `config`'s budget and the memory of each
    stage, planned for the budget's GPU."""
    arch, _ = load_config_or_preset(model)
    result = plan(arch, config)
    plans = compression_plans(
        arch, result.candidates, seq_len=stages.seq_len, batch_size=stages.batch_size,
        score_samples=stages.score_samples, importance=stages.importance, dtype=stages.dtype,
        distill=stages.distill, bld=stages.bld,
    )  # fmt: skip
    gpu = config.budget.gpu if config.budget is not None else None
    return CompressionPreview(result, plan_memory(plans, nproc=nproc, gpu=gpu, device=device))


def compression_plans(
    arch, candidates, *, seq_len, batch_size, score_samples, importance, dtype, distill=None, bld=None
) -> list[planning.MemoryPlan]:
    """The memory plans of a compression on `arch`: importance (unless reused), the blockwise-distilled
    library (`bld`, a BLDConfig), scoring the candidates (the largest of them) on the held-out batches, and a
    finalist's distillation (`distill`, a TrainConfig)."""
    weights = planning.plan_dtype(arch, dtype)
    largest = max(candidates, key=lambda c: c.params).target.config(arch)
    batches = -(-score_samples // batch_size)
    plans = (
        [planning.importance_plan(arch, seq_len=seq_len, batch_size=batch_size, dtype=weights)] if importance else []
    )
    if bld is not None:
        plans.append(planning.library_plan(arch, tokens=bld.tokens, seq_len=seq_len, dtype=weights, stream=bld.stream,
                                           micro_batch_size=bld.micro_batch_size, epochs=bld.epochs))  # fmt: skip
    plans.append(planning.scoring_plan(arch, largest, seq_len=seq_len, batch_size=batch_size, batches=max(batches, 1),
                                       dtype=weights))  # fmt: skip
    if distill is not None:
        plans.append(planning.training_plan(distill, largest, arch, "cuda"))
    return plans
