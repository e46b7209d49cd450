import ast
import dataclasses
import importlib
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import typer
from rich.text import Text
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from typer.testing import CliRunner

import cli
import strategies
from cli import app
from compressor.checkpoint import WEIGHTS_NAME
from strategies.base import Strategy

runner = CliRunner()
TEXT = "To be, or not to be, that is the question. Whether tis nobler in the mind to suffer.\n" * 40


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "text.txt").write_text(TEXT)
    result = _run("init", root / "model", "--preset", "tiny", "--tokenizer", root / "tokenizer.json", "--seed", "1")
    assert result.exit_code == 0, result.output
    result = _run("init", root / "teacher", "--preset", "tiny", "--tokenizer", root, "--seed", "2")
    assert result.exit_code == 0, result.output
    return root


def test_info_on_checkpoint_and_preset(workspace):
    result = _run("info", workspace / "model")
    assert result.exit_code == 0
    assert "9 (4 Mamba-2, 2 attention, 3 MLP)" in result.output and "F32" in result.output
    assert any(
        "loads in" in line and "compressor, transformers, vLLM, llama.cpp" in line
        for line in result.output.splitlines()
    )
    result = _run("info", workspace / "model", "--json")
    data = json.loads(result.output)
    assert data["parameters"]["total"] == 210_400 and data["dtypes"] == ["F32"]
    assert data["loads_in"] == ["compressor", "transformers", "vLLM", "llama.cpp"]
    result = _run("info", "12b-v2", "--json")
    assert json.loads(result.output)["parameters"]["total"] == 12_310_001_152


def test_under_torchrun_only_the_first_process_shows_output_and_every_one_its_errors(workspace):
    """Every process of a torchrun job runs the command: one table, one progress display, not one each."""
    import os
    import subprocess
    import sys

    def run(rank, *args, world_size=2):
        command = [sys.executable, "-m", "cli", *map(str, args)]
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size)}
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(cli.__file__).parent)

    hidden = run(1, "info", workspace / "model", "--json")
    assert (hidden.returncode, hidden.stdout, hidden.stderr) == (0, "", "")
    failed = run(1, "info", workspace / "missing")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("rank 1: error: ") and failed.stderr.count("\n") == 1
    alone = run(1, "info", workspace / "model", "--json", world_size=1)  # RANK set outside a torchrun job
    assert json.loads(alone.stdout)["parameters"]["total"] == 210_400


def test_info_shows_moe_blocks_and_active_parameters():
    result = _run("info", "nano3-30b")
    assert result.exit_code == 0, result.output
    assert "52 (23 Mamba-2, 6 attention, 0 MLP, 23 MoE)" in result.output
    assert "128 experts, top-6, expert FFN 1856, shared FFN 3712, 1 group" in result.output
    assert "active per token │  3,580,073,408 │ 11.3%" in result.output
    data = json.loads(_run("info", "nano3-30b", "--json").output)
    assert data["parameters"]["active"] == 3_580_073_408 and data["architecture"]["moe"] == 23
    assert data["architecture"]["num_experts_per_tok"] == 6
    dense = json.loads(_run("info", "9b-v2", "--json").output)
    assert (
        dense["parameters"]["active"] == dense["parameters"]["total"]
        and "n_routed_experts" not in dense["architecture"]
    )
    assert "MoE" not in _run("info", "9b-v2").output


def test_init_writes_a_loadable_checkpoint_with_tokenizer(workspace):
    assert (workspace / "model" / WEIGHTS_NAME).is_file()
    assert (workspace / "model" / "tokenizer.json").is_file()


def test_init_errors(workspace, tmp_path):
    result = _run("init", workspace / "model", "--preset", "tiny")
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    result = _run("init", tmp_path / "x", "--preset", "tiny", "--config", workspace / "model" / "config.json")
    assert result.exit_code == 1 and "exactly one of --preset NAME or --config JSON" in result.output
    result = _run("init", tmp_path / "x", "--preset", "tiny", "--set", "mamba_num_heads=7")
    assert result.exit_code == 1 and "not divisible by n_groups" in result.output
    result = _run("init", tmp_path / "x", "--preset", "tiny", "--set", "hidden_size=64", "--set", "hidden_size=128")
    assert result.exit_code == 1 and "'hidden_size=64' and 'hidden_size=128' set one field" in result.output
    result = _run("init", tmp_path / "x", "--preset", "tiny", "--set", "vocab_size=10", "--tokenizer", workspace)
    assert result.exit_code == 1 and "add --set vocab_size=" in result.output
    result = _run("init", tmp_path / "x", "--preset", "56b")
    assert result.exit_code == 1 and "GiB of memory is available" in result.output
    assert not (tmp_path / "x").exists()
    assert "Traceback" not in result.output


def test_eval_reports_loss_and_teacher_agreement(workspace):
    args = [
        "eval",
        workspace / "model",
        "--data",
        workspace / "text.txt",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
    ]
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tokens"] > 0 and data["perplexity"] > 1
    result = _run(*args, "--teacher", workspace / "teacher", "--json")
    data = json.loads(result.output)
    assert data["kl"] > 0 and 0 <= data["top1_agreement"] <= 1
    result = _run(*args, "--teacher", workspace / "teacher")
    assert result.exit_code == 0 and "top-1 agreement" in result.output
    result = _run(*args, "--split", "valid", "--json")
    valid_tokens = json.loads(result.output)["tokens"]
    assert 0 < valid_tokens < data["tokens"]
    result = _run(*args, "--split", "valid", "--max-sequences", "1", "--json")
    assert json.loads(result.output)["tokens"] == 32


def test_eval_errors(workspace, tmp_path):
    result = _run("eval", tmp_path / "none", "--data", workspace / "text.txt")
    assert result.exit_code == 1 and "error:" in result.output
    result = _run("eval", workspace / "model", "--data", workspace / "missing.txt")
    assert result.exit_code == 1 and "missing.txt" in result.output
    if not torch.cuda.is_available():  # on a GPU machine cuda:0 is a valid device
        result = _run("eval", workspace / "model", "--data", workspace / "text.txt", "--device", "cuda:0")
        assert result.exit_code == 1 and "no CUDA device" in result.output
    result = _run("eval", workspace / "model", "--data", workspace / "text.txt", "--seq-len", "100000")
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_generate(workspace):
    result = _run("generate", workspace / "model", "--prompt", "To be", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("To be")
    result = _run("generate", workspace / "model", "--prompt", "x [/b] y [bold]", "--max-new-tokens", "2")
    assert result.exit_code == 0 and result.output.startswith("x [/b] y [bold]")  # text, not Rich markup


def test_generate_streams_each_continuation_as_it_is_decoded(workspace):
    from compressor.pipelines.generating import GenerateConfig, generate_text

    calls = []
    config = GenerateConfig(("To be", "Or not"), max_new_tokens=6, temperature=0.9, seed=3)
    generations = generate_text(workspace / "model", config, on_text=lambda i, piece: calls.append((i, piece)))
    assert [i for i, _ in calls] == sorted(i for i, _ in calls)  # one prompt after the other
    for index, generation in enumerate(generations):
        pieces = [piece for i, piece in calls if i == index]
        assert pieces[0] == "" and len(pieces) > 2 and "".join(pieces) == generation.text


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["estimate", "{model}", "--prefill-chunk", "abc"], "Invalid value for '--prefill-chunk'"),
        (["prun", "{model}"], "No such command 'prun'. Did you mean 'prune'?"),
        (["generate", "{model}"], "Missing option '--prompt' (see 'compress generate --help')"),
        (["eval", "{model}", "--dat", "x"], "No such option: --dat"),
        (["estimate", "{model}", "--ctx", "1k", "--ctx=2k"], "--ctx 1k and --ctx 2k are both given: give --ctx once"),
        (["prune", "{model}", "--axes", "hidden", "--axes", "ffn"], "--axes hidden and --axes ffn are both given"),
        (["prune", "{model}", "--dry-run", "--no-dry-run"], "--dry-run and --no-dry-run are both given: give one"),
    ],
)
def test_command_line_mistakes_are_one_line(workspace, args, line):
    """What the parser refuses (a bad value, an unknown command or option, a missing one, an option given
    twice with different values: the parser would keep the last) is one line and status 2, no usage box."""
    result = _run(*(a.format(model=workspace / "model") for a in args))
    assert result.exit_code == 2 and line in result.output, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")


def test_an_option_repeated_alike_or_collecting_values_passes(workspace):
    assert _run("estimate", workspace / "model", "--ctx", "1k", "--ctx=1k", "--json").exit_code == 0
    assert _run("estimate", workspace / "model", "--json", "--json").exit_code == 0
    assert _run("estimate", workspace / "model", "--ctx", "1k", "--ctx", "2k", "--help").exit_code == 0  # help wins


def test_generate_continues_each_prompt_as_if_alone(workspace):
    sampling = ["--max-new-tokens", "6", "--temperature", "0.9", "--seed", "3"]
    alone = [_run("generate", workspace / "model", "--prompt", p, *sampling).output for p in ("To be", "Or not")]
    both = _run("generate", workspace / "model", "--prompt", "To be", "--prompt", "Or not", *sampling)
    assert both.exit_code == 0, both.output
    assert both.output == alone[0] + "\n" + alone[1]
    empty = _run("generate", workspace / "model", "--prompt", "To be", "--prompt", "", *sampling)
    assert empty.exit_code == 1 and "--prompt 2 of 2 is empty after tokenization" in empty.output


def test_eval_compares_several_models_on_the_same_sequences(workspace):
    args = ["eval", workspace / "model", workspace / "teacher", "--data", workspace / "text.txt", "--seq-len", "32"]
    rows = json.loads(_run(*args, "--json").output)
    assert [r["model"] for r in rows] == [str(workspace / "model"), str(workspace / "teacher")]
    single = json.loads(
        _run("eval", workspace / "teacher", "--data", workspace / "text.txt", "--seq-len", "32", "--json").output
    )
    assert rows[1]["loss"] == single["loss"] and rows[0]["tokens"] == rows[1]["tokens"]
    result = _run(*args, "--teacher", workspace / "teacher")
    assert result.exit_code == 0 and "top-1" in result.output and "100.0%" in result.output


def test_init_lays_out_blocks_from_ratios_and_info_reports_them(tmp_path):
    small = ["--set", "hidden_size=64", "--set", "intermediate_size=64", "--set", "mamba_num_heads=8",
             "--set", "vocab_size=100", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2",
             "--set", "head_dim=16", "--set", "ssm_state_size=8"]  # fmt: skip
    layout = ["--layers", "56", "--attention-ratio", "0.08", "--mlp-ratio", "0.5"]
    result = _run("init", tmp_path / "m", "--preset", "tiny", *layout, *small)
    assert result.exit_code == 0, result.output
    assert "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-" in result.output.replace("\n", "")
    data = json.loads(_run("info", tmp_path / "m", "--json").output)
    assert data["pattern"] == "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
    assert data["ratios"] == {"mamba": 24 / 56, "attention": 4 / 56, "mlp": 28 / 56}
    assert "43% Mamba-2 / 7% attention / 50% MLP" in _run("info", tmp_path / "m").output
    result = _run("init", tmp_path / "x", "--preset", "tiny", "--mlp-ratio", "0.5")
    assert result.exit_code == 1 and "give --layers too" in result.output
    result = _run("init", tmp_path / "x", "--layers", "8", "--attention-ratio", "0.7", "--mlp-ratio", "0.5")
    assert result.exit_code == 1 and "Traceback" not in result.output and not (tmp_path / "x").exists()


# ----- --help, --version, strategy flags ------------------------------------------------------------------
def _help(*command: str) -> str:
    """`compress COMMAND --help` on a wide terminal, box lines dropped and whitespace collapsed (Rich wraps)."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def _help_row(flag: str, *command: str) -> str:
    """The first line of FLAG's row in `compress COMMAND --help`."""
    output = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    return next(line for line in output.splitlines() if line.lstrip("│ ").startswith(f"{flag} "))


def test_help_shows_bracketed_text_as_written():
    written = "Tokens per probe sequence, e.g. 4k [default: the budget's --ctx; importance: 1k]."
    for command in ("prune", "search", "importance"):
        assert written in _help(command), command
    assert "Candidates to score (the largest that fit). [default: minitron 10; minipuzzle 12]" in _help("prune")


def test_no_option_help_is_read_as_rich_markup():
    """Rich markup in help text would eat words (`[default: ...]`); every option's help, parsed as markup the
    way `--help` renders it, reads as written (escaped brackets only)."""
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if getattr(param, "help", None):
                assert Text.from_markup(param.help).plain == param.help.replace("\\[", "["), (name, param.name)


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"compressor {version('compressor')}"


def test_strategy_flags_show_each_strategys_default_and_how_a_value_is_written():
    assert "[default: minitron 0.2; minipuzzle 0.3]" in _help_row("--max-depth-pruning", "prune")
    assert "[default: minipuzzle 1.0,0.75,0.5]" in _help_row("--ffn-fractions", "prune")
    assert "<true|false>" in _help_row("--modelopt-compatible", "prune")
    assert "<float,...>" in _help_row("--ffn-fractions", "search") and "<int>" in _help_row("--top-k", "search")
    # a default of None (the strategy decides, as the help says) is not shown as a value
    assert "[default:" not in _help_row("--hidden-divisor", "prune")


@pytest.fixture
def plug_in(monkeypatch):
    """Install a strategy plug-in (as tests/test_strategies.py does) and rebuild the CLI, whose strategy flags
    are made at import; the CLI is rebuilt without it afterwards."""

    def install(strategy):
        class EntryPoint:
            name = strategy.name

            def load(self):
                return strategy

        monkeypatch.setattr(
            strategies, "entry_points", lambda group: [EntryPoint()] if group == strategies.ENTRY_POINT_GROUP else []
        )
        return importlib.reload(cli).app

    yield install
    monkeypatch.undo()
    importlib.reload(cli)


def _plug_in_with_option(option_name: str):
    Options = dataclasses.make_dataclass(
        "Options", [(option_name, int, dataclasses.field(default=1, metadata={"help": "Mine."}))], frozen=True
    )
    return type("Mine", (Strategy,), {"name": "mine", "Options": Options, "propose": lambda self, *a: []})


@pytest.mark.parametrize(
    "option, flag",
    [("seq_len", "--seq-len"), ("ctx", "--ctx"), ("importance", "--importance"), ("json_output", "--json-output")],
)  # the command's own option, a budget option, a declared flag (importance_dir), a name with another flag
def test_a_plug_in_option_with_a_command_flag_is_refused(plug_in, option, flag):
    plugged = plug_in(_plug_in_with_option(option))
    result = runner.invoke(plugged, ["prune", "tiny", "--dry-run", "--target-params", "1M"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"error: the strategy 'mine' declares the option {option}, whose flag {flag} this command already has: "
        "rename it in the strategy's Options"
    )
    assert runner.invoke(plugged, ["info", "tiny"]).exit_code == 0  # the other commands still work


def test_a_plug_in_option_gets_its_flag(plug_in):
    plugged = plug_in(_plug_in_with_option("mine_width"))
    result = runner.invoke(plugged, ["prune", "--help"], env={"COLUMNS": "200"})
    assert "--mine-width" in result.output and "Mine. [default: mine 1]" in result.output


def test_a_group_option_the_command_already_has_is_a_bug():
    def command(seed: int = 0, run: dict | None = None) -> None: ...

    with pytest.raises(TypeError, match="command already has the option seed of the group run"):
        cli.with_group("run", [cli.option("seed", int, "Seed.", 0)])(command)


# ----- cli.py stays thin -----------------------------------------------------------------------------------
CLI_LINES, CLI_FUNCTION_LINES = 700, 60


def _function_lengths(source: str) -> dict[str, int]:
    """Every function of `source` (nested ones too) by name: its lines from the def line to its last."""
    functions = (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return {f"{node.name} (line {node.lineno})": node.end_lineno - node.lineno + 1 for node in functions}


def test_cli_stays_under_its_line_caps():
    """cli.py parses, calls one pipeline per command and renders: the library's logic lives in
    compressor/pipelines/, renderers in cli_render.py, option groups in cli_options.py."""
    source = Path(cli.__file__).read_text()
    assert len(source.splitlines()) < CLI_LINES
    lengths = _function_lengths(source)
    assert any(name.startswith("search ") for name in lengths)  # the commands are counted
    too_long = {name: lines for name, lines in lengths.items() if lines > CLI_FUNCTION_LINES}
    assert not too_long, f"functions of cli.py over {CLI_FUNCTION_LINES} lines: {too_long}"


def test_function_lengths_count_from_the_def_line_to_the_last():
    source = "@decorator\ndef f(\n    a,\n):\n    def g():\n        pass\n    return a\n"
    assert _function_lengths(source) == {"f (line 2)": 6, "g (line 5)": 2}


def test_an_unwritable_hugging_face_cache_says_how_to_move_it(monkeypatch, tmp_path):
    from cli_options import os_error_line

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    denied = PermissionError(13, "Permission denied", str(tmp_path))  # creating the cache's parent
    hint = f"(the Hugging Face cache, {tmp_path / 'hf'}): set HF_HOME to a folder you can write"
    assert os_error_line(denied) == f"Permission denied: {tmp_path} {hint}"
    assert os_error_line(PermissionError(13, "Permission denied", "/etc/x")) == "Permission denied: /etc/x"
    assert os_error_line(OSError(28, "No space left on device")) == "No space left on device"


def test_a_refused_run_prints_its_line_alone(workspace, tmp_path):
    """A training run refused before it starts has no progress bar to end: nothing but the error line (its
    stop printed an empty line first where stderr is not a terminal)."""
    result = _run("train", workspace / "model", "--data", tmp_path / "missing.txt", "--out", tmp_path / "run")
    assert result.exit_code == 1 and result.output.startswith("error: data not found"), repr(result.output)


def test_a_table_folds_a_path_too_long_for_its_column_rather_than_cut_it():
    """In a pipe or a log (80 columns), two models in one folder stay told apart: the cell folds onto the next
    lines, no ellipsis; a line of text is never broken (consoles soft-wrap)."""
    from io import StringIO

    from rich.console import Console

    from cli_render import console, err_console, table

    assert console.soft_wrap and err_console.soft_wrap
    out = StringIO()
    rows = [["runs/quickstart/distilled/model", "4.2296"], ["runs/quickstart/pruned", "5.2731"]]
    Console(file=out, width=40, soft_wrap=True).print(table(None, ["model", "loss"], rows))
    Console(file=out, width=40, soft_wrap=True).print("done: checkpoint in runs/quickstart/distilled/model; val loss")
    text = out.getvalue()
    cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert "…" not in text and "".join(cells) == "runs/quickstart/distilled/modelruns/quickstart/pruned"
    assert text.splitlines()[-1] == "done: checkpoint in runs/quickstart/distilled/model; val loss"


def test_paths_that_look_like_markup_print_as_written(workspace, tmp_path):
    """A folder named like Rich markup ('[exp]', '[/b]') is printed as it is: '[exp]' was dropped from the
    lines that name it and '[/b]' stopped the command with a traceback once its work was done."""
    out = tmp_path / "[exp] [/b]" / "model"
    result = _run("init", out, "--preset", "tiny", "--tokenizer", workspace / "tokenizer.json")
    assert result.exit_code == 0 and f"to {out}" in result.output, result.output
    evaluated = ["eval", out, workspace / "model", "--data", workspace / "text.txt", "--seq-len", "32"]
    for args in (["info", out], evaluated):
        result = _run(*args)
        assert result.exit_code == 0 and "[exp]" in result.output and "[/b]" in result.output, result.output


def test_a_non_finite_loss_is_one_warning_line(capsys):
    """It printed its markup literally ('[yellow]warning:[/] ...'); the model's path is text."""
    from types import SimpleNamespace

    import cli_render

    result = SimpleNamespace(loss=float("inf"), perplexity=float("inf"), kl=None, tokens=64)
    model = SimpleNamespace(model="runs/[exp]/model", result=result, params=1, format="BF16")
    record = SimpleNamespace(models=[model], data="valid.txt", sequences=1, seq_len=64, teacher=None)
    cli_render._print_loss(record)
    warning = "warning: runs/[exp]/model: the loss is not finite (an overflow: evaluate with --dtype float32)"
    assert capsys.readouterr().err.splitlines() == [warning]
