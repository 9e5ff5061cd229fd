"""The merge driver: validate inputs, then merge tensor by tensor from lazy readers and stream the result out."""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..io.lazy import LazyCheckpoint, StateDictCheckpoint, as_checkpoint, write_checkpoint
from ..registry import Entry

Source = LazyCheckpoint | StateDictCheckpoint


def _entry(method: str) -> Entry:
    from . import METHODS

    return METHODS.get(method)


def resolve_options(entry: Entry, options: dict) -> dict:
    """The method's defaults updated by ``options``; an unknown option raises ValueError listing the accepted ones."""
    accepted = entry.meta.get("options", {})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for merge method {entry.name!r}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    return {**accepted, **options}


def _label(i: int | None, src: Source) -> str:
    return f"{'base' if i is None else f'models[{i}]'} ({src.path})"


def check_compatible(models: Sequence[Source], base: Source | None) -> list[str]:
    """Tensor names shared by all inputs, after checking they have the same names and shapes.

    Raises ValueError naming the first (sorted) tensor missing from an input or whose shape differs.
    """
    ref_i, ref = (None, base) if base is not None else (0, models[0])
    names = ref.keys()
    others = [(i, m) for i, m in enumerate(models) if m is not ref]
    for i, src in others:
        mine = set(src.keys())
        missing = sorted(set(names) - mine)
        extra = sorted(mine - set(names))
        if missing or extra:
            first = min(missing[:1] + extra[:1])
            has, lacks = (
                (_label(ref_i, ref), _label(i, src)) if first in missing else (_label(i, src), _label(ref_i, ref))
            )
            raise ValueError(f"models differ in architecture: tensor {first!r} is in {has} but not in {lacks}")
        for name in names:
            if src.shape(name) != ref.shape(name):
                raise ValueError(
                    f"models differ in architecture: tensor {name!r} has shape {ref.shape(name)} in "
                    f"{_label(ref_i, ref)} but {src.shape(name)} in {_label(i, src)}"
                )
    return names


def _tensor_seed(seed: int, name: str) -> int:
    # one independent stream per tensor, whatever order tensors are visited in
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class _Scratch:
    """One reusable compute-dtype buffer per input, sized for the largest tensor.

    Each model's tensor is copied (and converted) into its buffer instead of a fresh allocation per
    tensor name: large fresh allocations are page-faulted in anew every time, which costs more than
    the merge arithmetic. Methods may overwrite these copies; the user's tensors are never touched.
    """

    def __init__(self, count: int, numel: int, dtype: torch.dtype):
        self.buffers = [torch.empty(numel, dtype=dtype) for _ in range(count)]

    def load(self, i: int, t: torch.Tensor) -> torch.Tensor:
        return self.buffers[i][: t.numel()].view(t.shape).copy_(t)

    def owns(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(ptr == b.untyped_storage().data_ptr() for b in self.buffers)


def _needs_modules(method: str) -> str:
    return (
        f"merge method {method!r} works on nn.Modules (it reads the architecture or runs forward passes): "
        "call rankwise.merge(...) from Python with modules, not paths or state dicts"
    )


def merged_tensors(
    models: Sequence[object],
    method: str = "linear",
    base: object | None = None,
    *,
    dtype: torch.dtype | None = None,
    **options,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate everything, then return a generator of merged ``(name, tensor)`` pairs (tensor scope only).

    Inputs are read one tensor name at a time, copied into float32 scratch buffers (float64 when any
    input tensor is float64), merged, and cast
    to ``dtype`` (default: the reference model's dtype of that tensor; the reference is ``base`` when given,
    else ``models[0]``). Non-floating tensors (integer buffers) are copied from the reference.
    """
    entry = _entry(method)
    if entry.meta.get("scope") != "tensor":
        raise ValueError(_needs_modules(method))
    opts = resolve_options(entry, options)
    sources, base_src = _open_inputs(entry, models, base)
    names = check_compatible(sources, base_src)
    ref = base_src if base_src is not None else sources[0]
    if isinstance(ref, LazyCheckpoint):
        names = sorted(names, key=lambda n: (str(ref.file_of(n)), n))  # visit the reference's shards in order
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    if "seed" in opts and (isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int) or opts["seed"] < 0):
        raise ValueError(f"seed must be an int >= 0, got {opts['seed']!r}")

    floating = [n for n in names if ref.dtype(n).is_floating_point]
    wide = any(ref.dtype(n) == torch.float64 for n in floating)
    largest = max((math.prod(ref.shape(n)) for n in floating), default=0)
    scratch = _Scratch(len(sources) + 1, largest, torch.float64 if wide else torch.float32)

    def merged(name: str) -> torch.Tensor:
        ref_t = ref.get(name)
        if not ref_t.is_floating_point():
            return ref_t
        tensors = [scratch.load(i, s.get(name)) for i, s in enumerate(sources)]
        base_t = scratch.load(len(sources), ref_t) if base_src is not None else None
        call = dict(opts, seed=_tensor_seed(opts["seed"], name)) if "seed" in opts else opts
        try:
            out = entry.fn(tensors, base_t, **call)
        except ValueError as exc:
            raise ValueError(f"merging tensor {name!r}: {exc}") from None
        out = out.to(dtype or ref_t.dtype)
        return out.clone() if scratch.owns(out) else out  # the buffers are reused for the next tensor

    # the first tensor is merged now, so that bad option values fail before any output is started
    first = merged(names[0])

    def generate() -> Iterator[tuple[str, torch.Tensor]]:
        yield names[0], first
        for name in names[1:]:
            yield name, merged(name)

    return generate()


def _open_inputs(entry: Entry, models: Sequence[object], base: object | None) -> tuple[list[Source], Source | None]:
    if isinstance(models, (str, os.PathLike, torch.nn.Module, dict)) or not isinstance(models, Sequence):
        raise ValueError(
            f"models must be a list of models (paths, nn.Modules or state dicts), got {type(models).__name__}"
        )
    need = entry.meta.get("min_models", 1)
    if len(models) < need:
        besides = " besides the base" if entry.meta.get("needs_base") else ""
        raise ValueError(
            f"merge method {entry.name!r} needs at least {need} fine-tuned models{besides}, got {len(models)}"
        )
    if entry.meta.get("needs_base") and base is None:
        raise ValueError(f"merge method {entry.name!r} needs a base model (base=... / --base)")
    sources = [as_checkpoint(m, f"models[{i}]") for i, m in enumerate(models)]
    base_src = as_checkpoint(base, "base") if base is not None and entry.meta.get("needs_base") else None
    return sources, base_src


def merge(
    models: Sequence[object],
    method: str = "linear",
    base: object | None = None,
    *,
    dtype: torch.dtype | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Merge fine-tuned models in weight space and return the merged state dict.

    Parameters
    ----------
    models : list of checkpoint paths (read lazily), nn.Modules or state dicts, one per fine-tuned model.
    method : a registered name (``rankwise.merging.METHODS.names()``): linear, task_arithmetic, ties, dare,
        model_stock, tsv, iso_c, ...
    base : the common pre-trained model, required by every method except ``linear`` (which ignores it).
    dtype : dtype of the merged floating tensors (default: the reference model's).
    **options : the method's options (``METHODS.get(method).meta["options"]`` lists them and their defaults).

    Returns
    -------
    dict name -> Tensor, the merged state dict (loadable with ``model.load_state_dict``).
    """
    entry = _entry(method)
    if entry.meta.get("scope") == "model":
        opts = resolve_options(entry, options)
        _open_inputs(entry, models, base)  # the same count / base checks
        if not all(isinstance(m, torch.nn.Module) for m in [*models, *([base] if base is not None else [])]):
            raise ValueError(_needs_modules(method))
        return entry.fn(list(models), base, **opts)
    return dict(merged_tensors(models, method, base, dtype=dtype, **options))


def merge_to_dir(
    models: Sequence[object],
    out: str | os.PathLike,
    method: str = "linear",
    base: object | None = None,
    *,
    force: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    **options,
) -> Path:
    """Merge like :func:`merge` and write a safetensors model dir to ``out`` atomically, streaming tensors.

    ``config.json`` and every non-weight file (tokenizer, chat template, sentence-transformers modules, ...)
    are taken from the base (else ``models[0]``) when it is a model dir; a model card is added. An existing
    ``out`` raises FileExistsError unless ``force``; on any error nothing is left behind.
    """
    entry = _entry(method)
    if entry.meta.get("scope") == "model":
        pairs = merge(models, method, base, dtype=dtype, **options).items()
        ref = base if base is not None else models[0]
        config = None
    else:
        pairs = merged_tensors(models, method, base, dtype=dtype, **options)
        ref = base if base is not None and entry.meta.get("needs_base") else models[0]
        config = as_checkpoint(ref).config
    folder = Path(ref) if isinstance(ref, (str, os.PathLike)) and Path(ref).is_dir() else None
    shown = {k: v for k, v in resolve_options(entry, options).items() if k != "seed" or "seed" in options}
    card = {
        "base_model": _model_name(ref),
        "method": f"merge: {method} of {len(models)} model(s) ({', '.join(_model_name(m) for m in models)})",
        "budget": ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or f"{method} has no options",
        "quality": None,
    }
    return write_checkpoint(
        out, pairs, config=config, force=force, max_shard_bytes=max_shard_bytes, sidecars_from=folder, model_card=card
    )


def _model_name(model: object) -> str:
    if isinstance(model, (str, os.PathLike)):
        from ..io.checkpoint import source_name

        return source_name(Path(model)) if Path(model).is_dir() else str(model)
    return f"<{type(model).__name__}>"


__all__ = ["check_compatible", "merge", "merge_to_dir", "merged_tensors", "resolve_options"]
