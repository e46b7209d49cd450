"""Inference memory of a `HybridConfig` at a context length and batch: weights, cache and activations.

Weights. fp32 = 4 bytes a parameter, bf16 / fp16 = 2. Every routed expert is resident, whatever a token
uses. The MoE router (weight and e_score_correction_bias) is kept in fp32 in every weight dtype, as
transformers and compressor's loader keep it. The quantized formats size what `compressor.quantize`
exports (ModelOpt's hybrid recipe): the weight matrices of the Mamba blocks (in_proj, out_proj), MLP blocks
(up, down) and MoE blocks (every routed expert's up / down, the shared expert's, the latent projections)
are quantized; everything else (embeddings, lm_head, norms, conv1d, A_log, D, dt_bias, biases, and the
attention blocks' q/k/v/o, which the recipe keeps in high precision) stays in bf16:
- fp8: FP8 E4M3, 1 byte a weight + two fp32 scalars per matrix (weight scale, input scale);
- fp4: NVFP4, 4-bit E2M1 (half a byte) + one FP8 E4M3 scale per 16 consecutive weights of a row + two
  fp32 scalars per matrix (weight scale 2, input scale).

Cache. Exactly what `HybridCache` allocates, per sequence of `context` tokens:
- KV: per attention block 2 x kv_heads x head_dim x context x bytes(kv);
- SSM state: per Mamba block H x P x N x bytes(ssm);
- conv state: per Mamba block (I + 2GN) x (K - 1) x bytes(compute), I = H x P. compressor keeps the last
  K - 1 convolution inputs (all the convolution needs); transformers' cache keeps K, one column more
  (9B-v2: 2,654,208 bytes a sequence there, 1,990,656 here).

Activations. An allowance for the peak of a chunked prefill: as serving engines do (vLLM's
max_num_batched_tokens, TensorRT-LLM's max_num_tokens), a forward pass takes at most `prefill_chunk`
prompt tokens (DEFAULT_PREFILL_CHUNK = 2048) across the whole batch, so n = min(max(chunk, batch),
context x batch) tokens are in flight (a decoding step puts one token of every sequence in one pass).
Counted in the compute dtype unless marked fp32:
- every block: 3 n x hidden (the residual stream, the normed input, the mixer output);
- Mamba: n x (2I + 2GN + H) (in_proj output) + n x (I + 2GN) (conv output) + 2 n x I in fp32 (scan output
  and gated-norm output) + ceil(n / chunk_size) x H x P x N in fp32 (the scan's per-chunk states; a
  decoding step updates the cached state in place);
- attention: n x (2 heads + 2 kv_heads) x head_dim (q, k, v, output; a fused attention kernel, so no
  chunk x context score matrix);
- MLP: 2 n x ffn (up_proj output and its squared ReLU);
- MoE (k = num_experts_per_tok, d = moe_latent_size or hidden, E experts): 2 n k d (the inputs gathered by
  expert and the expert outputs) + 2 n x moe ffn (one expert's up_proj output and squared ReLU at most: a
  token visits an expert once) + 2 n x shared ffn + 2 n x moe_latent_size (the projections, if any), plus
  in fp32 2 n E (router scores and their biased copy) + n k d (the weighted expert outputs);
plus one position's logits per sequence, batch x vocab in fp32. The allowance is the largest block's term
plus the logits; `prefill_chunk=0` sets it to 0. Not counted: the CUDA context and framework overhead
(about 0.3-1 GiB: keep headroom in the target, as Nano-v2's 5% buffer does) and allocator fragmentation.
compressor's own `generate` prefills a prompt in one pass, so its peak at long prompts exceeds this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from compressor.budget.counts import (
    _block_groups,
    _expert_matrices,
    _expert_parameters,
    _matrices,
    _router,
    _vectors,
    parameter_counts,
)
from compressor.budget.units import _BYTES, CACHE_DTYPES, DEFAULT_PRECISION, SSM_DTYPES, Precision, normalize_dtype
from compressor.config import ATTENTION, MAMBA, MLP, MOE, BlockSpec, HybridConfig
from compressor.errors import BudgetError

DEFAULT_PREFILL_CHUNK = 2048


def _matrix_bytes(out: int, inp: int, dtype: str) -> int:
    if dtype == "fp8":
        return out * inp + 2 * 4  # E4M3 weights + fp32 weight and input scales
    if dtype == "fp4":
        return math.ceil(out * inp / 2) + out * math.ceil(inp / 16) + 2 * 4  # E2M1 + E4M3 per 16 + 2 fp32
    return out * inp * _BYTES[dtype]


def _plain_bytes(dtype: str) -> int:
    """Bytes of an unquantized parameter with weights in `dtype` (fp8 / fp4 keep the rest in bf16)."""
    return 4 if dtype == "fp32" else 2


def _one_expert_bytes(config: HybridConfig, spec: BlockSpec, dtype: str) -> int:
    """Bytes of one routed expert of an MoE block in the weight dtype (0 for other blocks)."""
    if dtype in ("fp8", "fp4"):
        return sum(_matrix_bytes(o, i, dtype) for o, i in _expert_matrices(config, spec))
    return _plain_bytes(dtype) * _expert_parameters(config, spec)


def _block_bytes(config: HybridConfig, spec: BlockSpec, dtype: str, experts: float | None = None) -> float:
    """Bytes of one block's mixer weights with `experts` of its routed experts (default: all); the router
    (weight and e_score_correction_bias buffer) in fp32."""
    experts = spec.n_routed_experts if experts is None else experts
    plain = _plain_bytes(dtype)
    if dtype in ("fp8", "fp4") and spec.kind != ATTENTION:  # the quantization recipe keeps attention
        matrices = sum(_matrix_bytes(o, i, dtype) for o, i in _matrices(config, spec))
    else:
        matrices = plain * sum(o * i for o, i in _matrices(config, spec))
    router = 4 * (_router(config, spec) + (spec.n_routed_experts if spec.kind == MOE else 0))
    return matrices + experts * _one_expert_bytes(config, spec, dtype) + plain * _vectors(config, spec) + router


def weight_bytes_by_component(config: HybridConfig, dtype: str = "bf16") -> dict[str, int]:
    """Bytes of the weights by component (the keys of `parameter_counts`), in the given weight dtype."""
    dtype = normalize_dtype(dtype)
    plain = _plain_bytes(dtype)
    counts = parameter_counts(config)
    out = {key: count * plain for key, count in counts.items()}
    if dtype in ("fp8", "fp4") or config.has_moe:  # else every parameter takes `plain` bytes
        out.update(dict.fromkeys((MAMBA, ATTENTION, MLP, MOE), 0))
        for spec, count in _block_groups(config):
            out[spec.kind] += count * int(_block_bytes(config, spec, dtype))
    return out


def weight_bytes(config: HybridConfig, dtype: str = "bf16") -> int:
    """Bytes of all weights in the given weight dtype (see the module docstring for fp8 / fp4)."""
    return sum(weight_bytes_by_component(config, dtype).values())


def kv_bytes_per_token(config: HybridConfig, kv_dtype: str = "bf16") -> int:
    """KV cache bytes one token of one sequence takes, over all attention blocks."""
    size = _BYTES[normalize_dtype(kv_dtype, CACHE_DTYPES, "KV cache dtype")]
    return sum(
        c * 2 * s.num_key_value_heads * s.head_dim * size for s, c in _block_groups(config) if s.kind == ATTENTION
    )


def ssm_state_bytes(config: HybridConfig, ssm_dtype: str | None = None) -> int:
    """SSM state bytes of one sequence (H x P x N per Mamba block), default dtype `mamba_ssm_cache_dtype`."""
    size = _BYTES[normalize_dtype(ssm_dtype or config.mamba_ssm_cache_dtype, SSM_DTYPES, "SSM state dtype")]
    return sum(
        c * s.mamba_intermediate * config.ssm_state_size * size for s, c in _block_groups(config) if s.kind == MAMBA
    )


def conv_state_bytes(config: HybridConfig, dtype: str = "bf16") -> int:
    """Conv state bytes of one sequence: (I + 2GN) x (K - 1) per Mamba block (transformers keeps K)."""
    size = _BYTES[normalize_dtype(dtype, ("fp32", "bf16", "fp16"), "compute dtype")]
    gn = config.n_groups * config.ssm_state_size
    width = config.conv_kernel - 1
    return sum(c * (s.mamba_intermediate + 2 * gn) * width * size for s, c in _block_groups(config) if s.kind == MAMBA)


def activation_bytes(
    config: HybridConfig,
    context: int,
    batch: int = 1,
    *,
    dtype: str = "bf16",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> int:
    """The prefill allowance: the largest block's intermediates for one forward pass of `prefill_chunk`
    tokens (shared by the batch) + one position's logits per sequence in fp32 (module docstring)."""
    if prefill_chunk <= 0:
        return 0
    size = _BYTES[normalize_dtype(dtype, ("fp32", "bf16", "fp16"), "compute dtype")]
    n = min(max(prefill_chunk, batch), context * batch)  # tokens in one forward pass (a decode step: batch)
    h, gn = config.hidden_size, config.n_groups * config.ssm_state_size
    peak = 0
    for spec, _ in _block_groups(config):
        if spec.kind == MAMBA:
            inner = spec.mamba_intermediate
            elements = n * (2 * inner + 2 * gn + spec.mamba_num_heads) + n * (inner + 2 * gn)
            fp32 = 2 * n * inner + math.ceil(n / config.chunk_size) * inner * config.ssm_state_size
            block = elements * size + fp32 * 4
        elif spec.kind == ATTENTION:
            block = n * (2 * spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim * size
        elif spec.kind == MOE:
            k, width, latent = config.num_experts_per_tok, config.moe_latent_size or h, config.moe_latent_size or 0
            elements = 2 * n * k * width + 2 * n * spec.moe_intermediate_size  # gathered inputs, outputs; one expert
            elements += 2 * n * spec.moe_shared_expert_intermediate_size + 2 * n * latent  # shared; projections
            fp32 = 2 * n * spec.n_routed_experts + n * k * width  # router scores (+ biased copy), weighted outputs
            block = elements * size + fp32 * 4
        else:
            block = 2 * n * spec.intermediate_size * size
        peak = max(peak, block + 3 * n * h * size)
    return peak + batch * config.vocab_size * 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Inference memory of one architecture at a context length and batch, term by term (bytes)."""

    weights: int
    kv_cache: int
    ssm_state: int
    conv_state: int
    activations: int
    context: int
    batch: int
    weight_dtype: str
    kv_dtype: str
    ssm_dtype: str
    compute_dtype: str
    prefill_chunk: int

    @property
    def cache(self) -> int:
        """What `HybridCache` allocates: KV + SSM state + conv state."""
        return self.kv_cache + self.ssm_state + self.conv_state

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations

    def headroom(self, limit: int) -> int:
        """limit - total: positive when it fits, by that many bytes."""
        return limit - self.total

    def to_dict(self) -> dict:
        return {**asdict(self), "cache": self.cache, "total": self.total}


def estimate_memory(
    config: HybridConfig,
    context: int,
    batch: int = 1,
    *,
    precision: Precision = DEFAULT_PRECISION,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> MemoryEstimate:
    """Inference memory for `batch` sequences of `context` tokens: weights, KV, SSM, conv, activations, in
    the deployment's `precision`."""
    if context < 1 or batch < 1:
        raise BudgetError(f"context ({context}) and batch ({batch}) must be at least 1")
    act = precision.compute
    kv_dtype = precision.kv or act
    ssm_dtype = precision.ssm or normalize_dtype(config.mamba_ssm_cache_dtype, SSM_DTYPES, "SSM state dtype")
    return MemoryEstimate(
        weights=weight_bytes(config, precision.weight),
        kv_cache=kv_bytes_per_token(config, kv_dtype) * context * batch,
        ssm_state=ssm_state_bytes(config, ssm_dtype) * batch,
        conv_state=conv_state_bytes(config, act) * batch,
        activations=activation_bytes(config, context, batch, dtype=act, prefill_chunk=prefill_chunk),
        context=context,
        batch=batch,
        weight_dtype=precision.weight,
        kv_dtype=kv_dtype,
        ssm_dtype=ssm_dtype,
        compute_dtype=act,
        prefill_chunk=max(prefill_chunk, 0),
    )


def largest_batch(
    config: HybridConfig,
    context: int,
    memory_limit: int,
    *,
    precision: Precision = DEFAULT_PRECISION,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> int:
    """The most sequences of `context` tokens that fit in `memory_limit` bytes (0 if not even one)."""
    return largest_fitting_batch(
        lambda batch: estimate_memory(config, context, batch, precision=precision, prefill_chunk=prefill_chunk),
        memory_limit,
    )


def largest_fitting_batch(memory_at: Callable[[int], MemoryEstimate], memory_limit: int) -> int:
    """The largest batch whose `memory_at(batch).total` fits in `memory_limit` bytes (0 if not even one),
    for any architecture whose memory grows with the batch."""

    def fits(batch: int) -> bool:
        return memory_at(batch).total <= memory_limit

    if not fits(1):
        return 0
    low, high = 1, 2  # fits(low) holds; grow high until it fails, then bisect (memory grows with the batch)
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
