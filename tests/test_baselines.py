import json
import math

import pytest

from compressor import baselines
from compressor.baselines import PUBLISHED, TransformerConfig, compare, load_baseline, speedup
from compressor.budget import (
    GIB,
    GPUS,
    Precision,
    Workload,
    estimate_throughput,
    get_gpu,
    kv_bytes_per_token,
    num_parameters,
    weight_bytes,
)
from compressor.config import HybridConfig
from compressor.errors import BudgetError, ConfigError
from compressor.presets import get_preset

# Verbatim copies of the published config.json files, as transcribed in citsjtu2020/LLM-Prof
# `sglang/Model_Config.md` (commit 8434c8d19c396b2f95d92a67845a7c0a0e0dd512), the same values as the
# project's reference notes (next-round.md section 3).
# https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json (the base model: eos 128001)
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
# https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json (same source): q/k/v biases, no head_dim key.
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
# Qwen/Qwen3-30B-A3B (same source), abridged to the keys that make it a mixture of experts.
QWEN3_30B_A3B = {**QWEN3_8B, "model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8}

# 8k input / 16k output: the Nano-v2 report's throughput setting.
NANO_V2_WORKLOAD = (8192, 16384)


# ----- reading configs and counting parameters ----------------------------------------------------------
def test_published_parameter_counts_are_exact():
    qwen3 = TransformerConfig.from_dict(QWEN3_8B)
    assert baselines.num_parameters(qwen3) == 8_190_735_360
    counts = baselines.parameter_counts(qwen3)
    assert sum(counts.values()) - counts["embeddings"] - counts["lm_head"] == 6_946_075_648  # Qwen's "6.95B"
    llama = TransformerConfig.from_dict(LLAMA_31_8B)
    assert baselines.num_parameters(llama) == 8_030_261_248
    counts = baselines.parameter_counts(llama)
    assert sum(counts.values()) - counts["embeddings"] - counts["lm_head"] == 6_979_588_096
    qwen25 = TransformerConfig.from_dict(QWEN25_7B)
    assert qwen25.qkv_bias and not qwen25.o_bias and qwen25.head_dim == 128
    assert baselines.num_parameters(qwen25) == 7_615_616_512  # Qwen2.5's "7.61B"


def test_published_names_read_as_the_full_configs():
    assert load_baseline("qwen3-8b") == TransformerConfig.from_dict(QWEN3_8B)
    assert load_baseline("Llama-3.1-8B") == TransformerConfig.from_dict(LLAMA_31_8B)
    assert set(PUBLISHED) == {"qwen3-8b", "llama-3.1-8b"}


def _transformers_parameters(raw: dict) -> int:
    import torch
    import transformers

    values = dict(raw)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


_SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize(
    "raw",
    [
        dict(_SMALL, model_type="llama", num_key_value_heads=2),
        dict(_SMALL, model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
        dict(_SMALL, model_type="llama", head_dim=12),  # head_dim given, not hidden / heads
        dict(_SMALL, model_type="llama"),  # no num_key_value_heads: multi-head attention
        dict(_SMALL, model_type="mistral", num_key_value_heads=2, sliding_window=None),
        dict(_SMALL, model_type="qwen2", num_key_value_heads=2),  # q/k/v biases
        dict(_SMALL, model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=True),
        dict(_SMALL, model_type="qwen3", num_key_value_heads=2, head_dim=16),  # q/k norms
        dict(_SMALL, model_type="qwen3", num_key_value_heads=2, attention_bias=True),  # head_dim absent: 128
    ],
)
def test_parameter_counts_equal_what_transformers_builds(raw):
    config = TransformerConfig.from_dict(raw)
    assert baselines.num_parameters(config) == _transformers_parameters(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (QWEN3_30B_A3B, "model_type 'qwen3_moe' (a mixture of experts) is not supported as a transformer baseline"),
        ({**LLAMA_31_8B, "num_local_experts": 8}, "config.json sets num_local_experts = 8: mixture-of-experts"),
        ({**LLAMA_31_8B, "model_type": "gemma"}, "model_type 'gemma' is not supported"),
        ({k: v for k, v in LLAMA_31_8B.items() if k != "model_type"}, "config.json has no model_type"),
        ({"model_type": "nemotron_h"}, "is a hybrid, not a transformer baseline"),
        ({**QWEN3_8B, "use_sliding_window": True}, "config.json sets use_sliding_window = true"),
        ({**LLAMA_31_8B, "model_type": "mistral", "sliding_window": 4096}, "has sliding_window = 4096: sliding"),
        ({**LLAMA_31_8B, "model_type": "mistral"}, "sliding_window = 4096 (mistral's default when the key is absent)"),
        ({**QWEN3_8B, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types has sliding_attention"),
        ({k: v for k, v in QWEN3_8B.items() if k != "vocab_size"}, "vocab_size must be a positive integer, got None"),
        ({**LLAMA_31_8B, "num_key_value_heads": 5}, "num_attention_heads (32) is not divisible by num_key_value"),
        ({**LLAMA_31_8B, "hidden_size": 4100}, "no head_dim and hidden_size (4100) is not divisible by 32 heads"),
    ],
)
def test_unsupported_configs_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        TransformerConfig.from_dict(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_files_folders_and_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B))
    assert load_baseline(tmp_path) == load_baseline(tmp_path / "config.json") == load_baseline("qwen3-8b")
    with pytest.raises(ConfigError, match="no transformer baseline 'qwen9'.*qwen3-8b, llama-3.1-8b"):
        load_baseline("qwen9")
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_baseline(tmp_path)


# ----- memory -----------------------------------------------------------------------------------------
def test_kv_cache_per_token_and_memory_terms():
    qwen3, llama = load_baseline("qwen3-8b"), load_baseline("llama-3.1-8b")
    # layers x 2 (k and v) x kv_heads x head_dim x bytes
    assert baselines.kv_bytes_per_token(qwen3) == 36 * 2 * 8 * 128 * 2 == 147_456
    assert baselines.kv_bytes_per_token(llama) == 32 * 2 * 8 * 128 * 2 == 131_072
    assert baselines.kv_bytes_per_token(qwen3, "fp8") == 147_456 // 2
    hybrid = get_preset("9b-v2")
    assert baselines.kv_bytes_per_token(qwen3) == 9 * kv_bytes_per_token(hybrid)  # 4 attention blocks, not 36
    memory = baselines.estimate_memory(qwen3, 24_576, 3)
    assert memory.weights == 2 * 8_190_735_360
    assert memory.kv_cache == 147_456 * 24_576 * 3
    assert memory.ssm_state == memory.conv_state == 0 and memory.ssm_dtype == "none"
    # the allowance: 2048 tokens through the MLP (gate, up, product) + the residual stream, + fp32 logits
    assert memory.activations == (3 * 2048 * 12288 + 3 * 2048 * 4096) * 2 + 3 * 151936 * 4
    assert memory.total == memory.weights + memory.kv_cache + memory.activations
    assert baselines.estimate_memory(qwen3, 24_576, 3, prefill_chunk=0).activations == 0
    fp8 = baselines.estimate_memory(qwen3, 24_576, 3, precision=Precision("fp8"))
    assert memory.weights / 2 < fp8.weights < 0.6 * memory.weights  # embeddings and head stay bf16
    assert (
        fp8.kv_dtype == "bf16" and baselines.estimate_memory(qwen3, 8, precision=Precision("fp32")).kv_dtype == "fp32"
    )
    with pytest.raises(BudgetError, match="context"):
        baselines.estimate_memory(qwen3, 0)


def test_largest_batch_is_the_boundary():
    qwen3, limit = load_baseline("qwen3-8b"), 80 * GIB
    batch = baselines.largest_batch(qwen3, 24_576, limit)
    assert baselines.estimate_memory(qwen3, 24_576, batch).total <= limit
    assert baselines.estimate_memory(qwen3, 24_576, batch + 1).total > limit
    # the KV cache is what limits it: the memory left after the weights, over one sequence's KV cache
    assert batch == pytest.approx((limit - 2 * 8_190_735_360) / (147_456 * 24_576), abs=1)


# ----- throughput -------------------------------------------------------------------------------------
def test_a_transformer_and_the_same_layers_written_as_a_hybrid_estimate_alike():
    """Llama layers are attention + gated MLP; a nemotron_h stack `*-*-...` with an MLP 1.5x as wide (two
    matrices instead of three) has the same matrices, norms, KV cache and allowance: the same estimate."""
    llama = TransformerConfig.from_dict(dict(LLAMA_31_8B, num_hidden_layers=4))
    hybrid = HybridConfig(
        hybrid_override_pattern="*-" * 4,
        vocab_size=llama.vocab_size,
        hidden_size=llama.hidden_size,
        intermediate_size=3 * llama.intermediate_size // 2,
        num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads,
        head_dim=llama.head_dim,
    )
    assert baselines.num_parameters(llama) == num_parameters(hybrid)
    for workload in (Workload(8192, 16384, "max"), Workload(1000, 100, 3)):
        for options in ({}, {"precision": Precision("fp32", "fp8")}, {"prefill_chunk": 0}):
            ours = baselines.estimate_throughput(llama, workload, GPUS["h100-sxm"], **options).to_dict()
            theirs = estimate_throughput(hybrid, workload, GPUS["h100-sxm"], **options).to_dict()
            assert ours["memory"].pop("ssm_dtype") == "none"
            theirs["memory"].pop("ssm_dtype")
            assert ours == theirs
    # fp8 (ModelOpt's recipes): a byte a weight + two fp32 scalars a matrix; the transformer's attention is
    # quantized (ModelOpt's default), the hybrid recipe keeps it in bf16; gate + up are one matrix more
    attention = 2 * llama.hidden_size * (llama.num_attention_heads + llama.num_key_value_heads) * llama.head_dim
    # per layer: bf16 attention takes a byte more a weight but no 4 x 8 bytes of scalars; gate, up, down are
    # three quantized matrices (3 x 8 bytes of scalars) where the hybrid's MLP has two (2 x 8)
    per_layer = (attention - 4 * 8) - (3 - 2) * 8
    assert weight_bytes(hybrid, "fp8") - baselines.weight_bytes(llama, "fp8") == 4 * per_layer


def test_the_hybrid_beats_qwen3_at_8k_in_16k_out_and_more_so_at_the_largest_batch():
    hybrid, qwen3 = get_preset("9b-v2"), load_baseline("qwen3-8b")
    for gpu in (get_gpu("h100"), get_gpu("a10g")):
        single = compare(hybrid, qwen3, Workload(*NANO_V2_WORKLOAD), gpu)
        widest = compare(hybrid, qwen3, Workload(*NANO_V2_WORKLOAD, "max"), gpu)
        assert single.hybrid.batch == single.baseline.batch == 1
        assert single.speedup > 1  # fewer KV bytes to read per step
        assert widest.hybrid.batch > widest.baseline.batch >= 1  # the KV cache limits the transformer's batch
        assert widest.speedup > single.speedup > 1
        assert widest.hybrid_parameters == 8_888_227_328 and widest.baseline_parameters == 8_190_735_360
        assert widest.speedup == pytest.approx(widest.hybrid.tokens_per_s / widest.baseline.tokens_per_s)
        assert json.loads(json.dumps(widest.to_dict()))["baseline"]["memory"]["ssm_state"] == 0


def test_speedup_takes_a_transformer_reference():
    hybrid, qwen3, gpu = get_preset("9b-v2"), load_baseline("qwen3-8b"), get_gpu("h100")
    workload = Workload(*NANO_V2_WORKLOAD, "max")
    precision = Precision(kv="fp8", ssm="bf16")
    ratio = speedup(hybrid, qwen3, workload, gpu, precision=precision)
    assert ratio == compare(hybrid, qwen3, workload, gpu, precision=precision).speedup
    assert ratio != speedup(hybrid, qwen3, workload, gpu)  # the options reach the estimates
    assert speedup(hybrid, hybrid, workload, gpu) == pytest.approx(1.0)


def test_decode_of_a_transformer_slows_with_context_through_its_kv_cache():
    qwen3, gpu = load_baseline("qwen3-8b"), get_gpu("h100")
    short, long = (baselines.estimate_throughput(qwen3, Workload(n, 256), gpu) for n in (1024, 32_768))
    assert short.decode_bound == long.decode_bound == "memory"
    extra_kv = 147_456 * (32_768 - 1024) / gpu.memory_bandwidth  # read once more per step
    assert long.decode_latency_s - short.decode_latency_s == pytest.approx(extra_kv, rel=1e-6)


def test_workloads_that_do_not_fit_raise():
    with pytest.raises(BudgetError, match=r"131,072 tokens do not fit in 24.00 GiB even at batch 1 \(needs 3"):
        baselines.estimate_throughput(load_baseline("qwen3-8b"), Workload(98_304, 32_768, "max"), get_gpu("a10g"))
    with pytest.raises(BudgetError, match="at least 1 input and 1 output token"):
        baselines.estimate_throughput(load_baseline("qwen3-8b"), Workload(8, 0), get_gpu("a10g"))
    assert math.isfinite(
        baselines.estimate_throughput(load_baseline("qwen3-8b"), Workload(8192, 16384), get_gpu("a10g")).tokens_per_s
    )
