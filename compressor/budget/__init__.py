"""Budgets: parameters, inference memory at a context length, and throughput, computed from a config alone.

Everything here but `measure` is integer arithmetic on a `HybridConfig` (no model is built), fast enough for
a search to call tens of thousands of times. The cost models, each with its conventions in its docstring:

- `units`: written sizes, context lengths, counts and bandwidths; dtypes and the deployment `Precision`;
- `counts`: parameters and active parameters, by component;
- `memory`: weights, KV cache, SSM / conv state and the prefill activation allowance (`MemoryEstimate`);
- `roofline`: GPUs, workloads and the roofline throughput over an architecture's `RooflineTerms`
  (`compressor.baselines` feeds it a plain transformer's terms);
- `terms`: `Budget` and its terms (memory, parameters, active parameters, speedup, ...), one class each.

This module re-exports their public names (`from compressor.budget import Budget, parse_size`) and holds the
checks against a real device: its free memory, what fits in it, and `measure`, which builds the model and
times it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from compressor.budget.counts import (
    active_parameters,
    experts_touched,
    largest_block_parameters,
    num_parameters,
    parameter_counts,
)
from compressor.budget.memory import (
    DEFAULT_PREFILL_CHUNK,
    MemoryEstimate,
    activation_bytes,
    conv_state_bytes,
    estimate_memory,
    kv_bytes_per_token,
    largest_batch,
    largest_fitting_batch,
    ssm_state_bytes,
    weight_bytes,
    weight_bytes_by_component,
)
from compressor.budget.roofline import (
    GPUS,
    GPUSpec,
    RooflineTerms,
    ThroughputEstimate,
    Workload,
    estimate_throughput,
    get_gpu,
    gpu_from_options,
    resolve_batch,
    roofline_terms,
    roofline_throughput,
    speedup,
)
from compressor.budget.terms import TERMS, Budget, Term, register
from compressor.budget.units import (
    _TORCH_NAMES,
    CACHE_DTYPES,
    DEFAULT_PRECISION,
    GIB,
    KIB,
    MIB,
    SSM_DTYPES,
    TIB,
    WEIGHT_DTYPES,
    Precision,
    compute_dtype,
    format_bytes,
    normalize_dtype,
    parse_bandwidth,
    parse_context,
    parse_count,
    parse_params,
    parse_size,
    parse_tokens,
)
from compressor.config import HybridConfig
from compressor.errors import BudgetError, OptionError

__all__ = [
    "CACHE_DTYPES", "DEFAULT_PRECISION", "DEFAULT_PREFILL_CHUNK", "GIB", "GPUS", "KIB", "MIB", "SSM_DTYPES", "TERMS",
    "TIB", "WEIGHT_DTYPES",
    "Budget", "BudgetError", "GPUSpec", "Measurement", "MemoryEstimate", "RooflineTerms", "ThroughputEstimate",
    "Precision", "Term", "Workload", "activation_bytes", "active_parameters", "available_memory",
    "check_cache_fits", "check_fits",
    "compute_dtype", "conv_state_bytes", "estimate_memory", "estimate_throughput", "experts_touched",
    "format_bytes", "get_gpu", "gpu_from_options", "kv_bytes_per_token", "largest_batch", "largest_block_parameters",
    "largest_fitting_batch", "measure", "normalize_dtype", "num_parameters", "parameter_counts",
    "parse_bandwidth", "parse_context", "parse_count", "parse_params", "parse_size", "parse_tokens",
    "register", "resolve_batch", "roofline_terms", "roofline_throughput", "speedup", "ssm_state_bytes", "weight_bytes",
    "weight_bytes_by_component",
]  # fmt: skip


@dataclass(frozen=True)
class Measurement:
    """What `measure` found on a real device, next to the estimate of the same cache."""

    device: str
    context: int
    batch: int
    cache_bytes: int  # HybridCache.nbytes() as allocated
    estimated_cache_bytes: int
    decode_steps: int
    decode_latency_s: float  # per step, averaged
    decode_tokens_per_s: float  # batch / latency

    def to_dict(self) -> dict:
        return asdict(self)


def available_memory(device) -> int | None:
    """Free memory on a device in bytes (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(needed: int, device, *, parameter: str, what: str, too: str = "many") -> None:
    """Refuse (an OptionError naming `parameter`) what would take more than 80% of `device`'s free memory:
    the one check of every context or length a user gives (`compress generate`'s prompt + max_new_tokens,
    a retrieval task's contexts), run before anything of that size is built. `what` names the need in
    the message ("the cache for 4,096 tokens")."""
    free = available_memory(device)
    if free is not None and needed > 0.8 * free:
        raise OptionError(
            parameter, f"is too {too}: {what} needs {format_bytes(needed)}, but {format_bytes(free)} is free"
        )


def check_cache_fits(
    config: HybridConfig, tokens: int, device, *, parameter: str, batch: int = 1, weight_dtype: str = "bf16",
    too: str = "many",
) -> None:  # fmt: skip
    """`check_fits` for the decoding cache (`HybridCache`) of `batch` sequences of `tokens` tokens."""
    needed = estimate_memory(config, tokens, batch, precision=Precision(weight_dtype), prefill_chunk=0).cache
    sequences = f" x {batch} sequences" if batch > 1 else ""
    check_fits(needed, device, parameter=parameter, what=f"the cache for {tokens:,} tokens{sequences}", too=too)


def measure(
    config: HybridConfig,
    context: int,
    batch: int = 1,
    *,
    device="cpu",
    precision: Precision | None = None,
    steps: int = 8,
    seed: int = 0,
) -> Measurement:
    """Build the architecture (random weights), allocate its `HybridCache` for `context` tokens on
    `device`, and time `steps` cached decoding steps at the end of the context.

    The cache holds zeros, not a real prefill: the steps read the whole KV cache as a decode at that
    length does, without spending the prefill's time. Refuses when the model and cache would not fit in
    the device's available memory. The model is built in `precision`'s weight dtype (default fp32), which
    must be one compressor computes in (fp32, bf16, fp16)."""
    import torch

    from compressor.model import HybridLM

    precision = precision or Precision("fp32")
    weight_dtype = normalize_dtype(precision.weight, ("fp32", "bf16", "fp16"), "weight dtype for --measure")
    kv_dtype = precision.kv or weight_dtype
    if kv_dtype != weight_dtype:
        raise BudgetError(
            f"measuring runs compressor's engine, whose attention needs the KV cache in the weight dtype "
            f"({weight_dtype}), not {kv_dtype}"
        )
    if context < 3:
        raise BudgetError(f"measuring decode needs a context of at least 3 tokens, got {context}")
    steps = max(1, min(steps, context - 2))
    estimate = estimate_memory(config, context, batch, precision=precision, prefill_chunk=0)
    device = torch.device(device)
    needed = num_parameters(config) * 4 + estimate.cache  # built in fp32, then cast
    free = available_memory(device)
    if free is not None and needed > 0.9 * free:
        raise BudgetError(
            f"measuring needs about {needed / GIB:.2f} GiB on {device} (model built in fp32 + cache), but only "
            f"{free / GIB:.2f} GiB is available: measure a smaller architecture or context"
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = HybridLM(config)
    model = model.to(getattr(torch, _TORCH_NAMES[weight_dtype])).eval()
    ssm = estimate.ssm_dtype
    cache = model.allocate_cache(batch, context, ssm_dtype=getattr(torch, _TORCH_NAMES[ssm]))
    cache.seen = context - steps - 1  # decode at the end of the context
    tokens = torch.randint(0, config.vocab_size, (steps + 1, batch, 1), device=device)
    with torch.inference_mode():
        model(tokens[0], cache)  # warm-up step
        _synchronize(device)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            model(tokens[step], cache)
        _synchronize(device)
        latency = (time.perf_counter() - start) / steps
    return Measurement(
        device=str(device),
        context=context,
        batch=batch,
        cache_bytes=cache.nbytes(),
        estimated_cache_bytes=estimate.cache,
        decode_steps=steps,
        decode_latency_s=latency,
        decode_tokens_per_s=batch / latency,
    )


def _synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
