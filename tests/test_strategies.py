"""The strategy registry: built-ins and third-party entry points."""

import pytest

import strategies
from compressor.errors import CompressorError
from strategies.base import Strategy
from strategies.minitron import MinitronStrategy


class Mine(Strategy):
    name = "mine"

    def propose(self, source, importance, budget):
        return []


class FakeEntryPoint:
    name = "mine"

    def load(self):
        return Mine


def test_builtin_and_plugged_in_strategies(monkeypatch):
    assert strategies.get_strategy("minitron") is MinitronStrategy
    monkeypatch.setattr(
        strategies, "entry_points", lambda group: [FakeEntryPoint()] if group == "compressor.strategies" else []
    )
    assert strategies.get_strategy("mine") is Mine
    assert set(strategies.available()) >= {"minitron", "mine"}


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(CompressorError, match="strategy 'nope' is unknown: choose one of .*minitron"):
        strategies.get_strategy("nope")


def test_export_config_names_moe_widths_with_modelopt_keys():
    from compressor.presets import get_preset
    from strategies.export_config import export_config, target_from_export_config

    nano = get_preset("nano3-30b")
    shape = {"num_moe_experts": 96, "moe_ffn_hidden_size": 1536, "moe_shared_expert_intermediate_size": 3072}
    pruned = target_from_export_config(nano, None, shape).config(nano)
    assert (pruned.n_routed_experts, pruned.moe_intermediate_size) == (96, 1536)
    assert pruned.moe_shared_expert_intermediate_size == 3072 and pruned.is_uniform
    assert {k: export_config(pruned)[k] for k in shape} == shape
    assert "num_moe_experts" not in export_config(get_preset("9b-v2"))  # dense models keep the dense keys
    with pytest.raises(CompressorError, match="num_moe_experts names MoE blocks, but the model has none"):
        target_from_export_config(get_preset("9b-v2"), None, {"num_moe_experts": 4})


def test_value_syntax_says_how_build_options_reads_a_field():
    from strategies.base import value_syntax

    assert [value_syntax(kind) for kind in (bool | None, int, float | None, tuple[float, ...], str)] == [
        "true|false", "int", "float", "float,...", "str"
    ]  # fmt: skip
