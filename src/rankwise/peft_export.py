"""Former home of the PEFT adapter functions, kept so that ``rankwise.peft_export.*`` imports keep working;
they live in :mod:`rankwise.delta` (``delta/peft.py``, ``delta/core.py``, ``delta/apply.py``)."""

from .delta import apply_delta_checkpoint, load_peft, save_peft
from .delta.peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME

__all__ = ["CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "apply_delta_checkpoint", "load_peft", "save_peft"]
