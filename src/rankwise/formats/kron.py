"""Nearest sum of Kronecker products W ≈ sum_i A_i ⊗ B_i (Van Loan–Pitsianis rearrangement + truncated SVD)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._validate import is_int
from ._ops import (
    Tensor,
    check_int_rank,
    check_tensor,
    check_tolerance,
    compute_dtype,
    rank_for_tolerance,
    resolve_rank,
)
from .protocol import FORMATS


@dataclass(frozen=True)
class Kronecker:
    """``W ≈ sum_{i<r} kron(A[i], B[i])``.

    A : Tensor, shape (r, m1, n1); B : Tensor, shape (r, m2, n2); the dense matrix has shape
    (m1 m2, n1 n2). ``spectrum`` holds every singular value of the rearranged matrix, so
    ``||W - to_dense()||_F = ||spectrum[r:]||``.
    """

    name: ClassVar[str] = "kronecker"
    A: Tensor
    B: Tensor
    spectrum: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def ranks(self) -> tuple[int]:
        return (self.rank,)

    @property
    def shape(self) -> tuple[int, int]:
        _, m1, n1 = self.A.shape
        _, m2, n2 = self.B.shape
        return (int(m1 * m2), int(n1 * n2))

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()

    def to_dense(self) -> Tensor:
        """The matrix sum_i kron(A[i], B[i]), shape (m1 m2, n1 n2)."""
        return torch.einsum("rij,rkl->ikjl", self.A, self.B).reshape(self.shape)

    def truncate(self, rank: int) -> Kronecker:
        """The leading ``rank`` terms. For a :func:`kron_decompose` result the terms are orthogonal
        (the rearranged SVD's), so the error is exactly ``||spectrum[rank:current rank]||``."""
        check_int_rank(rank, "rank", self.rank)
        return Kronecker(self.A[:rank], self.B[:rank], self.spectrum)


def _check_factor_shape(value: object, name: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or any(not is_int(v) or v < 1 for v in value):
        raise ValueError(f"{name} must be a pair of positive ints (rows, cols), got {value!r}")
    return (value[0], value[1])


def kron_decompose(
    W: Tensor,
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    rank: int | float | None = None,
    *,
    eps: float | None = None,
) -> Kronecker:
    """Best approximation of ``W`` by a sum of ``r`` Kronecker products ``A_i ⊗ B_i`` in Frobenius norm.

    The rearrangement ``R(W)`` of shape (m1 n1, m2 n2), whose row (i1, j1) holds the block
    ``W[i1 m2:(i1+1) m2, j1 n2:(j1+1) n2]`` flattened, maps ``A ⊗ B`` to ``vec(A) vec(B)^T`` and
    preserves the Frobenius norm, so the truncated SVD of ``R(W)`` gives the optimum (Van Loan &
    Pitsianis 1993): ``A_i = sqrt(s_i) u_i``, ``B_i = sqrt(s_i) v_i`` reshaped.

    Parameters
    ----------
    W : Tensor, shape (m1 m2, n1 n2)
    a_shape : (m1, n1); b_shape : (m2, n2), with m1 m2 = W.shape[0] and n1 n2 = W.shape[1].
    rank : int in [1, min(m1 n1, m2 n2)], float in (0, 1] (fraction of W's parameters kept by the
        r (m1 n1 + m2 n2) factor entries), or None (full rank / the ``eps`` rule).
    eps : float in [0, 1), optional
        Smallest rank with ``||W - approx||_F <= eps * ||W||_F``; with ``rank`` too, the smaller rank.

    Returns
    -------
    Kronecker with ``||W - to_dense()||_F = sqrt(sum of the discarded s_i^2)``; factors float64 for
    float64 input, float32 otherwise, on ``W``'s device.

    References
    ----------
    C. F. Van Loan, N. Pitsianis, "Approximation with Kronecker products", in Linear Algebra for Large
    Scale and Real-Time Applications, Kluwer (1993), 293–314.
    """
    check_tensor(W, "W", ndim=2)
    m1, n1 = _check_factor_shape(a_shape, "a_shape")
    m2, n2 = _check_factor_shape(b_shape, "b_shape")
    if (m1 * m2, n1 * n2) != tuple(W.shape):
        raise ValueError(
            f"a_shape=({m1}, {n1}) and b_shape=({m2}, {n2}) give a ({m1 * m2}, {n1 * n2}) Kronecker product; "
            f"accepted: shapes with a_shape[0]*b_shape[0] = {W.shape[0]} and "
            f"a_shape[1]*b_shape[1] = {W.shape[1]} (W's shape)"
        )
    r = resolve_rank(rank, min(m1 * n1, m2 * n2), lambda k: k * (m1 * n1 + m2 * n2), W.numel())
    R = W.to(compute_dtype(W)).reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    if eps is not None:
        r = min(r, rank_for_tolerance(S, check_tolerance(eps)))
    root = torch.sqrt(S[:r])
    A = (U[:, :r] * root).T.reshape(r, m1, n1)
    B = (root[:, None] * Vh[:r]).reshape(r, m2, n2)
    return Kronecker(A, B, S)


FORMATS.register(Kronecker.name, paper="https://doi.org/10.1007/978-94-015-8196-7_17", decompose=kron_decompose)(
    Kronecker
)
