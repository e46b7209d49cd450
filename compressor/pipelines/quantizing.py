"""`compress quantize`: a checkpoint in, its ModelOpt-quantized Hugging Face export out.

Load the model, read `samples` calibration sequences, quantize and calibrate with ModelOpt (the hybrid
recipe of `compressor.quantize`), export (weights + scales + hf_quant_config.json), and report what the
files take next to what the budget model predicted for that format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor import planning
from compressor.budget import weight_bytes
from compressor.checkpoint import check_weights, checkpoint_bytes, load_model, parse_dtype
from compressor.data import DataSpec, Need, read_sequences, tokenizer_file
from compressor.distributed import World, resolve_device
from compressor.errors import OptionError
from compressor.outputs import check_free_space, check_output
from compressor.quantize import HF_QUANT_CONFIG, QuantRecipe, export_quantized, quantize, stored_weight_bytes

BUDGET_DTYPES = {"fp8": "fp8", "nvfp4": "fp4"}  # formats the budget model sizes


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize to and what to calibrate on."""

    recipe: QuantRecipe
    data: str
    samples: int = 512
    seq_len: int = 2048
    batch_size: int = 1
    dtype: str = "bfloat16"  # of the unquantized tensors of the export
    tokenizer: str | None = None
    text_field: str = "text"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, low in (("samples", 1), ("seq_len", 2), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise OptionError(name, f"must be at least {low}, got {getattr(self, name)}")
        parse_dtype(self.dtype)  # an unknown name now, not after ModelOpt's import

    @property
    def data_spec(self) -> DataSpec:
        """The calibration data: the first `samples` sequences, all of them needed."""
        need = Need(self.samples, f"--samples {self.samples}", "--samples")
        return DataSpec(self.data, self.seq_len, self.tokenizer, self.text_field, self.samples, need=need)


@dataclass
class QuantizeRecord:
    """What was written: the format, the modules left in high precision, the stored weight bytes (and
    the budget model's prediction for the format, when it sizes it)."""

    format: str
    quant_algo: str
    excluded: list[str]
    stored_bytes: int
    budget_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def quantize_checkpoint(
    model_path: str | Path,
    config: QuantizeConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> QuantizeRecord:
    """Quantize, calibrate and export `model_path` into `out` (module docstring)."""
    check_output(out, overwrite=overwrite, inputs=(model_path, config.data, tokenizer_file(config.tokenizer)))
    check_free_space(out, checkpoint_bytes(model_path), "the quantized checkpoint")  # never larger than the source
    device = resolve_device(config.device)
    stored = check_weights(model_path)  # a config.json its weights contradict is refused before it is sized
    plan = planning.forward_plan("quantization's calibration", stored, seq_len=config.seq_len,
                                 batch_size=config.batch_size, dtype=planning.plan_dtype(stored, None))  # fmt: skip
    shape = f"{config.batch_size} x {config.seq_len:,} tokens a batch"
    planning.check_plan_fits(plan, World(device=device), shape=shape, levers="--seq-len or --batch-size",
                             dry_run=False, torchrun=False)  # fmt: skip
    model = load_model(model_path, device=device)
    arch = model.config
    sequences = read_sequences(config.data_spec, model_path, eos_id=arch.eos_id, vocab_size=arch.vocab_size)
    batches = sequences.batches(config.batch_size, shuffle=False, drop_last=False)
    quantize(model, config.recipe, batches, on_batch=on_batch)
    export_quantized(model, out, dtype=config.dtype, tokenizer_from=model_path, overwrite=overwrite)
    quantization = json.loads((Path(out) / HF_QUANT_CONFIG).read_text())["quantization"]
    budget_dtype = BUDGET_DTYPES.get(config.recipe.format)
    return QuantizeRecord(
        format=config.recipe.format,
        quant_algo=quantization["quant_algo"],
        excluded=quantization.get("exclude_modules", []),
        stored_bytes=stored_weight_bytes(out).total,
        budget_bytes=weight_bytes(arch, budget_dtype) if budget_dtype else None,
    )
