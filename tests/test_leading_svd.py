"""Tests of the one low-rank backend, rankwise.formats._ops.leading_svd, and its tail-rank rule."""

import pytest
import torch

from rankwise.formats import _ops
from rankwise.formats._ops import GRAM_FLOOR, leading_svd, rank_for_tail, rank_for_tolerance


def _matrix_with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=g))
    return (U * s) @ V.T


def _full_svd_calls(monkeypatch, shape) -> list:
    """Records the calls of torch.linalg.svd on a matrix of ``shape`` (the fallback, not Rayleigh–Ritz)."""
    calls, real = [], torch.linalg.svd

    def spy(a, *args, **kwargs):
        if tuple(a.shape) == tuple(shape):
            calls.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    return calls


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
@pytest.mark.parametrize("ratio, fallback", [(4.0, False), (0.25, True)])
def test_gram_floor_boundary_chooses_the_route_and_both_are_exact(monkeypatch, shape, ratio, fallback):
    """The 5th squared singular value at 4x / 0.25x GRAM_FLOOR of the largest: Gram route above the
    floor, the matrix's own SVD below; either way the discarded energy is the tail (Eckart–Young) and
    the factors are orthonormal."""
    k = 5
    s = torch.tensor([1.0, 0.5, 0.2, 0.1] + [(ratio * GRAM_FLOOR) ** 0.5] + [1e-7] * 10, dtype=torch.float64)
    s[k:] = s[k - 1] * 0.5 ** torch.arange(1, 11, dtype=torch.float64)
    W = _matrix_with_spectrum(*shape, s, seed=1)
    calls = _full_svd_calls(monkeypatch, shape)
    U, S, Vh = leading_svd(W, k)
    assert bool(calls) is fallback
    err_sq = float(((W - (U * S[:k]) @ Vh) ** 2).sum())
    assert err_sq == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-6, abs=1e-24)
    assert torch.allclose(S[:k], s[:k], rtol=1e-9, atol=0)
    eye = torch.eye(k, dtype=torch.float64)
    assert float((U.T @ U - eye).abs().max()) < 1e-12 and float((Vh @ Vh.T - eye).abs().max()) < 1e-12


def test_tolerance_picks_the_smallest_rank_whose_tail_fits():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    W = _matrix_with_spectrum(30, 70, s, seed=2)
    # tails: rank 3 discards 2^2 + 1^2 = 5; rank 4 discards 1
    U, S, Vh = leading_svd(W, None, tail_sq=5.0 + 1e-9)  # the 25 zero values add round-off
    assert U.shape == (30, 3) and Vh.shape == (3, 70)
    U, S, Vh = leading_svd(W, None, tail_sq=4.999)
    assert U.shape == (30, 4)
    U, S, Vh = leading_svd(W, 2, tail_sq=0.0)  # capped at the rank
    assert U.shape == (30, 2)
    assert float(((W - (U * S[:2]) @ Vh) ** 2).sum()) == pytest.approx(9 + 4 + 1, rel=1e-10)


def test_every_triplet_reconstructs_and_keeps_the_whole_spectrum():
    s = torch.linspace(3, 1, 25, dtype=torch.float64)
    W = _matrix_with_spectrum(25, 60, s, seed=3)
    U, S, Vh = leading_svd(W)
    assert S.shape == (25,) and torch.allclose(S, s, rtol=1e-12, atol=0)
    assert float((U @ torch.diag(S) @ Vh - W).abs().max()) < 1e-12


def test_zero_matrix_falls_back_to_the_svd():
    U, S, Vh = leading_svd(torch.zeros(6, 9, dtype=torch.float64), 2)
    assert U.shape == (6, 2) and Vh.shape == (2, 9) and float(S.abs().max()) == 0.0


def test_rank_for_tail_and_tolerance():
    sq = torch.tensor([16.0, 9.0, 4.0, 1.0], dtype=torch.float64)
    assert [rank_for_tail(sq, t) for t in (0.0, 1.0, 4.99, 5.0, 14.0, 100.0)] == [4, 3, 3, 2, 1, 1]
    assert rank_for_tail(sq, 0.0, max_rank=2) == 2
    # eps is relative to the norm of the spectrum: sqrt(30) * 0.2 = 1.095..., squared 1.2 >= 1
    assert rank_for_tolerance(sq.sqrt(), 0.2) == 3


def test_leading_left_singular_vectors_completes_a_basis_beyond_the_columns():
    W = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    U = _ops.leading_left_singular_vectors(W, 5)
    assert U.shape == (8, 5) and float((U.T @ U - torch.eye(5, dtype=torch.float64)).abs().max()) < 1e-12
