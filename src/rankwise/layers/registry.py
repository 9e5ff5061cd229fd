"""The registry of factorized layer types a checkpoint can name: ``LAYERS.get(spec["layer"]).fn.empty(old, spec)``.

A layer class registers itself with ``@LAYERS.register("<type name>")`` and implements ``spec(self) ->
dict`` (JSON-serializable, with ``"layer": "<type name>"``) and ``empty(cls, old, spec)`` (an
uninitialized layer of that spec on ``old``'s device and dtype, whose state-dict keys are those the
saved layer wrote).
"""

from __future__ import annotations

from ..registry import Registry

LAYERS = Registry("layer type")
