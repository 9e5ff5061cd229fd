"""Task arithmetic: add the scaled (weighted) sum of task vectors ``W_i - W_base`` to the base."""

from __future__ import annotations

import torch

from . import METHODS
from ._options import model_weights, scalar, task_vectors_, weighted_sum_


@METHODS.register(
    "task_arithmetic",
    paper="https://arxiv.org/abs/2212.04089",
    scope="tensor",
    min_models=1,
    needs_base=True,
    options={"weights": None, "scale": 1.0, "normalize": False},
)
def task_arithmetic(
    tensors: list[torch.Tensor], base: torch.Tensor, *, weights=None, scale: float = 1.0, normalize: bool = False
) -> torch.Tensor:
    """``W_base + scale * sum_i w_i (W_i - W_base)`` (divided by ``sum_i w_i`` when ``normalize``).

    Parameters
    ----------
    tensors : list of T tensors shaped like ``base``, one per fine-tuned model.
    base : Tensor, the pre-trained weights.
    weights : float or list of T floats, default 1.0 each.
    scale : the scaling coefficient (lambda in the paper and in mergekit).

    References
    ----------
    G. Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
    """
    w = model_weights(weights, len(tensors))
    mixed = weighted_sum_(task_vectors_(tensors, base), w)
    if normalize:
        total = sum(w)
        mixed /= total if abs(total) >= 1e-8 else 1.0
    return mixed.mul_(scalar(scale, "scale")).add_(base)
