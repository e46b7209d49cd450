"""Hostile and contradictory inputs: each is one line (exit 1, no traceback) within 10 s, or the right result.

Config values that would build or allocate without bound (200,000 blocks, 10^9 experts, a 10M-token task
context), files that escape their checkpoint folder or crash a parser (links, 100,000-deep JSON, NUL bytes,
integer weights, a tokenizer whose regex panics), options that could not apply (refused, not ignored),
`compress info` on a config that does not describe its weights; and ModelOpt quantization of MoE models.
Every case leaves its inputs byte-identical and writes nothing outside its named output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from cli import app
from compressor.checkpoint import QuantizedCheckpoint, load_model, save_model
from compressor.config import HybridConfig
from compressor.errors import CompressorError
from compressor.model import HybridLM
from compressor.presets import get_preset

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "model")  # its tokenizer has words for tasks
TEXT = "To be, or not to be, that is the question. Whether tis nobler in the mind to suffer.\n" * 60
GIB = 2**30


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A dense and an MoE checkpoint with a tokenizer, data, and hostile copies of them."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    (root / "text.txt").write_text(TEXT)
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 300, size=64 * 32).astype(np.int32))
    np.save(root / "search.npy", np.random.default_rng(1).integers(0, 300, size=256 * 32).astype(np.int32))
    torch.manual_seed(0)
    save_model(HybridLM(get_preset("tiny").replace(vocab_size=300)), root / "model", tokenizer_from=root / "tok")
    save_model(HybridLM(get_preset("tiny-moe")), root / "moe", tokenizer_from=root / "tok")
    _hostile(root)
    return root


def _copy(root: Path, source: str, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    for file in (root / source).iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def _set(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hostile(root: Path) -> None:
    _set(_copy(root, "model", "pattern_200k"), hybrid_override_pattern="M*-" * 66_667)
    _set(_copy(root, "model", "pattern_4000"), hybrid_override_pattern="M-" * 2000)
    _set(_copy(root, "moe", "experts_1e9"), n_routed_experts=10**9)
    _set(_copy(root, "moe", "experts_16"), n_routed_experts=16)
    raw = json.loads((root / "model" / "config.json").read_text())
    no_vocab = _copy(root, "model", "no_vocab_model")
    (no_vocab / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "vocab_size"}))
    deep = _copy(root, "model", "deep_config")
    text = (deep / "config.json").read_text()
    (deep / "config.json").write_text(text[:-1].rstrip().rstrip("}") + f', "use_cache": {_nested(100_000)}}}')
    index = _copy(root, "model", "deep_index")
    (index / "model.safetensors.index.json").write_text('{"weight_map": ' + _nested(100_000) + "}")
    nul = _copy(root, "model", "nul_index")
    names = list(load_file(nul / "model.safetensors"))
    (nul / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "model\x00.st")}))
    (root / "elsewhere.json").write_text((root / "model" / "config.json").read_text())
    linked = _copy(root, "model", "config_link")
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(root / "elsewhere.json")
    (root / "elsewhere_tokenizer.json").write_text((root / "tok" / "tokenizer.json").read_text())
    linked = _copy(root, "model", "tokenizer_link")
    (linked / "tokenizer.json").unlink()
    (linked / "tokenizer.json").symlink_to(root / "elsewhere_tokenizer.json")
    ints = _copy(root, "model", "int32")
    tensors = load_file(ints / "model.safetensors")
    tensors["backbone.norm_f.weight"] = tensors["backbone.norm_f.weight"].to(torch.int32)
    save_file(tensors, ints / "model.safetensors", metadata={"format": "pt"})
    panic = _copy(root, "model", "tokenizer_panic")  # this normalizer panics inside tokenizers on any text
    spec = json.loads((panic / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"Regex": "\\G"}, "content": "x"}
    (panic / "tokenizer.json").write_text(json.dumps(spec))
    wide = {**json.loads((root / "model" / "config.json").read_text()), "hidden_size": 2**40}
    (root / "vs_wide.json").write_text(json.dumps({"model_type": "qwen3", **_qwen3_8b(), "hidden_size": 2**40}))
    (root / "wide_config.json").write_text(json.dumps(wide))
    extra = _copy(root, "model", "extra_keys")
    _set(extra, my_tool_flag=True, auto_map={"AutoModel": "modeling_evil.Model"}, use_cache=True)


def _qwen3_8b() -> dict:
    from compressor.baselines import PUBLISHED

    return {k: v for k, v in PUBLISHED["qwen3-8b"].items() if k != "model_type"}


def _snapshot(root: Path) -> dict[str, str]:
    """A hash of every input file (outputs of the cases go to `out*` folders, which are left out)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.relative_to(root).parts[0].startswith(("out", ".out")):
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _refused(root: Path, args: list[str], message: str, seconds: float = 10.0) -> str:
    """Run a command that must be refused with one line holding `message`, within `seconds`, touching
    no input and leaving no output; returns the line."""
    before = _snapshot(root)
    formatted = [a.replace("{root}", str(root)) for a in args]
    started = time.monotonic()
    result = CliRunner().invoke(app, formatted)
    took = time.monotonic() - started
    output = result.output.strip()
    assert isinstance(result.exception, SystemExit), f"{formatted}: {result.exception!r}"
    assert result.exit_code == 1, f"{formatted}: exit {result.exit_code}: {output}"
    assert "Traceback" not in output and len(output.splitlines()) == 1, f"{formatted}: {output}"
    assert message.replace("{root}", str(root)) in output, f"{formatted}: {output}"
    assert took < seconds, f"{formatted} took {took:.1f} s"
    assert _snapshot(root) == before, f"{formatted} changed an input"
    assert not any(p.name.startswith(("out", ".out")) for p in root.iterdir()), f"{formatted} left an output"
    return output


M, MOE, TOK, TXT = "{root}/model", "{root}/moe", "{root}/tokens.npy", "{root}/text.txt"
EVAL = ["--data", TOK, "--seq-len", "32", "--max-sequences", "2"]
PRUNE = ["prune", M, "--data", TOK, "--samples", "8", "--seq-len", "32", "--target-params", "150k", "--ctx", "512",
         "--out", "{root}/out_p"]  # fmt: skip
SEARCH = ["search", M, "--data", TOK, "--samples", "8", "--score-samples", "4", "--seq-len", "32", "--target-params",
          "150k", "--ctx", "512", "--out", "{root}/out_s"]  # fmt: skip
QUANTIZE = ["quantize", M, "--format", "fp8", "--data", TOK, "--samples", "2", "--seq-len", "32",
            "--out", "{root}/out_q"]  # fmt: skip
PROBE_10M = ["importance", EXAMPLE, "--data", TOK, "--samples", "8", "--seq-len", "32", "--drop-one", "retrieval",
             "--retrieval-ctx", "10M", "--out", "{root}/out_s"]  # fmt: skip
EVAL_TASK_10M = ["distill", EXAMPLE, EXAMPLE, "--data", TOK, "--seq-len", "32", "--batch-size", "4",
                 "--micro-batch-size", "4", "--steps", "1", "--valid-fraction", "0.2", "--eval-task", "phonebook",
                 "--eval-ctx", "10M", "--out", "{root}/out_d"]  # fmt: skip


# ----- item: hostile config values are checked against the weights' header and sane bounds ---------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "{root}/pattern_200k"], "the layer pattern has 200,001 blocks, more than the 4,096 allowed"),
        (["eval", "{root}/pattern_200k", *EVAL], "the layer pattern has 200,001 blocks"),
        (["info", "{root}/pattern_4000"], "describes 4,000 blocks, but its weights hold 9"),
        (["eval", "{root}/pattern_4000", *EVAL], "describes 4,000 blocks, but its weights hold 9"),
        (["generate", "{root}/pattern_4000", "--prompt", "To be"], "describes 4,000 blocks, but its weights hold 9"),
        (["info", "{root}/experts_1e9"], "n_routed_experts of block 1 (moe) must be at most 4,096"),
        (["eval", "{root}/experts_1e9", *EVAL], "n_routed_experts of block 1 (moe) must be at most 4,096"),
        (["info", "{root}/experts_16"], "gives block 1 16 experts, but its weights hold 8"),
        (["estimate", "{root}/experts_16"], "gives block 1 16 experts, but its weights hold 8"),
        (["eval", "{root}/experts_16", *EVAL], "gives block 1 16 experts, but its weights hold 8"),
        (["info", "{root}/deep_config"], "is not valid JSON"),
        (["eval", "{root}/deep_config", *EVAL], "is not valid JSON"),
        (["info", "{root}/deep_index"], "is not a valid safetensors index"),
        (["eval", "{root}/nul_index", *EVAL], "names the shard 'model\\x00.st', which is not a file name"),
        (["info", "{root}/nul_index"], "which is not a file name"),
        (["init", "{root}/out_i", "--preset", "tiny", "--set", "use_cache=" + _nested(100_000)], "nested too deeply"),
        (["init", "{root}/out_i", "--config", "{root}/wide_config.json"], "hidden_size must be at most 4,194,304"),
    ],
)
def test_a_hostile_config_is_refused_in_one_line_before_anything_is_built(ws, args, message):
    _refused(ws, args, message)


def test_the_architecture_is_checked_against_the_header_before_a_module_is_built(ws, monkeypatch):
    """A config.json of 4,000 blocks over 9 blocks of weights never reaches the model's constructor."""
    import compressor.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "empty_model", lambda *a, **k: pytest.fail("built before the header check"))
    with pytest.raises(CompressorError, match="describes 4,000 blocks, but its weights hold 9"):
        load_model(ws / "pattern_4000")


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "12b-v2"])
def test_tensor_shapes_equal_the_built_models_state_dict(preset):
    from compressor.model import tensor_shapes

    for config in (get_preset(preset), get_preset(preset).replace(tie_word_embeddings=True)):
        with torch.device("meta"):
            model = HybridLM(config)
        assert tensor_shapes(config) == {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ----- item: files are read from inside their checkpoint folder; unknown config keys are not copied -------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "{root}/config_link"], "config.json resolves to {root}/elsewhere.json, outside"),
        (["eval", "{root}/config_link", *EVAL], "config.json resolves to {root}/elsewhere.json, outside"),
        (["eval", "{root}/tokenizer_link", "--data", TXT, "--seq-len", "32"], "tokenizer.json resolves to"),
        (["generate", "{root}/tokenizer_link", "--prompt", "To be"], "tokenizer.json resolves to"),
        (["init", "{root}/out_i", "--preset", "tiny", "--set", "my_tool_flag=1"], "'my_tool_flag' is not a config"),
    ],
)
def test_a_file_outside_the_checkpoint_folder_is_not_read(ws, args, message):
    _refused(ws, args, message)


def test_keys_nobody_knows_are_not_copied_into_outputs(ws, tmp_path):
    config = ws / "extra_keys" / "config.json"
    result = CliRunner().invoke(app, ["init", str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "my_tool_flag" not in written and "auto_map" not in written  # dropped: nobody checked what they mean
    assert written["use_cache"] is True  # a key transformers' NemotronHConfig defines passes through
    source = json.loads((ws / "extra_keys" / "config.json").read_text())
    assert HybridConfig.from_dict(source).extra == {"use_cache": True, "dtype": source["dtype"]}


# ----- item: compress info cross-checks config and weights; weights are floats; tokenizer panics --------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "{root}/no_vocab_model"], "has shape [300, 64] in model.safetensors, but config.json implies"),
        (["info", "{root}/int32"], "tensor backbone.norm_f.weight in model.safetensors is stored as I32"),
        (["eval", "{root}/int32", *EVAL], "is stored as I32, but a model's weights are floating point"),
        (["eval", "{root}/tokenizer_panic", "--data", TXT, "--seq-len", "32"], "tokenizer_panic/tokenizer.json failed"),
        (["generate", "{root}/tokenizer_panic", "--prompt", "To be"], "its tokenizer.json is broken"),
        (["estimate", "9b-v2", "--gpu", "h100", "--vs", "{root}/vs_wide.json"], "hidden_size must be at most"),
    ],
)
def test_what_info_and_loading_cannot_trust_is_refused(ws, args, message):
    _refused(ws, args, message)


def test_info_of_matching_config_and_weights_reports_them(ws):
    result = CliRunner().invoke(app, ["info", str(ws / "moe"), "--json"])
    assert result.exit_code == 0, result.output
    parameters = sum(p.numel() for p in load_model(ws / "moe").parameters())
    assert json.loads(result.output)["parameters"]["total"] == parameters


def test_lm_eval_task_help_says_a_task_yaml_runs_code():
    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert "!function" in result.output and "runs Python code" in result.output


# ----- item: every context a user gives is checked against memory, as generate's tokens are ----------------------
@pytest.fixture
def small_memory(monkeypatch):
    """A machine with 4 GiB free, whatever this one has."""
    import compressor.budget as budget

    monkeypatch.setattr(budget, "available_memory", lambda device: 4 * GIB)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", EXAMPLE, "--task", "phonebook", "--ctx", "10M"], "--ctx is too long: memory for 8 sequences"),
        (["eval", EXAMPLE, "--task", "mqar", "--ctx", "1k,10M"], "--ctx is too long"),
        (PROBE_10M, "--retrieval-ctx is too long"),
        (EVAL_TASK_10M, "--eval-ctx is too long"),
        (["generate", M, "--prompt", "To be", "--max-new-tokens", "100000000000"], "--max-new-tokens is too many"),
    ],
)
def test_a_context_beyond_memory_is_refused_before_it_is_built(ws, small_memory, args, message):
    _refused(ws, args, message)


LONG = "10000000"  # a --seq-len of 10M tokens


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", M, "--data", TOK, "--seq-len", LONG], "evaluation needs about"),
        (["importance", M, "--data", TOK, "--seq-len", LONG, "--out", "{root}/out_i"], "importance needs about"),
        ([LONG if a == "32" else a for a in PRUNE], "importance needs about"),
        ([LONG if a == "32" else a for a in SEARCH], "importance needs about"),
        (["distill", M, M, "--data", TOK, "--seq-len", LONG, "--out", "{root}/out_d"], "distillation needs about"),
        ([LONG if a == "32" else a for a in QUANTIZE], "quantization's calibration needs about"),
    ],
)
def test_a_sequence_length_beyond_memory_is_refused_before_anything_is_loaded(ws, small_memory, args, message):
    # the memory plan of the stage (as --dry-run shows it) against the free memory, in one line naming the
    # options that lower it, instead of an out-of-memory kill
    line = _refused(ws, args, message)
    assert "per process" in line and "is free" in line and "--seq-len" in line


def test_a_context_that_fits_is_scored(small_memory):
    result = CliRunner().invoke(app, ["eval", EXAMPLE, "--task", "phonebook", "--ctx", "512", "--json"])
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(result.output)["models"].values()
    assert [s["context"] for s in scores] == [512] and 0 <= scores[0]["accuracy"] <= 1


# ----- item: options that cannot apply are refused, not ignored ------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*PRUNE, "--score-samples", "0"], "--score-samples must be at least 1: the kl score is measured on held-out"),
        ([*PRUNE, "--retrieval-weight", "2"], "--retrieval-weight weighs the retrieval term of kl+retrieval"),
        ([*PRUNE, "--score", "loss", "--retrieval-weight", "0.5"], "score loss has none"),
        ([*PRUNE, "--score", "kl+retrieval", "--retrieval-weight", "-1"], "--retrieval-weight must be a finite number"),
        ([*PRUNE, "--score", "kl+retrieval", "--retrieval-weight", "nan"], "--retrieval-weight must be a finite"),
        ([*SEARCH, "--score", "kl+retrieval", "--retrieval-weight", "inf"], "--retrieval-weight must be a finite"),
        ([*SEARCH, "--retrieval-weight", "3"], "--retrieval-weight weighs the retrieval term"),
        ([*SEARCH[:6], "--score-samples", "0", *SEARCH[8:]], "--score-samples must be at least 1"),
        (
            [*SEARCH, "--share-teacher", "--attention-loss", "1"],
            "--share-teacher reads the teacher from a cache, --attention-loss needs it in memory: give one",
        ),
        ([*SEARCH, "--share-teacher", "--attention-loss", "1", "--dry-run"], "--share-teacher reads the teacher"),
        ([*QUANTIZE, "--keep", "*layer.0.*"], "--keep pattern '*layer.0.*' matches no quantizer of the model"),
        (["init", "{root}/out_i", "--preset", "tiny-moe", "--layers", "6"], "would drop this config's 3 MoE blocks"),
        (["init", "{root}/out_i", "--layers", "6"], "--layers lays out the blocks of a --preset or --config"),
    ],
)
def test_an_option_that_cannot_apply_is_refused_before_any_work(ws, monkeypatch, args, message):
    # every pipeline that calibrates holds its own name for `calibrate` (bound when it is imported)
    from compressor.pipelines import importance, pruning, search, source

    for module in (source, importance, pruning, search):
        monkeypatch.setattr(module, "calibrate", lambda *a, **k: pytest.fail("calibrated before the refusal"))
    _refused(ws, args, message)


@pytest.fixture(scope="module")
def search_folder(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s"
    assert SEARCH[2] == "--data"  # given once: search.npy in place of TOK
    args = [a.replace("{root}", str(ws)) for a in SEARCH[:3] + [str(ws / "search.npy")] + SEARCH[4:-1]] + [str(out),
            "--strategy", "minitron", "--candidates", "1", "--distill-tokens", "256", "--batch-size", "4",
            "--micro-batch-size", "4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        (["--candidates", "2"], "--candidates 2 differs from the 1 of the search in --out"),
        (["--strategy", "minipuzzle"], "--strategy minipuzzle differs from the minitron of the search"),
        (["--seq-len", "64"], "--seq-len 64 differs from the 32 of the search"),
        (["--distill-tokens", "1k"], "--distill-tokens 1k differs from the 256 of the search"),
        (["--top-k", "3"], "--top-k 3 differs from the 10 of the search"),
        (["--retrieval-ctx", "2k"], "--retrieval-ctx 2k is not used by the search in --out"),
        (["--importance", "scores"], "--importance scores is not used by the search in --out"),
        (["--target-params", "100k"], "the budget options differ from the budget the search in --out started with"),
    ],
)
def test_search_resume_refuses_options_other_than_the_searchs(ws, search_folder, changed, message):
    before = _snapshot(search_folder)
    args = ["search", str(ws / "model"), "--data", str(ws / "search.npy"), "--resume", "--out", str(search_folder)]
    result = CliRunner().invoke(app, [*args, *changed])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output
    assert _snapshot(search_folder) == before


def test_search_resume_accepts_the_options_it_started_with(ws, search_folder):
    args = ["search", str(ws / "model"), "--data", str(ws / "search.npy"), "--resume", "--out", str(search_folder),
            "--candidates", "1", "--strategy", "minitron", "--seq-len", "32", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_search_resume_accepts_the_importance_folder_it_started_with(ws, search_folder, tmp_path, monkeypatch):
    """The record keeps --importance as written (relative to where the search started): the same folder,
    written another way, is the same option; another folder is refused."""
    folder = tmp_path / "s"
    shutil.copytree(search_folder, folder)
    raw = json.loads((folder / "search.json").read_text())
    raw["calibration"]["importance_dir"] = "scores"
    (folder / "search.json").write_text(json.dumps(raw))
    monkeypatch.chdir(ws)
    args = ["search", str(ws / "model"), "--data", str(ws / "search.npy"), "--resume", "--out", str(folder)]
    result = CliRunner().invoke(app, [*args, "--importance", "other"])
    assert result.exit_code == 1 and f"--importance other differs from the {ws / 'scores'} of" in result.output
    result = CliRunner().invoke(app, [*args, "--importance", f"{ws}/./scores/", "--json"])
    assert result.exit_code == 0, result.output


# ----- item: ModelOpt quantizes MoE models as dense ones ------------------------------------------------------
def _moe_int4_config() -> HybridConfig:
    """tiny-moe with every quantized input a multiple of AWQ's 128-input groups."""
    return get_preset("tiny-moe").replace(hidden_size=128, intermediate_size=128, mamba_num_heads=4,
                                          mamba_head_dim=32, head_dim=32, moe_intermediate_size=128,
                                          moe_shared_expert_intermediate_size=128)  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "config"),
    [(fmt, get_preset("tiny-moe")) for fmt in ("fp8", "nvfp4", "int8_sq")] + [("int4_awq", _moe_int4_config())],
)
def test_an_moe_model_quantizes_exports_and_loads_back(tmp_path, fmt, config):
    pytest.importorskip("modelopt.torch.quantization")
    from compressor.quantize import export_quantized, quantize

    torch.manual_seed(0)
    model = HybridLM(config).eval()
    source = HybridLM(config).eval()
    source.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (2, 32), generator=generator) for _ in range(2)]
    export_quantized(quantize(model, fmt, batches), tmp_path / fmt)
    layers = QuantizedCheckpoint.read(tmp_path / fmt).layers
    for index, spec in enumerate(config.blocks):
        if spec.kind != "moe":
            continue
        experts = [f"backbone.layers.{index}.mixer.experts.{e}.{p}" for e in range(spec.n_routed_experts)
                   for p in ("up_proj", "down_proj")]  # fmt: skip
        assert set(experts) <= set(layers), "every routed expert is quantized"
        if fmt != "int4_awq":  # every expert has an input scale, also those calibration routed no token to
            assert all(layers[name].input_scale is not None for name in experts)
        assert f"backbone.layers.{index}.mixer.gate" not in layers  # the router stays in high precision
    loaded = load_model(tmp_path / fmt, dtype="float32")
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        reference, quantized = source(ids).float().log_softmax(-1), loaded(ids).float().log_softmax(-1)
    kl = float((reference.exp() * (reference - quantized)).sum(-1).mean())
    assert 0 < kl < 0.05, kl


@pytest.mark.parametrize("name", ["model", "moe"])
def test_compress_quantize_runs_on_dense_and_moe_checkpoints(ws, tmp_path, name):
    pytest.importorskip("modelopt.torch.quantization")
    before = _snapshot(ws)
    args = ["quantize", str(ws / name), "--format", "fp8", "--data", str(ws / "tokens.npy"), "--samples", "4",
            "--seq-len", "32", "--out", str(tmp_path / "q"), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["quant_algo"] == "FP8"
    assert load_model(tmp_path / "q").config.pattern == load_model(ws / name).config.pattern
    assert _snapshot(ws) == before


def test_int4_widths_of_moe_experts_are_checked_before_calibrating():
    from compressor.quantize import quantize

    config = _moe_int4_config().replace(moe_intermediate_size=64)  # the experts' down_proj has 64 inputs
    with pytest.raises(CompressorError, match=r"int4_awq packs 128 inputs per scale, but backbone\.layers\.1\.mixer\."
                                              r"experts\.0\.down_proj has 64 inputs"):  # fmt: skip
        quantize(HybridLM(config), "int4_awq", [torch.zeros(1, 8, dtype=torch.long)])
