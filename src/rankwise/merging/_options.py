"""Checks shared by merge methods: per-model weights, densities and fractions, each error naming the option."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validate import finite, is_number


def model_weights(weights: float | Sequence[float] | None, n: int) -> list[float]:
    """One weight per fine-tuned model: None gives 1.0 each, a number is broadcast, a list must have ``n``."""
    if weights is None:
        return [1.0] * n
    if is_number(weights):
        return [finite(weights, "weights")] * n
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"weights must give one number per fine-tuned model ({n}), got {len(weights)}: {weights!r}")
    return [finite(w, "weights") for w in weights]


def per_model_fraction(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """A fraction in (0, 1] per model (``density``): a number is broadcast, a list must have ``n``."""
    values = [value] * n if not isinstance(value, (list, tuple)) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} must give one number per fine-tuned model ({n}), got {len(values)}: {values!r}")
    for v in values:
        if not 0 < finite(v, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return [float(v) for v in values]


def scalar(value: object, name: str) -> float:
    return finite(value, name)


def choice(value: object, name: str, accepted: Sequence[object]) -> object:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def task_vectors_(tensors: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """Turn each fine-tuned tensor into its task vector ``t_i - base`` in place (the driver's scratch copies)."""
    for t in tensors:
        t.sub_(base)
    return tensors


def weighted_sum_(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i t_i`` accumulated into ``tensors[0]`` (overwritten; the others are scaled in place)."""
    out = tensors[0].mul_(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t.mul_(w))
    return out
