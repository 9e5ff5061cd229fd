"""Reading models and checkpoints lazily, and writing outputs atomically."""

from .atomic import atomic_output_dir
from .lazy import LazyCheckpoint, StateDictCheckpoint, as_checkpoint, iter_tensors, open_checkpoint, write_checkpoint

__all__ = [
    "LazyCheckpoint",
    "StateDictCheckpoint",
    "as_checkpoint",
    "atomic_output_dir",
    "iter_tensors",
    "open_checkpoint",
    "write_checkpoint",
]
