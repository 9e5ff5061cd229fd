"""Reading models and checkpoints lazily, and writing outputs atomically."""

from .atomic import atomic_output_dir
from .checkpoint import load, save
from .lazy import LazyCheckpoint, StateDictCheckpoint, as_checkpoint, iter_tensors, open_checkpoint, write_checkpoint
from .models import load_model

__all__ = [
    "LazyCheckpoint",
    "StateDictCheckpoint",
    "as_checkpoint",
    "atomic_output_dir",
    "iter_tensors",
    "load",
    "load_model",
    "open_checkpoint",
    "save",
    "write_checkpoint",
]
