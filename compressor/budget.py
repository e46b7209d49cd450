"""Budgets: parameters, inference memory at a context length, and throughput, computed from a config alone.

Everything here is integer arithmetic on a `HybridConfig` (no model is built), fast enough for a search to
call tens of thousands of times. `measure` is the one exception: it builds the model and times it.

Conventions
-----------
Units. Memory is counted in bytes. GiB = 2**30 and GB = 10**9 bytes; a bare `G` (`M`, `K`, `T`) means GiB
(MiB, ...), as nvidia-smi and torch report memory in binary units. Context lengths take `k` = 1024 and
`M` = 1024**2 tokens (`128k` = 131,072). Parameter counts take `K`, `M`, `B`, `T` = 10**3, 10**6, 10**9,
10**12 (`9.5B`). Bandwidths (`600GB/s`) and FLOP/s are decimal, as vendors quote them. A datasheet's
"80 GB" of GPU memory is taken as 80 GiB (what nvidia-smi shows, less what the driver reserves).

Parameters. `parameter_counts` has the keys of `HybridLM.parameter_counts()`: embeddings, lm_head, mamba,
attention, mlp, moe, norms (block norms + norm_f). Tied embeddings count once, under embeddings. Biases are
counted when `use_bias` (Mamba in/out projections), `mlp_bias` (MLP, shared expert, latent projections;
routed experts have none) or `use_conv_bias` ask for them. An MoE block holds its router (experts x hidden),
every routed expert, the shared expert and the latent projections; the router's e_score_correction_bias is
a buffer, not a parameter (as in transformers). `active_parameters` counts what one token uses: the same
minus the routed experts it is not routed to (num_experts_per_tok of each block's experts count), so the
router and the shared expert count in full; embeddings and lm_head included (Nemotron-3-Nano-30B-A3B:
3,580,073,408 of 31,577,937,344).

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

Compute dtype. Activations and the Mamba conv state are in the compute dtype: fp32 for fp32 weights, fp16
for fp16, bf16 otherwise (fp8 / fp4 weights are dequantized into bf16). The KV cache defaults to the
compute dtype and may be fp8 (1 byte, per-tensor scales not counted); the SSM state defaults to the
config's `mamba_ssm_cache_dtype` (fp32 in every published model).

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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Literal

from compressor.config import ATTENTION, MAMBA, MLP, MOE, BlockSpec, HybridConfig
from compressor.errors import BudgetError, OptionError

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
DEFAULT_PREFILL_CHUNK = 2048

# ----- parsing -----------------------------------------------------------------------------------------
_SIZE_UNITS = {
    "b": 1,
    "k": KIB, "kib": KIB, "m": MIB, "mib": MIB, "g": GIB, "gib": GIB, "t": TIB, "tib": TIB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip
_CONTEXT_UNITS = {"": 1, "k": 1024, "m": 1024**2}
_PARAM_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_QUANTITY = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>.*)")
_SIZE_HELP = "22GiB, 19.66GiB, 512MiB or 20GB (GB = 10^9 bytes; G alone = GiB)"
_CONTEXT_HELP = "4096, 8k or 128k (k = 1024 tokens, M = 1024^2)"
_PARAMS_HELP = "800M, 9B or 9.5B (M = 10^6, B = 10^9)"
_BANDWIDTH_HELP = "600GB/s or 3.35TB/s"


def format_bytes(nbytes: float) -> str:
    """A size for people: GiB from 1 GiB up, MiB below (binary units, two decimals)."""
    if abs(nbytes) >= GIB:
        return f"{nbytes / GIB:,.2f} GiB"
    return f"{nbytes / MIB:,.2f} MiB"


def _quantity(text: str, what: str, examples: str) -> tuple[Fraction, str]:
    """Split '19.66GiB' into (Fraction('19.66'), 'gib'); one-line errors for anything else."""
    stripped = str(text).strip().replace("_", "")
    if not stripped:
        raise BudgetError(f"empty {what}: write it like {examples}")
    if stripped.startswith("-"):
        raise BudgetError(f"{what} {text!r} is negative: write a positive amount like {examples}")
    match = _QUANTITY.fullmatch(stripped)
    if match is None:
        raise BudgetError(f"{what} {text!r} does not start with a number: write it like {examples}")
    return Fraction(match["number"]), match["unit"].strip()


def _positive_int(value: Fraction, text: str, what: str, examples: str, *, exact: bool) -> int:
    if exact and value.denominator != 1:
        raise BudgetError(f"{what} {text!r} is not a whole number: write it like {examples}")
    number = round(value)
    if number <= 0:
        raise BudgetError(f"{what} {text!r} must be more than zero: write it like {examples}")
    return number


def parse_size(text: str) -> int:
    """A memory size in bytes: '22GiB', '19.66GiB', '512MiB', '20GB' (10^9), '22G' (= GiB)."""
    value, unit = _quantity(text, "memory size", _SIZE_HELP)
    if not unit:
        raise BudgetError(f"memory size {text!r} has no unit: write it like {_SIZE_HELP}")
    if unit.lower() not in _SIZE_UNITS:
        hint = " (that is a bandwidth, not a size)" if unit.endswith("/s") else ""
        raise BudgetError(f"unknown unit {unit!r} in memory size {text!r}{hint}: write it like {_SIZE_HELP}")
    return _positive_int(value * _SIZE_UNITS[unit.lower()], text, "memory size", _SIZE_HELP, exact=False)


def parse_context(text: str) -> int:
    """A number of tokens: '4096', '8k' (8192), '128k' (131072), '1M' (1048576)."""
    value, unit = _quantity(text, "context length", _CONTEXT_HELP)
    if unit.lower() not in _CONTEXT_UNITS:
        raise BudgetError(f"unknown suffix {unit!r} in context length {text!r}: write it like {_CONTEXT_HELP}")
    return _positive_int(value * _CONTEXT_UNITS[unit.lower()], text, "context length", _CONTEXT_HELP, exact=True)


def parse_params(text: str) -> int:
    """A parameter count: '800M', '9B', '9.5B', '12310001152' (commas allowed)."""
    return parse_count(text, "parameter count")


def parse_tokens(text: str) -> int:
    """A token budget, with the parameter-count suffixes: '50M', '2B', '2.5B', '1000000'."""
    return parse_count(text, "token count")


def parse_count(text: str, what: str) -> int:
    """A count with decimal suffixes K/M/B/T (10**3 .. 10**12); `what` names it in errors."""
    examples = _PARAMS_HELP
    value, unit = _quantity(str(text).replace(",", ""), what, examples)
    if unit.lower() not in _PARAM_UNITS:
        raise BudgetError(f"unknown suffix {unit!r} in {what} {text!r}: write it like {examples}")
    return _positive_int(value * _PARAM_UNITS[unit.lower()], text, what, examples, exact=False)


def parse_bandwidth(text: str) -> float:
    """A memory bandwidth in bytes/s: '600GB/s', '3.35TB/s', '1.5TiB/s'."""
    value, unit = _quantity(text, "bandwidth", _BANDWIDTH_HELP)
    unit = unit.lower()
    size_unit = unit.removesuffix("/s")
    if not unit.endswith("/s") or size_unit not in _SIZE_UNITS:
        raise BudgetError(f"bandwidth {text!r} is not a size per second: write it like {_BANDWIDTH_HELP}")
    return float(_positive_int(value * _SIZE_UNITS[size_unit], text, "bandwidth", _BANDWIDTH_HELP, exact=False))


# ----- dtypes ------------------------------------------------------------------------------------------
WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8", "fp4")
CACHE_DTYPES = ("bf16", "fp16", "fp32", "fp8")
SSM_DTYPES = ("fp32", "bf16", "fp16")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8", "nvfp4": "fp4",
}  # fmt: skip
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}


def normalize_dtype(name: str, allowed: tuple[str, ...] = WEIGHT_DTYPES, what: str = "weight dtype") -> str:
    """'bfloat16' / 'bf16' / 'torch.bfloat16' -> 'bf16', checked against `allowed`."""
    key = str(name).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        raise BudgetError(f"unknown {what} {name!r}: use {', '.join(allowed)}")
    return key


def compute_dtype(weight_dtype: str) -> str:
    """The dtype activations, the conv state and (by default) the KV cache use with these weights."""
    weight_dtype = normalize_dtype(weight_dtype)
    return weight_dtype if weight_dtype in ("fp32", "fp16") else "bf16"


# ----- parameters --------------------------------------------------------------------------------------
def _block_groups(config: HybridConfig) -> list[tuple[BlockSpec, int]]:
    """Each distinct block with how many blocks share its widths: one per kind for the blocks without
    overrides, one per overridden block. Cheaper than `config.blocks` for the common uniform case."""
    groups: list[tuple[BlockSpec, int]] = []
    plain: dict[str, list[int]] = {}
    for index, kind in enumerate(config.block_kinds):
        if index in config.block_overrides:
            groups.append((config.block(index), 1))
        else:
            plain.setdefault(kind, []).append(index)
    groups.extend((config.block(indices[0]), len(indices)) for indices in plain.values())
    return groups


def _matrices(config: HybridConfig, spec: BlockSpec) -> list[tuple[int, int]]:
    """(out, in) of each weight matrix of a block's mixer, the tensors fp8 / fp4 quantize, but the routed
    experts' (`_expert_matrices`): for an MoE block, the shared expert and the latent projections."""
    h = config.hidden_size
    if spec.kind == MAMBA:
        inner, gn = spec.mamba_intermediate, config.n_groups * config.ssm_state_size
        return [(2 * inner + 2 * gn + spec.mamba_num_heads, h), (h, inner)]  # in_proj [z, xBC, dt], out_proj
    if spec.kind == ATTENTION:
        q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q)]  # q, k, v, o
    if spec.kind == MOE:
        shared, latent = spec.moe_shared_expert_intermediate_size, config.moe_latent_size
        projections = [(latent, h), (h, latent)] if latent is not None else []  # fc1 / fc2_latent_proj
        return [(shared, h), (h, shared), *projections]  # shared_experts up, down
    return [(spec.intermediate_size, h), (h, spec.intermediate_size)]  # up, down


def _expert_matrices(config: HybridConfig, spec: BlockSpec) -> list[tuple[int, int]]:
    """(out, in) of one routed expert's matrices (up, down; no biases) in an MoE block; none elsewhere."""
    if spec.kind != MOE:
        return []
    width = config.moe_latent_size or config.hidden_size
    return [(spec.moe_intermediate_size, width), (width, spec.moe_intermediate_size)]


def _expert_parameters(config: HybridConfig, spec: BlockSpec) -> int:
    return sum(o * i for o, i in _expert_matrices(config, spec))


def _router(config: HybridConfig, spec: BlockSpec) -> int:
    """Parameters of an MoE block's router (gate.weight, experts x hidden; kept in fp32); 0 elsewhere."""
    return spec.n_routed_experts * config.hidden_size if spec.kind == MOE else 0


def _vectors(config: HybridConfig, spec: BlockSpec) -> int:
    """Parameters of a block's mixer outside its weight matrices (conv, biases, A_log, D, dt_bias, norm)."""
    h = config.hidden_size
    if spec.kind == MAMBA:
        inner, heads = spec.mamba_intermediate, spec.mamba_num_heads
        conv_dim = inner + 2 * config.n_groups * config.ssm_state_size
        count = conv_dim * config.conv_kernel + 3 * heads + inner  # conv1d weight, A_log/D/dt_bias, gated norm
        count += conv_dim if config.use_conv_bias else 0
        count += (inner + conv_dim + heads) + h if config.use_bias else 0  # in_proj [z, xBC, dt], out_proj biases
        return count
    if spec.kind == MLP:
        return spec.intermediate_size + h if config.mlp_bias else 0
    if spec.kind == MOE and config.mlp_bias:  # shared expert (and latent projections) biases; experts have none
        latent = config.moe_latent_size
        return spec.moe_shared_expert_intermediate_size + h + (latent + h if latent is not None else 0)
    return 0  # nemotron_h attention has no biases


def _block_parameters(config: HybridConfig, spec: BlockSpec, experts: int | None = None) -> int:
    """Parameters of one block's mixer with `experts` of its routed experts (default: all of them)."""
    experts = spec.n_routed_experts if experts is None else experts
    matrices = sum(o * i for o, i in _matrices(config, spec))
    routed = experts * _expert_parameters(config, spec) + _router(config, spec)
    return matrices + routed + _vectors(config, spec)


def parameter_counts(config: HybridConfig) -> dict[str, int]:
    """Exact parameters by component, equal to `HybridLM(config).parameter_counts()`, without a model."""
    h, vocab = config.hidden_size, config.vocab_size
    counts = {"embeddings": vocab * h, "lm_head": 0 if config.tie_word_embeddings else vocab * h}
    counts.update(dict.fromkeys((MAMBA, ATTENTION, MLP, MOE), 0))
    for spec, count in _block_groups(config):
        counts[spec.kind] += count * _block_parameters(config, spec)
    counts["norms"] = h * (config.num_blocks + 1)
    return counts


def num_parameters(config: HybridConfig) -> int:
    """Total parameters (tied embeddings once)."""
    return sum(parameter_counts(config).values())


def active_parameters(config: HybridConfig) -> int:
    """Parameters one token uses: everything but the routed experts it is not routed to (num_experts_per_tok
    of each MoE block's experts count; the router and the shared expert always do). Embeddings and lm_head
    included; equal to `num_parameters` for a model without MoE blocks."""
    unused = sum(
        count * (spec.n_routed_experts - config.num_experts_per_tok) * _expert_parameters(config, spec)
        for spec, count in _block_groups(config)
        if spec.kind == MOE
    )
    return num_parameters(config) - unused


def experts_touched(experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts `tokens` tokens route to, each choosing `top_k` of `experts` uniformly and
    independently: experts x (1 - (1 - top_k / experts)^tokens) (the roofline's bytes-read convention)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


# ----- memory ------------------------------------------------------------------------------------------
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
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
    ssm_dtype: str | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> MemoryEstimate:
    """Inference memory for `batch` sequences of `context` tokens: weights, KV, SSM, conv, activations."""
    if context < 1 or batch < 1:
        raise BudgetError(f"context ({context}) and batch ({batch}) must be at least 1")
    weight_dtype = normalize_dtype(weight_dtype)
    act = compute_dtype(weight_dtype)
    kv_dtype = normalize_dtype(kv_dtype or act, CACHE_DTYPES, "KV cache dtype")
    ssm_dtype = normalize_dtype(ssm_dtype or config.mamba_ssm_cache_dtype, SSM_DTYPES, "SSM state dtype")
    return MemoryEstimate(
        weights=weight_bytes(config, weight_dtype),
        kv_cache=kv_bytes_per_token(config, kv_dtype) * context * batch,
        ssm_state=ssm_state_bytes(config, ssm_dtype) * batch,
        conv_state=conv_state_bytes(config, act) * batch,
        activations=activation_bytes(config, context, batch, dtype=act, prefill_chunk=prefill_chunk),
        context=context,
        batch=batch,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        ssm_dtype=ssm_dtype,
        compute_dtype=act,
        prefill_chunk=max(prefill_chunk, 0),
    )


def largest_batch(config: HybridConfig, context: int, memory_limit: int, **dtypes) -> int:
    """The most sequences of `context` tokens that fit in `memory_limit` bytes (0 if not even one).

    Keyword arguments as `estimate_memory` (weight_dtype, kv_dtype, ssm_dtype, prefill_chunk)."""
    return largest_fitting_batch(lambda batch: estimate_memory(config, context, batch, **dtypes), memory_limit)


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


# ----- throughput --------------------------------------------------------------------------------------
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
        either side can be given instead."""
        output = output_tokens if output_tokens is not None else max(min(1024, context // 2), 1)
        prompt = input_tokens if input_tokens is not None else max(context - output, 1)
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
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
    ssm_dtype: str | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    memory_limit: int | None = None,
) -> ThroughputEstimate:
    """Time to first token, decode latency and tokens/s of `workload` on `gpu` (roofline, module docstring).

    `batch='max'` takes the largest batch whose memory at input + output tokens fits `memory_limit`
    (default: the GPU's memory)."""
    dtypes = dict(weight_dtype=weight_dtype, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype, prefill_chunk=prefill_chunk)
    context = workload.input_tokens + workload.output_tokens

    def memory_at(batch: int) -> MemoryEstimate:
        return estimate_memory(config, context, batch, **dtypes)

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


# ----- budgets ------------------------------------------------------------------------------------------
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


# ----- measured ----------------------------------------------------------------------------------------
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
    needed = estimate_memory(config, tokens, batch, weight_dtype=weight_dtype, prefill_chunk=0).cache
    sequences = f" x {batch} sequences" if batch > 1 else ""
    check_fits(needed, device, parameter=parameter, what=f"the cache for {tokens:,} tokens{sequences}", too=too)


def measure(
    config: HybridConfig,
    context: int,
    batch: int = 1,
    *,
    device="cpu",
    weight_dtype: str = "fp32",
    kv_dtype: str | None = None,
    ssm_dtype: str | None = None,
    steps: int = 8,
    seed: int = 0,
) -> Measurement:
    """Build the architecture (random weights), allocate its `HybridCache` for `context` tokens on
    `device`, and time `steps` cached decoding steps at the end of the context.

    The cache holds zeros, not a real prefill: the steps read the whole KV cache as a decode at that
    length does, without spending the prefill's time. Refuses when the model and cache would not fit in
    the device's available memory."""
    import torch

    from compressor.model import HybridLM

    weight_dtype = normalize_dtype(weight_dtype, ("fp32", "bf16", "fp16"), "weight dtype for --measure")
    kv_dtype = normalize_dtype(kv_dtype or weight_dtype, CACHE_DTYPES, "KV cache dtype")
    if kv_dtype != weight_dtype:
        raise BudgetError(
            f"measuring runs compressor's engine, whose attention needs the KV cache in the weight dtype "
            f"({weight_dtype}), not {kv_dtype}"
        )
    if context < 3:
        raise BudgetError(f"measuring decode needs a context of at least 3 tokens, got {context}")
    steps = max(1, min(steps, context - 2))
    estimate = estimate_memory(
        config, context, batch, weight_dtype=weight_dtype, kv_dtype=kv_dtype, ssm_dtype=ssm_dtype, prefill_chunk=0
    )
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
