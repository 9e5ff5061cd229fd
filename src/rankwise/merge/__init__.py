"""Merging models in weight space: one registry of methods, one file per method, a lazy tensor-by-tensor driver.

Every method registers itself with ``@METHODS.register(name, paper=URL, scope=..., min_models=...,
needs_base=..., options={name: default})``:

- ``scope="tensor"``: ``fn(tensors, base, **options) -> Tensor`` with ``tensors`` a list of float32
  tensors of one name (one per fine-tuned model) and ``base`` the base model's tensor or None. The
  driver (:mod:`rankwise.merge.run`) calls it name by name, reading lazily, so memory stays near
  one tensor per model. Methods taking ``seed`` receive one derived from the seed and the tensor name.
- ``scope="model"``: ``fn(models, base, **options) -> dict[str, Tensor]`` over ``nn.Module``s, for
  methods needing forward passes (AdaMerging, permutation alignment).
"""

from __future__ import annotations

import sys
import types

from ..registry import Registry

METHODS = Registry("merge method")

# Importing a method's module registers it. Model-scope methods (adamerging.py, rebasin.py) are owned
# by their engineer, who adds their import line here when the module lands.
from . import dare, iso_c, linear, model_stock, task_arithmetic, ties, tsv  # noqa: E402,F401
from . import adamerging, rebasin  # noqa: E402,F401
from .run import merge, merge_to_dir, merged_tensors  # noqa: E402

__all__ = ["METHODS", "merge", "merge_to_dir", "merged_tensors"]


class _CallableModule(types.ModuleType):
    """``rankwise.merge`` is both this package and the verb: importing the package binds the name
    ``rankwise.merge`` to the module, so the module itself forwards calls to :func:`merge`."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
