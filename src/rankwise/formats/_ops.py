"""Tensor algebra and argument checks shared by every format (unfold, fold, mode_dot, ranks)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

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
    """float64 stays float64; everything else (float16, bfloat16, float32) is computed in float32."""
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
    out = torch.tensordot(matrix, x, dims=([1], [mode]))  # (J, other modes in order)
    return torch.movedim(out, 0, mode)


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


def leading_left_singular_vectors(m: Tensor, rank: int) -> Tensor:
    """First ``rank`` left singular vectors of ``m``, shape (rows, rank), in ``m``'s dtype.

    For a matrix at least as wide as it is tall, the eigenvectors of the Gram matrix ``m m^T``, formed in
    float64, are used: far cheaper than an SVD of a wide matrix (LAPACK's gesdd is 10-50x slower here),
    and float64 keeps the squared condition number harmless for the leading vectors we keep.
    """
    rows, cols = m.shape
    if cols >= rows:
        md = m.to(torch.float64)
        _, evecs = torch.linalg.eigh(md @ md.T)  # ascending eigenvalues
        return evecs[:, -rank:].flip(1).to(m.dtype)
    # with fewer columns than ``rank`` the extra vectors complete an orthonormal basis (zero singular value)
    u, _, _ = torch.linalg.svd(m, full_matrices=rank > cols)
    return u[:, :rank]


def check_int_rank(rank: object, name: str, max_rank: int) -> int:
    """A single integer rank in [1, max_rank]."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{name} must be an int in [1, {max_rank}], got {rank!r}")
    if not 1 <= rank <= max_rank:
        raise ValueError(f"{name}={rank} is out of range; accepted: 1 <= {name} <= {max_rank} for this shape")
    return rank


def check_fraction(value: object, name: str) -> float:
    """A float in (0, 1]: the fraction of the dense parameter count to keep."""
    if isinstance(value, bool) or not isinstance(value, float) or not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} as a float must be a fraction of the dense parameter count in (0, 1], got {value!r}")
    return value


def check_tolerance(value: object, name: str = "eps") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be a relative tolerance in [0, 1), got {value!r}")
    return float(value)


def per_mode_ranks(rank: RankSpec, name: str, max_ranks: Sequence[int]) -> tuple[int, ...]:
    """Expand an int or tuple rank into one int per mode, each within its bound (no clamping)."""
    n = len(max_ranks)
    if isinstance(rank, (list, tuple)):
        if len(rank) != n:
            raise ValueError(f"{name} must have {n} entries (one per mode), got {len(rank)}: {tuple(rank)!r}")
        return tuple(check_int_rank(r, f"{name}[{i}]", m) for i, (r, m) in enumerate(zip(rank, max_ranks)))
    if isinstance(rank, int) and not isinstance(rank, bool):
        return tuple(check_int_rank(rank, name, m) for m in max_ranks)
    raise ValueError(f"{name} must be an int, a tuple of {n} ints or a float in (0, 1], got {rank!r}")


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


def rank_for_tolerance(spectrum: Tensor, eps: float, norm: Tensor | float | None = None) -> int:
    """Smallest rank whose discarded tail of ``spectrum`` has norm <= eps * norm (default ||spectrum||)."""
    sq = spectrum.to(torch.float64) ** 2
    total = float(sq.sum()) if norm is None else float(norm) ** 2
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tail[k] = sum_{i>=k} s_i^2
    allowed = (eps**2) * total
    ok = torch.nonzero(tail <= allowed)
    rank = int(ok[0]) if len(ok) else len(spectrum)
    return max(rank, 1)
