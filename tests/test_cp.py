"""Tests of rankwise.formats.cp: CP-ALS recovery, monotone error, normalisation, determinism, bad input."""

import math

import numpy as np
import pytest
import torch

from rankwise.formats.cp import CP, cp_als, cp_rank


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cp_tensor(shape, rank, seed=0):
    g = _gen(seed)
    factors = [torch.randn(n, rank, dtype=torch.float64, generator=g) for n in shape]
    letters = "abcd"[: len(shape)]
    return torch.einsum(",".join(f"{c}z" for c in letters) + "->" + letters, *factors)


def _noisy(shape, rank, seed, noise=0.3):
    x = _cp_tensor(shape, rank, seed)
    return x + noise * float(x.norm()) / math.sqrt(x.numel()) * torch.randn(
        *shape, dtype=torch.float64, generator=_gen(seed + 50)
    )


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("shape", [(12, 11, 10), (7, 6, 5, 4)])
def test_exact_rank_recovery(init, shape):
    x = _cp_tensor(shape, 4, seed=1)
    c = cp_als(x, 4, init=init, n_iter_max=300, tol=0)
    assert c.rank == 4 and c.shape == shape and c.num_params == 4 * (1 + sum(shape))
    assert _rel(c.to_dense(), x) < 1e-6


def test_matrix_case_recovers_low_rank_matrix():
    x = _cp_tensor((9, 8), 3, seed=2)
    assert _rel(cp_als(x, 3, n_iter_max=50).to_dense(), x) < 1e-6


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("rank", [3, 5, 8])
def test_error_never_rises_and_is_the_true_error(init, rank):
    x = _noisy((12, 11, 10), 4, seed=0)
    c = cp_als(x, rank, init=init, n_iter_max=60, tol=0, seed=3)
    assert len(c.errors) == 60
    # err^2 is a difference of O(||X||^2) terms (norm identity): float64 rounding is ~1e-15 once converged
    assert all(b <= a + 1e-12 for a, b in zip(c.errors, c.errors[1:]))
    assert c.errors[-1] < c.errors[0]
    assert c.errors[-1] == pytest.approx(_rel(c.to_dense(), x), rel=1e-9)


def test_columns_unit_norm_and_weights_sorted():
    c = cp_als(_noisy((10, 9, 8), 3, seed=4), 5, n_iter_max=20)
    for f in c.factors:
        assert float((f.norm(dim=0) - 1).abs().max()) < 1e-12
    assert bool((c.weights[:-1] >= c.weights[1:]).all()) and bool((c.weights > 0).all())


def test_stops_when_error_change_below_tol():
    x = _noisy((10, 9, 8), 3, seed=5)
    c = cp_als(x, 3, n_iter_max=500, tol=1e-6)
    assert 2 <= len(c.errors) < 500
    assert c.errors[-2] - c.errors[-1] < 1e-6
    assert all(a - b >= 1e-6 for a, b in zip(c.errors[:-2], c.errors[1:-1]))


def test_same_seed_bit_identical_different_seed_differs():
    x = _noisy((8, 7, 6), 3, seed=6)
    a, b = cp_als(x, 3, init="random", seed=7, n_iter_max=10), cp_als(x, 3, init="random", seed=7, n_iter_max=10)
    other = cp_als(x, 3, init="random", seed=8, n_iter_max=10)
    assert torch.equal(a.weights, b.weights) and all(torch.equal(p, q) for p, q in zip(a.factors, b.factors))
    assert a.errors == b.errors
    assert not torch.equal(a.factors[0], other.factors[0])


def test_svd_init_with_rank_above_a_mode_size():
    x = _noisy((3, 8, 9), 2, seed=9)
    c = cp_als(x, 5, n_iter_max=30)  # mode 0 has only 3 singular vectors; the other columns are random
    assert c.factors[0].shape == (3, 5)
    assert c.errors[-1] < c.errors[0]


def test_matches_or_beats_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    x = _noisy((14, 12, 10), 5, seed=10, noise=0.2)
    ours = cp_als(x, 5, init="svd", n_iter_max=50, tol=0)
    weights, factors = parafac(x.numpy(), 5, n_iter_max=50, init="svd", tol=0)
    theirs = float(np.linalg.norm(tl.cp_to_tensor((weights, factors)) - x.numpy()) / np.linalg.norm(x.numpy()))
    assert _rel(ours.to_dense(), x) <= theirs * (1 + 1e-3)


def test_fraction_rank_is_largest_within_budget():
    shape = (10, 12, 14)
    r = cp_rank(shape, 0.05)
    assert r * (1 + 36) <= 0.05 * 1680 < (r + 1) * (1 + 36)
    assert cp_als(torch.randn(*shape, generator=_gen(11)), 0.05, n_iter_max=2).rank == r


def test_dtypes_follow_the_input_and_input_unchanged():
    x = torch.randn(6, 5, 4, generator=_gen(12))
    before = x.clone()
    assert cp_als(x, 2, n_iter_max=3).weights.dtype == torch.float32
    c = cp_als(x.to(torch.float16), 2, n_iter_max=3)
    assert isinstance(c, CP) and c.factors[0].dtype == torch.float32
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cp_als(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]), 1), "x contains 1 NaN/Inf entries"),
        (lambda: cp_als(torch.ones(3, 3, dtype=torch.int64), 1), "x must have a floating dtype"),
        (lambda: cp_als(torch.ones(4), 1), "x must have at least 2 dimensions, got 1"),
        (lambda: cp_als(torch.ones(3, 4, 5), 0), "rank=0 is out of range; accepted: 1 <= rank <= 12"),
        (lambda: cp_als(torch.ones(3, 4, 5), 13), "rank=13 is out of range; accepted: 1 <= rank <= 12"),
        (lambda: cp_als(torch.ones(3, 4, 5), 2.0), "rank as a float must be a fraction"),
        (lambda: cp_als(torch.ones(3, 4, 5), (2, 2)), "rank must be an int in [1, 12], got (2, 2)"),
        (lambda: cp_als(torch.ones(3, 4, 5), 2, init="hosvd"), "init must be 'svd' or 'random', got 'hosvd'"),
        (lambda: cp_als(torch.ones(3, 4, 5), 2, n_iter_max=0), "n_iter_max must be an int >= 1, got 0"),
        (lambda: cp_als(torch.ones(3, 4, 5), 2, tol=-1.0), "tol must be a float >= 0, got -1.0"),
        (lambda: cp_als(torch.ones(3, 4, 5), 2, seed=1.5), "seed must be an int, got 1.5"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
