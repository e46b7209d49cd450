"""Named architectures: the published Nemotron-H family and tiny ones for tests and examples.

Published values come from the models' config.json files (see the project reference notes); their
parameter counts are checked against the published numbers in tests/test_presets.py.
"""

from __future__ import annotations

from pathlib import Path

from compressor.config import HybridConfig
from compressor.errors import ConfigError

_PATTERN_4B_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
_PATTERN_9B_V2 = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
_PATTERN_12B_V2 = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
_PATTERN_47B = "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*-M-M-M-M-M-"
_PATTERN_56B = "M-M-M-M*-M-M-M-M-M*" + "-M-M-M-M-M*" * 8 + "-M-M-M-M-M-"
_PATTERN_NANO3_30B = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

# Shared by every published model.
_FAMILY = dict(
    vocab_size=131072,
    num_key_value_heads=8,
    head_dim=128,
    n_groups=8,
    conv_kernel=4,
    chunk_size=128,
    layer_norm_epsilon=1e-5,
)

PUBLISHED: dict[str, dict] = {
    "nemotron-h-4b": dict(
        hybrid_override_pattern=_PATTERN_4B_8B,
        hidden_size=3072,
        intermediate_size=12288,
        num_attention_heads=32,
        mamba_num_heads=112,
        mamba_head_dim=64,
        ssm_state_size=128,
        max_position_embeddings=8192,
    ),
    "nemotron-h-8b": dict(
        hybrid_override_pattern=_PATTERN_4B_8B,
        hidden_size=4096,
        intermediate_size=21504,
        num_attention_heads=32,
        mamba_num_heads=128,
        mamba_head_dim=64,
        ssm_state_size=128,
        max_position_embeddings=8192,
    ),
    "nemotron-h-47b": dict(
        hybrid_override_pattern=_PATTERN_47B,
        hidden_size=8192,
        intermediate_size=30720,
        num_attention_heads=64,
        mamba_num_heads=256,
        mamba_head_dim=64,
        ssm_state_size=256,
        max_position_embeddings=8192,
    ),
    "nemotron-h-56b": dict(
        hybrid_override_pattern=_PATTERN_56B,
        hidden_size=8192,
        intermediate_size=32768,
        num_attention_heads=64,
        mamba_num_heads=256,
        mamba_head_dim=64,
        ssm_state_size=256,
        max_position_embeddings=8192,
    ),
    "nemotron-nano-9b-v2": dict(
        hybrid_override_pattern=_PATTERN_9B_V2,
        hidden_size=4480,
        intermediate_size=15680,
        num_attention_heads=40,
        mamba_num_heads=128,
        mamba_head_dim=80,
        ssm_state_size=128,
        max_position_embeddings=131072,
    ),
    "nemotron-nano-12b-v2": dict(
        hybrid_override_pattern=_PATTERN_12B_V2,
        hidden_size=5120,
        intermediate_size=20480,
        num_attention_heads=40,
        mamba_num_heads=128,
        mamba_head_dim=80,
        ssm_state_size=128,
        max_position_embeddings=131072,
    ),
    # NVIDIA-Nemotron-3-Nano-30B-A3B(-BF16) config.json (hybrid MoE: 23 Mamba-2, 23 MoE, 6 attention blocks),
    # as transcribed in shared/reference/next-round.md section 2; the same values are in Megatron-LM's
    # examples/post_training/modelopt/conf/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.sh. intermediate_size
    # is unused (no MLP blocks). 6 of 128 experts are routed per token (some NVIDIA pages say 5; the config 6).
    "nemotron-3-nano-30b-a3b": dict(
        hybrid_override_pattern=_PATTERN_NANO3_30B,
        hidden_size=2688,
        intermediate_size=1856,
        num_attention_heads=32,
        num_key_value_heads=2,
        mamba_num_heads=64,
        mamba_head_dim=64,
        ssm_state_size=128,
        max_position_embeddings=262144,
        n_routed_experts=128,
        num_experts_per_tok=6,
        moe_intermediate_size=1856,
        n_shared_experts=1,
        moe_shared_expert_intermediate_size=3712,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
}

# Published parameter counts (model cards); tests hold the presets to them exactly.
PUBLISHED_PARAMS = {
    "nemotron-h-4b": 4_489_223_040,
    "nemotron-h-8b": 8_100_852_736,
    "nemotron-h-47b": 46_791_554_816,
    "nemotron-h-56b": 56_324_350_464,
    "nemotron-nano-9b-v2": 8_888_227_328,
    "nemotron-nano-12b-v2": 12_310_001_152,
    # transformers' NemotronHForCausalLM.parameters() on the meta device ("31.6B total"); the router's
    # e_score_correction_bias (2,944 fp32 elements) is a buffer, not a parameter.
    "nemotron-3-nano-30b-a3b": 31_577_937_344,
}
# Published active parameters per token (6 of 128 routed experts, everything else, embeddings included):
# NVIDIA's "3.6B with embeddings"; recomputed in shared/reference/next-round.md section 2.
PUBLISHED_ACTIVE_PARAMS = {"nemotron-3-nano-30b-a3b": 3_580_073_408}

# Small architectures with every feature the big ones have (n_groups > 1, GQA, all block kinds, MoE).
TINY: dict[str, dict] = {
    "tiny": dict(
        hybrid_override_pattern="M-M*-M*M-",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=16,
        max_position_embeddings=4096,
    ),
    "small": dict(
        hybrid_override_pattern="M-M*-M-M*M-",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        mamba_num_heads=16,
        mamba_head_dim=32,
        n_groups=4,
        ssm_state_size=32,
        conv_kernel=4,
        chunk_size=64,
        max_position_embeddings=8192,
    ),
    # A tiny Nano-3-style hybrid MoE (Mamba, MoE and attention blocks, plus one MLP block).
    "tiny-moe": dict(
        hybrid_override_pattern="MEM*EM-E",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=16,
        max_position_embeddings=4096,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64,
        routed_scaling_factor=2.5,
    ),
}

ALIASES = {
    "4b": "nemotron-h-4b",
    "8b": "nemotron-h-8b",
    "47b": "nemotron-h-47b",
    "56b": "nemotron-h-56b",
    "9b-v2": "nemotron-nano-9b-v2",
    "12b-v2": "nemotron-nano-12b-v2",
    "nano3-30b": "nemotron-3-nano-30b-a3b",
    "30b-a3b": "nemotron-3-nano-30b-a3b",
}


def preset_names() -> list[str]:
    """All preset names, published first."""
    return [*PUBLISHED, *TINY]


def get_preset(name: str) -> HybridConfig:
    """The config of a named preset (short aliases such as `12b-v2` accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in PUBLISHED:
        return HybridConfig(**{**_FAMILY, **PUBLISHED[key]})
    if key in TINY:
        return HybridConfig(**TINY[key])
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


def load_config_or_preset(model: str | Path) -> tuple[HybridConfig, Path | None]:
    """A checkpoint folder, a config.json, or a preset name -> (HybridConfig, folder or None)."""
    path = Path(model)
    if path.exists():
        return HybridConfig.from_file(path), (path if path.is_dir() else None)
    try:
        return get_preset(str(model)), None
    except ConfigError:
        raise ConfigError(f"{model!r} is neither a checkpoint folder, a config.json nor a preset name") from None
