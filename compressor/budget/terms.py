"""Budgets: what a compressed architecture must meet."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from compressor.budget.counts import active_parameters, num_parameters
from compressor.budget.memory import DEFAULT_PREFILL_CHUNK, MemoryEstimate, estimate_memory
from compressor.budget.roofline import GPUSpec, Workload, gpu_from_options, speedup
from compressor.budget.units import (
    CACHE_DTYPES,
    SSM_DTYPES,
    format_bytes,
    normalize_dtype,
    parse_context,
    parse_count,
    parse_params,
    parse_size,
)
from compressor.config import HybridConfig
from compressor.errors import BudgetError, OptionError


@dataclass(frozen=True)
class Budget:
    """What a compressed architecture must meet: inference memory at a context (and batch), a parameter
    count, and/or a throughput ratio to the original model on a workload and GPU. Unset limits are off."""

    memory: int | None = None  # bytes, at `context` tokens x `batch`
    context: int = 8192
    batch: int = 1
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    ssm_dtype: str | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    params: int | None = None
    active_params: int | None = None  # parameters a token uses (`active_parameters`; differs for MoE models)
    gpu: GPUSpec | None = None
    min_speedup: float | None = None  # tokens/s of the candidate / tokens/s of the original
    workload: Workload | None = None  # default: `context` split as in `compress estimate`

    def __post_init__(self) -> None:
        if self.min_speedup is not None and self.gpu is None:
            raise BudgetError("a throughput budget (--min-speedup) needs a GPU (--gpu)")
        if self.memory is None and self.params is None and self.active_params is None and self.min_speedup is None:
            raise BudgetError(
                "no budget given: set a memory (--target-mem), parameter, active-parameter or speedup target"
            )

    def memory_of(self, config: HybridConfig) -> MemoryEstimate:
        return estimate_memory(
            config,
            self.context,
            self.batch,
            weight_dtype=self.weight_dtype,
            kv_dtype=self.kv_dtype,
            ssm_dtype=self.ssm_dtype,
            prefill_chunk=self.prefill_chunk,
        )

    @classmethod
    def from_options(
        cls,
        *,
        target_mem: str | None = None,
        ctx: str = "8k",
        batch: int = 1,
        target_params: str | None = None,
        target_active_params: str | None = None,
        gpu: str | None = None,
        gpu_bandwidth: str | None = None,
        gpu_tflops: float | None = None,
        min_speedup: float | None = None,
        isl: str | None = None,
        osl: str | None = None,
        weight_dtype: str = "bf16",
        kv_dtype: str | None = None,
        ssm_dtype: str | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> Budget | None:
        """A budget from its written form ('19.66GiB', '128k', '9B', 'a10g', '8k' ...); None when no limit is
        given. Keyword names are those of the command-line options."""
        if target_mem is None and target_params is None and target_active_params is None and min_speedup is None:
            return None
        if batch < 1:
            raise OptionError("batch", f"must be at least 1, got {batch}")
        if min_speedup is not None and not (math.isfinite(min_speedup) and min_speedup > 0):
            raise OptionError("min_speedup", f"must be a positive number, got {min_speedup}")
        if prefill_chunk < 0:
            raise OptionError("prefill_chunk", f"must be >= 0 (0 leaves out the activations), got {prefill_chunk}")
        memory = parse_size(target_mem) if target_mem is not None else None
        active = (
            parse_count(target_active_params, "active parameter count") if target_active_params is not None else None
        )
        context = parse_context(ctx)
        workload = None
        if isl is not None or osl is not None:
            workload = Workload.for_context(
                context,
                batch,
                input_tokens=parse_context(isl) if isl is not None else None,
                output_tokens=parse_context(osl) if osl is not None else None,
            )
        return cls(
            memory=memory,
            context=context,
            batch=batch,
            weight_dtype=normalize_dtype(weight_dtype),
            kv_dtype=normalize_dtype(kv_dtype, CACHE_DTYPES, "KV cache dtype") if kv_dtype else None,
            ssm_dtype=normalize_dtype(ssm_dtype, SSM_DTYPES, "SSM state dtype") if ssm_dtype else None,
            prefill_chunk=prefill_chunk,
            params=parse_params(target_params) if target_params is not None else None,
            active_params=active,
            gpu=gpu_from_options(gpu, gpu_bandwidth, gpu_tflops, memory),
            min_speedup=min_speedup,
            workload=workload,
        )

    def to_dict(self) -> dict:
        """A JSON form (records keep the budget they were made for); `from_dict` reads it back."""
        out = asdict(self)
        out["description"] = self.describe()
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> Budget:
        raw = {k: v for k, v in raw.items() if k != "description"}
        if raw.get("gpu") is not None:
            raw["gpu"] = GPUSpec(**raw["gpu"])
        if raw.get("workload") is not None:
            raw["workload"] = Workload(**raw["workload"])
        return cls(**raw)

    def throughput_workload(self) -> Workload:
        return self.workload if self.workload is not None else Workload.for_context(self.context, self.batch)

    def speedup_of(self, config: HybridConfig, reference: HybridConfig) -> float | None:
        if self.gpu is None:
            return None
        options = dict(weight_dtype=self.weight_dtype, kv_dtype=self.kv_dtype, ssm_dtype=self.ssm_dtype)
        return speedup(config, reference, self.throughput_workload(), self.gpu, **options)

    def violations(self, config: HybridConfig, reference: HybridConfig) -> list[str]:
        """What `config` misses, in words (empty when it meets the budget)."""
        missed = []
        if self.memory is not None:
            total = self.memory_of(config).total
            if total > self.memory:
                missed.append(f"memory {format_bytes(total)} > {format_bytes(self.memory)}")
        if self.params is not None and num_parameters(config) > self.params:
            missed.append(f"parameters {num_parameters(config):,} > {self.params:,}")
        if self.active_params is not None and active_parameters(config) > self.active_params:
            missed.append(f"active parameters {active_parameters(config):,} > {self.active_params:,}")
        if self.min_speedup is not None:
            ratio = self.speedup_of(config, reference)
            if ratio < self.min_speedup:
                missed.append(f"speedup {ratio:.2f}x < {self.min_speedup:.2f}x")
        return missed

    def describe(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"{format_bytes(self.memory)} at {self.context:,} tokens x {self.batch} ({self.weight_dtype})")
        if self.params is not None:
            parts.append(f"<= {self.params:,} parameters")
        if self.active_params is not None:
            parts.append(f"<= {self.active_params:,} active parameters")
        if self.min_speedup is not None:
            workload = self.throughput_workload()
            parts.append(
                f">= {self.min_speedup:.2f}x tokens/s on {self.gpu.name} "
                f"({workload.input_tokens:,} in / {workload.output_tokens:,} out)"
            )
        return "; ".join(parts)
