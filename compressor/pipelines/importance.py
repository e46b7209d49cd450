"""`compress importance`: a checkpoint and calibration data in, an importance folder out.

1. output check: `out` new (or `overwrite`), not one of the inputs, room for the scores; an estimate of
   `out` that a kill stopped is continued (`resume`) or started again (`overwrite`), never silently lost;
2. calibration (`pipelines.source.calibrate`): activations on `config.samples` sequences score every prunable
   axis, and with a drop-one metric each block's removal; under `torchrun --nproc-per-node N` the model is
   sharded across the processes, each scores its share. The estimate is saved as it goes (about every 5%
   of a pass, and at each drop-one round) in `staging(out)`, `.NAME.incoming/progress.safetensors`;
3. the scores written aside and renamed into `out` (the main process), then the progress removed.

Pruning, searches and strategies reuse the folder (`--importance`). A dry run (`importance_or_preview`)
plans the memory of the scoring instead (`preview.preview_importance`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor import distributed
from compressor.config import HybridConfig
from compressor.data import tokenizer_file
from compressor.errors import CompressorError, OptionError
from compressor.importance import PROGRESS_FILE, Importance, ImportanceOptions, saved_position, scores_bytes
from compressor.outputs import atomic_output, check_free_space, check_output, output_lock, staging
from compressor.pipelines.preview import MemoryPreview, preview_importance
from compressor.pipelines.source import CalibrationConfig, calibrate, check_paths, check_probe_applies, retrieval_probe


@dataclass
class ImportanceRecord:
    """What was written: the folder and its scores."""

    out: Path
    scores: Importance

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), **self.scores.meta, "block_influence": self.scores.block_influence.tolist()}


@dataclass(frozen=True)
class ImportanceRunOptions:
    """`compress importance`'s options as written (the defaults are the command's): a run's CalibrationConfig
    (`calibration`) is built from them, a dry run plans with them (`importance_or_preview`)."""

    data: str | None = None
    scoring: ImportanceOptions = field(default_factory=ImportanceOptions)  # reductions, signal, drop-one
    samples: int = 1024
    seq_len: int = 4096
    batch_size: int = 1
    tokenizer: str | Path | None = None
    text_field: str = "text"
    device: str = "auto"
    dtype: str | None = None
    retrieval_task: str = "phonebook"  # the probe of a drop-one by retrieval
    retrieval_ctx: str | None = None  # one length, e.g. '4k' (default: 1k)
    retrieval_sequences: int = 8
    nproc: int | None = None  # a dry run's processes (default: the fewest that fit)
    gpu: str | None = None  # a dry run's GPU (default: the local device)

    @property
    def uses_probe(self) -> bool:
        return self.scoring.drop_one == "retrieval"

    def calibration(self, model: str | Path) -> CalibrationConfig:
        """How a run reads `model` and the data, with the retrieval probe of a drop-one by retrieval."""
        probe = None
        if self.uses_probe:
            probe = retrieval_probe(retrieval_task=self.retrieval_task, retrieval_ctx=self.retrieval_ctx,
                                    retrieval_sequences=self.retrieval_sequences, context=1024)  # fmt: skip
        return CalibrationConfig.from_options(
            model, self.data, importance=self.scoring, samples=self.samples, seq_len=self.seq_len,
            batch_size=self.batch_size, tokenizer=self.tokenizer, text_field=self.text_field, device=self.device,
            dtype=self.dtype, retrieval=probe,
        )  # fmt: skip


def scoring_tokens(config: CalibrationConfig) -> int:
    """Tokens the calibration runs through the model: one pass, and one per round of a drop-one by KL or loss
    (retrieval's drop-one scores its own probe)."""
    drop_one, rounds = config.importance.drop_one, config.importance.iterative_rounds
    passes = 1 + (0 if drop_one in ("none", "retrieval") else max(1, rounds))
    return config.samples * config.seq_len * passes


def write_importance(
    config: CalibrationConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_tokens: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] = print,
) -> ImportanceRecord | None:
    """Score `config.model` on `config.data` and write the folder `out` (module docstring). Progress:
    `on_tokens(tokens, total)` after each batch, on the main process. Returns None on the other processes
    of a torchrun. The estimate is saved as it goes in `staging(out)`; `resume` continues one a kill
    stopped, which a run without it refuses to start over unless `overwrite`."""
    if config.data is None:
        raise OptionError("data", "is needed to estimate importance")
    out = Path(out)
    inputs = (config.model, config.data, tokenizer_file(config.tokenizer))
    saved = _check_start(out, inputs, overwrite=overwrite, resume=resume)
    arch = HybridConfig.from_file(config.model)
    rounds, most = config.importance.iterative_rounds, arch.num_blocks - 1
    if rounds > most:  # each round removes one block, and one is left
        raise OptionError("iterative_rounds", f"removes a block a round: at most {most} for {arch.num_blocks} blocks, "
                          f"got {rounds}")  # fmt: skip
    check_free_space(out, scores_bytes(arch), "the importance scores")
    total = scoring_tokens(config)
    with distributed.session(config.device) as world, output_lock(out) if world.is_main else nullcontext():
        if world.is_main:
            if resume:
                say(f"continuing the estimate of {out} from its last save ({saved_position(saved).describe()})")
            else:
                saved.unlink(missing_ok=True)  # --overwrite: start again
            saved.parent.mkdir(parents=True, exist_ok=True)
        distributed.barrier(world)
        advance = (lambda n: on_tokens(n * world.size, total)) if on_tokens and world.is_main else None
        try:
            source = calibrate(config, world=world, on_batch=advance, progress=saved)
        except BaseException:
            if world.is_main and not saved.is_file():  # stopped before anything was saved: nothing left behind
                shutil.rmtree(saved.parent, ignore_errors=True)
            raise
        if not world.is_main:
            return None
        with atomic_output(out, overwrite=overwrite or resume, inputs=inputs) as tmp:
            source.importance.save(tmp)
        shutil.rmtree(saved.parent)  # only now: a kill before leaves the progress to resume from
    return ImportanceRecord(out, source.importance)


def _check_start(out: Path, inputs: tuple, *, overwrite: bool, resume: bool) -> Path:
    """Refuse a run that cannot start as asked: the output's checks (`check_output`), and an estimate of
    `out` stopped before its end that would be started over without `overwrite`, or is missing for
    `resume`. Returns where the estimate's progress is saved."""
    saved = staging(out) / PROGRESS_FILE
    if resume:
        if overwrite:
            raise OptionError("resume", f"continues the estimate of {out}, --overwrite starts it again: give one")
        if not saved.is_file():
            raise CompressorError(f"nothing to resume: no estimate of {out} was stopped ({saved} is missing); start "
                                  "without --resume")  # fmt: skip
    check_output(out, overwrite=overwrite or resume, inputs=inputs)
    if saved.is_file() and not (resume or overwrite):
        raise CompressorError(f"an estimate of {out} was stopped before its end (its progress is in {saved.parent}): "
                              "continue it with --resume, or pass --overwrite to start again")  # fmt: skip
    return saved


def importance_or_preview(
    model: str | Path,
    out: str | Path | None,
    options: ImportanceRunOptions,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    on_tokens: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] = print,
) -> ImportanceRecord | MemoryPreview | None:
    """`compress importance` from its options: with `dry_run`, the memory plan of the scoring (`model` may be
    a preset or a config.json) after the checks of the paths given (`check_paths`); else the folder `out`
    written (`write_importance`; None on the other processes of a torchrun)."""
    check_probe_applies(options, "--drop-one retrieval")
    if dry_run:
        check_paths(model, None, data=options.data)
        if out is not None:
            inputs = (model, options.data, tokenizer_file(options.tokenizer))
            _check_start(Path(out), inputs, overwrite=overwrite, resume=resume)
        return preview_importance(model, seq_len=options.seq_len, batch_size=options.batch_size,
                                  drop_one=options.scoring.drop_one != "none", dtype=options.dtype,
                                  nproc=options.nproc, gpu=options.gpu, device=options.device)  # fmt: skip
    if options.data is None or out is None:
        raise OptionError("data" if options.data is None else "out", "is needed (or --dry-run to only plan the memory)")
    return write_importance(options.calibration(model), out, overwrite=overwrite, resume=resume, on_tokens=on_tokens,
                            say=say)  # fmt: skip
