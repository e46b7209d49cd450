"""Writing output folders so that nothing is lost: built aside, renamed into place, never over an input.

- `check_output` fails early, before any long work: the output path names no new folder (empty, `.`, `..`,
  the current folder or one holding it, the root), is a symbolic link, exists without `overwrite`, is not a
  folder, overlaps an input (is one, lies inside one, or holds one), is a folder compress did not write
  (see below) or its parent cannot be written.
- `atomic_output` yields a temporary sibling folder (`.NAME.tmp-*`); when the body succeeds it is renamed
  `.NAME.new-*` (complete), the old output (if any) `.NAME.old-*`, the new one `NAME`, and the old one is
  deleted. A kill at any moment leaves either the old output or the new one: `recover` (run by
  `check_output` and before a resume) finishes or undoes an interrupted swap and removes stale temporary
  folders.
- `output_lock` holds an exclusive lock on an output for a whole job (`.NAME.lock`, removed when the job
  ends and released by the OS if the process dies), so two runs writing the same output cannot both win.
- Long jobs that replace an existing output (`--overwrite` of a training run or a search) work in
  `staging(path)` (`.NAME.incoming`) and `swap_in` the result when they finish; `--resume` continues there.

`--overwrite` replaces only an empty folder or one compress wrote. `swap_in` (through which every output
built aside passes, `atomic_output`'s and a long job's) marks the complete folder as compress's
(`mark_output`): an extended attribute (`user.compress.output`), invisible to every loader and listing, or
where the file system keeps none a hidden `.compress-output` file. A folder without the mark (a run folder
written in place, an output of an earlier version) counts as compress's when it holds nothing but names
compress writes at the top of its outputs (`OWN_NAMES`), one of them a record (`OWN_RECORDS`: a pruned
model's compression.json, an importance, search or run folder's own file), or only its temporaries.
Anything else is refused in one line naming one file compress did not write.

Reading back what an output folder holds (a file this process did not just write) is reading untrusted
input: a damaged, hostile or foreign file. Every such read goes through `read_json` / `open_tensors`
(one-line errors, no hang on a FIFO, bounded size and nesting), records are checked field by field against
their dataclass (`check_record`), and a folder we write into again (`--resume`) must hold only its own files
(`refuse_links`). Readers first `settle` an output whose swap a kill interrupted (or wait the moment a live
writer needs between its two renames), so `compress eval OUT` sees what the writer would see.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import json
import os
import shutil
import sys
import tempfile
import time
import types
import typing
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from compressor.errors import CheckpointError, CompressorError, first_line

JSON_MAX_BYTES = 64 * 2**20  # no record, index or config of ours comes near this
SETTLE_SECONDS = 5.0  # how long a reader waits for a live writer to finish the two renames of a swap
MARK_ATTRIBUTE = "user.compress.output"  # on every output folder swapped in: compress wrote it
MARK_FILE = ".compress-output"  # the mark where the file system keeps no extended attributes
# What compress writes at the top of its output folders (checkpoint, importance, search and run folders, and
# the temporaries of a swap or a long job), and the records among them that say which command wrote one: how
# a folder without the mark shows that compress wrote it.
OWN_NAMES = (
    "config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt", "configuration_nemotron_h_puzzle.py",
    "compression.json", "export_config.json", "export_layers.json", "hf_quant_config.json",
    "quantizer_state.safetensors", "trainer", "trainer_state.json", "optimizer.safetensors",
    "importance.json", "importance.safetensors",
    "search.json", "pareto.json", "pareto.png", "candidates", "importance", "library",
    "model", "metrics.jsonl", "teacher_cache", "quantized",
    ".*.tmp-*", ".*.new-*", ".*.old-*", ".*.lock", ".*.incoming", ".*.library", ".*.partial",
)  # fmt: skip
OWN_RECORDS = (
    "compression.json", "importance.json", "search.json", "metrics.jsonl", "teacher_cache/teacher_cache.json",
    "trainer/trainer_state.json", "trainer_state.json", "model/trainer/trainer_state.json",
    "model/trainer_state.json",
)  # fmt: skip


def check_output(path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early, before any long work, when `path` cannot be written as asked (module docstring)."""
    path = Path(path)
    _check_new_folder(path)
    if path.is_symlink():
        raise CompressorError(
            f"output {path} is a symbolic link (to {os.readlink(path)}): compress writes a folder of its own, "
            "never through a link; choose another path or remove the link"
        )
    recover(path)
    if path.exists() and not overwrite:
        raise CompressorError(f"output {path} already exists: choose another path or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise CompressorError(f"output {path} exists and is not a folder: choose another path")
    for source in inputs:
        check_apart(path, source)
    if path.exists():
        _check_own(path)
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise CompressorError(f"cannot write {path}: {parent} is a file, not a folder; choose another output folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CompressorError(f"cannot write {path}: {parent} is not writable; choose another output folder")
    return path


def _check_new_folder(path: Path) -> None:
    """Refuse a path that cannot name an output folder of its own: one is created beside it and renamed
    onto it, which the current folder, a folder holding it and the root cannot be."""
    if str(path) == ".":
        raise CompressorError(
            "the output path is empty or '.', the current folder: name a new folder for the output, e.g. ./out"
        )
    if path.name in ("", ".."):
        what = "is the root of the file system" if path.name == "" else "ends in '..'"
        raise CompressorError(f"output {path} {what}: name a new folder for the output, e.g. ./out")
    try:
        resolved, here = path.resolve(), Path.cwd().resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop, a deleted current folder
        return  # reported where the path is used
    if resolved == here or resolved in here.parents:
        what = "is the current folder" if resolved == here else "holds the current folder"
        raise CompressorError(f"output {path} {what}: name a new folder for the output, e.g. ./out")


def _check_own(path: Path) -> None:
    """Refuse to replace a folder compress did not write (module docstring)."""
    if _marked(path):
        return
    names = sorted(os.listdir(path))
    stranger = next((n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in OWN_NAMES)), None)
    if stranger is not None:
        raise CompressorError(
            f"output {path} holds files compress did not write ({_first_file(path, stranger)}): choose another "
            "folder or remove it yourself"
        )
    if names and not all(n.startswith(".") for n in names) and not any((path / r).is_file() for r in OWN_RECORDS):
        raise CompressorError(
            f"output {path} holds no mark or record of compress (it may be a checkpoint of yours): choose another "
            "folder or remove it yourself"
        )


def _first_file(folder: Path, name: str) -> str:
    """`name`, or the first file under it when it is a folder: what to show of it."""
    if (folder / name).is_dir() and not (folder / name).is_symlink():
        for root, dirs, files in os.walk(folder / name):
            dirs.sort()
            if files:
                return str((Path(root) / min(files)).relative_to(folder))
        return f"{name}/"
    return name


def mark_output(folder: str | Path) -> None:
    """Mark `folder`, a complete output, as one compress wrote, which a later --overwrite may replace."""
    try:
        os.setxattr(folder, MARK_ATTRIBUTE, b"1")
    except (OSError, AttributeError):  # no extended attributes here (or on this system)
        (Path(folder) / MARK_FILE).write_text("written by compress: its --overwrite may replace this folder\n")


def _marked(folder: Path) -> bool:
    try:
        os.getxattr(folder, MARK_ATTRIBUTE)
        return True
    except (OSError, AttributeError):
        return (folder / MARK_FILE).is_file()


def check_apart(out: Path, source: str | Path | None) -> None:
    """Refuse an output that is an input, lies inside an input folder, or holds an input."""
    if source is None or not Path(source).exists():
        return  # a dataset name, or nothing
    a, b = out.resolve(), Path(source).resolve()
    if a == b or b in a.parents or a in b.parents:
        where = "is" if a == b else "lies inside" if b in a.parents else "holds"
        raise CompressorError(f"output {out} {where} the input {source}: choose an output folder apart from inputs")


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def free_bytes(path: str | Path) -> int:
    """Free space on the file system that will hold `path`."""
    return shutil.disk_usage(_existing_parent(Path(path))).free


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse to start a job that will write `needed` bytes next to `path` when the disk lacks them."""
    from compressor.budget.units import format_bytes

    free = free_bytes(path)
    if needed > free:
        raise CompressorError(
            f"{what} needs about {format_bytes(needed)} at {path}, but only {format_bytes(free)} is free: "
            "free some space or choose another output folder"
        )


@contextmanager
def atomic_output(
    path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    with output_lock(path):
        check_output(path, overwrite=overwrite, inputs=inputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(tmp, 0o755)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_in(tmp, path)


def swap_in(folder: Path, path: Path) -> None:
    """Put the complete `folder` in place of `path` (which may exist), so that a kill at any moment leaves
    one of the two complete (see `recover`)."""
    mark_output(folder)
    new = path.with_name(f".{path.name}.new-{uuid.uuid4().hex[:8]}")
    os.replace(folder, new)  # complete from here on
    if os.path.lexists(path):
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(new, path)
        _remove(old)
    else:
        os.replace(new, path)


def recover(path: str | Path) -> bool:
    """Finish a swap a kill interrupted (the complete `.NAME.new-*` goes in place, else the previous
    `.NAME.old-*` comes back) and remove the temporary siblings left behind. Does nothing, and returns
    False, while another process holds the output's lock (it is writing them). Where `path` is a symbolic
    link (which `check_output` refuses) a complete new or old output beside it stays, to take its place once
    the link is gone: a swap can never put it there."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return True
    if not any(parent.glob(f".{path.name}.*-*")):
        return True
    try:
        with output_lock(path):
            siblings = {k: sorted(parent.glob(f".{path.name}.{k}-*"), key=_mtime) for k in ("tmp", "new", "old")}
            if path.is_symlink():
                siblings["new"] = siblings["old"] = []
            elif not path.exists():
                if siblings["new"]:
                    os.replace(siblings["new"].pop(), path)
                elif siblings["old"]:
                    os.replace(siblings["old"].pop(), path)
            for folder in (*siblings["tmp"], *siblings["new"], *siblings["old"]):
                _remove(folder)
    except CompressorError:  # locked: another run is writing this output
        return False
    return True


def settle(path: str | Path, *, wait: float = SETTLE_SECONDS) -> None:
    """A reader's `recover`: when `path` (or the folder holding it) is missing because a swap put it aside
    (`.NAME.new-*` / `.NAME.old-*` beside it), wait for a live writer to make its second rename (it holds
    the lock for that moment) or, once no writer holds the lock, finish the swap as the writer would. A
    reader that cannot write there leaves it (and then reports the output missing)."""
    path = Path(path).absolute()
    if path.exists():
        return
    top = path  # the outermost missing folder: a whole run can be swapped, not only its model/
    while top.parent != top and not top.parent.exists():
        top = top.parent
    deadline = time.monotonic() + wait
    while not top.exists() and _swap_under_way(top):
        try:
            if recover(top) or time.monotonic() > deadline:
                return
        except OSError:
            return
        time.sleep(0.02)


def _swap_under_way(path: Path) -> bool:
    """Whether a swap of `path` left its complete new or its previous output beside it."""
    prefixes = (f".{path.name}.new-", f".{path.name}.old-")
    try:
        return any(name.startswith(prefixes) for name in os.listdir(path.parent))
    except OSError:
        return False


# ----- reading back what an output folder holds ----------------------------------------------------------
def read_json(
    path: str | Path, what: str, *, error: type[CompressorError] = CompressorError, max_bytes: int = JSON_MAX_BYTES
) -> dict[str, Any]:
    """The JSON object in `path`, a file this process did not just write, or one `error` naming the file
    and `what` it should be: missing, not a regular file (a FIFO would block the read), larger than
    `max_bytes`, unreadable, not JSON, nested too deeply, or not an object."""
    path = Path(path)
    settle(path)
    if not path.exists():
        raise error(f"no {path.name} in {path.parent}: it is not {what}")
    if not path.is_file():
        raise error(f"{path} is not a regular file: it cannot be {what}")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path} holds {size:,} bytes, more than {what} ever does: it is damaged")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or first_line(exc)})") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{path} is not valid JSON ({first_line(exc)}): it is not {what}") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold {what} (not a JSON object)")
    return data


@contextmanager
def open_tensors(
    path: str | Path, what: str = "safetensors", *, device: str = "cpu", error: type[CompressorError] = CompressorError
) -> Iterator[Any]:
    """`safe_open` of a safetensors file this process did not just write: a missing, non-regular, damaged
    or truncated file (also one found so while its tensors are read) is one `error`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    settle(path)
    if not path.is_file():
        raise error(f"{path} is missing or not a regular file: it cannot be read as {what}")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            yield f
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path} cannot be read as {what} ({first_line(exc)}): the file is damaged") from None


def save_tensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with a write that fails (a full disk) reported as one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as exc:
        raise CompressorError(
            f"cannot write {path} ({first_line(exc)}): free some space or choose another folder"
        ) from None
    os.chmod(path, 0o666 & ~_umask())  # save_file writes a private temporary file (0600) and renames it


def _umask() -> int:
    """The process's umask, which every file we open obeys: Linux states it in /proc/self/status; elsewhere
    it is read by setting it and putting it back (process-wide, for a moment)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_record(cls: type, raw: Any, where: str, field: str = "") -> None:
    """Refuse a JSON value read back from a file unless it has the types of dataclass `cls`'s fields
    (recursively: nested dataclasses, lists, tuples, dicts, unions, literals; integers fit in 64 bits), every
    field without a default present. One CompressorError names the field (`where: candidates[2].index`).
    Ranges and cross-field rules are the record's own; keys `cls` does not know are left to its `from_dict`.
    `field` names where `raw` sits in the file (`calibration`), when it is not the whole of it."""
    _check_value(raw, cls, f"{where}: {field}" if field else f"{where}:")


def _check_value(value: Any, hint: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                _check_value(value, option, where)
                return
            except CompressorError:
                continue
        raise CompressorError(f"{where} must be {_describe(hint)}, got {_show(value)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise CompressorError(f"{where} must be an object, got {_show(value)}")
        hints = typing.get_type_hints(hint)
        for f in dataclasses.fields(hint):
            if f.name in value:
                _check_value(value[f.name], hints[f.name], f"{where}{' ' if where.endswith(':') else '.'}{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CompressorError(f"{where} lacks the field {f.name!r}")
        return
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise CompressorError(f"{where} must be a list, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise CompressorError(f"{where} must hold {len(args)} values, got {len(value)}")
            for i, (item, item_hint) in enumerate(zip(value, args, strict=True)):
                _check_value(item, item_hint, f"{where}[{i}]")
        elif args:
            for i, item in enumerate(value):
                _check_value(item, args[0], f"{where}[{i}]")
        return
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise CompressorError(f"{where} must be an object, got {_show(value)}")
        if args:
            for key, item in value.items():
                _check_value(item, args[1], f"{where}[{key!r}]")
        return
    if origin is Literal:
        if value not in args:
            raise CompressorError(f"{where} must be {_describe(hint)}, got {_show(value)}")
        return
    if hint is type(None) or hint is None:
        if value is not None:
            raise CompressorError(f"{where} must be null, got {_show(value)}")
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"check_record cannot check {hint!r} ({where})")  # a record field of a type JSON lacks: a bug
    if not ok:
        raise CompressorError(f"{where} must be {_describe(hint)}, got {_show(value)}")


def _describe(hint: Any) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refuse_links(folder: str | Path, what: str) -> None:
    """Refuse `folder` when anything inside it is a symbolic link: an output folder we write into again
    (or read back as ours) holds only files we wrote, so that no write or read through it leaves it."""
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            entry = Path(root) / name
            if entry.is_symlink():
                raise CompressorError(
                    f"{entry} is a symbolic link (to {os.readlink(entry)}): {what} {folder} holds only its own "
                    "files; remove the link or start a new one"
                )


@contextmanager
def silenced(fd: int) -> Iterator[None]:
    """File descriptor `fd` (1: stdout, 2: stderr) pointed at /dev/null for a moment: what native code writes
    there too (a solver's debugging lines, a Rust panic's message)."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def confined(file: Path, folder: Path, *, what: str) -> Path:
    """`file` resolved, refused unless it lies inside `folder` (links followed) or, for a snapshot of the
    Hugging Face cache (`.../models--org--name/snapshots/REV/`), inside that repository's blob store: every
    file read from a checkpoint folder (config.json, weights, tokenizer files) is one of its own."""
    try:
        resolved, root = file.resolve(), folder.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, a link loop
        raise CheckpointError(f"{what} cannot be found in {folder} ({first_line(exc)})") from None
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(resolved == base or base in resolved.parents for base in allowed):
        raise CheckpointError(
            f"{what} resolves to {resolved}, outside {folder}: a checkpoint may only use its own files"
        )
    return resolved


def _remove(path: Path) -> None:
    """Delete a temporary sibling: a folder, or a link a swap put aside (never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def staging(path: str | Path) -> Path:
    """Where a long job that replaces an existing output works until it is complete."""
    path = Path(path)
    _check_new_folder(path)
    return path.with_name(f".{path.name}.incoming")


_held: dict[Path, int] = {}  # locks this process holds, by output path (re-entrant within the process)


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on `path` for the duration (another process gets one clear error; the same
    process may take it again)."""
    _check_new_folder(Path(path))
    path = Path(path).absolute()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    if not os.access(_existing_parent(path), os.W_OK):
        yield  # nothing can be written there anyway; check_output says so
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        handle = open(lock, "a")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise CompressorError(
                f"another compress run is writing {path}: wait for it or choose another output"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break  # the lock file in place is the one we hold
        except FileNotFoundError:
            pass
        handle.close()  # its holder removed it as we opened it: take the new one
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        lock.unlink(missing_ok=True)  # before unlocking, so that the next holder creates a fresh file
        handle.close()
