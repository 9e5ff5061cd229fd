"""rankwise: low-rank and tensor factorizations of neural-network layers.

Compress a model under a parameter budget, store fine-tunes as low-rank deltas (PEFT LoRA), merge
models in weight space. Heavy submodules are imported on first use of the names below.
"""

from __future__ import annotations

import importlib

from .io import hf_register as _hf_register  # noqa: F401  (stock from_pretrained reads rankwise dirs)

__version__ = "0.1.0"

_EXPORTS = {
    # decompositions
    "formats": "rankwise.formats",
    "LowRankLinear": "rankwise.layers",
    "LAYERS": "rankwise.layers",
    "conv_from_dense": "rankwise.layers",
    # compression
    "CompressConfig": "rankwise.compress",
    "compress_": "rankwise.compress",
    "compress_checkpoint": "rankwise.streamed",
    "ModuleCompressConfig": "rankwise.compress_modules",
    # quantization
    "QuantizeConfig": "rankwise.quantize",
    "quantize_": "rankwise.quantize",
    "quantize_to_budget_": "rankwise.quant_budget",
    "compress_quantized": "rankwise.quant_checkpoint",
    "save": "rankwise.io.checkpoint",
    "load": "rankwise.io.checkpoint",
    # healing
    "HealConfig": "rankwise.heal",
    "heal_": "rankwise.heal",
    # deltas
    "extract_delta": "rankwise.delta",
    "apply_delta_": "rankwise.delta",
    # merging
    "merge": "rankwise.merging",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return module if module.__name__ == f"rankwise.{name}" else getattr(module, name)
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")
