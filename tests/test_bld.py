"""Blockwise local distillation (compressor/bld.py) and a search's library of trained block variants
(compressor/pipelines/library.py): variants reproduce their parent block, the library resumes after a
kill, its scores drive the solver, finalists start from the trained blocks and share one teacher pass."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from compressor.bld import BLDConfig, block_error, boundaries, train_streamed, train_variant, write_activations
from compressor.errors import OptionError
from compressor.importance import estimate
from compressor.model import HybridLM
from compressor.pipelines import search as search_pipeline
from compressor.pipelines.library import ENTRIES_FILE, Library, build_library
from compressor.pipelines.records import Candidate, Distilled
from compressor.pipelines.search import LIBRARY_DIR, SearchConfig, rank_correlation, run_search
from compressor.pipelines.source import calibrate
from compressor.presets import get_preset
from compressor.prune import pruned_block
from compressor.target import BlockTarget, Target
from tests.test_search import _budget, _calibration, _config


@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny")).eval()
    ids = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(1))
    return model, estimate(model, [ids[:8], ids[8:]]), ids


@pytest.fixture(scope="module")
def activations(parent, tmp_path_factory):
    model, _, ids = parent
    return write_activations(model, ids, tmp_path_factory.mktemp("bld") / "activations", batch_size=4)


def _spec(model, kind):
    return next(s for s in model.config.blocks if s.kind == kind)


def _target(model, spec, **widths):
    from compressor.config import OVERRIDABLE

    return BlockTarget(spec.index, spec.kind, **({n: getattr(spec, n) for n in OVERRIDABLE[spec.kind]} | widths))


def test_activations_are_the_residual_stream_at_every_block_boundary(parent, activations):
    model, _, ids = parent
    assert (activations.blocks, activations.sequences, activations.seq_len) == (model.config.num_blocks, 16, 32)
    everything = torch.arange(model.config.hidden_size)
    x, _ = next(activations.pairs(model.config.num_blocks - 1, everything, 16))
    hidden = model.backbone.embeddings(ids)
    for block in model.backbone.layers[:-1]:
        hidden = block(hidden)
    assert torch.allclose(x, hidden, atol=1e-6)
    _, last = next(activations.pairs(model.config.num_blocks - 1, everything, 16))
    assert torch.allclose(last, model.backbone.layers[-1](hidden), atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "mamba", "attention"])
def test_the_parent_block_itself_has_no_error_and_a_perturbed_copy_is_trained_back(parent, activations, kind):
    model, importance, _ = parent
    spec, hidden = _spec(model, kind), model.config.hidden_size
    channels = torch.arange(hidden)
    block = pruned_block(model, importance, _target(model, spec), hidden)
    assert block_error(block, activations, spec.index, channels, 8) < 1e-10
    with torch.no_grad():
        for parameter in block.mixer.parameters():
            parameter.add_(0.3 * parameter.std().nan_to_num(0.1) * torch.randn_like(parameter))
    result = train_variant(block, activations, spec.index, channels, BLDConfig(tokens=1, epochs=25, lr=3e-3))
    assert result.initial_error > 0.05
    assert result.error < result.initial_error / 5  # most of the way back to the parent


def test_a_pruned_variant_improves_on_its_initialisation(parent, activations):
    model, importance, _ = parent
    spec = _spec(model, "mlp")
    hidden = model.config.hidden_size * 3 // 4
    block = pruned_block(model, importance, _target(model, spec, intermediate_size=spec.intermediate_size // 2), hidden)
    channels = importance.keep_hidden(hidden)
    result = train_variant(block, activations, spec.index, channels, BLDConfig(tokens=1, epochs=4))
    assert 0 < result.error < result.initial_error
    assert block_error(block, activations, spec.index, channels, 8) == pytest.approx(result.error)  # the kept weights


def test_moe_variants_reproduce_the_parent_and_fewer_experts_train_towards_it(tmp_path):
    # an MoE block kept whole is its parent (the router in fp32 included); with half its routed experts and
    # narrower experts it starts worse and training brings it closer
    from tests.conftest import randomize_routers

    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny-moe")).eval()
    with torch.no_grad():
        randomize_routers(model)
    ids = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(1))
    importance = estimate(model, [ids[:8], ids[8:]])
    stored = write_activations(model, ids, tmp_path / "activations", batch_size=4)
    spec, hidden = _spec(model, "moe"), model.config.hidden_size
    channels = torch.arange(hidden)
    whole = pruned_block(model, importance, _target(model, spec), hidden)
    assert block_error(whole, stored, spec.index, channels, 8) < 1e-10
    narrow = _target(model, spec, n_routed_experts=4, moe_intermediate_size=16)
    block = pruned_block(model, importance, narrow, hidden)
    assert block.mixer.gate.weight.dtype == torch.float32 and block.mixer.gate.weight.shape[0] == 4
    result = train_variant(block, stored, spec.index, channels, BLDConfig(tokens=1, epochs=6, lr=3e-3))
    assert 0 < result.error < result.initial_error


def test_a_bf16_parent_stores_its_activations_in_bf16_and_they_read_back_exactly(parent, tmp_path):
    from safetensors import safe_open

    model, _, ids = parent
    half = HybridLM(model.config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    stored = write_activations(half, ids, tmp_path / "activations", batch_size=16)
    with safe_open(str(tmp_path / "activations" / "part-0.safetensors"), "pt") as handle:
        assert handle.get_tensor("h1").dtype == torch.bfloat16  # half the disk of fp32, nothing lost
    everything = torch.arange(model.config.hidden_size)
    x, y = next(stored.pairs(2, everything, 16))
    with torch.no_grad():
        states = list(boundaries(half, ids))
    assert x.dtype == torch.float32 and torch.equal(x, states[2].float()) and torch.equal(y, states[3].float())


def _variants(model, importance):
    """Three variants to train: a perturbed whole MLP block, a narrower MLP block at 3/4 of the hidden
    size and a perturbed Mamba block, each (block, parent index, kept channels)."""
    hidden = model.config.hidden_size
    out = []
    for kind, widths, size in (("mlp", {}, hidden), ("mlp", {"half": True}, hidden * 3 // 4), ("mamba", {}, hidden)):
        spec = _spec(model, kind)
        narrow = {"intermediate_size": spec.intermediate_size // 2} if widths else {}
        block = pruned_block(model, importance, _target(model, spec, **narrow), size)
        if size == hidden:
            torch.manual_seed(spec.index)
            with torch.no_grad():
                for parameter in block.mixer.parameters():
                    parameter.add_(0.3 * parameter.std().nan_to_num(0.1) * torch.randn_like(parameter))
        out.append((block, spec.index, importance.keep_hidden(size)))
    return out


def test_streamed_variants_train_from_the_parents_passes_alike_alone_or_together(parent, activations):
    # no stored activations: the same errors to start with as the stored path, trained more than half the
    # way back, and a variant's result does not depend on the others trained beside it
    model, importance, ids = parent
    config = BLDConfig(tokens=1, epochs=3, lr=3e-3, micro_batch_size=4)
    together = train_streamed(model, ids, _variants(model, importance), config)
    alone = [train_streamed(model, ids, [variant], config)[0] for variant in _variants(model, importance)]
    assert together == alone
    stored = [train_variant(b, activations, i, c, config) for b, i, c in _variants(model, importance)]
    for streamed, from_disk in zip(together, stored, strict=True):
        assert streamed.initial_error == pytest.approx(from_disk.initial_error, rel=1e-4)
        assert streamed.error < streamed.initial_error / 2 and streamed.steps == from_disk.steps
    whole = pruned_block(model, importance, _target(model, _spec(model, "mlp")), model.config.hidden_size)
    (result,) = train_streamed(model, ids, [(whole, _spec(model, "mlp").index, torch.arange(64))], config)
    assert result.initial_error < 1e-10  # the parent block itself


def test_bld_options_are_checked():
    with pytest.raises(OptionError, match="bld_epochs"):
        BLDConfig(tokens=1000, epochs=0)
    with pytest.raises(OptionError, match="bld_lr"):
        BLDConfig(tokens=1000, lr=float("nan"))


def _tables(source, workspace):
    config = _config(workspace)
    strategy = config.build_strategy()
    return strategy.servable_tables(source.model.config, source.importance, _budget(workspace))[1]


def test_library_resumes_after_a_kill_and_matches_an_uninterrupted_build(workspace, tmp_path):
    source = calibrate(_calibration(workspace))
    tables = _tables(source, workspace)
    config = BLDConfig(tokens=8 * 32, epochs=1)
    whole = build_library(source, tables, config, tmp_path / "whole", say=lambda t: None)
    assert len(whole.variants) >= 3
    assert not (tmp_path / "whole" / "activations").exists()  # deleted once every variant is trained

    def kill_after_two(text, seen=[]):  # noqa: B006
        if text.startswith("library "):
            seen.append(text)
            if len(seen) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_library(source, tables, config, tmp_path / "killed", say=kill_after_two)
    assert len(Library.read(tmp_path / "killed").variants) == 2
    with open(tmp_path / "killed" / ENTRIES_FILE, "a") as f:
        f.write('{"hidden": 96, "blo')  # a kill while an entry was appended
    trained = []
    resumed = build_library(source, tables, config, tmp_path / "killed", say=trained.append)
    assert len([t for t in trained if t.startswith("library ")]) == len(whole.variants) - 2
    assert set(resumed.variants) == set(whole.variants)
    for key, variant in whole.variants.items():
        assert resumed.variants[key].error == pytest.approx(variant.error, rel=1e-5)


def test_a_streamed_library_stores_nothing_resumes_by_round_and_rounds_change_nothing(workspace, tmp_path, monkeypatch):
    from compressor.pipelines import library as library_module

    source = calibrate(_calibration(workspace))
    tables = _tables(source, workspace)
    config = BLDConfig(tokens=8 * 32, epochs=1, stream=True)
    seen = []
    spy = library_module.write_activations
    monkeypatch.setattr(library_module, "write_activations", lambda *a, **k: seen.append(1) or spy(*a, **k))
    said = []
    one = build_library(source, tables, config, tmp_path / "one", say=said.append)
    assert not seen and not (tmp_path / "one" / "activations").exists()
    monkeypatch.setattr(library_module, "available_memory", lambda device: 1)  # a variant a round

    def kill_in_round_three(text):
        if text.startswith("library: round 3/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_library(source, tables, config, tmp_path / "many", say=kill_in_round_three)
    assert len(Library.read(tmp_path / "many").variants) == 2  # the finished rounds are kept
    many = build_library(source, tables, config, tmp_path / "many", say=lambda t: None)
    assert len(one.variants) >= 3 and set(one.variants) == set(many.variants)
    for key, variant in one.variants.items():
        assert (many.variants[key].initial_error, many.variants[key].error) == (variant.initial_error, variant.error)
    assert any(v.error < v.initial_error for v in one.variants.values())
    assert any(text.startswith(f"library {len(one.variants)}/") for text in said)


def test_a_streamed_round_killed_mid_pass_continues_from_its_last_save(workspace, tmp_path, monkeypatch):
    # saving after every micro-batch, a kill in the second pass (of 3 x 4 micro-batches): the resumed build
    # runs only the 6 micro-batches left and ends with the variants of an uninterrupted build, bit for bit
    from compressor import bld
    from compressor.pipelines import library as library_module

    source = calibrate(_calibration(workspace))
    tables = _tables(source, workspace)
    config = BLDConfig(tokens=8 * 32, epochs=1, micro_batch_size=2, stream=True)
    whole = build_library(source, tables, config, tmp_path / "whole", say=lambda t: None)
    passes, saves = [], []
    counted = bld.boundaries
    monkeypatch.setattr(bld, "boundaries", lambda *a: passes.append(1) or counted(*a))
    monkeypatch.setattr(library_module, "ROUND_SAVE_SECONDS", 0.0)
    save = library_module.RoundCheckpoint.save

    def killed_after_six(self, tensors, meta):
        save(self, tensors, meta)
        saves.append(meta["position"])
        if len(saves) == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(library_module.RoundCheckpoint, "save", killed_after_six)
    with pytest.raises(KeyboardInterrupt):
        build_library(source, tables, config, tmp_path / "killed", say=lambda t: None)
    assert saves[-1] == [1, 2] and (tmp_path / "killed" / "round" / "round.json").is_file()
    monkeypatch.setattr(library_module.RoundCheckpoint, "save", save)
    passes.clear()
    resumed = build_library(source, tables, config, tmp_path / "killed", say=lambda t: None)
    assert len(passes) == 6 and not (tmp_path / "killed" / "round").exists()
    assert set(resumed.variants) == set(whole.variants)
    for key, variant in whole.variants.items():
        again = resumed.variants[key]
        assert (again.initial_error, again.error, again.steps) == (variant.initial_error, variant.error, variant.steps)


def test_bld_search_assembles_finalists_from_trained_blocks_and_shares_one_teacher_pass(
    workspace, tmp_path, monkeypatch
):
    written = []
    real = search_pipeline.train.__globals__["write_teacher_cache"]
    monkeypatch.setitem(search_pipeline.train.__globals__, "write_teacher_cache",
                        lambda *a, **k: written.append(1) or real(*a, **k))  # fmt: skip
    source = calibrate(_calibration(workspace))
    base = _config(workspace, finalists=3)
    config = SearchConfig(
        base.budget, base.distill, base.strategy, base.options, finalists=3, bld=BLDConfig(tokens=8 * 32, epochs=1),
        share_teacher=True,
    )  # fmt: skip
    out = tmp_path / "s"
    record = run_search(source, config, out, say=lambda t: None)
    finalists = [c for c in record.candidates if c.finalist]
    assert len(finalists) == 3 and all(c.distilled is not None for c in finalists)
    assert written == [1]  # three finalists, one teacher pass
    assert record.share_teacher and record.seconds["teacher"] > 0 and not (out / "teacher_cache").exists()
    assert record.library["variants"] == len(Library.read(out / LIBRARY_DIR).variants) > 0
    assert set(record.correlation) == {"finalists", "after", "spearman", "kendall"}
    # a finalist starts from the library's trained blocks, not from plain pruning
    library = Library.read(out / LIBRARY_DIR)
    best = finalists[0]
    assembled = library.assemble(source.model, source.importance, best.target)
    from compressor.checkpoint import load_model
    from compressor.prune import prune

    written_model = load_model(out / "candidates" / str(best.index) / "pruned")
    plain = prune(source.model, source.importance, best.target)
    assert all(
        torch.equal(a, b)
        for a, b in zip(assembled.state_dict().values(), written_model.state_dict().values(), strict=True)
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), written_model.state_dict().values(), strict=True)
    )
    assert json.loads((out / "search.json").read_text())["bld"]["tokens"] == 8 * 32


def test_bld_needs_per_block_choices_and_an_additive_budget(workspace):
    base = _config(workspace)
    with pytest.raises(OptionError, match="bld"):
        SearchConfig(base.budget, base.distill, "minitron", {}, bld=BLDConfig(tokens=256))
    from compressor.budget import Budget, get_gpu

    throughput = Budget(context=512, gpu=get_gpu("a10g"), min_speedup=1.2)
    with pytest.raises(OptionError, match="bld"):
        SearchConfig(throughput, base.distill, bld=BLDConfig(tokens=256))


def test_rank_correlation():
    def finalist(score, kl):
        c = Candidate(Target(8, ()), "", "", 0, None, None, {}, score=score)
        c.distilled = Distilled(1.0, 1.0, kl, 0.5)
        return c

    perfect = rank_correlation([finalist(s, s / 10) for s in (1, 2, 3, 4)], "kl")
    assert perfect["spearman"] == pytest.approx(1) and perfect["kendall"] == pytest.approx(1)
    reversed_ = rank_correlation([finalist(s, -s) for s in (1, 2, 3)], "kl")
    assert reversed_["spearman"] == pytest.approx(-1) and reversed_["kendall"] == pytest.approx(-1)
    assert rank_correlation([finalist(1, 1), finalist(2, 2)], "kl") is None  # too few to say


def test_replacement_scores_resume_from_the_block_input_and_equal_whole_model_scores(workspace):
    from compressor.pipelines.library import _Replacements, _Skip
    from compressor.pipelines.ranking import proxy_scorer
    from compressor.prune import prune

    source = calibrate(_calibration(workspace))
    scorer = proxy_scorer(source, "kl")
    model = prune(source.model, source.importance, Target.uniform(source.model.config, hidden_size=96)).eval()
    replacing = _Replacements(scorer, model)
    assert replacing.score(0) == pytest.approx(scorer.score_model(model).value, rel=1e-5)
    without_2 = Target.uniform(source.model.config, hidden_size=96, drop_blocks=(2,))
    assert replacing.score(2, _Skip(2)) == pytest.approx(scorer(without_2).value, rel=1e-4)
    assert replacing.score(0) == pytest.approx(scorer.score_model(model).value, rel=1e-5)  # the block is put back


def test_compress_search_with_a_library_end_to_end(workspace, tmp_path):
    from typer.testing import CliRunner

    import cli

    out, memory = tmp_path / "s", f"{_budget(workspace).memory / 2**20:.4f}MiB"
    args = ["search", str(workspace / "model"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
            "--score-samples", "4", "--seq-len", "32", "--target-mem", memory, "--ctx", "512", "--candidates", "2",
            "--distill-tokens", "512", "--batch-size", "4", "--micro-batch-size", "2", "--ffn-fractions",
            "1,0.5", "--hidden-choices", "1", "--top-k", "4", "--bld", "256", "--bld-epochs", "1",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "library:" in result.output and "time: library" in result.output and "(streamed)" not in result.output
    record = json.loads((out / "search.json").read_text())
    assert record["bld"]["epochs"] == 1 and record["library"]["variants"] > 0
    assert not (tmp_path / ".s.library").exists()  # moved into the folder with the first record
    resumed = CliRunner().invoke(cli.app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    changed = CliRunner().invoke(cli.app, [*args[:-4], "--bld-epochs", "3", "--out", str(out), "--resume"])
    assert changed.exit_code != 0 and "--bld-epochs" in changed.output
    streamed = CliRunner().invoke(cli.app, [*args, "--bld-stream", "--resume"])
    assert streamed.exit_code != 0 and "--bld-stream" in streamed.output
    streamed = CliRunner().invoke(cli.app, [*args[:-1], str(tmp_path / "streamed"), "--bld-stream"])
    assert streamed.exit_code == 0, streamed.output
    assert "tokens (streamed)" in streamed.output and not (tmp_path / "streamed" / LIBRARY_DIR / "activations").exists()


@pytest.mark.parametrize("library", ["stored", "streamed"])
def test_two_processes_build_the_same_library_and_search_as_one(workspace, tmp_path, library):
    # under torchrun the source is sharded, the variants are shared out one per process a round, and the
    # main process writes: the same variants, scores, candidates and finalists as one process (a zero-shot
    # search's scoring and a finalist's distillation under torchrun: test_pruning, test_train). The two
    # processes are killed once their build has saved (a streamed round's checkpoint; a stored build's main
    # process dies as its second round starts, the first saved) and the next run continues it.
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    import cli

    memory = f"{_budget(workspace).memory / 2**20:.4f}MiB"
    args = ["search", str(workspace / "model"), "--data", str(workspace / "tokens.npy"), "--samples", "16",
            "--score-samples", "4", "--seq-len", "32", "--target-mem", memory, "--ctx", "512", "--candidates", "2",
            "--distill-tokens", "256", "--batch-size", "4", "--micro-batch-size", "1", "--ffn-fractions",
            "1,0.5", "--hidden-choices", "1", "--top-k", "4", "--device", "cpu", "--json", "--bld", "256",
            "--bld-epochs", "1"] + (["--bld-stream"] if library == "streamed" else [])  # fmt: skip
    records = {}
    environment = {**os.environ, "COMPRESSOR_BLD_SAVE_SECONDS": "0"}  # a streamed round saves every micro-batch
    saved = tmp_path / ".two.library" / ("round/round.json" if library == "streamed" else ENTRIES_FILE)
    for name, processes in (("one", 1), ("two", 2)):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        command = [*launch, cli.__file__, *args, "--out", str(tmp_path / name)]
        if name == "two" and library == "stored":  # the main process dies as the second round starts
            wrapper = tmp_path / "stop_at_the_second_round.py"
            wrapper.write_text(STOP_AT_THE_SECOND_ROUND.format(root=str(ROOT), cli=cli.__file__))
            killed = subprocess.run([*launch, str(wrapper), *command[len(launch) + 1 :]], env=environment,
                                    capture_output=True, text=True, timeout=600)  # fmt: skip
            assert killed.returncode != 0 and not (tmp_path / name).exists() and saved.exists(), killed.stderr[-3000:]
        elif name == "two":  # a kill (of torchrun and its processes) once the round has saved
            killed = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 300
            while not saved.exists() and killed.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            for pid in _process_tree(killed.pid):  # torchrun starts each process in a session of its own
                os.kill(pid, signal.SIGKILL)
            assert killed.wait(timeout=60) == -signal.SIGKILL and not (tmp_path / name).exists() and saved.exists()
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
        assert run.returncode == 0, run.stderr[-3000:]
        records[name] = json.loads((tmp_path / name / "search.json").read_text())
    # the killed build went on from its save: the streamed round from its checkpoint, the stored one without
    # the variants it had finished
    if library == "streamed":
        assert "library: the round continues from its last save" in run.stderr, run.stderr[-3000:]
    else:
        (trained,) = set(re.findall(r"library 1/(\d+):", run.stderr))
        assert 0 < int(trained) < records["one"]["library"]["variants"]
    one, two = records["one"], records["two"]
    assert [c["label"] for c in one["candidates"]] == [c["label"] for c in two["candidates"]]
    np.testing.assert_allclose([c["score"] for c in two["candidates"]], [c["score"] for c in one["candidates"]],
                               rtol=1e-4)  # fmt: skip
    distilled = [[c["distilled"]["val_kl"] for c in record["candidates"] if c["finalist"]] for record in (two, one)]
    np.testing.assert_allclose(*distilled, rtol=1e-3)
    assert one["library"]["variants"] == two["library"]["variants"] > 0
    libraries = [Library.read(tmp_path / name / LIBRARY_DIR) for name in ("one", "two")]
    assert libraries[0].variants.keys() == libraries[1].variants.keys()
    for key, variant in libraries[0].variants.items():
        assert libraries[1].variants[key].error == pytest.approx(variant.error, rel=1e-4)
    assert not (tmp_path / "two" / LIBRARY_DIR / "activations").exists()
    scores = [json.loads((tmp_path / name / LIBRARY_DIR / "scores.json").read_text()) for name in ("one", "two")]
    assert scores[0].keys() == scores[1].keys()
    for hidden, measured in scores[0].items():  # each block's input kept per process, the sums reduced
        np.testing.assert_allclose(scores[1][hidden]["base"], measured["base"], rtol=1e-4)
        for row, other in zip(measured["damage"], scores[1][hidden]["damage"], strict=True):
            np.testing.assert_allclose(other, row, rtol=1e-3, atol=1e-5)


ROOT = Path(__file__).resolve().parents[1]
# `compress` under torchrun whose main process dies as the library's second round starts: the first round's
# variants are saved (a kill at a known point; a kill from outside can come after the whole build on a busy
# machine, and then nothing is left to continue)
STOP_AT_THE_SECOND_ROUND = """
import os, runpy, sys
sys.path.insert(0, {root!r})
import compressor.pipelines.library as library

real, rounds = library._train, []

def stop_at_the_second_round(*args, **kwargs):
    rounds.append(1)
    if len(rounds) == 2 and os.environ["RANK"] == "0":
        os._exit(9)
    return real(*args, **kwargs)

library._train = stop_at_the_second_round
sys.argv[0] = {cli!r}
runpy.run_path({cli!r}, run_name="__main__")
"""


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc), parents first."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid] + [p for child in children for p in _process_tree(int(child))]


@pytest.mark.parametrize("preset, memory", [("12b-v2", "19.66GiB"), ("56b", "88.83GiB")])
def test_search_dry_run_plans_the_library_at_real_sizes(preset, memory):
    from typer.testing import CliRunner

    import cli

    args = ["search", preset, "--dry-run", "--target-mem", memory, "--ctx", "8k", "--gpu", "h100", "--seq-len",
            "8192", "--micro-batch-size", "1", "--top-k", "2", "--bld", "1M", "--json"]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    (library,) = [p for p in json.loads(result.output)["memory_plans"] if p["stage"].startswith("library")]
    source = get_preset(preset)
    assert library["terms"]["variant: weights, gradients, AdamW (fp32)"] > 0 and library["smallest_nproc"] >= 1
    stored = 1_000_000 * source.hidden_size * (source.num_blocks + 1) * 2  # every block boundary, bf16
    from compressor.budget import format_bytes

    assert format_bytes(stored) in library["notes"][0]
    if preset != "12b-v2":
        return
    streamed = CliRunner().invoke(cli.app, [*args, "--bld-stream"])
    (library,) = [p for p in json.loads(streamed.output)["memory_plans"] if p["stage"].startswith("library")]
    assert "no activations on disk" in library["notes"][0] and "5 passes of the source" in library["notes"][0]
    alone = CliRunner().invoke(cli.app, [a for a in args if a not in ("--bld", "1M")] + ["--bld-stream"])
    assert alone.exit_code != 0 and "--bld-stream applies with --bld TOKENS only" in alone.output
