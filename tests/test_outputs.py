"""`compressor.outputs`: an output path that names no new folder or is a link is refused before any work,
a leftover swap beside a link is kept, `--overwrite` replaces only what compress wrote, and saved tensors
get the mode every other output file gets."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from compressor.errors import CompressorError
from compressor.outputs import MARK_FILE, atomic_output, check_output, recover, save_tensors, staging, swap_in


@pytest.fixture
def here(tmp_path, monkeypatch):
    """The current folder: tmp_path/a/b."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    return tmp_path / "a" / "b"


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("", "the output path is empty or '.'"),
        (".", "the output path is empty or '.'"),
        ("..", "output .. ends in '..'"),
        ("c/..", "output c/.. ends in '..'"),
        ("/", "output / is the root of the file system"),
        ("../b", "output ../b is the current folder"),
        ("{tmp}", "holds the current folder"),
    ],
)
def test_an_output_that_names_no_new_folder_is_refused_before_any_work(here, tmp_path, out, message):
    out = out.replace("{tmp}", str(tmp_path))
    with pytest.raises(CompressorError, match=re.escape(message)):
        check_output(out, overwrite=True)
    with pytest.raises(CompressorError, match="name a new folder"), atomic_output(out, overwrite=True):
        pytest.fail("the body ran")
    with pytest.raises(CompressorError, match="name a new folder"):
        staging(out)  # where a resumed long job would look
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # no temporary folder, no lock left


def test_the_command_line_says_an_empty_output_is_empty(here, tmp_path):
    result = CliRunner().invoke(app, ["init", "", "--preset", "tiny", "--overwrite"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: the output path is empty or '.', the current folder: name a new folder for the output, e.g. ./out"
    ]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]


@pytest.mark.parametrize("target", ["nowhere", "real"])
def test_an_output_that_is_a_link_is_refused(tmp_path, target):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(tmp_path / target)
    for overwrite in (False, True):
        with pytest.raises(CompressorError, match=r"out is a symbolic link \(to .*\): .*remove the link"):
            check_output(tmp_path / "out", overwrite=overwrite)
    assert (tmp_path / "real" / "keep.txt").read_text() == "mine"


def test_a_complete_output_left_beside_a_dangling_link_is_kept_until_the_link_is_gone(tmp_path):
    """What an earlier version left when it swapped a new output onto a dangling link: every later run failed
    on it. It stays (complete), no run is stuck on it, and it takes its place once the link is removed."""
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    new = tmp_path / ".out.new-0c0ffee0"
    new.mkdir()
    (new / "importance.json").write_text("{}")
    (tmp_path / ".out.tmp-12345678").mkdir()  # a half-written one goes
    assert recover(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.new-0c0ffee0", "out"]
    with pytest.raises(CompressorError, match="symbolic link"):
        check_output(tmp_path / "out", overwrite=True)
    (tmp_path / "out").unlink()
    assert recover(tmp_path / "out")
    assert (tmp_path / "out" / "importance.json").read_text() == "{}"


def test_an_output_under_a_file_is_refused_as_such(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CompressorError, match=r"notes.txt is a file, not a folder"):
        check_output(tmp_path / "notes.txt" / "out")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_compress_did_not_write(tmp_path):
    (tmp_path / "proj" / "src").mkdir(parents=True)
    (tmp_path / "proj" / "src" / "main.py").write_text("code")
    (tmp_path / "proj" / "compression.json").write_text("{}")  # a record does not make the rest ours
    with pytest.raises(CompressorError, match=r"proj holds files compress did not write \(src/main.py\)"):
        check_output(tmp_path / "proj", overwrite=True)
    with pytest.raises(CompressorError, match="did not write"), atomic_output(tmp_path / "proj", overwrite=True):
        pytest.fail("the body ran")
    assert (tmp_path / "proj" / "src" / "main.py").read_text() == "code"
    checkpoint = tmp_path / "downloaded"  # a checkpoint of the user's: only names compress writes, no record
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_text("weights")
    with pytest.raises(CompressorError, match="downloaded holds no mark or record of compress"):
        check_output(checkpoint, overwrite=True)


def test_the_command_line_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "proj" / "src").mkdir(parents=True)
    (tmp_path / "proj" / "src" / "main.py").write_text("code")
    result = CliRunner().invoke(app, ["init", str(tmp_path / "proj"), "--preset", "tiny", "--overwrite"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "holds files compress did not write (src/main.py)" in result.output
    assert (tmp_path / "proj" / "src" / "main.py").read_text() == "code"


def test_overwrite_replaces_what_compress_wrote(tmp_path):
    with atomic_output(tmp_path / "out") as tmp:
        (tmp / "mine").write_text("first")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine"]  # the mark is no file where it can be
    with atomic_output(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "mine").write_text("second")
    assert (tmp_path / "out" / "mine").read_text() == "second"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=True)


def test_a_long_job_staged_aside_is_marked_when_swapped_in(tmp_path):
    work = staging(tmp_path / "run")
    (work / "model").mkdir(parents=True)
    (work / "notes").write_text("a file of no known name")
    swap_in(work, tmp_path / "run")
    check_output(tmp_path / "run", overwrite=True)


def test_the_mark_is_a_hidden_file_where_the_file_system_keeps_no_attributes(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "getxattr", unsupported)
    with atomic_output(tmp_path / "out") as tmp:
        (tmp / "mine").write_text("first")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARK_FILE, "mine"]
    check_output(tmp_path / "out", overwrite=True)


@pytest.mark.parametrize(
    "names",
    [
        ["compression.json", "config.json", "model.safetensors", "tokenizer.json"],  # compress prune
        ["importance.json", "importance.safetensors"],  # compress importance
        ["search.json", "pareto.json", "pareto.png", "candidates/0/result.json", "importance/importance.json"],
        ["metrics.jsonl", "model/config.json", "model/trainer/trainer_state.json"],  # a run
        ["teacher_cache/teacher_cache.json", ".model.tmp-abcdefgh/config.json"],  # a run killed early
        [".teacher_cache.partial/train-r0-p0.safetensors"],
        ["config.json", "model.safetensors", "trainer/trainer_state.json"],  # a run's checkpoint
    ],
)
def test_overwrite_replaces_an_unmarked_folder_of_an_earlier_version(tmp_path, names):
    for name in names:
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text("{}")
    check_output(tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_saved_tensors_get_the_mode_of_every_other_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_tensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors")
        (tmp_path / "t.json").write_text("{}")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "t.json").stat().st_mode) == 0o666 & ~umask


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="no /proc")
def test_the_umask_is_read_without_changing_it_where_proc_states_it(monkeypatch):
    from compressor import outputs

    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("set the umask"))
        assert outputs._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_a_swap_onto_a_link_moves_the_link_aside_not_what_it_points_to(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(tmp_path / "real")  # appeared after check_output
    (tmp_path / "new").mkdir()
    swap_in(tmp_path / "new", tmp_path / "out")
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out").is_symlink()
    assert (tmp_path / "real" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]
