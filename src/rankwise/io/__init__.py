"""Reading models and checkpoints lazily, and writing outputs atomically."""

from .atomic import atomic_output_dir

__all__ = ["atomic_output_dir"]
