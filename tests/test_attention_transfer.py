import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import cli
from compressor.attention_transfer import Pair, attention_kl, attention_pairs, recording, sample_queries
from compressor.checkpoint import fingerprint, load_model, save_model
from compressor.config import ATTENTION
from compressor.errors import OptionError
from compressor.model import HybridLM, log_attention
from compressor.presets import get_preset
from compressor.train import train
from tests.conftest import (
    TRAIN_VOCAB,
    distill_in_one_and_two_processes,
    train_config,
    train_records,
    write_cyclic_tokens,
)

runner = CliRunner()
VOCAB = TRAIN_VOCAB
_records = train_records


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A teacher with peaked attention, a student of another width (same heads), and data with structure."""
    root = tmp_path_factory.mktemp("attention")
    write_cyclic_tokens(root / "tokens.npy")
    config = get_preset("tiny").replace(vocab_size=VOCAB)
    torch.manual_seed(0)
    teacher = HybridLM(config.replace(hidden_size=96))
    for spec in teacher.config.blocks:  # attention as peaked as a trained model's, far from a fresh student's
        if spec.kind == ATTENTION:
            teacher.backbone.layers[spec.index].mixer.q_proj.weight.data *= 30
    save_model(teacher, root / "teacher")
    torch.manual_seed(1)
    save_model(HybridLM(config), root / "student")
    return root


def _config(workspace, out, **changes):
    """A 12-step distillation from the workspace's teacher."""
    base = dict(teacher=str(workspace / "teacher"), steps=12, eval_every=12, save_every=12)
    return train_config(workspace, out, **{**base, **changes})


def _maps_kl(teacher, student, ids, pairs=None) -> float:
    """Attention KL of `student` to `teacher` on `ids`, over every query (block pairs in order by default)."""
    pairs = pairs or attention_pairs("-", student.config, "-", teacher.config)
    queries = torch.arange(ids.shape[1])
    with recording(teacher, [p.teacher for p in pairs], queries) as t_maps, torch.no_grad():
        teacher(ids)
        with recording(student, [p.student for p in pairs], queries) as s_maps:
            student(ids)
            return float(attention_kl(t_maps(), s_maps(), pairs))


def test_recorded_weights_are_what_the_attention_applies():
    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny").replace(vocab_size=VOCAB)).eval()
    index = next(spec.index for spec in model.config.blocks if spec.kind == ATTENTION)
    mixer = model.backbone.layers[index].mixer
    hidden = torch.randn(2, 20, model.config.hidden_size)
    queries = torch.tensor([0, 3, 7, 19])
    with recording(model, [index], queries) as maps:
        out = mixer(hidden)
        log_weights = maps()[index]  # (b, heads, queries, t)
    assert log_weights.shape == (2, mixer.num_heads, 4, 20)
    assert mixer.record_queries is None and mixer.recorded is None  # cleared on exit
    weights = log_weights.exp()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, mixer.num_heads, 4))
    assert (weights[:, :, 1, 4:] == 0).all()  # query 3 sees keys 0..3 only
    v = mixer.v_proj(hidden).view(2, 20, mixer.num_kv_heads, mixer.head_dim).transpose(1, 2)
    v = v.repeat_interleave(mixer.num_heads // mixer.num_kv_heads, dim=1)
    mixed = (weights @ v).transpose(1, 2).reshape(2, 4, -1)  # what those rows pass to o_proj
    torch.testing.assert_close(mixer.o_proj(mixed), out[:, queries], rtol=1e-5, atol=1e-5)
    # by hand for one head: softmax of q.k / sqrt(d) over the causal keys
    q = mixer.q_proj(hidden)[1, 7, : mixer.head_dim]
    k = mixer.k_proj(hidden)[1, :8, : mixer.head_dim]
    torch.testing.assert_close(weights[1, 0, 2, :8], F.softmax(k @ q / math.sqrt(mixer.head_dim), -1))
    assert log_attention(torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.arange(5)).shape == (1, 4, 5, 5)


def test_attention_kl_is_zero_on_the_same_maps_and_has_finite_gradients():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8)
    teacher = log_attention(q, k, torch.arange(12))
    assert float(attention_kl({0: teacher}, {0: teacher}, [Pair(0, 0)])) == pytest.approx(0.0, abs=1e-6)
    q2 = q.clone().requires_grad_()
    student = log_attention(q2, k, torch.arange(12))
    loss = attention_kl({0: teacher}, {0: student}, [Pair(0, 0)])
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    student = log_attention(q2 * 3, k, torch.arange(12))
    loss = attention_kl({0: teacher}, {0: student}, [Pair(0, 0)])
    loss.backward()
    assert float(loss.detach()) > 0.01 and torch.isfinite(q2.grad).all() and q2.grad.abs().sum() > 0


def test_sample_queries():
    rng = np.random.default_rng(0)
    assert sample_queries(5, 8, rng, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4]
    picked = sample_queries(100, 10, rng, torch.device("cpu"))
    assert len(set(picked.tolist())) == 10 and picked.tolist() == sorted(picked.tolist())


def test_pairs_follow_the_pruning_record_else_the_order(workspace, tmp_path):
    teacher = load_model(workspace / "teacher")
    attention = [spec.index for spec in teacher.config.blocks if spec.kind == ATTENTION]
    assert attention == [3, 6]  # M-M*-M*M-
    student = load_model(workspace / "student")
    assert attention_pairs(workspace / "student", student.config, workspace / "teacher", teacher.config) == (
        Pair(3, 3),
        Pair(6, 6),
    )
    # a student pruned from the teacher down to its last four blocks (M*M-): one attention block, from block 6
    config = student.config.replace(hybrid_override_pattern="M*M-")
    save_model(HybridLM(config), tmp_path / "pruned")
    blocks = [{"source": source} for source in (5, 6, 7, 8)]
    record = {"source": {"fingerprint": fingerprint(workspace / "teacher")}, "chosen": {"target": {"blocks": blocks}}}
    (tmp_path / "pruned" / "compression.json").write_text(json.dumps(record))
    assert attention_pairs(tmp_path / "pruned", config, workspace / "teacher", teacher.config) == (Pair(1, 6),)
    # the same record from another source model is not this teacher's, and one block cannot pair with two
    record["source"]["fingerprint"] = "0" * 16
    (tmp_path / "pruned" / "compression.json").write_text(json.dumps(record))
    with pytest.raises(OptionError, match="cannot match the student's 1 attention blocks with the teacher's 2"):
        attention_pairs(tmp_path / "pruned", config, workspace / "teacher", teacher.config)
    fewer_heads = student.config.replace(num_attention_heads=2)
    with pytest.raises(OptionError, match="heads one to one: the student's block 3 has 2 attention heads"):
        attention_pairs(tmp_path, fewer_heads, workspace / "teacher", teacher.config)
    with pytest.raises(OptionError, match="needs a student with attention blocks"):
        attention_pairs(tmp_path, student.config.replace(hybrid_override_pattern="M-M-M-"), "-", teacher.config)


def test_a_student_with_pruned_heads_pairs_them_with_the_heads_it_kept(workspace, tmp_path):
    from compressor.importance import estimate
    from compressor.pipelines.pruning import PruneConfig, prune_to_budget
    from compressor.pipelines.source import CalibrationConfig, calibrate
    from compressor.prune import kept_attention_heads
    from compressor.target import Target

    teacher = load_model(workspace / "teacher")
    gen = torch.Generator().manual_seed(0)
    importance = estimate(teacher, [torch.randint(0, VOCAB, (2, 24), generator=gen) for _ in range(3)])
    target = Target.uniform(teacher.config, num_attention_heads=2)  # one query head of each KV group
    kept = kept_attention_heads(importance, target, teacher.config)
    assert sorted(kept) == ["3", "6"] and all(len(h) == 2 and h[0] < 2 <= h[1] for h in kept.values())
    # `compress prune` to that shape records the heads; the student's heads then pair with them
    shape = {"num_attention_heads": 2}
    calibration = CalibrationConfig(str(workspace / "teacher"), str(workspace / "tokens.npy"), samples=4,
                                    score_samples=2, seq_len=24, batch_size=2, device="cpu")  # fmt: skip
    source = calibrate(calibration)
    record = prune_to_budget(source, PruneConfig(export=shape), tmp_path / "pruned", say=lambda t: None)
    recorded = json.loads((tmp_path / "pruned" / "compression.json").read_text())["attention_heads"]
    assert recorded == record.attention_heads == kept_attention_heads(source.importance, target, teacher.config)
    student = load_model(tmp_path / "pruned")
    pairs = attention_pairs(tmp_path / "pruned", student.config, workspace / "teacher", teacher.config)
    assert pairs == tuple(Pair(b, b, tuple(recorded[str(b)])) for b in (3, 6))
    # in the first attention block (its input unchanged) the kept heads attend exactly as the teacher's did,
    # the first two heads do not
    ids = torch.randint(0, VOCAB, (2, 24), generator=gen)
    assert _maps_kl(teacher, student, ids, pairs[:1]) < 1e-6
    assert _maps_kl(teacher, student, ids, [Pair(3, 3, (0, 1))]) > 0.1
    assert _maps_kl(teacher, student, ids, pairs) < 0.01  # the second block sees the first's narrower output
    # and the distillation takes them
    args = ["distill", str(workspace / "teacher"), str(tmp_path / "pruned"), "--data", str(workspace / "tokens.npy"),
            "--seq-len", "24", "--batch-size", "2", "--micro-batch-size", "2", "--steps", "1", "--attention-loss", "1",
            "--out", str(tmp_path / "run")]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert _records(tmp_path / "run")[0]["attention_kl"] < 0.01


def test_attention_loss_pulls_the_students_attention_to_the_teachers(workspace, tmp_path):
    options = dict(lr=1e-2, min_lr=1e-3, steps=40, eval_every=40, save_every=40)
    train(_config(workspace, tmp_path / "plain", **options))
    transfer = train(_config(workspace, tmp_path / "transfer", attention_loss=20.0, attention_queries=16, **options))
    steps = _records(tmp_path / "transfer")
    assert all(math.isfinite(r["attention_kl"]) for r in steps) and steps[-1]["attention_kl"] < steps[0]["attention_kl"]
    teacher = load_model(workspace / "teacher")
    ids = torch.from_numpy(np.load(workspace / "tokens.npy")[:128].astype(np.int64)).view(4, 32)
    before = _maps_kl(teacher, load_model(workspace / "student"), ids)
    after_plain = _maps_kl(teacher, load_model(tmp_path / "plain" / "model"), ids)
    after_transfer = _maps_kl(teacher, load_model(tmp_path / "transfer" / "model"), ids)
    # 0.44 -> 0.20 nats in 40 steps with the transfer; logit distillation alone leaves it at 0.44
    assert after_transfer < 0.6 * before and after_transfer < 0.6 * after_plain
    first = _records(tmp_path / "transfer", "eval")[0]
    assert transfer.final_eval["val_kl"] < 0.5 * first["val_kl"]  # the logits are still distilled


def test_attention_loss_with_activation_checkpointing_gives_the_same_run(workspace, tmp_path):
    options = dict(steps=3, attention_loss=1.0, attention_queries=8)
    train(_config(workspace, tmp_path / "plain", **options))
    train(_config(workspace, tmp_path / "ckpt", activation_checkpointing=True, **options))
    for key in ("loss", "attention_kl"):
        got, want = ([r[key] for r in _records(tmp_path / run)] for run in ("ckpt", "plain"))
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_attention_loss_errors_and_plan(workspace, tmp_path):
    with pytest.raises(OptionError, match="attention_loss.*needs the teacher in memory"):
        _config(workspace, tmp_path / "a", attention_loss=1.0, cache_teacher=True).validate()
    with pytest.raises(OptionError, match="attention_loss.*needs a teacher"):
        _config(workspace, tmp_path / "a", attention_loss=1.0, teacher=None).validate()
    with pytest.raises(OptionError, match="attention_queries.*at least 1"):
        _config(workspace, tmp_path / "a", attention_loss=1.0, attention_queries=0).validate()
    common = [str(workspace / "teacher"), str(workspace / "student"), "--data", str(workspace / "tokens.npy"),
              "--seq-len", "32", "--batch-size", "8", "--quiet", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(cli.app, ["distill", *common, "--attention-loss", "-1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "--attention-loss" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli.app, ["distill", *common, "--attention-loss", "1", "--dry-run"])
    assert result.exit_code == 0 and "attention maps (--attention-loss)" in result.output, result.output
    result = runner.invoke(cli.app, ["distill", *common, "--attention-loss", "1", "--steps", "2",
                                     "--out", str(tmp_path / "c")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert all("attention_kl" in r for r in _records(tmp_path / "c"))
    assert not (tmp_path / "b").exists()


def test_two_processes_equal_one_with_the_attention_loss(workspace, tmp_path):
    args = [
        "distill", str(workspace / "teacher"), str(workspace / "student"), "--data", str(workspace / "tokens.npy"),
        "--seq-len", "32", "--batch-size", "8", "--micro-batch-size", "2", "--steps", "4", "--lr", "3e-3",
        "--eval-every", "4", "--eval-sequences", "8", "--save-every", "4", "--valid-fraction", "0.1", "--quiet",
        "--log-every", "1", "--device", "cpu", "--attention-loss", "2", "--attention-queries", "8",
    ]  # fmt: skip
    distill_in_one_and_two_processes(args, tmp_path / "one", tmp_path / "two")
    for key in ("loss", "attention_kl"):
        got, want = ([r[key] for r in _records(tmp_path / run)] for run in ("two", "one"))
        np.testing.assert_allclose(got, want, rtol=1e-4)
