"""`compress info`: a checkpoint folder, config.json or preset in, its description out: the architecture,
parameters by component (and active per token), the stored dtypes and the engines that load it. A folder's
config.json is checked against its weights first, so that the counts describe them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.config import HybridConfig
from compressor.presets import load_config_or_preset


@dataclass
class ModelInfo:
    """The description of `model` (as named): its config, parameters by component, stored dtypes."""

    model: str
    config: HybridConfig
    counts: dict[str, int]
    dtypes: list[str]

    def to_dict(self) -> dict[str, Any]:
        from compressor.budget import active_parameters
        from compressor.config import loaders

        config = self.config
        total, active = sum(self.counts.values()), active_parameters(config)
        return {"model": self.model, "pattern": config.pattern, "architecture": config.summary(),
                "block_overrides": config.block_overrides, "ratios": config.ratios(),
                "parameters": {**self.counts, "total": total, "active": active}, "dtypes": self.dtypes,
                "loads_in": loaders(config)}  # fmt: skip


def describe_model(model: str | Path) -> ModelInfo:
    """Describe `model` (module docstring)."""
    from compressor.budget import parameter_counts
    from compressor.checkpoint import check_weights, stored_dtypes

    config, folder = load_config_or_preset(model)
    if folder is not None:
        check_weights(folder, config)  # config.json describes these weights, or the counts mean nothing
    dtypes = stored_dtypes(folder) if folder is not None else []
    return ModelInfo(str(model), config, parameter_counts(config), dtypes)
