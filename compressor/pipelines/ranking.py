"""From a strategy's proposals to ranked candidates: the one loop every strategy shares.

`rank` walks the proposals in the strategy's order, checks each exactly against the budget (memory,
parameters, throughput), costs it, keeps the first `limit` that fit, scores them with a proxy when one is
given and sorts them, lowest score first. `ProxyScorer` is the proxy: KL(source || pruned) or the pruned
model's LM loss on the source's held-out batches; under several processes the source and each candidate
are sharded and the batches split among them. `proxy_scorer` builds it on a calibrated `Source`;
`retrieval_record` is what a record says of its retrieval probe.

Retrieval in the score (`kl+retrieval`, `loss+retrieval`, `retrieval`): with the source's retrieval probe
(`compressor.tasks`), a candidate's score gains `retrieval_weight` x the answer log-likelihood it loses
against the source (nats per answer token), so of two candidates equally close to the source on text, the
one that keeps the blocks carrying retrieval ranks first. Whenever the source has a probe, every scored
candidate's retrieval result is recorded, whatever the score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from compressor import distributed
from compressor.budget import Budget, active_parameters, format_bytes, num_parameters
from compressor.config import HybridConfig
from compressor.errors import BudgetError, CompressorError, OptionError
from compressor.evaluate import batch_stats, reduce_stats, teacher_targets
from compressor.importance import Importance
from compressor.losses import LossStats
from compressor.model import HybridLM
from compressor.pipelines.records import Candidate
from compressor.pipelines.source import Source
from compressor.prune import prune
from compressor.target import Target
from compressor.tasks import TaskResult, TaskScorer

SCORE_METRICS = ("kl", "loss", "retrieval", "kl+retrieval", "loss+retrieval")


def check_scoring(metric: str, retrieval_weight: float = 1.0, score_samples: int | None = None) -> None:
    """Refuse, before any work, a proxy score that cannot be measured as asked: an unknown `metric`, a
    `retrieval_weight` that is not a finite number >= 0 or, other than the default 1 or 0 (none), that the
    metric has no retrieval term to weigh (kl+retrieval and loss+retrieval have one), or no held-out
    sequences (`score_samples`, when known) for a metric measured on them."""
    if metric not in SCORE_METRICS:
        raise OptionError("score", f"{metric!r} is not one of {', '.join(SCORE_METRICS)}")
    if not math.isfinite(retrieval_weight) or retrieval_weight < 0:
        raise OptionError("retrieval_weight", f"must be a finite number >= 0, got {retrieval_weight}")
    if retrieval_weight not in (0.0, 1.0) and not metric.endswith("+retrieval"):  # records write 0 for "none"
        raise OptionError(
            "retrieval_weight", f"weighs the retrieval term of kl+retrieval or loss+retrieval; score {metric} has none"
        )
    if score_samples is not None and score_samples < 1 and metric != "retrieval":
        raise OptionError("score_samples", f"must be at least 1: the {metric} score is measured on held-out sequences")


@dataclass(frozen=True)
class ScoreSpec:
    """A proxy score as `--score` names it, checked (`check_scoring`) and taken apart once: its text term
    (`text`: "kl" or "loss" on the held-out sequences, or None) and whether the retrieval probe's term is in
    it (`retrieval`), counted `weight` times (`retrieval_weight` beside a text term, 1 alone)."""

    metric: str = "kl"
    retrieval_weight: float = 1.0

    def __post_init__(self) -> None:
        check_scoring(self.metric, self.retrieval_weight)

    @property
    def text(self) -> str | None:
        return self.metric.removesuffix("retrieval").removesuffix("+") or None

    @property
    def retrieval(self) -> bool:
        return self.metric.endswith("retrieval")

    @property
    def weight(self) -> float:
        """The retrieval term's weight in the score (0 when the score has none)."""
        if not self.retrieval:
            return 0.0
        return self.retrieval_weight if self.text else 1.0


@dataclass(frozen=True)
class Score:
    """A candidate's proxy score (lower is better) and, when measured, its retrieval result."""

    value: float
    retrieval: TaskResult | None = None


class ProxyScorer:
    """KL(source || pruned) or the pruned model's LM loss on held-out batches, plus the retrieval term when
    the metric names it (module docstring); lower is better. The source model's final hidden states are
    computed once per batch and reused for every candidate.

    With a `world` of several processes the source is sharded across them (`calibrate` loads it so), each
    candidate is pruned sharded, each process scores its share of the batches and the sums are reduced:
    every process returns the same score, that of one process."""

    def __init__(
        self,
        model: HybridLM,
        importance: Importance,
        batches: list[torch.Tensor],
        metric: str = "kl",
        *,
        world: distributed.World | None = None,
        retrieval: TaskScorer | None = None,
        retrieval_weight: float = 1.0,
    ):
        # a weight the metric has no term for is left to the configs to refuse (PruneConfig, SearchConfig)
        self.spec = ScoreSpec(metric, retrieval_weight if metric.endswith("+retrieval") else 1.0)
        if self.spec.text and not batches:
            raise OptionError("score_samples", "must be at least 1 to score candidates on held-out sequences")
        if self.spec.retrieval and retrieval is None:
            raise OptionError("score", f"{metric} needs a retrieval task (--retrieval-task)")
        self.metric, self.model, self.importance = metric, model, importance
        self.retrieval, self.retrieval_weight = retrieval, retrieval_weight
        self.world = world or distributed.World(device=model.lm_head.weight.device)
        self.batches = distributed.share(batches, self.world) if self.spec.text else []
        self.references = None
        if self.spec.text == "kl":
            self.references = [self._reference(ids) for ids in self.batches]
        self.source_retrieval = retrieval.result(model) if retrieval is not None else None

    def _reference(self, ids: torch.Tensor | None):
        if ids is None:
            return distributed.idle_pass(self.model, self.world)
        return teacher_targets(self.model, ids)

    def __call__(self, target: Target) -> Score:
        return self.score_model(prune(self.model, self.importance, target, world=self.world).eval())

    def score_model(self, pruned: HybridLM) -> Score:
        """The score of a model built otherwise (e.g. assembled from a blockwise-distilled library)."""
        value = 0.0
        if self.spec.text:
            stats = LossStats()
            for i, ids in enumerate(self.batches):
                if ids is None:
                    distributed.idle_pass(pruned, self.world)
                    continue
                batch_stats(pruned, ids, stats, teacher=self.references[i] if self.references else None)
            stats = reduce_stats(stats, self.world)
            if self.spec.text == "kl":
                value = float(stats.divergence) / stats.tokens
            else:
                value = float(stats.cross_entropy) / stats.label_tokens
        retrieval = self.retrieval.result(pruned) if self.retrieval is not None else None
        if self.spec.retrieval:
            loss = max(0.0, self.source_retrieval.log_likelihood - retrieval.log_likelihood)
            value += self.spec.weight * loss
        return Score(value, retrieval)


def proxy_scorer(source: Source, metric: str, retrieval_weight: float = 1.0) -> ProxyScorer:
    """The candidates' proxy on the source's held-out batches and, with a probe, its retrieval task."""
    return ProxyScorer(
        source.model,
        source.importance,
        source.held_out,
        metric,
        world=source.world,
        retrieval=source.retrieval,
        retrieval_weight=retrieval_weight,
    )


def retrieval_record(scorer: ProxyScorer | None, weight: float) -> dict[str, Any] | None:
    """What a record says of the retrieval probe: the task, its weight in the score, the source's result."""
    if scorer is None or scorer.retrieval is None:
        return None
    examples = scorer.retrieval.examples
    return {
        "task": examples.task,
        "context": examples.context,
        "queries": examples.num_queries,
        "weight": weight if scorer.spec.retrieval else 0.0,
        "source": scorer.source_retrieval.to_dict(),
    }


def candidate(source: HybridConfig, target: Target, budget: Budget | None, index: int = 0) -> Candidate:
    """A target with what the budget model says of it."""
    config = target.config(source)
    memory = budget.memory_of(config).total if budget is not None and budget.memory is not None else None
    return Candidate(
        target=target,
        label=target.describe(source),
        pattern=config.pattern,
        params=num_parameters(config),
        memory_bytes=memory,
        speedup=budget.speedup_of(config, source) if budget is not None else None,
        architecture=target.summary(source),
        index=index,
        active_params=active_parameters(config),
    )


def rank(
    proposals: Iterable[Target],
    source: HybridConfig,
    budget: Budget | None,
    *,
    limit: int,
    scorer: Callable[[Target], Score | float] | None = None,
    smallest: HybridConfig | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Candidate]:
    """The first `limit` proposals that meet `budget` (all of them without one), scored and sorted by
    `scorer` when given (lowest first), else in the strategy's order. Raises BudgetError when none fits,
    naming the footprint of `smallest` (the smallest architecture the strategy reaches) when known."""
    say = say or (lambda text: None)
    fitting: list[Candidate] = []
    seen: set[Target] = set()
    for target in proposals:
        if target in seen:
            continue
        seen.add(target)
        if budget is not None and budget.violations(target.config(source), source):
            continue
        fitting.append(candidate(source, target, budget))
        if len(fitting) == limit:
            break
    if not fitting:
        raise BudgetError(_nothing_fits(budget, smallest))
    if scorer is not None:
        for i, c in enumerate(fitting, start=1):
            say(f"scoring {i}/{len(fitting)}: {c.label}")
            scored = scorer(c.target)
            c.score = scored.value if isinstance(scored, Score) else scored
            if isinstance(scored, Score) and scored.retrieval is not None:
                c.retrieval = scored.retrieval.to_dict()
        if not any(math.isfinite(c.score) for c in fitting):
            raise CompressorError(
                "every candidate scored NaN or infinity: the source model's outputs are not finite (check its "
                "weights with `compress eval`)"
            )
        fitting.sort(key=lambda c: c.score if math.isfinite(c.score) else math.inf)
    for index, c in enumerate(fitting):
        c.index = index
    return fitting


def _nothing_fits(budget: Budget | None, smallest: HybridConfig | None) -> str:
    message = f"no candidate meets the budget ({budget.describe() if budget else 'none'})"
    if smallest is None:
        return f"{message}: loosen the budget or the strategy's pruning limits"
    memory = f"needs {format_bytes(budget.memory_of(smallest).total)} and " if budget is not None else ""
    return (
        f"{message}; the smallest architecture within the pruning limits {memory}has "
        f"{num_parameters(smallest):,} parameters: loosen the budget, prune more axes (--axes, e.g. "
        "hidden,ffn,mamba_heads,mamba_head_dim,depth) or raise --max-width-pruning / --max-depth-pruning"
    )
