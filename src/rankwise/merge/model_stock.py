"""Model Stock: interpolate between the base and the fine-tunes' average by a ratio set by the angle between fine-tunes."""

from __future__ import annotations

import torch

from . import METHODS


def interpolation_ratio(deltas: torch.Tensor) -> torch.Tensor:
    """``t = N cos / (1 + (N - 1) cos)`` from the mean pairwise cosine of the task vectors.

    deltas : Tensor, shape (N, D), the flattened ``W_i - W_base``. Returns a 0-d tensor; where the
    denominator vanishes (cos = -1/(N-1)) there is no finite estimate and ``t = 0`` keeps the base.
    """
    n = deltas.shape[0]
    norms = deltas.norm(dim=1)
    gram = deltas @ deltas.T
    cos = (gram / (norms[:, None] * norms[None, :]).clamp(min=1e-6)).clamp(-1, 1)
    i, j = torch.triu_indices(n, n, offset=1)
    c = cos[i, j].mean()
    denom = 1 + (n - 1) * c
    if denom.abs() < 1e-6:
        return torch.zeros((), dtype=deltas.dtype)
    return n * c / denom


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
    deltas = torch.stack([(t - base).reshape(-1) for t in tensors])
    t = interpolation_ratio(deltas)
    average = torch.stack(tensors).mean(dim=0)
    return t * average + (1 - t) * base
