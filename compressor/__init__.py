"""compressor: prune, search and distill hybrid Mamba-Transformer (Nemotron-H format) language models."""

from compressor.cache import HybridCache
from compressor.checkpoint import load_model, save_model
from compressor.config import BlockSpec, HybridConfig
from compressor.errors import CompressorError
from compressor.model import HybridLM
from compressor.presets import get_preset

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
