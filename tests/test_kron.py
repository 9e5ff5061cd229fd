"""Tests for rankwise.formats.kron: nearest sum of Kronecker products (Van Loan & Pitsianis 1993)."""

from __future__ import annotations

import re

import pytest
import torch

from rankwise.formats.kron import Kronecker, kron_decompose


def kron_sum(r, a_shape, b_shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, *a_shape, generator=g, dtype=dtype)
    B = torch.randn(r, *b_shape, generator=g, dtype=dtype)
    return sum(torch.kron(A[i], B[i]) for i in range(r)), A, B


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_to_dense_is_the_sum_of_torch_kron():
    W, A, B = kron_sum(3, (4, 5), (6, 2))
    k = Kronecker(A, B)
    assert k.shape == (24, 10) and k.rank == 3 and k.ranks == (3,)
    assert k.num_params == 3 * (4 * 5 + 6 * 2)
    torch.testing.assert_close(k.to_dense(), W, atol=1e-13, rtol=0)


@pytest.mark.parametrize("r,a_shape,b_shape", [(1, (3, 4), (5, 2)), (3, (4, 5), (6, 2)), (2, (2, 7), (3, 3))])
def test_exact_rank_recovery_float64(r, a_shape, b_shape):
    W, _, _ = kron_sum(r, a_shape, b_shape, seed=r)
    k = kron_decompose(W, a_shape, b_shape, r)
    assert k.A.shape == (r, *a_shape) and k.B.shape == (r, *b_shape)
    assert rel_err(k.to_dense(), W) < 1e-10
    assert kron_decompose(W, a_shape, b_shape, eps=1e-10).rank == r  # the Kronecker rank from the tolerance


def test_error_is_the_discarded_spectrum_and_optimal():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 15, generator=g, dtype=torch.float64)
    full = kron_decompose(W, (3, 5), (4, 3))
    assert full.rank == 12 and rel_err(full.to_dense(), W) < 1e-12
    # the rearrangement is an isometry: its singular values carry the whole norm
    assert float(full.spectrum.norm()) == pytest.approx(float(W.norm()), rel=1e-12)
    previous = float("inf")
    for r in range(1, 13):
        k = kron_decompose(W, (3, 5), (4, 3), r)
        err = float((k.to_dense() - W).norm())
        assert err == pytest.approx(float(k.spectrum[r:].norm()), rel=1e-10, abs=1e-12)
        assert err <= previous
        previous = err
    # no other single Kronecker product does better than the rank-1 optimum
    best = float((kron_decompose(W, (3, 5), (4, 3), 1).to_dense() - W).norm())
    for seed in range(5):
        h = torch.Generator().manual_seed(100 + seed)
        a, b = torch.randn(3, 5, generator=h, dtype=torch.float64), torch.randn(4, 3, generator=h, dtype=torch.float64)
        # the best multiple of a fixed kron(a, b) is its projection
        K = torch.kron(a, b)
        assert float((W - (W * K).sum() / (K * K).sum() * K).norm()) >= best


@pytest.mark.parametrize("eps", [0.9, 0.5, 0.1])
def test_eps_picks_the_smallest_rank(eps):
    W = torch.randn(12, 15, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = kron_decompose(W, (3, 5), (4, 3), eps=eps)
    assert float((k.to_dense() - W).norm()) <= eps * float(W.norm())
    if k.rank > 1:
        assert float(k.spectrum[k.rank - 1 :].norm()) > eps * float(W.norm())
    assert kron_decompose(W, (3, 5), (4, 3), 1, eps=eps).rank == 1


def test_fraction_rank_is_a_parameter_budget():
    W = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k = kron_decompose(W, (4, 4), (4, 4), 0.4)
    assert k.rank == 3  # 3 * 32 = 96 <= 0.4 * 256 = 102.4 < 4 * 32
    assert k.num_params <= 0.4 * W.numel() < (k.rank + 1) * 32


def test_input_unchanged_bit_identical_and_dtypes():
    W = torch.randn(12, 15, generator=torch.Generator().manual_seed(4))
    before = W.clone()
    a, b = kron_decompose(W, (3, 5), (4, 3), 2), kron_decompose(W.clone(), (3, 5), (4, 3), 2)
    assert torch.equal(W, before)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert a.A.dtype == torch.float32
    h = kron_decompose(W.half(), (3, 5), (4, 3), 2)
    assert h.A.dtype == h.B.dtype == torch.float32
    assert rel_err(h.to_dense(), a.to_dense()) < 1e-2


def msg(text: str) -> str:
    return "^" + re.escape(text) + "$"


W0 = torch.ones(6, 8, dtype=torch.float64)


@pytest.mark.parametrize(
    "call,text",
    [
        (
            lambda: kron_decompose(W0, (2, 4), (3, 3)),
            "a_shape=(2, 4) and b_shape=(3, 3) give a (6, 12) Kronecker product; "
            "accepted: shapes with a_shape[0]*b_shape[0] = 6 and a_shape[1]*b_shape[1] = 8 (W's shape)",
        ),
        (
            lambda: kron_decompose(W0, (2, 4, 1), (3, 2)),
            "a_shape must be a pair of positive ints (rows, cols), got (2, 4, 1)",
        ),
        (
            lambda: kron_decompose(W0, (2, 4), (3, 0)),
            "b_shape must be a pair of positive ints (rows, cols), got (3, 0)",
        ),
        (
            lambda: kron_decompose(W0, (2, 4), (3, 2), 0),
            "rank=0 is out of range; accepted: 1 <= rank <= 6 for this shape",
        ),
        (
            lambda: kron_decompose(W0, (2, 4), (3, 2), 7),
            "rank=7 is out of range; accepted: 1 <= rank <= 6 for this shape",
        ),
        (
            lambda: kron_decompose(W0, (2, 4), (3, 2), 2.0),
            "rank as a float must be a fraction of the dense parameter count in (0, 1], got 2.0",
        ),
        (lambda: kron_decompose(W0, (2, 4), (3, 2), eps=1.5), "eps must be a relative tolerance in [0, 1), got 1.5"),
        (
            lambda: kron_decompose(torch.ones(6, 8, 1), (2, 4), (3, 2)),
            "W must have 2 dimensions, got 3 (shape (6, 8, 1))",
        ),
        (
            lambda: kron_decompose(torch.ones(6, 8, dtype=torch.int64), (2, 4), (3, 2)),
            "W must have a floating dtype (float16, bfloat16, float32, float64), got torch.int64",
        ),
        (
            lambda: kron_decompose(W0.clone().fill_(float("nan")), (2, 4), (3, 2)),
            "W contains 48 NaN/Inf entries; only finite values are accepted",
        ),
    ],
)
def test_bad_input_raises(call, text):
    with pytest.raises(ValueError, match=msg(text)):
        call()
