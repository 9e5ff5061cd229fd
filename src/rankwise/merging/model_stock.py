"""Model Stock: interpolate between the base and the fine-tunes' average.

The interpolation ratio is set by the angle between fine-tunes.
"""

from __future__ import annotations

import torch

from . import METHODS
from ._options import task_vectors_, weighted_sum_


def interpolation_ratio(deltas: list[torch.Tensor]) -> float:
    """``t = N cos / (1 + (N - 1) cos)`` from the mean pairwise cosine of the task vectors.

    deltas : list of N tensors of one shape, the ``W_i - W_base`` (each flattened to one vector).
    Where the denominator vanishes (cos = -1/(N-1)) there is no finite estimate and ``t = 0`` keeps
    the base; zero task vectors count as orthogonal.
    """
    flat = [d.reshape(-1) for d in deltas]
    n = len(flat)
    norms = [float(f.norm()) for f in flat]
    cosines = [
        max(-1.0, min(1.0, float(flat[i] @ flat[j]) / max(norms[i] * norms[j], 1e-6)))
        for i in range(n)
        for j in range(i + 1, n)
    ]
    c = sum(cosines) / len(cosines)
    denom = 1 + (n - 1) * c
    return 0.0 if abs(denom) < 1e-6 else n * c / denom


@METHODS.register(
    "model_stock",
    paper="https://arxiv.org/abs/2403.19522",
    scope="tensor",
    min_models=3,
    needs_base=True,
    options={},
)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Model Stock, per tensor: ``t * mean_i W_i + (1 - t) * W_base`` with ``t`` from :func:`interpolation_ratio`.

    The paper's geometry: fine-tuned weights lie near a thin shell around their center; with the angle
    ``theta`` between task vectors (averaged over pairs), the point of the segment from the base to
    the fine-tunes' average closest to the center is at ratio ``t = N cos(theta) / (1 + (N-1) cos(theta))``.
    Computed per tensor (each layer's weights flattened to one vector), as the paper does layer-wise.

    Parameters
    ----------
    tensors : list of N >= 3 tensors shaped like ``base`` (fine-tunes).
    base : Tensor, the pre-trained weights (the anchor).

    References
    ----------
    D.-H. Jang, S. Yun, D. Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
    """
    deltas = task_vectors_(tensors, base)
    t = interpolation_ratio(deltas)
    # t * mean_i W_i + (1 - t) * W_base, written as base + t * (mean task vector)
    return weighted_sum_(deltas, [1.0] * len(deltas)).mul_(t / len(deltas)).add_(base)
