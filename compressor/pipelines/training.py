"""`compress distill` and `compress train`: a run (a `train.TrainConfig`) planned or trained.

A dry run plans the memory per process (`preview.preview_training`: from the configs alone, so the student
and teacher may be presets), checks the data and output folder it is given as the run would, and trains
nothing; a run needs its data and its folder, then trains, or resumes, as `compressor.train` does (logit
distillation with a teacher, plain language-model training without one).
"""

from __future__ import annotations

from compressor.errors import OptionError
from compressor.pipelines.preview import MemoryPreview, preview_training
from compressor.train import Reporter, TrainConfig, TrainResult, check_run, train


def train_or_preview(
    config: TrainConfig,
    *,
    dry_run: bool = False,
    nproc: int | None = None,
    gpu: str | None = None,
    reporter: Reporter | None = None,
) -> TrainResult | MemoryPreview:
    """The memory plan of `config` at `nproc` processes of `gpu` (`dry_run`, after the checks of the data
    and output paths given: `train.check_run`), else the finished run."""
    if dry_run:
        check_run(config)
        return preview_training(config, nproc=nproc, gpu=gpu)
    for name in ("data", "out"):
        if getattr(config, name) is None:
            raise OptionError(name, "is needed (or --dry-run to only plan the memory)")
    return train(config, reporter)
