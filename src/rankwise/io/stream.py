"""A transformers model built from its config with the block stack left unloaded.

Blocks are read from the checkpoint one at a time. Memory holds the modules outside the block stack
(embeddings, final norm, head) and one block: the model is built with its parameters on the meta
device; the stack's stay there until :meth:`CheckpointSource.load_block` reads that block's tensors
lazily (:mod:`rankwise.io.lazy`, one tensor at a time) and :meth:`release_block` returns them to the
meta device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .lazy import open_checkpoint


def _parameters_on_meta():
    """Build modules with every parameter on the meta device and buffers real (rotary tables, position
    ids: small, computed from the config, and often not in the checkpoint). accelerate's context; plain
    ``torch.device("meta")`` would leave the non-persistent buffers empty."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def persistent_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` names -> tensors (parameters and persistent buffers); a tensor shared by several
    names (tied embeddings) is listed once, under the first name."""
    seen, out = set(), {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _c_malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, Windows, musl)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _c_malloc_trim()


def trim_heap() -> None:
    """Give the free pages of the C heap back to the OS (no-op without glibc).

    glibc serves tensors below its mmap threshold (which rises to 32 MiB after the first large free)
    from the heap and returns freed heap pages to the OS only from its top: without a trim after each
    block, peak RSS grew by about one float32 block per block processed (hidden 512, 12 -> 48 blocks:
    1,060 -> 1,530 MB; with the trim 902 -> 948 MB). Measured against fixing the mmap threshold at
    1 MiB (each tensor its own mapping: the lowest peak, but fresh pages for every activation): on
    SmolLM2 the trim costs 19 s of system time where the fixed threshold cost 32 s and glibc's default 6 s
    (BENCHMARKS.md, "Streamed compression").
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_module(module: nn.Module) -> None:
    """Return every persistent tensor of ``module`` to the meta device (frees what a block load read)."""
    for name, t in persistent_tensors(module).items():
        _set_tensor(module, name, torch.empty_like(t, device="meta"))


class CheckpointSource:
    """A model read from a transformers directory one block at a time.

    Parameters
    ----------
    hf_dir : transformers model directory with safetensors weights.
    auto_class : the transformers auto class to build it with (``AutoModelForCausalLM`` / ``AutoModel``).
    stack_name : qualified name of the block stack (``model.layers``), as :func:`rankwise.targets.block_stack` finds it.
    device, dtype : where and in which dtype blocks are computed.

    Raises ``ValueError`` naming a tensor the model needs that the checkpoint lacks.
    """

    def __init__(self, hf_dir: Path, auto_class, stack_name: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig

        from ..targets import block_stack

        self.hf_dir, self.device, self.dtype = Path(hf_dir), torch.device(device), dtype
        self.ckpt = open_checkpoint(self.hf_dir)
        config = AutoConfig.from_pretrained(self.hf_dir)
        with _parameters_on_meta():  # no parameter memory: allocating the stack and freeing it fragments the heap
            self.model = auto_class.from_config(config, dtype=dtype).eval()
        self.model.tie_weights()  # from_config ties embeddings only when it initializes weights
        if stack_name is None:
            found = block_stack(self.model)
            if found is None:
                raise ValueError(
                    f"model in {str(self.hf_dir)!r} has no block stack (a ModuleList of identical blocks) to stream"
                )
            stack_name = found[0]
        self.stack_name = stack_name
        self.stack = self.model.get_submodule(stack_name)
        self.num_blocks = len(self.stack)
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""
        names = persistent_tensors(self.model)
        self.keys = {name: self._checkpoint_key(name) for name in names}
        for i in range(self.num_blocks):
            self.release_block(i)
        # tied tensors: load once, then point every name that shared it at the loaded tensor
        ties = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            ties.setdefault(id(t), []).append(name)
        stack_prefix = stack_name + "."
        for name in names:
            if name.startswith(stack_prefix):
                continue
            value = self._read(name).to(device, dtype if names[name].is_floating_point() else None)
            for alias in ties[id(names[name])]:
                _set_tensor(self.model, alias, value)
        self.model.requires_grad_(False)

    def _checkpoint_key(self, name: str) -> str:
        p = self._prefix
        for key in (name, name.removeprefix(p + ".") if p else name, f"{p}.{name}" if p else name):
            if key in self.ckpt:
                return key
        raise ValueError(
            f"checkpoint {str(self.hf_dir)!r} has no tensor for {name!r} (nor with/without the prefix {p!r})"
        )

    def block_names(self, i: int) -> dict[str, str]:
        """``{name inside block i: checkpoint key}`` of the block's persistent tensors."""
        prefix = f"{self.stack_name}.{i}."
        return {n.removeprefix(prefix): k for n, k in self.keys.items() if n.startswith(prefix)}

    def load_block(self, i: int, dtype: torch.dtype | None = None) -> nn.Module:
        """Block ``i`` read from the checkpoint, on the compute device, in ``dtype`` (default the compute dtype)."""
        block = self.stack[i]
        for name in self.block_names(i):
            t = self._read(f"{self.stack_name}.{i}.{name}")
            _set_tensor(block, name, t.to(self.device, (dtype or self.dtype) if t.is_floating_point() else None))
        return block

    def _read(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(self.keys[name])
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"tensor {self.keys[name]!r} of {str(self.hf_dir)!r} holds {bad} NaN/Inf values; "
                "only finite weights can be compressed"
            )
        return t

    def release_block(self, i: int) -> None:
        release_module(self.stack[i])
        trim_heap()

    def stored_dtype(self, name: str) -> torch.dtype:
        """The checkpoint's dtype of the tensor the model calls ``name``."""
        return self.ckpt.dtype(self.keys[name])

    def close(self) -> None:
        self.ckpt.close()
