"""Tensor-train (TT / MPS) format: TT-SVD of a dense tensor, TT-rounding, and TT-matrices for weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._validate import positive_ints
from ._ops import (
    RankSpec,
    Tensor,
    check_tensor,
    check_tolerance,
    compute_dtype,
    leading_svd,
    resolve_ranks,
    short_side_basis,
)
from .protocol import FORMATS


@dataclass(frozen=True)
class TT:
    """A tensor of shape (n_1, ..., n_d) as a train of 3-way cores.

    cores : tuple of d Tensors, core k of shape (r_{k-1}, n_k, r_k) with r_0 = r_d = 1, and
    ``X[i_1, ..., i_d] = G_1[:, i_1, :] @ ... @ G_d[:, i_d, :]``.
    """

    name: ClassVar[str] = "tt"
    cores: tuple[Tensor, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    def truncate(self, rank: RankSpec) -> TT:
        """TT-rounding to at most ``rank`` (see :func:`tt_round`); ranks never grow."""
        return tt_round(self, rank)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The d-1 bond ranks (r_1, ..., r_{d-1}); the boundary ranks r_0 = r_d = 1 are left out."""
        return tuple(int(c.shape[2]) for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def to_dense(self) -> Tensor:
        """The full tensor, shape ``self.shape``."""
        out = self.cores[0].reshape(-1, self.cores[0].shape[2])
        for core in self.cores[1:]:
            out = (out @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])
        return out.reshape(self.shape)


@dataclass(frozen=True)
class TTMatrix:
    """A matrix of shape (prod m_k, prod n_k) as a train of 4-way cores (a TT-matrix / MPO).

    cores : tuple of d Tensors, core k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1, and
    ``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :]`` with row and
    column multi-indices in row-major order.
    """

    name: ClassVar[str] = "tt_matrix"
    cores: tuple[Tensor, ...]

    def truncate(self, rank: RankSpec) -> TTMatrix:
        """TT-rounding of the paired (m_k n_k) train to at most ``rank`` (see :func:`tt_round`)."""
        flat = TT(tuple(c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in self.cores))
        rounded = tt_round(flat, rank)
        return TTMatrix(
            tuple(
                c.reshape(c.shape[0], m, n, c.shape[2]) for c, m, n in zip(rounded.cores, self.row_dims, self.col_dims)
            )
        )

    @property
    def row_dims(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]) for c in self.cores)

    @property
    def col_dims(self) -> tuple[int, ...]:
        return tuple(int(c.shape[2]) for c in self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        return (math.prod(self.row_dims), math.prod(self.col_dims))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(c.shape[3]) for c in self.cores[:-1])

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def to_dense(self) -> Tensor:
        """The matrix, shape (prod row_dims, prod col_dims)."""
        d = len(self.cores)
        flat = TT(tuple(c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in self.cores))
        paired = flat.to_dense().reshape([s for m, n in zip(self.row_dims, self.col_dims) for s in (m, n)])
        return paired.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(self.shape)


def truncated_left_basis(M: Tensor, max_rank: int, tol_sq: float | None) -> tuple[Tensor, Tensor]:
    """Orthonormal ``U`` (rows, k) and ``rest = diag(S) Vh`` (k, cols) with ``M ≈ U @ rest``.

    ``k`` is ``max_rank``, or, when ``tol_sq`` is given, the smallest rank whose discarded squared
    singular values sum to at most ``tol_sq`` (capped at ``max_rank``); ``||M - U rest||_F^2`` is that
    discarded tail (Eckart–Young). :func:`~rankwise.formats._ops.leading_svd` computes it.

    Parameters
    ----------
    M : Tensor, shape (rows, cols), float32 or float64
    max_rank : int in [1, min(rows, cols)]
    tol_sq : float or None, absolute bound on the squared Frobenius norm of the discarded part.
    """
    if M.shape[0] <= M.shape[1]:  # wide: the Gram basis of the rows, and U^T M, is all TT needs
        basis = short_side_basis(M, max_rank, tol_sq)
        if basis is not None:
            return basis[0], basis[0].T @ M
    U, S, Vh = leading_svd(M, max_rank, tol_sq)
    k = U.shape[1]
    return U, S[:k, None].to(M.dtype) * Vh


def bond_bounds(shape: Sequence[int]) -> tuple[int, ...]:
    """Largest possible bond ranks of a tensor of ``shape``: min(n_1...n_k, n_{k+1}...n_d)."""
    return tuple(min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1))


def tt_num_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameter count sum_k r_{k-1} n_k r_k of a TT with bond ``ranks``."""
    full = (1, *ranks, 1)
    return sum(full[k] * n * full[k + 1] for k, n in enumerate(shape))


def tt_ranks(shape: Sequence[int], rank: RankSpec | None) -> tuple[int, ...]:
    """Resolve a rank spec into d-1 bond ranks for a tensor of ``shape``.

    ``None``: the largest ranks the shape allows (exact). ``int R``: the maximal bond rank, applied as
    ``r_k = min(R, n_1...n_k, n_{k+1}...n_d)`` (bonds that cannot reach R keep their largest rank);
    R itself must be in [1, largest bond bound]. ``tuple``: one rank per bond, each within its bound and
    with ``r_k <= r_{k-1} n_k`` and ``r_k <= n_{k+1} r_{k+1}``, no clamping. ``float`` in (0, 1]: the
    largest ``R`` (clamped as for an int) whose TT stores at most that fraction of ``prod(shape)``
    (R = 1 when even that exceeds the budget).
    """
    bounds = bond_bounds(shape)
    entries = f"d-1 = {len(bounds)} bond ranks for shape {tuple(shape)}"
    ranks = resolve_ranks(rank, bounds, lambda r: tt_num_params(shape, r), math.prod(shape), entries=entries)
    if isinstance(rank, (list, tuple)):
        full = (1, *ranks, 1)
        for k in range(1, len(full) - 1):
            lo, hi = full[k - 1] * shape[k - 1], shape[k] * full[k + 1]
            if full[k] > min(lo, hi):
                raise ValueError(
                    f"rank[{k - 1}]={full[k]} is not a valid TT rank next to its neighbours; accepted: "
                    f"rank[{k - 1}] <= min(r_prev * n_{k}, n_{k + 1} * r_next) = min({lo}, {hi}) "
                    f"in rank={tuple(rank)!r}"
                )
    return ranks


def tt_svd(x: Tensor, rank: RankSpec | None = None, *, eps: float | None = None) -> TT:
    """TT-SVD: sequential truncated SVDs of the unfoldings (Oseledets 2011, Algorithm 1).

    Parameters
    ----------
    x : Tensor, shape (n_1, ..., n_d), d >= 2, floating, finite
    rank : int, tuple of d-1 ints, float in (0, 1] or None
        Maximal bond ranks, see :func:`tt_ranks` (an int is clamped per bond to what the shape allows).
    eps : float in [0, 1), optional
        Target relative error, Oseledets' convention: every one of the d-1 truncations discards at most
        ``eps / sqrt(d-1) * ||x||_F``, hence ``||x - tt.to_dense()||_F <= eps * ||x||_F``. (Stated with
        the per-step relative threshold ``delta = eps / sqrt(d-1)``: error <= sqrt(d-1) * delta * ||x||.)
        With ``rank`` also given, each bond takes the smaller of the two ranks.

    Returns
    -------
    TT whose cores 1..d-1 are left-orthogonal (``G_k`` reshaped to (r_{k-1} n_k, r_k) has orthonormal
    columns); the last core carries the norm. Cores are float64 for float64 input, float32 otherwise,
    on ``x``'s device. Without ``eps`` the error is at most sqrt(sum over bonds of the squared
    discarded singular values of the k-th unfolding of ``x``) (Oseledets 2011, Theorem 2.2).

    References
    ----------
    I. V. Oseledets, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5), 2295–2317 (2011).
    """
    check_tensor(x, "x", min_ndim=2)
    shape = tuple(x.shape)
    d = len(shape)
    caps = tt_ranks(shape, rank)
    C = x.to(compute_dtype(x))
    tol_sq = None
    if eps is not None:
        tol_sq = (check_tolerance(eps) ** 2) * float(torch.sum(C.to(torch.float64) ** 2)) / (d - 1)
    cores = []
    r_prev = 1
    for k in range(d - 1):
        M = C.reshape(r_prev * shape[k], -1)
        U, C = truncated_left_basis(M, caps[k], tol_sq)
        cores.append(U.reshape(r_prev, shape[k], U.shape[1]))
        r_prev = U.shape[1]
    cores.append(C.reshape(r_prev, shape[-1], 1))
    return TT(tuple(cores))


def tt_round(tt: TT, rank: RankSpec | None = None, *, eps: float | None = None) -> TT:
    """TT-rounding: recompress a TT to smaller ranks without forming the dense tensor (Oseledets 2011, Alg. 2).

    Right-to-left QR makes cores 2..d right-orthogonal, then left-to-right truncated SVDs of the
    (r_{k-1} n_k, r_k) core matrices cut the ranks. ``rank`` and ``eps`` as in :func:`tt_svd`, relative
    to ``||tt||``: the error is at most ``eps * ||tt.to_dense()||_F``. Ranks never grow: a bond keeps at
    most its current rank, so a larger requested rank leaves that bond as it is.

    Parameters
    ----------
    tt : TT with at least 2 cores
    rank, eps : as in :func:`tt_svd`.

    Returns
    -------
    TT with left-orthogonal cores 1..d-1.

    References
    ----------
    I. V. Oseledets, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5), 2295–2317 (2011).
    """
    if not isinstance(tt, TT):
        raise ValueError(f"tt must be a rankwise.formats.tt.TT, got {type(tt).__name__}")
    if len(tt.cores) < 2:
        raise ValueError(f"tt must have at least 2 cores, got {len(tt.cores)}")
    for k, c in enumerate(tt.cores):
        check_tensor(c, f"tt.cores[{k}]", ndim=3)
    edges = [1, *(c.shape[0] for c in tt.cores[1:]), 1]
    for k, c in enumerate(tt.cores):
        if (c.shape[0], c.shape[2]) != (edges[k], edges[k + 1]):
            raise ValueError(
                f"tt.cores[{k}] has shape {tuple(c.shape)}; accepted: ({edges[k]}, n, {edges[k + 1]}) to chain with "
                f"its neighbours (boundary ranks are 1)"
            )
    shape = tt.shape
    d = len(shape)
    caps = tt_ranks(shape, rank)
    eps = None if eps is None else check_tolerance(eps)
    cores = [c.to(compute_dtype(c)) for c in tt.cores]
    for k in range(d - 1, 0, -1):
        r0, n, r1 = cores[k].shape
        Q, R = torch.linalg.qr(cores[k].reshape(r0, n * r1).T)
        cores[k] = Q.T.reshape(-1, n, r1)
        prev = cores[k - 1]
        cores[k - 1] = (prev.reshape(-1, r0) @ R.T).reshape(prev.shape[0], prev.shape[1], -1)
    tol_sq = None
    if eps is not None:
        tol_sq = (eps**2) * float(torch.sum(cores[0].to(torch.float64) ** 2)) / (d - 1)
    for k in range(d - 1):
        r0, n, r1 = cores[k].shape
        M = cores[k].reshape(r0 * n, r1)
        U, rest = truncated_left_basis(M, min(caps[k], *M.shape), tol_sq)
        cores[k] = U.reshape(r0, n, U.shape[1])
        nxt = cores[k + 1]
        cores[k + 1] = (rest @ nxt.reshape(r1, -1)).reshape(U.shape[1], nxt.shape[1], nxt.shape[2])
    return TT(tuple(cores))


def _check_dims(dims: object, name: str) -> tuple[int, ...]:
    if not isinstance(dims, (list, tuple)) or len(dims) < 2:
        raise ValueError(f"{name} must be a tuple of at least 2 positive ints, got {dims!r}")
    return positive_ints(tuple(dims), name)


def tt_matrix(
    W: Tensor,
    row_dims: Sequence[int],
    col_dims: Sequence[int],
    rank: RankSpec | None = None,
    *,
    eps: float | None = None,
) -> TTMatrix:
    """TT-matrix (matrix product operator) of a weight matrix by TT-SVD of its paired reshaping.

    ``W`` is reshaped to (m_1, ..., m_d, n_1, ..., n_d), the modes interleaved to (m_1, n_1, ..., m_d,
    n_d) and merged pairwise into a d-way tensor of shape (m_1 n_1, ..., m_d n_d), which is decomposed by
    :func:`tt_svd`. The permutation is an isometry, so the bounds of :func:`tt_svd` hold for ``W``.

    Parameters
    ----------
    W : Tensor, shape (prod(row_dims), prod(col_dims))
    row_dims, col_dims : tuples of d >= 2 positive ints each
    rank, eps : as in :func:`tt_svd`, for the bonds of the (m_1 n_1, ..., m_d n_d) tensor.

    Returns
    -------
    TTMatrix with cores of shape (r_{k-1}, m_k, n_k, r_k).

    References
    ----------
    I. V. Oseledets, "Approximation of 2^d x 2^d matrices using tensor decomposition", SIAM J. Matrix
    Anal. Appl. 31(4), 2130–2145 (2010); A. Novikov et al., "Tensorizing neural networks", NeurIPS 2015.
    """
    check_tensor(W, "W", ndim=2)
    rows, cols = _check_dims(row_dims, "row_dims"), _check_dims(col_dims, "col_dims")
    if len(rows) != len(cols):
        raise ValueError(f"row_dims and col_dims must have the same length, got {rows!r} and {cols!r}")
    if math.prod(rows) != W.shape[0] or math.prod(cols) != W.shape[1]:
        raise ValueError(
            f"row_dims={rows!r} and col_dims={cols!r} multiply to ({math.prod(rows)}, {math.prod(cols)}); "
            f"accepted: factorizations of W's shape {tuple(W.shape)}"
        )
    d = len(rows)
    paired = W.reshape(*rows, *cols).permute([i for k in range(d) for i in (k, d + k)])
    tt = tt_svd(paired.reshape([m * n for m, n in zip(rows, cols)]), rank, eps=eps)
    cores = tuple(c.reshape(c.shape[0], m, n, c.shape[2]) for c, m, n in zip(tt.cores, rows, cols))
    return TTMatrix(cores)


FORMATS.register(TT.name, paper="https://doi.org/10.1137/090752286", decompose=tt_svd)(TT)
FORMATS.register(TTMatrix.name, paper="https://arxiv.org/abs/1509.06569", decompose=tt_matrix)(TTMatrix)
