"""The configuration of a Nemotron-H checkpoint in NVIDIA's Puzzle format (model_type `nemotron_h_puzzle`).

compressor copies this file into every checkpoint it writes in that format, and config.json's `auto_map`
names `NemotronHPuzzleConfig`. vLLM (and TensorRT-LLM) load it under `trust_remote_code` and build block i
from `get_nemotron_h_config_for_layer(i)`: the global configuration with config.json's `block_configs[i]`
applied (its MLP, attention or MoE widths; Mamba widths are global). compressor never imports it: it
reads `block_configs` from config.json itself. transformers has no model for this configuration, so it
refuses such a checkpoint rather than build every block at the global widths.
"""

import copy

from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig


class NemotronHPuzzleConfig(NemotronHConfig):
    model_type = "nemotron_h_puzzle"

    def get_nemotron_h_config_for_layer(self, layer_idx: int) -> NemotronHConfig:
        """This configuration with block `layer_idx`'s entry of `block_configs` applied."""
        layer = copy.copy(self)
        for key, value in self.block_configs[layer_idx].items():
            if key != "block_type" and value is not None:
                setattr(layer, key, value)
        return layer
