import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.config import ATTENTION, MAMBA, MLP, HybridConfig, pattern_from_ratios
from compressor.errors import ConfigError
from tests.conftest import tiny_configs

# The config.json of a published checkpoint, in the older hybrid_override_pattern form.
PUBLISHED_STYLE = {
    "architectures": ["NemotronHForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attention_head_dim": 128,
    "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
    "bos_token_id": 1,
    "chunk_size": 128,
    "conv_kernel": 4,
    "eos_token_id": 2,
    "expand": 2,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "initializer_range": 0.02,
    "intermediate_size": 21504,
    "layer_norm_epsilon": 1e-05,
    "mamba_head_dim": 64,
    "mamba_hidden_act": "silu",
    "mamba_num_heads": 128,
    "mamba_proj_bias": False,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "mlp_hidden_act": "relu2",
    "model_type": "nemotron_h",
    "n_groups": 8,
    "num_attention_heads": 32,
    "num_hidden_layers": 52,
    "num_key_value_heads": 8,
    "num_logits_to_keep": 1,
    "pad_token_id": 0,
    "rescale_prenorm_residual": True,
    "residual_in_fp32": False,
    "rms_norm_eps": 1e-05,
    "sliding_window": None,
    "ssm_state_size": 128,
    "tie_word_embeddings": False,
    "time_step_floor": 0.0001,
    "time_step_limit": [0.0, math.inf],
    "time_step_max": 0.1,
    "time_step_min": 0.001,
    "time_step_rank": 256,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.0.dev0",
    "use_bias": False,
    "use_cache": True,
    "use_conv_bias": True,
    "use_mamba_kernels": True,
    "vocab_size": 131072,
}


def test_published_config_reads_and_round_trips():
    config = HybridConfig.from_dict(PUBLISHED_STYLE)
    assert config.num_blocks == 52
    assert (config.count("mamba"), config.count("attention"), config.count("mlp")) == (24, 4, 24)
    assert config.head_dim == 128  # from the legacy attention_head_dim
    assert config.extra["time_step_rank"] == 256
    out = config.to_dict()
    expected = {k: v for k, v in PUBLISHED_STYLE.items() if k not in ("attention_head_dim", "auto_map")}
    expected["head_dim"] = 128
    for key, value in expected.items():
        assert out[key] == value, key
    assert "auto_map" not in out  # it names code in the source folder, which outputs do not carry
    assert HybridConfig.from_dict(json.loads(config.to_json())) == config


def test_layers_block_type_form_round_trips_in_its_own_form():
    raw = dict(PUBLISHED_STYLE)
    pattern = raw.pop("hybrid_override_pattern")
    names = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    raw["layers_block_type"] = [names[c] for c in pattern]
    raw["time_step_limit"] = [0.0, {"__float__": "Infinity"}]  # transformers' JSON tagging
    config = HybridConfig.from_dict(raw)
    assert config.pattern == pattern
    assert config.time_step_limit == (0.0, math.inf)
    out = config.to_dict()
    assert out["layers_block_type"] == raw["layers_block_type"]
    assert "hybrid_override_pattern" not in out


def test_legacy_layer_type_names_and_aliases():
    raw = dict(PUBLISHED_STYLE, hybrid_override_pattern=None)
    raw.pop("hybrid_override_pattern")
    raw["layers_block_type"] = ["mamba", "attention", "mlp"]
    raw["mamba_n_groups"] = raw.pop("n_groups")
    raw["mamba_d_conv"] = raw.pop("conv_kernel")
    config = HybridConfig.from_dict(raw)
    assert config.pattern == "M*-"
    assert config.n_groups == 8 and config.conv_kernel == 4


@settings(max_examples=25, deadline=None)
@given(tiny_configs())
def test_round_trip_through_json_is_lossless(config):
    assert HybridConfig.from_dict(json.loads(config.to_json())) == config


def test_block_overrides_resolve_and_serialise():
    config = HybridConfig(hybrid_override_pattern="M-*-", block_overrides={1: {"intermediate_size": 512}})
    assert config.block(1).intermediate_size == 512
    assert config.block(3).intermediate_size == config.intermediate_size
    assert not config.is_uniform
    out = config.to_dict()
    assert out["model_type"] == "nemotron_h_puzzle" and out["architectures"] == ["NemotronHPuzzleForCausalLM"]
    assert out["auto_map"] == {"AutoConfig": "configuration_nemotron_h_puzzle.NemotronHPuzzleConfig"}
    assert out["block_configs"] == [
        {"block_type": "mamba"},
        {"block_type": "mlp", "intermediate_size": 512},
        {"block_type": "attention", "num_attention_heads": 32, "num_key_value_heads": 8},
        {"block_type": "mlp", "intermediate_size": config.intermediate_size},
    ]
    assert "block_overrides" not in out and out["intermediate_size"] == config.intermediate_size
    assert HybridConfig.from_dict(json.loads(config.to_json())) == config
    # an override equal to the uniform width is no override
    same = config.replace(block_overrides={1: {"intermediate_size": config.intermediate_size}})
    assert same.is_uniform and same.to_dict()["model_type"] == "nemotron_h" and "block_configs" not in same.to_dict()


def test_served_format_follows_what_engines_read():
    """Per-block Mamba widths (read globally by vLLM and llama.cpp): compressor's own type, refused elsewhere;
    a quantized uniform export: Puzzle; an MoE block with more experts than the global count is refused (vLLM
    sizes its expert table by the global count)."""
    base = HybridConfig(hybrid_override_pattern="M-*-", n_groups=8, mamba_num_heads=128)
    assert base.served_format == "nemotron_h"
    mamba = base.replace(block_overrides={0: {"mamba_num_heads": 64}})
    out = mamba.to_dict()
    assert out["model_type"] == "nemotron_h_compressor" and "auto_map" not in out
    assert out["block_configs"][0] == {"block_type": "mamba", "mamba_num_heads": 64, "mamba_head_dim": 64}
    assert HybridConfig.from_dict(json.loads(mamba.to_json())) == mamba
    quantized = base.replace(extra={"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}})
    assert quantized.to_dict()["model_type"] == "nemotron_h_puzzle"
    assert HybridConfig.from_dict(json.loads(quantized.to_json())) == quantized
    moe = HybridConfig(hybrid_override_pattern="MEME", n_routed_experts=8, num_experts_per_tok=2)
    out = moe.replace(block_overrides={3: {"n_routed_experts": 4}}).to_dict()
    assert out["n_routed_experts"] == 8 and [b.get("n_routed_experts") for b in out["block_configs"]] == [
        None, 8, None, 4
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="block 3 has 12 routed experts, more than n_routed_experts"):
        moe.replace(block_overrides={3: {"n_routed_experts": 12}})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.pop(), "block_configs has 3 entries, but the layer pattern has 4 blocks"),
        (lambda b: b[1].update(block_type="mamba"), r"block_configs\[1\] has block_type 'mamba', but block 1"),
        (lambda b: b[1].update(intermediate_size="wide"), r"block_configs\[1\].intermediate_size must be a whole"),
        (lambda b: b[2].update(head_dim=64), r"block_configs\[2\] sets head_dim=64, which compressor cannot apply"),
        (lambda b: b[2].update(sliding_window=512), "sets sliding_window=512, which compressor cannot apply"),
    ],
)
def test_block_configs_that_cannot_be_read_exactly_are_refused(change, message):
    raw = HybridConfig(hybrid_override_pattern="M-*-", block_overrides={1: {"intermediate_size": 512}}).to_dict()
    change(raw["block_configs"])
    with pytest.raises(ConfigError, match=message):
        HybridConfig.from_dict(raw)


def test_block_configs_of_nvidia_puzzle_checkpoints_and_earlier_outputs_read():
    """A Puzzle config with keys that repeat global values, and the `block_overrides` key earlier outputs wrote."""
    raw = HybridConfig(hybrid_override_pattern="M-*E", num_experts_per_tok=2).to_dict()
    raw.update(
        model_type="nemotron_h_puzzle", architectures=["NemotronHPuzzleForCausalLM"], auto_map={"AutoConfig": "x.Y"}
    )
    raw["block_configs"] = [
        {"block_type": "mamba"},
        {"block_type": "mlp", "intermediate_size": 1024, "mlp_bias": False},
        {"block_type": "attention", "head_dim": 128, "sliding_window": None},
        {"block_type": "moe", "n_routed_experts": 4, "num_experts_per_tok": 2},
    ]
    config = HybridConfig.from_dict(raw)
    assert config.block_overrides == {1: {"intermediate_size": 1024}, 3: {"n_routed_experts": 4}}
    assert "auto_map" not in config.extra and "block_configs" not in config.extra
    old = HybridConfig(hybrid_override_pattern="M-*-").to_dict()
    old["block_overrides"] = {"1": {"intermediate_size": 512}}
    assert HybridConfig.from_dict(old).block(1).intermediate_size == 512
    with pytest.raises(ConfigError, match="needs a 'block_configs' list"):
        HybridConfig.from_dict({**old, "model_type": "nemotron_h_puzzle"})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hybrid_override_pattern": "M-X"}, "unknown character(s) 'X'"),
        ({"hybrid_override_pattern": ""}, "pattern is empty"),
        ({"mamba_num_heads": 12}, "mamba_num_heads (12) of block 0 (mamba) is not divisible by n_groups (8)"),
        ({"num_attention_heads": 12}, "num_attention_heads (12) of block 7 (attention) is not divisible"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"mlp_hidden_act": "silu"}, "mlp_hidden_act 'silu' is not supported"),
        ({"block_overrides": {1: {"mamba_num_heads": 16}}}, "block 1 is a mlp block and cannot override"),
        ({"block_overrides": {99: {"intermediate_size": 16}}}, "names block 99"),
        ({"block_overrides": {0: {"mamba_num_heads": 9}}}, "not divisible by n_groups"),
    ],
)
def test_invalid_configs_give_clear_errors(changes, message):
    with pytest.raises(ConfigError) as info:
        HybridConfig(**changes)
    assert message in str(info.value)


def test_unknown_model_type_and_missing_pattern():
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        HybridConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="neither 'hybrid_override_pattern' nor 'layers_block_type'"):
        HybridConfig.from_dict({"model_type": "nemotron_h"})
    with pytest.raises(ConfigError, match="unknown block type 'conv'"):
        HybridConfig.from_dict({"layers_block_type": ["mlp", "conv"]})


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        HybridConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        HybridConfig.from_file(tmp_path)


# ----- layouts from ratios (Megatron-LM's hybrid allocation) -------------------------------------------
def megatron_allocate_auto(total_layers_count, target_attention_ratio, target_mlp_ratio):
    """A literal transcription of `_allocate_auto` in NVIDIA/Megatron-LM
    megatron/core/ssm/mamba_hybrid_layer_allocation.py (2024 "Add mamba"; the same arithmetic is
    `pattern_from_ratios` in megatron/core/models/hybrid/hybrid_layer_allocation.py since 2026-02), kept
    independent of compressor's implementation so that the comparison can fail."""
    MAMBA, ATTENTION, MLP = "M", "*", "-"  # noqa: N806 (Megatron's Symbols)
    # First, allocate attention (evenly spaced, starting and ending with mamba)
    attention_layers_count: int = round(total_layers_count * target_attention_ratio)
    mamba_layers_count: int = total_layers_count - attention_layers_count
    mamba_sections_count: int = attention_layers_count + 1
    mamba_section_length: float = mamba_layers_count / mamba_sections_count

    layer_type_list = [MAMBA] * total_layers_count
    x: float = mamba_section_length
    for l in range(total_layers_count):  # noqa: E741
        if x < 0.5:
            layer_type_list[l] = ATTENTION
            x += mamba_section_length
        else:
            x -= 1

    # Next, allocate mlp
    # (evenly distributed, but right-justified, not replacing attention)
    mlp_layers_count: int = round(total_layers_count * target_mlp_ratio)
    if mlp_layers_count > 0:
        mamba_layers_count -= mlp_layers_count
        mamba_to_mlp_ratio: float = mamba_layers_count / mlp_layers_count

        x: float = mamba_to_mlp_ratio
        for l in range(total_layers_count):  # noqa: E741
            if layer_type_list[l] == MAMBA:
                if x < 0.5:
                    layer_type_list[l] = MLP
                    x += mamba_to_mlp_ratio
                else:
                    x -= 1

    return "".join(layer_type_list)


@pytest.mark.parametrize(
    ("args", "counts", "pattern"),
    [
        # The 8B Mamba-2-Hybrid (Waleffe et al., arXiv 2406.07887): --num-layers 56 --hybrid-attention-ratio
        # 0.08 --hybrid-mlp-ratio 0.5; the pattern as NVIDIA/Megatron-LM examples/mamba/README.md prints it.
        ((56, 0.08, 0.5), (24, 4, 28), "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"),
        ((56, 0.07, 0.5), (24, 4, 28), "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"),
        ((48, 0.08, 0.5), (20, 4, 24), "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"),
        ((52, 0.08, 0.5), (22, 4, 26), "M-M-M--M-M*-M-M-M--M*-M-M-M-M-M*--M-M-M-M*-M--M-M-M-"),
        ((56, 0.08, 0.0), (52, 4, 0), "MMMMMMMMMM*MMMMMMMMMMM*MMMMMMMMMM*MMMMMMMMMMM*MMMMMMMMMM"),
        ((10, 0.2, 0.0), (8, 2, 0), "MMM*MM*MMM"),
        ((10, 0.5, 0.5), (0, 5, 5), "-*-*-**-*-"),  # a pure transformer
        ((3, 0.5, 0.5), (0, 2, 1), "*-*"),  # round(1.5) = 2 each: the MLP step goes negative, 1 MLP not 2
        ((8, 0.0, 0.0), (8, 0, 0), "MMMMMMMM"),
        ((1, 1.0, 0.0), (0, 1, 0), "*"),
        ((1, 0.0, 1.0), (0, 0, 1), "-"),
        ((5, 0.1, 0.1), (5, 0, 0), "MMMMM"),  # round(0.5) = 0: half to even
    ],
)
def test_pattern_from_ratios_published_layouts(args, counts, pattern):
    result = pattern_from_ratios(*args)
    assert result == pattern == megatron_allocate_auto(*args)
    assert (result.count("M"), result.count("*"), result.count("-")) == counts


def test_pattern_from_ratios_equals_megatron_on_a_grid():
    cases = 0
    for num_layers in range(1, 65):
        for a in range(0, 101, 2):
            for m in range(0, 101, 5):
                attention, mlp = a / 100, m / 100  # as float("0.08") parses on Megatron's command line
                if attention + mlp > 1.0:
                    continue
                assert pattern_from_ratios(num_layers, attention, mlp) == megatron_allocate_auto(
                    num_layers, attention, mlp
                ), (num_layers, attention, mlp)
                cases += 1
    assert cases > 30_000


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 200), st.floats(0, 1), st.floats(0, 1))
def test_pattern_from_ratios_equals_megatron_on_any_floats(num_layers, attention, share):
    mlp = share * (1 - attention)
    if attention + mlp > 1.0:
        return
    pattern = pattern_from_ratios(num_layers, attention, mlp)
    assert pattern == megatron_allocate_auto(num_layers, attention, mlp)
    config = HybridConfig(hybrid_override_pattern=pattern)
    assert sum(config.ratios().values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0.1, 0.5), "number of layers must be a whole number >= 1, got 0"),
        ((5.0, 0.1, 0.5), "number of layers must be a whole number >= 1, got 5.0"),
        ((56, -0.1, 0.5), "attention ratio must be between 0 and 1, got -0.1"),
        ((56, 0.1, 1.5), "MLP ratio must be between 0 and 1, got 1.5"),
        ((56, float("nan"), 0.5), "attention ratio must be between 0 and 1, got nan"),
        ((56, 0.6, 0.5), "attention ratio (0.6) and MLP ratio (0.5) add up to more than 1"),
    ],
)
def test_pattern_from_ratios_rejects(args, message):
    with pytest.raises(ConfigError) as info:
        pattern_from_ratios(*args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_ratios_of_a_config():
    config = HybridConfig(hybrid_override_pattern=pattern_from_ratios(56, 0.08, 0.5))
    assert config.ratios() == {MAMBA: 24 / 56, ATTENTION: 4 / 56, MLP: 28 / 56}
    assert HybridConfig(hybrid_override_pattern="MMMM").ratios() == {MAMBA: 1.0, ATTENTION: 0.0, MLP: 0.0}


# ----- MoE blocks -------------------------------------------------------------------------------------------
# The MoE part of NVIDIA-Nemotron-3-Nano-30B-A3B's config.json (transformers >= 5.6 form of the pattern).
MOE_STYLE = {
    **{k: v for k, v in PUBLISHED_STYLE.items() if k not in ("hybrid_override_pattern", "num_hidden_layers")},
    "layers_block_type": ["linear_attention", "moe", "full_attention", "moe", "mlp"],
    "n_routed_experts": 128,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 1856,
    "n_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 3712,
    "moe_shared_expert_overlap": True,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "moe_latent_size": None,
}


def test_moe_config_reads_and_round_trips():
    config = HybridConfig.from_dict(MOE_STYLE)
    assert config.pattern == "ME*E-" and config.count("moe") == 2 and config.has_moe
    assert (config.n_routed_experts, config.num_experts_per_tok, config.routed_scaling_factor) == (128, 6, 2.5)
    spec = config.block(1)
    assert (spec.kind, spec.n_routed_experts, spec.moe_intermediate_size) == ("moe", 128, 1856)
    assert config.extra["moe_shared_expert_overlap"] is True  # not modelled, written back
    out = config.to_dict()
    for key, value in MOE_STYLE.items():
        if key not in ("attention_head_dim", "auto_map"):
            assert out[key] == value, key
    assert HybridConfig.from_dict(json.loads(config.to_json())) == config
    assert config.summary()["moe"] == 2 and config.summary()["n_routed_experts"] == 128
    # the pattern form names MoE blocks E
    assert HybridConfig(hybrid_override_pattern="MEM*E").block(1).kind == "moe"


def test_dense_configs_do_not_gain_moe_keys():
    out = HybridConfig.from_dict(PUBLISHED_STYLE).to_dict()
    assert not {"n_routed_experts", "num_experts_per_tok", "moe_latent_size", "n_group"} & set(out)
    # a dense config that names MoE values other than the defaults keeps them
    raw = dict(PUBLISHED_STYLE, n_routed_experts=64)
    assert HybridConfig.from_dict(raw).to_dict()["n_routed_experts"] == 64


def test_moe_block_overrides_resolve_and_serialise():
    overrides = {1: {"n_routed_experts": 4, "moe_intermediate_size": 24}, 3: {"moe_shared_expert_intermediate_size": 8}}
    config = HybridConfig(hybrid_override_pattern="ME*E", n_routed_experts=8, block_overrides=overrides)
    assert (config.block(1).n_routed_experts, config.block(1).moe_intermediate_size) == (4, 24)
    assert config.block(3).n_routed_experts == 8 and config.block(3).moe_shared_expert_intermediate_size == 8
    assert config.to_dict()["block_configs"][1] == {
        "block_type": "moe", "n_routed_experts": 4, "moe_intermediate_size": 24,
        "moe_shared_expert_intermediate_size": 7688,
    }  # fmt: skip
    assert HybridConfig.from_dict(json.loads(config.to_json())) == config


MOE_BASE = {"hybrid_override_pattern": "ME", "n_routed_experts": 8, "num_experts_per_tok": 2}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok (9) exceeds the 8 routed experts of block 1 (moe)"),
        ({"n_group": 3, "topk_group": 1}, "n_routed_experts (8) of block 1 (moe) is not divisible by n_group (3)"),
        ({"n_group": 8}, "has 1 expert(s) per routing group"),
        ({"n_group": 2, "topk_group": 3}, "topk_group (3) cannot exceed n_group (2)"),
        ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "exceeds the experts of the topk_group (1) groups"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok must be a positive integer"),
        ({"n_shared_experts": 0}, "n_shared_experts must be a positive integer"),
        ({"moe_latent_size": 0}, "moe_latent_size must be a positive integer"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor must be a positive number"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size of block 1 (moe) must be a positive integer"),
        ({"block_overrides": {1: {"n_routed_experts": 1}}}, "exceeds the 1 routed experts of block 1"),
        ({"block_overrides": {0: {"n_routed_experts": 4}}}, "block 0 is a mamba block and cannot override"),
        ({"block_overrides": {1: {"intermediate_size": 4}}}, "block 1 is a moe block and cannot override"),
    ],
)
def test_invalid_moe_configs_give_clear_errors(changes, message):
    with pytest.raises(ConfigError) as info:
        HybridConfig(**{**MOE_BASE, **changes})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_moe_fields_of_dense_models_are_not_checked():
    # MoE values mean nothing without MoE blocks: a dense config is not refused for them
    assert HybridConfig(hybrid_override_pattern="M-", num_experts_per_tok=99).num_experts_per_tok == 99
