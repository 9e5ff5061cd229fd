"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, average the agreeing ones."""

from __future__ import annotations

import torch

from . import METHODS
from ._options import model_weights, per_model_fraction, scalar, task_vectors_


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` entries of largest magnitude, zero the rest (in place).

    delta : contiguous Tensor, any shape. ``density >= 1`` returns ``delta`` unchanged. The threshold
    comes from a selection (``kthvalue``), not a sort; among entries equal to it, the first ones in
    memory order are kept, so exactly ``k`` survive.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    k = max(1, int(density * n))
    flat = delta.view(-1)
    mag = flat.abs()
    threshold = mag.kthvalue(n - k + 1).values
    keep = mag > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(mag == threshold).nonzero().squeeze(1)[:missing]] = True
    return delta.masked_fill_(~keep.view(delta.shape), 0)


def sign_consensus_merge(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Elect a sign per entry and combine the weighted task vectors that agree with it.

    weighted : list of T tensors ``w_i delta_i`` (already trimmed / dropped and weighted; overwritten).
    The elected sign is that of ``sum_i w_i delta_i`` (positive on ties); entry-wise the result is
    ``sum_{i agrees} w_i delta_i``, divided by ``sum_{i agrees} w_i`` when ``normalize`` (the disjoint
    mean; 1 where no model agrees). Zero entries never agree, so trimmed entries do not dilute the mean.
    """
    positive = weighted[0].clone()
    for d in weighted[1:]:
        positive.add_(d)
    positive = positive >= 0
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0]) if normalize else None
    for d, w in zip(weighted, weights):
        agree = torch.where(positive, d > 0, d < 0)
        mixed.add_(d.mul_(agree))  # d is scratch: the driver's copy
        if normalize:
            divisor.add_(agree, alpha=w)
    if normalize:
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
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
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weights=None,
    density=0.2,
    scale: float = 1.0,
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
    weighted = [trim_to_density(d, p).mul_(wi) for d, p, wi in zip(task_vectors_(tensors, base), dens, w)]
    return sign_consensus_merge(weighted, w, normalize).mul_(scalar(scale, "scale")).add_(base)
