"""Weight averaging ("model soups"): the (normalized) weighted sum of the models' tensors."""

from __future__ import annotations

import torch

from . import METHODS
from ._options import model_weights, weighted_sum_


@METHODS.register(
    "linear",
    paper="https://arxiv.org/abs/2203.05482",
    scope="tensor",
    min_models=1,
    needs_base=False,
    options={"weights": None, "normalize": True},
)
def linear(
    tensors: list[torch.Tensor], base: torch.Tensor | None, *, weights=None, normalize: bool = True
) -> torch.Tensor:
    """``sum_i w_i W_i`` divided by ``sum_i w_i`` when ``normalize`` (a uniform soup with the default weights).

    Parameters
    ----------
    tensors : list of T tensors of one shape, one per model (the driver's scratch copies, overwritten).
    base : ignored (averaging needs no base model).
    weights : float or list of T floats, default 1.0 each.
    normalize : divide by the sum of the weights (which must then be non-zero).

    References
    ----------
    M. Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
    without increasing inference time", ICML 2022.
    """
    w = model_weights(weights, len(tensors))
    out = weighted_sum_(tensors, w)
    if normalize:
        if sum(w) == 0:
            raise ValueError(f"weights sum to 0 ({w!r}); normalize=True divides by their sum")
        out.div_(sum(w))
    return out
