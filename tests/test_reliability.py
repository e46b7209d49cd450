"""Nothing a user hands us loses data or prints a traceback; interrupted work resumes.

A table of user mistakes across every command, each asserting exit status 1, one line of output, no
traceback, and every input folder untouched; then kills at every point of a checkpoint save, and an
`--overwrite` run killed midway, each resumed to the bit-identical result of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from cli import app
from compressor.checkpoint import save_model
from compressor.model import HybridLM
from compressor.presets import get_preset
from compressor.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question. Whether tis nobler in the mind to suffer.\n" * 60


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Inputs of every kind, good and broken: checkpoints, data, tokenizers, a search folder."""
    root = tmp_path_factory.mktemp("reliability")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    (root / "text.txt").write_text(TEXT)
    config = get_preset("tiny").replace(vocab_size=300)
    for name, seed, cfg in (
        ("model", 0, config),
        ("teacher", 1, config),
        ("big_vocab", 2, config.replace(vocab_size=320)),
    ):
        torch.manual_seed(seed)
        save_model(HybridLM(cfg), root / name, tokenizer_from=root / "tok")
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, 300, size=64 * 32).astype(np.int32))
    np.save(root / "too_large.npy", np.full(64 * 32, 300, dtype=np.int32))
    np.save(root / "negative.npy", np.full(64 * 32, -1, dtype=np.int32))
    np.save(root / "negative64.npy", np.full(64 * 32, -5, dtype=np.int64))
    # a student whose tokenizer has the teacher's size but other tokens
    other = Tokenizer(models.BPE(unk_token=None))
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(
        [TEXT.upper()],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False),
    )
    (root / "other_tok").mkdir()
    other.save(str(root / "other_tok" / "tokenizer.json"))
    torch.manual_seed(3)
    save_model(HybridLM(config), root / "other_student", tokenizer_from=root / "other_tok")
    _broken_checkpoints(root, config)
    (root / "secret.txt").write_text("a secret")
    (root / "linked").mkdir()
    for file in (root / "model").iterdir():
        (root / "linked" / file.name).write_bytes(file.read_bytes())
    (root / "linked" / "tokenizer.json").unlink()
    (root / "linked" / "tokenizer.json").symlink_to(root / "secret.txt")
    (root / "bad_tokenizer").mkdir()
    (root / "bad_tokenizer" / "tokenizer.json").write_text("{not json")
    (root / "empty").mkdir()
    return root


def _broken_checkpoints(root: Path, config) -> None:
    model = root / "model"

    def copy(name: str) -> Path:
        folder = root / name
        folder.mkdir()
        for file in model.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        return folder

    weights = (model / "model.safetensors").read_bytes()
    copy("truncated").joinpath("model.safetensors").write_bytes(weights[: len(weights) // 2])
    copy("garbage").joinpath("model.safetensors").write_bytes(b"\x00\x01not safetensors at all" * 100)
    copy("empty_weights").joinpath("model.safetensors").write_bytes(b"")
    index = copy("index_list")
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    escape = copy("index_escape")
    (escape / "model.safetensors").rename(root / "escaped.safetensors")
    names = list(load_file(root / "escaped.safetensors"))
    (escape / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, "../escaped.safetensors")})
    )
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    raw = json.loads((model / "config.json").read_text())
    for name, change in {
        "cfg_tsl_int": {"time_step_limit": 5},
        "cfg_overrides_list": {"block_overrides": []},
        "cfg_maxpos_str": {"max_position_embeddings": "4096"},
        "cfg_pattern_list": {"hybrid_override_pattern": ["M", "*"]},
        "cfg_tie_yes": {"tie_word_embeddings": "yes"},
        "cfg_eps_nan": {"layer_norm_epsilon": float("nan")},
        "cfg_tsl_inf": {"time_step_limit": [float("inf"), float("inf")]},
        "cfg_hidden_zero": {"hidden_size": 0},
        "cfg_moe_unknown": {"model_type": "llama"},
    }.items():
        folder = copy(name)
        (folder / "config.json").write_text(json.dumps({**raw, **change}))
    nan = copy("nan_weights")
    tensors = load_file(nan / "model.safetensors")
    tensors["backbone.norm_f.weight"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    (root / "not_json").mkdir()
    (root / "not_json" / "config.json").write_text("{")


def _snapshot(root: Path) -> dict[str, str]:
    """A hash of every input file (outputs of the cases go to `out*` folders, which are left out)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.relative_to(root).parts[0].startswith(("out", ".out")):
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


M, T, TXT, TOK = "{root}/model", "{root}/teacher", "{root}/text.txt", "{root}/tokens.npy"
PRUNE = ["prune", M, "--data", TOK, "--samples", "8", "--score-samples", "4", "--seq-len", "32", "--ctx", "512"]
SEARCH = ["search", M, "--data", TOK, "--samples", "8", "--score-samples", "4", "--seq-len", "32",
          "--target-mem", "90%", "--out", "{root}/out_search"]  # fmt: skip
DISTILL = ["distill", T, M, "--data", TOK, "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4",
           "--steps", "1", "--out", "{root}/out_run"]  # fmt: skip
TRAIN = ["train", M, "--data", TOK, "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4", "--steps", "1",
         "--out", "{root}/out_run"]  # fmt: skip
EVAL = ["eval", M, "--data", TOK, "--seq-len", "32"]
IMPORTANCE = ["importance", M, "--data", TOK, "--samples", "8", "--seq-len", "32", "--out", "{root}/out_scores"]
GENERATE = ["generate", M, "--prompt", "To be"]
QUANTIZE = [
    "quantize",
    M,
    "--format",
    "fp8",
    "--data",
    TOK,
    "--samples",
    "4",
    "--seq-len",
    "32",
    "--out",
    "{root}/out_q",
]

CASES = [
    # info: unreadable or malformed checkpoints and configs
    (["info", "{root}/nowhere"], "neither a checkpoint folder"),
    (["info", "12b-v3"], "neither a checkpoint folder"),
    (["info", "{root}/not_json"], "is not valid JSON"),
    (["info", "{root}/cfg_tsl_int"], "time_step_limit must be a list of 2 numbers"),
    (["info", "{root}/cfg_overrides_list"], "block_overrides must be an object"),
    (["info", "{root}/cfg_maxpos_str"], "max_position_embeddings must be a whole number"),
    (["info", "{root}/cfg_pattern_list"], "hybrid_override_pattern must be a string"),
    (["info", "{root}/cfg_tie_yes"], "tie_word_embeddings must be true or false"),
    (["info", "{root}/cfg_eps_nan"], "layer_norm_epsilon must be a positive number"),
    (["info", "{root}/cfg_tsl_inf"], "time_step_limit must be [low, high]"),
    (["info", "{root}/cfg_hidden_zero"], "hidden_size must be a positive integer"),
    (["info", "{root}/cfg_moe_unknown"], "model_type 'llama' is not supported"),
    (["info", "{root}/truncated"], "cannot be read as safetensors"),
    (["info", "{root}/garbage"], "cannot be read as safetensors"),
    (["info", "{root}/empty_weights"], "cannot be read as safetensors"),
    (["info", "{root}/index_list"], "'weight_map' must map tensor names"),
    (["info", "{root}/index_escape"], "outside"),
    (["info", "{root}/empty"], "no config.json"),
    # estimate
    (["estimate", "9b-v2", "--target-mem", "22GB/s"], "unknown unit 'GB/s'"),
    (["estimate", "9b-v2", "--target-mem", "-1GiB"], "is negative"),
    (["estimate", "9b-v2", "--target-mem", "0GiB"], "must be more than zero"),
    (["estimate", "9b-v2", "--ctx", "128q"], "unknown suffix 'q'"),
    (["estimate", "9b-v2", "--ctx", "0"], "must be more than zero"),
    (["estimate", "9b-v2", "--ctx", "1.5"], "not a whole number"),
    (["estimate", "9b-v2", "--gpu", "a10x"], "unknown GPU 'a10x'"),
    (["estimate", "9b-v2", "--batch", "two"], "--batch 'two' is not a positive whole number"),
    (["estimate", "9b-v2", "--batch", "0"], "--batch '0' is not a positive whole number"),
    (["estimate", "9b-v2", "--batch", "max"], "--batch max needs --target-mem or --gpu"),
    (["estimate", "9b-v2", "--gpu-tflops", "70"], "both --gpu-bandwidth and --gpu-tflops"),
    (["estimate", "9b-v2", "--gpu", "a10g", "--gpu-tflops", "nan"], "--gpu-tflops must be a positive number"),
    (["estimate", "9b-v2", "--gpu", "a10g", "--gpu-tflops", "0"], "--gpu-tflops must be a positive number"),
    (["estimate", "9b-v2", "--gpu-bandwidth", "600GB", "--gpu-tflops", "70"], "is not a size per second"),
    (["estimate", "9b-v2", "--weight-dtype", "int4"], "unknown weight dtype 'int4'"),
    (["estimate", "9b-v2", "--kv-dtype", "fp4"], "unknown KV cache dtype 'fp4'"),
    (["estimate", "9b-v2", "--ssm-dtype", "fp8"], "unknown SSM state dtype 'fp8'"),
    (["estimate", "9b-v2", "--prefill-chunk", "-100"], "--prefill-chunk must be >= 0"),
    (["estimate", "9b-v2", "--gpu", "a10g", "--isl", "0"], "must be more than zero"),
    (["estimate", "9b-v2", "--vs", "qwen3-8b"], "--vs compares throughput: give a GPU"),
    (["estimate", "9b-v2", "--gpu", "h100", "--vs", "gpt-9"], "gpt-9"),
    (["estimate", "9b-v2", "--gpu", "h100", "--vs", "{root}/model"], "model_type"),
    (["estimate", "{root}/model", "--ctx", "1k", "--measure", "--device", "cuda:7"], "cuda:7"),
    (["estimate", "{root}/cfg_tsl_inf"], "time_step_limit"),
    # init
    (["init", "{root}/out_init"], "give exactly one of --preset NAME or --config JSON"),
    (["init", "{root}/out_init", "--preset", "tiny", "--config", "{root}/model/config.json"], "give exactly one"),
    (["init", "{root}/out_init", "--preset", "tyni"], "tyni"),
    (["init", "{root}/out_init", "--preset", "tiny", "--set", "hidden_size"], "is not KEY=VALUE"),
    (
        ["init", "{root}/out_init", "--preset", "tiny", "--set", "hidden_size=wide"],
        "hidden_size must be a whole number",
    ),
    (["init", "{root}/out_init", "--preset", "tiny", "--set", "mamba_num_heads=7"], "not divisible by n_groups"),
    (["init", "{root}/out_init", "--preset", "tiny", "--tokenizer", "{root}/bad_tokenizer"], "cannot read tokenizer"),
    (["init", "{root}/out_init", "--preset", "tiny", "--tokenizer", "{root}/empty"], "no tokenizer at"),
    (
        ["init", "{root}/out_init", "--preset", "tiny", "--set", "vocab_size=10", "--tokenizer", "{root}/tok"],
        "add --set vocab_size=",
    ),
    (["init", "{root}/model", "--preset", "tiny"], "already exists"),
    (["init", "{root}/out_init", "--preset", "tiny", "--seed", "-1"], "--seed must be at least 0"),
    (["init", "{root}/out_init", "--preset", "tiny", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["init", "{root}/out_init", "--layers", "8", "--attention-ratio", "0.7", "--mlp-ratio", "0.5"], "ratio"),
    (["init", "{root}/out_init", "--layers", "0"], "layer"),
    (["init", "{root}/out_init", "--preset", "tiny", "--mlp-ratio", "0.5"], "give --layers too"),
    (["init", "{root}/out_init", "--preset", "56b"], "GiB of memory is available"),
    # eval
    (["eval", "{root}/nowhere", "--data", TOK], "no config.json"),
    (["eval", "{root}/truncated", "--data", TOK], "cannot be read as safetensors"),
    (["eval", "{root}/garbage", "--data", TOK], "cannot be read as safetensors"),
    (["eval", "{root}/pickled", "--data", TOK], "pickle"),
    (["eval", "{root}/nan_weights", "--data", TOK], "NaN or infinite weights"),
    (["eval", "{root}/index_escape", "--data", TOK], "outside"),
    (["eval", M, "--data", "{root}/too_large.npy"], "token id 300, outside the model's vocabulary of 300"),
    (["eval", M, "--data", "{root}/negative.npy"], "token id -1"),
    (["eval", M, "--data", "{root}/negative64.npy"], "has negative token ids (the least is -5)"),
    (["eval", M, "--data", "{root}/missing.txt"], "missing.txt"),
    (["eval", M, "--data", "/dev/null"], "/dev/null"),
    ([*EVAL, "--seq-len", "1"], "--seq-len must be at least 2"),
    ([*EVAL, "--batch-size", "0"], "--batch-size must be at least 1"),
    ([*EVAL, "--max-sequences", "0"], "--max-sequences must be at least 1"),
    ([*EVAL, "--split", "test"], "--split 'test' is not one of"),
    ([*EVAL, "--split", "valid", "--valid-fraction", "1.5"], "--valid-fraction must be between 0 and 1"),
    ([*EVAL, "--split", "valid", "--seed", "-1"], "--seed must be at least 0"),
    ([*EVAL, "--dtype", "int8"], "unknown dtype 'int8'"),
    ([*EVAL, "--device", "tpu"], "unknown device 'tpu'"),
    ([*EVAL, "--teacher", "{root}/big_vocab"], "teacher vocabulary (320) differs"),
    (["eval", "{root}/other_student", *EVAL[2:], "--teacher", T], "the tokenizers of {root}/teacher and"),
    (["eval", M, "{root}/other_student", *EVAL[2:]], "models compared on the same token ids must share one tokenizer"),
    (["eval", M, "{root}/model/", *EVAL[2:]], "{root}/model is given twice: give each once"),
    (["eval", M, "{root}/model/../model", *EVAL[2:]], "and {root}/model/../model are one checkpoint"),
    (["eval", M, "--data", TXT, "--seq-len", "32", "--tokenizer", "{root}/bad_tokenizer"], "cannot read tokenizer"),
    (["eval", M, "--data", TXT, "--seq-len", "100000"], "fewer than seq_len=100000"),
    ([*EVAL, "--teacher", "{root}/nan_weights"], "NaN or infinite weights"),
    # generate
    ([*GENERATE, "--top-k", "0"], "--top-k must be at least 1"),
    ([*GENERATE, "--top-p", "-0.5"], "--top-p must be in (0, 1]"),
    ([*GENERATE, "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ([*GENERATE, "--temperature", "nan"], "--temperature must be 0 (greedy) or a positive number"),
    ([*GENERATE, "--temperature", "-1"], "--temperature must be 0 (greedy) or a positive number"),
    ([*GENERATE, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ([*GENERATE, "--max-new-tokens", "100000000000"], "--max-new-tokens is too many"),
    ([*GENERATE, "--seed", "-1"], "--seed must be at least 0"),
    (["generate", M, "--prompt", ""], "--prompt is empty after tokenization"),
    ([*GENERATE, "--top-k", "5"], "--top-k applies with --temperature above 0 (0 decodes greedily) only"),
    ([*GENERATE, "--seed", "3"], "--seed applies with --temperature above 0"),
    (["generate", "{root}/nan_weights", "--prompt", "To be"], "NaN or infinite weights"),
    (["generate", "{root}/empty", "--prompt", "To be"], "no config.json"),
    # importance
    ([*IMPORTANCE, "--samples", "0"], "--samples must be at least 1"),
    ([*IMPORTANCE, "--seq-len", "1"], "--seq-len must be at least 2"),
    ([*IMPORTANCE, "--batch-size", "0"], "--batch-size must be at least 1"),
    ([*IMPORTANCE, "--drop-one", "kld"], "--drop-one 'kld' is not one of"),
    ([*IMPORTANCE, "--seq-reduce", "median"], "--seq-reduce 'median' is not one of"),
    ([*IMPORTANCE, "--batch-reduce", "sum"], "--batch-reduce 'sum' is not one of"),
    ([*IMPORTANCE, "--mamba-signal", "y"], "--mamba-signal 'y' is not one of"),
    ([*IMPORTANCE, "--iterative-rounds", "2"], "choose --drop-one kl, loss or retrieval"),
    ([*IMPORTANCE, "--iterative-rounds", "-1", "--drop-one", "kl"], "--iterative-rounds must be at least 0"),
    ([*IMPORTANCE, "--samples", "1000"], "fewer than --samples 1000"),
    (
        [
            "importance",
            M,
            "--data",
            "{root}/too_large.npy",
            "--samples",
            "8",
            "--seq-len",
            "32",
            "--out",
            "{root}/out_s",
        ],
        "token id 300",
    ),
    (["importance", M, "--data", TOK, "--samples", "8", "--seq-len", "32", "--out", M], "already exists"),
    (
        ["importance", M, "--data", TOK, "--samples", "8", "--seq-len", "32", "--out", M, "--overwrite"],
        "output {root}/model is the input",
    ),
    (
        ["importance", M, "--data", TOK, "--samples", "8", "--seq-len", "32", "--out", "{root}/model/scores"],
        "lies inside the input",
    ),
    (
        [
            "importance",
            "{root}/nan_weights",
            "--data",
            TOK,
            "--samples",
            "8",
            "--seq-len",
            "32",
            "--out",
            "{root}/out_s",
        ],
        "NaN or infinite",
    ),
    # prune
    ([*PRUNE, "--out", "{root}/out_p"], "give a budget"),
    ([*PRUNE, "--target-mem", "1KiB", "--out", "{root}/out_p"], "no candidate meets the budget"),
    ([*PRUNE, "--target-mem", "22GB/s", "--out", "{root}/out_p"], "bandwidth"),
    ([*PRUNE, "--target-mem", "90%", "--out", "{root}/out_p"], "unknown unit"),
    ([*PRUNE, "--target-mem", "1GiB", "--score", "ppl", "--out", "{root}/out_p"], "--score 'ppl' is not one of"),
    ([*PRUNE, "--target-mem", "1GiB", "--strategy", "nope", "--out", "{root}/out_p"], "--strategy 'nope' is unknown"),
    ([*PRUNE, "--target-mem", "1GiB", "--axes", "width", "--out", "{root}/out_p"], "--axes width: choose from"),
    ([*PRUNE, "--target-mem", "1GiB", "--axes", "", "--out", "{root}/out_p"], "--axes"),
    ([*PRUNE, "--target-mem", "1GiB", "--top-k", "0", "--out", "{root}/out_p"], "--top-k must be at least 1"),
    ([*PRUNE, "--target-mem", "1GiB", "--top-k", "two", "--out", "{root}/out_p"], "--top-k takes a int, got 'two'"),
    (
        [*PRUNE, "--target-mem", "1GiB", "--max-width-pruning", "1", "--out", "{root}/out_p"],
        "--max-width-pruning must be in [0, 1)",
    ),
    (
        [*PRUNE, "--target-mem", "1GiB", "--max-depth-pruning", "-0.1", "--out", "{root}/out_p"],
        "--max-depth-pruning must be in [0, 1)",
    ),
    (
        [*PRUNE, "--target-mem", "1GiB", "--hidden-choices", "2", "--out", "{root}/out_p"],
        "--hidden-choices is not an option of the minitron strategy",
    ),
    (
        [*PRUNE, "--target-mem", "1GiB", "--strategy", "minipuzzle", "--ffn-fractions", "a,b", "--out", "{root}/out_p"],
        "--ffn-fractions takes a float, got 'a'",
    ),
    (
        [*PRUNE, "--target-mem", "1GiB", "--strategy", "minipuzzle", "--ffn-fractions", "0", "--out", "{root}/out_p"],
        "--ffn-fractions must be fractions",
    ),
    (
        [*PRUNE, "--target-mem", "1GiB", "--depth-scores", "best", "--out", "{root}/out_p"],
        "--depth-scores 'best' is not one of",
    ),
    ([*PRUNE, "--export-config", "{not json", "--out", "{root}/out_p"], "--export-config is not a valid JSON object"),
    ([*PRUNE, "--export-config", "{root}/no.json", "--out", "{root}/out_p"], "no file {root}/no.json exists"),
    ([*PRUNE, "--export-config", '{"layers": 3}', "--out", "{root}/out_p"], "has unknown key(s) ['layers']"),
    (
        [*PRUNE, "--export-config", '{"hidden_size": 0}', "--out", "{root}/out_p"],
        "hidden_size must be a positive whole number",
    ),
    (
        [*PRUNE, "--export-config", '{"hidden_size": "a"}', "--out", "{root}/out_p"],
        "hidden_size must be a positive whole number",
    ),
    ([*PRUNE, "--export-config", '{"hidden_size": 4096}', "--out", "{root}/out_p"], "larger than the model's"),
    ([*PRUNE, "--export-config", "[1, 2]", "--out", "{root}/out_p"], "--export-config must be a JSON object"),
    ([*PRUNE, "--target-mem", "1GiB", "--out", M, "--overwrite"], "output {root}/model is the input"),
    ([*PRUNE, "--target-mem", "1GiB", "--out", "{root}/model/pruned"], "lies inside the input"),
    ([*PRUNE, "--target-mem", "1GiB", "--out", "{root}"], "already exists"),
    ([*PRUNE, "--target-mem", "1GiB", "--out", "{root}", "--overwrite"], "holds the input"),
    ([*PRUNE, "--target-mem", "1GiB"], "--out is needed"),
    ([*PRUNE, "--target-mem", "1GiB", "--samples", "0", "--out", "{root}/out_p"], "--samples must be at least 1"),
    (
        [*PRUNE, "--target-mem", "1GiB", "--score-samples", "-1", "--out", "{root}/out_p"],
        "--score-samples must be at least 0",
    ),
    ([*PRUNE, "--target-mem", "1GiB", "--seq-len", "1", "--out", "{root}/out_p"], "--seq-len must be at least 2"),
    ([*PRUNE, "--target-mem", "1GiB", "--batch-size", "0", "--out", "{root}/out_p"], "--batch-size must be at least 1"),
    ([*PRUNE, "--target-mem", "1GiB", "--batch", "0", "--out", "{root}/out_p"], "--batch must be at least 1"),
    ([*PRUNE, "--min-speedup", "1.2", "--out", "{root}/out_p"], "needs a GPU"),
    (
        [*PRUNE, "--gpu", "a10g", "--min-speedup", "-1", "--out", "{root}/out_p"],
        "--min-speedup must be a positive number",
    ),
    (
        [*PRUNE, "--target-mem", "1GiB", "--importance", "{root}/empty", "--out", "{root}/out_p"],
        "is not an importance folder",
    ),
    (
        [*PRUNE, "--target-mem", "1GiB", "--samples", "1000", "--out", "{root}/out_p"],
        "fewer than the 1000 for importance",
    ),
    (
        [
            "prune",
            M,
            "--data",
            "{root}/too_large.npy",
            "--samples",
            "8",
            "--seq-len",
            "32",
            "--target-mem",
            "1GiB",
            "--out",
            "{root}/out_p",
        ],
        "token id 300",
    ),
    (
        ["prune", "{root}/garbage", "--data", TOK, "--target-mem", "1GiB", "--out", "{root}/out_p"],
        "cannot be read as safetensors",
    ),
    (["prune", "12b-v2", "--target-mem", "1GiB", "--ctx", "128k", "--dry-run"], "no candidate meets the budget"),
    (["prune", "12b-v2", "--dry-run"], "give a budget"),
    # search
    (["search", M, "--out", "{root}/out_search", "--target-mem", "1GiB"], "--data is needed"),
    (["search", M, "--data", TOK, "--out", "{root}/out_search"], "give a budget"),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--candidates", "0", "--out", "{root}/out_search"],
        "--candidates must be at least 1",
    ),
    ([*SEARCH[:-4], "--target-mem", "1GiB", "--distill-tokens", "2X", "--out", "{root}/out_search"], "token count"),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--rank-by", "ppl", "--out", "{root}/out_search"],
        "--rank-by 'ppl' is not one of",
    ),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--attention-loss", "-1", "--out", "{root}/out_search"],
        "--attention-loss must be at least 0",
    ),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--batch-size", "0", "--out", "{root}/out_search"],
        "--batch-size must be at least 1",
    ),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--micro-batch-size", "0", "--out", "{root}/out_search"],
        "--micro-batch-size must be at least 1",
    ),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--batch-size", "6", "--out", "{root}/out_search"],
        "--batch-size must be a multiple of --micro-batch-size",
    ),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--lr", "0", "--out", "{root}/out_search"],
        "--lr must be a positive number",
    ),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--min-lr", "1", "--out", "{root}/out_search"],
        "--min-lr must be between 0 and --lr",
    ),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--strategy", "nope", "--out", "{root}/out_search"],
        "--strategy 'nope' is unknown",
    ),
    ([*SEARCH[:-4], "--target-mem", "1GiB", "--out", M, "--overwrite"], "output {root}/model is the input"),
    ([*SEARCH[:-4], "--target-mem", "1GiB", "--out", "{root}", "--overwrite"], "holds the input"),
    (["search", M, "--out", "{root}/empty", "--resume"], "is not a search folder"),
    (["search", M, "--out", "{root}/out_none", "--resume"], "is not a search folder"),
    (
        [*SEARCH[:-4], "--target-mem", "1GiB", "--out", "{root}/out_search", "--resume", "--overwrite"],
        "--resume continues {root}/out_search, --overwrite replaces it: give one",
    ),
    # materialize
    (["materialize", "{root}/empty", "0", "--out", "{root}/out_m"], "is not a search folder"),
    (["materialize", M, "0", "--out", "{root}/out_m"], "is not a search folder"),
    # distill
    ([*DISTILL[:1], T, "{root}/nowhere", *DISTILL[3:]], "no config.json"),
    ([*DISTILL[:1], "{root}/big_vocab", M, *DISTILL[3:]], "teacher vocabulary (320) differs"),
    ([*DISTILL[:1], T, "{root}/other_student", *DISTILL[3:]], "the tokenizers of"),
    ([*DISTILL[:1], T, "{root}/nan_weights", *DISTILL[3:]], "NaN or infinite weights"),
    ([*DISTILL[:-1], M, "--overwrite"], "output {root}/model is the input"),
    ([*DISTILL[:-1], "{root}", "--overwrite"], "holds the input"),
    ([*DISTILL[:-1], "{root}/model/run"], "lies inside the input"),
    ([*DISTILL, "--temperature", "0"], "--temperature must be a positive number"),
    ([*DISTILL, "--lm-weight", "2"], "--lm-weight must be in [0, 1]"),
    ([*DISTILL, "--divergence", "kl"], "--divergence 'kl' is not one of"),
    ([*DISTILL, "--chunk-tokens", "0"], "--chunk-tokens must be at least 1"),
    ([*DISTILL, "--jsd-beta", "1"], "--jsd-beta must be strictly between 0 and 1"),
    ([*DISTILL, "--batch-size", "0"], "--batch-size must be at least 1"),
    ([*DISTILL, "--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    ([*DISTILL, "--micro-batch-size", "3"], "--batch-size must be a multiple of --micro-batch-size"),
    ([*DISTILL, "--warmup-steps", "-5"], "--warmup-steps must be at least 0"),
    ([*DISTILL, "--valid-fraction", "0.5", "--warmup-steps", "2"], "--warmup-steps must be at most the run's 1 steps"),
    ([*DISTILL, "--weight-decay", "nan"], "--weight-decay must be at least 0"),
    ([*DISTILL, "--grad-clip", "-1"], "--grad-clip must be at least 0"),
    ([*DISTILL, "--schedule", "linear"], "--schedule must be cosine, wsd or constant"),
    ([*DISTILL, "--decay-fraction", "0"], "--decay-fraction must be in (0, 1]"),
    ([*DISTILL, "--tokens", "2X"], "token count"),
    ([*DISTILL, "--tokens", "1k"], "--tokens and --steps both set"),
    ([*DISTILL, "--valid-fraction", "1"], "--valid-fraction must be between 0 and 1"),
    ([*DISTILL, "--seq-len", "1"], "--seq-len must be at least 2"),
    ([*DISTILL, "--eval-sequences", "0"], "--eval-sequences must be at least 1"),
    ([*DISTILL, "--save-every", "0"], "--save-every must be at least 1"),
    ([*DISTILL, "--max-sequences", "0"], "--max-sequences must be at least 1"),
    ([*DISTILL, "--seed", "-1"], "--seed must be at least 0"),
    ([*DISTILL, "--top-k", "0", "--cache-teacher"], "--top-k must be at least 1"),
    ([*DISTILL, "--top-k", "100000000", "--cache-teacher"], "--top-k must be at most 33,554,432"),
    # options that would do nothing in this run
    ([*DISTILL, "--top-k", "8"], "--top-k applies with --cache-teacher only"),
    ([*DISTILL, "--cache-targets", "top-k"], "--cache-targets applies with --cache-teacher only"),
    ([*DISTILL, "--teacher-cache", "{root}/tc"], "--teacher-cache applies with --cache-teacher only"),
    ([*DISTILL, "--cache-teacher", "--cache-targets", "top-p"], "--cache-targets must be one of sampled, top-k"),
    (
        [*DISTILL, "--cache-teacher", "--divergence", "jsd", "--cache-targets", "sampled"],
        "--cache-targets must be top-k",
    ),
    ([*DISTILL, "--attention-queries", "8"], "--attention-queries applies with --attention-loss only"),
    ([*DISTILL, "--calib-sequences", "8"], "--calib-sequences applies with --quantize only"),
    ([*DISTILL, "--eval-ctx", "2k"], "--eval-ctx applies with --eval-task only"),
    ([*IMPORTANCE, "--drop-one", "kl", "--iterative-rounds", "100"], "at most 8 for 9 blocks, got 100"),
    ([*DISTILL, "--jsd-beta", "0.9"], "--jsd-beta applies with --divergence jsd only"),
    ([*DISTILL, "--decay-fraction", "0.5"], "--decay-fraction applies with --schedule wsd only"),
    ([*DISTILL, "--schedule", "constant", "--min-lr", "0"], "--min-lr applies with --schedule cosine or wsd only"),
    ([*PRUNE, "--target-mem", "1GiB", "--dry-run", "--retrieval-task", "mqar"], "--retrieval-task applies with a"),
    ([*SEARCH[:-4], "--target-mem", "1GiB", *SEARCH[-2:], "--retrieval-sequences", "2"], "--retrieval-sequences appl"),
    ([*IMPORTANCE, "--retrieval-ctx", "2k"], "--retrieval-ctx applies with --drop-one retrieval only"),
    ([*IMPORTANCE, "--resume"], "nothing to resume: no estimate of {root}/out_scores was stopped"),
    ([*IMPORTANCE, "--resume", "--overwrite"], "--resume continues the estimate of {root}/out_scores, --overwrite"),
    ([*IMPORTANCE, "--resume", "--dry-run"], "nothing to resume"),
    ([*DISTILL, "--nproc", "2"], "--nproc sizes the plan of a --dry-run only"),
    ([*IMPORTANCE, "--gpu", "h200"], "--gpu sizes the plan of a --dry-run only"),
    ([*SEARCH[:-4], "--target-mem", "1GiB", *SEARCH[-2:], "--bld-epochs", "3"], "--bld-epochs applies with --bld"),
    ([*EVAL, "--limit", "5"], "--limit applies to --lm-eval-tasks evaluation only"),
    (["eval", M, "--task", "phonebook", "--seq-len", "64"], "--seq-len applies to --data evaluation only"),
    (["eval", M, "--task", "mqar", "--weights-only"], "--weights-only applies to --lm-eval-tasks or --data evaluation"),
    (["eval", M, "--task", "mqar", "--data", TXT], "--data is the needle task's filler text: mqar"),
    (["eval", M, "--task", "mqar", "--lm-eval-tasks", "x"], "--lm-eval-tasks and --task are two evaluations"),
    ([*EVAL, "--valid-fraction", "0.2"], "--valid-fraction applies with --split valid or --split train only"),
    ([*DISTILL, "--quantize", "int4"], "--quantize must be fp8 or nvfp4"),
    ([*DISTILL, "--resume"], "nothing to resume"),
    ([*DISTILL, "--resume", "--overwrite"], "--resume continues {root}/out_run, --overwrite replaces it: give one"),
    ([*DISTILL, "--dtype", "float8"], "unknown dtype 'float8'"),
    ([*DISTILL, "--autocast", "fp16"], "--autocast must be auto, bf16 or off"),
    ([*DISTILL[:4], "{root}/too_large.npy", *DISTILL[5:]], "token id 300"),
    ([*DISTILL[:4], "{root}/missing.npy", *DISTILL[5:]], "missing.npy"),
    # a dry run checks the paths it is given as the run would
    ([*DISTILL[:4], "{root}/missing.npy", *DISTILL[5:], "--dry-run"], "missing.npy"),
    ([*DISTILL, "--dry-run", "--resume"], "nothing to resume"),
    ([*TRAIN[:-1], "{root}/tok", "--dry-run"], "output {root}/tok already exists"),
    ([*PRUNE, "--target-mem", "1GiB", "--dry-run", "--importance", "{root}/empty"], "is not an importance folder"),
    ([*IMPORTANCE[:-1], "{root}/model", "--dry-run", "--overwrite"], "output {root}/model is the input"),
    ([*SEARCH[:-4], "--target-mem", "1GiB", *SEARCH[-2:], "--dry-run", "--resume"], "--resume does not apply to"),
    ([*SEARCH[:-4], "--target-mem", "1GiB", "--out", "{root}/tok", "--dry-run"], "output {root}/tok already exists"),
    # train
    ([*TRAIN, "--steps", "0"], "--steps must be at least 1"),
    ([*TRAIN, "--lr", "-1"], "--lr must be a positive number"),
    ([*TRAIN[:-1], M, "--overwrite"], "output {root}/model is the input"),
    ([*TRAIN, "--log-every", "0"], "--log-every must be at least 1"),
    ([*TRAIN, "--eval-every", "0"], "--eval-every must be at least 1"),
    ([*TRAIN, "--resume"], "nothing to resume"),
    ([*TRAIN, "--resume", "--overwrite"], "--resume continues {root}/out_run, --overwrite replaces it: give one"),
    ([*TRAIN, "--seq-len", "100000"], "fewer than seq_len=100000"),
    (["train", "{root}/truncated", *TRAIN[2:]], "cannot be read as safetensors"),
    # quantize
    ([*QUANTIZE[:3], "fp5", *QUANTIZE[4:]], "unknown quantization format 'fp5'"),
    ([*QUANTIZE, "--samples", "0"], "--samples must be at least 1"),
    ([*QUANTIZE, "--seq-len", "1"], "--seq-len must be at least 2"),
    ([*QUANTIZE, "--dtype", "int4"], "unknown dtype 'int4'"),
    ([*QUANTIZE[:-1], M, "--overwrite"], "output {root}/model is the input"),
    ([*QUANTIZE, "--samples", "1000"], "fewer than --samples 1000"),
    ([*QUANTIZE[:3], "int4_awq", *QUANTIZE[4:]], "int4_awq packs 128 inputs per scale"),
]


def test_the_battery_covers_every_command():
    commands = {case[0][0] for case in CASES}
    assert commands == {
        c.name or c.callback.__name__ for c in __import__("typer").main.get_command(app).commands.values()
    }
    assert len(CASES) >= 150


def _last_wins(args: list[str]) -> list[str]:
    """A case changes an option of its base command line (IMPORTANCE, PRUNE, ...) by giving it again: the later
    value replaces the earlier one (the command line itself refuses an option given twice)."""
    segments: dict[str, list[str]] = {}
    position = 0
    while position < len(args):
        token = args[position]
        takes_value = token.startswith("--") and position + 1 < len(args) and not args[position + 1].startswith("--")
        segment = args[position : position + 1 + takes_value]
        key = token if token.startswith("--") else f"{position}"
        segments.pop(key, None)
        segments[key] = segment
        position += len(segment)
    return [token for segment in segments.values() for token in segment]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[f"{i}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_a_user_mistake_is_one_line_and_loses_nothing(ws, args, message):
    before = _snapshot(ws)
    formatted = _last_wins([a.replace("{root}", str(ws)) for a in args])
    result = CliRunner().invoke(app, formatted)
    output = result.output.strip()
    assert isinstance(result.exception, SystemExit), f"{formatted}: {result.exception!r}"
    assert result.exit_code == 1, f"{formatted}: exit {result.exit_code}: {output}"
    assert "Traceback" not in output and len(output.splitlines()) == 1, f"{formatted}: {output}"
    assert message.replace("{root}", str(ws)) in output.removeprefix("error: "), f"{formatted}: {output}"
    assert _snapshot(ws) == before, f"{formatted} changed an input"
    assert not any(p.name.startswith("out") for p in ws.iterdir()), f"{formatted} left an output behind"


def test_links_out_of_a_checkpoint_are_not_followed_or_copied(ws, tmp_path):
    """A tokenizer.json linking to a file outside the folder is never copied into an output."""
    result = CliRunner().invoke(app, ["importance", str(ws / "linked"), "--data", str(ws / "tokens.npy"),
                                      "--samples", "8", "--seq-len", "32", "--out", str(tmp_path / "s")])  # fmt: skip
    assert result.exit_code == 0, result.output
    shape = '{"hidden_size": 32}'
    result = CliRunner().invoke(app, ["prune", str(ws / "linked"), "--importance", str(tmp_path / "s"),
                                      "--export-config", shape, "--out", str(tmp_path / "p")])  # fmt: skip
    assert result.exit_code == 1 and "tokenizer.json resolves to" in result.output and "outside" in result.output
    assert not (tmp_path / "p").exists()


# ----- kills --------------------------------------------------------------------------------------------
KILLER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import compressor.outputs as outputs
    from compressor.train import TrainConfig, train

    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        real(src, dst)
        if calls[0] == {kill_after}:
            os._exit(9)  # a kill: no cleanup, no finally

    outputs.os.replace = replace
    train(TrainConfig(**{config!r}))
    """
)


def _config(ws: Path, out: Path, **changes) -> dict:
    config = dict(student=str(ws / "model"), teacher=str(ws / "teacher"), out=str(out), data=str(ws / "tokens.npy"),
                  seq_len=32, batch_size=4, micro_batch_size=4, steps=6, lr=3e-3, eval_every=3, save_every=2,
                  eval_sequences=4, valid_fraction=0.1, device="cpu")  # fmt: skip
    return {**config, **changes}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def whole(ws, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the run the kill tests interrupt, trained without interruption."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(TrainConfig(**_config(ws, out)))
    return _weights(out / "model")


@pytest.mark.parametrize("kill_after", [3, 4, 5])
def test_a_kill_anywhere_in_a_checkpoint_swap_resumes_bit_identically(ws, whole, tmp_path, kill_after):
    """The second save swaps the new checkpoint in with os.replace calls 3 (temp -> complete), 4 (old out of
    the way) and 5 (new in place); a kill after any of them, then --resume, gives the uninterrupted weights."""
    script = KILLER.format(root=str(ROOT), kill_after=kill_after, config=_config(ws, tmp_path / "killed"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    train(TrainConfig(**_config(ws, tmp_path / "killed", resume=True)))
    killed = _weights(tmp_path / "killed" / "model")
    assert whole.keys() == killed.keys() and all(torch.equal(whole[k], killed[k]) for k in whole)
    leftovers = [p.name for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_an_overwrite_run_killed_midway_leaves_the_old_run_and_resumes(ws, tmp_path):
    train(TrainConfig(**_config(ws, tmp_path / "run", steps=2)))
    old = _snapshot(tmp_path / "run")
    script = KILLER.format(root=str(ROOT), kill_after=3, config=_config(ws, tmp_path / "run", overwrite=True, seed=1))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    assert _snapshot(tmp_path / "run") == old  # the finished run is untouched until the new one is complete
    assert (tmp_path / ".run.incoming" / "model").is_dir()
    train(TrainConfig(**_config(ws, tmp_path / "run", seed=1, resume=True)))
    train(TrainConfig(**_config(ws, tmp_path / "fresh", seed=1)))
    resumed, fresh = _weights(tmp_path / "run" / "model"), _weights(tmp_path / "fresh" / "model")
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)
    assert not (tmp_path / ".run.incoming").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_resume(ws, whole, tmp_path):
    script = KILLER.format(root=str(ROOT), kill_after=1, config=_config(ws, tmp_path / "run"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    import shutil

    for partial in (tmp_path / "run").glob(".model.*-*"):  # as if killed before the first checkpoint was complete
        shutil.rmtree(partial)
    assert not (tmp_path / "run" / "model").exists()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a torn last line
    train(TrainConfig(**_config(ws, tmp_path / "run", resume=True)))
    resumed = _weights(tmp_path / "run" / "model")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_two_writers_cannot_both_win(ws, tmp_path):
    from compressor.errors import CompressorError
    from compressor.outputs import atomic_output, output_lock

    with output_lock(tmp_path / "out"):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        other = subprocess.run(
            [sys.executable, "-c", "from compressor.outputs import atomic_output\n"
             f"with atomic_output({str(tmp_path / 'out')!r}) as tmp: (tmp / 'x').write_text('x')"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert other.returncode != 0 and "another compress run is writing" in other.stderr
        with atomic_output(tmp_path / "out") as tmp:  # the holder itself may write
            (tmp / "mine").write_text("mine")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine"]
    with pytest.raises(CompressorError, match="already exists"), atomic_output(tmp_path / "out"):
        pass


# ----- output folders read back: untrusted input -------------------------------------------------------------
def _refused(result, message: str) -> None:
    """A one-line error naming `message`, exit status 1, no traceback."""
    output = result.output.strip()
    assert isinstance(result.exception, SystemExit), f"{result.exception!r}: {output}"
    assert result.exit_code == 1 and "Traceback" not in output and len(output.splitlines()) == 1, output
    assert message in output, output


def _edit_json(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def searched(ws, tmp_path_factory) -> Path:
    """A finished search of the workspace's model: two candidates scored, one finalist distilled briefly."""
    out = tmp_path_factory.mktemp("searched") / "search"
    result = CliRunner().invoke(app, ["search", str(ws / "model"), "--data", str(ws / "tokens.npy"), "--samples", "8",
                                      "--score-samples", "4", "--seq-len", "32", "--strategy", "minitron", "--top-k",
                                      "2", "--candidates", "1", "--distill-tokens", "128", "--batch-size", "2",
                                      "--micro-batch-size", "2", "--target-params", "160000", "--device", "cpu",
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _search_copy(searched: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of the finished search to damage, and the index of its finalist."""
    folder = tmp_path / "search"
    shutil.copytree(searched, folder)
    raw = json.loads((folder / "search.json").read_text())
    return folder, next(c["index"] for c in raw["candidates"] if c["finalist"])


def _resume(ws: Path, folder: Path, *, model: Path | None = None, data: bool = True):
    extra = ["--data", str(ws / "tokens.npy")] if data else []
    args = ["search", str(model or ws / "model"), *extra, "--device", "cpu", "--out", str(folder), "--resume"]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("index", ["../../victim", "{abs}", -1, 0.5, True])
def test_a_search_folder_cannot_send_resume_outside_it(ws, searched, tmp_path, index):
    """A candidate's index names its folder: one that is no whole number >= 0 is refused before anything is
    read, written or deleted (it used to write pruned/, distill/ and result.json at ../../victim)."""
    folder, finalist = _search_copy(searched, tmp_path)
    shutil.rmtree(folder / "candidates" / str(finalist))  # so that a resume would prune and distill it again
    index = str(tmp_path / "abs_victim") if index == "{abs}" else index

    def hostile(raw):
        next(c for c in raw["candidates"] if c["index"] == finalist)["index"] = index

    _edit_json(folder / "search.json", hostile)
    before, inputs = _snapshot(folder), _snapshot(ws)
    _refused(_resume(ws, folder), "index")
    assert not (tmp_path / "victim").exists() and not (tmp_path / "abs_victim").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search"]
    assert _snapshot(folder) == before and _snapshot(ws) == inputs


def test_a_link_in_a_search_folder_is_refused_on_resume(ws, searched, tmp_path):
    folder, finalist = _search_copy(searched, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(folder / "candidates" / str(finalist))
    (folder / "candidates" / str(finalist)).symlink_to(outside)  # a resume would prune and distill into it
    before = _snapshot(folder)
    _refused(_resume(ws, folder), "is a symbolic link")
    assert list(outside.iterdir()) == [] and _snapshot(folder) == before


def test_search_resume_reads_the_model_and_data_the_command_line_names(ws, searched, tmp_path):
    """search.json says how the search read its source; what is read is what the user names, checked
    against the record's fingerprints (the paths in the record are never opened)."""
    folder, _ = _search_copy(searched, tmp_path)

    def elsewhere(raw):
        raw["calibration"].update(model=str(tmp_path / "nowhere"), data=str(ws / "secret.txt"))

    _edit_json(folder / "search.json", elsewhere)
    result = _resume(ws, folder)
    assert result.exit_code == 0, result.output
    before = _snapshot(folder)
    _refused(_resume(ws, folder, model=ws / "teacher"), "is not the model this search started from")
    _refused(_resume(ws, folder, data=False), "--data is needed to resume too")
    assert _snapshot(folder) == before


DAMAGED_SEARCHES = {
    "seq_len_text": ("search.json", lambda r: r["calibration"].update(seq_len="32"), "json: calibration.seq_len must"),
    "samples_negative": ("search.json", lambda r: r["calibration"].update(samples=-3), "samples must be at least 1"),
    "lr_null": ("search.json", lambda r: r["distill"].update(lr=None), "distill.lr must be a number"),
    "candidates_text": ("search.json", lambda r: r.update(candidates="all"), "candidates must be a list"),
    "ranking_unknown": ("search.json", lambda r: r.update(ranking=[7]), "no candidate's index 7"),
    "hidden_wide": ("search.json", lambda r: r["candidates"][0]["target"].update(hidden_size=10**6),
                    "target hidden_size 1000000"),
    "block_missing": ("search.json", lambda r: r["candidates"][0]["target"]["blocks"][0].update(source=99),
                      "target block 99"),
    "result_text": ("result.json", lambda r: r.update(val_kl="low"), "val_kl must be a number"),
}  # fmt: skip


@pytest.mark.parametrize("case", DAMAGED_SEARCHES)
def test_a_damaged_search_record_is_one_line(ws, searched, tmp_path, case):
    name, damage, message = DAMAGED_SEARCHES[case]
    folder, finalist = _search_copy(searched, tmp_path)
    _edit_json(folder / name if name == "search.json" else folder / "candidates" / str(finalist) / name, damage)
    before, inputs = _snapshot(folder), _snapshot(ws)
    _refused(_resume(ws, folder), message)
    assert _snapshot(folder) == before and _snapshot(ws) == inputs


@pytest.mark.parametrize("content", ["fifo", "nested"])
def test_a_hostile_search_json_neither_hangs_nor_crashes(ws, searched, tmp_path, content):
    folder, _ = _search_copy(searched, tmp_path)
    (folder / "search.json").unlink()
    if content == "fifo":
        os.mkfifo(folder / "search.json")  # reading it would wait for a writer forever
    else:
        (folder / "search.json").write_text("[" * 100_000 + "]" * 100_000)
    start = time.monotonic()
    for command in (["materialize", str(folder), "0", "--out", str(tmp_path / "out")], None):
        result = CliRunner().invoke(app, command) if command else _resume(ws, folder)
        _refused(result, "is not a regular file" if content == "fifo" else "is not valid JSON")
    assert time.monotonic() - start < 10 and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def scored(ws, tmp_path_factory) -> Path:
    """The workspace model's importance folder."""
    out = tmp_path_factory.mktemp("scored") / "scores"
    result = CliRunner().invoke(app, ["importance", str(ws / "model"), "--data", str(ws / "tokens.npy"), "--samples",
                                      "8", "--seq-len", "32", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _rewrite_scores(folder: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = load_file(folder / "importance.safetensors")
    change(tensors)
    save_file(tensors, folder / "importance.safetensors")


def _wider_hidden(tensors):  # the hidden scores of a model twice as wide
    tensors["hidden"] = torch.rand(2 * tensors["hidden"].numel())


DAMAGED_SCORES = {
    "meta_not_json": (lambda f: (f / "importance.json").write_text("{not json"), "is not valid JSON"),
    "meta_list": (lambda f: (f / "importance.json").write_text("[1]"), "not a JSON object"),
    "meta_fifo": (lambda f: ((f / "importance.json").unlink(), os.mkfifo(f / "importance.json")),
                  "is not a regular file"),
    "order_text": (lambda f: _edit_json(f / "importance.json", lambda r: r.update(removal_order="last")),
                   "removal_order must be"),
    "order_range": (lambda f: _edit_json(f / "importance.json", lambda r: r.update(removal_order=[99])),
                    "removal_order must name distinct blocks"),
    "truncated": (lambda f: (f / "importance.safetensors").write_bytes(
        (f / "importance.safetensors").read_bytes()[:300]), "cannot be read as importance scores"),
    "another_model": (lambda f: _rewrite_scores(f, _wider_hidden), "do not fit this model: hidden has shape [128]"),
    "table_missing": (lambda f: _rewrite_scores(f, lambda t: t.pop("ffn.1")), "lack ffn.1"),
    "table_unknown": (lambda f: _rewrite_scores(f, lambda t: t.update({"ffn.x": torch.ones(3)})),
                      "unknown score table 'ffn.x'"),
    "table_nan": (lambda f: _rewrite_scores(f, lambda t: t["hidden"].fill_(float("nan"))), "hold NaN"),
}  # fmt: skip


@pytest.mark.parametrize("case", DAMAGED_SCORES)
def test_a_damaged_importance_folder_is_one_line(ws, scored, tmp_path, case):
    damage, message = DAMAGED_SCORES[case]
    folder = tmp_path / "scores"
    shutil.copytree(scored, folder)
    damage(folder)
    before, inputs = _snapshot(folder), _snapshot(ws)
    start = time.monotonic()
    shape = '{"hidden_size": 32}'
    result = CliRunner().invoke(app, ["prune", str(ws / "model"), "--importance", str(folder), "--export-config",
                                      shape, "--device", "cpu", "--out", str(tmp_path / "p")])  # fmt: skip
    _refused(result, message)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "p").exists() and _snapshot(folder) == before and _snapshot(ws) == inputs


IMPORTANCE_RUN = ["importance", M, "--data", TOK, "--samples", "8", "--seq-len", "32", "--device", "cpu"]


def test_importance_onto_a_full_disk_is_refused_before_scoring(ws, tmp_path, monkeypatch):
    import compressor.pipelines.source as source_pipeline

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40, 1000))
    monkeypatch.setattr(source_pipeline, "calibrate", lambda *a, **k: pytest.fail("scored onto a full disk"))
    args = [a.replace("{root}", str(ws)) for a in IMPORTANCE_RUN]
    _refused(CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s")]), "the importance scores needs about")
    assert not (tmp_path / "s").exists()


def test_importance_scores_that_fail_to_write_are_one_line(ws, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    args = [a.replace("{root}", str(ws)) for a in IMPORTANCE_RUN]
    _refused(CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s")]), "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ----- a kill before the first checkpoint ------------------------------------------------------------------
KILL_IN = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import {module} as module
    from compressor.train import TrainConfig, train

    real = module.{name}

    def killed(*args, **kwargs):
        if {after!r}:
            real(*args, **kwargs)
        os._exit(9)  # a kill: no cleanup, no finally

    module.{name} = killed
    train(TrainConfig(**{config!r}))
    """
)


@pytest.mark.parametrize(
    ("module", "name", "after", "changes"),
    [
        ("compressor.train", "load_model", False, {}),  # killed while loading the models
        ("compressor.teacher_cache", "_write_part", True, {"cache_teacher": True, "top_k": 8}),  # writing the cache
    ],
    ids=["loading", "teacher_cache"],
)
def test_a_run_killed_before_any_progress_resumes_and_says_so(
    ws, whole, tmp_path, monkeypatch, module, name, after, changes
):
    """The folder such a kill leaves holds no checkpoint: --resume starts the run again in it (keeping the
    teacher cache's whole parts), and a new run into it says to --resume (or --overwrite), not only that it
    exists."""
    config = _config(ws, tmp_path / "run", **changes)
    script = KILL_IN.format(root=str(ROOT), module=module, name=name, after=after, config=config)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    assert not (tmp_path / "run" / "model").exists()
    from compressor.errors import CompressorError

    held = "the teacher targets of a run" if changes else "no progress"
    with pytest.raises(CompressorError, match=f"holds {held}.*continue it with --resume, or pass --overwrite"):
        train(TrainConfig(**config))
    if changes:  # the cache's write resumes: the part written before the kill is kept
        assert [p.name for p in (tmp_path / "run" / ".teacher_cache.partial").glob("*.safetensors")] == [
            "train-r0-p0.safetensors"
        ]
        import compressor.teacher_cache as cache_module

        real, writes = cache_module._write_part, []
        monkeypatch.setattr(
            cache_module, "_write_part", lambda path, parts: writes.append(path.name) or real(path, parts)
        )
        result = train(TrainConfig(**{**config, "resume": True}))
        assert writes == ["valid-r0-p0.safetensors"]
    else:
        result = train(TrainConfig(**{**config, "resume": True}))
    assert result.steps == 6
    if not changes:  # the same run, from the start: bit-identical to the uninterrupted one
        resumed = _weights(tmp_path / "run" / "model")
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


# ----- readers of an output whose swap is under way ----------------------------------------------------------
def test_a_reader_finishes_a_swap_a_kill_interrupted(ws, tmp_path):
    """Killed between the two renames of a swap: the old output aside, the complete new one beside it.
    `compress eval OUT` puts the new one in place, as the writer's next run would, and reads it."""
    shutil.copytree(ws / "teacher", tmp_path / ".out.old-0badcafe")
    shutil.copytree(ws / "model", tmp_path / ".out.new-0c0ffee0")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "out"), "--data", str(ws / "tokens.npy"), "--seq-len",
                                      "32", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _snapshot(tmp_path / "out") == _snapshot(ws / "model")


WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from compressor.outputs import output_lock

    with output_lock({out!r}):
        print("locked", flush=True)
        time.sleep(1.5)  # between the two renames of its swap: the output is missing meanwhile
        os.replace({new!r}, {out!r})
    """
)


def test_a_reader_waits_for_a_live_writer_between_its_renames(ws, tmp_path):
    new, out = tmp_path / ".out.new-0c0ffee0", tmp_path / "out"
    shutil.copytree(ws / "model", new)
    script = WRITER.format(root=str(ROOT), out=str(out), new=str(new))
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        start = time.monotonic()
        result = CliRunner().invoke(app, ["eval", str(out), "--data", str(ws / "tokens.npy"), "--seq-len", "32",
                                          "--device", "cpu"])  # fmt: skip
        waited = time.monotonic() - start
    finally:
        writer.wait(timeout=60)
    assert result.exit_code == 0, result.output
    assert waited < 10 and _snapshot(out) == _snapshot(ws / "model")


def test_a_link_in_a_run_folder_is_refused_on_resume(ws, tmp_path):
    """--resume appends to metrics.jsonl and replaces model/: a link among them would write outside the run."""
    train(TrainConfig(**_config(ws, tmp_path / "run", steps=2)))
    victim = tmp_path / "victim.txt"
    victim.write_text("not a metrics file\n")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(victim)
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="metrics.jsonl is a symbolic link"):
        train(TrainConfig(**_config(ws, tmp_path / "run", steps=4, resume=True)))
    assert victim.read_text() == "not a metrics file\n"


def test_a_damaged_teacher_cache_is_written_again(ws, tmp_path):
    config = _config(ws, tmp_path / "run", steps=2, cache_teacher=True, top_k=8)
    train(TrainConfig(**config))
    (tmp_path / "run" / "teacher_cache" / "teacher_cache.json").write_text("{")
    assert train(TrainConfig(**{**config, "resume": True})).steps == 2
    assert json.loads((tmp_path / "run" / "teacher_cache" / "teacher_cache.json").read_text())["complete"]
