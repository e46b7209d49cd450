"""Not a search: the shape a ModelOpt / Megatron-Bridge `export_config` names, proposed like any candidate.

`compress prune --export-config '{"hidden_size": 4480, ...}'` prunes to exactly that shape (checked against
the budget when one is given). The keys are those of ModelOpt's `mcore_minitron` mode, so a shape found by
compressor (`export_config.json` next to every uniform pruned checkpoint) reproduces on a GPU cluster and
the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compressor.budget import Budget
from compressor.config import HybridConfig
from compressor.errors import OptionError
from compressor.target import Target
from strategies.base import Strategy
from strategies.grid import modelopt_violations

if TYPE_CHECKING:
    from compressor.importance import Importance

# ModelOpt's export_config keys -> the HybridConfig fields they set.
EXPORT_KEYS = {
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "mamba_num_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
    "num_layers": "num_blocks",
}
# ModelOpt's MoE hparams (`mcore_minitron` SUPPORTED_HPARAMS), written only for models with MoE blocks.
MOE_EXPORT_KEYS = {
    "num_moe_experts": "n_routed_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
}
# Accepted on input for compressor's own use (KV groups); ModelOpt no longer prunes it, so it is never written.
INPUT_ONLY_KEYS = {"num_query_groups": "num_key_value_heads"}


@dataclass(frozen=True)
class ExportConfigOptions:
    shape: dict[str, Any] = field(default_factory=dict, metadata={"help": "The export_config to prune to."})

    def __post_init__(self) -> None:
        if not isinstance(self.shape, dict):
            raise OptionError("export_config", 'must be a JSON object like {"hidden_size": 4480}')
        known = {**EXPORT_KEYS, **MOE_EXPORT_KEYS, **INPUT_ONLY_KEYS}
        unknown = sorted(set(self.shape) - set(known))
        if unknown:
            raise OptionError(
                "export_config", f"has unknown key(s) {unknown}: use {', '.join({**EXPORT_KEYS, **MOE_EXPORT_KEYS})}"
            )
        for key, value in self.shape.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError("export_config", f"{key} must be a positive whole number, got {value!r}")


class ExportConfigStrategy(Strategy):
    name = "export_config"
    Options = ExportConfigOptions

    def propose(self, source: HybridConfig, importance: Importance | None, budget: Budget | None) -> list[Target]:
        return [target_from_export_config(source, importance, self.options.shape)]


def target_from_export_config(source: HybridConfig, importance: Importance | None, shape: dict[str, int]) -> Target:
    """The target an export_config names; `num_layers` drops the least important blocks (the last ones
    without importance)."""
    for key, value in shape.items():
        name = {**EXPORT_KEYS, **MOE_EXPORT_KEYS, **INPUT_ONLY_KEYS}[key]
        if key in MOE_EXPORT_KEYS and not source.has_moe:
            raise OptionError("export_config", f"{key} names MoE blocks, but the model has none")
        if value > getattr(source, name):
            raise OptionError("export_config", f"{key} {value} is larger than the model's {getattr(source, name)}")
    layers = shape.get("num_layers", source.num_blocks)
    if importance is None:
        order = list(range(source.num_blocks - 1, -1, -1))
    else:
        order = importance.block_scores().argsort().tolist()
    drop = sorted(order[: source.num_blocks - layers])
    return Target.uniform(
        source,
        hidden_size=shape.get("hidden_size"),
        intermediate_size=shape.get("ffn_hidden_size"),
        mamba_num_heads=shape.get("mamba_num_heads"),
        mamba_head_dim=shape.get("mamba_head_dim"),
        num_attention_heads=shape.get("num_attention_heads"),
        num_key_value_heads=shape.get("num_query_groups"),
        n_routed_experts=shape.get("num_moe_experts"),
        moe_intermediate_size=shape.get("moe_ffn_hidden_size"),
        moe_shared_expert_intermediate_size=shape.get("moe_shared_expert_intermediate_size"),
        drop_blocks=drop,
    )


def export_config(config: HybridConfig) -> dict[str, int]:
    """A uniform architecture in ModelOpt's `mcore_minitron` export_config keys (the MoE ones only for a model
    with MoE blocks)."""
    keys = {**EXPORT_KEYS, **(MOE_EXPORT_KEYS if config.has_moe else {})}
    return {key: getattr(config, name) for key, name in keys.items()}


def modelopt_problems(source: HybridConfig, config: HybridConfig) -> list[str]:
    """What ModelOpt's mcore_minitron cannot express of `config` pruned from `source` (empty: all of it); a
    per-block config has no export_config at all."""
    if not config.is_uniform:
        return ["per-block widths have no export_config"]
    groups = {"mamba_num_heads": source.n_groups, "num_attention_heads": source.num_key_value_heads}
    return modelopt_violations(export_config(config), export_config(source), groups)


def export_layers(source: HybridConfig, target: Target) -> dict[str, object]:
    """Which blocks a target keeps, for rebuilding it at scale: ModelOpt picks the blocks to drop itself
    from its own scores, so the ones compressor chose are written beside export_config.json; Megatron can
    drop named layers (`layers_to_drop`, 1-indexed, as ModelOpt's `drop_mcore_language_model_layers`)."""
    kept = [b.source for b in target.blocks]
    return {
        "hybrid_override_pattern": target.config(source).pattern,
        "kept_blocks": kept,
        "layers_to_drop": [i + 1 for i in range(source.num_blocks) if i not in kept],
    }
