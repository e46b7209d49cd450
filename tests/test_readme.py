"""README.md runs as written: every `compress` line of its ```bash blocks, in order, exits 0, and every
`$ compress ...` line of its ```text blocks still prints the output quoted under it.

The commands run in-process (one import of torch for all of them) in a temporary folder holding a link to
the repository's `examples/`, so the README's `runs/...` outputs land in that folder, never in the
checkout. A few sizes are shrunk so the whole file stays near a minute on 2 idle cores (`SHRINK`);
everything else, flags and paths included, is the README's text. Lines of a bash block that do not start with
`compress` (`bash examples/quickstart.sh`, the `torchrun` launch) are not run here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# {subcommand: {flag: value}}: the test's value replaces the README's wherever that command uses the flag,
# and is added where it does not. Importance, candidate scoring and distillation dominate the cost.
SHRINK = {
    "importance": {"--samples": "16"},  # 64 calibration sequences -> 16
    "prune": {"--score-samples": "4", "--top-k": "2"},  # two candidates scored on 4 sequences (of 10 on 16)
    # one optimizer step of 8 x 256 tokens, validated on 4 sequences; quantization-aware: calibrated on 4
    "distill": {"--tokens": "2k", "--eval-sequences": "4", "--calib-sequences": "4"},
    "train": {"--tokens": "2k", "--eval-sequences": "4"},
    # importance on 16 sequences, candidates scored on 4, one finalist distilled for one step
    "search": {"--samples": "16", "--score-samples": "4", "--candidates": "1", "--distill-tokens": "2k"},
    "quantize": {"--samples": "4"},
    "eval": {"--max-sequences": "8"},
    "generate": {"--max-new-tokens": "4"},
}


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def _bash_commands() -> list[list[str]]:
    """The arguments of every `compress` line of the bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["compress"]:
                commands.append(words[1:])
    return commands


def _quoted_outputs() -> list[tuple[list[str], str]]:
    """(arguments, output quoted under it) of every `$ compress` line of the text blocks."""
    quoted = []
    for block in _blocks("text"):
        for part in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, _, output = part.partition("\n")
            words = shlex.split(command)
            if words[:1] == ["compress"]:
                quoted.append((words[1:], output))
    return quoted


def _shrunk(args: list[str]) -> list[str]:
    sizes = SHRINK.get(args[0], {})
    out = [sizes.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    return out + [word for flag, value in sizes.items() if flag not in args for word in (flag, value)]


def _flat(text: str) -> str:
    """Whitespace collapsed: Rich wraps and pads lines to the terminal's width."""
    return " ".join(text.split())


def test_the_readme_has_the_commands_it_promises():
    commands = _bash_commands()
    assert len(commands) >= 15
    assert {args[0] for args in commands} >= {
        "info", "init", "estimate", "importance", "prune", "distill", "train", "search", "materialize",
        "quantize", "eval", "generate",
    }  # fmt: skip
    assert all(any(args[0] == command for args in commands) for command in SHRINK)  # no stale override
    assert len(_quoted_outputs()) >= 3


def test_every_compress_command_of_the_readme_runs(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in _bash_commands():
        result = runner.invoke(app, _shrunk(args))
        assert result.exit_code == 0, f"compress {shlex.join(args)}\n{result.output}"
    assert (tmp_path / "runs" / "qad" / "quantized" / "hf_quant_config.json").is_file()
    assert (tmp_path / "runs" / "best" / "config.json").is_file()


QUOTED = _quoted_outputs()


@pytest.mark.parametrize(("args", "output"), QUOTED, ids=[" ".join(args[:2]) for args, _ in QUOTED])
def test_quoted_outputs_are_what_the_commands_print(args, output):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _flat(output) in _flat(result.output)
