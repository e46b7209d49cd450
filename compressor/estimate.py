"""What `compress estimate` shows of one architecture: parameters, memory at a context and batch, the
verdict against a memory limit, throughput on a GPU and, optionally, the comparison with a transformer
baseline. It sits above `compressor.budget` (the hybrid's estimates) and `compressor.baselines` (the
transformer's), which it joins."""

from __future__ import annotations

from dataclasses import dataclass

from compressor import baselines
from compressor.baselines import Comparison
from compressor.budget import (
    DEFAULT_PRECISION,
    DEFAULT_PREFILL_CHUNK,
    GPUSpec,
    MemoryEstimate,
    Precision,
    ThroughputEstimate,
    Workload,
    active_parameters,
    estimate_memory,
    estimate_throughput,
    gpu_from_options,
    largest_batch,
    parameter_counts,
    parse_context,
    parse_size,
)
from compressor.config import HybridConfig
from compressor.errors import OptionError


@dataclass(frozen=True)
class Report:
    """Parameters, memory at a context and batch, the verdict against a memory limit, and (with a GPU) the
    throughput of a workload: what `compress estimate` shows."""

    parameters: dict[str, int]
    memory: MemoryEstimate
    limit: int | None = None  # bytes of --target-mem
    largest_batch: bool = False  # the batch is the largest that fits
    gpu: GPUSpec | None = None
    throughput: ThroughputEstimate | None = None
    versus: Comparison | None = None  # against a transformer baseline (`vs`), on the same workload and GPU
    active_parameters: int | None = None  # what one token uses (`active_parameters`)

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    @property
    def headroom(self) -> int | None:
        return None if self.limit is None else self.memory.headroom(self.limit)

    def to_dict(self) -> dict:
        target = None
        if self.limit is not None:
            target = {"bytes": self.limit, "fits": self.headroom >= 0, "headroom": self.headroom}
        return {
            "parameters": {**self.parameters, "total": self.total_parameters, "active": self.active_parameters},
            "memory": self.memory.to_dict(),
            "target": target,
            "throughput": self.throughput.to_dict() if self.throughput is not None else None,
            "versus": self.versus.to_dict() if self.versus is not None else None,
        }


def report(
    config: HybridConfig,
    *,
    ctx: str | None = None,
    batch: str = "1",
    target_mem: str | None = None,
    gpu: str | None = None,
    gpu_bandwidth: str | None = None,
    gpu_tflops: float | None = None,
    isl: str | None = None,
    osl: str | None = None,
    precision: Precision = DEFAULT_PRECISION,
    prefill_chunk: int | None = None,
    vs: str | None = None,
) -> Report:
    """Everything `compress estimate` shows, from the written form of its options and the deployment's
    `precision` (`Precision.from_options` reads the dtype options). `ctx` defaults to the
    config's max_position_embeddings; `batch` is a number or 'max' (the most that fit --target-mem or the
    GPU's memory); `vs` names a transformer baseline (`compressor.baselines.load_baseline`) to compare the
    throughput with, each at its own batch. Without `ctx`, a workload of `isl` + `osl` tokens is sized at
    that context, so the memory shown is the workload's."""
    if ctx is not None:
        context = parse_context(ctx)
    elif isl is not None and osl is not None:
        context = parse_context(isl) + parse_context(osl)
    else:
        context = config.max_position_embeddings
    limit = parse_size(target_mem) if target_mem is not None else None
    spec = gpu_from_options(gpu, gpu_bandwidth, gpu_tflops, limit)
    if spec is None and ctx is not None:  # without --ctx they size the context; with it, only the throughput
        for name, value in (("isl", isl), ("osl", osl)):
            if value is not None:
                raise OptionError(name, "sizes the throughput request: give a GPU (--gpu, or --gpu-bandwidth and "
                                  "--gpu-tflops)")  # fmt: skip
    chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    if chunk < 0:
        raise OptionError("prefill_chunk", f"must be >= 0 (0 leaves out the activations), got {chunk}")
    dtypes = dict(precision=precision, prefill_chunk=chunk)
    largest = str(batch).strip().lower() == "max"
    if largest:
        fill = limit if limit is not None else spec.memory if spec is not None else None
        if fill is None:
            raise OptionError("batch", "max needs --target-mem or --gpu: the memory to fill")
        batch_size = max(largest_batch(config, context, fill, **dtypes), 1)
    elif str(batch).strip().isdigit() and int(batch) > 0:
        batch_size = int(batch)
    else:
        raise OptionError("batch", f"{batch!r} is not a positive whole number or 'max'")
    memory = estimate_memory(config, context, batch_size, **dtypes)
    throughput = None
    if spec is not None:
        workload = Workload.for_context(
            context,
            "max" if largest else batch_size,
            input_tokens=parse_context(isl) if isl is not None else None,
            output_tokens=parse_context(osl) if osl is not None else None,
        )
        throughput = estimate_throughput(config, workload, spec, memory_limit=limit, **dtypes)
    versus = None
    if vs is not None:
        if spec is None:
            raise OptionError("vs", "compares throughput: give a GPU (--gpu, or --gpu-bandwidth and --gpu-tflops)")
        versus = baselines.compare(config, baselines.load_baseline(vs), workload, spec, memory_limit=limit, **dtypes)
    return Report(parameter_counts(config), memory, limit, largest, spec, throughput, versus, active_parameters(config))
