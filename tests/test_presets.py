import pytest
import torch

from compressor.errors import ConfigError
from compressor.model import HybridLM
from compressor.presets import PUBLISHED, PUBLISHED_PARAMS, get_preset


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts_are_exact(name):
    with torch.device("meta"):
        model = HybridLM(get_preset(name))
    assert model.num_parameters() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize(
    "name, counts",
    [
        ("8b", (24, 4, 24)),
        ("47b", (45, 5, 48)),
        ("56b", (54, 10, 54)),
        ("9b-v2", (27, 4, 25)),
        ("12b-v2", (28, 6, 28)),
    ],
)
def test_published_patterns(name, counts):
    config = get_preset(name)
    assert (config.count("mamba"), config.count("attention"), config.count("mlp")) == counts


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: nemotron-h-4b"):
        get_preset("nope")
