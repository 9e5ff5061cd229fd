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
        raise FileExistsError(
            f"output directory {str(out)!r} already exists; pass --force (force=True) to overwrite it"
        )
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


@contextlib.contextmanager
def atomic_output_files(paths: list[str | os.PathLike], *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory in the parent of ``paths[0]``; on success the file named like each
    of ``paths`` in it is moved onto that path.

    Every path must share one parent. An existing one raises ``FileExistsError`` (naming it) before
    anything is written, unless ``force``. On any exception the temporary directory is removed and no
    path is touched.
    """
    paths = [Path(p) for p in paths]
    parent = paths[0].parent
    for p in paths:
        if p.parent != parent:
            raise ValueError(f"output files must share one directory: {str(p)!r} is not in {str(parent)!r}")
        if p.exists() and not force:
            raise FileExistsError(f"output {str(p)!r} already exists; pass --force (force=True) to overwrite it")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{paths[0].name}.partial-", dir=parent))
    try:
        yield tmp
        for p in paths:
            os.replace(tmp / p.name, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
