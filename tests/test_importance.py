"""Importance estimation: hook statistics, group-aware rankings, drop-one scores, files, processes."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from compressor.checkpoint import fingerprint, save_model
from compressor.errors import CompressorError
from compressor.evaluate import evaluate
from compressor.importance import EstimateProgress, Importance, ImportanceOptions, estimate
from compressor.model import HybridLM
from compressor.presets import get_preset

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridLM(get_preset("tiny")).eval()


def _batches(count=4, batch=2, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (batch, length), generator=gen) for _ in range(count)]


def _captured(model, batches):
    """Every hooked activation, stored whole (what the estimator must never do), for reference."""
    store = {}
    handles = []
    for block in model.backbone.layers:
        i, mixer = block.index, block.mixer
        handles.append(
            block.norm.register_forward_hook(lambda m, a, o, k=f"norm{i}": store.setdefault(k, []).append(o))
        )
        if block.kind == "mamba":
            handles.append(
                mixer.in_proj.register_forward_hook(lambda m, a, o, k=f"m{i}": store.setdefault(k, []).append(o))
            )
        elif block.kind == "attention":
            handles.append(
                mixer.o_proj.register_forward_pre_hook(lambda m, a, k=f"a{i}": store.setdefault(k, []).append(a[0]))
            )
        else:
            handles.append(
                mixer.down_proj.register_forward_pre_hook(lambda m, a, k=f"f{i}": store.setdefault(k, []).append(a[0]))
            )
    handles.append(model.backbone.norm_f.register_forward_hook(lambda m, a, o: store.setdefault("normf", []).append(o)))
    with torch.no_grad():
        for ids in batches:
            model.backbone(ids)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def _minitron(acts):
    """mean |a| over the sequence, then L2 over samples."""
    return acts.abs().mean(1).square().sum(0).sqrt()


def test_statistics_equal_explicit_computation(model):
    batches = _batches()
    scores = estimate(model, batches)
    acts = _captured(model, batches)
    config = model.config
    hidden = sum(_minitron(acts[f"norm{i}"]) for i in range(config.num_blocks)) + _minitron(acts["normf"])
    torch.testing.assert_close(scores.hidden, hidden, rtol=1e-5, atol=1e-6)
    for i, spec in enumerate(config.blocks):
        if spec.kind == "mamba":
            inner = spec.mamba_intermediate
            x = acts[f"m{i}"][..., inner : 2 * inner]
            torch.testing.assert_close(
                scores.mamba[i], _minitron(x).view(spec.mamba_num_heads, -1), rtol=1e-5, atol=1e-6
            )
        elif spec.kind == "attention":
            torch.testing.assert_close(scores.attention[i], _minitron(acts[f"a{i}"]).view(spec.num_attention_heads, -1))
        else:
            torch.testing.assert_close(scores.ffn[i], _minitron(acts[f"f{i}"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seq_reduce, batch_reduce", [("max", "mean"), ("l2", "max"), ("mean", "mean")])
def test_other_aggregations(model, seq_reduce, batch_reduce):
    batches = _batches()
    scores = estimate(model, batches, ImportanceOptions(seq_reduce=seq_reduce, batch_reduce=batch_reduce))
    acts = _captured(model, batches)["f1"].abs()
    per_sample = {"max": acts.amax(1), "l2": acts.square().sum(1).sqrt(), "mean": acts.mean(1)}[seq_reduce]
    want = {"mean": per_sample.mean(0), "max": per_sample.amax(0)}[batch_reduce]
    torch.testing.assert_close(scores.ffn[1], want, rtol=1e-5, atol=1e-6)


def test_ssm_out_signal_reads_out_proj_input(model):
    batches = _batches(count=2)
    scores = estimate(model, batches, ImportanceOptions(mamba_signal="ssm_out"))
    store = []
    handle = model.backbone.layers[0].mixer.out_proj.register_forward_pre_hook(lambda m, a: store.append(a[0]))
    with torch.no_grad():
        for ids in batches:
            model.backbone(ids)
    handle.remove()
    torch.testing.assert_close(scores.mamba[0], _minitron(torch.cat(store)).view(8, 8), rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_batch_size(model):
    ids = torch.cat(_batches(count=1, batch=8))
    one = estimate(model, [ids[i : i + 1] for i in range(8)], ImportanceOptions(drop_one="kl"))
    four = estimate(model, [ids[:4], ids[4:]], ImportanceOptions(drop_one="kl"))
    for a, b in ((one.hidden, four.hidden), (one.ffn[1], four.ffn[1]), (one.mamba[0], four.mamba[0])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.block_influence, four.block_influence, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one.block_drop, four.block_drop, rtol=1e-4, atol=1e-7)


def _without_block(model, index):
    """The model with block `index` removed (weights of the others copied), built independently."""
    config = model.config
    pattern = config.pattern[:index] + config.pattern[index + 1 :]
    smaller = HybridLM(config.replace(hybrid_override_pattern=pattern)).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("backbone.layers."):
            parts = name.split(".")
            i = int(parts[2])
            if i == index:
                continue
            parts[2] = str(i - (i > index))
            name = ".".join(parts)
        state[name] = tensor
    smaller.load_state_dict(state)
    return smaller


@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_drop_one_scores_equal_removing_the_block(model, metric):
    batches = _batches(count=2)
    scores = estimate(model, batches, ImportanceOptions(drop_one=metric))
    for index in (0, 3, 8):
        result = evaluate(_without_block(model, index), batches, teacher=model)
        want = result.kl if metric == "kl" else result.loss
        assert scores.block_drop[index].item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_iterative_removal_order(model):
    batches = _batches(count=2)
    once = estimate(model, batches, ImportanceOptions(drop_one="kl"))
    rounds = estimate(model, batches, ImportanceOptions(drop_one="kl", iterative_rounds=3))
    assert len(rounds.removal_order) == 3 and len(set(rounds.removal_order)) == 3
    assert rounds.removal_order[0] == int(once.block_drop.argmin())
    ranked = rounds.block_scores("drop").argsort().tolist()
    assert ranked[:3] == rounds.removal_order


class _Killed(Exception):
    pass


def _tables(scores: Importance) -> dict[str, torch.Tensor]:
    tables = {"hidden": scores.hidden, "block_influence": scores.block_influence, "block_drop": scores.block_drop}
    for name in ("ffn", "mamba", "attention", "expert_routing", "expert_tokens", "expert_ffn", "shared_ffn"):
        tables.update({f"{name}.{i}": t for i, t in getattr(scores, name).items()})
    return tables


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_a_killed_estimate_resumes_to_the_same_scores(model, moe_model, which, tmp_path):
    """An estimate with `progress`, stopped after any batch (of the activation pass, of either drop-one round),
    continues from its file to the scores of an uninterrupted one, bit for bit; each kill counts again only
    the batch that was not saved."""
    net = model if which == "dense" else moe_model
    batches, options = _batches(count=5), ImportanceOptions(drop_one="kl", iterative_rounds=2)
    settings_ = {"model": which, "samples": 10}
    whole = estimate(net, batches, options)
    passes = 3  # the activation pass and two drop-one rounds, of 5 batches each
    for stop in (2, 5, 6, 9, 13):
        path = tmp_path / f"{which}-{stop}.safetensors"
        counted = []

        def stop_after(tokens, counted=counted, stop=stop):
            counted.append(tokens)
            if len(counted) == stop:
                raise _Killed

        with pytest.raises(_Killed):
            estimate(net, batches, options, on_batch=stop_after, progress=EstimateProgress(path, _world(), settings_))
        counted.clear()
        resumed = estimate(net, batches, options, on_batch=counted.append,
                           progress=EstimateProgress(path, _world(), settings_))  # fmt: skip
        assert resumed.removal_order == whole.removal_order
        for name, table in _tables(whole).items():
            assert torch.equal(_tables(resumed)[name], table), (stop, name)
        assert sum(counted) == passes * 5 * 48  # the progress caught up, then counted on
        assert len(counted) == 1 + passes * 5 - (stop - 1)  # the catch-up, then the batches not saved before
    with pytest.raises(CompressorError, match=r"other settings \(samples: 10 then, 12 now\): continue it with"):
        EstimateProgress(path, _world(), {**settings_, "samples": 12}).load()


def _world():
    from compressor import distributed

    return distributed.World(device=torch.device("cpu"))


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), per_group=st.integers(1, 6), seed=st.integers(0, 99), data=st.data())
def test_group_aware_rankings_keep_equal_counts(groups, per_group, seed, data):
    heads = groups * per_group
    gen = torch.Generator().manual_seed(seed)
    keep_per_group = data.draw(st.integers(1, per_group))
    scores = Importance(
        hidden=torch.rand(8, generator=gen),
        ffn={},
        mamba={0: torch.rand(heads, 4, generator=gen)},
        attention={1: torch.rand(heads, 4, generator=gen)},
        block_influence=torch.rand(2, generator=gen),
    )
    kept, channels = scores.keep_mamba(0, groups * keep_per_group, 2, groups)
    assert torch.equal(torch.bincount(kept // per_group, minlength=groups), torch.full((groups,), keep_per_group))
    assert len(channels) == 2 and torch.equal(channels, channels.sort().values)
    # within a group the kept heads are the best ones by their norm over the kept channels
    norms = scores.mamba[0][:, channels].norm(dim=1).view(groups, per_group)
    for g in range(groups):
        mine = kept[kept // per_group == g] - g * per_group
        assert norms[g, mine].min() >= norms[g].topk(keep_per_group).values.min()
    heads_kept, kv = scores.keep_attention(1, groups * keep_per_group, groups)
    assert torch.equal(torch.bincount(heads_kept // per_group, minlength=groups), torch.full((groups,), keep_per_group))
    if groups > 1:
        heads_kept, kv = scores.keep_attention(1, keep_per_group, groups, keep_kv=1)
        assert kv.tolist() == [int(scores.kv_group_scores(1, groups).argmax())]
        assert (heads_kept // per_group == kv[0]).all()


def test_save_load_and_fingerprint(model, tmp_path):
    save_model(model, tmp_path / "ckpt")
    scores = estimate(
        model, _batches(count=1), ImportanceOptions(drop_one="kl"), meta={"fingerprint": fingerprint(tmp_path / "ckpt")}
    )
    (tmp_path / "scores").mkdir()
    scores.save(tmp_path / "scores")
    loaded = Importance.load(tmp_path / "scores", fingerprint(tmp_path / "ckpt"))
    torch.testing.assert_close(loaded.mamba[0], scores.mamba[0])
    torch.testing.assert_close(loaded.block_drop, scores.block_drop)
    assert loaded.meta["options"]["drop_one"] == "kl"
    torch.manual_seed(5)
    save_model(HybridLM(model.config), tmp_path / "other")
    assert fingerprint(tmp_path / "other") != fingerprint(tmp_path / "ckpt")
    with pytest.raises(CompressorError, match="computed for another model"):
        Importance.load(tmp_path / "scores", fingerprint(tmp_path / "other"))
    with pytest.raises(CompressorError, match="not an importance folder"):
        Importance.load(tmp_path / "ckpt")


def test_options_are_checked():
    with pytest.raises(CompressorError, match="seq_reduce 'median'"):
        ImportanceOptions(seq_reduce="median")
    with pytest.raises(CompressorError, match="choose --drop-one kl, loss or retrieval"):
        ImportanceOptions(iterative_rounds=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("imp")
    save_model(model, root / "model")
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, 512, size=16 * 24).astype(np.int32))
    return root


def test_write_importance_on_two_processes_equals_one(checkpoint, tmp_path):
    from compressor.pipelines.importance import write_importance
    from compressor.pipelines.source import CalibrationConfig

    config = CalibrationConfig(str(checkpoint / "model"), str(checkpoint / "tokens.npy"), samples=8, seq_len=24,
                               batch_size=2, importance=ImportanceOptions(drop_one="kl"), device="cpu")  # fmt: skip
    progress = []
    record = write_importance(config, tmp_path / "one", on_tokens=lambda n, total: progress.append((n, total)))
    assert record.out == tmp_path / "one" and record.to_dict()["samples"] == 8
    assert sum(n for n, _ in progress) == progress[0][1] == 8 * 24 * 2  # scoring, then one drop-one pass
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import os, sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import compressor.importance as importance\n"
        "from compressor.importance import ImportanceOptions\n"
        "from compressor.pipelines.importance import write_importance\n"
        "from compressor.pipelines.source import CalibrationConfig\n"
        "saves, real = [], importance.save_tensors\n"
        "def save_then_die(*args, **kwargs):  # the first launch is killed after the main process's 2nd save\n"
        "    real(*args, **kwargs)\n"
        "    saves.append(1)\n"
        "    if len(saves) == 2 and sys.argv[1] == 'kill':\n"
        "        os._exit(9)\n"
        "importance.save_tensors = save_then_die\n"
        f"record = write_importance({config!r}, {str(tmp_path / 'two')!r}, resume=sys.argv[1] == 'resume')\n"
        "assert (record is None) == (int(os.environ['RANK']) > 0)\n"
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)]
    killed = subprocess.run([*launch, "kill"], capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and (tmp_path / ".two.incoming" / "progress.safetensors").is_file()
    two = subprocess.run([*launch, "resume"], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert not (tmp_path / ".two.incoming").exists()
    one, other = Importance.load(tmp_path / "one"), Importance.load(tmp_path / "two")
    for a, b in ((one.hidden, other.hidden), (one.mamba[0], other.mamba[0]), (one.attention[3], other.attention[3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.block_drop, other.block_drop, rtol=1e-4, atol=1e-7)
    assert one.meta["samples"] == 8 and one.meta["fingerprint"] == fingerprint(checkpoint / "model")
    with pytest.raises(CompressorError, match="already exists"):
        write_importance(config, tmp_path / "one")
    with pytest.raises(CompressorError, match="fewer than --samples 100"):
        write_importance(dataclasses.replace(config, samples=100), tmp_path / "x")
    assert not (tmp_path / "x").exists()


KILLED_IMPORTANCE = """
import os, sys
sys.path.insert(0, {root!r})
import compressor.importance as importance
from cli import app

saves, real = [], importance.save_tensors

def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    saves.append(1)
    if len(saves) == {kill_after}:
        os._exit(9)  # a kill: no cleanup, no finally

importance.save_tensors = save_then_die
app({args!r})
"""


def test_compress_importance_resumes_a_killed_estimate(checkpoint, tmp_path):
    """`compress importance` killed after its 10th save (of 24: in the first drop-one round) leaves its progress
    beside the output; the same command refuses to start over it, and with --resume it ends with the scores
    of an uninterrupted run, bit for bit, and leaves nothing beside the output."""
    args = ["importance", str(checkpoint / "model"), "--data", str(checkpoint / "tokens.npy"), "--samples", "16",
            "--seq-len", "24", "--batch-size", "2", "--drop-one", "kl", "--iterative-rounds", "2"]  # fmt: skip
    assert runner.invoke(cli.app, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    out = tmp_path / "killed"
    script = KILLED_IMPORTANCE.format(root=str(Path(__file__).resolve().parents[1]), kill_after=10,
                                      args=[*args, "--out", str(out)])  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not out.exists() and (tmp_path / ".killed.incoming" / "progress.safetensors").is_file()
    again = runner.invoke(cli.app, [*args, "--out", str(out)])
    assert again.exit_code == 1 and "was stopped before its end" in again.output and "--resume" in again.output
    resumed = runner.invoke(cli.app, [*args, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"continuing the estimate of {out} from its last save (drop-one round 1 after 2 batches)" in resumed.output
    whole, done = Importance.load(tmp_path / "whole"), Importance.load(out)
    assert done.removal_order == whole.removal_order
    assert all(torch.equal(_tables(done)[name], table) for name, table in _tables(whole).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "whole"]
    nothing = runner.invoke(cli.app, [*args, "--out", str(tmp_path / "new"), "--resume"])
    assert nothing.exit_code == 1 and "nothing to resume" in nothing.output


# ----- MoE blocks ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_model():
    from tests.conftest import randomize_routers

    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny-moe").replace(n_group=2, topk_group=2)).eval()
    randomize_routers(model)
    return model


def _captured_moe(model, batches):
    """Per MoE block: router outputs, expert outputs and down_proj inputs, per forward pass."""
    stores, handles = {}, []
    for block in model.backbone.layers:
        if block.kind != "moe":
            continue
        mixer, store = block.mixer, stores.setdefault(block.index, {"route": [], "out": {}, "ffn": {}, "shared": []})
        handles.append(mixer.gate.register_forward_hook(lambda m, a, o, s=store: s["route"].append(o)))
        handles.append(
            mixer.shared_experts.down_proj.register_forward_pre_hook(lambda m, a, s=store: s["shared"].append(a[0]))
        )
        for e, expert in enumerate(mixer.experts):
            handles.append(
                expert.register_forward_hook(lambda m, a, o, s=store, e=e: s["out"].setdefault(e, []).append(o))
            )
            handles.append(
                expert.down_proj.register_forward_pre_hook(
                    lambda m, a, s=store, e=e: s["ffn"].setdefault(e, []).append(a[0])
                )
            )
    with torch.no_grad():
        for ids in batches:
            model.backbone(ids)
    for h in handles:
        h.remove()
    return stores


def test_moe_statistics_equal_explicit_computation(moe_model):
    batches = _batches(count=3)
    scores = estimate(moe_model, batches)
    for index, store in _captured_moe(moe_model, batches).items():
        weights = torch.cat([w for w, _ in store["route"]])
        experts = torch.cat([e for _, e in store["route"]])
        mixer = moe_model.backbone.layers[index].mixer
        for e in range(len(mixer.experts)):
            routed = experts == e
            assert scores.expert_routing[index][e].item() == pytest.approx(weights[routed].sum().item(), rel=1e-5)
            assert scores.expert_tokens[index][e].item() == routed.sum().item()
            outputs = torch.cat(store["out"].get(e, [torch.zeros(0, 64)]))
            norm = outputs.norm(dim=-1).sum() / max(len(outputs), 1)
            assert scores.expert_norm[index][e].item() == pytest.approx(norm.item(), rel=1e-5, abs=1e-7)
            # each forward pass's routed tokens form one sample: mean |a| over them, then L2 over passes
            passes = [a for a in store["ffn"].get(e, []) if len(a)]  # an expert no token chose runs on none
            want = torch.stack([a.abs().mean(0) for a in passes]).square().sum(0).sqrt() if passes else 0
            torch.testing.assert_close(scores.expert_ffn[index][e], want + torch.zeros(32), rtol=1e-5, atol=1e-6)
        assert scores.expert_routing[index].sum().item() == pytest.approx(weights.sum().item(), rel=1e-5)
        assert scores.expert_ffn[index].shape == (8, 32)
        torch.testing.assert_close(
            scores.shared_ffn[index], _minitron(torch.cat(store["shared"])), rtol=1e-5, atol=1e-6
        )
    # the top-k weights are normalised and scaled: every token hands out routed_scaling_factor in all
    tokens = sum(ids.numel() for ids in batches)
    assert scores.expert_routing[1].sum().item() == pytest.approx(2.5 * tokens, rel=1e-5)
    assert scores.expert_tokens[1].sum().item() == 2 * tokens


def test_moe_blocks_have_influence_and_drop_one_scores(moe_model):
    batches = _batches(count=2)
    scores = estimate(moe_model, batches, ImportanceOptions(drop_one="kl"))
    assert scores.block_influence.shape == (8,) and (scores.block_influence[[1, 4, 7]] > 0).all()
    for index in (1, 7):
        result = evaluate(_without_block(moe_model, index), batches, teacher=moe_model)
        assert scores.block_drop[index].item() == pytest.approx(result.kl, rel=1e-4, abs=1e-6)


def test_moe_rankings_and_files(moe_model, tmp_path):
    scores = estimate(moe_model, _batches(count=2))
    # experts are kept per routing group (n_group 2: experts 0-3 and 4-7), the same number in each
    kept = scores.keep_experts(1, 4, n_group=2)
    assert torch.equal(torch.bincount(kept // 4, minlength=2), torch.tensor([2, 2]))
    routing = scores.expert_routing[1]
    for group in (0, 1):
        mine = kept[kept // 4 == group]
        assert routing[mine].min() >= routing[group * 4 : group * 4 + 4].topk(2).values.min()
    by_norm = scores.keep_experts(1, 2, method="norm")
    assert set(by_norm.tolist()) == set(scores.expert_norm[1].topk(2).indices.tolist())
    assert torch.equal(scores.keep_expert_ffn(1, 3, 5), scores.expert_ffn[1][3].topk(5).indices.sort().values)
    assert torch.equal(scores.keep_shared_ffn(4, 7), scores.shared_ffn[4].topk(7).indices.sort().values)
    with pytest.raises(CompressorError, match="must be a multiple of n_group"):
        scores.keep_experts(1, 3, n_group=2)
    with pytest.raises(CompressorError, match="expert score 'mass' is not one of routing, norm"):
        scores.expert_scores(1, "mass")
    scores.save(tmp_path)
    loaded = Importance.load(tmp_path)
    for name in ("expert_routing", "expert_tokens", "expert_norm", "expert_ffn", "shared_ffn"):
        table = getattr(loaded, name)
        assert set(table) == {1, 4, 7}
        for index, tensor in table.items():
            torch.testing.assert_close(tensor, getattr(scores, name)[index])
    # scores of a dense model say so when asked about experts
    dense = Importance(hidden=scores.hidden, ffn={}, mamba={}, attention={}, block_influence=scores.block_influence)
    with pytest.raises(CompressorError, match="no MoE statistics for block 1"):
        dense.keep_experts(1, 4)


@pytest.mark.parametrize("batch_reduce", ["l2", "mean", "max"])
def test_an_expert_no_token_chooses_scores_zero(moe_model, batch_reduce):
    model = HybridLM(moe_model.config).eval()
    model.load_state_dict(moe_model.state_dict())
    with torch.no_grad():
        model.backbone.layers[1].mixer.gate.e_score_correction_bias[5] = -100.0  # never among the top k
    scores = estimate(model, _batches(count=2), ImportanceOptions(batch_reduce=batch_reduce))
    assert scores.expert_tokens[1][5] == 0 and scores.expert_routing[1][5] == 0 and scores.expert_norm[1][5] == 0
    assert torch.equal(scores.expert_ffn[1][5], torch.zeros(32))
    assert torch.isfinite(scores.expert_ffn[1]).all() and (scores.expert_ffn[1].sum(1) > 0).sum() == 7
    assert 5 not in scores.keep_experts(1, 4, n_group=2).tolist()


def test_drop_one_retrieval_marks_the_blocks_that_retrieve():
    from compressor.tasks import RetrievalConfig
    from tests.test_tasks import V, retrieval_probe, retrieving_model

    model, probe = retrieving_model(), retrieval_probe()
    ids = torch.randint(12, V, (2, 48), generator=torch.Generator().manual_seed(0))
    scores = estimate(model, [ids], ImportanceOptions(drop_one="retrieval"), retrieval=probe)
    expected = [probe(model) - probe(model, skip_blocks={i}) for i in range(3)]
    assert scores.block_drop.tolist() == pytest.approx(expected, abs=1e-4)
    assert scores.block_drop[0] > 4 and scores.block_drop[1] > 4 and abs(scores.block_drop[2]) < 0.1
    rounds = estimate(model, [ids], ImportanceOptions(drop_one="retrieval", iterative_rounds=2), retrieval=probe)
    assert rounds.removal_order[0] == 2  # the MLP goes first: it carries no retrieval
    with pytest.raises(CompressorError, match="retrieval needs a retrieval task"):
        estimate(model, [ids], ImportanceOptions(drop_one="retrieval"))
    assert RetrievalConfig().context == 1024


def test_cli_importance_drop_one_retrieval(tmp_path):
    args = ["importance", "examples/model", "--data", "examples/data/sample.txt", "--samples", "2", "--seq-len", "64",
            "--drop-one", "retrieval", "--retrieval-ctx", "256", "--retrieval-sequences", "1"]  # fmt: skip
    result = runner.invoke(cli.app, [*args, "--out", str(tmp_path / "scores"), "--json"])
    assert result.exit_code == 0, result.output
    scores = Importance.load(tmp_path / "scores")
    assert scores.block_drop is not None and torch.isfinite(scores.block_drop).all()
    assert scores.meta["retrieval"] == {"task": "phonebook", "context": 256, "sequences": 1, "seed": 0}
    two_contexts = [value if value != "256" else "1k,2k" for value in args]
    result = runner.invoke(cli.app, [*two_contexts, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--retrieval-ctx takes one context length" in result.output
