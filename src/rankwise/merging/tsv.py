"""Task-singular-vector merging (TSV-M).

Per-task low-rank task matrices, decorrelated by orthogonal Procrustes, summed.
"""

from __future__ import annotations

import torch

from ..formats._ops import check_int_rank
from ..formats.svd import truncated_svd
from . import METHODS
from ._options import scalar, task_vectors_, weighted_sum_


def per_task_rank(rank: int | float | None, full: int, tasks: int) -> int:
    """Rank kept per task: None gives ``full // tasks`` (at least 1), a float a fraction of ``full``, an int itself."""
    if rank is None:
        return max(1, full // tasks)
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ValueError(f"rank as a float must be a fraction of each layer's full rank in (0, 1], got {rank!r}")
        return max(1, int(rank * full))
    return check_int_rank(rank, "rank", full)


def nearest_orthonormal(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes: the matrix with orthonormal columns nearest ``a`` in Frobenius norm, ``P Q^T``
    from the SVD ``a = P S Q^T``. a : Tensor, shape (m, k)."""
    svd = truncated_svd(a)
    return svd.U @ svd.Vh


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A weight as a matrix: 2-D as is, conv kernels (out, in, *k) as (out, in * prod(k))."""
    return t.reshape(t.shape[0], -1)


@METHODS.register(
    "tsv",
    paper="https://arxiv.org/abs/2412.00081",
    scope="tensor",
    min_models=1,
    needs_base=True,
    options={"scale": 1.0, "rank": None},
)
def tsv(tensors: list[torch.Tensor], base: torch.Tensor, *, scale: float = 1.0, rank=None) -> torch.Tensor:
    """TSV-M: ``base + scale * U_perp diag(S) V_perp^T`` from the tasks' truncated SVDs.

    For every task i, the task matrix ``W_i - W_base`` (shape (m, n)) is truncated to rank ``k``
    (``min(m, n) // T`` by default, so the T tasks together fill the full rank): ``U_i S_i V_i^T``.
    The blocks are concatenated, ``U = [U_1 .. U_T]`` (m, T k), ``V = [V_1 .. V_T]`` (n, T k),
    ``S = [S_1 .. S_T]``; interference between tasks is removed by replacing ``U`` and ``V`` with
    their nearest matrices with orthonormal columns (orthogonal Procrustes), and the result is summed
    as ``U_perp diag(S) V_perp^T``. Tensors with fewer than 2 dimensions (biases, norms) get the mean
    task vector, as in the paper's reference code.

    Parameters
    ----------
    tensors : list of T tensors shaped like ``base``, one per fine-tuned model.
    base : Tensor, the pre-trained weights.
    scale : alpha, multiplies the merged task matrix (1.0 in the paper).
    rank : None, int in [1, min(m, n)], or float in (0, 1] (fraction of each layer's full rank) kept per task.

    References
    ----------
    A. A. Gargiulo, D. Crisostomi, M. S. Bucarelli, S. Scardapane, F. Silvestri, E. Rodolà,
    "Task Singular Vectors: Reducing task interference in model merging", CVPR 2025.
    """
    alpha = scalar(scale, "scale")
    deltas = task_vectors_(tensors, base)
    if base.ndim < 2:
        return weighted_sum_(deltas, [1.0] * len(deltas)).mul_(alpha / len(deltas)).add_(base)
    mats = [as_matrix(d) for d in deltas]
    k = per_task_rank(rank, min(mats[0].shape), len(mats))
    parts = [truncated_svd(m, k) for m in mats]
    U = torch.cat([p.U for p in parts], dim=1)
    S = torch.cat([p.S for p in parts])
    V = torch.cat([p.Vh for p in parts], dim=0).T
    merged = (nearest_orthonormal(U) * S) @ nearest_orthonormal(V).T
    return base + alpha * merged.reshape(base.shape)
