"""DARE: drop each task-vector entry at random and rescale the survivors; merged linearly or with TIES sign election."""

from __future__ import annotations

import torch

from . import METHODS
from ._options import choice, model_weights, per_model_fraction, scalar, task_vectors_, weighted_sum_
from .ties import sign_consensus_merge


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str) -> torch.Tensor:
    """Keep each entry with probability ``density`` (a seeded Bernoulli mask) and rescale what is kept (in place).

    rescale : ``"density"`` divides survivors by ``density`` (the paper: the expectation is unchanged);
        ``"l1"`` multiplies them so the L1 norm equals the undropped one (mergekit's ``rescale: true``);
        ``"none"`` only drops.
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    before = delta.abs().sum() if rescale == "l1" else None
    dropped = delta.mul_(keep.to(delta.device))  # in place: delta is the driver's scratch copy
    if rescale == "density":
        return dropped.div_(density)
    if rescale == "l1":
        after = dropped.abs().sum()
        return dropped if before < 1e-7 or after < 1e-7 else dropped.mul_(before / after)
    return dropped


@METHODS.register(
    "dare",
    paper="https://arxiv.org/abs/2311.03099",
    scope="tensor",
    min_models=1,
    needs_base=True,
    options={
        "weights": None,
        "density": 0.5,
        "scale": 1.0,
        "seed": 0,
        "sign_consensus": False,
        "rescale": "density",
        "normalize": False,
    },
)
def dare(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weights=None,
    density=0.5,
    scale: float = 1.0,
    seed: int = 0,
    sign_consensus: bool = False,
    rescale: str = "density",
    normalize: bool = False,
) -> torch.Tensor:
    """DARE (drop and rescale) on every task vector, then task arithmetic or, with ``sign_consensus``, TIES.

    Parameters
    ----------
    tensors : list of T tensors shaped like ``base``, one per fine-tuned model.
    base : Tensor, the pre-trained weights.
    weights : float or list of T floats (default 1.0 each).
    density : float or list of T floats in (0, 1]: the keep probability ``1 - p`` of the paper.
    scale : lambda, multiplies the merged task vector.
    seed : seeds the drop masks (the driver derives one per tensor name, so results are reproducible).
    sign_consensus : elect signs and take the disjoint sum as TIES does (mergekit's ``dare_ties``);
        otherwise a weighted sum (``dare_linear``).
    rescale : ``"density"`` (paper), ``"l1"`` (mergekit) or ``"none"``; see :func:`drop_and_rescale`.
    normalize : divide by the (agreeing) summed weights.

    References
    ----------
    L. Yu, B. Yu, H. Yu, F. Huang, Y. Li, "Language models are Super Mario: absorbing abilities from
    homologous models as a free lunch", ICML 2024.
    """
    w = model_weights(weights, len(tensors))
    dens = per_model_fraction(density, len(tensors), "density")
    choice(rescale, "rescale", ("density", "l1", "none"))
    gen = torch.Generator().manual_seed(int(seed))
    deltas = [drop_and_rescale(d, p, gen, rescale) for d, p in zip(task_vectors_(tensors, base), dens)]
    if sign_consensus:
        mixed = sign_consensus_merge([d.mul_(wi) for d, wi in zip(deltas, w)], w, normalize)
    else:
        mixed = weighted_sum_(deltas, w)
        if normalize:
            mixed /= sum(w) if abs(sum(w)) >= 1e-8 else 1.0
    return mixed.mul_(scalar(scale, "scale")).add_(base)
