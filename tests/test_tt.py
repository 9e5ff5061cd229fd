"""Tests for rankwise.formats.tt: TT-SVD, TT-rounding and TT-matrices (Oseledets 2011)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from rankwise.formats.tt import TT, TTMatrix, tt_matrix, tt_round, tt_svd


def random_tt(shape, ranks, seed=0, dtype=torch.float64) -> TT:
    g = torch.Generator().manual_seed(seed)
    full = (1, *ranks, 1)
    return TT(tuple(torch.randn(full[k], n, full[k + 1], generator=g, dtype=dtype) for k, n in enumerate(shape)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def hilbert(shape) -> torch.Tensor:
    """1 / (1 + i_1 + ... + i_d): smooth, with fast-decaying TT spectra."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return 1.0 / (1.0 + sum(grids))


def unfolding_tail_sq(x: torch.Tensor, k: int, r: int) -> float:
    """Squared norm of the singular values beyond r of the k-th unfolding (n_1...n_k) x (rest)."""
    s = torch.linalg.svdvals(x.reshape(math.prod(x.shape[: k + 1]), -1))
    return float((s[r:] ** 2).sum())


SHAPE, RANKS = (3, 4, 5, 6), (2, 3, 4)


def test_exact_rank_recovery_float64():
    x = random_tt(SHAPE, RANKS).to_dense()
    by_rank = tt_svd(x, RANKS)
    assert by_rank.ranks == RANKS
    assert rel_err(by_rank.to_dense(), x) < 1e-10
    by_eps = tt_svd(x, eps=1e-10)
    assert by_eps.ranks == RANKS  # the minimal TT ranks are found from the tolerance alone
    assert rel_err(by_eps.to_dense(), x) < 1e-10
    full = tt_svd(x)
    assert full.ranks == (3, 12, 6)
    assert rel_err(full.to_dense(), x) < 1e-10


@pytest.mark.parametrize("eps", [0.3, 1e-2, 1e-4, 1e-7])
def test_eps_error_bound(eps):
    x = hilbert((6, 7, 8, 9))
    d = x.ndim
    tt = tt_svd(x, eps=eps)
    err = float((tt.to_dense() - x).norm())
    # Oseledets' convention: per-step threshold delta = eps / sqrt(d-1), total error <= sqrt(d-1) delta ||x||
    delta = eps / math.sqrt(d - 1)
    assert err <= math.sqrt(d - 1) * delta * float(x.norm()) * (1 + 1e-12)
    # the step-k matrix is a projection of the k-th unfolding of x, so its tails are no larger: no bond
    # keeps more than the smallest rank whose tail of the original unfolding is within delta ||x||
    threshold_sq = (delta * float(x.norm())) ** 2
    for k, r in enumerate(tt.ranks):
        s_sq = torch.linalg.svdvals(x.reshape(math.prod(x.shape[: k + 1]), -1)) ** 2
        tails = torch.flip(torch.cumsum(torch.flip(s_sq, [0]), 0), [0])  # tails[q] = sum_{i >= q} s_i^2
        smallest = (
            max(1, int(torch.nonzero(tails <= threshold_sq)[0])) if bool((tails <= threshold_sq).any()) else len(s_sq)
        )
        assert r <= smallest


def test_eps_and_rank_take_the_smaller_rank():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=torch.float64)
    by_rank = tt_svd(x, 3)
    both = tt_svd(x, 3, eps=0.0)  # a zero tolerance keeps everything of a generic tensor: the rank decides
    assert both.ranks == by_rank.ranks == (3, 3, 3)
    assert float((both.to_dense() - x).norm()) == pytest.approx(float((by_rank.to_dense() - x).norm()), rel=1e-10)
    free = tt_svd(x, eps=0.9)
    loose = tt_svd(x, max(free.ranks) + 1, eps=0.9)  # a cap above every tolerance rank changes nothing
    assert loose.ranks == free.ranks and torch.equal(loose.to_dense(), free.to_dense())
    tight = tt_svd(x, min(free.ranks) - 1, eps=0.9)  # a cap below the tolerance ranks is the limit
    assert max(tight.ranks) == min(free.ranks) - 1


@pytest.mark.parametrize("rank", [1, 2, 5, (2, 7, 3)])
def test_rank_truncation_obeys_oseledets_theorem(rank):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=torch.float64)
    tt = tt_svd(x, rank)
    err_sq = float(((tt.to_dense() - x) ** 2).sum())
    bound_sq = sum(unfolding_tail_sq(x, k, r) for k, r in enumerate(tt.ranks))
    assert err_sq <= bound_sq * (1 + 1e-10)
    assert err_sq > 0


def test_cores_left_orthogonal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 6, 3, 2, generator=g, dtype=torch.float64)
    for rank in (None, 3, (2, 4, 3, 2)):
        tt = tt_svd(x, rank)
        for core in tt.cores[:-1]:
            M = core.reshape(-1, core.shape[2])
            torch.testing.assert_close(M.T @ M, torch.eye(M.shape[1], dtype=M.dtype), atol=1e-12, rtol=0)
        # the last core carries the norm of the approximation
        assert float(tt.cores[-1].norm()) == pytest.approx(float(tt.to_dense().norm()), rel=1e-12)


def tt_sum(a: TT, b: TT) -> TT:
    """a + b with block-diagonal cores (ranks add up)."""
    d = len(a.cores)
    cores = []
    for k, (ca, cb) in enumerate(zip(a.cores, b.cores)):
        if k == 0:
            cores.append(torch.cat([ca, cb], dim=2))
        elif k == d - 1:
            cores.append(torch.cat([ca, cb], dim=0))
        else:
            z = torch.zeros(ca.shape[0] + cb.shape[0], ca.shape[1], ca.shape[2] + cb.shape[2], dtype=ca.dtype)
            z[: ca.shape[0], :, : ca.shape[2]] = ca
            z[ca.shape[0] :, :, ca.shape[2] :] = cb
            cores.append(z)
    return TT(tuple(cores))


def test_round_recovers_minimal_ranks_of_inflated_tt():
    base = random_tt(SHAPE, RANKS, seed=5)
    x = base.to_dense()
    half = TT((base.cores[0] * 0.25, *base.cores[1:]))
    inflated = tt_sum(tt_sum(half, half), tt_sum(half, half))  # 4 * x/4, ranks 4x too large
    assert inflated.ranks == tuple(4 * r for r in RANKS)
    assert rel_err(inflated.to_dense(), x) < 1e-12
    rounded = tt_round(inflated, eps=1e-10)
    assert rounded.ranks == RANKS
    assert rel_err(rounded.to_dense(), x) < 1e-10
    by_rank = tt_round(inflated, RANKS)
    assert by_rank.ranks == RANKS and rel_err(by_rank.to_dense(), x) < 1e-10
    for core in rounded.cores[:-1]:
        M = core.reshape(-1, core.shape[2])
        torch.testing.assert_close(M.T @ M, torch.eye(M.shape[1], dtype=M.dtype), atol=1e-12, rtol=0)


def test_round_error_bound_and_ranks_never_grow():
    tt = tt_svd(hilbert((6, 7, 8, 9)))
    x = tt.to_dense()
    for eps in (1e-2, 1e-5):
        r = tt_round(tt, eps=eps)
        assert float((r.to_dense() - x).norm()) <= eps * float(x.norm()) * (1 + 1e-12)
    small = tt_round(tt, 2)
    assert small.ranks == (2, 2, 2)
    assert tt_round(small, 5).ranks == (2, 2, 2)


def test_input_unchanged_and_bit_identical():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 6, 7, generator=g)
    before = x.clone()
    a, b = tt_svd(x, 4), tt_svd(x.clone(), 4)
    assert torch.equal(x, before)
    assert all(torch.equal(ca, cb) for ca, cb in zip(a.cores, b.cores))
    ra, rb = tt_round(a, 2), tt_round(b, 2)
    assert all(torch.equal(ca, cb) for ca, cb in zip(ra.cores, rb.cores))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_float32(dtype):
    x = random_tt(SHAPE, RANKS, seed=4, dtype=torch.float32).to_dense()
    rounded = x.to(dtype).float()
    tt = tt_svd(x.to(dtype), RANKS)
    assert all(c.dtype == torch.float32 for c in tt.cores)
    # x has TT ranks RANKS, so the best approximation of the rounded input is within its rounding error;
    # TT-SVD is quasi-optimal by sqrt(d-1), plus float32 arithmetic
    bound = math.sqrt(len(SHAPE) - 1) * rel_err(rounded, x) + 1e-5
    assert rel_err(tt.to_dense(), rounded) < bound


def test_int_rank_is_clamped_per_bond_and_float_rank_is_a_budget():
    x = torch.randn((4,) * 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert tt_svd(x, 8).ranks == (4, 8, 8, 4)
    assert tt_svd(x, 16).ranks == (4, 16, 16, 4)
    tt = tt_svd(x, 0.25)
    assert tt.num_params <= 0.25 * x.numel()
    R = max(tt.ranks)
    bigger = tuple(min(R + 1, b) for b in (4, 16, 16, 4))
    assert sum(a * 4 * b for a, b in zip((1, *bigger), (*bigger, 1))) > 0.25 * x.numel()


@pytest.fixture
def tensorly_numpy():
    tl = pytest.importorskip("tensorly")
    previous = tl.get_backend()
    tl.set_backend("numpy")
    yield tl
    tl.set_backend(previous)


@pytest.mark.parametrize("shape,rank", [((4, 5, 6, 7), 3), ((3, 3, 3, 3, 3, 3), 5), ((8, 6, 10), 4)])
def test_error_at_most_tensorly(tensorly_numpy, shape, rank):
    from tensorly.decomposition import tensor_train

    tl = tensorly_numpy
    g = torch.Generator().manual_seed(7)
    x = random_tt(shape, [rank + 1] * (len(shape) - 1), seed=7).to_dense()
    x = x / x.norm() + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(x.numel())
    ours = tt_svd(x, rank)
    ref = tensor_train(x.numpy(), rank)
    ref_dense = torch.from_numpy(np.asarray(tl.tt_to_tensor(ref)))
    assert ours.ranks == tuple(int(f.shape[2]) for f in ref[:-1])
    assert rel_err(ours.to_dense(), x) <= rel_err(ref_dense, x) * (1 + 1e-3)


def test_tt_matrix_layout_matches_kron():
    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    assert torch.equal(TTMatrix((A[None, :, :, None], B[None, :, :, None])).to_dense(), torch.kron(A, B))
    tm = tt_matrix(torch.kron(A, B), (3, 2), (4, 5), 1)
    assert tm.ranks == (1,) and tm.shape == (6, 20)
    assert rel_err(tm.to_dense(), torch.kron(A, B)) < 1e-12


def test_tt_matrix_exact_recovery_and_eps():
    g = torch.Generator().manual_seed(9)
    rows, cols, ranks = (2, 3, 4), (3, 2, 2), (2, 3)
    cores = [
        torch.randn(a, m, n, b, generator=g, dtype=torch.float64)
        for a, m, n, b in zip((1, 2, 3), rows, cols, (2, 3, 1))
    ]
    W = TTMatrix(tuple(cores)).to_dense()
    assert W.shape == (24, 12)
    tm = tt_matrix(W, rows, cols, ranks)
    assert tm.ranks == ranks and tm.row_dims == rows and tm.col_dims == cols
    assert [tuple(c.shape) for c in tm.cores] == [(1, 2, 3, 2), (2, 3, 2, 3), (3, 4, 2, 1)]
    assert rel_err(tm.to_dense(), W) < 1e-10
    assert tm.num_params == 1 * 6 * 2 + 2 * 6 * 3 + 3 * 8 * 1
    V = torch.randn(24, 12, generator=g, dtype=torch.float64)
    approx = tt_matrix(V, rows, cols, eps=0.4)
    assert float((approx.to_dense() - V).norm()) <= 0.4 * float(V.norm())


def msg(text: str) -> str:
    return "^" + re.escape(text) + "$"


X = torch.ones(2, 3, 4, dtype=torch.float64)


@pytest.mark.parametrize(
    "call,text",
    [
        (
            lambda: tt_svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])),
            "x contains 1 NaN/Inf entries; only finite values are accepted",
        ),
        (
            lambda: tt_svd(torch.tensor([[1.0, float("inf")], [0.0, 1.0]])),
            "x contains 1 NaN/Inf entries; only finite values are accepted",
        ),
        (lambda: tt_svd(torch.ones(5)), "x must have at least 2 dimensions, got 1 (shape (5,))"),
        (
            lambda: tt_svd(torch.ones(2, 3, dtype=torch.int64)),
            "x must have a floating dtype (float16, bfloat16, float32, float64), got torch.int64",
        ),
        (lambda: tt_svd(X, 0), "rank=0 is out of range; accepted: 1 <= rank <= 4 for this shape"),
        (lambda: tt_svd(X, 5), "rank=5 is out of range; accepted: 1 <= rank <= 4 for this shape"),
        (lambda: tt_svd(X, (2,)), "rank must have d-1 = 2 bond ranks for shape (2, 3, 4), got 1: (2,)"),
        (lambda: tt_svd(X, (3, 4)), "rank[0]=3 is out of range; accepted: 1 <= rank[0] <= 2 for this shape"),
        (
            lambda: tt_svd(X, (1, 4)),
            "rank[1]=4 is not a valid TT rank next to its neighbours; "
            "accepted: rank[1] <= min(r_prev * n_2, n_3 * r_next) = min(3, 4) in rank=(1, 4)",
        ),
        (lambda: tt_svd(X, 1.5), "rank as a float must be a fraction of the dense parameter count in (0, 1], got 1.5"),
        (lambda: tt_svd(X, "2"), "rank must be an int, a tuple of 2 ints, a float in (0, 1] or None, got '2'"),
        (lambda: tt_svd(X, eps=1.0), "eps must be a relative tolerance in [0, 1), got 1.0"),
        (lambda: tt_round(X), "tt must be a rankwise.formats.tt.TT, got Tensor"),
        (
            lambda: tt_round(TT((torch.ones(1, 2, 3), torch.ones(2, 2, 1)))),
            "tt.cores[0] has shape (1, 2, 3); accepted: (1, n, 2) to chain with its neighbours (boundary ranks are 1)",
        ),
        (
            lambda: tt_round(TT((torch.ones(1, 2, 2), torch.ones(2, 2, 1))), eps=2.0),
            "eps must be a relative tolerance in [0, 1), got 2.0",
        ),
        (
            lambda: tt_matrix(torch.ones(6, 8), (2, 3), (2, 2)),
            "row_dims=(2, 3) and col_dims=(2, 2) multiply to (6, 4); accepted: factorizations of W's shape (6, 8)",
        ),
        (
            lambda: tt_matrix(torch.ones(6, 8), (2, 3), (2, 2, 2)),
            "row_dims and col_dims must have the same length, got (2, 3) and (2, 2, 2)",
        ),
        (
            lambda: tt_matrix(torch.ones(6, 8), (6,), (8,)),
            "row_dims must be a tuple of at least 2 positive ints, got (6,)",
        ),
        (lambda: tt_matrix(torch.ones(6, 8), (2, 3), (0, 8)), "col_dims must contain positive ints only, got (0, 8)"),
        (lambda: tt_matrix(torch.ones(2, 3, 4), (2, 3), (2, 2)), "W must have 2 dimensions, got 3 (shape (2, 3, 4))"),
    ],
)
def test_bad_input_raises(call, text):
    with pytest.raises(ValueError, match=msg(text)):
        call()
