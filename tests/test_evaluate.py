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
    # the eval pipeline under torchrun: both models sharded over two gloo processes, the batches split (5 of
    # 2 sequences: one process pads its share with a pass whose results are dropped)
    import json
    import pathlib
    import subprocess
    import sys

    import numpy as np

    from compressor.checkpoint import save_model
    from compressor.pipelines.evaluating import LossEval, evaluate_checkpoints

    student, teacher = models
    save_model(student, tmp_path / "student")
    save_model(teacher, tmp_path / "teacher")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 512, size=10 * 16).astype(np.int32))
    config = LossEval(str(tmp_path / "tokens.npy"), teacher=str(tmp_path / "teacher"), seq_len=16, batch_size=2,
                      device="cpu")  # fmt: skip
    want = evaluate_checkpoints([tmp_path / "student"], config).to_dict()
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, sys, pathlib\n"
        f"sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parents[1])!r})\n"
        "from compressor.pipelines.evaluating import LossEval, evaluate_checkpoints\n"
        f"record = evaluate_checkpoints([{str(tmp_path / 'student')!r}], {config!r})\n"
        "if record is not None:\n    print(json.dumps(record.to_dict()))\n"
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)]
    two = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    (line,) = two.stdout.splitlines()  # the main process alone returns the record
    got = json.loads(line)
    assert got["tokens"] == want["tokens"] == 160
    for key in ("loss", "kl", "teacher_loss", "top1_agreement"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
