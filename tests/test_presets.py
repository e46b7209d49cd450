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


def test_nano3_30b_a3b_architecture():
    config = get_preset("nemotron-3-nano-30b-a3b")
    assert get_preset("30b-a3b") == config
    assert (config.count("mamba"), config.count("attention"), config.count("mlp"), config.count("moe")) == (
        23,
        6,
        0,
        23,
    )
    assert [i for i, c in enumerate(config.pattern) if c == "*"] == [5, 12, 19, 26, 33, 42]
    assert (config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (128, 6, 1856)
    assert (config.num_key_value_heads, config.mamba_num_heads, config.hidden_size) == (2, 64, 2688)
    # per-block counts of the reference notes
    with torch.device("meta"):
        model = HybridLM(config)
    blocks = [sum(p.numel() for p in block.mixer.parameters()) for block in model.backbone.layers[:6]]
    assert blocks[:2] == [38_742_208, 1_297_465_344] and blocks[5] == 23_396_352
    mixer = model.backbone.layers[1].mixer
    assert sum(p.numel() for p in mixer.experts[0].parameters()) == 9_977_856
    assert mixer.gate.weight.numel() == 344_064
    assert sum(p.numel() for p in mixer.shared_experts.parameters()) == 19_955_712
