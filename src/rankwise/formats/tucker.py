"""Tucker decomposition: HOSVD and HOOI with orthonormal factors, full or partial (e.g. Tucker-2 of a conv kernel)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .._validate import int_at_least, is_int, non_negative
from ._ops import (
    RankSpec,
    Tensor,
    check_tensor,
    compute_dtype,
    leading_left_singular_vectors,
    multi_mode_dot,
    resolve_ranks,
    unfold,
)
from .protocol import FORMATS


@dataclass(frozen=True)
class Tucker:
    """``X ≈ core ×_{modes[0]} factors[0] ×_{modes[1]} factors[1] ...``.

    core : Tensor, shape ``x.shape`` with ``x.shape[modes[i]]`` replaced by ``ranks[i]``.
    factors : tuple of Tensor, ``factors[i]`` of shape (x.shape[modes[i]], ranks[i]), orthonormal columns.
    modes : tuple of int, the decomposed modes (all of them for a full Tucker; (0, 1) for Tucker-2 of a
        conv kernel of shape (out, in, kh, kw)).
    errors : tuple of float, relative error ``||X - X̂|| / ||X||`` after HOSVD and after every HOOI sweep.
    """

    name: ClassVar[str] = "tucker"
    core: Tensor
    factors: tuple[Tensor, ...]
    modes: tuple[int, ...]
    errors: tuple[float, ...] = ()

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(f.shape[1]) for f in self.factors)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.core.shape)
        for f, mode in zip(self.factors, self.modes):
            shape[mode] = int(f.shape[0])
        return tuple(shape)

    @property
    def num_params(self) -> int:
        return self.core.numel() + sum(f.numel() for f in self.factors)

    def to_dense(self) -> Tensor:
        return multi_mode_dot(self.core, self.factors, self.modes)

    def truncate(self, rank: RankSpec) -> Tucker:
        """The leading ``rank`` columns of every factor and the matching block of the core.

        ``rank`` as in :func:`tucker_ranks` with the current ranks as the maxima: an int (every decomposed
        mode), one int per decomposed mode, or a fraction of the dense parameter count. The factors
        being orthonormal, the discarded part is orthogonal to the kept one and
        ``||to_dense() - truncate(r).to_dense()||_F^2 = ||core||_F^2 - ||kept block||_F^2`` exactly.
        """
        ranks = tucker_ranks(self.shape, rank, self.modes, self.ranks)
        index = [slice(None)] * self.core.ndim
        for r, mode in zip(ranks, self.modes):
            index[mode] = slice(0, r)
        factors = tuple(f[:, :r] for f, r in zip(self.factors, ranks))
        return Tucker(self.core[tuple(index)], factors, self.modes)


def _check_modes(modes: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, int) or not all(is_int(m) for m in modes):
        raise ValueError(f"modes must be a sequence of distinct ints in [0, {ndim - 1}], got {modes!r}")
    modes = tuple(modes)
    if not modes or len(set(modes)) != len(modes) or not all(0 <= m < ndim for m in modes):
        raise ValueError(f"modes must be a non-empty sequence of distinct ints in [0, {ndim - 1}], got {modes!r}")
    return tuple(sorted(modes))


def tucker_num_params(shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int]) -> int:
    """Parameters of a Tucker format: the core plus one (size, rank) factor per decomposed mode."""
    core = list(shape)
    for r, mode in zip(ranks, modes):
        core[mode] = r
    return math.prod(core) + sum(shape[m] * r for m, r in zip(modes, ranks))


def tucker_ranks(
    shape: Sequence[int], rank: RankSpec | None, modes: Sequence[int], max_ranks: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Resolve ``rank`` into one rank per decomposed mode (:func:`~rankwise.formats._ops.resolve_ranks`).

    The rank of mode ``n`` is at most ``min(shape[n], prod of the other sizes)`` (or ``max_ranks``, one
    per decomposed mode, e.g. the current ranks when truncating). None: those maxima. An int must fit
    every mode (no clamping). A float ``f`` in (0, 1] gives the largest ranks with the same ratio
    ``rank_n / max_rank_n`` for every mode (rounded, at least 1) whose parameter count stays within
    ``f * prod(shape)``; 1 per mode if even that exceeds it.
    """
    total = math.prod(shape)
    if max_ranks is None:
        max_ranks = [min(shape[m], total // shape[m]) for m in modes]
    top = max(max_ranks)

    def proportional(k: int) -> tuple[int, ...]:
        return tuple(max(1, min(m, round(k * m / top))) for m in max_ranks)

    return resolve_ranks(
        rank, max_ranks, lambda r: tucker_num_params(shape, r, modes), total, clamp=False, spread=proportional
    )


def _prepare(x: Tensor, rank: RankSpec, modes: Sequence[int] | None) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    check_tensor(x, "x", min_ndim=2)
    modes = _check_modes(modes, x.ndim)
    ranks = tucker_ranks(tuple(x.shape), rank, modes)
    return x.to(compute_dtype(x)), modes, ranks


def _relative_error(norm_x: float, core: Tensor) -> float:
    # Orthonormal factors: ||X - X̂||^2 = ||X||^2 - ||core||^2, no reconstruction needed.
    gap = max(norm_x**2 - float(core.double().norm()) ** 2, 0.0)
    return math.sqrt(gap) / norm_x if norm_x > 0 else 0.0


def _hosvd_factors(x: Tensor, ranks: Sequence[int], modes: Sequence[int]) -> list[Tensor]:
    return [leading_left_singular_vectors(unfold(x, m), r) for m, r in zip(modes, ranks)]


def _finish(x: Tensor, core: Tensor, factors: Sequence[Tensor], modes: tuple[int, ...], errors: list[float]) -> Tucker:
    dt = compute_dtype(x)
    return Tucker(core.to(dt), tuple(f.to(dt) for f in factors), modes, tuple(errors))


def tucker_hosvd(x: Tensor, rank: RankSpec, modes: Sequence[int] | None = None) -> Tucker:
    """Truncated higher-order SVD: each factor spans the leading left singular vectors of its unfolding.

    Parameters
    ----------
    x : Tensor, shape (I_0, ..., I_{N-1}), N >= 2, finite floating point.
    rank : int (same rank for every decomposed mode), tuple of ints (one per decomposed mode, in sorted
        mode order), or float in (0, 1] (fraction of ``x.numel()`` parameters, see :func:`tucker_ranks`).
    modes : sequence of int, optional. The modes to decompose (default: all). ``(0, 1)`` on a conv kernel
        of shape (out, in, kh, kw) is Tucker-2.

    Returns
    -------
    Tucker with orthonormal factors; ``errors`` holds the one relative error of the HOSVD. The error is
    at most ``sqrt(len(modes))`` times the best Tucker error at these ranks.

    References
    ----------
    L. De Lathauwer, B. De Moor, J. Vandewalle, "A multilinear singular value decomposition",
    SIAM J. Matrix Anal. Appl. 21 (2000).
    """
    xc, modes, ranks = _prepare(x, rank, modes)
    factors = _hosvd_factors(xc, ranks, modes)
    core = multi_mode_dot(xc, factors, modes, transpose=True)
    return _finish(x, core, factors, modes, [_relative_error(float(xc.double().norm()), core)])


def _contract_all_but(x: Tensor, factors: Sequence[Tensor], modes: Sequence[int], skip: set[int]) -> Tensor:
    """``x ×_m factors[m]^T`` for every decomposed mode not in ``skip``, largest size reduction first."""
    order = sorted(
        (i for i in range(len(modes)) if modes[i] not in skip), key=lambda i: factors[i].shape[1] / factors[i].shape[0]
    )
    for i in order:
        x = multi_mode_dot(x, [factors[i]], [modes[i]], transpose=True)
    return x


def tucker_hooi(
    x: Tensor,
    rank: RankSpec,
    modes: Sequence[int] | None = None,
    *,
    n_iter_max: int = 50,
    tol: float = 1e-8,
) -> Tucker:
    """Tucker by higher-order orthogonal iteration, initialised from :func:`tucker_hosvd`.

    Every sweep replaces each factor by the leading left singular vectors of ``x`` projected on all the
    other factors, which cannot increase the error. The sweep order shares work: the projection on the
    last decomposed mode is computed once per sweep and reused by every other mode, so a sweep costs two
    contractions of the full tensor whatever the order.

    Parameters
    ----------
    x, rank, modes : as in :func:`tucker_hosvd`.
    n_iter_max : int >= 0, the most HOOI sweeps (0 returns the HOSVD).
    tol : float >= 0, stop once the relative error decreases by less than ``tol`` in a sweep
        (0 runs all ``n_iter_max`` sweeps).

    Returns
    -------
    Tucker with orthonormal factors; ``errors[0]`` is the HOSVD error, ``errors[k]`` the error after
    sweep ``k`` (non-increasing up to rounding).

    References
    ----------
    L. De Lathauwer, B. De Moor, J. Vandewalle, "On the best rank-1 and rank-(R1, R2, ..., RN)
    approximation of higher-order tensors", SIAM J. Matrix Anal. Appl. 21 (2000).
    """
    int_at_least(n_iter_max, "n_iter_max", 0)
    non_negative(tol, "tol")
    xc, modes, ranks = _prepare(x, rank, modes)
    norm_x = float(xc.double().norm())
    factors = _hosvd_factors(xc, ranks, modes)
    core = multi_mode_dot(xc, factors, modes, transpose=True)
    errors = [_relative_error(norm_x, core)]
    last = len(modes) - 1
    for _ in range(n_iter_max):
        shared = _contract_all_but(xc, factors, modes, skip=set(modes[:last])) if last else xc
        for i in range(last):
            y = _contract_all_but(shared, factors, modes, skip={modes[i], modes[last]})
            factors[i] = leading_left_singular_vectors(unfold(y, modes[i]), ranks[i])
        y = _contract_all_but(xc, factors, modes, skip={modes[last]})
        factors[last] = leading_left_singular_vectors(unfold(y, modes[last]), ranks[last])
        core = multi_mode_dot(y, [factors[last]], [modes[last]], transpose=True)
        errors.append(_relative_error(norm_x, core))
        if tol > 0 and errors[-2] - errors[-1] < tol:
            break
    return _finish(x, core, factors, modes, errors)


FORMATS.register(Tucker.name, paper="https://doi.org/10.1137/S0895479896305696", decompose=tucker_hooi)(Tucker)
