"""Lazy safetensors checkpoints: read one tensor at a time, write sharded outputs atomically in bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from .._validate import int_at_least
from .atomic import atomic_output_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODES = {dt: code for code, dt in _DTYPES.items()}


def _read_header(file: Path) -> tuple[int, dict[str, dict]]:
    """Parse and check a safetensors header (format: u64 little-endian length, JSON, raw bytes).

    Returns the offset where tensor data starts and the header (name -> dtype, shape, data_offsets).

    Raises ``ValueError`` naming ``file`` when it is truncated or not a safetensors file, so a broken
    checkpoint is reported when it is opened rather than halfway through a merge.
    """
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(
                f"{str(file)!r} is not a safetensors file: {size} bytes, shorter than its 8-byte header length"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(
                f"{str(file)!r} is truncated or not a safetensors file: header of {n} bytes, file of {size}"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{str(file)!r} is corrupted: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(file)!r} is corrupted: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES or "data_offsets" not in info:
            raise ValueError(f"{str(file)!r} is corrupted: bad header entry for tensor {name!r}")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise ValueError(f"{str(file)!r} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return 8 + n, header


class LazyCheckpoint:
    """A safetensors checkpoint (single file, HF model dir or sharded dir) read one tensor at a time.

    Headers of every shard are parsed when opened (names, shapes, dtypes, integrity); tensor data is
    read on :meth:`get` only, with at most one shard file open at a time. Use :func:`open_checkpoint`.
    Files are read as the safetensors format specifies (little-endian, C order), as written by
    ``safetensors`` and :func:`write_checkpoint`; tests check both directions against ``safetensors``.
    """

    def __init__(self, path: Path, files: dict[str, Path], headers: dict[Path, tuple[int, dict]], config: dict | None):
        self.path = path
        self.config = config
        self._files = files
        self._headers = {f: h for f, (_, h) in headers.items()}
        self._data_start = {f: start for f, (start, _) in headers.items()}
        self._open: tuple[Path, BinaryIO] | None = None

    def keys(self) -> list[str]:
        return sorted(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def _info(self, name: str) -> dict:
        if name not in self._files:
            raise ValueError(f"tensor {name!r} is not in checkpoint {str(self.path)!r} ({len(self)} tensors)")
        return self._headers[self._files[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._info(name)["dtype"]]

    def file_of(self, name: str) -> Path:
        """The shard file that holds ``name`` (callers iterate shard by shard to avoid reopening files)."""
        self._info(name)
        return self._files[name]

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (only its bytes) on the CPU, in its stored dtype.

        The bytes are read into a fresh tensor with one positioned read, not memory-mapped: a mapping
        would keep every page read so far resident (and counted in the process's memory) until the
        shard is closed, i.e. the whole checkpoint by the end of a merge.
        """
        file = self.file_of(name)
        info = self._headers[file][name]
        begin, end = (int(x) for x in info["data_offsets"])
        if self._open is None or self._open[0] != file:
            self.close()  # one shard file open at a time
            self._open = (file, open(file, "rb"))
        out = torch.empty(end - begin, dtype=torch.uint8)
        fh = self._open[1]
        fh.seek(self._data_start[file] + begin)
        if end > begin and fh.readinto(memoryview(out.numpy())) != end - begin:
            raise ValueError(f"{str(file)!r} was truncated while reading tensor {name!r}")
        return out.view(_DTYPES[info["dtype"]]).reshape(self.shape(name))

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
        self._open = None

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.path)!r}, {len(self)} tensors, {len(self._headers)} file(s))"


def open_checkpoint(path: str | os.PathLike) -> LazyCheckpoint:
    """Open a checkpoint for lazy reading.

    Parameters
    ----------
    path : a ``.safetensors`` file, or a directory holding ``model.safetensors`` or a sharded
        ``model.safetensors.index.json`` (its ``config.json``, if any, is read into ``.config``).

    Raises
    ------
    FileNotFoundError if ``path`` (or a shard named by the index) does not exist; ValueError if the
    directory holds no safetensors checkpoint or a file is truncated / corrupted (the file is named).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    config = None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"checkpoint {str(path)!r} must be a .safetensors file or a model directory")
        shard_of = None
    else:
        index = path / INDEX_NAME
        if index.is_file():
            try:
                shard_of = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{str(index)!r} is corrupted: expected JSON with a 'weight_map' object") from None
        elif (path / SINGLE_NAME).is_file():
            shard_of = None
            path_file = path / SINGLE_NAME
        else:
            found = sorted(p.name for p in path.iterdir())[:8]
            raise ValueError(
                f"checkpoint directory {str(path)!r} has no {SINGLE_NAME} or {INDEX_NAME}; "
                f"found: {', '.join(found) or 'nothing'}"
            )
        if (path / CONFIG_NAME).is_file():
            try:
                config = json.loads((path / CONFIG_NAME).read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{str(path / CONFIG_NAME)!r} is not valid JSON") from None
    files: dict[str, Path] = {}
    headers: dict[Path, tuple[int, dict]] = {}
    if shard_of is None:
        single = path if path.is_file() else path_file
        headers[single] = _read_header(single)
        files = {name: single for name in headers[single][1]}
    else:
        for name, shard in shard_of.items():
            file = path / shard
            if file not in headers:
                if not file.is_file():
                    raise FileNotFoundError(f"shard {str(file)!r} named by {str(path / INDEX_NAME)!r} does not exist")
                headers[file] = _read_header(file)
            if name not in headers[file][1]:
                raise ValueError(f"{str(path / INDEX_NAME)!r} maps tensor {name!r} to {str(file)!r}, which lacks it")
            files[name] = file
    return LazyCheckpoint(path, files, headers, config)


class _ShardWriter:
    """Stream tensors into one safetensors file: data to a spill file first, then header + data copied."""

    def __init__(self, final: Path):
        self.final = final
        self.spill = final.with_name(final.name + ".data")
        self.fh = open(self.spill, "wb")
        self.header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _CODES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()  # no copy
        self.header[name] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + data.nbytes],
        }
        self.fh.write(data.data)
        self.nbytes += data.nbytes

    def close(self) -> None:
        self.fh.close()
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        with open(self.final, "wb") as out, open(self.spill, "rb") as data:
            out.write(struct.pack("<Q", len(head)))
            out.write(head)
            shutil.copyfileobj(data, out, 1 << 24)
        self.spill.unlink()


class ShardedWriter:
    """Push-style writer of a Hugging Face style safetensors checkpoint into an existing directory.

    ``add(name, tensor)`` streams each tensor to disk at once (memory stays at one tensor); ``close()``
    names the shards: one gives ``model.safetensors``, more give ``model-0000i-of-0000N.safetensors``
    plus ``model.safetensors.index.json``. A new shard starts when adding a tensor would take the
    current one past ``max_shard_bytes``. Write into a temporary directory (:func:`atomic_output_dir`).
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 5 * 2**30):
        int_at_least(max_shard_bytes, "max_shard_bytes", 1)
        self.dir, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.shards: list[_ShardWriter] = []
        self.seen: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise ValueError(f"tensor {name!r} is written twice")
        self.seen.add(name)
        size = tensor.numel() * tensor.element_size()
        if not self.shards or (self.shards[-1].header and self.shards[-1].nbytes + size > self.max_shard_bytes):
            if self.shards:
                self.shards[-1].close()
            self.shards.append(_ShardWriter(self.dir / f"shard-{len(self.shards):05d}.safetensors"))
        self.shards[-1].add(name, tensor)

    def close(self) -> int:
        """Finish the last shard and name them all; returns the bytes of tensor data written."""
        if not self.shards:
            raise ValueError("write_checkpoint got no tensors to write")
        self.shards[-1].close()
        if len(self.shards) == 1:
            os.replace(self.shards[0].final, self.dir / SINGLE_NAME)
        else:
            weight_map = {}
            for i, shard in enumerate(self.shards):
                name = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
                os.replace(shard.final, self.dir / name)
                weight_map.update(dict.fromkeys(shard.header, name))
            total = sum(s.nbytes for s in self.shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return sum(s.nbytes for s in self.shards)


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    config: dict | None = None,
    force: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: Iterable[str | os.PathLike] = (),
    sidecars_from: str | os.PathLike | None = None,
    model_card: dict | None = None,
) -> Path:
    """Write ``(name, tensor)`` pairs as a Hugging Face style safetensors checkpoint, atomically.

    Tensors are streamed through a :class:`ShardedWriter`: memory stays at one tensor, whatever the
    checkpoint size.

    Parameters
    ----------
    out_dir : output directory; an existing one raises FileExistsError unless ``force``.
    tensors : a state dict, or an iterable of ``(name, tensor)`` (e.g. a generator computing them).
    config : written as ``config.json`` when given.
    extra_files : files copied into the output as they are (tokenizer files, ...).
    sidecars_from : a model directory whose non-weight files (tokenizer, chat template, sentence-transformers
        modules, ...) are copied into the output, see :func:`rankwise.io.sidecar.copy_model_files`.
    model_card : keyword arguments of :func:`rankwise.io.sidecar.write_model_card` (``base_model``, ``method``,
        ``budget``, ``quality``); the card is written last, into the temporary directory like everything else.
    """
    from .sidecar import copy_model_files, write_model_card

    int_at_least(max_shard_bytes, "max_shard_bytes", 1)
    extra = [Path(f) for f in extra_files]
    for f in extra:
        if not f.is_file():
            raise FileNotFoundError(f"extra file {str(f)!r} does not exist")
    if sidecars_from is not None and not Path(sidecars_from).is_dir():  # checked before any tensor is computed
        raise FileNotFoundError(f"sidecars_from {str(sidecars_from)!r} is not a directory")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for name, tensor in items:
            writer.add(name, tensor)
        writer.close()
        if config is not None:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for f in extra:
            shutil.copyfile(f, tmp / f.name)
        if sidecars_from is not None:
            copy_model_files(sidecars_from, tmp)
        if model_card is not None:
            write_model_card(tmp, **model_card)
    return Path(out_dir)


class StateDictCheckpoint:
    """An in-memory state dict (or an nn.Module's) behind the :class:`LazyCheckpoint` interface."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<state dict>", config: dict | None = None):
        self._tensors = {k: v.detach() for k, v in tensors.items()}
        self.path = path
        self.config = config

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise ValueError(f"tensor {name!r} is not in {self.path} ({len(self)} tensors)")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)

    def close(self) -> None:
        pass


def as_checkpoint(model: object, what: str = "model") -> LazyCheckpoint | StateDictCheckpoint:
    """A path (opened lazily), an nn.Module (its state dict) or a state dict, as a checkpoint reader."""
    if isinstance(model, (LazyCheckpoint, StateDictCheckpoint)):
        return model
    if isinstance(model, (str, os.PathLike)):
        return open_checkpoint(model)
    if isinstance(model, torch.nn.Module):
        cfg = getattr(model, "config", None)
        config = cfg.to_dict() if hasattr(cfg, "to_dict") else None
        return StateDictCheckpoint(model.state_dict(), f"<{type(model).__name__}>", config)
    if isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values()):
        return StateDictCheckpoint(model)
    raise ValueError(
        f"{what} must be a checkpoint path, an nn.Module or a state dict of tensors, got {type(model).__name__}"
    )


def iter_tensors(ckpt: LazyCheckpoint | StateDictCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """All ``(name, tensor)`` pairs of a checkpoint, shard by shard (each shard opened once)."""
    names = ckpt.keys()
    if isinstance(ckpt, LazyCheckpoint):
        names = sorted(names, key=lambda n: (str(ckpt.file_of(n)), n))
    for name in names:
        yield name, ckpt.get(name)
