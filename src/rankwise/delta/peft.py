"""The PEFT LoRA adapter format (adapter_config.json + adapter_model.safetensors): writing a delta, reading its parts.

This module knows the file format only; it does not import the :class:`~rankwise.delta.Delta` class, which
imports it (``Delta.save_peft``, ``load_peft``), so the package has no import cycle."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from ..io.atomic import atomic_output_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def save_peft(delta, out: str | os.PathLike, *, force: bool = False, extra: dict[str, str] | None = None) -> Path:
    """Write ``delta`` (a :class:`~rankwise.delta.Delta`) as a PEFT LoRA adapter that
    ``peft.PeftModel.from_pretrained(base, out)`` loads.

    Every factorized layer is a LoRA target with its own rank in ``rank_pattern`` and
    ``lora_alpha`` equal to that rank in ``alpha_pattern``, so PEFT's scaling ``alpha / r`` is exactly 1
    and the adapter adds ``B @ A``. Exact bias deltas of LoRA targets go to ``lora_B.bias``
    (``lora_bias``); a layer whose only change is its bias gets zero rank-1 factors. Modules stored
    exactly (embeddings, norms, ...) are listed in ``modules_to_save`` with their fine-tuned tensors;
    ``ensure_weight_tying`` keeps a tied output head tied to a saved input embedding.

    The directory is written atomically, with ``extra`` (file name -> text) beside the adapter files; an
    existing ``out`` raises ``FileExistsError`` unless ``force``.

    References
    ----------
    E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, (A, B) in delta.lora.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B
        ranks[module] = int(A.shape[0])
    for module, db in delta.bias.items():
        if module not in delta.lora:
            # PEFT needs r >= 1 on a target: zero factors carry the bias change alone
            like = next(iter(delta.lora.values()))[0] if delta.lora else db
            n = delta.shapes[module][1]
            tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.zeros(1, n, dtype=like.dtype)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.zeros(db.shape[0], 1, dtype=like.dtype)
            ranks[module] = 1
    if delta.bias:
        for module in ranks:
            B = tensors[f"{PREFIX}{module}.lora_B.weight"]
            db = delta.bias.get(module)
            tensors[f"{PREFIX}{module}.lora_B.bias"] = (
                torch.zeros(B.shape[0], dtype=B.dtype) if db is None else db.to(B.dtype)
            )
    saved_modules = sorted({name.rpartition(".")[0] for name in delta.exact})
    for name, value in delta.exact.items():
        if not name.rpartition(".")[0]:
            raise ValueError(f"tensor {name!r} belongs to no module; PEFT's modules_to_save cannot store it")
        tensors[PREFIX + name] = value
    for alias, name in delta.tied.items():
        tensors[PREFIX + alias] = delta.exact[name].clone()  # PEFT's ensure_weight_tying loads both names
    if not tensors:
        raise ValueError("the delta is empty (base and fine-tuned models are equal); nothing to save")
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": bool(delta.bias),
        "fan_in_fan_out": bool(delta.transposed),
        "target_modules": sorted(ranks),
        "modules_to_save": saved_modules or None,
        "ensure_weight_tying": bool(delta.tied),
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    with atomic_output_dir(out, force=force) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def read_peft(path: str | os.PathLike) -> dict:
    """The parts of a PEFT LoRA adapter directory, as keyword arguments of :class:`~rankwise.delta.Delta`
    (``lora``, ``bias``, ``exact``, ``tied``, ``shapes``, ``transposed``; scaling ``alpha / r`` folded into ``B``).

    Accepts adapters from any tool (rank/alpha patterns, rsLoRA, ``lora_B.bias``, modules_to_save).

    Raises
    ------
    FileNotFoundError if ``path`` or its adapter files are missing; ValueError for non-LoRA adapters,
    DoRA, LoRA on embeddings, or keys that do not belong to a target or a saved module.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"delta directory {str(path)!r} has no {name} (expected a PEFT LoRA adapter)")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{str(path / CONFIG_NAME)!r} is not valid JSON") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type must be LORA, got {config.get('peft_type')!r} in {str(path / CONFIG_NAME)!r}")
    if config.get("use_dora"):
        raise ValueError(f"DoRA adapters are not supported (use_dora is true in {str(path / CONFIG_NAME)!r})")
    tensors = load_file(str(path / WEIGHTS_NAME))
    saved = config.get("modules_to_save") or []
    lora: dict[str, dict[str, torch.Tensor]] = {}
    delta = SimpleNamespace(lora={}, bias={}, exact={}, tied={}, shapes={}, transposed=frozenset())
    tied: list[tuple[str, torch.Tensor]] = []
    for key, value in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = value
        elif any(name.startswith(s + ".") or ("." + s + ".") in name for s in saved):
            delta.exact[name] = value
        elif config.get("ensure_weight_tying"):
            tied.append((name, value))
        else:
            raise ValueError(f"adapter tensor {key!r} is neither a LoRA factor nor in modules_to_save")
    for name, value in tied:  # a tied head saved next to its embedding: record which tensor it repeats
        source = [n for n, v in delta.exact.items() if v.shape == value.shape and torch.equal(v, value)]
        if not source:
            raise ValueError(
                f"adapter tensor {PREFIX + name!r} is neither a LoRA factor, in modules_to_save, nor tied to one"
            )
        delta.tied[name] = source[0]
    transposed = set()
    for module, parts in lora.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise ValueError(f"adapter layer {module!r} lacks its lora_A or lora_B weight")
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        delta.lora[module] = (A, B if scaling == 1 else (B.double() * scaling).to(B.dtype))
        delta.shapes[module] = (int(B.shape[0]), int(A.shape[1]))
        if "lora_B.bias" in parts and bool(parts["lora_B.bias"].any()):  # zeros: padding for bias-free layers
            delta.bias[module] = (parts["lora_B.bias"].double() * scaling).to(parts["lora_B.bias"].dtype)
        if config.get("fan_in_fan_out"):
            transposed.add(module)
    delta.transposed = frozenset(transposed)
    return vars(delta)
