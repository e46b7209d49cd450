"""The proxy score's spec (compressor/pipelines/ranking.py `ScoreSpec`): `--score` checked and taken apart once."""

import pytest

from compressor.errors import OptionError
from compressor.pipelines.ranking import SCORE_METRICS, ScoreSpec


@pytest.mark.parametrize(
    "metric, weight, text, retrieval, counted",
    [
        ("kl", 1.0, "kl", False, 0.0),
        ("loss", 0.0, "loss", False, 0.0),
        ("retrieval", 1.0, None, True, 1.0),
        ("kl+retrieval", 2.5, "kl", True, 2.5),
        ("loss+retrieval", 0.0, "loss", True, 0.0),
    ],
)
def test_a_score_is_taken_apart_into_its_terms(metric, weight, text, retrieval, counted):
    spec = ScoreSpec(metric, weight)
    assert (spec.text, spec.retrieval, spec.weight) == (text, retrieval, counted)


def test_every_metric_has_a_spec_and_a_bad_one_is_refused_by_name():
    assert {ScoreSpec(m).metric for m in SCORE_METRICS} == set(SCORE_METRICS)
    with pytest.raises(OptionError, match="score"):
        ScoreSpec("kl+loss")
    with pytest.raises(OptionError, match="retrieval_weight"):
        ScoreSpec("kl", 2.0)  # kl has no retrieval term to weigh
    with pytest.raises(OptionError, match="retrieval_weight"):
        ScoreSpec("kl+retrieval", float("nan"))
