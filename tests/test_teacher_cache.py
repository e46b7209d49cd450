"""The teacher cache's targets: sampled draws (their shares, seeding and read-back) and top-k."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

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
from compressor.teacher_cache import TeacherCache, _targets, extend_teacher_cache, write_teacher_cache

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


def test_the_teachers_most_likely_token_is_among_the_sampled_slots_so_top1_agreement_is_exact():
    """k draws fill at most k slots; the k + 1-th holds the most likely token when no draw took it."""
    from compressor.losses import LossSpec, LossStats, head_loss

    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(1, 200, 8, generator=generator), torch.randn(V, 8, generator=generator)
    found = _targets(hidden, weight, 2, 1.0, "sampled", [0])  # 2 draws: the top token is often missed
    assert found["indices"].shape == (1, 200, 3)
    best = (hidden[0] @ weight.T).argmax(-1)
    assert ((found["indices"][0] == best[:, None]).sum(-1) == 1).all()
    drawn = (found["indices"][0] == best[:, None]) & (found["weights"][0] > 0)
    assert 0 < int(drawn.any(-1).sum()) < 200  # drawn at some positions, kept undrawn (weight 0) at the others
    torch.testing.assert_close(found["weights"][0].sum(-1), torch.ones(200))
    sample = TeacherSample(*(found[name][0].long() if name == "indices" else found[name][0]
                             for name in ("indices", "weights", "log_probs")))  # fmt: skip
    stats = LossStats()
    head_loss(hidden[0], weight, LossSpec(), teacher=sample, stats=stats)  # the teacher as its own student
    assert int(stats.agreement) == stats.tokens == 200


def test_a_sequence_draws_alike_in_any_batch():
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(3, 5, 8, generator=generator), torch.randn(V, 8, generator=generator)
    together = _targets(hidden, weight, 16, 1.0, "sampled", [7, 8, 9])
    alone = _targets(hidden[1:2], weight, 16, 1.0, "sampled", [8])
    for name in ("indices", "weights", "log_probs"):
        assert torch.equal(together[name][1:2], alone[name])
    other = _targets(hidden[1:2], weight, 16, 1.0, "sampled", [10])
    assert not torch.equal(other["weights"], alone["weights"]) or not torch.equal(other["indices"], alone["indices"])


@pytest.mark.parametrize("targets", ["sampled", "top-k"])
def test_the_logits_are_formed_a_chunk_at_a_time_to_the_same_targets(monkeypatch, targets):
    import compressor.teacher_cache as module

    generator = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 11, 8, generator=generator), torch.randn(V, 8, generator=generator)
    whole = _targets(hidden, weight, 16, 1.0, targets, [5, 6])
    formed = []
    real_softmax = module.F.log_softmax
    monkeypatch.setattr(module, "CHUNK_LOGITS", 3 * V)  # 3 rows a chunk
    monkeypatch.setattr(module.F, "log_softmax", lambda x, dim: formed.append(x.shape[0]) or real_softmax(x, dim))
    chunked = _targets(hidden, weight, 16, 1.0, targets, [5, 6])
    assert formed == [3, 3, 3, 2] * 2
    assert torch.equal(whole["indices"], chunked["indices"])
    torch.testing.assert_close(whole["log_probs"], chunked["log_probs"])
    if targets == "sampled":
        assert torch.equal(whole["weights"], chunked["weights"])
        formed.clear()
        _targets(hidden, weight, 2 * V, 1.0, targets, [5, 6])  # more draws than the vocabulary: they set the rows
        assert formed == [1] * 22


def _teacher():
    torch.manual_seed(0)
    config = HybridConfig(hybrid_override_pattern="M*-", vocab_size=V, hidden_size=32, intermediate_size=48,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
                          mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=8)  # fmt: skip
    return HybridLM(config).eval()


@pytest.fixture(scope="module")
def teacher():
    return _teacher()


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
    assert got.indices.shape == (24, 9 if targets == "sampled" else 8) and got.indices.dtype == torch.int64
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


def _splits():
    ids = np.random.default_rng(1).integers(0, V, (9, 12)).astype(np.int32)
    sequences = TokenSequences(ids)
    return {"train": (sequences, np.array([0, 2, 3, 5, 6, 8])), "valid": (sequences, np.array([1, 4]))}


def _tensors(folder):
    from safetensors.torch import load_file

    return {path.name: load_file(path) for path in sorted(folder.glob("*.safetensors"))}


def test_a_killed_write_resumes_from_its_last_whole_part(teacher, tmp_path, monkeypatch):
    import compressor.teacher_cache as module

    monkeypatch.setattr(module, "PART_SEQUENCES", 2)  # a part a round of 2 sequences: 3 train parts, 1 valid
    world = distributed.World(device=torch.device("cpu"))
    kwargs = {"targets": "sampled", "seed": 3, "batch_size": 2, "teacher_id": "abc"}
    write_teacher_cache(tmp_path / "whole", teacher, _splits(), 8, 1.0, world, **kwargs)

    real, writes = module._write_part, []

    def killed(path, parts):
        if len(writes) == 2:
            raise KeyboardInterrupt  # after two whole parts
        writes.append(path.name)
        real(path, parts)

    monkeypatch.setattr(module, "_write_part", killed)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(tmp_path / "c", teacher, _splits(), 8, 1.0, world, **kwargs)
    assert not (tmp_path / "c").exists() and len(list((tmp_path / ".c.partial").glob("*.safetensors"))) == 2
    writes.clear()
    monkeypatch.setattr(module, "_write_part", lambda path, parts: writes.append(path.name) or real(path, parts))
    said = []
    write_teacher_cache(tmp_path / "c", teacher, _splits(), 8, 1.0, world, **kwargs, say=said.append)
    assert writes == ["train-r0-p2.safetensors", "valid-r0-p0.safetensors"]  # the two whole parts are kept
    assert said == ["teacher cache: resuming an interrupted write"]
    whole, resumed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "c")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[f][n], resumed[f][n]) for f in whole for n in whole[f])
    assert not (tmp_path / ".c.partial").exists()

    # a partial write of another cache (another seed) is not resumed: its parts are written again
    monkeypatch.setattr(module, "_write_part", killed)
    writes.clear()
    with pytest.raises(KeyboardInterrupt):
        write_teacher_cache(tmp_path / "d", teacher, _splits(), 8, 1.0, world, **{**kwargs, "seed": 4})
    monkeypatch.setattr(module, "_write_part", lambda path, parts: writes.append(path.name) or real(path, parts))
    writes.clear()
    write_teacher_cache(tmp_path / "d", teacher, _splits(), 8, 1.0, world, **kwargs)
    assert len(writes) == 4


def test_a_cache_is_read_only_by_its_teacher_and_for_the_sequences_it_holds(teacher, tmp_path):
    world = distributed.World(device=torch.device("cpu"))
    write_teacher_cache(tmp_path / "c", teacher, _splits(), 8, 1.0, world, teacher_id="abc")
    with pytest.raises(CompressorError, match="written by another teacher .fingerprint abc, the run's teacher xyz"):
        TeacherCache(tmp_path / "c", 8, 1.0, teacher="xyz")
    with pytest.raises(CompressorError, match="lacks 1 of the 3 train sequences the run reads"):
        TeacherCache(tmp_path / "c", 8, 1.0, teacher="abc", needed={"train": np.array([0, 1, 2])})
    TeacherCache(tmp_path / "c", 8, 1.0, teacher="abc", needed={"train": np.array([0, 2]), "valid": np.array([4])})


def test_an_extended_cache_holds_what_one_whole_write_holds(teacher, tmp_path, monkeypatch):
    import compressor.teacher_cache as module

    world = distributed.World(device=torch.device("cpu"))
    kwargs = {"targets": "sampled", "seed": 3, "batch_size": 2, "teacher_id": "abc"}
    whole = _splits()
    write_teacher_cache(tmp_path / "whole", teacher, whole, 8, 1.0, world, **kwargs)
    (sequences, train), (_, valid) = whole["train"], whole["valid"]
    write_teacher_cache(tmp_path / "c", teacher, {"train": (sequences, train[:2]), "valid": (sequences, valid)}, 8,
                        1.0, world, **kwargs)  # fmt: skip
    reader = TeacherCache(tmp_path / "c", 8, 1.0, "sampled", 3)
    assert [len(p) for p in reader.lacking({"train": train, "valid": valid}).values()] == [4, 0]
    reader.close()

    def extend(positions):  # the cache in c, with the train sequences at `positions` added
        def write(target):
            write_teacher_cache(target, teacher, {"train": (sequences, positions)}, 8, 1.0, world, **kwargs)

        extend_teacher_cache(tmp_path / "c", {"train": positions}, world, write)

    extend(train[2:4])
    # a kill after the added sequences were written, before the merge: the next extension merges them as they are
    real_swap, writes = module.swap_in, []
    monkeypatch.setattr(module, "swap_in", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extend(train[4:])
    monkeypatch.setattr(module, "swap_in", real_swap)
    monkeypatch.setattr(module, "_write_part", lambda path, parts: writes.append(path.name))
    extend(train[4:])
    assert writes == [] and sorted(p.name for p in tmp_path.iterdir()) == ["c", "whole"]
    assert sorted(p.name for p in (tmp_path / "c").glob("*.safetensors")) == [
        "train-e1-r0-p0.safetensors", "train-e2-r0-p0.safetensors", "train-r0-p0.safetensors",
        "valid-r0-p0.safetensors",
    ]  # fmt: skip
    extended = TeacherCache(tmp_path / "c", 8, 1.0, "sampled", 3, teacher="abc",
                            needed={"train": train, "valid": valid})  # fmt: skip
    once = TeacherCache(tmp_path / "whole", 8, 1.0, "sampled", 3)
    assert module._read_meta(tmp_path / "c").positions == module._read_meta(tmp_path / "whole").positions
    for split, positions in (("train", train[::-1]), ("valid", valid)):
        got, want = (cache.get(split, positions, torch.device("cpu")) for cache in (extended, once))
        assert all(torch.equal(getattr(got, n), getattr(want, n)) for n in ("indices", "log_probs", "weights"))


def test_an_extension_copies_where_hard_links_are_refused_once_the_disk_holds_the_copy(teacher, tmp_path, monkeypatch):
    import compressor.outputs as outputs
    import compressor.teacher_cache as module

    world = distributed.World(device=torch.device("cpu"))
    kwargs = {"targets": "sampled", "seed": 3, "batch_size": 2, "teacher_id": "abc"}
    (sequences, train), (_, valid) = _splits()["train"], _splits()["valid"]
    write_teacher_cache(tmp_path / "c", teacher, {"train": (sequences, train[:2]), "valid": (sequences, valid)}, 8,
                        1.0, world, **kwargs)  # fmt: skip

    def extend():
        def write(target):
            write_teacher_cache(target, teacher, {"train": (sequences, train[2:])}, 8, 1.0, world, **kwargs)

        extend_teacher_cache(tmp_path / "c", {"train": train[2:]}, world, write)

    monkeypatch.setattr(module.os, "link", lambda source, target: (_ for _ in ()).throw(OSError("no links here")))
    parts = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors"))
    monkeypatch.setattr(outputs, "free_bytes", lambda path: parts)  # the old parts fit, not the new ones too
    with pytest.raises(CompressorError, match=r"copying the teacher cache \(this file system refuses hard links\)"):
        extend()
    assert sorted(p.name for p in (tmp_path / "c").glob("*.safetensors")) == [
        "train-r0-p0.safetensors", "valid-r0-p0.safetensors"
    ]  # the cache as it was  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.extension", "c"]  # what it wrote kept for the next
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 10 * parts)
    writes = []
    monkeypatch.setattr(module, "_write_part", lambda path, parts: writes.append(path.name))
    extend()  # the added sequences, written before the refusal, are merged without the teacher
    assert writes == [] and sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    extended = TeacherCache(tmp_path / "c", 8, 1.0, "sampled", 3, teacher="abc", needed={"train": train})
    assert len(extended.lacking({"train": train})["train"]) == 0
    assert all(p.stat().st_nlink == 1 for p in (tmp_path / "c").glob("*.safetensors"))  # copies, not links


def test_a_cache_the_disk_cannot_hold_is_refused_before_the_teacher_runs(teacher, tmp_path, monkeypatch):
    import compressor.outputs as outputs

    monkeypatch.setattr(outputs, "free_bytes", lambda path: 12_000)
    world = distributed.World(device=torch.device("cpu"))
    # 8 sequences of 12 tokens, 8 draws in 9 slots of 12 bytes: 10,368 bytes; with 64 draws (40 slots) 46,080
    write_teacher_cache(tmp_path / "small", teacher, _splits(), 8, 1.0, world, targets="sampled")
    needs = r"the teacher cache \(480 bytes a token; a lower --top-k needs less\) needs about 0.04 MiB at .*, but "
    with pytest.raises(CompressorError, match=needs + r"only 0.01 MiB is free"):
        write_teacher_cache(tmp_path / "big", teacher, _splits(), 64, 1.0, world, targets="sampled")


def test_a_long_write_says_how_far_it_is(teacher, tmp_path, monkeypatch):
    import compressor.teacher_cache as module

    monkeypatch.setattr(module, "PART_SEQUENCES", 2)
    monkeypatch.setattr(module._Progress, "EVERY", 0.0)
    said = []
    world = distributed.World(device=torch.device("cpu"))
    write_teacher_cache(tmp_path / "c", teacher, _splits(), 8, 1.0, world, batch_size=2, say=said.append)
    assert [line.split(",")[0] for line in said] == [f"teacher cache: {n} of 8 sequences" for n in (2, 4, 6)]
    assert all(re.search(r"[\d,]+ tokens/s, about \d+ s left$", line) for line in said)


TWO_PROCESSES = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    import compressor.teacher_cache as module
    from compressor import distributed
    from tests.test_teacher_cache import _splits, _teacher

    module.PART_SEQUENCES = 2
    world = distributed.init(torch.device("cpu"))
    kwargs = dict(targets="sampled", seed=3, batch_size=1, teacher_id="abc")
    out = {out!r}
    module.write_teacher_cache(out + "/first", _teacher(), _splits(), 8, 1.0, world, **kwargs)
    if world.is_main:  # as if killed: rank 1 lost its last train part, both ranks their valid part
        os.rename(out + "/first", out + "/.again.partial")
        meta = out + "/.again.partial/teacher_cache.json"
        text = open(meta).read()
        open(meta, "w").write(text.replace('"complete": true', '"complete": false'))
        for name in ("train-r1-p1", "valid-r0-p0", "valid-r1-p0"):
            os.remove(out + "/.again.partial/" + name + ".safetensors")
    distributed.barrier(world)
    written, real = [], module._write_part
    module._write_part = lambda path, parts: written.append(path.name) or real(path, parts)
    module.write_teacher_cache(out + "/again", _teacher(), _splits(), 8, 1.0, world, **kwargs)
    open(out + f"/written-{{world.rank}}", "w").write(" ".join(written))
    module._write_part = real
    (sequences, train), valid = _splits()["train"], _splits()["valid"]
    module.write_teacher_cache(out + "/short", _teacher(), {{"train": (sequences, train[:2]), "valid": valid}}, 8, 1.0,
                               world, **kwargs)
    added = {{"train": (sequences, train[2:])}}
    write = lambda target: module.write_teacher_cache(target, _teacher(), added, 8, 1.0, world, **kwargs)
    module.extend_teacher_cache(out + "/short", {{"train": train[2:]}}, world, write)
    distributed.close(world)
    """
)


def test_two_processes_write_and_resume_the_cache_one_process_writes(tmp_path):
    """Each process writes its share, part by part; a resumed write recomputes a group of parts that any
    process lacks (every process runs that group's forwards) and keeps the rest."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "two.py").write_text(TWO_PROCESSES.format(root=str(root), out=str(tmp_path)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*launch, str(tmp_path / "two.py")], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"written-{rank}").read_text() for rank in (0, 1)] == [
        "train-r0-p1.safetensors valid-r0-p0.safetensors",  # rank 0's part of the group rank 1 lacked
        "train-r1-p1.safetensors valid-r1-p0.safetensors",
    ]
    world = distributed.World(device=torch.device("cpu"))
    write_teacher_cache(tmp_path / "one", _teacher(), _splits(), 8, 1.0, world, targets="sampled", seed=3, batch_size=1)
    one, two, extended = (TeacherCache(tmp_path / name, 8, 1.0, "sampled", 3) for name in ("one", "again", "short"))
    for split, (_, positions) in _splits().items():  # and a cache the two processes extended
        a = one.get(split, positions, torch.device("cpu"))
        for b in (two.get(split, positions, torch.device("cpu")), extended.get(split, positions, torch.device("cpu"))):
            assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("indices", "weights", "log_probs"))
    assert sorted(p.name for p in (tmp_path / "short").glob("train-e*")) == [
        "train-e1-r0-p0.safetensors", "train-e1-r1-p0.safetensors"
    ]  # fmt: skip
