"""Merging models in weight space: one registry of methods, one file per method, a lazy tensor-by-tensor driver.

Every method registers itself with ``@METHODS.register(name, paper=URL, scope=..., min_models=...,
needs_base=..., options={name: default})``:

- ``scope="tensor"``: ``fn(tensors, base, **options) -> Tensor`` with ``tensors`` a list of float32
  tensors of one name (one per fine-tuned model) and ``base`` the base model's tensor or None. The
  driver (:mod:`rankwise.merging.run`) calls it name by name, reading lazily, so memory stays near
  one tensor per model. Methods taking ``seed`` receive one derived from the seed and the tensor name.
- ``scope="model"``: ``fn(models, base, **options) -> dict[str, Tensor]`` over ``nn.Module``s, for
  methods needing forward passes (AdaMerging, permutation alignment).
"""

from __future__ import annotations

from ..registry import Registry

METHODS = Registry("merge method")

# Importing a method's module registers it.
from . import adamerging, dare, iso_c, linear, model_stock, rebasin, task_arithmetic, ties, tsv  # noqa: E402,F401  # noqa: E402,F401
from .run import merge, merge_to_dir, merged_tensors  # noqa: E402

__all__ = ["METHODS", "merge", "merge_to_dir", "merged_tensors"]
