"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, average the agreeing ones."""

from __future__ import annotations

import torch

from . import METHODS
from ._options import broadcast_weights, model_weights, per_model_fraction, scalar, stacked_deltas


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` entries of largest magnitude, zero the rest.

    delta : Tensor, any shape. ``density >= 1`` returns ``delta`` unchanged.
    """
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def sign_consensus_merge(deltas: torch.Tensor, weights: list[float], normalize: bool) -> torch.Tensor:
    """Elect a sign per entry and combine the weighted deltas that agree with it.

    deltas : Tensor, shape (T, *shape), the (trimmed) task vectors, not yet weighted.
    The elected sign is that of ``sum_i w_i delta_i`` (positive on ties); entry-wise the result is
    ``sum_{i agrees} w_i delta_i``, divided by ``sum_{i agrees} w_i`` when ``normalize`` (the disjoint
    mean; 1 where no model agrees). Zero entries never agree, so trimmed entries do not dilute the mean.
    """
    w = broadcast_weights(weights, deltas)
    weighted = deltas * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = (torch.sign(weighted) == elected).to(deltas.dtype)
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return mixed


@METHODS.register(
    "ties",
    paper="https://arxiv.org/abs/2306.01708",
    scope="tensor",
    min_models=1,
    needs_base=True,
    options={"weights": None, "density": 0.2, "scale": 1.0, "normalize": True},
)
def ties(
    tensors: list[torch.Tensor], base: torch.Tensor, *, weights=None, density=0.2, scale: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES: trim (keep the top ``density`` fraction of each task vector by magnitude), elect sign, disjoint merge.

    Parameters
    ----------
    tensors : list of T tensors shaped like ``base``, one per fine-tuned model.
    base : Tensor, the pre-trained weights.
    weights : float or list of T floats (default 1.0 each), applied to the trimmed task vectors.
    density : float or list of T floats in (0, 1], the fraction of entries kept per task vector
        (``k`` in the paper, 0.2 by default there).
    scale : lambda, multiplies the merged task vector.
    normalize : divide by the summed weights of the agreeing models (the paper's disjoint mean).

    Returns
    -------
    ``base + scale * merged``, shaped like ``base``.

    References
    ----------
    P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal, "TIES-Merging: Resolving interference when
    merging models", NeurIPS 2023.
    """
    w = model_weights(weights, len(tensors))
    dens = per_model_fraction(density, len(tensors), "density")
    deltas = stacked_deltas(tensors, base)
    for i, d in enumerate(dens):
        deltas[i] = trim_to_density(deltas[i], d)
    return base + scalar(scale, "scale") * sign_consensus_merge(deltas, w, normalize)
