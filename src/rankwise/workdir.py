"""The spill directory of a streamed compression: per-block statistics, gradients and factors on disk, resumable.

Every file is written under a temporary name and renamed, so a file that exists is complete: a run
killed at any point is continued from the files present (``--resume``). ``manifest.json`` names the
model, the configuration and the calibration data; resuming a directory whose manifest differs is
refused with the first mismatching field named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"


def fingerprint(tensor: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a tensor's bytes, for the manifest."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(hf_dir: Path) -> dict:
    """The model directory and the size and modification time of its weight files."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    return {
        "dir": str(Path(hf_dir).resolve()),
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }


class WorkDir:
    """Files of one compression run, under ``path``.

    Parameters
    ----------
    path : the directory (created if missing).
    manifest : what identifies the run (model, config, calibration).
    resume : keep and check the files of an interrupted run with the same manifest; otherwise an
        existing directory is an error (it may be an interrupted run the user wants to continue).
    """

    def __init__(self, path: str | os.PathLike, manifest: dict, *, resume: bool = False, force: bool = False):
        self.path = Path(path)
        manifest = json.loads(json.dumps(manifest))  # the JSON form, as it is compared on resume
        existing = self.path / MANIFEST
        if resume:
            if not existing.is_file():
                raise ValueError(f"--resume: {str(self.path)!r} holds no interrupted run to continue (no {MANIFEST})")
            diff = _first_difference(json.loads(existing.read_text()), manifest)
            if diff is not None:
                where, then, now = diff
                raise ValueError(
                    f"--resume: {str(self.path)!r} is an interrupted run with a different {where}: "
                    f"{_short(then)} there, {_short(now)} now"
                )
        elif self.path.exists():
            if not force:
                raise FileExistsError(
                    f"{str(self.path)!r} holds an interrupted run: "
                    "pass --resume to continue it or --force to start over"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.save_json(MANIFEST, manifest)

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def save(self, name: str, obj) -> None:
        tmp = self.path / f".{name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, self.path / name)

    def load(self, name: str):
        return torch.load(self.path / name, map_location="cpu", weights_only=True)

    def save_json(self, name: str, obj) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path / name)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def check_free_disk(path: Path, needed: int, what: str) -> None:
    """Raise ``ValueError`` when the file system of ``path`` has fewer than ``needed`` free bytes."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ValueError(
            f"not enough free disk under {str(probe)!r} for {what}: "
            f"{needed / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free"
        )


def _first_difference(old, new, where: str = ""):
    """``(dotted path, old value, new value)`` of the first leaf where two JSON values differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if diff is not None:
                return diff
        return None
    return None if old == new else (where, old, new)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
