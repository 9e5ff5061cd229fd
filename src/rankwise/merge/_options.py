"""Checks shared by merge methods: per-model weights, densities and fractions, each error naming the option."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def model_weights(weights: float | Sequence[float] | None, n: int) -> list[float]:
    """One weight per fine-tuned model: None gives 1.0 each, a number is broadcast, a list must have ``n``."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        return [_number(weights, "weights")] * n
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"weights must give one number per fine-tuned model ({n}), got {len(weights)}: {weights!r}")
    return [_number(w, "weights") for w in weights]


def per_model_fraction(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """A fraction in (0, 1] per model (``density``): a number is broadcast, a list must have ``n``."""
    values = [value] * n if not isinstance(value, (list, tuple)) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} must give one number per fine-tuned model ({n}), got {len(values)}: {values!r}")
    for v in values:
        if not 0 < _number(v, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return [float(v) for v in values]


def scalar(value: object, name: str) -> float:
    return _number(value, name)


def choice(value: object, name: str, accepted: Sequence[object]) -> object:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def stacked_deltas(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Task vectors ``t_i - base``, shape (T, *base.shape)."""
    return torch.stack([t - base for t in tensors])


def broadcast_weights(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Weights as a tensor of shape (T, 1, ..., 1) that multiplies a (T, *shape) stack."""
    return torch.tensor(weights, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))
