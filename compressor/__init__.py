"""compressor: prune, search and distill hybrid Mamba-Transformer (Nemotron-H format) language models.

The names below load on first use, not with the package: the command line imports the package's light
modules (options, errors, budgets) without paying for torch before it has parsed what to do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compressor.cache import HybridCache
    from compressor.checkpoint import load_model, save_model
    from compressor.config import BlockSpec, HybridConfig
    from compressor.errors import CompressorError
    from compressor.model import HybridLM
    from compressor.presets import get_preset

_HOMES = {
    "BlockSpec": "compressor.config",
    "CompressorError": "compressor.errors",
    "HybridCache": "compressor.cache",
    "HybridConfig": "compressor.config",
    "HybridLM": "compressor.model",
    "get_preset": "compressor.presets",
    "load_model": "compressor.checkpoint",
    "save_model": "compressor.checkpoint",
}
__all__ = [
    "BlockSpec",
    "CompressorError",
    "HybridCache",
    "HybridConfig",
    "HybridLM",
    "get_preset",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
