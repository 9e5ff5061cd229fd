"""Property-based tests (hypothesis) for the TT, HT and Kronecker formats: shapes, parameter counts, monotone error."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.formats.ht import dimension_tree, ht_svd
from rankwise.formats.kron import kron_decompose
from rankwise.formats.tt import tt_matrix, tt_round, tt_svd

SETTINGS = settings(max_examples=25, deadline=None)
shapes = st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple)


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def errors(x: torch.Tensor, decompose, top: int) -> list[float]:
    return [float((decompose(x, R).to_dense() - x).norm()) for R in range(1, top + 1)]


def non_increasing(errs: list[float], scale: float) -> bool:
    """Each error at most the previous one, up to float64 round-off of the norms."""
    return all(b <= a + 1e-12 * scale for a, b in zip(errs, errs[1:]))


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_tt_shapes_ranks_params_and_monotone_error(shape, seed, data):
    x = randn(shape, seed)
    bounds = [min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1)]
    R = data.draw(st.integers(1, max(bounds)), label="R")
    tt = tt_svd(x, R)
    assert tt.to_dense().shape == x.shape and tt.shape == shape
    assert tt.ranks == tuple(min(R, b) for b in bounds)
    full = (1, *tt.ranks, 1)
    assert tt.num_params == sum(full[k] * n * full[k + 1] for k, n in enumerate(shape))
    assert [tuple(c.shape) for c in tt.cores] == [(full[k], n, full[k + 1]) for k, n in enumerate(shape)]
    assert non_increasing(errors(x, tt_svd, max(bounds)), float(x.norm()))
    # rounding to a smaller rank neither grows a rank nor beats the rank cap
    rounded = tt_round(tt, max(1, R - 1))
    assert all(r <= min(t, max(1, R - 1)) for r, t in zip(rounded.ranks, tt.ranks))
    assert rounded.to_dense().shape == x.shape


@SETTINGS
@given(
    rows=st.lists(st.integers(1, 3), min_size=2, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_tt_matrix_shapes_and_params(rows, seed, data):
    cols = data.draw(st.lists(st.integers(1, 3), min_size=len(rows), max_size=len(rows)).map(tuple), label="cols")
    W = randn((math.prod(rows), math.prod(cols)), seed)
    sizes = [m * n for m, n in zip(rows, cols)]
    bounds = [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]
    R = data.draw(st.integers(1, max(bounds)), label="R")
    tm = tt_matrix(W, rows, cols, R)
    assert tm.to_dense().shape == W.shape == tm.shape
    full = (1, *tm.ranks, 1)
    assert tm.ranks == tuple(min(R, b) for b in bounds)
    assert tm.num_params == sum(full[k] * m * n * full[k + 1] for k, (m, n) in enumerate(zip(rows, cols)))
    errs = [float((tt_matrix(W, rows, cols, r).to_dense() - W).norm()) for r in range(1, max(bounds) + 1)]
    assert non_increasing(errs, float(W.norm()))
    assert errs[-1] < 1e-10 * float(W.norm())


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple), seed=st.integers(0, 2**16), data=st.data())
def test_ht_shapes_ranks_params_and_monotone_error(shape, seed, data):
    x = randn(shape, seed)
    tree = dimension_tree(len(shape))
    total = math.prod(shape)
    bounds = [min(math.prod(shape[m] for m in dims), total // math.prod(shape[m] for m in dims)) for dims, _ in tree]
    R = data.draw(st.integers(1, max(bounds[1:])), label="R")
    ht = ht_svd(x, R)
    assert ht.to_dense().shape == x.shape
    assert ht.ranks == (1, *(min(R, b) for b in bounds[1:]))
    k = ht.ranks
    expected = sum(
        shape[dims[0]] * k[i] if not kids else k[kids[0]] * k[kids[1]] * k[i] for i, (dims, kids) in enumerate(tree)
    )
    assert ht.num_params == expected
    errs = errors(x, ht_svd, max(bounds[1:]))
    assert non_increasing(errs, float(x.norm()))
    assert errs[-1] < 1e-10 * float(x.norm())


@SETTINGS
@given(dims=st.lists(st.integers(1, 4), min_size=4, max_size=4), seed=st.integers(0, 2**16), data=st.data())
def test_kron_shapes_params_and_monotone_error(dims, seed, data):
    m1, n1, m2, n2 = dims
    W = randn((m1 * m2, n1 * n2), seed)
    full = min(m1 * n1, m2 * n2)
    r = data.draw(st.integers(1, full), label="r")
    k = kron_decompose(W, (m1, n1), (m2, n2), r)
    assert k.to_dense().shape == W.shape
    assert k.A.shape == (r, m1, n1) and k.B.shape == (r, m2, n2)
    assert k.num_params == r * (m1 * n1 + m2 * n2)
    errs = [float((kron_decompose(W, (m1, n1), (m2, n2), q).to_dense() - W).norm()) for q in range(1, full + 1)]
    assert non_increasing(errs, float(W.norm()))
    assert errs[-1] < 1e-10 * float(W.norm())
