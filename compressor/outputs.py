"""Writing output folders all at once: build in a temporary sibling folder, then rename into place.

A crash or Ctrl-C leaves the previous output (or nothing) behind, never a half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import CompressorError


def check_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Fail early, before any long work, when `path` exists and `overwrite` is off."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CompressorError(f"output {path} already exists: choose another path or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise CompressorError(f"output {path} exists and is not a folder: choose another path")
    return path


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed."""
    path = check_output(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
