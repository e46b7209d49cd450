"""Sharded models on two gloo processes (compressor/distributed.py): each holds about half the weights, the
shards are the checkpoint's rows, and importance equals one process's."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import distributed
from compressor.checkpoint import save_model
from compressor.importance import Importance
from compressor.model import HybridLM
from compressor.presets import get_preset

CONFIG = get_preset("4b").replace(hidden_size=384, intermediate_size=1536, mamba_num_heads=16, vocab_size=8192)
WORKER = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from compressor import distributed
from compressor.checkpoint import load_model
from compressor.pipelines.source import CalibrationConfig, calibrate

from compressor.checkpoint import empty_model
from compressor.presets import get_preset

world = distributed.init(torch.device("cpu"))
empty_model(get_preset("tiny"), torch.float32)  # the first model built loads ~75 MB of code, once a process
before = int(open("/proc/self/statm").read().split()[1]) * 4096
out = {{"rank": world.rank}}
if {layouts}:
    full = load_model({model!r})
    for frozen in (True, False):
        model = load_model({model!r}, world=world, frozen=frozen)
        local = {{n: p.to_local() if hasattr(p, "to_local") else p for n, p in model.named_parameters()}}
        out[f"local_{{frozen}}"] = sum(t.numel() for t in local.values())
        whole = {{n: full.get_parameter(n) for n in local}}
        out[f"rows_{{frozen}}"] = all(
            torch.equal(t, distributed.local_rows(whole[n], world) if t.shape != whole[n].shape else whole[n])
            for n, t in local.items()
        )
else:
    config = CalibrationConfig({model!r}, {data!r}, samples=4, seq_len=32, device="cpu")
    source = calibrate(config, world=world)
    out["increment"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if world.is_main:
        import os
        os.makedirs({out!r})
        source.importance.save({out!r})
open(f"{{sys.argv[1]}}/{{world.rank}}.json", "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The 4B preset's 52 blocks at an eighth of its widths, 98M parameters (392 MB in fp32; embeddings and
    head 7% of it: whole on each process, they bound what sharding saves), and tokens."""
    root = tmp_path_factory.mktemp("sharded")
    config = CONFIG
    torch.manual_seed(0)
    save_model(HybridLM(config), root / "model")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 8192, size=8 * 64).astype(np.int32))
    return root


def _run(script: Path, nproc: int) -> list[dict]:
    """Run the worker on `nproc` processes; each writes what it found to RESULTS/rank.json."""
    results = script.with_suffix("")
    results.mkdir()
    command = [sys.executable, str(script), str(results)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   *command[1:]]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _script(tmp_path, checkpoint, name, **fields) -> Path:
    root = str(Path(__file__).resolve().parents[1])
    text = WORKER.format(root=root, model=str(checkpoint / "model"), data=str(checkpoint / "tokens.npy"), **fields)
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


def test_each_process_holds_its_rows(checkpoint, tmp_path):
    model = HybridLM(CONFIG)
    params = model.num_parameters()
    root = params - sum(p.numel() for p in model.backbone.layers.parameters())
    workers = _run(_script(tmp_path, checkpoint, "layouts", layouts=True, out=""), nproc=2)
    assert len(workers) == 2 and all(w["rows_True"] and w["rows_False"] for w in workers)
    # frozen: blocks split, embeddings / norm_f / lm_head whole; trained: everything split (FSDP pads rows)
    assert abs(sum(w["local_True"] for w in workers) - (params + root)) < 0.001 * params
    assert abs(sum(w["local_False"] for w in workers) - params) < 0.001 * params


def test_sharded_importance_holds_about_half_and_equals_one_process(checkpoint, tmp_path):
    one = _run(_script(tmp_path, checkpoint, "one", layouts=False, out=str(tmp_path / "scores1")), nproc=1)[0]
    two = _run(_script(tmp_path, checkpoint, "two", layouts=False, out=str(tmp_path / "scores2")), nproc=2)
    # peak RSS from loading to the end, each process against the single one (measured: 0.6; the rest of the
    # way to 0.5 is the embeddings and head on each process and ~35 MB FSDP and gloo allocate on first use)
    for worker in two:
        assert worker["increment"] <= 0.65 * one["increment"], (worker["increment"], one["increment"])
    a, b = Importance.load(tmp_path / "scores1"), Importance.load(tmp_path / "scores2")
    pairs = [(a.hidden, b.hidden), (a.block_influence, b.block_influence)]
    pairs += [(a.mamba[i], b.mamba[i]) for i in a.mamba] + [(a.ffn[i], b.ffn[i]) for i in a.ffn]
    for x, y in pairs:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_share_pads_to_the_longest_share():
    world = distributed.World(rank=1, size=3)
    assert distributed.share(list("abcde"), world) == ["b", "e"]
    assert distributed.share(list("abcd"), world) == ["b", None]
    assert distributed.share([], world) == []
    rows = torch.arange(10).view(5, 2)
    assert [distributed.local_rows(rows, distributed.World(rank=r, size=3)).tolist() for r in range(3)] == [
        [[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]
    ]  # fmt: skip
    assert distributed.local_rows(torch.arange(1), distributed.World(rank=1, size=2)).numel() == 0
