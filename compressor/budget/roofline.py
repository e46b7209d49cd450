"""Throughput of an architecture on a GPU: a roofline over the architecture's `RooflineTerms`.

Throughput. A roofline on a `GPUSpec` (bandwidth, dense bf16 FLOP/s at the datasheet peak; real engines
reach a fraction of it, so the ratios between architectures are what to trust). fp8 / fp4 weights change
the bytes read, not the FLOP/s (all compute is taken at the bf16 rate).
- MoE blocks: FLOPs count the active matrices (router, top-k routed experts, shared expert, latent
  projections). A forward pass reads only the routed experts its tokens touch; with n tokens in the pass
  (a decode step: the batch; a prefill pass: min(prefill_chunk, prompt tokens x batch)) the expected
  number is E (1 - (1 - k/E)^n) per block (`experts_touched`: each token picks k of E experts uniformly
  and independently; real routers are less even, so fewer distinct experts and fewer bytes), the rest of
  the block is read in full;
- decode step with p tokens cached: reads the weights (all but the embedding table, unless tied; MoE:
  the experts the batch touches) + the KV cache of p + 1 tokens + reads and writes the SSM and conv
  states; computes 2 x (active matmul weights) + 4 x heads x head_dim x (p + 1) per attention block +
  6 I N per Mamba block (state update and output), per sequence;
- prefill of the prompt in chunks: 2 x (active block matmul weights) x tokens + the lm_head on the last position
  + attention's causal quadratic term 2 x heads x head_dim x T (T + 1) per attention block + the SSD scan
  T x (6 I N + 2 chunk_size (I + GN)) per Mamba block, per sequence; it reads the weights once per forward
  pass of `prefill_chunk` tokens and, for each sequence, the KV cache up to the end of each of its chunks;
- each phase takes max(FLOPs / FLOP/s, bytes / bandwidth) over its totals. Time to first token = the
  prefill of the whole batch; decode latency = decode time / output tokens; tokens/s = batch x output
  tokens / (prefill + decode).
These formulas live once, in `roofline_throughput`, over an architecture's `RooflineTerms`;
`compressor.baselines` feeds them a plain transformer's terms, so hybrids and transformers compare alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal

from compressor.budget.counts import _block_groups, _expert_parameters, _matrices, _router, experts_touched
from compressor.budget.memory import (
    DEFAULT_PREFILL_CHUNK,
    MemoryEstimate,
    _one_expert_bytes,
    conv_state_bytes,
    estimate_memory,
    kv_bytes_per_token,
    largest_fitting_batch,
    ssm_state_bytes,
    weight_bytes_by_component,
)
from compressor.budget.units import DEFAULT_PRECISION, GIB, Precision, parse_bandwidth
from compressor.config import ATTENTION, MAMBA, MOE, HybridConfig
from compressor.errors import BudgetError, OptionError


@dataclass(frozen=True)
class GPUSpec:
    """What the roofline needs of a GPU: memory bandwidth (bytes/s), dense bf16 FLOP/s, memory (bytes)."""

    name: str
    memory_bandwidth: float
    bf16_flops: float
    memory: int


GPUS: dict[str, GPUSpec] = {
    # AWS publishes no A10G datasheet; 600 GB/s and 24 GB GDDR6 as the A10's datasheet, 70 TFLOPS dense
    # bf16 tensor as compiled in Baseten's "NVIDIA A10 vs A10G for ML model inference" (the A10 has 125).
    "a10g": GPUSpec("A10G", 600e9, 70e12, 24 * GIB),
    # NVIDIA L4 datasheet: 300 GB/s, BF16 tensor 242 TFLOPS with sparsity (121 dense), 24 GB.
    "l4": GPUSpec("L4", 300e9, 121e12, 24 * GIB),
    # NVIDIA L40S datasheet: 864 GB/s, BF16 tensor 362.05 TFLOPS dense (733 with sparsity), 48 GB.
    "l40s": GPUSpec("L40S", 864e9, 362.05e12, 48 * GIB),
    # NVIDIA A100 datasheet (SXM): 40GB HBM2 1,555 GB/s; 80GB HBM2e 2,039 GB/s; BF16 tensor 312 TFLOPS dense.
    "a100-40gb": GPUSpec("A100 40GB", 1555e9, 312e12, 40 * GIB),
    "a100-80gb": GPUSpec("A100 80GB", 2039e9, 312e12, 80 * GIB),
    # NVIDIA H100 datasheet (SXM): 3.35 TB/s, BF16 tensor 1,979 TFLOPS with sparsity (989 dense), 80 GB.
    "h100-sxm": GPUSpec("H100 SXM", 3.35e12, 989e12, 80 * GIB),
    # NVIDIA H200 datasheet (SXM): 4.8 TB/s, BF16 tensor 1,979 TFLOPS with sparsity (989 dense), 141 GB.
    "h200": GPUSpec("H200", 4.8e12, 989e12, 141 * GIB),
    # NVIDIA HGX / DGX B200 datasheets: 8 TB/s and 180 GB HBM3e per GPU, FP16/BF16 tensor 4.5 PFLOPS with
    # sparsity (2.25 dense).
    "b200": GPUSpec("B200", 8e12, 2.25e15, 180 * GIB),
    # NVIDIA RTX Blackwell GPU architecture whitepaper: 1,792 GB/s GDDR7, 32 GB, FP16/BF16 tensor with FP32
    # accumulate 209.5 TFLOPS dense.
    "rtx-5090": GPUSpec("RTX 5090", 1792e9, 209.5e12, 32 * GIB),
}
_GPU_ALIASES = {"a100": "a100-80gb", "h100": "h100-sxm", "5090": "rtx-5090", "rtx5090": "rtx-5090"}


def get_gpu(name: str) -> GPUSpec:
    """A GPU of the built-in table by name, case-insensitive ('a10g', 'H100', 'a100-40gb', ...)."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    key = _GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise BudgetError(f"unknown GPU {name!r}: choose one of {', '.join(GPUS)}, or give its numbers")
    return GPUS[key]


def gpu_from_options(
    name: str | None = None, bandwidth: str | None = None, tflops: float | None = None, memory: int | None = None
) -> GPUSpec | None:
    """A GPU of the table by name, optionally with its numbers replaced, or one described by its bandwidth
    ('600GB/s') and dense bf16 TFLOP/s; None when nothing is given. `memory` (bytes) sizes a described GPU."""
    if tflops is not None and not (math.isfinite(tflops) and tflops > 0):
        raise OptionError("gpu_tflops", f"must be a positive number, got {tflops}")
    if name is None and bandwidth is None and tflops is None:
        return None
    if name is None and (bandwidth is None or tflops is None):
        raise BudgetError("describe the GPU with both --gpu-bandwidth and --gpu-tflops, or name one with --gpu")
    spec = get_gpu(name) if name is not None else GPUSpec("custom GPU", 0.0, 0.0, memory or 0)
    if bandwidth is not None:
        spec = replace(spec, memory_bandwidth=parse_bandwidth(bandwidth))
    if tflops is not None:
        spec = replace(spec, bf16_flops=tflops * 1e12)
    return spec


@dataclass(frozen=True)
class Workload:
    """A generation request: prompt tokens in, tokens out, and a batch (or 'max': the largest that fits)."""

    input_tokens: int
    output_tokens: int
    batch: int | Literal["max"] = 1

    @classmethod
    def for_context(
        cls,
        context: int,
        batch: int | Literal["max"] = 1,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> Workload:
        """The default request filling a context: 1024 generated tokens (at most half of it), the rest prompt;
        either side can be given instead, within the context."""
        output = output_tokens if output_tokens is not None else max(min(1024, context // 2), 1)
        prompt = input_tokens if input_tokens is not None else max(context - output, 1)
        if prompt + output > context:
            raise BudgetError(
                f"a request of {prompt:,} prompt and {output:,} generated tokens does not fit the context of "
                f"{context:,} tokens the memory is sized at: give a --ctx of at least {prompt + output:,}, or a "
                "shorter --isl / --osl"
            )
        return cls(prompt, output, batch)


@dataclass(frozen=True)
class ThroughputEstimate:
    """Roofline timings of one workload on one GPU."""

    gpu: str
    batch: int
    input_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    prefill_bound: str  # "compute" or "memory"
    decode_bound: str
    memory: MemoryEstimate  # at input + output tokens and this batch

    @property
    def time_to_first_token_s(self) -> float:
        return self.prefill_s

    @property
    def decode_latency_s(self) -> float:
        """Seconds per decoding step, averaged over the output."""
        return self.decode_s / self.output_tokens

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Output tokens per second of the decode phase, all sequences of the batch together."""
        return self.batch * self.output_tokens / self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second over the whole request (prefill included), the batch together."""
        return self.batch * self.output_tokens / self.total_s

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "memory"}
        for name in ("time_to_first_token_s", "decode_latency_s", "total_s", "decode_tokens_per_s", "tokens_per_s"):
            out[name] = getattr(self, name)
        out["memory"] = self.memory.to_dict()
        return out


@dataclass(frozen=True)
class RooflineTerms:
    """What the roofline (module docstring, "Throughput") needs of an architecture, per token and per
    sequence. `roofline_terms` gives a hybrid's; `compressor.baselines` builds a transformer's."""

    read_weights: int  # weight bytes one forward pass reads (all but the embedding table, unless tied)
    head_bytes: int  # bytes of the output head, which a prefill applies to the last position only
    kv_bytes_per_token: int  # KV cache of one token of one sequence, all attention blocks
    state_bytes: int  # SSM + conv state of one sequence, read and written by each decoding step
    block_matmul: int  # weights of the blocks' matrices: multiply-adds per token
    head_matmul: int  # vocab x hidden: multiply-adds per token of the output head
    attention_width: int  # heads x head_dim summed over the attention blocks
    scan_step: int  # FLOPs per token of the Mamba scans when decoding (state update and output)
    scan_chunked: int  # FLOPs per token of the chunked Mamba scans of a prefill
    # bytes of routed experts a forward pass over n tokens is expected not to read (MoE; 0 otherwise)
    unread_weights: Callable[[int], float] = lambda tokens: 0.0


def roofline_terms(config: HybridConfig, memory: MemoryEstimate) -> RooflineTerms:
    """A hybrid's roofline terms in the dtypes of `memory` (any batch: the terms are per sequence)."""
    by_component = weight_bytes_by_component(config, memory.weight_dtype)
    groups = _block_groups(config)
    n, gn, cs = config.ssm_state_size, config.n_groups * config.ssm_state_size, config.chunk_size
    mamba = [(s.mamba_intermediate, c) for s, c in groups if s.kind == MAMBA]
    return RooflineTerms(
        # Decoding reads every weight but the embedding table (one row per token), unless lm_head shares it.
        read_weights=memory.weights - (0 if config.tie_word_embeddings else by_component["embeddings"]),
        head_bytes=by_component["embeddings"] if config.tie_word_embeddings else by_component["lm_head"],
        kv_bytes_per_token=kv_bytes_per_token(config, memory.kv_dtype),
        state_bytes=ssm_state_bytes(config, memory.ssm_dtype) + conv_state_bytes(config, memory.compute_dtype),
        # a token multiplies the active parameters' matrices: top-k routed experts, router, shared expert, rest
        block_matmul=sum(
            c * (sum(o * i for o, i in _matrices(config, s)) + _router(config, s))
            + c * config.num_experts_per_tok * _expert_parameters(config, s)
            for s, c in groups
        ),
        head_matmul=config.vocab_size * config.hidden_size,
        attention_width=sum(c * s.num_attention_heads * s.head_dim for s, c in groups if s.kind == ATTENTION),
        scan_step=sum(c * 6 * inner * n for inner, c in mamba),
        scan_chunked=sum(c * (6 * inner * n + 2 * cs * (inner + gn)) for inner, c in mamba),
        unread_weights=lambda tokens: _experts_not_read(config, memory.weight_dtype, tokens),
    )


def resolve_batch(
    workload: Workload,
    gpu: GPUSpec,
    memory_at: Callable[[int], MemoryEstimate],
    memory_limit: int | None = None,
) -> int:
    """The workload's batch; for 'max' the largest whose memory (`memory_at(batch)`, at input + output
    tokens) fits `memory_limit` (default: the GPU's memory). BudgetError for an empty workload or when not
    even one sequence fits."""
    isl, osl = workload.input_tokens, workload.output_tokens
    if isl < 1 or osl < 1:
        raise BudgetError(f"a workload needs at least 1 input and 1 output token, got {isl} in / {osl} out")
    if workload.batch != "max":
        return workload.batch
    limit = gpu.memory if memory_limit is None else memory_limit
    batch = largest_fitting_batch(memory_at, limit)
    if batch == 0:
        raise BudgetError(
            f"{isl + osl:,} tokens do not fit in {limit / GIB:.2f} GiB even at batch 1 "
            f"(needs {memory_at(1).total / GIB:.2f} GiB)"
        )
    return batch


def roofline_throughput(
    terms: RooflineTerms, memory: MemoryEstimate, workload: Workload, gpu: GPUSpec
) -> ThroughputEstimate:
    """The roofline timings of `workload` at the batch and prefill chunk of `memory` (module docstring),
    for any architecture described by `terms`."""
    isl, osl, batch = workload.input_tokens, workload.output_tokens, memory.batch
    states = 2 * terms.state_bytes * batch  # read and written each step, whole batch

    # Prefill: forward passes of `chunk` tokens across the batch, each sequence in chunks of at most that
    # many; attention's causal term sums to T (T + 1) / 2 query-key pairs a sequence.
    chunk = memory.prefill_chunk if memory.prefill_chunk > 0 else isl * batch
    passes, chunks = math.ceil(isl * batch / chunk), math.ceil(isl / chunk)
    prefill_weights = terms.read_weights - terms.unread_weights(min(chunk, isl * batch))
    prefill_flops = batch * (
        2 * terms.block_matmul * isl
        + 2 * terms.head_matmul
        + 2 * terms.attention_width * isl * (isl + 1)
        + terms.scan_chunked * isl
    )
    kv_read = terms.kv_bytes_per_token * batch * (chunk * chunks * (chunks - 1) // 2 + isl)  # up to each chunk
    prefill_bytes = passes * (prefill_weights - terms.head_bytes) + terms.head_bytes + kv_read + states * chunks

    # Decode: osl steps, with isl .. isl + osl - 1 tokens cached; sum of (cached + 1) over the steps.
    attended = osl * isl + osl * (osl + 1) // 2
    decode_flops = batch * (
        osl * (2 * (terms.block_matmul + terms.head_matmul) + terms.scan_step) + 4 * terms.attention_width * attended
    )
    decode_weights = terms.read_weights - terms.unread_weights(batch)
    decode_bytes = osl * (decode_weights + states) + terms.kv_bytes_per_token * batch * attended

    prefill_s, prefill_bound = _roofline(prefill_flops, prefill_bytes, gpu)
    decode_s, decode_bound = _roofline(decode_flops, decode_bytes, gpu)
    return ThroughputEstimate(
        gpu=gpu.name,
        batch=batch,
        input_tokens=isl,
        output_tokens=osl,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prefill_bound=prefill_bound,
        decode_bound=decode_bound,
        memory=memory,
    )


def estimate_throughput(
    config: HybridConfig,
    workload: Workload,
    gpu: GPUSpec,
    *,
    precision: Precision = DEFAULT_PRECISION,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    memory_limit: int | None = None,
) -> ThroughputEstimate:
    """Time to first token, decode latency and tokens/s of `workload` on `gpu` in the deployment's `precision`
    (roofline, module docstring).

    `batch='max'` takes the largest batch whose memory at input + output tokens fits `memory_limit`
    (default: the GPU's memory)."""
    context = workload.input_tokens + workload.output_tokens

    def memory_at(batch: int) -> MemoryEstimate:
        return estimate_memory(config, context, batch, precision=precision, prefill_chunk=prefill_chunk)

    memory = memory_at(resolve_batch(workload, gpu, memory_at, memory_limit))
    return roofline_throughput(roofline_terms(config, memory), memory, workload, gpu)


def _experts_not_read(config: HybridConfig, dtype: str, tokens: int) -> float:
    """Bytes of the routed experts a forward pass over `tokens` tokens is expected not to touch."""
    if not config.has_moe:
        return 0.0
    k, total = config.num_experts_per_tok, 0.0
    for spec, count in _block_groups(config):
        if spec.kind == MOE:
            untouched = spec.n_routed_experts - experts_touched(spec.n_routed_experts, k, tokens)
            total += count * untouched * _one_expert_bytes(config, spec, dtype)
    return total


def _roofline(flops: float, nbytes: float, gpu: GPUSpec) -> tuple[float, str]:
    compute, memory = flops / gpu.bf16_flops, nbytes / gpu.memory_bandwidth
    return (compute, "compute") if compute >= memory else (memory, "memory")


def speedup(config: HybridConfig, reference: HybridConfig, workload: Workload, gpu: GPUSpec, **options) -> float:
    """How many times the tokens/s of `reference` `config` reaches on the same workload and GPU (> 1: faster).

    Keyword arguments as `estimate_throughput`; with batch 'max' each architecture gets its own batch. A
    plain transformer as the reference: `compressor.baselines.speedup`."""
    ours = estimate_throughput(config, workload, gpu, **options)
    theirs = estimate_throughput(reference, workload, gpu, **options)
    return ours.tokens_per_s / theirs.tokens_per_s
