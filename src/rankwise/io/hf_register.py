"""Registers rankwise's transformers quantizer when transformers loads its quantizer registry, not before.

``import rankwise`` must make ``AutoModelForCausalLM.from_pretrained(rankwise_dir)`` work, but
importing transformers costs seconds and is optional. So: if ``transformers.quantizers.auto`` is
already imported, register now; otherwise a meta-path finder waits for that module to be executed
(by ``from_pretrained`` or any transformers import that pulls it in) and registers right after.
Without transformers installed nothing happens.
"""

from __future__ import annotations

import importlib.abc
import sys

REGISTRY_MODULE = "transformers.quantizers.auto"


def _register() -> None:
    from . import hf_quantizer  # noqa: F401  (importing it registers "rankwise")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``REGISTRY_MODULE`` with the other finders and runs ``_register`` after it executes."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        execute = getattr(spec.loader, "exec_module", None)
        if execute is not None:

            def exec_then_register(module):
                execute(module)
                _register()

            spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else as soon as it is (idempotent)."""
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


install()
