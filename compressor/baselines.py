"""Transformer baselines: parameters, inference memory and roofline throughput of a plain decoder-only
transformer, read from its Hugging Face `config.json`, to compare a hybrid with the model it would replace.

Supported: the Llama, Mistral, Qwen2 and Qwen3 families (`model_type` llama, mistral, qwen2, qwen3). Each
layer is x + attention(RMSNorm(x)), then x + MLP(RMSNorm(x)); attention is grouped-query (q, k, v, o;
heads x head_dim wide, head_dim from the config or hidden / heads), the MLP is gated (gate, up, down:
down(act(gate(x)) * up(x))). Then a final RMSNorm and the output head, tied to the embeddings or not.
Family differences, as transformers builds them: Qwen2 has biases on q, k, v; Llama's `attention_bias`
adds them to q, k, v, o and `mlp_bias` to gate, up, down; Qwen3's `attention_bias` adds them to q, k, v, o
and it normalises q and k per head (two RMSNorms of head_dim). Refused with a `ConfigError` naming the key:
other model types, MoE configs, sliding-window attention (the KV cache would be bounded by the window).

The conventions are `compressor.budget`'s (read the docstrings of its modules), term by term:
- parameters: embeddings, lm_head (0 when tied), attention, mlp, norms (layer norms, final norm, q/k norms);
- weights: fp32 4 bytes, bf16 / fp16 2; fp8 / fp4 quantize the weight matrices (q, k, v, o, gate, up,
  down) with budget's scales, everything else stays bf16;
- KV cache per token of a sequence: layers x 2 x kv_heads x head_dim x bytes(kv); no SSM or conv state;
- activations: the prefill allowance for n = min(max(chunk, batch), context x batch) tokens in one forward
  pass: 3 n x hidden (residual stream, normed input, sublayer output) + the larger sublayer's
  intermediates, attention n x (2 heads + 2 kv_heads) x head_dim (q, k, v, output; fused attention) or MLP
  3 n x ffn (gate and up outputs, their gated product), plus one position's logits per sequence in fp32;
- throughput: `budget.roofline_throughput` on the transformer's `RooflineTerms` (no Mamba scan terms).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.budget import (
    CACHE_DTYPES,
    DEFAULT_PRECISION,
    DEFAULT_PREFILL_CHUNK,
    GPUSpec,
    MemoryEstimate,
    Precision,
    RooflineTerms,
    ThroughputEstimate,
    Workload,
    largest_fitting_batch,
    normalize_dtype,
    resolve_batch,
    roofline_throughput,
)
from compressor.budget import estimate_throughput as estimate_hybrid_throughput
from compressor.budget import num_parameters as num_hybrid_parameters
from compressor.budget import speedup as hybrid_speedup
from compressor.budget.memory import _matrix_bytes
from compressor.budget.units import _BYTES
from compressor.config import MAX_BLOCKS, MAX_WIDTH, HybridConfig
from compressor.errors import BudgetError, ConfigError

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Keys that make a config a mixture of experts (Mixtral, Qwen-MoE, DeepSeek, ...).
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
# What transformers assumes when a key is absent from config.json (its config classes' defaults).
_DEFAULT_KV_HEADS = {"llama": None, "mistral": 8, "qwen2": 32, "qwen3": 32}  # None: as many as query heads
_DEFAULT_HEAD_DIM = {"qwen3": 128}  # others: hidden / heads
_MISTRAL_SLIDING_WINDOW = 4096  # Mistral attends within it whenever set (Llama has none; Qwen: use_sliding_window)


@dataclass(frozen=True)
class TransformerConfig:
    """The architecture of a plain decoder-only transformer (module docstring), as its config.json gives it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q, k, v
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # biases on gate, up, down
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)
    max_position_embeddings: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TransformerConfig:
        """Read a parsed Hugging Face config.json; ConfigError naming the key for anything unsupported."""
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError(f"config.json has no model_type: transformer baselines read {', '.join(MODEL_TYPES)}")
        if model_type == "nemotron_h":
            raise ConfigError("model_type 'nemotron_h' is a hybrid, not a transformer baseline: give it as the model")
        if model_type not in MODEL_TYPES:
            moe = " (a mixture of experts)" if "moe" in str(model_type) or "mixtral" in str(model_type) else ""
            raise ConfigError(
                f"model_type {model_type!r}{moe} is not supported as a transformer baseline: "
                f"use a {', '.join(MODEL_TYPES)} config.json"
            )
        for key in _MOE_KEYS:
            if raw.get(key):
                raise ConfigError(
                    f"config.json sets {key} = {raw[key]!r}: mixture-of-experts transformers are not supported"
                )
        if model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
            raise ConfigError("config.json sets use_sliding_window = true: sliding-window attention is not supported")
        if model_type == "mistral" and raw.get("sliding_window", _MISTRAL_SLIDING_WINDOW) is not None:
            window = raw.get("sliding_window", _MISTRAL_SLIDING_WINDOW)
            absent = "" if "sliding_window" in raw else " (mistral's default when the key is absent)"
            raise ConfigError(
                f"config.json has sliding_window = {window}{absent}: sliding-window attention is not supported"
            )
        layer_types = raw.get("layer_types") or []
        if any(kind != "full_attention" for kind in layer_types):
            others = sorted(set(layer_types) - {"full_attention"})
            raise ConfigError(f"config.json's layer_types has {', '.join(others)}: only full_attention is supported")

        def whole(key: str, value: Any = None) -> int:
            value = raw.get(key) if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config.json's {key} must be a positive integer, got {value!r}")
            most = MAX_BLOCKS if key == "num_hidden_layers" else MAX_WIDTH  # the bounds of our own configs
            if value > most:
                raise ConfigError(f"config.json's {key} must be at most {most:,}, got {value:,}: the config is damaged")
            return value

        heads = whole("num_attention_heads")
        hidden = whole("hidden_size")
        kv_heads = whole("num_key_value_heads", raw.get("num_key_value_heads", _DEFAULT_KV_HEADS[model_type]) or heads)
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv_heads})")
        head_dim = raw.get("head_dim") or _DEFAULT_HEAD_DIM.get(model_type)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(
                    f"config.json has no head_dim and hidden_size ({hidden}) is not divisible by {heads} heads"
                )
            head_dim = hidden // heads
        attention_bias = bool(raw.get("attention_bias", False))
        max_positions = raw.get("max_position_embeddings")
        return cls(
            model_type=model_type,
            vocab_size=whole("vocab_size"),
            hidden_size=hidden,
            intermediate_size=whole("intermediate_size"),
            num_hidden_layers=whole("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=whole("head_dim", head_dim),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=max_positions if isinstance(max_positions, int) else None,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> TransformerConfig:
        """Read a config.json file, or the one inside a model folder."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: point at a model folder or a config.json file")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc})") from None
        except RecursionError:
            raise ConfigError(f"{path} holds values nested too deeply to be a config.json") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def attention_matrices(self) -> list[tuple[int, int]]:
        """(out, in) of q, k, v, o of one layer."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.kv_width
        return [(q, h), (kv, h), (kv, h), (h, q)]

    def mlp_matrices(self) -> list[tuple[int, int]]:
        """(out, in) of gate, up, down of one layer."""
        h, ffn = self.hidden_size, self.intermediate_size
        return [(ffn, h), (ffn, h), (h, ffn)]

    @property
    def kv_width(self) -> int:
        """kv_heads x head_dim: the width of k and v."""
        return self.num_key_value_heads * self.head_dim


# Published configs, the architecture keys of their config.json (full copies and their sources in
# tests/test_baselines.py, which checks that these read the same).
PUBLISHED: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-8B config.json
    "qwen3-8b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        attention_bias=False,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
        sliding_window=None,
        use_sliding_window=False,
    ),
    # meta-llama/Llama-3.1-8B config.json
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
}


def load_baseline(source: str | Path) -> TransformerConfig:
    """A transformer baseline from a published name ('qwen3-8b', 'llama-3.1-8b'), a config.json or a folder."""
    key = str(source).strip().lower()
    if key in PUBLISHED:
        return TransformerConfig.from_dict(PUBLISHED[key])
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            f"no transformer baseline {str(source)!r}: give a config.json, a model folder, or one of "
            f"{', '.join(PUBLISHED)}"
        )
    return TransformerConfig.from_file(path)


# ----- parameters and memory ---------------------------------------------------------------------------
def parameter_counts(config: TransformerConfig) -> dict[str, int]:
    """Exact parameters by component (embeddings, lm_head, attention, mlp, norms), as transformers builds them."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q, kv, ffn = config.num_attention_heads * config.head_dim, config.kv_width, config.intermediate_size
    attention = 2 * q * h + 2 * kv * h  # q, o; k, v
    attention += (q + 2 * kv if config.qkv_bias else 0) + (h if config.o_bias else 0)
    mlp = 3 * h * ffn + (2 * ffn + h if config.mlp_bias else 0)
    norms = 2 * h + (2 * config.head_dim if config.qk_norm else 0)  # input and post-attention; q_norm, k_norm
    return {
        "embeddings": config.vocab_size * h,
        "lm_head": 0 if config.tie_word_embeddings else config.vocab_size * h,
        "attention": layers * attention,
        "mlp": layers * mlp,
        "norms": layers * norms + h,
    }


def weight_bytes_by_component(config: TransformerConfig, dtype: str = "bf16") -> dict[str, int]:
    """Bytes of the weights by component (the keys of `parameter_counts`) in the given weight dtype; fp8 /
    fp4 quantize the layers' matrices as `compressor.budget` does, their biases and the rest stay bf16."""
    dtype = normalize_dtype(dtype)
    plain = 4 if dtype == "fp32" else 2  # bytes of an unquantized parameter
    out = {key: count * plain for key, count in parameter_counts(config).items()}
    if dtype in ("fp8", "fp4"):
        for kind, matrices in (("attention", config.attention_matrices()), ("mlp", config.mlp_matrices())):
            saved = sum(plain * o * i - _matrix_bytes(o, i, dtype) for o, i in matrices)
            out[kind] -= config.num_hidden_layers * saved
    return out


def weight_bytes(config: TransformerConfig, dtype: str = "bf16") -> int:
    """Bytes of all weights in the given weight dtype."""
    return sum(weight_bytes_by_component(config, dtype).values())


def num_parameters(config: TransformerConfig) -> int:
    """Total parameters (tied embeddings once)."""
    return sum(parameter_counts(config).values())


def kv_bytes_per_token(config: TransformerConfig, kv_dtype: str = "bf16") -> int:
    """KV cache bytes one token of one sequence takes: layers x 2 x kv_heads x head_dim x bytes."""
    size = _BYTES[normalize_dtype(kv_dtype, CACHE_DTYPES, "KV cache dtype")]
    return config.num_hidden_layers * 2 * config.kv_width * size


def activation_bytes(
    config: TransformerConfig,
    context: int,
    batch: int = 1,
    *,
    dtype: str = "bf16",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> int:
    """The prefill allowance (module docstring): the larger sublayer's intermediates for one forward pass of
    `prefill_chunk` tokens shared by the batch + one position's logits per sequence in fp32."""
    if prefill_chunk <= 0:
        return 0
    size = _BYTES[normalize_dtype(dtype, ("fp32", "bf16", "fp16"), "compute dtype")]
    n = min(max(prefill_chunk, batch), context * batch)  # tokens in one forward pass (a decode step: batch)
    attention = n * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    mlp = 3 * n * config.intermediate_size
    return (max(attention, mlp) + 3 * n * config.hidden_size) * size + batch * config.vocab_size * 4


def estimate_memory(
    config: TransformerConfig,
    context: int,
    batch: int = 1,
    *,
    precision: Precision = DEFAULT_PRECISION,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> MemoryEstimate:
    """Inference memory for `batch` sequences of `context` tokens in the deployment's `precision`: weights,
    KV cache, activations (the SSM and conv state terms are 0, their dtype 'none'; `precision.ssm` is unused)."""
    if context < 1 or batch < 1:
        raise BudgetError(f"context ({context}) and batch ({batch}) must be at least 1")
    act = precision.compute
    kv_dtype = precision.kv or act
    return MemoryEstimate(
        weights=weight_bytes(config, precision.weight),
        kv_cache=kv_bytes_per_token(config, kv_dtype) * context * batch,
        ssm_state=0,
        conv_state=0,
        activations=activation_bytes(config, context, batch, dtype=act, prefill_chunk=prefill_chunk),
        context=context,
        batch=batch,
        weight_dtype=precision.weight,
        kv_dtype=kv_dtype,
        ssm_dtype="none",
        compute_dtype=act,
        prefill_chunk=max(prefill_chunk, 0),
    )


def largest_batch(
    config: TransformerConfig,
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


# ----- throughput --------------------------------------------------------------------------------------
def roofline_terms(config: TransformerConfig, memory: MemoryEstimate) -> RooflineTerms:
    """The transformer's roofline terms in the dtypes of `memory` (see `budget.RooflineTerms`)."""
    by_component = weight_bytes_by_component(config, memory.weight_dtype)
    tied = config.tie_word_embeddings
    matrices = config.attention_matrices() + config.mlp_matrices()
    return RooflineTerms(
        # Decoding reads every weight but the embedding table (one row per token), unless lm_head shares it.
        read_weights=memory.weights - (0 if tied else by_component["embeddings"]),
        head_bytes=by_component["embeddings"] if tied else by_component["lm_head"],
        kv_bytes_per_token=kv_bytes_per_token(config, memory.kv_dtype),
        state_bytes=0,
        block_matmul=config.num_hidden_layers * sum(o * i for o, i in matrices),
        head_matmul=config.vocab_size * config.hidden_size,
        attention_width=config.num_hidden_layers * config.num_attention_heads * config.head_dim,
        scan_step=0,
        scan_chunked=0,
    )


def estimate_throughput(
    config: TransformerConfig,
    workload: Workload,
    gpu: GPUSpec,
    *,
    precision: Precision = DEFAULT_PRECISION,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    memory_limit: int | None = None,
) -> ThroughputEstimate:
    """Time to first token, decode latency and tokens/s of `workload` on `gpu` in `precision`, the roofline
    of `budget.estimate_throughput`; batch 'max' takes the largest batch whose memory at input + output
    tokens fits `memory_limit` (default: the GPU's memory)."""
    context = workload.input_tokens + workload.output_tokens

    def memory_at(batch: int) -> MemoryEstimate:
        return estimate_memory(config, context, batch, precision=precision, prefill_chunk=prefill_chunk)

    memory = memory_at(resolve_batch(workload, gpu, memory_at, memory_limit))
    return roofline_throughput(roofline_terms(config, memory), memory, workload, gpu)


# ----- hybrid against transformer ----------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """A hybrid and a transformer baseline on the same workload and GPU, each at its own batch."""

    hybrid_parameters: int
    baseline_parameters: int
    hybrid: ThroughputEstimate
    baseline: ThroughputEstimate

    @property
    def speedup(self) -> float:
        """Tokens/s of the hybrid over the baseline's (> 1: the hybrid is faster)."""
        return self.hybrid.tokens_per_s / self.baseline.tokens_per_s

    @property
    def decode_speedup(self) -> float:
        """The same for the decode phase alone."""
        return self.hybrid.decode_tokens_per_s / self.baseline.decode_tokens_per_s

    def to_dict(self) -> dict:
        return {
            "hybrid_parameters": self.hybrid_parameters,
            "baseline_parameters": self.baseline_parameters,
            "hybrid": self.hybrid.to_dict(),
            "baseline": self.baseline.to_dict(),
            "speedup": self.speedup,
            "decode_speedup": self.decode_speedup,
        }


def compare(
    hybrid: HybridConfig,
    baseline: TransformerConfig,
    workload: Workload,
    gpu: GPUSpec,
    *,
    precision: Precision = DEFAULT_PRECISION,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    memory_limit: int | None = None,
) -> Comparison:
    """Estimate both on `workload` and `gpu` in the same `precision` (its SSM state dtype is the hybrid's
    alone); with batch 'max' each gets the largest batch that fits."""
    options = dict(precision=precision, prefill_chunk=prefill_chunk, memory_limit=memory_limit)
    return Comparison(
        hybrid_parameters=num_hybrid_parameters(hybrid),
        baseline_parameters=num_parameters(baseline),
        hybrid=estimate_hybrid_throughput(hybrid, workload, gpu, **options),
        baseline=estimate_throughput(baseline, workload, gpu, **options),
    )


def speedup(
    hybrid: HybridConfig, reference: HybridConfig | TransformerConfig, workload: Workload, gpu: GPUSpec, **options
) -> float:
    """How many times the tokens/s of `reference` `hybrid` reaches on the same workload and GPU (> 1: faster):
    `budget.speedup` when `reference` is another hybrid, `compare(...).speedup` when it is a plain
    transformer (which has no SSM state: the precision's SSM dtype applies to `hybrid` only). Keyword
    arguments as `compare`; with batch 'max' each architecture gets its own batch."""
    if isinstance(reference, HybridConfig):
        return hybrid_speedup(hybrid, reference, workload, gpu, **options)
    return compare(hybrid, reference, workload, gpu, **options).speedup
