import math

import pytest
import torch
import torch.nn.functional as F

from compressor.errors import CompressorError, DataError
from compressor.evaluate import evaluate
from compressor.model import HybridLM
from compressor.presets import get_preset


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    student = HybridLM(get_preset("tiny")).eval()
    torch.manual_seed(1)
    teacher = HybridLM(get_preset("tiny")).eval()
    return student, teacher


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (3, 20), generator=gen), torch.randint(0, 512, (2, 20), generator=gen)]


@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_loss_and_kl_equal_explicit_computation(models, chunk_tokens):
    student, teacher = models
    batches = _batches()
    result = evaluate(student, batches, teacher=teacher, chunk_tokens=chunk_tokens)
    with torch.no_grad():
        logits = torch.cat([student(b) for b in batches]).float()
        teacher_logits = torch.cat([teacher(b) for b in batches]).float()
    ids = torch.cat(batches)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    teacher_loss = F.cross_entropy(teacher_logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    p = teacher_logits.softmax(-1)
    kl = (p * (teacher_logits.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean()
    agree = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
    assert result.tokens == 5 * 20
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert result.teacher_loss == pytest.approx(teacher_loss.item(), rel=1e-5)
    assert result.kl == pytest.approx(kl.item(), rel=1e-4)
    assert result.top1_agreement == pytest.approx(agree.item())


def test_a_model_agrees_with_itself(models):
    student, _ = models
    result = evaluate(student, _batches(), teacher=student)
    assert abs(result.kl) < 1e-6 and result.top1_agreement == 1.0
    assert result.loss == pytest.approx(result.teacher_loss)


def test_vocab_mismatch_and_empty_data(models):
    student, _ = models
    other = HybridLM(get_preset("tiny").replace(vocab_size=600))
    with pytest.raises(CompressorError, match="teacher vocabulary \\(600\\) differs from the model's \\(512\\)"):
        evaluate(student, _batches(), teacher=other)
    with pytest.raises(DataError, match="no tokens to evaluate"):
        evaluate(student, [])


def test_two_processes_equal_one(models, tmp_path):
    # `compress eval` under torchrun: both models sharded over two gloo processes, the batches split (5 of 2
    # sequences: one process pads its share with a pass whose results are dropped)
    import json
    import subprocess
    import sys

    import numpy as np
    from typer.testing import CliRunner

    import cli
    from compressor.checkpoint import save_model

    student, teacher = models
    save_model(student, tmp_path / "student")
    save_model(teacher, tmp_path / "teacher")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 512, size=10 * 16).astype(np.int32))
    args = ["eval", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data",
            str(tmp_path / "tokens.npy"), "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
            "--json"]  # fmt: skip
    one = CliRunner().invoke(cli.app, args)
    assert one.exit_code == 0, one.output
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", cli.__file__]
    two = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    want, got = json.loads(one.output), json.loads(two.stdout)
    assert got["tokens"] == want["tokens"] == 160
    for key in ("loss", "kl", "teacher_loss", "top1_agreement"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
