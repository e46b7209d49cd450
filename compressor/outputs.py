"""Writing output folders so that nothing is lost: built aside, renamed into place, never over an input.

- `check_output` fails early, before any long work: the output exists without `overwrite`, is not a folder,
  overlaps an input (is one, lies inside one, or holds one), or its parent cannot be written.
- `atomic_output` yields a temporary sibling folder (`.NAME.tmp-*`); when the body succeeds it is renamed
  `.NAME.new-*` (complete), the old output (if any) `.NAME.old-*`, the new one `NAME`, and the old one is
  deleted. A kill at any moment leaves either the old output or the new one: `recover` (run by
  `check_output` and before a resume) finishes or undoes an interrupted swap and removes stale temporary
  folders.
- `output_lock` holds an exclusive lock on an output for a whole job (`.NAME.lock`, removed when the job
  ends and released by the OS if the process dies), so two runs writing the same output cannot both win.
- Long jobs that replace an existing output (`--overwrite` of a training run or a search) work in
  `staging(path)` (`.NAME.incoming`) and `swap_in` the result when they finish; `--resume` continues there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import CompressorError


def check_output(path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early, before any long work, when `path` cannot be written as asked (module docstring)."""
    path = Path(path)
    recover(path)
    if path.exists() and not overwrite:
        raise CompressorError(f"output {path} already exists: choose another path or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise CompressorError(f"output {path} exists and is not a folder: choose another path")
    for source in inputs:
        _check_apart(path, source)
    parent = _existing_parent(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CompressorError(f"cannot write {path}: {parent} is not writable; choose another output folder")
    return path


def _check_apart(out: Path, source: str | Path | None) -> None:
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
    free = free_bytes(path)
    if needed > free:
        raise CompressorError(
            f"{what} needs about {needed / 2**30:.2f} GiB at {path}, but only {free / 2**30:.2f} GiB is free: "
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
    new = path.with_name(f".{path.name}.new-{uuid.uuid4().hex[:8]}")
    os.replace(folder, new)  # complete from here on
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def recover(path: str | Path) -> None:
    """Finish a swap a kill interrupted (the complete `.NAME.new-*` goes in place, else the previous
    `.NAME.old-*` comes back) and remove the temporary siblings left behind. Does nothing while another
    process holds the output's lock (it is writing them)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    if not any(parent.glob(f".{path.name}.*-*")):
        return
    try:
        with output_lock(path):
            siblings = {k: sorted(parent.glob(f".{path.name}.{k}-*"), key=_mtime) for k in ("tmp", "new", "old")}
            if not path.exists():
                if siblings["new"]:
                    os.replace(siblings["new"].pop(), path)
                elif siblings["old"]:
                    os.replace(siblings["old"].pop(), path)
            for folder in (*siblings["tmp"], *siblings["new"], *siblings["old"]):
                shutil.rmtree(folder, ignore_errors=True)
    except CompressorError:  # locked: another run is writing this output
        return


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def staging(path: str | Path) -> Path:
    """Where a long job that replaces an existing output works until it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.incoming")


_held: dict[Path, int] = {}  # locks this process holds, by output path (re-entrant within the process)


@contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on `path` for the duration (another process gets one clear error; the same
    process may take it again)."""
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
