"""The registry of factorized layer types a checkpoint can name, rebuilt by ``empty_layer(old, spec)``.

A layer class registers itself with ``@LAYERS.register("<type name>")``, implements ``spec(self) -> dict``
(JSON-serializable, with ``"layer": "<type name>"``) and is built uninitialized by ``cls(spec, device=...,
dtype=...)`` with the state-dict keys the saved layer wrote.
"""

from __future__ import annotations

from torch import nn

from ..registry import Registry

LAYERS = Registry("layer type")


def empty_layer(old: nn.Module, spec: dict) -> nn.Module:
    """An uninitialized layer of ``spec`` on ``old``'s device and dtype (the meta device included)."""
    ref = next(iter(old.parameters()))
    return LAYERS.get(spec["layer"]).fn(spec, device=ref.device, dtype=ref.dtype)
