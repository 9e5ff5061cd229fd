"""One reader for the models that deltas are extracted from and applied to: a path, alias, ``.gguf``, nn.Module
or state dict, read one tensor at a time, with each module's layer kind and the tied parameter names."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..layers.linear import is_conv1d
from .lazy import StateDictCheckpoint, open_checkpoint
from .models import converted_gguf, resolve

# modules whose 2-D ".weight" is a lookup table, not a Linear map (names of HF embedding modules)
EMBEDDING = re.compile(r"(^|\.)(embed\w*|wte|wpe|shared|\w*embeddings)$")


class ModelReader:
    """One model, read tensor by tensor: names, shapes, the layer kind of each module, values on demand.

    ``model`` is a path (HF model directory, sharded directory, ``.safetensors`` file, ``.gguf`` converted
    once and cached, or a model alias), an nn.Module (tied duplicates and non-persistent buffers left out)
    or a state dict; ``what`` names it in error messages. ``ckpt`` is the lazy checkpoint, ``tied`` maps a
    parameter name to the first name of the same tensor, ``kind`` says how a module's weight acts.
    """

    def __init__(self, model: object, what: str):
        self.kinds: dict[str, str] = {}  # module name -> "linear" | "conv1d"; others are guessed by name
        self.tied: dict[str, str] = {}  # parameter name -> the first name of the same tensor
        if isinstance(model, nn.Module):
            params = dict(model.named_parameters())  # drops tied duplicates (lm_head tied to embed_tokens)
            first = {id(p): n for n, p in params.items()}
            self.tied = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if n not in params}
            persistent = set(model.state_dict(keep_vars=True))
            buffers = {n: b for n, b in model.named_buffers() if n in persistent}
            self.ckpt = StateDictCheckpoint({**params, **buffers}, f"<{what} {type(model).__name__}>")
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear):
                    self.kinds[name] = "linear"
                elif is_conv1d(mod):
                    self.kinds[name] = "conv1d"
                elif len(list(mod.children())) == 0 and getattr(mod, "weight", None) is not None:
                    self.kinds[name] = "other"
        elif isinstance(model, Mapping):
            if not all(isinstance(v, torch.Tensor) for v in model.values()):
                raise ValueError(f"{what} state dict must map names to tensors")
            self.ckpt = StateDictCheckpoint(model, f"<{what} state dict>")
        elif isinstance(model, (str, os.PathLike)):
            path = resolve(model)
            self.ckpt = open_checkpoint(converted_gguf(path) if path.suffix == ".gguf" else path)
            config = self.ckpt.config or {}
            embed = [n for n in self.ckpt.keys() if EMBEDDING.search(n.rpartition(".")[0]) and "position" not in n]
            if config.get("tie_word_embeddings") and "lm_head.weight" not in self.ckpt and len(embed) == 1:
                self.tied = {"lm_head.weight": embed[0]}  # transformers ties the head to the input embedding
        else:
            raise ValueError(f"{what} must be a path, an nn.Module or a state dict, got {type(model).__name__}")

    def kind(self, module: str, shape: tuple[int, ...]) -> str:
        """``"linear"``/``"conv1d"`` for matrices acting on features, else ``"other"``."""
        if module in self.kinds:
            return self.kinds[module]
        return "linear" if len(shape) == 2 and not EMBEDDING.search(module) else "other"
