"""Low-rank matrix factorizations: exact truncated SVD, randomized SVD, and whitened (activation-aware) SVD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._validate import int_at_least
from ._ops import (
    Tensor,
    check_int_rank,
    check_tensor,
    check_tolerance,
    compute_dtype,
    leading_svd,
    rank_for_tolerance,
    resolve_rank,
)
from .protocol import FORMATS


@dataclass(frozen=True)
class SVD:
    """``W ≈ U diag(S) Vh``.

    U : Tensor, shape (m, r); S : Tensor, shape (r,); Vh : Tensor, shape (r, n).
    ``spectrum`` holds the singular values known of the factorized matrix (the whitened one for
    :func:`whitened_svd`): all ``min(m, n)`` of them when a full SVD was taken, so that ``tail_error(k)``
    is known for any rank without another SVD; only the leading ones otherwise, then with ``energy``,
    the squared Frobenius norm of the factorized matrix, when the leading values are exact.
    """

    name: ClassVar[str] = "svd"
    U: Tensor
    S: Tensor
    Vh: Tensor
    spectrum: Tensor | None = None
    energy: float | None = None

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def ranks(self) -> tuple[int]:
        return (self.rank,)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.Vh.shape[1]))

    @property
    def num_params(self) -> int:
        m, n = self.shape
        return self.rank * (m + n + 1)

    def to_dense(self) -> Tensor:
        return (self.U * self.S) @ self.Vh

    def truncate(self, rank: int) -> SVD:
        """The leading ``rank`` triplets (Eckart–Young optimal when this is an exact SVD)."""
        check_int_rank(rank, "rank", self.rank)
        return SVD(self.U[:, :rank], self.S[:rank], self.Vh[:rank], self.spectrum, self.energy)

    def tail_error(self, rank: int) -> float:
        """Frobenius norm of the discarded part at ``rank`` (of the whitened matrix for whitened SVDs).

        From the discarded singular values when all are known; from ``energy`` minus the kept ones when
        only the leading ``len(spectrum)`` are (``rank`` up to that length; the difference loses
        relative accuracy once the tail is below ~1e-8 of the norm).
        """
        known = 0 if self.spectrum is None else int(self.spectrum.shape[0])
        if known == min(self.shape):
            return float(torch.sqrt((self.spectrum[rank:].double() ** 2).sum()))
        if self.energy is not None and known and rank <= known:
            kept_sq = (self.spectrum[:rank].double() ** 2).sum()
            return float(torch.sqrt((self.energy - kept_sq).clamp_min(0.0)))
        raise ValueError(
            f"tail_error({rank}) needs the singular values beyond the {known} this SVD holds "
            "(use truncated_svd with eps= or without rank, or whitened_svd)"
        )


def svd_rank(shape: tuple[int, int], rank: int | float | None) -> int:
    """Resolve an int rank, a float fraction of ``m*n`` parameters, or None (full rank) into an int rank
    for ``shape`` (:func:`~rankwise.formats._ops.resolve_rank`).

    The fraction counts what :attr:`SVD.num_params` counts, ``r (m + n + 1)`` (U, S and Vh). A layer
    folds S into a factor and stores ``r (m + n)``: the layer allocators count that instead."""
    m, n = shape
    return resolve_rank(rank, min(m, n), lambda r: r * (m + n + 1), m * n)


def _check_matrix(W: Tensor) -> None:
    check_tensor(W, "W", ndim=2)


def _finish(U: Tensor, S: Tensor, Vh: Tensor, spectrum: Tensor, like: Tensor, energy: float | None = None) -> SVD:
    dt = compute_dtype(like)
    # factors of a half-precision matrix are returned in float32 (the formats' one output-dtype rule):
    # casting U, S, Vh to float16 loses more than the truncation itself; layers cast them when they build.
    return SVD(U.to(dt), S.to(dt), Vh.to(dt), spectrum.to(dt), energy)


def truncated_svd(W: Tensor, rank: int | float | None = None, *, eps: float | None = None) -> SVD:
    """Best rank-``r`` approximation of ``W`` (Eckart & Young 1936).

    Parameters
    ----------
    W : Tensor, shape (m, n)
    rank : int in [1, min(m, n)], or float in (0, 1] (fraction of the ``m*n`` dense parameters kept
        by ``U S Vh`` storage of ``r*(m+n)``), or None for full rank / the ``eps`` rule.
    eps : float, optional
        Relative tolerance: the smallest rank with ``||W - W_r||_F <= eps * ||W||_F``. With ``rank``
        also given, the smaller of the two ranks is used.

    Returns
    -------
    SVD with ``||W - to_dense()||_F == sqrt(sum of discarded S**2)``. ``spectrum`` holds every
    singular value, except for a small ``rank`` without ``eps`` (below), where it holds the leading
    ``rank`` and ``energy`` = ``||W||_F^2`` (``tail_error`` works up to ``rank`` either way).

    Notes
    -----
    For an explicit rank up to a third of the shorter side (``3 * rank <= min(m, n)``, no ``eps``) the
    leading singular subspace comes from the ``rank`` leading eigenvectors of the float64 Gram matrix of
    the shorter side (:func:`~rankwise.formats._ops.gram_eigh`) followed by a Rayleigh–Ritz step, an
    exact SVD of ``W`` projected on that subspace, which makes both factors orthonormal to round-off:
    on one CPU thread 3.6x faster than a full SVD at 4096 x 2048 rank 256 and 3.0x at rank 682, 1.1x
    for a square 576 x 576 at rank 192 (at half the shorter side the two are even for square
    matrices). Below the Gram matrix's resolution
    (:data:`~rankwise.formats._ops.GRAM_FLOOR`) :func:`~rankwise.formats._ops.leading_svd` takes a full SVD.
    """
    _check_matrix(W)
    r = svd_rank(tuple(W.shape), rank)
    A = W.to(compute_dtype(W))
    if eps is None and rank is not None and 3 * r <= min(A.shape):  # the Gram route's speed range
        U, S, Vh = leading_svd(A, r)
        partial = len(S) < min(A.shape)  # the Gram route; the SVD fallback gives the whole spectrum
        return _finish(
            U, S[:r].to(A.dtype), Vh, S.to(A.dtype), W, energy=float(A.double().norm()) ** 2 if partial else None
        )
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if eps is not None:
        r = min(r, rank_for_tolerance(S, check_tolerance(eps)))
    return _finish(U[:, :r], S[:r], Vh[:r], S, W)


def randomized_svd(W: Tensor, rank: int | float, *, oversample: int = 10, n_iter: int = 4, seed: int = 0) -> SVD:
    """Randomized rank-``r`` SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR re-orthonormalisation).

    A Gaussian sketch of ``r + oversample`` columns, ``n_iter`` power iterations (each followed by a QR
    for stability), then an exact SVD of the small projected matrix. ``seed`` makes the factors
    bit-identical across runs on the same device. ``spectrum`` holds the ``r + oversample`` estimated
    singular values (an approximation of the leading part of the true spectrum).

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness", SIAM Review 53 (2011).
    """
    _check_matrix(W)
    r = svd_rank(tuple(W.shape), rank)
    int_at_least(oversample, "oversample", 0)
    int_at_least(n_iter, "n_iter", 0)
    A = W.to(compute_dtype(W))
    m, n = A.shape
    transpose = m < n  # sketch the longer side so the QR factors stay tall and thin
    if transpose:
        A = A.T
        m, n = n, m
    k = min(r + oversample, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=A.dtype).to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(A.T @ Q)
        Q, _ = torch.linalg.qr(A @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    U = Q @ Ub
    if transpose:
        U, Vh = Vh.T, U.T
    return _finish(U[:, :r], S[:r], Vh[:r], S, W)


def whitened_svd(
    W: Tensor,
    rank: int | float | None = None,
    *,
    scale: Tensor | None = None,
    whitening: Tensor | None = None,
    rows: Tensor | None = None,
) -> SVD:
    """Truncated SVD of ``W`` measured in a weighted norm, returned as factors of the *unweighted* ``W``.

    With an input-side factor ``M`` (``diag(scale)`` or ``whitening``) and output-side weights
    ``D = diag(rows)``, the SVD is taken of ``D W M`` and mapped back, ``U <- D^{-1} U``,
    ``Vh <- Vh M^{-1}``, so ``U diag(S) Vh ≈ W`` minimises ``||D (W - W_r) M||_F``. For ``M = L`` with
    ``L L^T = X^T X`` (see :func:`whitening_factor`) this is the output error on the calibration
    inputs ``X`` (SVD-LLM); for ``M = diag(mean|x|^alpha)`` it is ASVD; ``rows = sqrt(E[(dL/dy)^2])``
    adds the output side of a Kronecker-factored Fisher metric, so the truncation minimises an
    estimate of the loss increase (FWSVD with both sides whitened). With none of them it is the plain
    SVD of ``W``.

    The SVD is computed in float64 from ``eigh`` of the smaller Gram matrix (several times faster
    than an SVD of ``D W M``; singular values exact to round-off relative to ``S[0]``). ``Vh`` (or
    ``U``) is recovered as ``U^T A / S`` with ``S`` floored only where negligible, so the full-rank
    factors reproduce ``W`` whatever the conditioning.

    Parameters
    ----------
    W : Tensor, shape (m, n)
    rank : int, float fraction or None (full rank), as in :func:`truncated_svd`.
    scale : Tensor, shape (n,), strictly positive, optional
    whitening : Tensor, shape (n, n), invertible, optional (lower-triangular is solved as such)
    rows : Tensor, shape (m,), strictly positive, optional

    Returns
    -------
    SVD whose ``S`` and ``spectrum`` are those of ``D W M``: ``tail_error(r)`` is the weighted error.

    References
    ----------
    Z. Yuan et al., "ASVD: Activation-aware SVD for compressing LLMs", arXiv:2312.05821.
    X. Wang et al., "SVD-LLM: Truncation-aware SVD for LLM compression", ICLR 2025, arXiv:2403.07378.
    Y.-C. Hsu et al., "Language model compression with weighted low-rank factorization", ICLR 2022,
    arXiv:2207.00112.
    """
    _check_matrix(W)
    if scale is not None and whitening is not None:
        raise ValueError(
            "whitened_svd takes at most one input-side factor: "
            "scale= (shape (n,)) or whitening= (shape (n, n)), not both"
        )
    m, n = W.shape
    r = svd_rank(tuple(W.shape), rank)
    # float64: the whitening factor can be ill-conditioned and its inverse multiplies the error back.
    A = W.detach().to(torch.float64)
    if rows is not None:
        _check_weights(rows, "rows", m, "rows")
        d = rows.to(A)
        A = A * d[:, None]
    if scale is not None:
        _check_weights(scale, "scale", n, "columns")
        s = scale.to(A)
        A = A * s
    elif whitening is not None:
        check_tensor(whitening, "whitening", ndim=2)
        if tuple(whitening.shape) != (n, n):
            raise ValueError(
                f"whitening must have shape ({n}, {n}) to match W's {n} columns, got {tuple(whitening.shape)}"
            )
        M = whitening.to(A)
        A = A @ M
    U, S, Vh = leading_svd(A)  # every triplet: the spectrum is the allocator's input
    U, Vh = U[:, :r], Vh[:r]
    if rows is not None:
        U = U / d[:, None]
    if scale is not None:
        Vh = Vh / s
    elif whitening is not None:
        if bool(torch.equal(M, torch.tril(M))):
            Vh = torch.linalg.solve_triangular(M, Vh, upper=False, left=False)
        else:
            Vh = torch.linalg.solve(M, Vh, left=False)
    return _finish(U, S[:r], Vh, S, W)


def _check_weights(w: Tensor, name: str, size: int, side: str) -> None:
    check_tensor(w, name, ndim=1)
    if w.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) to match W's {size} {side}, got {tuple(w.shape)}")
    if not bool((w > 0).all()):
        raise ValueError(f"{name} must be strictly positive (it is inverted); got entries <= 0")


def whitening_factor(gram: Tensor, *, damping: float = 1e-6) -> Tensor:
    """An input-side factor ``M`` with ``M M^T = gram + damping * mean(diag(gram)) * I``, in float64.

    ``gram = X^T X`` of the calibration inputs. The Cholesky factor (lower-triangular) is returned when
    the damped Gram matrix is positive definite. Gram matrices of LLM activations often are not
    (dead channels, fewer tokens than features, float round-off); then the symmetric eigendecomposition
    is used instead, with eigenvalues floored at ``damping * max eigenvalue``: ``M = Q diag(sqrt(λ))``.
    Either way ``M`` is invertible and finite, so :func:`whitened_svd` never produces NaN.

    Parameters
    ----------
    gram : Tensor, shape (n, n), symmetric positive semi-definite
    damping : float in [0, 1), relative ridge added before factorizing.
    """
    check_tensor(gram, "gram", ndim=2)
    if gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    check_tolerance(damping, "damping")
    G = gram.to(torch.float64)
    G = (G + G.T) / 2
    n = G.shape[0]
    mean_diag = float(torch.diagonal(G).mean())
    if mean_diag <= 0:
        return torch.eye(n, dtype=torch.float64, device=G.device)
    eye = torch.eye(n, dtype=torch.float64, device=G.device)
    L, info = torch.linalg.cholesky_ex(G + damping * mean_diag * eye)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return L
    evals, evecs = torch.linalg.eigh(G)
    floor = max(float(evals.max()), mean_diag) * max(damping, 1e-12)
    return evecs * torch.sqrt(evals.clamp_min(floor))


FORMATS.register(SVD.name, paper="https://doi.org/10.1007/BF02288367", decompose=truncated_svd)(SVD)
