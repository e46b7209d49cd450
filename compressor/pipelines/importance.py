"""`compress importance`: a checkpoint and calibration data in, an importance folder out.

1. output check: `out` new (or `overwrite`), not one of the inputs, room for the scores;
2. calibration (`pipelines.source.calibrate`): activations on `config.samples` sequences score every prunable
   axis, and with a drop-one metric each block's removal; under `torchrun --nproc-per-node N` the model is
   sharded across the processes, each scores its share;
3. the scores written aside and renamed into `out` (the main process).

Pruning, searches and strategies reuse the folder (`--importance`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor import distributed
from compressor.config import HybridConfig
from compressor.data import tokenizer_file
from compressor.errors import OptionError
from compressor.importance import Importance, scores_bytes
from compressor.outputs import atomic_output, check_free_space, check_output
from compressor.pipelines.source import CalibrationConfig, calibrate


@dataclass
class ImportanceRecord:
    """What was written: the folder and its scores."""

    out: Path
    scores: Importance

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), **self.scores.meta, "block_influence": self.scores.block_influence.tolist()}


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
    on_tokens: Callable[[int, int], None] | None = None,
) -> ImportanceRecord | None:
    """Score `config.model` on `config.data` and write the folder `out` (module docstring). Progress:
    `on_tokens(tokens, total)` after each batch, on the main process. Returns None on the other processes
    of a torchrun."""
    if config.data is None:
        raise OptionError("data", "is needed to estimate importance")
    out = Path(out)
    inputs = (config.model, config.data, tokenizer_file(config.tokenizer))
    check_output(out, overwrite=overwrite, inputs=inputs)
    check_free_space(out, scores_bytes(HybridConfig.from_file(config.model)), "the importance scores")
    total = scoring_tokens(config)
    with distributed.session(config.device) as world:
        advance = (lambda n: on_tokens(n * world.size, total)) if on_tokens and world.is_main else None
        source = calibrate(config, world=world, on_batch=advance)
    if not world.is_main:
        return None
    with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
        source.importance.save(tmp)
    return ImportanceRecord(out, source.importance)
