"""Applying a delta: in place to an nn.Module, or streamed from a base checkpoint into a new model directory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ..io.checkpoint import source_name
from ..io.lazy import iter_tensors, write_checkpoint
from ..io.reader import ModelReader
from ..layers.linear import is_conv1d
from .core import Delta, load_peft


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


@torch.no_grad()
def apply_delta_(model: nn.Module, delta: Delta) -> nn.Module:
    """Add ``delta`` to ``model``'s weights in place (``W += B @ A``, ``b += db``, exact tensors copied).

    Every tensor the delta names is checked (present, same shape) before any is changed, so a
    mismatched model raises ``ValueError`` and is left untouched. Conv1D weights get ``(B @ A)^T``.
    Tied parameters are updated once. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    # orientation comes from the model's own layer types (a PEFT adapter's fan_in_fan_out is global)
    conv1d = {n for n, m in model.named_modules() if is_conv1d(m)}
    delta = dataclasses.replace(delta, transposed=frozenset(conv1d & set(delta.lora)))
    tensors = _named_tensors(model)
    for name in delta.targets():
        if name not in tensors:
            raise ValueError(f"delta changes tensor {name!r}, which the model does not have")
    seen: set[int] = set()
    updates = []
    for name in delta.targets():
        t = tensors[name]
        if id(t) in seen:
            continue
        seen.add(id(t))
        updates.append((t, delta.apply_to(name, t)))  # computes (and shape-checks) everything first
    for t, new in updates:
        t.copy_(new)
    return model


def apply_delta_checkpoint(
    base: str | os.PathLike, delta: Delta | str | os.PathLike, out: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write ``base + delta`` as a checkpoint directory, one tensor at a time (memory: one tensor).

    Parameters
    ----------
    base : HF model directory, ``.safetensors`` file, ``.gguf`` or model alias (read lazily).
    delta : a :class:`Delta` or a PEFT LoRA adapter directory (read with :func:`load_peft`).
    out : output directory, written atomically with the base's config, every non-weight file of the base
        directory (tokenizer, chat template, sentence-transformers modules, ...) and a model card;
        an existing one raises ``FileExistsError`` unless ``force``.

    Raises ``ValueError`` naming the first tensor the delta changes that the base lacks (or whose
    shape differs), before anything is written.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(
            f"output directory {str(out)!r} already exists; pass --force (force=True) to overwrite it"
        )
    delta_name = "in memory" if isinstance(delta, Delta) else f"PEFT adapter {delta}"
    if not isinstance(delta, Delta):
        delta = load_peft(delta)
    ckpt = ModelReader(base, "base").ckpt
    for name in delta.targets():
        if name not in ckpt:
            raise ValueError(f"delta changes tensor {name!r}, which base {str(base)!r} does not have")
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in delta.lora:
            m, n = delta.shapes[module]
            want = (n, m) if module in delta.transposed else (m, n)
            if ckpt.shape(name) != want:
                raise ValueError(f"delta for {name!r} has shape {want}, base {str(base)!r} has {ckpt.shape(name)}")
    folder = ckpt.path if ckpt.path.is_dir() else None  # a lone .safetensors file: its neighbours are not its own
    ranks = sorted(delta.ranks.values())
    span = f"LoRA ranks {ranks[0]}-{ranks[-1]}, " if ranks else ""
    card = {
        "base_model": source_name(folder) if folder is not None else str(base),
        "method": f"delta apply: base + low-rank delta ({delta_name})",
        "budget": f"{span}{len(ranks)} low-rank layers, {delta.num_params:,} factor parameters, "
        f"{len(delta.exact)} tensors replaced exactly",
        "quality": None,
    }
    tensors = ((name, delta.apply_to(name, t)) for name, t in iter_tensors(ckpt))
    return write_checkpoint(out, tensors, config=ckpt.config, force=force, sidecars_from=folder, model_card=card)
