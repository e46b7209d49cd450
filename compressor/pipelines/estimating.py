"""`compress estimate`: a checkpoint folder, config.json or preset in, its costs out.

1. the architecture (a folder's config.json checked against its weights, so that the counts describe them);
2. a quantized checkpoint's stored weights, whose format is the deployment default;
3. the report (`compressor.estimate.report`): parameters, inference memory at a context, the verdict against
   a memory budget, the roofline throughput on a GPU and the comparison with a transformer;
4. with `measure`, the model built on `device`: its cache allocated and its decoding timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.config import HybridConfig
from compressor.presets import load_config_or_preset


@dataclass(frozen=True)
class EstimateConfig:
    """What to estimate, written as on the command line ('128k', '22GiB', 'h100', 'max')."""

    ctx: str | None = None  # default: isl + osl when both are given, else max_position_embeddings
    batch: str = "1"  # or 'max': the most that fit the memory
    target_mem: str | None = None
    gpu: str | None = None
    gpu_bandwidth: str | None = None
    gpu_tflops: float | None = None
    isl: str | None = None
    osl: str | None = None
    weight_dtype: str | None = None  # default: a quantized checkpoint's, else bf16
    kv_dtype: str | None = None
    ssm_dtype: str | None = None
    prefill_chunk: int | None = None
    vs: str | None = None  # a transformer to compare throughput with
    measure: bool = False
    device: str = "auto"  # of the measurement


@dataclass
class EstimateRecord:
    """The estimate of `model` (the report of `compressor.estimate`), its stored weights when quantized and
    the measurement when asked for."""

    model: str
    config: HybridConfig
    weight_dtype: str
    report: Any
    stored: Any = None  # quantize.stored_weight_bytes of a quantized checkpoint
    measured: Any = None  # budget.measure's result

    def to_dict(self) -> dict[str, Any]:
        measured = self.measured.to_dict() if self.measured else None
        return {"model": self.model, **self.report.to_dict(), "measured": measured}


def estimate_model(model: str, config: EstimateConfig) -> EstimateRecord:
    """Estimate `model`'s costs (module docstring)."""
    from compressor import budget
    from compressor.checkpoint import check_weights
    from compressor.distributed import resolve_device
    from compressor.estimate import report as estimate_report
    from compressor.quantize import is_quantized_checkpoint, stored_weight_bytes

    arch, folder = load_config_or_preset(model)
    if folder is not None:
        check_weights(folder, arch)  # the estimate is of these weights' architecture
    stored = stored_weight_bytes(folder) if folder is not None and is_quantized_checkpoint(folder) else None
    weight_dtype = config.weight_dtype or (stored.budget_dtype if stored else None) or "bf16"
    precision = budget.Precision.from_options(weight_dtype, config.kv_dtype, config.ssm_dtype)
    report = estimate_report(
        arch, ctx=config.ctx, batch=config.batch, target_mem=config.target_mem, gpu=config.gpu,
        gpu_bandwidth=config.gpu_bandwidth, gpu_tflops=config.gpu_tflops, isl=config.isl, osl=config.osl,
        precision=precision, prefill_chunk=config.prefill_chunk, vs=config.vs,
    )  # fmt: skip
    measured = None
    if config.measure:
        memory = report.memory
        device = resolve_device(config.device)
        measured = budget.measure(arch, memory.context, memory.batch, device=device, precision=precision)
    return EstimateRecord(str(model), arch, weight_dtype, report, stored, measured)
