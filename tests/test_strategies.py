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
