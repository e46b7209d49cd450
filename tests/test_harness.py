"""lm-eval integration: scores against direct computations with the model, local task YAMLs run offline,
per-block checkpoints, lm-eval's HF backend on the same checkpoint, and lm-eval's command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from tokenizers import Tokenizer  # noqa: E402

from compressor.checkpoint import load_model, save_model  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.generate import generate  # noqa: E402
from compressor.harness import CompressorLM, GenerationOptions, ModelTaskResults, evaluate_tasks  # noqa: E402
from compressor.importance import estimate  # noqa: E402
from compressor.model import HybridLM  # noqa: E402
from compressor.presets import get_preset  # noqa: E402
from compressor.prune import prune  # noqa: E402
from compressor.target import BlockTarget, Target  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer.json"
VOCAB = 4096  # the example tokenizer's
QUESTIONS = [
    ("ROMEO. But soft, what light through yonder window breaks?", ["It is the east", "A candle", "The moon", "No"]),
    ("HAMLET. To be, or not to be:", ["that is the question", "I know not", "Away", "my lord"]),
    ("KING. Speak, good sir, and", ["tell me all", "be gone", "sit", "rest"]),
    ("JULIET. O Romeo, Romeo, wherefore art thou", ["Romeo", "here", "gone", "my love"]),
    ("MACBETH. Is this a dagger which I see before me,", ["the handle toward my hand", "no", "a sword", "yes"]),
    ("LEAR. Blow, winds, and", ["crack your cheeks", "rage", "stop", "sing"]),
]
PROMPTS = ["KING. Speak, good sir", "ROMEO. What light", "HAMLET. To be", "LEAR. Blow, winds", "FOOL. Nuncle"]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Local task data only, never the hub."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def _ids(text: str) -> list[int]:
    return Tokenizer.from_file(str(TOKENIZER)).encode(text).ids


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model, its uniform pruned child, a per-block child (all with the example tokenizer)."""
    root = tmp_path_factory.mktemp("harness")
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    torch.manual_seed(0)
    model = HybridLM(get_preset("tiny").replace(vocab_size=VOCAB)).eval()
    gen = torch.Generator().manual_seed(0)
    scores = estimate(model, [torch.randint(0, VOCAB, (2, 24), generator=gen) for _ in range(2)])
    uniform = prune(model, scores, Target.uniform(model.config, hidden_size=48, intermediate_size=96, drop_blocks=(8,)))
    blocks = tuple(
        BlockTarget(
            source=spec.index,
            kind=spec.kind,
            intermediate_size=[32, 64, 96][spec.index % 3],
            mamba_num_heads=4 if spec.index == 2 else 8,
            mamba_head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        for spec in model.config.blocks
    )
    per_block = prune(model, scores, Target(hidden_size=48, blocks=blocks))
    assert uniform.config.is_uniform and not per_block.config.is_uniform
    save_model(uniform, root / "uniform", tokenizer_from=root / "tok")
    save_model(per_block, root / "per_block", tokenizer_from=root / "tok")
    _write_tasks(root, load_model(root / "uniform"))
    return root


def _write_tasks(root: Path, model: HybridLM) -> None:
    """A multiple-choice task and a generate_until task whose first three answers are the model's own
    greedy continuations (so exact_match is 3/5 exactly when generation is right)."""
    tasks = root / "tasks"
    tasks.mkdir()
    with (tasks / "mc.jsonl").open("w") as f:
        for i, (question, choices) in enumerate(QUESTIONS):
            f.write(json.dumps({"question": question, "choices": choices, "answer": i % 4}) + "\n")
    with (tasks / "gen.jsonl").open("w") as f:
        for i, prompt in enumerate(PROMPTS):
            answer = _greedy_text(model, prompt, 6, ("\n", ".")) if i < 3 else " never said"
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "toy_mc.yaml").write_text(
        f"task: toy_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tasks / 'mc.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    (tasks / "toy_gen.yaml").write_text(
        f"task: toy_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tasks / 'gen.jsonl'}\n"
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n'
    )


def _greedy_text(model: HybridLM, prompt: str, max_new: int, until: tuple[str, ...]) -> str:
    """Direct decoding with compressor.generate, cut at the first stop string."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    out = generate(model, torch.tensor([_ids(prompt)]), max_new, eos_token_id=model.config.eos_id)
    new = out[0, len(_ids(prompt)) :].tolist()
    new = new[: new.index(model.config.eos_id)] if model.config.eos_id in new else new
    text = tokenizer.decode(new)
    for stop in until:
        text = text.split(stop)[0]
    return text


def _direct_loglikelihood(model: HybridLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from one full forward of the unpadded sequence."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids)[0, :-1].float().log_softmax(-1)[len(context) - 1 :]
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def _direct_accuracy(model: HybridLM, limit: int = len(QUESTIONS)) -> float:
    """Multiple-choice accuracy of the toy task, each choice scored directly (lm-eval's " " delimiter)."""
    correct = 0
    for i, (question, choices) in enumerate(QUESTIONS[:limit]):
        context = _ids(question)
        scores = [_direct_loglikelihood(model, context, _ids(question + " " + c)[len(context) :])[0] for c in choices]
        correct += max(range(len(choices)), key=scores.__getitem__) == i % 4
    return correct / limit


def _requests(*args) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=a) for a in args]


def test_loglikelihood_equals_direct_computation(workspace):
    lm = CompressorLM(workspace / "uniform", batch_size=3)  # 3 per batch: rows of different lengths, padded
    pairs = [(q, " " + c) for q, choices in QUESTIONS for c in choices[:2]] + [("", "HAMLET. To be")]
    results = lm.loglikelihood(_requests(*pairs))
    assert len(results) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        if context:
            context_ids = _ids(context)
            continuation_ids = _ids(context + continuation)[len(context_ids) :]
        else:  # an empty context starts from the prefix token (BOS here)
            context_ids, continuation_ids = [lm.prefix_token_id], _ids(continuation)
        expected, expected_greedy = _direct_loglikelihood(lm.model, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    assert lm.prefix_token_id == 1 and lm.eot_token_id == 2
    # one request per batch gives the same scores: padding never reaches a scored position
    single = CompressorLM(lm.model, tokenizer=workspace / "uniform", batch_size=1).loglikelihood(_requests(*pairs))
    assert [s[0] for s in single] == pytest.approx([r[0] for r in results], abs=1e-4)


def test_greedy_flag_on_the_model_own_continuation(workspace):
    lm = CompressorLM(workspace / "uniform")
    context = _ids("ROMEO. But soft")
    out = generate(lm.model, torch.tensor([context]), 4)[0, len(context) :].tolist()
    (_, greedy), (_, other) = lm._loglikelihood_tokens([(None, context, out), (None, context, out[:-1] + [7])])
    assert greedy and not other


def test_loglikelihood_rolling_scores_every_token_once(workspace, monkeypatch):
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    tokens = _ids(text)
    lm = CompressorLM(workspace / "uniform", batch_size=2)
    (total,) = lm.loglikelihood_rolling(_requests((text,)))
    expected, _ = _direct_loglikelihood(lm.model, [lm.prefix_token_id], tokens)  # the whole text in one window
    assert total == pytest.approx(expected, abs=1e-4)
    monkeypatch.setattr("compressor.harness.CHUNK_LOGITS", 3 * VOCAB)  # logits formed 3 rows at a time
    assert lm.loglikelihood_rolling(_requests((text,))) == pytest.approx([total], abs=1e-5)
    monkeypatch.undo()

    short = CompressorLM(lm.model, tokenizer=workspace / "uniform", max_length=8)
    seen = []
    score = short._score
    short._score = lambda pairs: seen.extend(pairs) or score(pairs)
    (windowed,) = short.loglikelihood_rolling(_requests((text,)))
    assert sum((continuation for _, continuation in seen), []) != [] and len(seen) == -(-len(tokens) // 8)
    assert sorted(sum((c for _, c in seen), [])) == sorted(tokens)  # each token predicted exactly once
    assert all(len(context) + len(continuation) <= 8 + 1 for context, continuation in seen)
    assert windowed != pytest.approx(total, abs=1e-6) and windowed < 0  # shorter contexts, another total


def test_generate_until_equals_direct_decoding(workspace):
    lm = CompressorLM(workspace / "uniform", batch_size=2)
    options = {"until": ["\n", "."], "max_gen_toks": 6}
    requests = _requests(*[(p, options) for p in PROMPTS], (PROMPTS[0], {"until": "ROMEO", "max_new_tokens": 5}))
    texts = lm.generate_until(requests)
    expected = [_greedy_text(lm.model, p, 6, ("\n", ".")) for p in PROMPTS]
    expected.append(_greedy_text(lm.model, PROMPTS[0], 5, ("ROMEO",)))
    assert texts == expected
    with pytest.raises(CompressorError, match="num_beams are not supported"):
        lm.generate_until(_requests((PROMPTS[0], {"until": ["\n"], "num_beams": 4})))
    with pytest.raises(CompressorError, match="leaves no room for a prompt"):
        lm.generate_until(_requests((PROMPTS[0], {"max_gen_toks": 5000})))


def test_generation_options_follow_lm_eval():
    options = GenerationOptions.from_lm_eval({"until": "\n\n", "max_new_tokens": 32, "do_sample": False}, 256)
    assert options == GenerationOptions(until=("\n\n",), max_gen_toks=32, temperature=0.0)
    sampled = GenerationOptions.from_lm_eval({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, 256)
    assert (sampled.temperature, sampled.top_p, sampled.max_gen_toks, sampled.until) == (0.7, 0.9, 256, ())
    assert GenerationOptions.from_lm_eval({"temperature": 0.0}, 8).temperature == 0.0


def test_local_tasks_through_lm_eval(workspace):
    (result,) = evaluate_tasks(
        [workspace / "uniform"], ["toy_mc", "toy_gen"], include_path=workspace / "tasks", batch_size=4
    )
    assert result.task("toy_mc").metric("acc").value == pytest.approx(
        _direct_accuracy(load_model(workspace / "uniform"))
    )
    assert result.task("toy_mc").samples == len(QUESTIONS) and result.task("toy_mc").metric("acc").stderr > 0
    assert result.task("toy_gen").metric("exact_match").value == pytest.approx(3 / 5)
    assert ModelTaskResults.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(CompressorError, match="no metric bleu"):
        result.task("toy_mc").metric("bleu")


def test_per_block_checkpoint_runs(workspace):
    model = load_model(workspace / "per_block")
    assert not model.config.is_uniform
    (result,) = evaluate_tasks([workspace / "per_block"], [str(workspace / "tasks" / "toy_mc.yaml")], limit=4)
    assert result.task("toy_mc").samples == 4
    assert result.task("toy_mc").metric("acc").value == pytest.approx(_direct_accuracy(model, limit=4))


def test_same_accuracy_as_lm_eval_hf_backend(workspace):
    """The acceptance check: a uniform pruned checkpoint scored by lm-eval through compressor's class and
    through lm-eval's HF backend (transformers' NemotronH, with the tokenizer files compressor wrote)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # lm-eval's HF backend needs it (lm-eval[hf])
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    path = workspace / "uniform"
    tasks = TaskManager(include_path=str(workspace / "tasks"), include_defaults=False)
    hf = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=4)
    ours = CompressorLM(path, dtype="float32", batch_size=4)
    runs = {}
    for name, lm in (("hf", hf), ("compressor", ours)):
        runs[name] = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc"], task_manager=tasks, bootstrap_iters=0)
    acc = {name: run["results"]["toy_mc"]["acc,none"] for name, run in runs.items()}
    assert acc["hf"] == acc["compressor"] == pytest.approx(_direct_accuracy(ours.model))
    scores = {
        name: [float(r[0][0]) for s in run["samples"]["toy_mc"] for r in s["resps"]] for name, run in runs.items()
    }
    # transformers 5.15-5.24 floor dt, so their scores lie a little apart
    assert scores["hf"] == pytest.approx(scores["compressor"], abs=1e-3)


def test_lm_eval_command_line_entry(workspace, tmp_path):
    args = [
        *("run", "--model", "compressor", "--model_args", f"pretrained={workspace / 'uniform'},dtype=float32"),
        *("--device", "cpu", "--batch_size", "4", "--include_path", str(workspace / "tasks"), "--tasks", "toy_mc"),
        *("--output_path", str(tmp_path / "out")),
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    expected = _direct_accuracy(load_model(workspace / "uniform"))
    # the `lm-eval-compressor` script installed with the package, else `python -m compressor.harness` (the
    # module's own entry is run by test_missing_lm_eval_is_one_line; each launch imports lm-eval, ~13 s)
    script = Path(sys.executable).with_name("lm-eval-compressor")
    launch = [str(script)] if script.is_file() else [sys.executable, "-m", "compressor.harness"]
    result = subprocess.run([*launch, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "toy_mc" in result.stdout and "acc" in result.stdout
    written = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert written["results"]["toy_mc"]["acc,none"] == pytest.approx(expected)


def test_missing_lm_eval_is_one_line():
    code = (
        "import sys, runpy; sys.modules['lm_eval'] = None; runpy.run_module('compressor.harness', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: lm-eval is not installed: pip install 'compressor[eval]' (or pip install 'lm-eval>=0.4.10,<0.5')"
    )


def test_user_errors(workspace):
    with pytest.raises(CompressorError, match="unknown lm-eval task.*no_such_task"):
        evaluate_tasks([workspace / "uniform"], ["no_such_task"], include_path=workspace / "tasks")
    with pytest.raises(CompressorError, match="is not a folder of lm-eval task YAML"):
        evaluate_tasks([workspace / "uniform"], ["toy_mc"], include_path=workspace / "missing")
    with pytest.raises(CompressorError, match="batch_size must be a positive integer.*auto"):
        CompressorLM(workspace / "uniform", batch_size="auto")
    with pytest.raises(CompressorError, match="needs its tokenizer"):
        CompressorLM(load_model(workspace / "uniform"))
    if not torch.cuda.is_available():
        with pytest.raises(CompressorError, match="no CUDA device is available: use --device cpu"):
            CompressorLM(workspace / "uniform", device="cuda:0")


def test_quantized_checkpoint_runs_as_deployed(workspace, tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    from compressor.quantize import export_quantized, quantize, quantize_activations

    model = load_model(workspace / "uniform", dtype="float32")
    gen = torch.Generator().manual_seed(3)
    quantize(model, "fp8", [torch.randint(0, VOCAB, (2, 32), generator=gen) for _ in range(2)])
    path = export_quantized(model, tmp_path / "fp8", tokenizer_from=workspace / "uniform")
    assert (path / "tokenizer_config.json").is_file()
    pairs = [(q, " " + choices[0]) for q, choices in QUESTIONS[:3]]
    deployed = [s for s, _ in CompressorLM(path, dtype="float32").loglikelihood(_requests(*pairs))]
    weights_only = CompressorLM(path, dtype="float32", weights_only=True).loglikelihood(_requests(*pairs))
    reference = load_model(path, dtype="float32")
    quantize_activations(reference, path)
    for (context, continuation), score in zip(pairs, deployed, strict=True):
        context_ids = _ids(context)
        expected, _ = _direct_loglikelihood(reference, context_ids, _ids(context + continuation)[len(context_ids) :])
        assert score == pytest.approx(expected, abs=1e-4)
    assert [s for s, _ in weights_only] != pytest.approx(deployed, abs=1e-6)  # activations quantized by default


# ----- compress eval --lm-eval-tasks ----------------------------------------------------------------------
def _compress(*args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_compress_eval_lm_eval_tasks(workspace, monkeypatch):
    """Two checkpoints (uniform, per-block) on a task YAML file: the JSON records, then the side-by-side table."""
    models = [workspace / "uniform", workspace / "per_block"]
    task = workspace / "tasks" / "toy_mc.yaml"
    result = _compress("eval", *models, "--lm-eval-tasks", task, "--limit", 4, "--batch-size", 4, "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["model"] for r in records] == [str(m) for m in models]
    for record, path in zip(records, models, strict=True):
        (task_record,) = record["tasks"]
        assert task_record["task"] == "toy_mc" and task_record["samples"] == 4
        (acc,) = [m for m in task_record["metrics"] if m["name"] == "acc"]
        assert acc["filter"] == "none" and acc["stderr"] is not None
        assert acc["value"] == pytest.approx(_direct_accuracy(load_model(path), limit=4))
        assert ModelTaskResults.from_dict(record).task("toy_mc").metric("acc").value == acc["value"]
    monkeypatch.chdir(workspace)  # short model names for the table's columns
    result = _compress("eval", "uniform", "per_block", "--lm-eval-tasks", "toy_mc", "--include-path", "tasks",
                       "--limit", 4, "--num-fewshot", 1)  # fmt: skip
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "task" in line and "metric" in line)
    assert "uniform" in header and "per_block" in header
    row = next(line for line in result.stdout.splitlines() if "toy_mc" in line)
    assert "acc" in row and row.count("±") == 2  # one value per model
    assert "1-shot" in result.stdout


def test_compress_eval_lm_eval_user_errors(workspace, monkeypatch):
    """A bad task name, a bad --limit, no --data without tasks, lm-eval missing: one line, exit 1."""
    model = workspace / "uniform"
    cases = [
        (("--lm-eval-tasks", "no_such_task", "--include-path", workspace / "tasks"), "unknown lm-eval task(s) no_such"),
        (("--lm-eval-tasks", "toy_mc", "--limit", 2.5), "--limit must be a whole number"),
        ((), "--data is needed"),
    ]
    for args, message in cases:
        result = _compress("eval", model, *args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
        assert message in result.output, result.output
    monkeypatch.delitem(sys.modules, "compressor.harness")  # imported anew, without lm-eval
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    result = _compress("eval", model, "--lm-eval-tasks", "toy_mc")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.output.strip()
        == 'error: --lm-eval-tasks needs lm-eval, which is not installed: pip install -e ".[eval]"'
    )
