"""`HybridConfig`: the architecture of a Nemotron-H-format hybrid model, read from and written to the
`config.json` of Hugging Face `nemotron_h` checkpoints.

A model is a stack of single-mixer blocks, one per character of the pattern: `M` Mamba-2, `*` attention,
`-` MLP, `E` mixture of experts (MoE). Widths are uniform by default (the standard format); a block may
carry its own widths through `block_overrides` (block index -> {field: value}), which pruning uses to give
each block its own size (MoE blocks: their expert count and expert / shared-expert FFN widths).

config.json says which engines may read it (`served_format`): uniform configs are standard `nemotron_h`;
per-block MLP, attention and MoE widths, and ModelOpt-quantized exports, are written in NVIDIA's Puzzle
format (`nemotron_h_puzzle`: one `block_configs` entry per block and a small configuration module in the
folder, `PUZZLE_CONFIG_MODULE`), which vLLM and TensorRT-LLM serve and transformers refuses (it would
ignore per-block widths, or read packed quantized weights as plain ones); per-block Mamba widths, which no
other engine reads per block, get compressor's own type (`nemotron_h_compressor`), which every other
engine refuses. compressor reads all three (and the `block_overrides` key of its earlier outputs) without
running any code from the folder.

MoE fields (`n_routed_experts`, `num_experts_per_tok`, ...) keep transformers' names and defaults; they are
validated and written only when the pattern has MoE blocks or a value differs from its default, so dense
configs read and write exactly as before.

Keys that compressor does not model but transformers' NemotronHConfig or NVIDIA's published configs define
(`PASSTHROUGH_KEYS`: `use_cache`, `time_step_rank`, `dtype`, `quantization_config`, ...) are kept in `extra`
and written back unchanged. Any other key is dropped on reading, so an output never carries a setting whose
meaning nobody checked: another tool's flag, or a code reference such as `auto_map`, whose module compressor
does not copy (Puzzle-format outputs get their own). Legacy key spellings (`mamba_n_groups`, `mamba_d_conv`,
`attention_head_dim`, ...) are read and written back in their canonical form.

`pattern_from_ratios` lays out a pattern from a block count and attention / MLP shares exactly as
Megatron-LM's hybrid allocation does (the Mamba-2-Hybrid models were specified that way).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import ConfigError
from compressor.outputs import confined, read_json, settle

MAMBA, ATTENTION, MLP, MOE = "mamba", "attention", "mlp", "moe"
PATTERN_CHARS = {"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}
KIND_CHARS = {kind: char for char, kind in PATTERN_CHARS.items()}
# transformers >= 5.6 spells the pattern as `layers_block_type`; older tools used the legacy names.
LAYER_TYPE_NAMES = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp", MOE: "moe"}
LAYER_TYPE_KINDS = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}
# Legacy key -> canonical key, as transformers' NemotronHConfig accepts them.
KEY_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "attention_head_dim": "head_dim",
}
# config.json's model_type per served format (`HybridConfig.served_format`), and its architectures entry.
NEMOTRON_H, PUZZLE, COMPRESSOR_ONLY = "nemotron_h", "nemotron_h_puzzle", "nemotron_h_compressor"
ARCHITECTURES = {
    NEMOTRON_H: "NemotronHForCausalLM",
    PUZZLE: "NemotronHPuzzleForCausalLM",
    COMPRESSOR_ONLY: "NemotronHCompressorForCausalLM",
}
# The configuration module a Puzzle-format folder carries (compressor/configuration_nemotron_h_puzzle.py),
# run by transformers and vLLM under trust_remote_code, never by compressor.
PUZZLE_CONFIG_MODULE = "configuration_nemotron_h_puzzle"
PUZZLE_AUTO_MAP = {"AutoConfig": f"{PUZZLE_CONFIG_MODULE}.NemotronHPuzzleConfig"}
# Per-block width fields each block kind may override.
OVERRIDABLE = {
    MAMBA: ("mamba_num_heads", "mamba_head_dim"),
    ATTENTION: ("num_attention_heads", "num_key_value_heads"),
    MLP: ("intermediate_size",),
    MOE: ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size"),
}
# config.json keys compressor does not model but writes back (in `extra`): transformers' NemotronHConfig and
# PretrainedConfig fields, and those of NVIDIA's published Nemotron-H configs. Other keys are dropped.
PASSTHROUGH_KEYS = frozenset(
    {
        "use_cache", "num_logits_to_keep", "attention_dropout", "hidden_dropout", "sliding_window",
        "use_mamba_kernels", "expand", "mamba_proj_bias", "output_router_logits", "moe_shared_expert_overlap",
        "num_nextn_predict_layers", "mtp_layers_block_type", "time_step_rank", "rms_norm_eps", "dtype",
        "torch_dtype", "transformers_version", "quantization_config", "_name_or_path",
    }
)  # fmt: skip
# Sane bounds, far above any published hybrid (Nemotron-H 56B: 118 blocks, hidden 8192; Nemotron 3: 512
# experts): a config.json beyond them is damaged or hostile, refused before anything of its size is built.
MAX_BLOCKS = 4096
MAX_WIDTH = 2**22  # any one width, head count, state size or vocabulary
MAX_EXPERTS = 4096
# The MoE fields: checked and written only for models with MoE blocks (or values other than the default).
MOE_FIELDS = (
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "n_shared_experts",
    "moe_shared_expert_intermediate_size",
    "moe_latent_size",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
)


@dataclass(frozen=True)
class BlockSpec:
    """The resolved widths of one block. Only the fields of its `kind` matter."""

    index: int
    kind: str
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    n_routed_experts: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int

    @property
    def mamba_intermediate(self) -> int:
        """I = mamba_num_heads * mamba_head_dim, the width of x, z and the gated norm."""
        return self.mamba_num_heads * self.mamba_head_dim


@dataclass
class HybridConfig:
    """Architecture of a Nemotron-H-format model. Field names and defaults follow transformers' `nemotron_h`."""

    hybrid_override_pattern: str = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 21504
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    n_groups: int = 8
    ssm_state_size: int = 128
    conv_kernel: int = 4
    chunk_size: int = 128
    layer_norm_epsilon: float = 1e-5
    use_conv_bias: bool = True
    use_bias: bool = False  # Mamba in_proj / out_proj bias
    mlp_bias: bool = False
    attention_bias: bool = False
    mlp_hidden_act: str = "relu2"
    mamba_hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    residual_in_fp32: bool = False
    rescale_prenorm_residual: bool = True
    initializer_range: float = 0.02
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    max_position_embeddings: int = 4096
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # MoE blocks (`E`): routed experts (relu2 FFNs without biases), top-k routing by a sigmoid router with a
    # score-correction bias, optionally within the best `topk_group` of `n_group` expert groups; one shared
    # expert (transformers builds one MLP of `moe_shared_expert_intermediate_size` whatever n_shared_experts
    # says); experts work in `moe_latent_size` when set (projections from and to hidden_size around them).
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # Per-block widths that differ from the uniform ones: {block index: {field: value}}.
    block_overrides: dict[int, dict[str, int]] = field(default_factory=dict)
    # Keys of the source config.json that compressor does not model, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)
    # Which spelling of the pattern the source used ("hybrid_override_pattern" or "layers_block_type").
    pattern_key: str = "hybrid_override_pattern"

    def __post_init__(self) -> None:
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        self.block_overrides = {int(i): {k: int(v) for k, v in o.items()} for i, o in self.block_overrides.items() if o}
        self.validate()

    # ----- structure -------------------------------------------------------------------------------
    @property
    def pattern(self) -> str:
        return self.hybrid_override_pattern

    @property
    def num_blocks(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def block_kinds(self) -> list[str]:
        return [PATTERN_CHARS[c] for c in self.hybrid_override_pattern]

    def block(self, index: int) -> BlockSpec:
        """The widths of block `index`: the uniform ones with this block's overrides applied."""
        kind = PATTERN_CHARS[self.hybrid_override_pattern[index]]
        widths = {
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size,
        }
        widths.update(self.block_overrides.get(index, {}))
        return BlockSpec(index=index, kind=kind, **widths)

    @property
    def blocks(self) -> list[BlockSpec]:
        return [self.block(i) for i in range(self.num_blocks)]

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence token id (the first, when the config lists several)."""
        eos = self.eos_token_id
        eos = eos[0] if isinstance(eos, list) and eos else eos
        return eos if isinstance(eos, int) else None

    @property
    def is_uniform(self) -> bool:
        return not self.block_overrides

    @property
    def is_quantized(self) -> bool:
        """A ModelOpt export: config.json carries a quantization_config."""
        return bool(self.extra.get("quantization_config"))

    @property
    def served_format(self) -> str:
        """config.json's model_type: NEMOTRON_H (uniform), PUZZLE (per-block MLP / attention / MoE widths, or a
        quantized export) or COMPRESSOR_ONLY (per-block Mamba widths); see the module docstring."""
        if any(self.hybrid_override_pattern[index] == KIND_CHARS[MAMBA] for index in self.block_overrides):
            return COMPRESSOR_ONLY
        return PUZZLE if self.block_overrides or self.is_quantized else NEMOTRON_H

    def block_configs(self) -> list[dict[str, Any]]:
        """One `block_configs` entry per block: its type and the widths of its kind (Mamba's are global)."""
        mamba_per_block = self.served_format == COMPRESSOR_ONLY
        entries = []
        for spec in self.blocks:
            names = OVERRIDABLE[spec.kind] if spec.kind != MAMBA or mamba_per_block else ()
            entries.append({"block_type": spec.kind, **{name: getattr(spec, name) for name in names}})
        return entries

    @property
    def has_moe(self) -> bool:
        return KIND_CHARS[MOE] in self.hybrid_override_pattern

    def count(self, kind: str) -> int:
        """Number of blocks of one kind (`mamba`, `attention`, `mlp` or `moe`)."""
        return self.hybrid_override_pattern.count(KIND_CHARS[kind])

    def ratios(self) -> dict[str, float]:
        """The share of the blocks of each kind, {mamba, attention, mlp (, moe)} -> fraction (they sum to 1)."""
        kinds = (MAMBA, ATTENTION, MLP) + ((MOE,) if self.has_moe else ())
        return {kind: self.count(kind) / self.num_blocks for kind in kinds}

    def replace(self, **changes: Any) -> HybridConfig:
        """A validated copy with some fields changed (overrides equal to the uniform value are dropped)."""
        new = dataclasses.replace(self, **changes)
        new.block_overrides = new._normalized_overrides()
        return new

    def with_layout(self, num_layers: int, attention_ratio: float, mlp_ratio: float) -> HybridConfig:
        """A copy whose blocks are laid out from ratios as Megatron-LM does (`pattern_from_ratios`), with
        uniform widths. Ratios lay out Mamba-2, attention and MLP blocks only: a config with MoE blocks is
        refused rather than turned dense."""
        pattern = pattern_from_ratios(num_layers, attention_ratio, mlp_ratio)
        if self.has_moe:
            raise ConfigError(
                f"a layout from ratios has Mamba-2, attention and MLP blocks only, and would drop this config's "
                f"{self.count(MOE)} MoE blocks: set its hybrid_override_pattern instead"
            )
        return self.replace(hybrid_override_pattern=pattern, block_overrides={})

    def with_settings(self, settings: list[str]) -> HybridConfig:
        """A copy with `KEY=VALUE` settings applied (VALUE read as JSON, else as a string), validated."""
        raw = self.to_dict()
        fields = {f.name for f in dataclasses.fields(self)} - {"extra", "pattern_key"}
        settable = set(raw) | fields | PASSTHROUGH_KEYS | set(KEY_ALIASES) | {"layers_block_type"}
        given: dict[str, str] = {}
        for item in settings:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"setting {item!r} is not KEY=VALUE")
            if key.strip() not in settable:
                raise ConfigError(f"setting {key.strip()!r} is not a config.json field of nemotron_h")
            if given.setdefault(key.strip(), item) != item:
                raise ConfigError(f"settings {given[key.strip()]!r} and {item!r} set one field: give one of them")
            try:
                raw[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                raw[key.strip()] = value
            except RecursionError:
                raise ConfigError(f"setting {key.strip()} holds a value nested too deeply for a config field") from None
        return HybridConfig.from_dict(raw)

    def _normalized_overrides(self) -> dict[int, dict[str, int]]:
        out = {}
        for index, values in sorted(self.block_overrides.items()):
            kept = {k: v for k, v in values.items() if getattr(self, k) != v}
            if kept:
                out[index] = kept
        return out

    # ----- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistency."""
        pattern = self.hybrid_override_pattern
        if not pattern:
            raise ConfigError("the layer pattern is empty: a model needs at least one block")
        if len(pattern) > MAX_BLOCKS:
            raise ConfigError(f"the layer pattern has {len(pattern):,} blocks, more than the {MAX_BLOCKS:,} allowed")
        unknown = sorted(set(pattern) - set(PATTERN_CHARS))
        if unknown:
            shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
            raise ConfigError(
                f"unknown character(s) {''.join(unknown)[:20]!r} in the layer pattern {shown!r}: "
                "use M (Mamba-2), * (attention), - (MLP) or E (MoE)"
            )
        for name in ("vocab_size", "hidden_size", "n_groups", "ssm_state_size", "conv_kernel", "chunk_size"):
            _require_positive(name, getattr(self, name))
        if self.mlp_hidden_act != "relu2":
            raise ConfigError(f"mlp_hidden_act {self.mlp_hidden_act!r} is not supported: nemotron_h uses 'relu2'")
        if self.mamba_hidden_act != "silu":
            raise ConfigError(f"mamba_hidden_act {self.mamba_hidden_act!r} is not supported: nemotron_h uses 'silu'")
        if self.attention_bias:
            raise ConfigError("attention_bias=true is not supported: nemotron_h attention has no biases")
        if self.mamba_ssm_cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"mamba_ssm_cache_dtype {self.mamba_ssm_cache_dtype!r} is not one of float32, bfloat16, float16"
            )
        if not (math.isfinite(self.layer_norm_epsilon) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon}")
        low, high = (self.time_step_limit + (math.nan, math.nan))[:2]
        if len(self.time_step_limit) != 2 or not (math.isfinite(low) and 0 <= low <= high and high > 0):
            raise ConfigError(
                f"time_step_limit must be [low, high] with 0 <= low <= high, high > 0 (and may be Infinity), got "
                f"{list(self.time_step_limit)}"
            )
        for index, values in self.block_overrides.items():
            if not 0 <= index < len(pattern):
                raise ConfigError(f"block_overrides names block {index}, but the model has {len(pattern)} blocks")
            kind = PATTERN_CHARS[pattern[index]]
            bad = sorted(set(values) - set(OVERRIDABLE[kind]))
            if bad:
                raise ConfigError(
                    f"block {index} is a {kind} block and cannot override {', '.join(bad)}; "
                    f"allowed: {', '.join(OVERRIDABLE[kind])}"
                )
            if values.get("n_routed_experts", 0) > self.n_routed_experts:
                raise ConfigError(
                    f"block {index} has {values['n_routed_experts']} routed experts, more than n_routed_experts "
                    f"({self.n_routed_experts}): the global count must be the largest (vLLM sizes its expert "
                    "table by it)"
                )
        if self.has_moe:
            self._validate_moe()
        for spec in self.blocks:
            _validate_block(spec, self)

    def _validate_moe(self) -> None:
        """The routing fields shared by every MoE block (each block's expert count is checked with its widths)."""
        for name in ("num_experts_per_tok", "n_shared_experts", "n_group", "topk_group"):
            _require_positive(name, getattr(self, name))
        if self.moe_latent_size is not None:
            _require_positive("moe_latent_size", self.moe_latent_size)
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) cannot exceed n_group ({self.n_group})")
        factor = self.routed_scaling_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ConfigError(f"routed_scaling_factor must be a positive number, got {factor!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError(f"norm_topk_prob must be true or false, got {self.norm_topk_prob!r}")

    # ----- dict / JSON ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HybridConfig:
        """Build from a parsed `config.json` (either pattern form, legacy key spellings accepted)."""
        try:
            data = {k: _decode_floats(v) for k, v in raw.items()}
        except RecursionError:  # JSON deep enough to parse, too deep to walk
            raise ConfigError("config.json holds values nested too deeply for a model config") from None
        model_type = data.pop("model_type", NEMOTRON_H)
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported: compressor reads Nemotron-H-format "
                f"checkpoints (model_type {', '.join(map(repr, ARCHITECTURES))})"
            )
        if data.get("architectures") == [ARCHITECTURES[model_type]]:
            data.pop("architectures")  # written by default
        block_configs = data.pop("block_configs", None)
        if model_type == PUZZLE:
            data.pop("auto_map", None)  # the folder's configuration module: never run, ours is written back
        if model_type != NEMOTRON_H and not isinstance(block_configs, list):
            raise ConfigError(f"config.json of model_type {model_type!r} needs a 'block_configs' list, one per block")
        for legacy, canonical in KEY_ALIASES.items():
            if legacy in data:
                value = data.pop(legacy)
                data.setdefault(canonical, value)
        if "layer_norm_epsilon" not in data and "rms_norm_eps" in data:
            data["layer_norm_epsilon"] = data["rms_norm_eps"]
        pattern_key = "hybrid_override_pattern"
        if "layers_block_type" in data:
            pattern_key = "layers_block_type"
            data["hybrid_override_pattern"] = _layer_types_to_pattern(data.pop("layers_block_type"))
        elif "hybrid_override_pattern" not in data:
            raise ConfigError("config.json has neither 'hybrid_override_pattern' nor 'layers_block_type'")
        data.pop("num_hidden_layers", None)  # derived from the pattern
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "pattern_key"}
        known = {k: data.pop(k) for k in list(data) if k in names}
        hints = _field_types()
        for name, value in known.items():
            if not _matches(value, hints[name]):
                raise ConfigError(f"config.json: {name} must be {_describe_type(hints[name])}, got {value!r}")
        if "time_step_limit" in known:
            known["time_step_limit"] = tuple(known["time_step_limit"])
        try:
            extra = {key: value for key, value in data.items() if key in PASSTHROUGH_KEYS}
            config = cls(**known, extra=extra, pattern_key=pattern_key)
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong shape
            raise ConfigError(f"config.json has a field of the wrong type: {exc}") from None
        if block_configs is None:
            return config
        widths = _read_block_configs(block_configs, config)
        return config.replace(block_overrides=dict(enumerate(widths)))

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content in the served format: standard nemotron_h, or with `block_configs`."""
        served = self.served_format
        out: dict[str, Any] = {"architectures": [ARCHITECTURES[served]], "model_type": served}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "pattern_key", "block_overrides", "hybrid_override_pattern"):
                continue
            value = getattr(self, f.name)
            if f.name in MOE_FIELDS and not self.has_moe and value == f.default:
                continue  # a dense model's config.json stays as it was
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.pattern_key == "layers_block_type":
            out["layers_block_type"] = [LAYER_TYPE_NAMES[k] for k in self.block_kinds]
        else:
            out["hybrid_override_pattern"] = self.hybrid_override_pattern
        out["num_hidden_layers"] = self.num_blocks
        if served != NEMOTRON_H:
            out["block_configs"] = self.block_configs()
        if served == PUZZLE:
            out["auto_map"] = dict(PUZZLE_AUTO_MAP)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> HybridConfig:
        """Read a `config.json` file, or the one inside a checkpoint folder."""
        path = Path(path)
        settle(path)  # an output whose swap is under way, or was interrupted, is read as its writer leaves it
        if path.is_dir():
            path = path / "config.json"
            confined(path, path.parent, what="config.json")  # its own file, never a link out of the folder
        if not path.exists():
            raise ConfigError(f"no config.json at {path}: point at a checkpoint folder or a config.json file")
        return cls.from_dict(read_json(path, "a model config", error=ConfigError))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def summary(self) -> dict[str, Any]:
        """A short description of the architecture (used by `compress info` and strategies)."""
        return {
            "blocks": self.num_blocks,
            "mamba": self.count(MAMBA),
            "attention": self.count(ATTENTION),
            "mlp": self.count(MLP),
            "moe": self.count(MOE),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "n_groups": self.n_groups,
            "ssm_state_size": self.ssm_state_size,
            "vocab_size": self.vocab_size,
            **({name: getattr(self, name) for name in MOE_FIELDS} if self.has_moe else {}),
            "uniform": self.is_uniform,
        }


def pattern_from_ratios(num_layers: int, attention_ratio: float, mlp_ratio: float) -> str:
    """The block pattern of `num_layers` blocks with these shares of attention and MLP blocks (the rest
    Mamba-2), laid out as Megatron-LM does it.

    Transcribes `pattern_from_ratios` of NVIDIA/Megatron-LM `megatron/core/models/hybrid/
    hybrid_layer_allocation.py` (before 2026-02: `_allocate_auto` in `megatron/core/ssm/
    mamba_hybrid_layer_allocation.py`, same arithmetic). Counts are Python's `round` of the float
    products (half to even). Attention blocks cut the Mamba blocks into n_attention + 1 runs of equal
    length, so the stack starts and ends with Mamba; MLP blocks are then spread over the remaining Mamba
    slots the same way, never replacing attention. When the rounded counts exceed `num_layers` (e.g.
    (3, 0.5, 0.5)), every remaining Mamba slot becomes MLP, fewer than asked: check `count` of the result.
    The float operations are kept in Megatron's order so that the ties land where Megatron's do.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"the number of layers must be a whole number >= 1, got {num_layers!r}")
    for name, ratio in (("attention ratio", attention_ratio), ("MLP ratio", mlp_ratio)):
        if not 0.0 <= ratio <= 1.0:  # also refuses NaN
            raise ConfigError(f"the {name} must be between 0 and 1, got {ratio!r}")
    if attention_ratio + mlp_ratio > 1.0:
        raise ConfigError(
            f"the attention ratio ({attention_ratio}) and MLP ratio ({mlp_ratio}) add up to more than 1: "
            "the Mamba-2 share is 1 - attention - MLP"
        )
    kinds = [MAMBA] * num_layers
    n_attention = round(num_layers * attention_ratio)
    n_mamba = num_layers - n_attention
    _spread(kinds, ATTENTION, step=n_mamba / (n_attention + 1))
    n_mlp = round(num_layers * mlp_ratio)
    if n_mlp > 0:
        _spread(kinds, MLP, step=(n_mamba - n_mlp) / n_mlp)  # negative when the counts overflow
    return "".join(KIND_CHARS[kind] for kind in kinds)


def _spread(kinds: list[str], kind: str, step: float) -> None:
    """Megatron's placement walk: over the Mamba slots left to right with a budget starting at `step`,
    turn a slot into `kind` when the budget is below one half (and add `step`), else spend one slot."""
    budget = step
    for index, current in enumerate(kinds):
        if current != MAMBA:
            continue
        if budget < 0.5:
            kinds[index] = kind
            budget += step
        else:
            budget -= 1


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(HybridConfig)


def _matches(value: Any, kind: Any) -> bool:
    """Whether a JSON value fits a field's declared type (bool is not a number; an int is a float)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        items = args[:1] * len(value) if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        return len(items) == len(value) and all(_matches(v, k) for v, k in zip(value, items, strict=True))
    if origin is dict:
        key_ok = (lambda k: str(k).lstrip("-").isdigit()) if args[0] is int else (lambda k: isinstance(k, str))
        return isinstance(value, dict) and all(key_ok(k) and _matches(v, args[1]) for k, v in value.items())
    return True


def _describe_type(kind: Any) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in args)
    if origin in (tuple, list):
        return (
            f"a list of {_describe_type(args[0])}s"
            if origin is list or args[-1] is Ellipsis
            else f"a list of {len(args)} numbers"
        )
    if origin is dict:
        return "an object"
    return names.get(kind, str(kind))


def _read_block_configs(entries: list[Any], config: HybridConfig) -> list[dict[str, int]]:
    """Every block's widths (`OVERRIDABLE` of its kind) from config.json's `block_configs`, one entry per
    block in pattern order; a width an entry leaves out is `config`'s.

    Each entry names its block's type, which must match the pattern, and may set the widths compressor
    models per block; any other key must repeat the global value, since a per-block value compressor
    cannot apply would be silently ignored.
    """
    kinds = config.block_kinds
    if len(entries) != len(kinds):
        raise ConfigError(f"block_configs has {len(entries)} entries, but the layer pattern has {len(kinds)} blocks")
    blocks = []
    for index, (entry, kind) in enumerate(zip(entries, kinds, strict=True)):
        if not isinstance(entry, dict):
            raise ConfigError(f"block_configs[{index}] must be an object, got {entry!r}")
        block_type = LAYER_TYPE_KINDS.get(entry.get("block_type"))
        if block_type != kind:
            raise ConfigError(
                f"block_configs[{index}] has block_type {entry.get('block_type')!r}, but block {index} of the "
                f"layer pattern is a {kind} block"
            )
        spec = config.block(index)
        widths = {name: getattr(spec, name) for name in OVERRIDABLE[kind]}
        for name, value in entry.items():
            if name == "block_type" or value is None:
                continue
            if name in OVERRIDABLE[kind]:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(f"block_configs[{index}].{name} must be a whole number, got {value!r}")
                widths[name] = value
            elif getattr(config, name, value) != value or not hasattr(config, name):
                raise ConfigError(
                    f"block_configs[{index}] sets {name}={value!r}, which compressor cannot apply per block "
                    f"(a {kind} block may set {', '.join(OVERRIDABLE[kind]) or 'nothing'})"
                )
        blocks.append(widths)
    return blocks


def _require_positive(name: str, value: Any, most: int = MAX_WIDTH) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value > most:
        raise ConfigError(f"{name} must be at most {most:,}, got {value:,}: the config is damaged")


def _validate_block(spec: BlockSpec, config: HybridConfig) -> None:
    where = f"block {spec.index} ({spec.kind})"
    n_groups = config.n_groups
    if spec.kind == MAMBA:
        _require_positive(f"mamba_num_heads of {where}", spec.mamba_num_heads)
        _require_positive(f"mamba_head_dim of {where}", spec.mamba_head_dim)
        if spec.mamba_num_heads % n_groups:
            raise ConfigError(
                f"mamba_num_heads ({spec.mamba_num_heads}) of {where} is not divisible by n_groups ({n_groups})"
            )
    elif spec.kind == ATTENTION:
        _require_positive(f"num_attention_heads of {where}", spec.num_attention_heads)
        _require_positive(f"num_key_value_heads of {where}", spec.num_key_value_heads)
        _require_positive(f"head_dim of {where}", spec.head_dim)
        if spec.num_attention_heads % spec.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({spec.num_attention_heads}) of {where} is not divisible by "
                f"num_key_value_heads ({spec.num_key_value_heads})"
            )
    elif spec.kind == MOE:
        _validate_moe_block(spec, config, where)
    else:
        _require_positive(f"intermediate_size of {where}", spec.intermediate_size)


def _validate_moe_block(spec: BlockSpec, config: HybridConfig, where: str) -> None:
    experts, top_k, groups = spec.n_routed_experts, config.num_experts_per_tok, config.n_group
    _require_positive(f"n_routed_experts of {where}", experts, MAX_EXPERTS)
    _require_positive(f"moe_intermediate_size of {where}", spec.moe_intermediate_size)
    _require_positive(f"moe_shared_expert_intermediate_size of {where}", spec.moe_shared_expert_intermediate_size)
    if top_k > experts:
        raise ConfigError(f"num_experts_per_tok ({top_k}) exceeds the {experts} routed experts of {where}")
    if experts % groups:
        raise ConfigError(f"n_routed_experts ({experts}) of {where} is not divisible by n_group ({groups})")
    if experts // groups < 2:
        raise ConfigError(
            f"{where} has {experts // groups} expert(s) per routing group; nemotron_h ranks a group by its two "
            "best experts, so keep at least 2 per group (n_routed_experts >= 2 x n_group)"
        )
    if top_k > config.topk_group * (experts // groups):
        raise ConfigError(
            f"num_experts_per_tok ({top_k}) exceeds the experts of the topk_group ({config.topk_group}) groups "
            f"of {experts // groups} that {where} routes to"
        )


def _layer_types_to_pattern(layer_types: Any) -> str:
    if not isinstance(layer_types, list):
        raise ConfigError("layers_block_type must be a list of block type names")
    chars = []
    for name in layer_types:
        if name not in LAYER_TYPE_KINDS:
            raise ConfigError(
                f"unknown block type {name!r} in layers_block_type: use linear_attention (Mamba-2), "
                "full_attention, mlp or moe"
            )
        chars.append(KIND_CHARS[LAYER_TYPE_KINDS[name]])
    return "".join(chars)


def _decode_floats(value: Any) -> Any:
    """Undo transformers' JSON tagging of non-finite floats ({"__float__": "Infinity"})."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"].replace("Infinity", "inf"))
        return {k: _decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_floats(v) for v in value]
    return value


def loaders(config: HybridConfig) -> list[str]:
    """The engines that run a checkpoint of `config` as compressor does, with how to load it there.

    By its served format (`HybridConfig.served_format`), as `benchmarks/interop.py` measures it:
    - nemotron_h (uniform): compressor, transformers, vLLM, llama.cpp (its convert_hf_to_gguf.py with the
      workarounds the README names);
    - nemotron_h_puzzle: vLLM reads `block_configs` through the folder's configuration module
      (`trust_remote_code`); a ModelOpt-quantized export runs there in bf16 / fp16 only (vLLM refuses fp32 for
      ModelOpt). llama.cpp runs per-block MLP / attention widths, and a quantized export's weights dequantized
      (no activation quantization), but its converter cannot write per-block expert counts. transformers
      refuses the format: it has no per-block NemotronH, and it would read packed quantized weights as plain
      ones (it skips `quant_method: modelopt` with a warning);
    - nemotron_h_compressor (per-block Mamba widths, which vLLM and llama.cpp read only globally): compressor.
    vLLM and llama.cpp never read `time_step_limit`: a checkpoint whose limit is not [0, inf] runs as another
    model there, so they are left out for it.
    """
    served = config.served_format
    if served == COMPRESSOR_ONLY:
        return ["compressor"]
    unclamped = config.time_step_limit == (0.0, math.inf)
    if served == NEMOTRON_H:
        return ["compressor", "transformers", *(["vLLM", "llama.cpp"] if unclamped else [])]
    vllm = "vLLM (trust_remote_code, bf16/fp16)" if config.is_quantized else "vLLM (trust_remote_code)"
    experts = {spec.n_routed_experts for spec in config.blocks if spec.kind == MOE}
    llama = [] if len(experts) > 1 else ["llama.cpp (weights dequantized)" if config.is_quantized else "llama.cpp"]
    return ["compressor", *([vllm, *llama] if unclamped else [])]
