"""The teacher cache's targets: sampled draws (their shares, seeding and read-back) and top-k."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compressor import distributed
from compressor.config import HybridConfig
from compressor.data import TokenSequences
from compressor.errors import CompressorError
from compressor.losses import TeacherSample, TeacherTopK
from compressor.model import HybridLM
from compressor.teacher_cache import TeacherCache, _targets, write_teacher_cache

V = 40


def test_the_shares_of_the_draws_average_to_the_teachers_distribution():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(1, 6, 8, generator=generator), torch.randn(V, 8, generator=generator)
    p = F.softmax(hidden[0] @ weight.T / 2.0, -1)
    mean = torch.zeros(6, V)
    for seed in range(200):
        found = _targets(hidden, weight, 64, 2.0, "sampled", [seed])
        assert found["indices"].dtype == torch.int32 and found["indices"].shape == (1, 6, 40)
        torch.testing.assert_close(found["weights"].sum(-1), torch.ones(1, 6))
        assert (found["weights"][..., :-1] >= found["weights"][..., 1:]).all()  # the ids drawn come first
        torch.testing.assert_close(found["log_probs"][0], p.log().gather(-1, found["indices"][0].long()))
        mean.scatter_add_(1, found["indices"][0].long(), found["weights"][0] / 200)
    torch.testing.assert_close(mean, p, atol=0.01, rtol=0)  # 12,800 draws a position


def test_a_sequence_draws_alike_in_any_batch():
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(3, 5, 8, generator=generator), torch.randn(V, 8, generator=generator)
    together = _targets(hidden, weight, 16, 1.0, "sampled", [7, 8, 9])
    alone = _targets(hidden[1:2], weight, 16, 1.0, "sampled", [8])
    for name in ("indices", "weights", "log_probs"):
        assert torch.equal(together[name][1:2], alone[name])
    other = _targets(hidden[1:2], weight, 16, 1.0, "sampled", [10])
    assert not torch.equal(other["weights"], alone["weights"]) or not torch.equal(other["indices"], alone["indices"])


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = HybridConfig(hybrid_override_pattern="M*-", vocab_size=V, hidden_size=32, intermediate_size=48,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
                          mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=8)  # fmt: skip
    return HybridLM(config).eval()


@pytest.mark.parametrize("targets", ["sampled", "top-k"])
def test_a_cache_reads_back_what_it_wrote(teacher, tmp_path, targets):
    ids = np.random.default_rng(0).integers(0, V, (6, 12)).astype(np.int32)
    sequences = TokenSequences(ids)
    world = distributed.World(device=torch.device("cpu"))
    splits = {"train": (sequences, np.array([0, 2, 3, 5])), "valid": (sequences, np.array([1]))}
    write_teacher_cache(tmp_path / "c", teacher, splits, 8, 1.0, world, targets=targets, seed=3, batch_size=3)
    cache = TeacherCache(tmp_path / "c", 8, 1.0, targets, 3)
    got = cache.get("train", np.array([3, 0]), torch.device("cpu"))
    assert isinstance(got, TeacherSample if targets == "sampled" else TeacherTopK)
    assert got.indices.shape == (24, 8) and got.indices.dtype == torch.int64
    with torch.no_grad():
        logp = F.log_softmax(teacher(torch.from_numpy(ids[[3, 0]]).long()).flatten(0, 1).float(), -1)
    torch.testing.assert_close(got.log_probs, logp.gather(-1, got.indices), rtol=1e-4, atol=1e-5)
    if targets == "sampled":
        torch.testing.assert_close(got.weights.sum(-1), torch.ones(24))
    for changed, message in (({"seed": 4}, "seed 3"), ({"targets": "top-k" if targets == "sampled" else "sampled"},
                                                         f"targets {targets}")):  # fmt: skip
        asked = {"top_k": 8, "temperature": 1.0, "targets": targets, "seed": 3, **changed}
        if targets == "top-k" and "seed" in changed:
            TeacherCache(tmp_path / "c", **asked)  # top-k targets draw nothing: any seed reads them
            continue
        with pytest.raises(CompressorError, match=f"written with {message}, the run uses"):
            TeacherCache(tmp_path / "c", **asked)
