"""Fine-tunes as low-rank deltas: the :class:`Delta` data class (``core``), extraction under one budget
(``extract``), application in place or to a checkpoint (``apply``), PEFT LoRA adapters (``peft``).

Modules import one another in that order only (peft <- core <- extract, apply), so there is no cycle.
"""

from ..allocate import allocate_delta_ranks
from .apply import apply_delta_, apply_delta_checkpoint
from .core import Delta, load_peft
from .extract import EXACT_OTHER, extract_delta
from .peft import read_peft, save_peft

__all__ = [
    "EXACT_OTHER",
    "Delta",
    "allocate_delta_ranks",
    "apply_delta_",
    "apply_delta_checkpoint",
    "extract_delta",
    "load_peft",
    "read_peft",
    "save_peft",
]
