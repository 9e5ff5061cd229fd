"""Tests of rankwise.formats.svd: truncated, randomized and whitened SVD, and the whitening factor."""

import pytest
import torch

from rankwise.formats._ops import gram_eigh, gram_singular_values
from rankwise.formats.svd import (
    randomized_svd,
    truncated_svd,
    whitened_svd,
    whitening_factor,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix_with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=g))
    return (U * s) @ V.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_exact_rank_recovery_float64():
    g = _gen(1)
    W = torch.randn(40, 5, dtype=torch.float64, generator=g) @ torch.randn(5, 30, dtype=torch.float64, generator=g)
    f = truncated_svd(W, 5)
    assert f.rank == 5 and f.num_params == 5 * (40 + 30 + 1)
    assert _rel(f.to_dense(), W) < 1e-10


@pytest.mark.parametrize("rank", [1, 7, 19])
def test_eckart_young_error_equals_discarded_singular_values(rank):
    W = torch.randn(30, 20, dtype=torch.float64, generator=_gen(2))
    f = truncated_svd(W, rank)
    s = torch.linalg.svdvals(W)
    err = float((W - f.to_dense()).norm())
    assert err == pytest.approx(float(s[rank:].norm()), rel=1e-12)
    assert f.tail_error(rank) == pytest.approx(err, rel=1e-12)
    # any other rank-r matrix does worse, e.g. the projection on a random rank-r column space
    Q, _ = torch.linalg.qr(torch.randn(30, rank, dtype=torch.float64, generator=_gen(3)))
    assert float((W - Q @ (Q.T @ W)).norm()) > err


def test_orthonormal_factors():
    W = torch.randn(50, 35, dtype=torch.float64, generator=_gen(4))
    f = truncated_svd(W, 12)
    assert float((f.U.T @ f.U - torch.eye(12, dtype=torch.float64)).abs().max()) < 1e-12
    assert float((f.Vh @ f.Vh.T - torch.eye(12, dtype=torch.float64)).abs().max()) < 1e-12


def test_fraction_rank_is_largest_within_budget():
    W = torch.randn(64, 32, generator=_gen(5))
    f = truncated_svd(W, 0.25)
    budget = 0.25 * 64 * 32
    assert f.rank * (64 + 32) <= budget < (f.rank + 1) * (64 + 32)


def test_eps_rule_picks_smallest_rank_within_tolerance():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    W = _matrix_with_spectrum(20, 10, s)
    eps = float(s[2:].norm() / s.norm()) * 1.0001  # rank 2 just meets it, rank 1 does not
    f = truncated_svd(W, eps=eps)
    assert f.rank == 2
    assert float((W - f.to_dense()).norm()) <= eps * float(W.norm())


@pytest.mark.parametrize("shape", [(300, 160), (160, 300)])
@pytest.mark.parametrize("r", [16, 53])  # 16: dsyevr on the index range; 53: the largest with 3 * r <= 160
def test_small_rank_gram_route_equals_full_svd(shape, r):
    """3 * rank <= min(m, n): leading subspace from the Gram matrix, then Rayleigh–Ritz."""
    s = torch.arange(1, 161, dtype=torch.float64) ** -0.5
    W = _matrix_with_spectrum(*shape, s, seed=3)
    f = truncated_svd(W, r)
    assert f.spectrum.shape == (r,) and f.energy == pytest.approx(float(W.norm()) ** 2, rel=1e-14)
    assert torch.allclose(f.S, s[:r], rtol=1e-12, atol=0)
    eye = torch.eye(r, dtype=torch.float64)
    assert float((f.U.T @ f.U - eye).abs().max()) < 1e-12
    assert float((f.Vh @ f.Vh.T - eye).abs().max()) < 1e-12
    err = float((W - f.to_dense()).norm())
    assert err == pytest.approx(float(s[r:].norm()), rel=1e-12)  # Eckart–Young
    for k in (1, 9, r):
        assert f.tail_error(k) == pytest.approx(float(s[k:].norm()), rel=1e-10)
    with pytest.raises(
        ValueError, match=rf"tail_error\({r + 1}\) needs the singular values beyond the {r} this SVD holds"
    ):
        f.tail_error(r + 1)
    assert truncated_svd(W, 54).spectrum.shape == (160,)  # 3 * 54 > 160: the full SVD, whole spectrum


def test_small_rank_beyond_gram_resolution_falls_back_to_full_svd():
    """A rank-3 matrix asked for rank 10: the 10th singular value is zero, below the Gram matrix's
    resolution, so the full SVD is taken (whole spectrum kept) and the result is exact."""
    g = _gen(8)
    W = torch.randn(200, 3, dtype=torch.float64, generator=g) @ torch.randn(3, 100, dtype=torch.float64, generator=g)
    f = truncated_svd(W, 10)
    assert f.spectrum.shape == (100,) and f.energy is None
    assert _rel(f.to_dense(), W) < 1e-12
    assert float((f.U.T @ f.U - torch.eye(10, dtype=torch.float64)).abs().max()) < 1e-12


@pytest.mark.parametrize("k", [8, 50, None])  # 8: LAPACK dsyevr on the index range; 50, None: full eigh
def test_gram_eigh_leading_pairs_match_full_eigendecomposition(k):
    a = torch.randn(100, 130, generator=_gen(12))  # float32 in, float64 Gram
    evals, evecs = gram_eigh(a, k)
    ref_vals, ref_vecs = torch.linalg.eigh(a.double() @ a.double().T)
    n = 100 if k is None else k
    assert evals.dtype == evecs.dtype == torch.float64 and evecs.shape == (100, n)
    assert torch.allclose(evals, ref_vals.flip(0)[:n], rtol=1e-12, atol=0)
    assert float((evecs.T @ evecs - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12
    overlap = (evecs.T @ ref_vecs.flip(1)[:, :n]).abs().diagonal()  # same vectors up to sign
    assert float((overlap - 1).abs().max()) < 1e-10


@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_gram_singular_values_match_svdvals_to_the_gram_resolution(shape):
    s = torch.cat([torch.logspace(0, -6, 50, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)])
    W = _matrix_with_spectrum(*shape, s, seed=13)
    got = gram_singular_values(W)
    assert got.dtype == torch.float64 and got.shape == (60,)
    big = s >= 1e-3
    assert torch.allclose(got[big], s[big], rtol=1e-9, atol=0)
    assert float((got - s).abs().max()) < 1e-8  # every value (zeros too) within the resolution 1e-8 * S[0]
    assert torch.equal(got, got.sort(descending=True).values)


def test_torch_route_on_several_threads_equals_the_numpy_route():
    """On more than one torch thread the _ops helpers stay in torch (no OpenBLAS pool to fight with)."""
    from rankwise.formats import _ops

    a, b = torch.randn(40, 70, generator=_gen(21)), torch.randn(70, 30, generator=_gen(22))
    s = torch.arange(1, 41, dtype=torch.float64) ** -1.0
    W = _matrix_with_spectrum(40, 70, s, seed=23)
    assert _ops._numpy_route(a)  # the suite runs on one thread
    one = (
        _ops.matmul(a, b),
        _ops.gram(a),
        _ops.gram(a.T, torch.float32),
        gram_singular_values(W),
        gram_eigh(W, 5)[0],
        truncated_svd(W, 10).S,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not _ops._numpy_route(a)
        two = (
            _ops.matmul(a, b),
            _ops.gram(a),
            _ops.gram(a.T, torch.float32),
            gram_singular_values(W),
            gram_eigh(W, 5)[0],
            truncated_svd(W, 10).S,
        )
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, two):
        assert x.dtype == y.dtype and x.shape == y.shape
        single = x.dtype == torch.float32  # entries of size ~8: float32 round-off ~1e-6
        torch.testing.assert_close(x, y, rtol=1e-5 if single else 1e-12, atol=1e-5 if single else 1e-12)


def test_half_precision_input_is_computed_in_float32():
    W = torch.randn(16, 8, generator=_gen(6)).to(torch.float16)
    f = truncated_svd(W, 8)
    assert f.U.dtype == torch.float32
    assert _rel(f.to_dense(), W.float()) < 1e-5


def test_randomized_within_tenth_of_a_percent_of_exact_on_slow_spectrum():
    s = torch.arange(1, 121, dtype=torch.float64) ** -0.5
    W = _matrix_with_spectrum(200, 120, s, seed=7)
    exact = float((W - truncated_svd(W, 12).to_dense()).norm())
    approx = float((W - randomized_svd(W, 12, n_iter=4, seed=0).to_dense()).norm())
    assert exact <= approx <= exact * (1 + 1e-3)


def test_randomized_exact_rank_recovery_and_wide_input():
    g = _gen(8)
    W = torch.randn(30, 6, dtype=torch.float64, generator=g) @ torch.randn(6, 90, dtype=torch.float64, generator=g)
    f = randomized_svd(W, 6, seed=3)
    assert f.shape == (30, 90)
    assert _rel(f.to_dense(), W) < 1e-10


def test_randomized_same_seed_bit_identical_different_seed_differs():
    W = torch.randn(60, 40, generator=_gen(9))
    a, b, c = randomized_svd(W, 5, seed=11), randomized_svd(W, 5, seed=11), randomized_svd(W, 5, n_iter=0, seed=12)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    assert not torch.equal(a.U, c.U)


def _gram_inputs(seed: int = 10):
    g = _gen(seed)
    W = torch.randn(24, 16, dtype=torch.float64, generator=g)
    X = torch.randn(200, 16, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3.0, 16, dtype=torch.float64)
    return W, X


def test_whitened_svd_minimises_output_error_and_equals_svd_of_wm_mapped_back():
    W, X = _gram_inputs()
    M = whitening_factor(X.T @ X, damping=0.0)
    f = whitened_svd(W, 6, whitening=M)
    ref = truncated_svd(W @ M, 6)
    assert _rel(f.to_dense() @ M, ref.to_dense()) < 1e-10
    err = float(((W - f.to_dense()) @ M).norm())
    assert err == pytest.approx(f.tail_error(6), rel=1e-10)
    plain = truncated_svd(W, 6).to_dense()
    assert err < float(((W - plain) @ M).norm())
    # M M^T = X^T X, so the whitened error is the output error on the calibration inputs
    assert err == pytest.approx(float((X @ (W - f.to_dense()).T).norm()), rel=1e-10)


def test_whitened_svd_with_diagonal_scale():
    W, _ = _gram_inputs(11)
    scale = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    f = whitened_svd(W, 4, scale=scale)
    ref = truncated_svd(W * scale, 4)
    assert _rel(f.to_dense() * scale, ref.to_dense()) < 1e-10
    assert float(((W - f.to_dense()) * scale).norm()) < float(((W - truncated_svd(W, 4).to_dense()) * scale).norm())


def test_whitening_factor_on_singular_gram_is_cholesky_of_damped_gram():
    X = torch.randn(5, 20, dtype=torch.float64, generator=_gen(12))  # fewer samples than features: rank 5
    G = X.T @ X
    M = whitening_factor(G, damping=1e-6)
    assert torch.isfinite(M).all() and torch.equal(M, torch.tril(M))
    target = G + 1e-6 * float(G.diagonal().mean()) * torch.eye(20, dtype=torch.float64)
    assert float((M @ M.T - target).abs().max()) < 1e-12 * float(G.abs().max())
    W = torch.randn(8, 20, dtype=torch.float64, generator=_gen(13))
    assert torch.isfinite(whitened_svd(W, 3, whitening=M).to_dense()).all()


def test_whitening_factor_on_indefinite_gram_floors_eigenvalues():
    X = torch.randn(30, 10, dtype=torch.float64, generator=_gen(14))
    G = X.T @ X
    G[0, 0] = -5.0  # no longer positive semi-definite
    damping = 1e-6
    M = whitening_factor(G, damping=damping)
    assert torch.isfinite(M).all()
    evals = torch.linalg.eigvalsh(G)
    floor = float(evals.max()) * damping
    # M M^T - G is PSD and only lifts the eigenvalues that were below the floor
    diff = torch.linalg.eigvalsh(M @ M.T - G)
    assert float(diff.min()) > -1e-10 * float(evals.max())
    assert float(diff.max()) == pytest.approx(floor - float(evals.min()), rel=1e-8)
    W = torch.randn(6, 10, dtype=torch.float64, generator=_gen(15))
    assert torch.isfinite(whitened_svd(W, 2, whitening=M).to_dense()).all()


def test_whitening_factor_of_zero_gram_is_identity():
    assert torch.equal(whitening_factor(torch.zeros(4, 4)), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: truncated_svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1), "W contains 1 NaN/Inf entries"),
        (lambda: truncated_svd(torch.ones(3, 3, dtype=torch.int64), 1), "W must have a floating dtype"),
        (lambda: truncated_svd(torch.ones(3, 3, 3), 1), "W must have 2 dimensions, got 3"),
        (lambda: truncated_svd(torch.ones(4, 3), 0), "rank=0 is out of range; accepted: 1 <= rank <= 3"),
        (lambda: truncated_svd(torch.ones(4, 3), 4), "rank=4 is out of range; accepted: 1 <= rank <= 3"),
        (lambda: truncated_svd(torch.ones(4, 3), 1.5), "rank as a float must be a fraction"),
        (lambda: truncated_svd(torch.ones(4, 3), eps=1.0), "eps must be a relative tolerance in [0, 1), got 1.0"),
        (lambda: randomized_svd(torch.ones(4, 3), 2, n_iter=-1), "n_iter must be an int >= 0, got -1"),
        (lambda: randomized_svd(torch.ones(4, 3), 2, oversample=-2), "oversample must be an int >= 0, got -2"),
        (
            lambda: whitened_svd(torch.ones(4, 3), 2, scale=torch.ones(3), whitening=torch.eye(3)),
            "at most one input-side factor",
        ),
        (
            lambda: whitened_svd(torch.ones(4, 3), 2, rows=torch.ones(3)),
            "rows must have shape (4,) to match W's 4 rows",
        ),
        (lambda: whitened_svd(torch.ones(4, 3), 2, scale=torch.ones(4)), "scale must have shape (3,)"),
        (lambda: whitened_svd(torch.ones(4, 3), 2, scale=-torch.ones(3)), "scale must be strictly positive"),
        (lambda: whitened_svd(torch.ones(4, 3), 2, whitening=torch.eye(4)), "whitening must have shape (3, 3)"),
        (lambda: whitening_factor(torch.ones(3, 4)), "gram must be square, got shape (3, 4)"),
        (lambda: whitening_factor(torch.eye(3), damping=-0.1), "damping must be a relative tolerance in [0, 1)"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_input_is_not_modified():
    W = torch.randn(10, 8, generator=_gen(16))
    before = W.clone()
    truncated_svd(W, 3)
    randomized_svd(W, 3)
    whitened_svd(W, 3, scale=torch.ones(8))
    assert torch.equal(W, before)


@pytest.mark.parametrize("shape, keep", [((40, 30), 0.5), ((17, 64), 0.3), ((8, 8), 0.99)])
def test_fraction_rank_counts_what_num_params_counts(shape, keep):
    """A float rank keeps at most that fraction of m*n stored numbers (U, S, Vh), and the next rank would not."""
    W = torch.randn(*shape, dtype=torch.float64, generator=_gen(11))
    f = truncated_svd(W, keep)
    m, n = shape
    assert f.num_params == sum(t.numel() for t in (f.U, f.S, f.Vh)) <= keep * m * n
    assert (f.rank + 1) * (m + n + 1) > keep * m * n or f.rank == min(shape)
