import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from compressor.budget import (
    DEFAULT_PREFILL_CHUNK,
    GIB,
    GPUS,
    Budget,
    GPUSpec,
    Precision,
    Workload,
    activation_bytes,
    active_parameters,
    conv_state_bytes,
    estimate_memory,
    estimate_throughput,
    experts_touched,
    get_gpu,
    kv_bytes_per_token,
    largest_batch,
    largest_block_parameters,
    measure,
    num_parameters,
    parameter_counts,
    parse_bandwidth,
    parse_context,
    parse_params,
    parse_size,
    speedup,
    ssm_state_bytes,
    weight_bytes,
    weight_bytes_by_component,
)
from compressor.cache import HybridCache
from compressor.checkpoint import load_model, save_model
from compressor.config import MAMBA, MLP, MOE, HybridConfig
from compressor.errors import BudgetError, CompressorError
from compressor.model import HybridLM
from compressor.presets import PUBLISHED, PUBLISHED_ACTIVE_PARAMS, TINY, get_preset

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
A10G_BUDGET = parse_size("19.66GiB")  # Nano-v2: 22 GiB less a 5% buffer and 1.3 GiB for a vision encoder


@st.composite
def hybrid_configs(draw, *, max_blocks: int = 8, scale: int = 1) -> HybridConfig:
    """Random architectures, some with per-block widths (`block_overrides`) that respect config.py's rules."""
    pattern = draw(st.text(alphabet="M*-", min_size=1, max_size=max_blocks))
    n_groups = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    overrides = {}
    for index, char in enumerate(pattern):
        if not draw(st.booleans()):
            continue
        if char == "M":
            overrides[index] = {
                "mamba_num_heads": n_groups * draw(st.integers(1, 4)),
                "mamba_head_dim": draw(st.integers(1, 16)) * scale,
            }
        elif char == "*":
            kv = draw(st.sampled_from([1, 2, 4]))
            overrides[index] = {"num_key_value_heads": kv, "num_attention_heads": kv * draw(st.integers(1, 4))}
        else:
            overrides[index] = {"intermediate_size": draw(st.integers(1, 200)) * scale}
    return HybridConfig(
        hybrid_override_pattern=pattern,
        vocab_size=draw(st.integers(8, 300)) * scale,
        hidden_size=draw(st.integers(1, 64)) * scale,
        intermediate_size=draw(st.integers(1, 200)) * scale,
        num_attention_heads=kv_heads * draw(st.integers(1, 4)),
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8, 16])),
        mamba_num_heads=n_groups * draw(st.integers(1, 4)),
        mamba_head_dim=draw(st.integers(1, 16)),
        n_groups=n_groups,
        ssm_state_size=draw(st.sampled_from([4, 8, 16])),
        conv_kernel=draw(st.integers(1, 4)),
        chunk_size=draw(st.sampled_from([4, 16, 64])),
        use_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        use_conv_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        mamba_ssm_cache_dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        block_overrides=overrides,
    )


def _meta_model(config: HybridConfig) -> HybridLM:
    with torch.device("meta"):
        return HybridLM(config)


def _largest_block(model: HybridLM) -> int:
    return max(sum(p.numel() for p in block.parameters()) for block in model.backbone.layers)


# ----- parameters ---------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(hybrid_configs(max_blocks=10, scale=32))
def test_parameter_counts_equal_the_built_model(config):
    model = _meta_model(config)
    assert parameter_counts(config) == model.parameter_counts()
    assert num_parameters(config) == model.num_parameters()
    assert largest_block_parameters(config) == _largest_block(model)


@pytest.mark.parametrize("name", [*PUBLISHED, *TINY])
def test_parameter_counts_of_presets(name):
    config = get_preset(name)
    assert parameter_counts(config) == _meta_model(config).parameter_counts()


def test_biases_and_tied_embeddings_change_the_count_as_the_model_does():
    base = get_preset("tiny")
    plain = num_parameters(base)
    h, v = base.hidden_size, base.vocab_size
    assert num_parameters(base.replace(tie_word_embeddings=True)) == plain - v * h
    conv_dim = base.mamba_num_heads * base.mamba_head_dim + 2 * base.n_groups * base.ssm_state_size
    assert num_parameters(base.replace(use_conv_bias=False)) == plain - base.count(MAMBA) * conv_dim
    assert num_parameters(base.replace(mlp_bias=True)) == plain + base.count(MLP) * (base.intermediate_size + h)


# ----- memory -------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    hybrid_configs(max_blocks=6),
    st.integers(1, 300),
    st.integers(1, 3),
    st.sampled_from(["fp32", "bf16", "fp16"]),
    st.sampled_from([None, "fp32", "bf16", "fp16", "fp8"]),
    st.sampled_from([None, "fp32", "bf16", "fp16"]),
)
def test_cache_bytes_equal_what_hybrid_cache_allocates(config, context, batch, weight_dtype, kv_dtype, ssm_dtype):
    estimate = estimate_memory(config, context, batch, precision=Precision(weight_dtype, kv_dtype, ssm_dtype))
    cache = HybridCache(
        config,
        batch,
        context,
        dtype=TORCH_DTYPES[weight_dtype],
        kv_dtype=TORCH_DTYPES[kv_dtype] if kv_dtype else None,
        ssm_dtype=TORCH_DTYPES[ssm_dtype] if ssm_dtype else None,
    )
    assert estimate.cache == cache.nbytes()
    kv = sum(s.key.nbytes + s.value.nbytes for s in cache.layers.values() if hasattr(s, "key"))
    assert estimate.kv_cache == kv
    assert estimate.ssm_state == sum(s.ssm.nbytes for s in cache.layers.values() if hasattr(s, "ssm"))


@settings(max_examples=30, deadline=None)
@given(hybrid_configs(max_blocks=8, scale=8), st.sampled_from(["fp32", "bf16", "fp16"]))
def test_unquantized_weight_bytes_equal_the_built_model(config, dtype):
    model = _meta_model(config).to(TORCH_DTYPES[dtype])
    assert weight_bytes(config, dtype) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_fp8_and_fp4_weights_carry_their_scales():
    # One MLP block: up (48, 32) and down (32, 48) are quantized; embeddings, lm_head and norms stay bf16.
    config = HybridConfig(hybrid_override_pattern="-", vocab_size=10, hidden_size=32, intermediate_size=48)
    bf16_rest = 2 * (10 * 32 * 2 + 32 * 2)  # embeddings + lm_head + two norms
    assert weight_bytes(config, "bf16") == 2 * num_parameters(config)
    # fp8: a byte a weight + fp32 weight and input scales per matrix (ModelOpt's export)
    assert weight_bytes(config, "fp8") == bf16_rest + (48 * 32 + 8) + (32 * 48 + 8)
    # fp4 (NVFP4): half a byte a weight + one fp8 scale per 16 weights of a row + two fp32 scales per matrix
    assert weight_bytes(config, "fp4") == bf16_rest + (768 + 48 * 2 + 8) + (768 + 32 * 3 + 8)
    assert weight_bytes(config, "nvfp4") == weight_bytes(config, "fp4")
    # attention stays bf16 under the quantization recipe
    attention = HybridConfig(hybrid_override_pattern="*", vocab_size=10, hidden_size=32, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16)  # fmt: skip
    assert weight_bytes(attention, "fp8") == weight_bytes(attention, "fp4") == weight_bytes(attention, "bf16")
    nine = get_preset("9b-v2")
    bf16, fp8, fp4 = (weight_bytes(nine, d) for d in ("bf16", "fp8", "fp4"))
    assert 0.5 * bf16 < fp8 < 0.6 * bf16 and 0.25 * bf16 < fp4 < fp8
    parts = weight_bytes_by_component(nine, "fp8")
    assert parts["embeddings"] == 2 * nine.vocab_size * nine.hidden_size and sum(parts.values()) == fp8


def test_published_cache_values():
    nine, twelve = get_preset("9b-v2"), get_preset("12b-v2")
    assert kv_bytes_per_token(nine, "bf16") == 16_384
    assert ssm_state_bytes(nine) == 141_557_760  # fp32, mamba_ssm_cache_dtype
    # compressor keeps K-1 = 3 conv columns; transformers keeps K = 4 (the reference's 2,654,208 B)
    assert conv_state_bytes(nine, "bf16") == 1_990_656 == 2_654_208 * 3 // 4
    assert kv_bytes_per_token(twelve, "bf16") == 24_576
    memory = estimate_memory(nine, 131_072)
    assert memory.kv_cache == 16_384 * 131_072 and memory.ssm_state == 141_557_760
    assert memory.weights == 2 * 8_888_227_328


def test_nano_v2_decision_12b_does_not_fit_an_a10g_at_128k_and_9b_does():
    context = parse_context("128k")
    twelve = estimate_memory(get_preset("12b-v2"), context, precision=Precision("bf16"))
    nine = estimate_memory(get_preset("9b-v2"), context, precision=Precision("bf16"))
    assert twelve.prefill_chunk == nine.prefill_chunk == DEFAULT_PREFILL_CHUNK and nine.activations > 0
    assert twelve.headroom(A10G_BUDGET) < 0 < nine.headroom(A10G_BUDGET)
    assert 18.5 * GIB < nine.total < 19.66 * GIB  # the reference's "about 18.7 GiB" + the activation allowance
    assert twelve.weights > 22.9 * GIB


def test_activation_allowance_is_explicit_and_can_be_left_out():
    config = get_preset("9b-v2")
    with_chunk = estimate_memory(config, 131_072)
    without = estimate_memory(config, 131_072, prefill_chunk=0)
    assert without.activations == 0 and with_chunk.total - without.total == with_chunk.activations
    # a bigger chunk holds more in flight; a context shorter than the chunk caps it
    assert activation_bytes(config, 131_072, prefill_chunk=4096) > with_chunk.activations
    assert activation_bytes(config, 100) == activation_bytes(config, 100, prefill_chunk=100)
    # the chunk is shared by the batch: more sequences add only their logits (and states elsewhere)
    extra = activation_bytes(config, 131_072, 4) - activation_bytes(config, 131_072, 1)
    assert extra == 3 * config.vocab_size * 4


def test_memory_terms_grow_with_context_and_batch():
    config = get_preset("9b-v2")
    small, long, wide = (estimate_memory(config, c, b) for c, b in ((8192, 1), (131_072, 1), (8192, 4)))
    assert long.kv_cache == 16 * small.kv_cache and long.ssm_state == small.ssm_state
    assert wide.kv_cache == 4 * small.kv_cache and wide.ssm_state == 4 * small.ssm_state
    assert wide.weights == small.weights


def test_largest_batch_is_the_boundary():
    config = get_preset("9b-v2")
    limit = parse_size("80GiB")
    batch = largest_batch(config, 24_576, limit)
    assert batch > 1
    assert estimate_memory(config, 24_576, batch).total <= limit < estimate_memory(config, 24_576, batch + 1).total
    assert largest_batch(get_preset("12b-v2"), 131_072, A10G_BUDGET) == 0


def test_bad_dtypes_raise_budget_errors():
    config = get_preset("tiny")
    with pytest.raises(BudgetError, match="unknown weight dtype 'int3': use bf16, fp16, fp32, fp8, fp4"):
        estimate_memory(config, 128, precision=Precision("int3"))
    with pytest.raises(BudgetError, match="unknown SSM state dtype 'fp8'"):
        estimate_memory(config, 128, precision=Precision(ssm="fp8"))


# ----- throughput ---------------------------------------------------------------------------------------
def test_throughput_roofline_regimes():
    config, a10g = get_preset("9b-v2"), get_gpu("a10g")
    result = estimate_throughput(config, Workload(8192, 1024), a10g)
    assert result.prefill_bound == "compute" and result.decode_bound == "memory"
    # batch 1 decoding on a memory-bound GPU: at least the weight bytes over the bandwidth per token
    weights_read = result.memory.weights - weight_bytes_by_component(config)["embeddings"]
    assert result.decode_latency_s > weights_read / a10g.memory_bandwidth
    assert result.decode_latency_s < 1.2 * weights_read / a10g.memory_bandwidth
    assert result.time_to_first_token_s == result.prefill_s > 2 * 8e9 * 8192 / a10g.bf16_flops
    assert result.tokens_per_s == pytest.approx(1024 / (result.prefill_s + result.decode_s))
    assert json.loads(json.dumps(result.to_dict()))["memory"]["batch"] == 1


def test_decode_slows_with_context_only_through_attention():
    gpu = get_gpu("h100")
    hybrid = get_preset("9b-v2")
    mamba_only = hybrid.replace(hybrid_override_pattern=hybrid.pattern.replace("*", "M"))
    short, long = (estimate_throughput(hybrid, Workload(n, 256), gpu) for n in (1024, 131_072))
    assert long.decode_latency_s > short.decode_latency_s
    short, long = (estimate_throughput(mamba_only, Workload(n, 256), gpu) for n in (1024, 131_072))
    assert long.decode_latency_s == pytest.approx(short.decode_latency_s)


def test_fewer_parameters_or_attention_blocks_decode_faster_at_long_context():
    gpu, workload = get_gpu("a100-80gb"), Workload(65_536, 4096)
    twelve, nine = get_preset("12b-v2"), get_preset("9b-v2")
    assert speedup(nine, twelve, workload, gpu) > 1.3  # fewer parameters and attention blocks
    assert speedup(twelve, twelve, workload, gpu) == pytest.approx(1.0)
    assert speedup(nine, twelve, workload, gpu) == pytest.approx(1 / speedup(twelve, nine, workload, gpu))
    # the same widths with two attention blocks turned into MLP blocks: fewer KV bytes per decode step
    pattern = twelve.pattern.replace("*", "-", 2)
    fewer_attention = twelve.replace(hybrid_override_pattern=pattern, intermediate_size=twelve.intermediate_size)
    assert speedup(fewer_attention, twelve, workload, gpu) > 1.0
    # the largest batch that fits turns the memory saved into throughput
    wide = estimate_throughput(nine, Workload(8192, 16_384, "max"), gpu)
    single = estimate_throughput(nine, Workload(8192, 16_384), gpu)
    assert wide.batch > 1 and wide.tokens_per_s > 10 * single.tokens_per_s


@settings(max_examples=30, deadline=None)
@given(hybrid_configs(max_blocks=8, scale=16), st.integers(1, 4096), st.integers(1, 512))
def test_smaller_widths_never_slow_decoding(config, isl, osl):
    gpu = GPUSpec("test", 1e12, 1e14, 80 * GIB)
    smaller = config.replace(hidden_size=max(config.hidden_size // 2, 1))
    ours = estimate_throughput(smaller, Workload(isl, osl), gpu)
    theirs = estimate_throughput(config, Workload(isl, osl), gpu)
    assert ours.decode_s <= theirs.decode_s and ours.prefill_s <= theirs.prefill_s
    longer = estimate_throughput(config, Workload(isl + 1000, osl), gpu)
    assert longer.prefill_s >= theirs.prefill_s and longer.decode_s >= theirs.decode_s


def test_max_batch_that_does_not_fit_and_bad_workloads_raise():
    with pytest.raises(BudgetError, match=r"do not fit in 24.00 GiB even at batch 1 \(needs 2\d\.\d\d GiB\)"):
        estimate_throughput(get_preset("12b-v2"), Workload(8192, 16_384, "max"), get_gpu("a10g"))
    with pytest.raises(BudgetError, match="at least 1 input and 1 output token"):
        estimate_throughput(get_preset("tiny"), Workload(10, 0), get_gpu("a10g"))


def test_gpu_table():
    assert set(GPUS) == {"a10g", "l4", "l40s", "a100-40gb", "a100-80gb", "h100-sxm", "h200", "b200", "rtx-5090"}
    assert get_gpu("H100") is GPUS["h100-sxm"] and get_gpu("A10G").memory == 24 * GIB
    for spec in GPUS.values():
        assert 2e11 < spec.memory_bandwidth < 1e13 and 5e13 < spec.bf16_flops < 5e15
    with pytest.raises(BudgetError, match="unknown GPU 'a10x': choose one of a10g, l4, l40s, a100-40gb"):
        get_gpu("a10x")


# ----- parsing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22GiB", 22 * 2**30),
        ("19.66GiB", round(19.66 * 2**30)),
        ("20GB", 20 * 10**9),
        ("512MiB", 512 * 2**20),
        ("22G", 22 * 2**30),
        ("22 gib", 22 * 2**30),
        ("1.5TB", 1_500_000_000_000),
        ("4096B", 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("22GB/s", "unknown unit 'GB/s' in memory size '22GB/s' (that is a bandwidth, not a size)"),
        ("-1GiB", "memory size '-1GiB' is negative"),
        ("", "empty memory size"),
        ("abc", "memory size 'abc' does not start with a number"),
        ("22", "memory size '22' has no unit"),
        ("0GiB", "memory size '0GiB' must be more than zero"),
        ("22 gigs", "unknown unit 'gigs'"),
    ],
)
def test_parse_size_rejects(text, message):
    with pytest.raises(BudgetError) as info:
        parse_size(text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "19.66GiB" in str(info.value)  # says how to write it


@pytest.mark.parametrize(
    ("text", "expected"),
    [("128k", 131_072), ("8k", 8192), ("4096", 4096), ("1M", 1_048_576), ("128K", 131_072), ("1.5k", 1536)],
)
def test_parse_context(text, expected):
    assert parse_context(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("128q", "unknown suffix 'q' in context length '128q'"),
        ("", "empty context length"),
        ("abc", "context length 'abc' does not start with a number"),
        ("-8k", "context length '-8k' is negative"),
        ("0.3k", "context length '0.3k' is not a whole number"),
        ("0", "context length '0' must be more than zero"),
    ],
)
def test_parse_context_rejects(text, message):
    with pytest.raises(BudgetError) as info:
        parse_context(text)
    assert message in str(info.value) and "128k (k = 1024 tokens" in str(info.value)


def test_parse_params_and_bandwidth():
    assert parse_params("9B") == 9 * 10**9 and parse_params("9.5B") == 9_500_000_000
    assert parse_params("800M") == 800 * 10**6 and parse_params("12,310,001,152") == 12_310_001_152
    with pytest.raises(BudgetError, match="unknown suffix 'GB' in parameter count '9GB'.*9.5B"):
        parse_params("9GB")
    assert parse_bandwidth("600GB/s") == 600e9 and parse_bandwidth("3.35TB/s") == 3.35e12
    with pytest.raises(BudgetError, match="bandwidth '600GB' is not a size per second"):
        parse_bandwidth("600GB")
    assert issubclass(BudgetError, CompressorError)


# ----- measured -----------------------------------------------------------------------------------------
def test_measure_allocates_the_estimated_cache_and_times_decoding():
    config = get_preset("tiny")
    precision = Precision("fp32", ssm="bf16")
    result = measure(config, 512, 2, precision=precision, steps=4)
    assert (
        result.cache_bytes == result.estimated_cache_bytes == estimate_memory(config, 512, 2, precision=precision).cache
    )
    assert result.decode_steps == 4 and result.decode_tokens_per_s == pytest.approx(2 / result.decode_latency_s)
    assert math.isfinite(result.decode_latency_s) and result.decode_latency_s > 0


def test_measure_refuses_what_cannot_run():
    with pytest.raises(BudgetError, match="GiB is available: measure a smaller architecture or context"):
        measure(get_preset("56b"), 4096)
    with pytest.raises(BudgetError, match="KV cache in the weight dtype"):
        measure(get_preset("tiny"), 64, precision=Precision("fp32", "fp8"))
    with pytest.raises(BudgetError, match="unknown weight dtype for --measure 'fp4'"):
        measure(get_preset("tiny"), 64, precision=Precision("fp4"))


# ----- CLI ----------------------------------------------------------------------------------------------
runner = CliRunner()


def _estimate(*args):
    return runner.invoke(app, ["estimate", *map(str, args)])


def test_cli_estimate_json_on_presets():
    args = ("--ctx", "128k", "--gpu", "a10g", "--target-mem", "19.66GiB", "--json")
    twelve = json.loads(_estimate("12b-v2", *args).output)
    nine = json.loads(_estimate("9b-v2", *args).output)
    assert twelve["parameters"]["total"] == 12_310_001_152 and nine["parameters"]["total"] == 8_888_227_328
    assert twelve["memory"]["kv_cache"] == 24_576 * 131_072 and nine["memory"]["ssm_state"] == 141_557_760
    assert twelve["target"]["fits"] is False and nine["target"]["fits"] is True
    assert nine["target"]["headroom"] == A10G_BUDGET - nine["memory"]["total"]
    assert nine["throughput"]["gpu"] == "A10G" and nine["throughput"]["input_tokens"] + 1024 == 131_072
    assert nine["throughput"]["decode_latency_s"] < twelve["throughput"]["decode_latency_s"]
    assert nine["measured"] is None


def test_cli_estimate_table_and_verdicts():
    result = _estimate("9b-v2", "--ctx", "128k", "--target-mem", "19.66GiB", "--gpu", "a10g")
    assert result.exit_code == 0, result.output
    assert "fits in 19.66 GiB with 0.55 GiB to spare" in result.output
    assert "2,147,483,648" in result.output  # the KV cache at 128k: 16,384 B a token
    assert "time to first token" in result.output and "memory bound" in result.output
    result = _estimate("12b-v2", "--ctx", "128k", "--target-mem", "19.66GiB")
    assert result.exit_code == 0 and "does not fit in 19.66 GiB: over by 6.83 GiB" in result.output
    result = _estimate("9b-v2", "--ctx", "8k", "--batch", "max", "--target-mem", "80GiB", "--json")
    data = json.loads(result.output)
    assert data["memory"]["batch"] == largest_batch(get_preset("9b-v2"), 8192, 80 * GIB) > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--target-mem", "22GB/s"), "unknown unit 'GB/s' in memory size '22GB/s'"),
        (("--target-mem", "-1GiB"), "is negative"),
        (("--ctx", "128q"), "unknown suffix 'q' in context length '128q'"),
        (("--gpu", "a10x"), "unknown GPU 'a10x': choose one of a10g, l4"),
        (("--batch", "two"), "--batch 'two' is not a positive whole number or 'max'"),
        (("--batch", "max"), "--batch max needs --target-mem or --gpu"),
        (("--gpu-tflops", "70"), "both --gpu-bandwidth and --gpu-tflops"),
        (("--weight-dtype", "int4"), "unknown weight dtype 'int4'"),
    ],
)
def test_cli_estimate_errors(args, message):
    result = _estimate("9b-v2", *args)
    assert result.exit_code == 1 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_cli_estimate_custom_gpu():
    result = _estimate("9b-v2", "--ctx", "8k", "--gpu-bandwidth", "600GB/s", "--gpu-tflops", "70", "--json")
    custom = json.loads(result.output)["throughput"]
    named = json.loads(_estimate("9b-v2", "--ctx", "8k", "--gpu", "a10g", "--json").output)["throughput"]
    assert custom["gpu"] == "custom GPU" and custom["decode_s"] == pytest.approx(named["decode_s"])


def test_cli_estimate_measure_on_tiny():
    result = _estimate("tiny", "--ctx", "1k", "--batch", "2", "--measure", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["measured"]["cache_bytes"] == data["memory"]["cache"] == data["measured"]["estimated_cache_bytes"]
    assert data["measured"]["decode_tokens_per_s"] > 0
    result = _estimate("tiny", "--ctx", "1k", "--measure", "--device", "cpu")
    assert result.exit_code == 0 and "measured on cpu (bf16)" in result.output and "cache bytes" in result.output


# ----- MoE ----------------------------------------------------------------------------------------------
@st.composite
def moe_configs(draw, *, scale: int = 1) -> HybridConfig:
    """Random hybrid MoE architectures, some MoE blocks with their own expert counts and widths."""
    base = draw(hybrid_configs(max_blocks=4, scale=scale))
    pattern = base.pattern + "E" + draw(st.text(alphabet="ME*-", max_size=3))
    n_group = draw(st.sampled_from([1, 2]))
    top_k = draw(st.integers(1, 2))
    experts = n_group * draw(st.integers(2, 5))  # the global count is the largest (HybridConfig requires it)
    overrides = dict(base.block_overrides)
    for index, char in enumerate(pattern):
        if char == "E" and draw(st.booleans()):
            overrides[index] = {
                "n_routed_experts": n_group * draw(st.integers(2, experts // n_group)),
                "moe_intermediate_size": draw(st.integers(1, 40)) * scale,
                "moe_shared_expert_intermediate_size": draw(st.integers(1, 40)) * scale,
            }
    return base.replace(
        hybrid_override_pattern=pattern,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=draw(st.integers(1, 40)) * scale,
        moe_shared_expert_intermediate_size=draw(st.integers(1, 40)) * scale,
        moe_latent_size=draw(st.sampled_from([None, 8 * scale])),
        n_group=n_group,
        topk_group=n_group,
        block_overrides=overrides,
    )


@settings(max_examples=40, deadline=None)
@given(moe_configs(scale=8))
def test_moe_parameter_counts_equal_the_built_model(config):
    model = _meta_model(config)
    assert parameter_counts(config) == model.parameter_counts()
    assert parameter_counts(config)[MOE] > 0
    assert largest_block_parameters(config) == _largest_block(model)
    # active: the total less, in each MoE block, the experts a token is not routed to
    unused = 0
    for block in model.backbone.layers:
        if block.kind == MOE:
            expert = sum(p.numel() for p in block.mixer.experts[0].parameters())
            unused += (len(block.mixer.experts) - config.num_experts_per_tok) * expert
    assert active_parameters(config) == model.num_parameters() - unused


def test_nano3_total_and_active_parameters_are_the_published_ones():
    nano = get_preset("nemotron-3-nano-30b-a3b")
    assert num_parameters(nano) == 31_577_937_344
    assert active_parameters(nano) == PUBLISHED_ACTIVE_PARAMS["nemotron-3-nano-30b-a3b"] == 3_580_073_408
    counts = parameter_counts(nano)
    assert active_parameters(nano) - counts["embeddings"] == 3_227_751_872  # NVIDIA's "3.2B active"
    assert counts[MOE] == 23 * 1_297_465_344 and counts[MAMBA] == 23 * 38_742_208
    # all 128 experts are resident: BF16 weights are NVIDIA's 63.16 GB, plus the fp32 router's extra bytes
    router_extra = 23 * (128 * 2688 * 2 + 128 * 4)  # fp32 instead of bf16 weight, plus the fp32 bias buffer
    assert weight_bytes(nano, "bf16") == 2 * 31_577_937_344 + router_extra
    assert round(weight_bytes(nano, "bf16") / 1e9, 2) == 63.17  # NVIDIA: 63.16 GB
    for name in PUBLISHED:
        if not get_preset(name).has_moe:
            assert active_parameters(get_preset(name)) == num_parameters(get_preset(name))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_moe_weight_bytes_equal_a_loaded_checkpoint(tmp_path, dtype):
    config = get_preset("tiny-moe").replace(
        moe_latent_size=24, mlp_bias=True, block_overrides={4: {"n_routed_experts": 4}}
    )
    save_model(HybridLM(config), tmp_path / "moe")
    model = load_model(tmp_path / "moe", dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # router fp32, its bias buffer
    assert weight_bytes(config, dtype) == held


def test_fp8_and_fp4_quantize_every_expert_but_not_the_router():
    # One MoE block: 4 experts (8, 16) / (16, 8), shared (12, 16) / (16, 12), router (4, 16) + bias kept fp32.
    config = HybridConfig(
        hybrid_override_pattern="E", vocab_size=10, hidden_size=16, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, moe_shared_expert_intermediate_size=12,
    )  # fmt: skip
    bf16_rest = 2 * (10 * 16 * 2 + 16 * 2)  # embeddings + lm_head + two norms
    router = 4 * (4 * 16 + 4)
    assert weight_bytes(config, "bf16") == bf16_rest + 2 * (4 * 2 * 8 * 16 + 2 * 12 * 16) + router
    # FP8: a byte a weight + two fp32 scalars (weight and input scale) per matrix, as ModelOpt exports
    fp8_experts = 4 * ((8 * 16 + 8) + (16 * 8 + 8))
    fp8_shared = (12 * 16 + 8) + (16 * 12 + 8)
    assert weight_bytes(config, "fp8") == bf16_rest + fp8_experts + fp8_shared + router
    # NVFP4: half a byte a weight + an E4M3 scale per 16 of a row + two fp32 scalars per matrix
    fp4_experts = 4 * ((64 + 8 * 1 + 8) + (64 + 16 * 1 + 8))
    fp4_shared = (96 + 12 * 1 + 8) + (96 + 16 * 1 + 8)
    assert weight_bytes(config, "fp4") == bf16_rest + fp4_experts + fp4_shared + router


def test_experts_touched_by_a_batch():
    assert experts_touched(128, 6, 1) == pytest.approx(6)
    assert experts_touched(128, 6, 2) == pytest.approx(128 * (1 - (122 / 128) ** 2))
    assert 127.9 < experts_touched(128, 6, 2048) <= 128
    assert experts_touched(8, 8, 1) == pytest.approx(8)


def test_moe_roofline_computes_active_parameters_and_reads_the_experts_a_batch_touches():
    gpu = get_gpu("h100")
    small = get_preset("nemotron-3-nano-30b-a3b")
    # four times the experts at the same top-k: four times the expert memory, the same FLOPs a token
    big = small.replace(n_routed_experts=512)
    assert weight_bytes(big) > 3 * weight_bytes(small)
    assert active_parameters(big) - active_parameters(small) == 23 * (512 - 128) * 2688
    one_small, one_big = (estimate_throughput(c, Workload(64, 256, 1), gpu) for c in (small, big))
    assert one_small.decode_bound == "memory"
    # batch 1 reads 6 experts a block either way: decoding costs about the same (the routers differ)
    assert one_big.decode_latency_s == pytest.approx(one_small.decode_latency_s, rel=0.02)
    # a decode step of batch 1 reads about the active weights, not all of them
    active_bytes = 2 * (active_parameters(small) - parameter_counts(small)["embeddings"])
    assert active_bytes / gpu.memory_bandwidth < one_small.decode_latency_s < 1.1 * active_bytes / gpu.memory_bandwidth
    # a large batch touches every expert: the big model's decode slows with its resident experts
    wide_small, wide_big = (estimate_throughput(c, Workload(64, 256, 256), gpu) for c in (small, big))
    assert wide_big.decode_s > 1.5 * wide_small.decode_s
    # long prefill in large passes is compute bound at the active parameters' FLOPs (each pass of
    # prefill_chunk tokens reads every expert: with the default 2048 it is memory bound)
    prefills = (estimate_throughput(c, Workload(32_768, 16, 8), gpu, prefill_chunk=16_384) for c in (small, big))
    prefill_small, prefill_big = prefills
    assert prefill_small.prefill_bound == "compute"
    assert prefill_big.prefill_s == pytest.approx(prefill_small.prefill_s, rel=0.02)
    assert prefill_small.prefill_s > 2 * active_parameters(small) * 32_768 * 8 / gpu.bf16_flops * 0.9


def test_moe_activation_allowance_grows_with_top_k_and_experts():
    config = get_preset("tiny-moe").replace(hybrid_override_pattern="E")
    base = activation_bytes(config, 4096)
    assert activation_bytes(config.replace(num_experts_per_tok=4), 4096) > base
    assert activation_bytes(config.replace(n_routed_experts=64), 4096) > base
    assert estimate_memory(config, 4096).cache == 0  # MoE blocks keep no cache


def test_budget_active_parameter_limit():
    nano = get_preset("nemotron-3-nano-30b-a3b")
    budget = Budget(active_params=3_000_000_000)
    assert budget.violations(nano, nano) == ["active parameters 3,580,073,408 > 3,000,000,000"]
    pruned = nano.replace(num_experts_per_tok=4, moe_intermediate_size=1536)
    assert active_parameters(pruned) < 3_000_000_000 and budget.violations(pruned, nano) == []
    assert "<= 3,000,000,000 active parameters" in budget.describe()
    both = Budget(params=20_000_000_000, active_params=4_000_000_000)
    assert both.violations(nano, nano) == ["parameters 31,577,937,344 > 20,000,000,000"]
    with pytest.raises(BudgetError, match="no budget given"):
        Budget()


def test_cli_estimate_against_a_transformer_baseline():
    args = ("--isl", "8k", "--osl", "16k", "--gpu", "h100", "--batch", "max")
    data = json.loads(_estimate("9b-v2", "--vs", "qwen3-8b", *args, "--json").output)
    versus = data["versus"]
    assert versus["baseline_parameters"] == 8_190_735_360 and versus["hybrid_parameters"] == 8_888_227_328
    assert versus["hybrid"]["batch"] > versus["baseline"]["batch"] and versus["speedup"] > 3
    result = _estimate("9b-v2", "--vs", "qwen3-8b", *args)
    assert result.exit_code == 0 and f"speedup: {versus['speedup']:.2f}x tokens/s" in result.output
    result = _estimate("9b-v2", "--vs", "qwen3-8b")
    assert result.exit_code == 1 and "--vs compares throughput: give a GPU" in result.output
    result = _estimate("9b-v2", "--vs", "gpt-9", "--gpu", "h100")
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_active_parameter_budget_from_its_written_form():
    budget = Budget.from_options(target_active_params="3B")
    assert budget.active_params == 3_000_000_000 and budget.memory is None and budget.params is None
    assert Budget.from_options(target_active_params="3.2B", target_params="20B").params == 20_000_000_000
    assert Budget.from_options(ctx="8k") is None
    with pytest.raises(BudgetError, match="unknown suffix 'X' in active parameter count '3X'"):
        Budget.from_options(target_active_params="3X")


def test_cli_estimate_shows_moe_blocks_and_active_parameters():
    data = json.loads(_estimate("nano3-30b", "--ctx", "8k", "--json").output)
    assert data["parameters"]["active"] == 3_580_073_408 and data["parameters"]["total"] == 31_577_937_344
    result = _estimate("nano3-30b", "--ctx", "8k")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (
        "31,577,937,344 parameters, 3,580,073,408 active per token (52 blocks: 23 Mamba-2, 6 attention, 0 MLP, " in text
    )
    assert "23 MoE)" in text and "MoE: 128 experts, top-6, expert FFN 1856, shared FFN 3712" in text
    assert "active per token" not in _estimate("9b-v2", "--ctx", "8k").output


def test_cli_estimate_sizes_memory_at_the_workload_without_ctx():
    args = ("--isl", "8k", "--osl", "16k", "--gpu", "h100", "--batch", "max", "--json")
    implied = json.loads(_estimate("9b-v2", *args).output)
    explicit = json.loads(_estimate("9b-v2", "--ctx", "24k", *args).output)
    assert implied == explicit and implied["memory"]["context"] == 24 * 1024
