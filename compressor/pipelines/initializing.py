"""`compress init`: a randomly initialised checkpoint of a preset or a config.json, optionally laid out anew.

The widths come from the preset or config; `layers` lays out that many blocks from the attention and MLP
shares (Megatron-LM's placement, the rest Mamba-2); `settings` (KEY=VALUE, JSON values) override fields last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.config import HybridConfig
from compressor.errors import CompressorError, OptionError, check_at_least


@dataclass(frozen=True)
class InitConfig:
    """Which architecture to build (exactly one of `preset` and `config`) and how to write it."""

    preset: str | None = None
    config: str | Path | None = None
    layers: int | None = None
    attention_ratio: float = 0.0
    mlp_ratio: float = 0.0
    settings: tuple[str, ...] = field(default_factory=tuple)
    tokenizer: str | Path | None = None  # a folder or tokenizer.json shipped with the model
    dtype: str = "float32"
    seed: int = 0

    def architecture(self) -> HybridConfig:
        """The architecture described, checked (the layout's own mistakes first)."""
        from compressor.config import pattern_from_ratios
        from compressor.presets import get_preset

        preset, config, layers = self.preset, self.config, self.layers
        if preset is not None and config is not None or (preset is None and config is None and layers is None):
            raise CompressorError(
                "give exactly one of --preset NAME or --config JSON (whose blocks --layers lays out anew)"
            )
        if preset is None and config is None:
            pattern_from_ratios(layers, self.attention_ratio, self.mlp_ratio)
            raise OptionError(
                "layers", "lays out the blocks of a --preset or --config, which give their widths: add one of them"
            )
        arch = get_preset(preset) if preset is not None else HybridConfig.from_file(config)
        if layers is not None:
            arch = arch.with_layout(layers, self.attention_ratio, self.mlp_ratio)
        elif self.attention_ratio or self.mlp_ratio:
            raise OptionError("attention_ratio", "and --mlp-ratio lay out --layers blocks: give --layers too")
        return arch.with_settings(list(self.settings))


@dataclass
class InitRecord:
    """What was written: the architecture and its parameter count."""

    config: HybridConfig
    params: int


def init_model(out: str | Path, config: InitConfig, *, overwrite: bool = False) -> InitRecord:
    """Build `config`'s architecture with random weights and write it to `out` (module docstring)."""
    from compressor.checkpoint import init_checkpoint

    arch = config.architecture()
    check_at_least(seed=(config.seed, 0))
    params = init_checkpoint(out, arch, tokenizer=config.tokenizer, dtype=config.dtype, seed=config.seed,
                             overwrite=overwrite)  # fmt: skip
    return InitRecord(arch, params)
