"""Tensor algebra and argument checks shared by every format (unfold, fold, mode_dot, ranks)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .._validate import is_int, is_number

Tensor = torch.Tensor
RankSpec = int | Sequence[int] | float


def check_tensor(x: Tensor, name: str = "tensor", ndim: int | None = None, min_ndim: int | None = None) -> None:
    """Raise ``ValueError`` unless ``x`` is a finite floating tensor of the expected order."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {x.ndim} (shape {tuple(x.shape)})")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got {x.ndim} (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf entries; only finite values are accepted")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (float16, bfloat16, float32) is computed in float32.

    Also the dtype every format returns its factors in (a half-precision input gets float32 factors)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_compute(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return x.to(dtype or compute_dtype(x))


def unfold(x: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding, shape (x.shape[mode], prod of the other sizes) (Kolda & Bader 2009)."""
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


def fold(m: Tensor, mode: int, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`unfold` for a tensor of ``shape``."""
    moved = [shape[mode]] + [s for i, s in enumerate(shape) if i != mode]
    return torch.movedim(m.reshape(moved), 0, mode)


def mode_dot(x: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """n-mode product ``x ×_mode matrix`` with ``matrix`` of shape (J, x.shape[mode])."""
    out = matmul(matrix, unfold(x, mode))  # (J, the other modes in order)
    return torch.movedim(out.reshape(-1, *(s for i, s in enumerate(x.shape) if i != mode)), 0, mode)


def multi_mode_dot(x: Tensor, matrices: Sequence[Tensor], modes: Sequence[int], transpose: bool = False) -> Tensor:
    """Apply :func:`mode_dot` for every (matrix, mode); ``transpose`` uses ``matrix.T``."""
    for m, mode in zip(matrices, modes):
        x = mode_dot(x, m.T if transpose else m, mode)
    return x


def orthonormalize(a: Tensor) -> Tensor:
    """Orthonormal basis of the column space of ``a`` (reduced QR), signs fixed so diag(R) >= 0."""
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


@functools.cache
def _blas_pools():
    """Thread pools of the BLAS libraries numpy and scipy.linalg load (scipy's is loaded first)."""
    import scipy.linalg  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _numpy_blas():
    """Context running numpy/scipy BLAS on one thread (the numpy routes run only when torch does, see
    :func:`_numpy_route`).

    Their OpenBLAS pools default to every core; where other work holds the cores they spin-wait and
    crawl (a 2048 x 2048 ``dsyevr`` measured 1.1 s on one thread, 20.5 s on two busy cores).
    """
    return _blas_pools().limit(limits=1)


def _numpy_route(x: Tensor) -> bool:
    """Whether the numpy/scipy BLAS and LAPACK routes below run for ``x``: on CPU with one torch thread.

    With several torch threads, torch's OpenMP pool spin-waits between its parallel regions while
    OpenBLAS's own pool runs, and the two fight for the cores: on 2 threads a float32 syrk of 2048 x 576
    took 10 ms alone but 34 ms interleaved with torch GEMMs (torch's general product: 15 ms), and SmolLM2
    calibration took 33 s instead of 23 s. So on more than one thread everything stays in torch.
    """
    return x.device.type == "cpu" and torch.get_num_threads() == 1


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of two matrices; on CPU with one torch thread through numpy's BLAS (:func:`_numpy_route`).

    torch's CPU wheels link MKL, which on our benchmark machine (AMD EPYC) ran the products of the
    decompositions 1.06-1.34x slower than numpy's OpenBLAS on one thread (``benchmarks/decompositions.py
    --gemm``, BENCHMARKS.md). Gradients do not flow through the numpy path.
    """
    if not _numpy_route(a):
        return a @ b
    with _numpy_blas():
        return torch.from_numpy(a.detach().numpy() @ b.detach().numpy())


def gram(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``a @ a.T`` computed in ``dtype``, shape (rows, rows), on ``a``'s device.

    On the numpy route (:func:`_numpy_route`: CPU, one thread) the product goes through numpy, whose
    ``x @ x.T`` of one buffer calls BLAS ``syrk`` (the symmetric rank-k update: half the flops of the
    general product, which is all torch offers; 1.9x faster for a 2048 x 4096 operand in
    ``benchmarks/decompositions.py``'s setting, 1.8-2.0x for the float32 ``X^T X`` of 2048 calibration
    tokens). ``a`` may be a transposed view (``gram(X.T)``).
    """
    a = a.detach().to(dtype)
    if not _numpy_route(a):
        return a @ a.T
    an = a.numpy()
    with _numpy_blas():
        return torch.from_numpy(an @ an.T)


def gram_eigh(a: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of the float64 Gram matrix ``a a^T``, largest first.

    These are the squared leading singular values of ``a`` and its left singular vectors, at a fraction
    of the cost of an SVD of a wide ``a``. The Gram matrix resolves eigenvalues down to about
    ``1e-16 * trace``: callers that need smaller singular values exactly use an SVD instead. On the
    numpy route (:func:`_numpy_route`: CPU, one thread; elsewhere ``torch.linalg.eigh``), when
    ``8 * k <= rows``, LAPACK's ``dsyevr`` computes only the ``k`` wanted eigenvectors after the
    tridiagonal reduction (2-3x faster than a full ``eigh`` at that ratio, slower above it); otherwise
    scipy's ``dsyevd`` (numpy's OpenBLAS), 10-20% faster than torch's ``eigh`` from 256 rows up.

    Parameters
    ----------
    a : Tensor, shape (rows, cols)
    k : int in [1, rows], or None for every eigenpair.

    Returns
    -------
    evals : Tensor, shape (k,), float64, descending (may hold round-off negatives near zero).
    evecs : Tensor, shape (rows, k), float64, orthonormal columns.
    """
    G = gram(a)
    n = G.shape[0]
    k = n if k is None else k
    if not _numpy_route(G):
        evals, evecs = torch.linalg.eigh(G)
        return evals[n - k :].flip(0), evecs[:, n - k :].flip(1)
    from scipy.linalg import eigh

    # dsyevr on the index range for few pairs; dsyevd otherwise (10-20% faster than torch's eigh here)
    subset = {"subset_by_index": [n - k, n - 1], "driver": "evr"} if 8 * k <= n else {"driver": "evd"}
    with _numpy_blas():
        evals, evecs = eigh(G.numpy(), overwrite_a=True, check_finite=False, **subset)
    return torch.from_numpy(evals[-k:]).flip(0), torch.from_numpy(evecs[:, -k:]).flip(1)


def gram_singular_values(a: Tensor) -> Tensor:
    """Every singular value of ``a``, descending, float64, from the eigenvalues of the float64 Gram
    matrix of its shorter side (no eigenvectors: a tridiagonal reduction and its eigenvalues).

    1.4-1.8x faster than ``torch.linalg.svdvals`` on one CPU thread for the 576 x 576 to 1536 x 576
    matrices of a small LLM. Values below ``sqrt(GRAM_FLOOR) * S[0]`` are not resolved (see
    :func:`leading_svd`) and may come out near zero. Use it where the squares of the spectrum matter
    (allocating ranks by kept energy), not where tiny singular values must be resolved.

    a : Tensor, shape (m, n). Returns a Tensor of shape (min(m, n),).
    """
    G = gram(a if a.shape[0] <= a.shape[1] else a.T)
    if not _numpy_route(G):
        evals = torch.linalg.eigvalsh(G)
    else:
        from scipy.linalg import eigh

        with _numpy_blas():
            evals = torch.from_numpy(
                eigh(G.numpy(), eigvals_only=True, overwrite_a=True, check_finite=False, driver="evd")
            )
    return evals.flip(0).clamp_min(0).sqrt()


GRAM_FLOOR = 1e-10
"""Smallest squared singular value, relative to the largest, that :func:`leading_svd` takes from the
float64 Gram matrix. Forming ``B B^T`` and its eigendecomposition perturb each eigenvalue by about
``n * 2^-53 * S[0]^2`` (``n`` the short side; 1e-13 * S[0]^2 at n = 1000), so an eigenvalue at
``GRAM_FLOOR * S[0]^2`` keeps about three correct digits, and its eigenvector, refined by the
Rayleigh–Ritz step, the same. Below it the SVD of the matrix itself (LAPACK ``gesdd``) is used."""


def rank_for_tail(sq: Tensor, tail_sq: float, max_rank: int | None = None) -> int:
    """Smallest ``k >= 1`` whose discarded squared values ``sum(sq[k:])`` are ``<= tail_sq``, capped at
    ``max_rank``. ``sq``: squared singular values (or any non-negative gains), descending."""
    sq = sq.to(torch.float64).clamp_min(0)
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tail[k] = sum_{i>=k} sq_i
    ok = torch.nonzero(tail <= tail_sq)
    k = max(int(ok[0]) if len(ok) else len(sq), 1)
    return k if max_rank is None else min(k, max_rank)


def rank_for_tolerance(spectrum: Tensor, eps: float, norm: Tensor | float | None = None) -> int:
    """Smallest rank whose discarded tail of ``spectrum`` has norm <= eps * norm (default ||spectrum||)."""
    sq = spectrum.to(torch.float64) ** 2
    total = float(sq.sum()) if norm is None else float(norm) ** 2
    return rank_for_tail(sq, eps**2 * total)


def short_side_basis(B: Tensor, rank: int | None = None, tail_sq: float | None = None) -> tuple[Tensor, Tensor] | None:
    """``(Q, sq)``: an orthonormal basis (short, k) of the leading left singular subspace of a wide ``B``
    (rows <= cols) and its squared singular values (float64, descending; every one when they were all
    computed), from the eigenpairs of the float64 Gram matrix ``B B^T`` (:func:`gram_eigh`; only the
    ``k`` wanted ones when ``8k <= rows`` and no tolerance). ``k`` as in :func:`leading_svd`.

    None when the Gram matrix cannot resolve them: ``B`` is zero, or the last kept squared singular
    value or ``tail_sq`` is below ``GRAM_FLOOR`` times the largest (the one accuracy guard of the
    low-rank backend, :data:`GRAM_FLOOR`); with ``rank=None`` and no tolerance every pair is returned
    unless ``B`` is zero (the caller asked for the whole spectrum, tiny values included).
    """
    short = B.shape[0]
    cap = short if rank is None else rank
    subset = tail_sq is None and rank is not None and 8 * rank <= short
    evals, Q = gram_eigh(B, cap if subset else None)
    sq = evals.clamp_min(0)
    k = cap if tail_sq is None else rank_for_tail(sq, tail_sq, cap)
    top = float(sq[0])
    if not top > 0:
        return None
    every = rank is None and tail_sq is None
    if not every and (float(sq[k - 1]) < GRAM_FLOOR * top or (tail_sq is not None and tail_sq < GRAM_FLOOR * top)):
        return None
    return Q[:, :k].to(B.dtype), sq


def leading_svd(M: Tensor, rank: int | None = None, tail_sq: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The leading singular triplets of ``M``: the one low-rank backend of every format.

    ``k`` triplets, ``k = rank`` (None: every one), or with ``tail_sq`` the smallest ``k`` whose
    discarded squared singular values sum to at most ``tail_sq``, capped at ``rank``;
    ``||M - U diag(S[:k]) Vh||_F^2`` is that discarded sum (Eckart–Young).

    Route: the basis of the shorter side from its float64 Gram matrix (:func:`short_side_basis`), far
    cheaper than an SVD of a wide matrix, then a Rayleigh–Ritz step (the SVD of ``M`` projected on
    those ``k`` vectors) that makes both factors orthonormal to round-off. When every triplet is asked
    for, the long side is the projection ``B^T Q / S`` instead (one product; the Rayleigh–Ritz SVD
    would cost a full SVD), so vectors of singular values below ``sqrt(GRAM_FLOOR) * S[0]`` are not
    resolved there. Where the Gram matrix cannot resolve what is asked (:func:`short_side_basis`
    returns None) the SVD of ``M`` (LAPACK ``gesdd``) is taken.

    Parameters
    ----------
    M : Tensor, shape (m, n), float32 or float64.
    rank : int in [1, min(m, n)] or None.
    tail_sq : float >= 0 or None, absolute bound on the discarded squared Frobenius norm.

    Returns
    -------
    U (m, k); S, descending, float64: the ``k`` kept singular values, or the whole spectrum where it
    was computed to full accuracy anyway (every triplet asked for, or the SVD fallback); Vh (k, n).
    U and Vh are in ``M``'s dtype.
    """
    wide = M.shape[0] <= M.shape[1]
    B = M if wide else M.T  # (short, long): its left singular vectors are M's short-side ones
    basis = short_side_basis(B, rank, tail_sq)
    if basis is None:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        S64 = S.to(torch.float64)
        cap = min(M.shape) if rank is None else rank
        k = cap if tail_sq is None else rank_for_tail(S64**2, tail_sq, cap)
        return U[:, :k], S64, Vh[:k]
    Q, sq = basis
    if rank is None and tail_sq is None:
        S = sq.sqrt()
        long = (B.T @ Q) / S.clamp_min(float(S[0]) * 1e-150 + 1e-300).to(B.dtype)  # never divide by zero
        short_vecs = Q
    else:
        long, S_k, RcT = torch.linalg.svd(B.T @ Q, full_matrices=False)  # tall (long, k): gesdd is fast
        short_vecs = Q @ RcT.T
        S = S_k.to(torch.float64)
    return (short_vecs, S, long.T) if wide else (long, S, short_vecs.T)


def leading_left_singular_vectors(m: Tensor, rank: int) -> Tensor:
    """First ``rank`` left singular vectors of ``m``, shape (rows, rank), in ``m``'s dtype
    (:func:`leading_svd`). With fewer columns than ``rank`` the extra vectors complete an orthonormal
    basis (their singular value is zero)."""
    rows, cols = m.shape
    if rank <= min(rows, cols):
        basis = short_side_basis(m, rank) if rows <= cols else None  # wide: the Gram basis is the answer
        return basis[0] if basis is not None else leading_svd(m, rank)[0]
    u, _, _ = torch.linalg.svd(m, full_matrices=True)
    return u[:, :rank]


def check_int_rank(rank: object, name: str, max_rank: int) -> int:
    """A single integer rank in [1, max_rank]."""
    if not is_int(rank):
        raise ValueError(f"{name} must be an int in [1, {max_rank}], got {rank!r}")
    if not 1 <= rank <= max_rank:
        raise ValueError(f"{name}={rank} is out of range; accepted: 1 <= {name} <= {max_rank} for this shape")
    return rank


def check_fraction(value: object, name: str) -> float:
    """A float in (0, 1]: the fraction of the dense parameter count to keep."""
    if not isinstance(value, float) or not (0.0 < value <= 1.0):  # an int is a rank here, not a fraction
        raise ValueError(f"{name} as a float must be a fraction of the dense parameter count in (0, 1], got {value!r}")
    return value


def check_tolerance(value: object, name: str = "eps") -> float:
    if not is_number(value) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be a relative tolerance in [0, 1), got {value!r}")
    return float(value)


def resolve_ranks(
    rank: RankSpec | None,
    max_ranks: Sequence[int],
    num_params: Callable[[tuple[int, ...]], float],
    dense: int,
    *,
    clamp: bool = True,
    spread: Callable[[int], tuple[int, ...]] | None = None,
    entries: str | None = None,
) -> tuple[int, ...]:
    """The formats' one rank resolver: a rank spec and the largest rank of every mode (bond, node) ->
    one validated int rank per mode.

    One rule for every format (TensorLy's ``validate_<fmt>_rank`` vocabulary):

    - ``None``: every mode at its largest rank.
    - an int ``R`` (never a bool) is a rank, in [1, max(max_ranks)], given to every mode: clamped to
      what each mode allows with ``clamp`` (TT, HT: the bonds near the ends cannot reach R), or required
      to fit every mode without (Tucker: ``R`` must be at most every mode's maximum).
    - a float is a fraction of the ``dense`` parameter count, in (0, 1] (``2.0`` is a bad fraction, not a
      rank): the largest common ``R`` whose per-mode ranks ``spread(R)`` (default: ``R`` clamped per mode)
      store at most that many parameters by ``num_params``; ``R = 1`` when even that exceeds it.
    - a tuple or list: one int per mode, each within its maximum, no clamping (``entries`` describes
      the expected length in the error, default "N entries (one per mode)").

    Errors are one line naming ``rank``, what was given and what is accepted.
    """
    n = len(max_ranks)
    top = max(max_ranks)

    def clamped(R: int) -> tuple[int, ...]:
        return tuple(min(R, m) for m in max_ranks)

    if rank is None:
        return tuple(max_ranks)
    if isinstance(rank, float):
        spread = spread or clamped
        keep = check_fraction(rank, "rank")
        return spread(largest_within_budget(keep * dense, lambda R: num_params(spread(R)), top))
    if is_int(rank):
        if clamp:
            return clamped(check_int_rank(rank, "rank", top))
        return tuple(check_int_rank(rank, "rank", m) for m in max_ranks)
    if isinstance(rank, (list, tuple)):
        if len(rank) != n:
            expected = entries or f"{n} entries (one per mode)"
            raise ValueError(f"rank must have {expected}, got {len(rank)}: {tuple(rank)!r}")
        return tuple(check_int_rank(r, f"rank[{i}]", m) for i, (r, m) in enumerate(zip(rank, max_ranks)))
    raise ValueError(f"rank must be an int, a tuple of {n} ints, a float in (0, 1] or None, got {rank!r}")


def resolve_rank(rank: int | float | None, max_rank: int, num_params: Callable[[int], float], dense: int) -> int:
    """:func:`resolve_ranks` for a format with a single rank (SVD, CP, Kronecker): no tuple accepted."""
    if not (rank is None or isinstance(rank, float) or is_int(rank)):
        check_int_rank(rank, "rank", max_rank)  # raises: "rank must be an int in [1, max_rank], got ..."
    return resolve_ranks(rank, (max_rank,), lambda r: num_params(r[0]), dense)[0]


def largest_within_budget(budget: float, num_params: Callable[[int], int], max_value: int) -> int:
    """Largest ``k`` in [1, max_value] with ``num_params(k) <= budget`` (1 if even k=1 exceeds it).

    ``num_params`` must be non-decreasing in ``k``; binary search keeps this O(log max_value).
    """
    lo, hi = 1, max_value
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if num_params(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
