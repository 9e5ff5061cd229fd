"""Which layers to compress: every nn.Linear / transformers Conv1D inside the block stack, found by walking modules."""

from __future__ import annotations

import re

import torch
from torch import nn

from ._validate import regex
from .layers.linear import LowRankLinear, dense_weight, is_conv1d


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' GPT-2 style Conv1D (weight stored (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of same-type blocks holding the most parameters (the transformer layers).

    No per-architecture names: ``model.layers`` (Llama), ``encoder.layer`` (BERT), ``transformer.h``
    (GPT-2) are all found as the largest list of identical-type modules. Returns ``(name, list)``.
    """
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if len({type(child) for child in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = (name, mod), size
    return best


def find_targets(model: nn.Module, include: str | None = None, exclude: str | None = None) -> dict[str, nn.Module]:
    """Qualified name -> layer for every layer to factorize, in module order.

    Default: every nn.Linear / Conv1D inside :func:`block_stack` (embeddings and LM head untouched).
    ``include`` (a regex searched in the qualified name) replaces that default by every matching
    linear layer of the model; ``exclude`` then removes matches. Already factorized layers are skipped.

    Raises ``ValueError`` for an invalid regex, an ``include`` that matches no linear layer, or an
    empty selection.
    """
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    linears = {n: m for n, m in model.named_modules() if is_linear(m) and not inside_low_rank(model, n)}
    if inc is not None:
        chosen = {n: m for n, m in linears.items() if inc.search(n)}
        if not chosen:
            sample = ", ".join(list(linears)[:3]) or "none"
            raise ValueError(
                f"include={include!r} matches no nn.Linear/Conv1D module name (of {len(linears)}, e.g. {sample})"
            )
    else:
        stack = block_stack(model)
        if stack is None:
            chosen = dict(linears)
        else:
            prefix = stack[0] + "."
            chosen = {n: m for n, m in linears.items() if n.startswith(prefix)}
    if exc is not None:
        chosen = {n: m for n, m in chosen.items() if not exc.search(n)}
    if not chosen:
        raise ValueError(
            f"no layer to compress: include={include!r}, exclude={exclude!r} leave no nn.Linear/Conv1D module"
        )
    return chosen


def check_finite_weights(targets: dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` naming the first weight or bias tensor holding NaN/Inf."""
    for name, layer in targets.items():
        for pname, p in layer.named_parameters(recurse=False):
            if not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise ValueError(
                    f"tensor {name}.{pname} contains {bad} NaN/Inf values; only finite weights can be compressed"
                )


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear / Conv1D."""
    W = dense_weight(layer)
    return int(W.shape[0]), int(W.shape[1])


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Set the submodule at the dotted path ``name`` to ``new``; returns its parent module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return parent


def inside_low_rank(model: nn.Module, name: str) -> bool:
    """Whether the module ``name`` is part of a ``LowRankLinear`` (its ``down`` / ``up``)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), LowRankLinear) for i in range(1, len(parts)))


def _compile(pattern: str | None, field: str) -> re.Pattern | None:
    return regex(pattern, field)
