"""`compress search`: candidates ranked after a short distillation (Nemotron-H's MiniPuzzle procedure).

1. propose and score: the strategy's candidates that meet the budget, scored zero-shot (`score`: KL to the
   source on held-out calibration sequences, or loss, with or without the retrieval probe's term; see
   `ranking`); the best `finalists` are marked. The folder (`search.json`, the
   importance scores) is built aside and renamed into place only once this step has succeeded;
2. distill: each finalist is pruned from the in-memory source (with the `compression.json` `compress prune`
   would write, so `attention_loss` pairs its attention blocks with the source's) and distilled from it for
   the same token budget, data, seed and schedule (`SearchConfig.distill`, a `TrainConfig` template),
   checkpointing as any distillation run does; its validation result (and, with a retrieval probe, its
   retrieval) is written as it finishes;
3. rank: finished finalists by validation KL, loss, or the retrieval probe's accuracy (`rank_by`; ties go
   to the lower KL), the Pareto fronts of quality against memory (and speedup when a GPU was given),
   `pareto.json`. The figure, `pareto.png` (`PLOT_FILE`), is the command line's: it draws it from the
   returned record (`plots.plot_pareto`).

Ranking by retrieval after distillation is the retrieval-aware choice that holds up: a zero-shot retrieval
score ranks candidates while all of them answer at chance (pruning takes retrieval down whole), and that
does not say which ones a distillation brings back (README, Long context).

`resume=True` continues a search where it stopped: finished finalists are skipped, an interrupted
distillation resumes from its checkpoint. The source checkpoint is loaded once (by `calibrate`) and the data
tokenized once for the whole search. `materialize` writes any candidate as a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.budget import Budget
from compressor.checkpoint import fingerprint, load_model, parse_dtype, write_checkpoint
from compressor.config import HybridConfig
from compressor.data import tokenizer_file
from compressor.errors import CompressorError, OptionError
from compressor.importance import Importance
from compressor.model import HybridLM
from compressor.outputs import atomic_output, check_output, output_lock, staging, swap_in
from compressor.pipelines.ranking import SCORE_METRICS, proxy_scorer, rank, retrieval_record
from compressor.pipelines.records import (
    COMPRESSION_FILE,
    Candidate,
    CompressionRecord,
    Distilled,
    SearchRecord,
    read_json,
    write_json,
)
from compressor.pipelines.source import CalibrationConfig, Source
from compressor.prune import kept_attention_heads, write_pruned
from compressor.train import TrainConfig, has_trainer_state, train
from strategies import build_options, get_strategy
from strategies.base import describe_stats, options_to_dict
from strategies.export_config import export_config

SEARCH_FILE = "search.json"
RESULT_FILE = "result.json"
PARETO_FILE = "pareto.json"
PLOT_FILE = "pareto.png"
IMPORTANCE_DIR = "importance"
RANK_METRICS = ("kl", "loss", "retrieval")  # finalists after distillation (`Distilled.metric`)


@dataclass(frozen=True)
class SearchConfig:
    """What to search for and how to judge it. `distill` is every finalist's short distillation: its
    student, teacher, out and data are filled in per finalist. The strategy scores `top_k` candidates
    zero-shot, by default at least `finalists`."""

    budget: Budget
    distill: TrainConfig
    strategy: str = "minipuzzle"
    options: dict[str, Any] = field(default_factory=dict)
    finalists: int = 8
    rank_by: str = "kl"
    score: str = "kl"  # the zero-shot proxy
    retrieval_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_METRICS:
            raise OptionError("rank_by", f"{self.rank_by!r} is not one of {', '.join(RANK_METRICS)}")
        if self.score not in SCORE_METRICS:
            raise OptionError("score", f"{self.score!r} is not one of {', '.join(SCORE_METRICS)}")
        if self.finalists < 1:
            raise OptionError("candidates", f"must be at least 1, got {self.finalists}")
        self.distill.validate()
        self.build_strategy()

    def build_strategy(self):
        strategy = get_strategy(self.strategy)
        options = dict(self.options)
        if "top_k" not in options and "top_k" in {f.name for f in dataclasses.fields(strategy.Options)}:
            options["top_k"] = max(self.finalists, strategy.Options().top_k)
        return strategy(build_options(strategy, options))

    @classmethod
    def from_record(cls, record: SearchRecord) -> SearchConfig:
        return cls(
            budget=record.budget,
            distill=TrainConfig.from_dict(record.distill),
            strategy=record.strategy,
            options=record.strategy_options,
            finalists=sum(c.finalist for c in record.candidates),
            rank_by=record.rank_by,
            score=record.score_metric,
            retrieval_weight=record.retrieval["weight"] if record.retrieval else 1.0,
        )


def load_search(folder: str | Path, *, incoming: bool = False) -> SearchRecord:
    """The record of a search folder (with `incoming`, of the search replacing it, if one is under way)."""
    folder = _active(Path(folder)) if incoming else Path(folder)
    if not (folder / SEARCH_FILE).is_file():
        raise CompressorError(f"{folder} is not a search folder (no {SEARCH_FILE}): run `compress search` first")
    try:
        return SearchRecord.from_dict(read_json(folder / SEARCH_FILE, "a search record"))
    except (KeyError, TypeError, ValueError, CompressorError) as exc:
        raise CompressorError(f"{folder / SEARCH_FILE} is not a search record of this version ({exc})") from None


def _active(out: Path) -> Path:
    """Where the search of `out` works: its staging folder while an --overwrite search is under way."""
    return staging(out) if (staging(out) / SEARCH_FILE).is_file() else out


def resume_calibration(folder: str | Path) -> CalibrationConfig:
    """How the search in `folder` read its source and data, with its saved importance reused."""
    work = _active(Path(folder))
    record = load_search(work)
    return CalibrationConfig.from_dict({**record.calibration, "importance_dir": str(work / IMPORTANCE_DIR)})


def run_search(
    source: Source,
    config: SearchConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> SearchRecord:
    """Propose, score, distill the finalists, rank (module docstring). A search replacing an existing one
    (`overwrite`) works in `staging(out)` and takes its place only when it is complete."""
    out = Path(out)
    _check_source_data(source, config)
    with output_lock(out):
        if resume:
            work = _active(out)
            record = load_search(work)
            _check_same_source(record, source)
            say(f"resuming the search in {work}")
        else:
            calibration = source.config
            inputs = (source.path, calibration.data, calibration.importance_dir, tokenizer_file(calibration.tokenizer))
            check_output(out, overwrite=overwrite, inputs=inputs)
            work = staging(out) if out.exists() else out
            record = _propose_and_score(source, config, say)
            if work.exists():
                shutil.rmtree(work)  # a stale staging folder of an earlier --overwrite attempt
            with atomic_output(work, overwrite=True) as tmp:
                source.importance.save(_mkdir(tmp / IMPORTANCE_DIR))
                write_json(tmp / SEARCH_FILE, record.to_dict())
        _distill_finalists(source, record, work, config, say)
        if work != out:
            swap_in(work, out)
    return record


def _distill_finalists(source: Source, record: SearchRecord, work: Path, config: SearchConfig, say) -> None:
    """Every finalist distilled (finished ones read back), then the ranking and the Pareto fronts."""
    teacher = _teacher(source.model, config.distill)
    for candidate in record.candidates:
        if candidate.finalist:  # its result.json says whether it is finished
            candidate.distilled = _distill_finalist(source, teacher, record, candidate, work, config.distill, say)
            write_json(work / SEARCH_FILE, record.to_dict())
    finished = [c for c in record.candidates if c.distilled is not None]
    ranked = sorted(finished, key=lambda c: (c.distilled.metric(record.rank_by), c.distilled.val_kl))
    record.ranking = [c.index for c in ranked]
    record.pareto = pareto_front(record.candidates, record.rank_by)
    write_json(work / SEARCH_FILE, record.to_dict())
    write_json(work / PARETO_FILE, record.pareto)


def _check_same_source(record: SearchRecord, source: Source) -> None:
    if record.source.fingerprint != source.fingerprint:
        raise CompressorError(
            f"{source.path} is not the model this search started from (fingerprint {source.fingerprint}, "
            f"recorded {record.source.fingerprint}): resume with the recorded source {record.source.path}"
        )
    if record.data_fingerprint and record.data_fingerprint != source.sequences.fingerprint():
        raise CompressorError(
            f"{source.config.data} no longer holds the data this search started on (its content changed): resume "
            "with the same data, or start a new search"
        )


def _check_source_data(source: Source, config: SearchConfig) -> None:
    calibration = source.config
    if source.sequences is None or not calibration.all_sequences or calibration.seq_len != config.distill.seq_len:
        raise CompressorError(
            "a search distills from the calibration data: calibrate with all_sequences=True and the "
            "distillation's seq_len"
        )
    if config.rank_by == "retrieval" and source.retrieval is None:
        raise OptionError("rank_by", "retrieval needs the retrieval probe: calibrate with a RetrievalConfig")


def _propose_and_score(source: Source, config: SearchConfig, say: Callable[[str], None]) -> SearchRecord:
    strategy = config.build_strategy()
    arch = source.model.config
    proposals = strategy.propose(arch, source.importance, config.budget)
    say(f"{strategy.name}: " + (describe_stats(strategy.stats) or "done"))
    scorer = proxy_scorer(source, config.score, config.retrieval_weight)
    candidates = rank(
        proposals, arch, config.budget, limit=strategy.top_k, scorer=scorer, smallest=strategy.smallest(arch), say=say
    )
    for c in candidates[: config.finalists]:
        c.finalist = True
    return SearchRecord(
        source=source.info,
        budget=config.budget,
        strategy=strategy.name,
        strategy_options=options_to_dict(strategy.options),
        calibration=source.config.to_dict(),
        data_fingerprint=source.sequences.fingerprint(),
        distill=config.distill.to_dict(),
        rank_by=config.rank_by,
        candidates=candidates,
        score_metric=config.score,
        retrieval=retrieval_record(scorer, config.retrieval_weight),
    )


def _teacher(model: HybridLM, template: TrainConfig) -> HybridLM:
    """The source model in the dtype the distillation wants for its teacher (a copy only when it differs)."""
    device = model.lm_head.weight.device
    dtype = parse_dtype(template.resolved_teacher_dtype(device))
    return model if model.lm_head.weight.dtype == dtype else copy.deepcopy(model).to(dtype)


def _distill_finalist(
    source: Source,
    teacher: HybridLM,
    record: SearchRecord,
    candidate: Candidate,
    out: Path,
    template: TrainConfig,
    say,
) -> Distilled:
    """Prune the finalist from the in-memory source (once), distill it (resuming an interrupted run), and
    record its validation result."""
    folder = out / "candidates" / str(candidate.index)
    result_file = folder / RESULT_FILE
    if result_file.is_file():
        return Distilled(**read_json(result_file, "a finalist's result"))
    say(f"distilling finalist {candidate.index}: {candidate.label}")
    pruned_dir, run_dir = folder / "pruned", folder / "distill"
    if not (pruned_dir / "config.json").is_file():
        with atomic_output(pruned_dir, overwrite=True) as tmp:
            write_pruned(source.model, source.importance, candidate.target, tmp, tokenizer_from=source.path)
            _write_compression_record(tmp, record, candidate, source.model.config, source.importance,
                                      source.config.importance_dir)  # fmt: skip
    resume = has_trainer_state(run_dir / "model")
    calibration = source.config
    config = dataclasses.replace(
        template,
        student=str(pruned_dir),
        teacher=str(source.path),
        out=str(run_dir),
        data=str(calibration.data),
        tokenizer=calibration.tokenizer or str(source.path),
        text_field=calibration.text_field,
        device=calibration.device,
        resume=resume,
        overwrite=not resume,
    )
    final = train(config, teacher=teacher, sequences=source.sequences, retrieval=source.retrieval).final_eval
    retrieval = None
    if source.retrieval is not None:  # measured by the run's validation, on the source's probe
        examples = source.retrieval.examples
        retrieval = {
            "task": examples.task,
            "context": examples.context,
            "queries": examples.num_queries,
            "accuracy": final["val_retrieval_accuracy"],
            "log_likelihood": final["val_retrieval_ll"],
        }
    distilled = Distilled(final["val_loss"], final["val_ppl"], final["val_kl"], final["val_top1_agreement"],
                          retrieval)  # fmt: skip
    write_json(result_file, dataclasses.asdict(distilled))  # a finished candidate is recorded whole or not at all
    return distilled


def pareto_front(candidates: list[Candidate], rank_by: str = "kl") -> dict[str, list[int]]:
    """Candidates no other beats on both quality (`Candidate.quality`: after distillation when available,
    else zero-shot) and cost: one front against memory (or parameters), one against speedup when it was
    estimated."""

    def front(cost: Callable[[Candidate], float]) -> list[int]:
        points = [(cost(c), c.quality(rank_by), c.index) for c in candidates]
        kept = [
            (c, i) for c, q, i in points
            if not any((c2 <= c and q2 <= q) and (c2 < c or q2 < q) for c2, q2, _ in points)
        ]  # fmt: skip
        return [i for _, i in sorted(kept)]

    fronts = {"memory": front(lambda c: c.memory_bytes if c.memory_bytes is not None else c.params)}
    if all(c.speedup is not None for c in candidates):
        fronts["speedup"] = front(lambda c: -c.speedup)
    return fronts


def materialize(
    search_dir: str | Path,
    index: int,
    out: str | Path,
    *,
    distilled: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
) -> Path:
    """Write candidate `index` of a search as a checkpoint: pruned again from the source with the saved
    importance (default), or its short-distilled weights."""
    search_dir, out = Path(search_dir), Path(out)
    record = load_search(search_dir)
    candidate = record.candidate(index)
    check_output(out, overwrite=overwrite, inputs=(search_dir, record.source.path))
    if distilled:
        model_dir = search_dir / "candidates" / str(index) / "distill" / "model"
        if candidate.distilled is None or not (model_dir / "config.json").is_file():
            raise CompressorError(
                f"candidate {index} was not distilled in this search: materialize it without --distilled"
            )
        model = load_model(model_dir, dtype=dtype, device=device)
        with atomic_output(out, overwrite=overwrite, inputs=(search_dir, record.source.path)) as tmp:
            write_checkpoint(tmp, model.config, model.state_dict(), tokenizer_from=model_dir)
        return out
    source_path = record.source.path
    if fingerprint(source_path) != record.source.fingerprint:
        raise CompressorError(f"{source_path} changed since the search: its fingerprint no longer matches")
    importance = Importance.load(search_dir / IMPORTANCE_DIR, record.source.fingerprint)
    source = load_model(source_path, dtype=dtype, device=device)
    with atomic_output(out, overwrite=overwrite, inputs=(search_dir, record.source.path)) as tmp:
        write_pruned(source, importance, candidate.target, tmp, tokenizer_from=source_path)
        _write_compression_record(tmp, record, candidate, source.config, importance, search_dir / IMPORTANCE_DIR)
    return out


def _write_compression_record(
    folder: Path, record: SearchRecord, candidate: Candidate, source: HybridConfig, importance: Importance,
    importance_dir: str | Path | None,
) -> None:  # fmt: skip
    """The `compression.json` `compress prune` writes, for a candidate pruned by a search: its source, budget,
    strategy and target (whose block sources pair its attention blocks for `--attention-loss`)."""
    chosen = candidate.target.config(source)
    compression = CompressionRecord(
        source=record.source,
        budget=record.budget,
        strategy=record.strategy,
        strategy_options=record.strategy_options,
        score_metric=record.score_metric,
        importance={"folder": str(importance_dir) if importance_dir else None, **importance.meta},
        candidates=[candidate],
        export_config=export_config(chosen) if chosen.is_uniform else None,
        retrieval=record.retrieval,
        attention_heads=kept_attention_heads(importance, candidate.target, source),
    )
    write_json(folder / COMPRESSION_FILE, compression.to_dict())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
