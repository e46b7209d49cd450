"""`compress prune`: from a calibrated source and a budget to a pruned checkpoint and the record of how it
was chosen.

1. candidates: the strategy proposes (or `export` names one shape, ModelOpt's export_config);
2. ranking: the first `top_k` that meet the budget exactly are scored against the source on held-out
   calibration sequences (KL(source || pruned) by default, or the pruned model's LM loss), lowest first;
3. output, written aside and renamed into place: the pruned checkpoint, `compression.json` (source
   fingerprint, budget, strategy and options, every scored candidate, importance provenance) and, for
   uniform results, `export_config.json` (the shape in ModelOpt / Megatron-Bridge terms, to reproduce it at
   scale).

A dry run (`prune_or_preview`) lists what `preview.plan`, the same search on a config alone (no weights, no
scores), finds and plans the memory of each stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor import distributed
from compressor.budget import Budget
from compressor.checkpoint import checkpoint_bytes
from compressor.data import tokenizer_file
from compressor.errors import BudgetError, CompressorError, OptionError, first_line
from compressor.outputs import atomic_output, check_free_space, check_output, read_json
from compressor.pipelines.preview import (
    CompressionPreview,
    CompressionStages,
    modelopt_warning,
    plan,
    preview_compression,
)
from compressor.pipelines.ranking import ScoreSpec, check_scoring, proxy_scorer, rank, retrieval_record
from compressor.pipelines.records import COMPRESSION_FILE, CompressionRecord, write_json
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
from strategies import Strategy, build_options, get_strategy
from strategies.base import describe_stats, options_to_dict
from strategies.export_config import ExportConfigOptions, ExportConfigStrategy, export_layers

EXPORT_CONFIG_FILE = "export_config.json"
EXPORT_LAYERS_FILE = "export_layers.json"  # the blocks kept, to rebuild the same model with Megatron


@dataclass(frozen=True)
class PruneConfig:
    """What to prune to and how to choose. `options` are the strategy's (text as typed on the command line,
    or typed values); `export` replaces the search by one named shape."""

    budget: Budget | None = None
    strategy: str = "minitron"
    options: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] | None = None
    score: str = "kl"
    retrieval_weight: float = 1.0  # of the retrieval term in `kl+retrieval` / `loss+retrieval`

    def __post_init__(self) -> None:
        check_scoring(self.score, self.retrieval_weight)
        if self.budget is None and self.export is None:
            raise BudgetError(
                "give a budget (--target-mem, --target-params, --target-active-params, or --min-speedup with --gpu) "
                "or name the shape with --export-config"
            )
        self.build_strategy()  # checks the strategy's name and options now, before any work

    def build_strategy(self) -> Strategy:
        if self.export is not None:
            return ExportConfigStrategy(ExportConfigOptions(shape=self.export))
        strategy = get_strategy(self.strategy)
        return strategy(build_options(strategy, self.options))


def read_export_config(text: str) -> dict[str, Any]:
    """ModelOpt's export_config, written as a JSON object or the path of a JSON file."""
    if not text.lstrip().startswith(("{", "[")):
        if not Path(text).exists():
            raise OptionError("export_config", f"is not a JSON object and no file {text} exists: give either")
        try:
            return read_json(text, "an export_config (a JSON object)")
        except CompressorError as exc:
            raise OptionError("export_config", f"cannot be read: {exc}") from None
    try:
        shape = json.loads(text)
    except (RecursionError, json.JSONDecodeError) as exc:
        raise OptionError("export_config", f"is not a valid JSON object ({first_line(exc)})") from None
    if not isinstance(shape, dict):
        raise OptionError("export_config", "must be a JSON object")
    return shape


@dataclass(frozen=True)
class PruneOptions:
    """`compress prune`'s options as written (`export_config` as JSON text or a file's path; the defaults are
    the command's): the PruneConfig (`config`) and a run's CalibrationConfig (`calibration`) are built from
    them, a dry run plans with them (`prune_or_preview`)."""

    data: str | None = None
    budget: Budget | None = None
    strategy: str = "minitron"
    strategy_options: dict[str, str] = field(default_factory=dict)  # the strategy's own, as written
    export_config: str | None = None
    importance_dir: str | Path | None = None
    samples: int = 1024
    score_samples: int = 64
    seq_len: int = 4096
    batch_size: int = 1
    score: str = "kl"
    retrieval_weight: float = 1.0
    tokenizer: str | Path | None = None
    text_field: str = "text"
    device: str = "auto"
    dtype: str | None = None
    retrieval_task: str = "phonebook"
    retrieval_ctx: str | None = None  # one length, e.g. '4k' (default: the budget's context, else 1k)
    retrieval_sequences: int = 8
    nproc: int | None = None  # a dry run's processes (default: the fewest that fit)

    def config(self) -> PruneConfig:
        """What to prune to and how to choose, checked (the strategy's options too)."""
        export = read_export_config(self.export_config) if self.export_config is not None else None
        return PruneConfig(self.budget, self.strategy, dict(self.strategy_options), export, self.score,
                           self.retrieval_weight)  # fmt: skip

    @property
    def uses_probe(self) -> bool:
        return ScoreSpec(self.score, self.retrieval_weight).retrieval

    def calibration(self, model: str | Path) -> CalibrationConfig:
        """How a run reads `model` and the data: held-out scoring only with data, the retrieval probe (at the
        budget's context unless `retrieval_ctx`) when the score uses it."""
        probe = None
        if self.uses_probe:
            probe = retrieval_probe(retrieval_task=self.retrieval_task, retrieval_ctx=self.retrieval_ctx,
                                    retrieval_sequences=self.retrieval_sequences,
                                    context=self.budget.context if self.budget else 1024)  # fmt: skip
        return CalibrationConfig.from_options(
            model, self.data, importance_dir=self.importance_dir, samples=self.samples,
            score_samples=self.score_samples if self.data is not None else 0, seq_len=self.seq_len,
            batch_size=self.batch_size, tokenizer=self.tokenizer, text_field=self.text_field, device=self.device,
            dtype=self.dtype, retrieval=probe,
        )  # fmt: skip


def prune_or_preview(
    model: str | Path,
    out: str | Path | None,
    options: PruneOptions,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> CompressionRecord | CompressionPreview | None:
    """`compress prune` from its options: with `dry_run`, the preview (the candidates that meet the budget and
    the memory of each stage; `model` may be a preset or a config.json) after the checks of the paths given
    (`check_paths`); else the pruned checkpoint written to `out` (`prune_checkpoint`; None on the other
    processes of a torchrun)."""
    config = options.config()
    check_probe_applies(options, "a --score with retrieval")
    if dry_run:
        check_paths(model, out, data=options.data, importance_dir=options.importance_dir, overwrite=overwrite)
        stages = CompressionStages(options.seq_len, options.batch_size, options.score_samples,
                                   options.importance_dir is None, options.dtype)  # fmt: skip
        return preview_compression(model, config, stages, nproc=options.nproc, device=options.device)
    if out is None:
        raise OptionError("out", "is needed for the pruned checkpoint (or --dry-run to only list candidates)")
    return prune_checkpoint(options.calibration(model), config, out, overwrite=overwrite, say=say)


def prune_checkpoint(
    calibration: CalibrationConfig,
    config: PruneConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> CompressionRecord | None:
    """`compress prune` from paths, in its order: a budget some candidate meets (on the config alone, before
    anything is loaded), the held-out score's settings, the output folder; then one session (the source
    sharded under torchrun): calibrate, choose, prune and write. Returns None on the other processes of a
    torchrun, and `say`s only on the main one."""
    plan(load_config_or_preset(calibration.model)[0], config)
    if config.export is None and calibration.data is not None:  # candidates are scored on held-out data
        check_scoring(config.score, config.retrieval_weight, calibration.score_samples)
    inputs = (calibration.model, calibration.data, calibration.importance_dir, tokenizer_file(calibration.tokenizer))
    check_output(out, overwrite=overwrite, inputs=inputs)
    with distributed.session(calibration.device) as world:
        tell = say if world.is_main else lambda text: None
        source = calibrate(calibration, world=world, say=tell)
        record = prune_to_budget(source, config, out, overwrite=overwrite, say=tell)
    return record if world.is_main else None


def prune_to_budget(
    source: Source, config: PruneConfig, out: str | Path, *, overwrite: bool = False, say: Callable[[str], None] = print
) -> CompressionRecord:
    """Choose, prune and write (module docstring); returns what `compression.json` records."""
    started = time.perf_counter()
    calibration = source.config
    inputs = (source.path, calibration.data, calibration.importance_dir, tokenizer_file(calibration.tokenizer))
    check_output(out, overwrite=overwrite, inputs=inputs)
    check_free_space(out, checkpoint_bytes(source.path), "the pruned checkpoint")  # never larger than the source
    strategy = config.build_strategy()
    arch = source.model.config
    proposals = strategy.propose(arch, source.importance, config.budget)
    if strategy.stats:
        say(describe_stats(strategy.stats))
    if config.export is not None and config.budget is not None:
        missed = config.budget.violations(proposals[0].config(arch), arch)
        if missed:
            raise OptionError("export_config", f"names a shape that misses the budget: {'; '.join(missed)}")
    scorer = None
    if source.held_out or ScoreSpec(config.score, config.retrieval_weight).retrieval:
        scorer = proxy_scorer(source, config.score, config.retrieval_weight)
    candidates = rank(
        proposals,
        arch,
        config.budget,
        limit=strategy.top_k,
        scorer=scorer,
        smallest=strategy.smallest(arch),
        say=say,
    )
    warning = modelopt_warning(candidates, arch, strategy)
    if warning:
        say(warning)
    record = CompressionRecord.of(
        source.info, arch, source.importance, source.config.importance_dir, candidates, budget=config.budget,
        strategy=strategy.name, strategy_options=options_to_dict(strategy.options),
        score_metric=scorer.metric if scorer else None, retrieval=retrieval_record(scorer, config.retrieval_weight),
        seconds=round(time.perf_counter() - started, 2),
    )  # fmt: skip
    if not source.world.is_main:  # the others slice their share of a sharded source for the main one
        write_pruned(source.model, source.importance, candidates[0].target, out, world=source.world)
        return record
    with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_pruned(source.model, source.importance, candidates[0].target, tmp, tokenizer_from=source.path)
        write_json(tmp / COMPRESSION_FILE, record.to_dict())
        if record.export_config is not None:
            write_json(tmp / EXPORT_CONFIG_FILE, record.export_config)
            write_json(tmp / EXPORT_LAYERS_FILE, export_layers(source.model.config, record.chosen.target))
    return record
