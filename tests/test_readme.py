"""README.md and the pages of docs/ run as written: every `compress` line of their ```bash blocks, in order,
exits 0, and every `$ compress ...` line of their ```text blocks still prints the output quoted under it.

The pages run in one order, README.md first and then docs/*.md by name, in one temporary folder holding a
link to the repository's `examples/`, so their `runs/...` outputs land there, never in the checkout. A page
of docs/ may use what the README's commands write (docs/quantization.md distills into `runs/pruned`) and
what its own earlier commands write, nothing another page writes (`test_pages_read_only_what_runs_before`).
The commands run in-process (one import of torch for all of them). A few sizes are shrunk so that all the
pages stay near a minute on 2 idle cores (`SHRINK`); everything else, flags and paths included, is the
pages' text. Lines of a bash block that do not start with `compress` (`bash examples/quickstart.sh`, the
`torchrun` launch) are not run here.
"""

from __future__ import annotations

import re
import shlex
from itertools import pairwise
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# {subcommand: {flag: value}}: the test's value replaces the page's wherever that command uses the flag,
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


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(page: Path, kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def _bash_commands(page: Path) -> list[list[str]]:
    """The arguments of every `compress` line of the page's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in _blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["compress"]:
                commands.append(words[1:])
    return commands


def _quoted_outputs(page: Path) -> list[tuple[list[str], str]]:
    """(arguments, output quoted under it) of every `$ compress` line of the page's text blocks."""
    quoted = []
    for block in _blocks(page, "text"):
        for part in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, _, output = part.partition("\n")
            words = shlex.split(command)
            if words[:1] == ["compress"]:
                quoted.append((words[1:], output))
    return quoted


def _all_commands() -> list[list[str]]:
    return [args for page in PAGES for args in _bash_commands(page)]


# SHRINK's flags of one mode, added only to a command in it (the command refuses them in another)
IN_MODE = {"--max-sequences": lambda args: "--task" not in args, "--calib-sequences": lambda args: "--quantize" in args}


def _shrunk(args: list[str]) -> list[str]:
    sizes = SHRINK.get(args[0], {})
    out = [sizes.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    added = [flag for flag in sizes if flag not in args and IN_MODE.get(flag, bool)(args)]
    return out + [word for flag in added for word in (flag, sizes[flag])]


def _flat(text: str) -> str:
    """Whitespace collapsed: Rich wraps and pads lines to the terminal's width."""
    return " ".join(text.split())


def _runs_paths(args: list[str]) -> tuple[list[str], list[str]]:
    """(read, written) `runs/...` paths of one command: `--out` and `init`'s folder are written."""
    written = [b for a, b in pairwise(args) if a == "--out"] + (args[1:2] if args[0] == "init" else [])
    read = [a for a in args if a.startswith("runs/") and a not in written]
    return read, written


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(heading) for heading in re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)}


def test_the_pages_have_the_commands_they_promise():
    commands = _all_commands()
    assert len(commands) >= 15
    assert {args[0] for args in commands} >= {
        "info", "init", "estimate", "importance", "prune", "distill", "train", "search", "materialize",
        "quantize", "eval", "generate",
    }  # fmt: skip
    assert all(any(args[0] == command for args in commands) for command in SHRINK)  # no stale override
    assert sum(len(_quoted_outputs(page)) for page in PAGES) >= 3


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", README.read_text()))
    assert {_name(page) for page in PAGES[1:]} <= linked


def test_links_between_the_pages_resolve():
    """Every relative link of a page names a file that exists and, with `#anchor`, a heading in it."""
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                broken.append(f"{_name(page)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_pages_read_only_what_runs_before():
    """A page reads what the README writes and what its own earlier commands write, so each page of docs/
    runs after the README alone."""
    readme_writes = {path for args in _bash_commands(README) for path in _runs_paths(args)[1]}
    missing = []
    for page in PAGES:
        written = set() if page == README else set(readme_writes)
        for args in _bash_commands(page):
            read, out = _runs_paths(args)
            missing += [f"{_name(page)}: compress {args[0]} reads {path}" for path in read
                        if not any(path == w or path.startswith(w + "/") for w in written)]  # fmt: skip
            written.update(out)
    assert not missing, "\n".join(missing)


def test_every_compress_command_of_the_pages_runs(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for page in PAGES:
        for args in _bash_commands(page):
            result = runner.invoke(app, _shrunk(args))
            assert result.exit_code == 0, f"{_name(page)}: compress {shlex.join(args)}\n{result.output}"
    assert (tmp_path / "runs" / "qad" / "quantized" / "hf_quant_config.json").is_file()
    assert (tmp_path / "runs" / "best" / "config.json").is_file()


QUOTED = [(page, args, output) for page in PAGES for args, output in _quoted_outputs(page)]


@pytest.mark.parametrize(
    ("page", "args", "output"), QUOTED, ids=[f"{_name(page)}: {' '.join(args[:2])}" for page, args, _ in QUOTED]
)
def test_quoted_outputs_are_what_the_commands_print(page, args, output):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{_name(page)}\n{result.output}"
    assert _flat(output) in _flat(result.output)
