"""The training / distillation recipe: schedules, exact resume, accumulation, processes, errors."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from compressor.checkpoint import load_model, save_model
from compressor.errors import CompressorError, OptionError
from compressor.model import HybridLM
from compressor.presets import get_preset
from compressor.train import SilentReporter, TrainConfig, TrainingError, lr_at, train
from tests.conftest import (
    TRAIN_VOCAB,
    distill_in_one_and_two_processes,
    train_config,
    train_records,
    write_cyclic_tokens,
)

runner = CliRunner()
VOCAB = TRAIN_VOCAB
_config, _records = train_config, train_records


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny teacher/student pair and token data with structure a model can learn."""
    root = tmp_path_factory.mktemp("train")
    write_cyclic_tokens(root / "tokens.npy")
    config = get_preset("tiny").replace(vocab_size=VOCAB)
    torch.manual_seed(0)
    save_model(HybridLM(config), root / "student")
    torch.manual_seed(1)
    save_model(HybridLM(config.replace(hidden_size=96)), root / "teacher")
    return root


def _weights(path):
    return {k: v.clone() for k, v in load_model(path).state_dict().items()}


def test_lr_schedules():
    config = TrainConfig(student="s", out="o", data="d", lr=1.0, min_lr=0.1, warmup_steps=10)
    cosine = [lr_at(s, 100, config) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cosine[9:], cosine[10:], strict=False))
    config.schedule = "wsd"
    wsd = [lr_at(s, 100, config) for s in range(100)]
    assert wsd[50] == 1.0 and wsd[79] == 1.0 and wsd[-1] == pytest.approx(0.1) and wsd[90] < 1.0
    config.schedule = "constant"
    assert lr_at(99, 100, config) == 1.0


def test_the_final_learning_rate_defaults_to_a_tenth_of_the_peak():
    config = TrainConfig(student="s", out="o", data="d", lr=5e-6, warmup_steps=1)
    config.validate()  # a fixed default final rate above a small --lr was refused
    assert lr_at(99, 100, config) == pytest.approx(5e-7)
    config.schedule = "constant"
    config.validate()
    config.min_lr = 1e-7  # written, it would do nothing
    with pytest.raises(OptionError, match="applies with --schedule cosine or wsd only"):
        config.validate()


def test_distillation_lowers_validation_loss_and_kl(workspace, tmp_path):
    result = train(_config(workspace, tmp_path / "run", teacher=str(workspace / "teacher"), steps=12, eval_every=6))
    evals = _records(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert evals[-1]["val_kl"] < evals[0]["val_kl"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result.final_eval["step"] == 12
    # the checkpoint is a standard one that compress eval (and transformers) load
    model = load_model(tmp_path / "run" / "model")
    assert model.config.vocab_size == VOCAB


def test_a_run_says_what_it_reads_first(workspace, tmp_path):
    notes = []
    reporter = SilentReporter()
    reporter.note = notes.append
    train(_config(workspace, tmp_path / "run", steps=1, warmup_steps=1, eval_sequences=4), reporter)
    said = r"data: \d+ training and 4 validation sequences of 32 tokens; steps: 1 of 256 tokens each"
    assert re.fullmatch(said, notes[0]), notes


def test_interrupted_run_resumes_exactly(workspace, tmp_path):
    train(_config(workspace, tmp_path / "whole"))

    class Interrupt:
        def start(self, *args):
            pass

        def step(self, record):
            if record["step"] == 5:  # after the checkpoint of step 4
                raise KeyboardInterrupt

        def evaluated(self, record):
            pass

        def note(self, text):
            pass

    with pytest.raises(KeyboardInterrupt):
        train(_config(workspace, tmp_path / "split"), Interrupt())
    state = json.loads((tmp_path / "split" / "model" / "trainer" / "trainer_state.json").read_text())
    assert state["step"] == 4
    # engines read every *.safetensors of a checkpoint folder as weights: only the model's are there
    assert [p.name for p in (tmp_path / "split" / "model").glob("*.safetensors")] == ["model.safetensors"]
    shutil.copytree(tmp_path / "split", tmp_path / "earlier")  # a run written before trainer/ existed
    for name in ("trainer_state.json", "optimizer.safetensors"):
        (tmp_path / "earlier" / "model" / "trainer" / name).rename(tmp_path / "earlier" / "model" / name)
    (tmp_path / "earlier" / "model" / "trainer").rmdir()
    for run in ("split", "earlier"):
        train(_config(workspace, tmp_path / run, resume=True))
        whole, split = _records(tmp_path / "whole"), _records(tmp_path / run)
        assert [r["step"] for r in split] == list(range(1, 9))
        assert [r["loss"] for r in split] == [r["loss"] for r in whole]
        for name, tensor in _weights(tmp_path / "whole" / "model").items():
            assert torch.equal(tensor, _weights(tmp_path / run / "model")[name]), name


def test_gradient_accumulation_equals_one_large_batch(workspace, tmp_path):
    train(_config(workspace, tmp_path / "big", micro_batch_size=8, teacher=str(workspace / "teacher"), steps=4))
    train(_config(workspace, tmp_path / "acc", micro_batch_size=2, teacher=str(workspace / "teacher"), steps=4))
    big, acc = _records(tmp_path / "big"), _records(tmp_path / "acc")
    np.testing.assert_allclose([r["loss"] for r in acc], [r["loss"] for r in big], rtol=1e-5)
    a, b = _weights(tmp_path / "big" / "model"), _weights(tmp_path / "acc" / "model")
    for name in a:  # Adam normalises tiny float differences of near-zero gradients into lr-sized steps
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=5e-5)


def test_two_processes_equal_one(workspace, tmp_path):
    args = [
        "distill", str(workspace / "teacher"), str(workspace / "student"), "--data", str(workspace / "tokens.npy"),
        "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "2", "--steps", "4", "--lr", "3e-3",
        "--eval-every", "2", "--eval-sequences", "8", "--save-every", "4", "--valid-fraction", "0.1", "--quiet",
        "--log-every", "1", "--device", "cpu",
    ]  # fmt: skip
    distill_in_one_and_two_processes(args, tmp_path / "one", tmp_path / "two")
    for kind, key in (("train", "loss"), ("eval", "val_loss"), ("eval", "val_kl")):
        got = [r[key] for r in _records(tmp_path / "two", kind)]
        want = [r[key] for r in _records(tmp_path / "one", kind)]
        np.testing.assert_allclose(got, want, rtol=1e-4)
    a, b = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)


def test_cached_teacher_matches_the_teacher_in_memory(workspace, tmp_path):
    online = _config(workspace, tmp_path / "online", teacher=str(workspace / "teacher"), steps=4)
    cached = _config(workspace, tmp_path / "cached", teacher=str(workspace / "teacher"), steps=4)
    cached.cache_teacher, cached.cache_targets, cached.top_k = True, "top-k", VOCAB
    train(online)
    train(cached)
    assert (tmp_path / "cached" / "teacher_cache" / "teacher_cache.json").is_file()
    np.testing.assert_allclose(
        [r["loss"] for r in _records(tmp_path / "cached")],
        [r["loss"] for r in _records(tmp_path / "online")],
        rtol=2e-3,
    )
    # a smaller top-k is a lower bound of the full divergence at the first evaluation
    small = _config(workspace, tmp_path / "small", teacher=str(workspace / "teacher"), steps=1, warmup_steps=1)
    small.cache_teacher, small.cache_targets, small.top_k = True, "top-k", 4
    train(small)
    assert _records(tmp_path / "small", "eval")[0]["val_kl"] <= _records(tmp_path / "online", "eval")[0]["val_kl"]


def test_sampled_targets_estimate_the_full_divergence(workspace, tmp_path):
    # random-sampling KD (the default --cache-teacher targets): the first evaluation's KL, of the same
    # student, is an unbiased estimate of the exact one (the loss and its gradient: test_losses)
    online = _config(workspace, tmp_path / "online", teacher=str(workspace / "teacher"), steps=1, warmup_steps=1)
    sampled = _config(workspace, tmp_path / "sampled", teacher=str(workspace / "teacher"), steps=1, warmup_steps=1)
    sampled.cache_teacher, sampled.top_k = True, 512
    train(online)
    train(sampled)
    assert sampled.teacher_targets == "sampled"
    exact, estimate = (_records(tmp_path / name, "eval")[0]["val_kl"] for name in ("online", "sampled"))
    assert estimate == pytest.approx(exact, rel=0.05)


def test_runs_share_a_teacher_cache_folder_that_holds_their_teachers_targets_for_their_data(workspace, tmp_path):
    """--teacher-cache: the first run writes the cache, a second reads it (the same training as from a cache of
    its own); a run with other sequences, a folder of other files and a folder in an input are refused."""
    shared = tmp_path / "shared"

    def run(name, cache, steps=2, notes=None, **changes):  # (result, weights, notes) of a cached run
        notes = [] if notes is None else notes
        reporter = SilentReporter()
        reporter.note = notes.append
        config = _config(workspace, tmp_path / name, teacher=str(workspace / "teacher"), steps=steps,
                         cache_teacher=True, top_k=8, teacher_cache_dir=cache and str(cache), **changes)  # fmt: skip
        return train(config, reporter), _weights(tmp_path / name / "model"), notes

    runs = {name: run(name, cache) for name, cache in (("first", shared), ("second", shared), ("own", None))}
    assert any(n.startswith("caching") for n in runs["first"][2])
    assert not any(n.startswith("caching") for n in runs["second"][2]) and runs["second"][0].teacher_seconds == 0
    assert all(torch.equal(runs["second"][1][k], runs["own"][1][k]) for k in runs["own"][1])
    assert not (tmp_path / "first" / "teacher_cache").exists() and (shared / "teacher_cache.json").is_file()
    # a longer run adds the sequences it lacks to the shared cache, and trains as from a cache of its own
    runs |= {name: run(name, cache, steps=4) for name, cache in (("longer", shared), ("own-longer", None))}
    added = [n for n in runs["longer"][2] if n.startswith("adding")]
    assert added == [f"adding the teacher's targets of 16 train sequences to the cache in {shared}"], runs["longer"][2]
    assert all(torch.equal(runs["longer"][1][k], runs["own-longer"][1][k]) for k in runs["own-longer"][1])
    assert sorted(p.name for p in shared.glob("train-e1-*")) == ["train-e1-r0-p0.safetensors"]
    # a kill in the middle of that swap (the larger cache aside, not yet in place): the next run puts it there
    shared.rename(tmp_path / ".shared.new-0000abcd")
    result, weights, notes = run("after-kill", shared, steps=4)
    assert result.teacher_seconds == 0 and shared.is_dir()
    assert not any(n.startswith(("caching", "adding")) for n in notes), notes
    assert all(torch.equal(weights[k], runs["own-longer"][1][k]) for k in weights)
    notes = []
    with pytest.raises(CompressorError, match="was written for other train sequences"):
        run("other", shared, notes=notes, seq_len=16)
    assert notes == []  # the refusal is the run's one line
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("kept\n")
    for folder, message in ((tmp_path / "notes", "holds files that are not a teacher cache"),
                            (workspace / "teacher" / "cache", "lies inside the input")):  # fmt: skip
        config = _config(workspace, tmp_path / "refused", teacher=str(workspace / "teacher"), steps=2,
                         cache_teacher=True, teacher_cache_dir=str(folder))  # fmt: skip
        with pytest.raises(CompressorError, match=message):
            train(config)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "kept\n" and not (workspace / "teacher" / "cache").exists()


def test_validation_is_the_evaluation_loop_on_the_validation_batches(workspace, tmp_path):
    """Training's validation numbers are `compressor.evaluate.evaluate`'s on the run's validation micro-batches
    (the same numbers, not close ones), with the teacher in memory and from its cache."""
    from compressor.data import read_sequences
    from compressor.evaluate import CachedBatch, evaluate
    from compressor.teacher_cache import TeacherCache

    teacher = load_model(workspace / "teacher")
    for cached in (False, True):
        out = tmp_path / ("cached" if cached else "online")
        top_k = 8 if cached else TrainConfig.top_k  # the cache's; without one, left at its default
        config = _config(workspace, out, teacher=str(workspace / "teacher"), steps=2, eval_every=2,
                         cache_teacher=cached, top_k=top_k)  # fmt: skip
        final = train(config).final_eval
        student = load_model(out / "model")
        sequences = read_sequences(config.data_spec, config.student, eos_id=None, vocab_size=VOCAB)
        _, valid = sequences.split(config.valid_fraction, config.seed)
        micro = config.micro_batch_size
        valid = valid.head(min(len(valid), config.eval_sequences) // micro * micro)
        positions = list(valid.batch_indices(micro, shuffle=False, drop_last=False))
        if cached:
            cache = TeacherCache(out / "teacher_cache", config.top_k, config.loss.temperature,
                                 config.teacher_targets, config.seed)  # fmt: skip
            batches = [CachedBatch(valid.take(p), cache.get("valid", p, torch.device("cpu"))) for p in positions]
            result = evaluate(student, batches)
            assert "teacher_val_loss" not in final and result.teacher_loss is None
        else:
            result = evaluate(student, [valid.take(p) for p in positions], teacher=teacher)
            assert final["teacher_val_loss"] == result.teacher_loss
        assert (final["val_loss"], final["val_ppl"]) == (result.loss, result.perplexity)
        assert (final["val_kl"], final["val_top1_agreement"]) == (result.kl, result.top1_agreement)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(workspace, tmp_path, monkeypatch):
    import compressor.train as recipe

    real = recipe.head_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        # steps 1-3 (2 micro-batches each) are fine (validation computes its loss in compressor.evaluate)
        return loss * math.nan if calls["n"] > 6 else loss

    monkeypatch.setattr(recipe, "head_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4 \(the checkpoint of step 2 is in"):
        train(_config(workspace, tmp_path / "run", eval_every=100))
    assert json.loads((tmp_path / "run" / "model" / "trainer" / "trainer_state.json").read_text())["step"] == 2


def test_errors(workspace, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(CompressorError, match="already exists.*--overwrite"):
        train(_config(workspace, tmp_path / "exists"))
    with pytest.raises(CompressorError, match="no config.json"):
        train(_config(workspace, tmp_path / "a", teacher=str(tmp_path / "missing")))
    torch.manual_seed(0)
    save_model(HybridLM(get_preset("tiny").replace(vocab_size=VOCAB + 8)), tmp_path / "padded")
    with pytest.raises(CompressorError, match=r"teacher vocabulary \(72\) differs from the model's \(64\)"):
        train(_config(workspace, tmp_path / "b", teacher=str(tmp_path / "padded")))
    np.save(tmp_path / "empty.npy", np.zeros(0, dtype=np.int32))
    with pytest.raises(CompressorError, match="empty|no sequences|shorter"):
        train(_config(workspace, tmp_path / "c", data=str(tmp_path / "empty.npy")))
    with pytest.raises(CompressorError, match="seq_len|longer|fewer"):
        train(_config(workspace, tmp_path / "d", seq_len=100_000))
    with pytest.raises(CompressorError, match="nothing to resume"):
        train(_config(workspace, tmp_path / "e", resume=True))
    train(_config(workspace, tmp_path / "f", steps=2))
    with pytest.raises(TrainingError, match=r"--resume with different options: lr \(0.003 in the run, 0.1 now\)"):
        train(_config(workspace, tmp_path / "f", steps=2, lr=0.1, resume=True))
    assert not any(p.name in "abcde" for p in tmp_path.iterdir())  # nothing half-written


def test_cli_train_and_dry_run(workspace, tmp_path):
    common = ["--data", str(workspace / "tokens.npy"), "--seq-len", "32", "--batch-size", "8", "--quiet"]
    common += ["--device", "cpu"]  # the dry run reports for CPU, also on a GPU machine
    result = runner.invoke(
        cli.app, ["train", str(workspace / "student"), *common, "--out", str(tmp_path / "r"), "--tokens", "512"]
    )
    assert result.exit_code == 0, result.output
    assert _records(tmp_path / "r")[-1]["step"] == 2  # 512 tokens / (8 x 32) per step
    (line,) = result.output.splitlines()  # --quiet: the final line only
    assert line.startswith("done: 2 steps, 512 tokens; checkpoint in") and "val loss" in line
    result = runner.invoke(
        cli.app,
        [
            "distill",
            str(workspace / "teacher"),
            str(workspace / "student"),
            *common,
            "--out",
            str(tmp_path / "d"),
            "--dry-run",
        ],
    )
    assert result.exit_code == 0 and "teacher weights" in result.output and "fits on cpu" in result.output
    assert not (tmp_path / "d").exists()
    result = runner.invoke(cli.app, ["train", str(workspace / "student"), *common, "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "already exists" in result.output and "Traceback" not in result.output
    # a dry run checks its output folder as the run would: a finished run is continued with --resume only
    dry_run = ["train", str(workspace / "student"), *common, "--out", str(tmp_path / "r"), "--tokens", "512"]
    dry_run.append("--dry-run")
    result = runner.invoke(cli.app, dry_run)
    assert result.exit_code == 1 and "holds a run with a checkpoint: continue it with --resume" in result.output
    result = runner.invoke(cli.app, [*dry_run, "--resume"])
    assert result.exit_code == 0 and "fits on cpu" in result.output
    result = runner.invoke(cli.app, [*dry_run, "--resume", "--lr", "0.5"])
    assert result.exit_code == 1 and "--resume with different options: lr" in result.output
    result = runner.invoke(
        cli.app, ["train", str(workspace / "student"), *common, "--out", str(tmp_path / "q"), "--tokens", "2X"]
    )
    assert result.exit_code == 1 and "token count" in result.output


def test_distilling_a_moe_teacher_into_a_pruned_moe_student(workspace, tmp_path):
    from compressor.evaluate import evaluate
    from compressor.importance import estimate
    from compressor.prune import prune
    from compressor.target import Target
    from tests.conftest import randomize_routers

    torch.manual_seed(2)
    teacher = HybridLM(get_preset("tiny-moe").replace(vocab_size=VOCAB)).eval()
    randomize_routers(teacher)
    save_model(teacher, tmp_path / "teacher")
    tokens = torch.from_numpy(np.load(workspace / "tokens.npy")[: 8 * 32].astype(np.int64)).view(8, 32)
    scores = estimate(teacher, tokens.split(4))
    target = Target.uniform(teacher.config, hidden_size=48, n_routed_experts=4, moe_intermediate_size=16)
    save_model(prune(teacher, scores, target), tmp_path / "student")
    config = _config(workspace, tmp_path / "run", student=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"))
    config.steps, config.eval_every = 6, 6
    result = train(config)
    evals = _records(tmp_path / "run", "eval")
    assert result.steps == 6 and evals[-1]["val_kl"] < evals[0]["val_kl"]
    before, after = load_model(tmp_path / "student"), load_model(tmp_path / "run" / "model")
    assert after.config.n_routed_experts == 4 and after.config.hidden_size == 48
    gate_before, gate_after = before.backbone.layers[1].mixer.gate, after.backbone.layers[1].mixer.gate
    assert not torch.equal(gate_before.weight, gate_after.weight)  # the router learns from the KD loss alone
    assert torch.equal(gate_before.e_score_correction_bias, gate_after.e_score_correction_bias)  # a buffer
    # evaluation runs unchanged on the MoE student against its MoE teacher
    metrics = evaluate(after, tokens.split(4), teacher=load_model(tmp_path / "teacher"))
    assert np.isfinite(metrics.kl) and metrics.kl > 0 and np.isfinite(metrics.loss)


def test_two_processes_equal_one_for_a_bf16_moe_student(tmp_path):
    # every expert (used by a process's tokens or not) and the fp32 router must reduce their gradients
    from tests.conftest import randomize_routers

    torch.manual_seed(0)
    config = get_preset("tiny-moe").replace(vocab_size=VOCAB, hybrid_override_pattern="ME*E")
    teacher = HybridLM(config)
    randomize_routers(teacher)
    save_model(teacher, tmp_path / "teacher")
    student = HybridLM(config.replace(n_routed_experts=4))
    randomize_routers(student, 1)
    save_model(student, tmp_path / "student")
    write_cyclic_tokens(tmp_path / "tokens.npy", size=4000)
    args = [
        "distill", str(tmp_path / "teacher"), str(tmp_path / "student"), "--data", str(tmp_path / "tokens.npy"),
        "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "2", "--steps", "2", "--lr", "3e-3",
        "--eval-every", "2", "--eval-sequences", "8", "--save-every", "2", "--valid-fraction", "0.1", "--quiet",
        "--log-every", "1", "--dtype", "bfloat16",
    ]  # fmt: skip
    distill_in_one_and_two_processes(args, tmp_path / "one", tmp_path / "two")
    for kind, key in (("train", "loss"), ("eval", "val_kl")):
        got = [r[key] for r in _records(tmp_path / "two", kind)]
        np.testing.assert_allclose(got, [r[key] for r in _records(tmp_path / "one", kind)], rtol=2e-3)
    model = load_model(tmp_path / "two" / "model")
    assert model.backbone.layers[1].mixer.gate.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_activation_checkpointing_gives_the_same_run(workspace, tmp_path):
    plain = train(_config(workspace, tmp_path / "plain", teacher=str(workspace / "teacher"), steps=3, eval_every=3))
    config = _config(workspace, tmp_path / "ckpt", teacher=str(workspace / "teacher"), steps=3, eval_every=3)
    config.activation_checkpointing = True
    recomputed = train(config)
    np.testing.assert_allclose(
        [r["loss"] for r in _records(tmp_path / "ckpt")], [r["loss"] for r in _records(tmp_path / "plain")], rtol=1e-6
    )
    assert recomputed.final_eval["val_kl"] == pytest.approx(plain.final_eval["val_kl"], rel=1e-6)
    a, b = _weights(tmp_path / "plain" / "model"), _weights(tmp_path / "ckpt" / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def _saved_bytes_per_token(config, lengths=(64, 192), batch=2) -> float:
    """Bytes of the tensors autograd keeps for backward (parameters aside) per token of a forward pass: the
    slope between two sequence lengths, so that what does not grow with tokens drops out."""
    torch.manual_seed(0)
    model = HybridLM(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(length: int) -> int:
        saved = {}  # address -> storage, each storage once; held, so no later tensor reuses an address

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.backbone(torch.randint(0, config.vocab_size, (batch, length)))
        return sum(storage.nbytes() for storage in saved.values())

    short, long = lengths
    return (saved_bytes(long) - saved_bytes(short)) / (batch * (long - short))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"num_experts_per_tok": 4},
        {"n_routed_experts": 32, "n_group": 2, "topk_group": 1},
        {"moe_latent_size": 32, "mlp_bias": True},
        {"moe_intermediate_size": 96, "moe_shared_expert_intermediate_size": 16},
    ],
)
def test_memory_plan_moe_activations_are_what_autograd_keeps(changes):
    """One MoE block's share of the memory plan's activations against the bytes autograd saves for it
    (fp32): the difference between two-block and one-block models."""
    from compressor.planning import _training_activations as _activation_bytes

    one = get_preset("tiny-moe").replace(hybrid_override_pattern="E", **changes)
    two = one.replace(hybrid_override_pattern="EE")
    measured = _saved_bytes_per_token(two) - _saved_bytes_per_token(one)
    estimated = _activation_bytes(two, 1, 4) - _activation_bytes(one, 1, 4)
    assert estimated == pytest.approx(measured, rel=0.03)
    assert _activation_bytes(one, 1, 4) != _activation_bytes(one.replace(hybrid_override_pattern="-"), 1, 4)


def test_validation_measures_a_retrieval_task(tmp_path):
    args = ["distill", "examples/model", "examples/model", "--data", "examples/data/sample.txt", "--steps", "2",
            "--seq-len", "64", "--batch-size", "2", "--micro-batch-size", "2", "--eval-every", "1",
            "--eval-sequences", "2", "--max-sequences", "32", "--device", "cpu", "--eval-task", "mqar",
            "--eval-task-sequences", "1", "--quiet"]  # fmt: skip
    result = runner.invoke(cli.app, [*args, "--eval-ctx", "256", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    evals = _records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all(0 <= r["val_retrieval_accuracy"] <= 1 and r["val_retrieval_ll"] < 0 for r in evals)
    result = runner.invoke(cli.app, [*args, "--eval-ctx", "1x", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "context length '1x'" in result.output
    config = TrainConfig(student="s", out="o", data="d", eval_task="lookup")
    with pytest.raises(OptionError, match="must be one of phonebook, mqar, needle"):
        config.validate()
