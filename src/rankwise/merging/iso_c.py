"""Iso-C: isotropic merging, the summed task matrix with its singular values flattened to their mean."""

from __future__ import annotations

import torch

from ..formats.svd import truncated_svd
from . import METHODS
from ._options import scalar, task_vectors_, weighted_sum_
from .tsv import as_matrix


@METHODS.register(
    "iso_c",
    paper="https://arxiv.org/abs/2502.04959",
    scope="tensor",
    min_models=1,
    needs_base=True,
    options={"scale": 1.0},
)
def iso_c(tensors: list[torch.Tensor], base: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Iso-C: ``base + scale * mean(S) U V^T`` where ``U S V^T`` is the SVD of ``sum_i (W_i - W_base)``.

    Flattening the spectrum makes the merged update act equally along every direction the tasks
    span, so tasks with small singular values are not drowned by dominant ones. Matrices (and conv
    kernels seen as (out, in * prod(k)) matrices) only; tensors with fewer than 2 dimensions get the
    mean task vector, as in the paper's reference code.

    Parameters
    ----------
    tensors : list of T tensors shaped like ``base``, one per fine-tuned model.
    base : Tensor, the pre-trained weights.
    scale : alpha, multiplies the merged task matrix (tuned on validation data in the paper).

    References
    ----------
    D. Marczak, S. Magistri, S. Cygert, B. Twardowski, A. D. Bagdanov, J. van de Weijer,
    "No task left behind: Isotropic model merging with common and task-specific subspaces", ICML 2025.
    """
    alpha = scalar(scale, "scale")
    total = weighted_sum_(task_vectors_(tensors, base), [1.0] * len(tensors))
    if base.ndim < 2:
        return total.mul_(alpha / len(tensors)).add_(base)
    svd = truncated_svd(as_matrix(total))
    merged = svd.S.mean() * (svd.U @ svd.Vh)
    return base + alpha * merged.reshape(base.shape)
