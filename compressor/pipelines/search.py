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
distillation resumes from its checkpoint. The folder is read back as untrusted input (`load_search`,
`resume_calibration`): the record says how the search read its source, never which files (the model, data
and tokenizer are the caller's, checked against the record's fingerprints), a candidate's index is a whole
number (it names its folder), every target a pruning of the source, and no link leads out of the folder.
The source checkpoint is loaded once (by `calibrate`) and the data tokenized once for the whole search.
`materialize` writes any candidate as a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from compressor import distributed
from compressor.bld import BLDConfig
from compressor.budget import Budget, parse_tokens
from compressor.checkpoint import empty_model, fingerprint, load_model, parse_dtype, write_checkpoint
from compressor.config import HybridConfig
from compressor.data import tokenizer_file
from compressor.errors import CompressorError, OptionError, check_applies, first_line
from compressor.importance import Importance
from compressor.model import HybridLM
from compressor.outputs import (
    atomic_output,
    check_output,
    check_record,
    output_lock,
    read_json,
    refuse_links,
    settle,
    staging,
    swap_in,
)
from compressor.pipelines.library import Library, build_library, library_sequences, score_library
from compressor.pipelines.preview import CompressionPreview, CompressionStages, preview_compression
from compressor.pipelines.preview import plan as candidates_plan
from compressor.pipelines.pruning import PruneConfig
from compressor.pipelines.ranking import Score, ScoreSpec, check_scoring, proxy_scorer, rank, retrieval_record
from compressor.pipelines.records import (
    COMPRESSION_FILE,
    Candidate,
    CompressionRecord,
    Distilled,
    SearchRecord,
    write_json,
)
from compressor.pipelines.source import (
    CalibrationConfig,
    Source,
    calibrate,
    check_paths,
    check_probe_applies,
    retrieval_probe,
)
from compressor.presets import load_config_or_preset
from compressor.prune import write_pruned
from compressor.target import Target
from compressor.tasks import parse_contexts
from compressor.train import TrainConfig, has_trainer_state, train
from strategies import build_options, get_strategy
from strategies.base import describe_stats, options_to_dict

SEARCH_FILE = "search.json"
LIBRARY_DIR = "library"
TEACHER_CACHE_DIR = "teacher_cache"
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
    bld: BLDConfig | None = None  # a blockwise-distilled library chooses and initialises the candidates
    # the finalists distil from one teacher cache (64 sampled targets a token; not with attention transfer): one
    # teacher pass for all of them, an estimate of the full logits' gradient (docs/search.md)
    share_teacher: bool = False

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_METRICS:
            raise OptionError("rank_by", f"{self.rank_by!r} is not one of {', '.join(RANK_METRICS)}")
        check_scoring(self.score, self.retrieval_weight)  # before importance and scoring, not after them
        if self.finalists < 1:
            raise OptionError("candidates", f"must be at least 1, got {self.finalists}")
        self.distill.validate()
        if self.share_teacher and self.distill.attention_loss > 0:  # a cache holds no attention to transfer
            raise OptionError("share_teacher", "reads the teacher from a cache, --attention-loss needs it in memory: "
                              "give one")  # fmt: skip
        strategy = self.build_strategy()
        if self.bld is not None:
            if not hasattr(strategy, "tables"):
                raise OptionError("bld", f"needs per-block choices: the {strategy.name} strategy has none (minipuzzle)")
            if not self.budget.additive_terms():
                raise OptionError("bld", "needs a budget the solver packs per block (memory, parameters, KV cache ...)")

    def build_strategy(self):
        strategy = get_strategy(self.strategy)
        options = dict(self.options)
        if "top_k" not in options and "top_k" in {f.name for f in dataclasses.fields(strategy.Options)}:
            options["top_k"] = max(self.finalists, strategy.Options().top_k)
        return strategy(build_options(strategy, options))

    @classmethod
    def from_options(cls, model: str | Path, options: SearchOptions) -> SearchConfig:
        """A new search from `compress search`'s options: the budget (required), the finalists' distillation
        (`SearchOptions.distillation`) and the library; checked before anything is loaded."""
        return cls(options.required_budget(), options.distillation(model), options.strategy,
                   dict(options.strategy_options), options.candidates, options.rank_by, options.score,
                   options.retrieval_weight, bld=options.library(), share_teacher=options.share_teacher)  # fmt: skip

    @classmethod
    def from_record(cls, record: SearchRecord) -> SearchConfig:
        # a score without a retrieval term records its probe at weight 0 (`retrieval_record`): none to restore
        weighed = record.retrieval is not None and record.score_metric.endswith("+retrieval")
        return cls(
            budget=record.budget,
            distill=TrainConfig.from_dict(record.distill),
            strategy=record.strategy,
            options=record.strategy_options,
            finalists=sum(c.finalist for c in record.candidates),
            rank_by=record.rank_by,
            score=record.score_metric,
            retrieval_weight=record.retrieval["weight"] if weighed else 1.0,
            bld=BLDConfig(**record.bld) if record.bld is not None else None,
            share_teacher=record.share_teacher,
        )


@dataclass(frozen=True)
class SearchOptions:
    """`compress search`'s options as written (token counts such as '50M', paths; the defaults are the
    command's): a new search's SearchConfig (`SearchConfig.from_options`) and CalibrationConfig are built
    from them, a resumed search is checked against them, a dry run plans with them (`search_or_preview`)."""

    data: str | None = None
    budget: Budget | None = None
    strategy: str = "minipuzzle"
    strategy_options: dict[str, str] = field(default_factory=dict)  # the strategy's own, as written
    candidates: int = 8  # finalists
    distill_tokens: str = "50M"
    seq_len: int = 4096
    batch_size: int = 16
    micro_batch_size: int = 4
    activation_checkpointing: bool = False
    lr: float = 1e-4
    min_lr: float | None = None  # None: lr / 10
    samples: int = 1024
    score_samples: int = 64
    importance_dir: str | Path | None = None
    rank_by: str = "kl"
    score: str = "kl"
    retrieval_weight: float = 1.0
    attention_loss: float = 0.0
    attention_queries: int = 256
    seed: int = 0
    tokenizer: str | Path | None = None
    text_field: str = "text"
    device: str = "auto"
    dtype: str | None = None
    bld: str | None = None  # the library's tokens, e.g. '64k' (None: no library)
    bld_epochs: int = 2
    bld_lr: float = 1e-3
    bld_stream: bool = False  # train the library from the source's passes, no stored activations
    share_teacher: bool = False
    retrieval_task: str = "phonebook"
    retrieval_ctx: str | None = None  # one length, e.g. '4k' (default: the budget's context)
    retrieval_sequences: int = 8
    nproc: int | None = None  # a dry run's processes (default: the fewest that fit)

    def required_budget(self) -> Budget:
        """The budget: a search, and its dry run, need one."""
        if self.budget is None:
            raise CompressorError(
                "give a budget: --target-mem, --target-params, --target-active-params or --gpu with --min-speedup"
            )
        return self.budget

    def distillation(self, teacher: str | Path) -> TrainConfig:
        """Every finalist's distillation (`finalist_training`) from `teacher`, the searched model."""
        return finalist_training(
            teacher, tokens=parse_tokens(self.distill_tokens), seq_len=self.seq_len, batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size, lr=self.lr, min_lr=self.min_lr, seed=self.seed, device=self.device,
            activation_checkpointing=self.activation_checkpointing, attention_loss=self.attention_loss,
            attention_queries=self.attention_queries,
        )  # fmt: skip

    def library(self) -> BLDConfig | None:
        """The blockwise-distilled library (None without `bld`)."""
        if self.bld is None:
            check_applies(self, dict.fromkeys(("bld_stream", "bld_epochs", "bld_lr"), ("--bld TOKENS", False)))
            return None
        return BLDConfig(
            parse_tokens(self.bld), self.bld_epochs, self.bld_lr, self.micro_batch_size, self.seed, self.bld_stream
        )

    @property
    def uses_probe(self) -> bool:
        return ScoreSpec(self.score, self.retrieval_weight).retrieval or self.rank_by == "retrieval"

    def calibration(self, model: str | Path, budget: Budget) -> CalibrationConfig:
        """How a new search reads `model` and the data: every sequence kept for the finalists' distillations,
        the retrieval probe (at the budget's context unless `retrieval_ctx`) when the score or ranking uses it."""
        if self.data is None:
            raise OptionError("data", "is needed: the calibration and distillation data")
        probe = None
        if self.uses_probe:
            probe = retrieval_probe(retrieval_task=self.retrieval_task, retrieval_ctx=self.retrieval_ctx,
                                    retrieval_sequences=self.retrieval_sequences, context=budget.context)  # fmt: skip
        return CalibrationConfig.from_options(
            model, self.data, importance_dir=self.importance_dir, samples=self.samples,
            score_samples=self.score_samples, seq_len=self.seq_len, batch_size=1, tokenizer=self.tokenizer,
            text_field=self.text_field, all_sequences=True, device=self.device, dtype=self.dtype, retrieval=probe,
        )  # fmt: skip


def load_search(folder: str | Path, *, incoming: bool = False) -> SearchRecord:
    """The record of a search folder (with `incoming`, of the search replacing it, if one is under way),
    read as untrusted input: every field's type, the candidates' indices (they name folders), and the
    calibration and distillation settings a resume would use are checked."""
    folder = _active(Path(folder)) if incoming else Path(folder)
    path = folder / SEARCH_FILE
    settle(folder)
    if not path.exists():
        if library_building(folder).is_dir():
            raise CompressorError(
                f"the search in {folder} stopped while building its library ({library_building(folder)}): run the "
                "same command without --resume, which continues the library where it stopped"
            )
        raise CompressorError(f"{folder} is not a search folder (no {SEARCH_FILE}): run `compress search` first")
    raw = read_json(path, "a search record")
    check_record(SearchRecord, raw, str(path))
    check_record(CalibrationConfig, raw["calibration"], str(path), "calibration")
    check_record(TrainConfig, raw["distill"], str(path), "distill")
    try:
        record = SearchRecord.from_dict(raw)
        CalibrationConfig.from_dict(record.calibration)
        TrainConfig.from_dict(record.distill).validate()
    except (KeyError, TypeError, ValueError, CompressorError) as exc:
        raise CompressorError(f"{path} is not a search record of this version ({first_line(exc)})") from None
    return record


def _active(out: Path) -> Path:
    """Where the search of `out` works: its staging folder while an --overwrite search is under way."""
    return staging(out) if (staging(out) / SEARCH_FILE).is_file() else out


def resume_calibration(
    folder: str | Path, *, model: str | Path, data: str, tokenizer: str | Path | None = None
) -> CalibrationConfig:
    """How the search in `folder` read its source and data, with its saved importance reused. What is read
    is what the caller names (`model`, `data`, `tokenizer`), never a path the folder's record holds: the
    record only says how (sample counts, sequence length, probe), and `run_search` refuses a model or data
    whose fingerprint differs from the record's. A search tokenized with a tokenizer of its own needs it
    named again; one that used the model's needs none."""
    work = _active(Path(folder))
    record = load_search(work)
    _check_resumable(work, record, HybridConfig.from_file(model))  # before anything is read for it
    _check_same_model(record, model, fingerprint(model))
    recorded = record.calibration.get("tokenizer")
    if (recorded is None) != (tokenizer is None):
        raise OptionError(
            "tokenizer",
            f"must be given again as the search started with it ({recorded})"
            if tokenizer is None
            else "was not used by this search (it read the model's own tokenizer): resume without it",
        )
    return CalibrationConfig.from_dict({
        **record.calibration,
        "model": str(model),
        "data": str(data),
        "tokenizer": None if tokenizer is None else str(tokenizer),
        "importance_dir": str(work / IMPORTANCE_DIR),
    })  # fmt: skip


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
    (`overwrite`) works in `staging(out)` and takes its place only when it is complete. Under torchrun
    (a sharded source) every process runs every step and the main one writes the folder."""
    out, world = Path(out), source.world
    _check_source_data(source, config)
    with output_lock(out) if world.is_main else contextlib.nullcontext():
        if resume:
            work = _active(out)
            record = load_search(work)
            _check_resumable(work, record, source.model.config)
            _check_same_source(record, source)
            say(f"resuming the search in {work}")
        else:
            calibration = source.config
            inputs = (source.path, calibration.data, calibration.importance_dir, tokenizer_file(calibration.tokenizer))
            if world.is_main:
                check_output(out, overwrite=overwrite, inputs=inputs)
            work = staging(out) if out.exists() else out
            distributed.barrier(world)  # every process has seen `out` as it was
            record = _propose_and_score(source, config, library_building(out), say)
            if world.is_main:
                _write_search(work, source, record, library_building(out) if config.bld is not None else None)
            distributed.barrier(world)
        _distill_finalists(source, record, work, config, say)
        if work != out and world.is_main:
            swap_in(work, out)
    return record


def _write_search(work: Path, source: Source, record: SearchRecord, library: Path | None) -> None:
    """The search folder as the finalists' distillation starts from it: importance, library, record."""
    if work.exists():
        shutil.rmtree(work)  # a stale staging folder of an earlier --overwrite attempt
    with atomic_output(work, overwrite=True) as tmp:
        source.importance.save(_mkdir(tmp / IMPORTANCE_DIR))
        if library is not None:
            os.replace(library, tmp / LIBRARY_DIR)
        write_json(tmp / SEARCH_FILE, record.to_dict())


def _distill_finalists(source: Source, record: SearchRecord, work: Path, config: SearchConfig, say) -> None:
    """Every finalist distilled (finished ones read back), then the ranking, the Pareto fronts and how well
    the score that picked the finalists predicted their result. With a shared teacher, the first finalist's
    run writes the teacher cache (`TEACHER_CACHE_DIR`) and every later one reads it; it is deleted at the end."""
    teacher = _teacher(source, config.distill)
    template = config.distill
    if config.share_teacher:
        template = dataclasses.replace(template, cache_teacher=True, teacher_cache_dir=str(work / TEACHER_CACHE_DIR))
    library = Library.read(work / LIBRARY_DIR) if record.bld is not None else None
    finalists = [c for c in record.candidates if c.finalist]
    started = time.monotonic()
    for done, candidate in enumerate(finalists, start=1):  # its result.json says whether it is finished
        if candidate.distilled is None:
            say(f"distilling finalist {done}/{len(finalists)}, candidate {candidate.index}: {candidate.label}")
        distilled, teacher_seconds = _distill_finalist(source, teacher, record, candidate, work, template, library, say)
        candidate.distilled = distilled
        record.seconds["teacher"] = record.seconds.get("teacher", 0.0) + teacher_seconds
        if source.world.is_main:
            write_json(work / SEARCH_FILE, record.to_dict())
        if done < len(finalists):
            say(f"finalists: {done}/{len(finalists)} done, {_eta(time.monotonic() - started, done, len(finalists))}")
    record.seconds["finalists"] = record.seconds.get("finalists", 0.0) + time.monotonic() - started
    finished = [c for c in record.candidates if c.distilled is not None]
    ranked = sorted(finished, key=lambda c: (c.distilled.metric(record.rank_by), c.distilled.val_kl))
    record.ranking = [c.index for c in ranked]
    record.pareto = pareto_front(record.candidates, record.rank_by)
    record.correlation = rank_correlation(finished, record.rank_by)
    if source.world.is_main:
        write_json(work / SEARCH_FILE, record.to_dict())
        write_json(work / PARETO_FILE, record.pareto)
        shutil.rmtree(work / TEACHER_CACHE_DIR, ignore_errors=True)


def rank_correlation(finished: list[Candidate], rank_by: str) -> dict[str, Any] | None:
    """Spearman's and Kendall's rank correlation between the finalists' scores before distillation (the
    zero-shot proxy, or the library-assembled model's) and their `rank_by` after it: 1 is a perfect
    prediction of the order. None with fewer than 3 finalists."""
    pairs = [(c.score, c.distilled.metric(rank_by)) for c in finished if c.score is not None]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    before, after = zip(*pairs, strict=True)
    with warnings.catch_warnings():  # constant inputs: NaN, reported as such
        warnings.simplefilter("ignore")
        spearman = float(stats.spearmanr(before, after).statistic)
        kendall = float(stats.kendalltau(before, after).statistic)
    return {"finalists": len(pairs), "after": rank_by, "spearman": spearman, "kendall": kendall}


def _eta(elapsed: float, done: int, total: int) -> str:
    return f"{elapsed:.0f} s so far, about {elapsed / done * (total - done):.0f} s left"


def library_building(out: Path) -> Path:
    """Where a search's library is built before the search folder exists (beside it, hidden); it moves
    into the folder (`LIBRARY_DIR`) with the first record. A killed build is continued by the next run."""
    return out.with_name(f".{out.name}.library")


def _check_resumable(work: Path, record: SearchRecord, source: HybridConfig) -> None:
    """What a resume would write into and read from the search folder `work` is its own and whole: no
    link in it (what it writes and deletes stays inside), every candidate a pruning of `source`, every
    finished finalist's result readable."""
    refuse_links(work, "a search folder")
    for candidate in record.candidates:
        candidate.target.check_fits(source)
        result_file = work / "candidates" / str(candidate.index) / RESULT_FILE
        if candidate.finalist and result_file.exists():
            _read_result(result_file)


def _check_same_source(record: SearchRecord, source: Source) -> None:
    _check_same_model(record, source.path, source.fingerprint)
    if record.data_fingerprint and record.data_fingerprint != source.sequences.fingerprint():
        raise CompressorError(
            f"{source.config.data} no longer holds the data this search started on (its content changed): resume "
            "with the same data, or start a new search"
        )


def _check_same_model(record: SearchRecord, path: str | Path, model_fingerprint: str) -> None:
    if record.source.fingerprint != model_fingerprint:
        raise CompressorError(
            f"{path} is not the model this search started from (fingerprint {model_fingerprint}, "
            f"recorded {record.source.fingerprint}): resume with the recorded source {record.source.path}"
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


def _propose_and_score(
    source: Source, config: SearchConfig, library_dir: Path, say: Callable[[str], None]
) -> SearchRecord:
    strategy = config.build_strategy()
    arch = source.model.config
    scorer = proxy_scorer(source, config.score, config.retrieval_weight)
    seconds: dict[str, float] = {}
    library_summary = None
    if config.bld is None:
        proposals = strategy.propose(arch, source.importance, config.budget)
        score: Callable[[Target], Score] = scorer
    else:
        proposals, library, library_summary = _library_proposals(source, strategy, config, scorer, library_dir, say)
        seconds.update(library_summary.pop("seconds"))

        def score(target: Target) -> Score:
            return scorer.score_model(library.assemble(source.model, source.importance, target, world=source.world))

    say(f"{strategy.name}: " + (describe_stats(strategy.stats) or "done"))
    started = time.monotonic()
    candidates = rank(
        proposals, arch, config.budget, limit=strategy.top_k, scorer=score, smallest=strategy.smallest(arch), say=say
    )
    seconds["candidates"] = time.monotonic() - started
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
        bld=dataclasses.asdict(config.bld) if config.bld is not None else None,
        library=library_summary,
        share_teacher=config.share_teacher,
        seconds=seconds,
    )


def _library_proposals(source: Source, strategy, config: SearchConfig, scorer, folder: Path, say):
    """Build (or continue) the library over the strategy's per-block options, score every option by
    replacement, and let the solver choose by those damages: (proposals, library, summary)."""
    arch = source.model.config
    mode, tables = strategy.servable_tables(arch, source.importance, config.budget)
    started = time.monotonic()
    library = build_library(source, tables, config.bld, folder, say)
    built = time.monotonic()
    scores = score_library(source, tables, library, scorer, folder, say)
    scored = time.monotonic()
    proposals = strategy.targets(arch, tables, config.budget, mode, solutions=config.finalists)
    errors = [v.error for v in library.variants.values()]
    summary = {
        "variants": len(library.variants),
        "tokens": len(library_sequences(source, config.bld.tokens)) * source.config.seq_len,
        "mean_error": sum(errors) / len(errors) if errors else 0.0,
        "mean_initial_error": (
            sum(v.initial_error for v in library.variants.values()) / len(errors) if errors else 0.0
        ),
        "assembled_whole": {hidden: value["base"] for hidden, value in scores.items()},
        "seconds": {"library": built - started, "library_scores": scored - built},
    }
    return proposals, library, summary


def _teacher(source: Source, template: TrainConfig) -> HybridLM:
    """The source model in the dtype the distillation wants for its teacher (a copy only when it differs;
    a sharded source is loaded again in that dtype, sharded alike)."""
    model, world = source.model, source.world
    dtype = parse_dtype(template.resolved_teacher_dtype(world.device))
    if model.lm_head.weight.dtype == dtype:
        return model
    if world.distributed:
        return load_model(source.path, dtype=dtype, world=world)
    return copy.deepcopy(model).to(dtype)


def _distill_finalist(
    source: Source,
    teacher: HybridLM,
    record: SearchRecord,
    candidate: Candidate,
    out: Path,
    template: TrainConfig,
    library: Library | None,
    say,
) -> tuple[Distilled, float]:
    """Prune the finalist from the in-memory source (once; assembled from the library's trained blocks
    when the search has one), distill it (resuming an interrupted run), and record its validation result:
    (result, seconds its run spent writing the teacher cache)."""
    folder = out / "candidates" / str(candidate.index)  # an index is a whole number >= 0 (`check_indices`)
    result_file = folder / RESULT_FILE
    if result_file.exists():
        return _read_result(result_file), 0.0
    pruned_dir, run_dir = folder / "pruned", folder / "distill"
    if not (pruned_dir / "config.json").is_file():
        distributed.barrier(source.world)  # every process has looked before the main one writes
        _write_finalist(source, record, candidate, library, pruned_dir)
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
    result = train(config, teacher=teacher, sequences=source.sequences, retrieval=source.retrieval)
    final = result.final_eval
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
    if source.world.is_main:  # a finished candidate is recorded whole or not at all
        write_json(result_file, dataclasses.asdict(distilled))
    return distilled, result.teacher_seconds


def _write_finalist(
    source: Source, record: SearchRecord, candidate: Candidate, library: Library | None, folder: Path
) -> None:
    """The finalist's starting checkpoint: pruned from the source, or assembled from the library's trained
    blocks. Every process of a sharded source slices (its blocks are gathered as they are); the main one
    writes."""
    model, importance, target, world = source.model, source.importance, candidate.target, source.world
    if not world.is_main:  # the same gathers as the main one's slicing, nothing read or written
        write_pruned(model, importance, target, folder, world=world)
        return
    with atomic_output(folder, overwrite=True) as tmp:
        if library is None:
            write_pruned(model, importance, target, tmp, tokenizer_from=source.path)
        else:
            config = target.config(model.config)
            layout = empty_model(config, model.backbone.embeddings.weight.dtype).state_dict()
            tensors = library.tensors(model, importance, target)
            write_checkpoint(tmp, config, layout, tensors=tensors, tokenizer_from=source.path)
        _write_compression_record(tmp, record, candidate, model.config, importance, source.config.importance_dir)


def _read_result(path: Path) -> Distilled:
    """A finished finalist's `result.json`, checked as untrusted input."""
    raw = read_json(path, "a finalist's result")
    check_record(Distilled, raw, str(path))
    try:
        return Distilled(**raw)
    except TypeError as exc:  # a key Distilled does not know
        raise CompressorError(f"{path} is not a finalist's result of this version ({first_line(exc)})") from None


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
    refuse_links(search_dir, "a search folder")  # its checkpoints and scores are read as its own
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
    source = load_model(source_path, dtype=dtype, device=device)
    candidate.target.check_fits(source.config)
    importance = Importance.load(search_dir / IMPORTANCE_DIR, record.source.fingerprint, config=source.config)
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
    compression = CompressionRecord.of(
        record.source, source, importance, importance_dir, [candidate], budget=record.budget,
        strategy=record.strategy, strategy_options=record.strategy_options, score_metric=record.score_metric,
        retrieval=record.retrieval,
    )  # fmt: skip
    write_json(folder / COMPRESSION_FILE, compression.to_dict())


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def finalist_training(
    teacher: str | Path,
    *,
    tokens: int | None = None,
    seq_len: int = 4096,
    batch_size: int = 16,
    micro_batch_size: int = 4,
    lr: float = 1e-4,
    min_lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    activation_checkpointing: bool = False,
    attention_loss: float = 0.0,
    attention_queries: int = 256,
) -> TrainConfig:
    """The template of every finalist's short distillation (`SearchConfig.distill`): its student, out and data
    are filled in per finalist; it validates once, at its end (on 64 held-out sequences), and keeps a
    checkpoint every 50 steps to resume from."""
    return TrainConfig(
        student="", out="", data="", teacher=str(teacher), tokens=tokens, seq_len=seq_len, batch_size=batch_size,
        micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, eval_every=10**9, eval_at_start=False,
        eval_sequences=64, save_every=50, seed=seed, device=device, activation_checkpointing=activation_checkpointing,
        attention_loss=attention_loss, attention_queries=attention_queries,
    )  # fmt: skip


def search_architectures(
    calibration: CalibrationConfig,
    config: SearchConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> SearchRecord | None:
    """`compress search` from paths, in its order: a new search first checks that some candidate meets the
    budget (on the config alone, before anything is loaded), the held-out score's settings and the output
    folder (a resumed one: `run_search` checks its record); then one session (the source sharded under
    torchrun): calibrate once and run the search. Returns None on the other processes of a torchrun, and
    `say`s only on the main one."""
    _refuse_resume_with_overwrite(out, resume, overwrite)
    if not resume:
        candidates_plan(load_config_or_preset(calibration.model)[0], config)
        check_scoring(config.score, config.retrieval_weight, calibration.score_samples)
        inputs = (calibration.model, calibration.data, calibration.importance_dir)
        check_output(out, overwrite=overwrite, inputs=(*inputs, tokenizer_file(calibration.tokenizer)))
    with distributed.session(calibration.device) as world:
        tell = say if world.is_main else lambda text: None
        source = calibrate(calibration, world=world, say=tell)
        record = run_search(source, config, Path(out), resume=resume, overwrite=overwrite, say=tell)
    return record if world.is_main else None


def _refuse_resume_with_overwrite(out: str | Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise OptionError("resume", f"continues {out}, --overwrite replaces it: give one")


def search_or_preview(
    model: str | Path,
    out: str | Path | None,
    options: SearchOptions,
    *,
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    given: Collection[str] = (),
    say: Callable[[str], None] = print,
) -> SearchRecord | CompressionPreview | None:
    """`compress search` from its options: with `dry_run`, the preview (the candidates that meet the budget
    and the memory of each stage; `model` may be a preset or a config.json) after the checks of the paths
    given (`check_paths`); else a new search into `out` (`search_architectures`), or with `resume` the one
    in `out`, continued as its record says: an option written on the command line (`given`, by name) with
    another value than the record's is refused."""
    if dry_run and resume:
        raise OptionError("resume", "does not apply to --dry-run, which plans a new search from its options (a "
                          "resumed one continues as its record says): leave out one of them")  # fmt: skip
    if not resume:  # a resumed search's probe is the record's
        check_probe_applies(options, "a --score with retrieval or --rank-by retrieval")
    if dry_run:
        check_paths(model, out, data=options.data, importance_dir=options.importance_dir, overwrite=overwrite)
        return _preview(model, options)
    if out is None:
        raise OptionError("out", "is needed for the search folder (or --dry-run to only plan)")
    if resume:  # the record says how; what is read is what the options name (checked against it)
        _refuse_resume_with_overwrite(out, resume, overwrite)
        record = load_search(out, incoming=True)
        config = SearchConfig.from_record(record)
        if options.data is None:
            raise OptionError("data", "is needed to resume too: give the data the search started on")
        _refuse_resume_changes(options, given, config, CalibrationConfig.from_dict(record.calibration))
        calibration = resume_calibration(out, model=model, data=options.data, tokenizer=options.tokenizer)
    else:
        config = SearchConfig.from_options(model, options)
        calibration = options.calibration(model, config.budget)
    return search_architectures(calibration, config, out, resume=resume, overwrite=overwrite, say=say)


def _preview(model: str | Path, options: SearchOptions) -> CompressionPreview:
    """The dry run: the strategy's candidates (as `compress prune` would list them) and the memory of
    importance (unless reused), the library, scoring and a finalist's distillation. The options are checked
    as a search checks them."""
    config = SearchConfig.from_options(model, options)
    choosing = PruneConfig(config.budget, config.strategy, dict(config.options))
    stages = CompressionStages(options.seq_len, 1, options.score_samples, options.importance_dir is None,
                               options.dtype, config.distill, config.bld)  # fmt: skip
    return preview_compression(model, choosing, stages, nproc=options.nproc, device=options.device)


def _refuse_resume_changes(
    options: SearchOptions, given: Collection[str], config: SearchConfig, calibration: CalibrationConfig
) -> None:
    """A resumed search continues as its record says (`config`, and `calibration` as it started, with the
    importance folder it was given): an option in `given` with another value than the search started with is
    refused, not ignored; options not given are not checked. Paths compare as the folders they name."""
    probe, library, distill = calibration.retrieval, config.bld, config.distill
    folder = lambda path: Path(path).expanduser().resolve()  # noqa: E731
    importance = folder(calibration.importance_dir) if calibration.importance_dir else None
    recorded = {  # option -> (its value in the record[, a parse of the written option into that form])
        "strategy": (config.strategy,), "candidates": (config.finalists,), "rank_by": (config.rank_by,),
        "score": (config.score,), "retrieval_weight": (config.retrieval_weight,),
        "distill_tokens": (distill.tokens, parse_tokens), "seq_len": (calibration.seq_len,),
        "batch_size": (distill.batch_size,), "micro_batch_size": (distill.micro_batch_size,),
        "activation_checkpointing": (distill.activation_checkpointing,), "lr": (distill.lr,),
        "min_lr": (distill.final_lr,), "seed": (distill.seed,), "attention_loss": (distill.attention_loss,),
        "attention_queries": (distill.attention_queries,), "samples": (calibration.samples,),
        "score_samples": (calibration.score_samples,), "importance_dir": (importance, folder),
        "text_field": (calibration.text_field,), "dtype": (calibration.dtype,),
        "retrieval_task": (probe.task if probe else None,),
        "retrieval_ctx": (probe.context if probe else None, lambda text: parse_contexts(text)[0]),
        "retrieval_sequences": (probe.sequences if probe else None,),
        "bld": (library.tokens if library else None, parse_tokens),
        "bld_epochs": (library.epochs if library else 2,), "bld_lr": (library.lr if library else 1e-3,),
        "bld_stream": (library.stream if library else False,),
        "share_teacher": (config.share_teacher,),
    }  # fmt: skip
    _refuse_changes(given, {name: (getattr(options, name), *record) for name, record in recorded.items()})
    if options.budget is not None and options.budget != config.budget:
        raise CompressorError(
            "the budget options differ from the budget the search in --out started with: --resume continues "
            "it as it started (leave them out, or start a new search)"
        )
    if options.strategy_options:
        kind = get_strategy(config.strategy)
        typed, started = build_options(kind, options.strategy_options), build_options(kind, config.options)
        written = options.strategy_options
        _refuse_changes(given, {name: (getattr(typed, name), getattr(started, name)) for name in written})


def _refuse_changes(given: Collection[str], values: dict[str, tuple]) -> None:
    """`values`: option -> (value given, value recorded[, a parse of the given text into the recorded form])."""
    for name, (value, recorded, *parse) in values.items():
        if value is None or name not in given:
            continue
        if (parse[0](value) if parse else value) != recorded:
            used = "is not used by" if recorded is None else f"differs from the {recorded} of"
            raise OptionError(
                name,
                f"{value} {used} the search in --out: --resume continues it as it started (leave it out, or "
                "start a new search)",
            )
