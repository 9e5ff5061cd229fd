"""Atomic output directories: write under a temporary name, rename when complete, never leave a partial output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out``.

    An existing ``out`` raises ``FileExistsError`` unless ``force``. On any exception (KeyboardInterrupt
    included) the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass --force (force=True) to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
