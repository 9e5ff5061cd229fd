"""Property-based tests (hypothesis) of the SVD, Tucker and CP formats over random shapes and ranks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.formats.cp import cp_als
from rankwise.formats.svd import randomized_svd, truncated_svd
from rankwise.formats.tucker import tucker_hooi, tucker_hosvd, tucker_num_params, tucker_ranks

FEW = settings(max_examples=15, deadline=None, derandomize=True)


def _tensor(shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _err(f, x) -> float:
    return float((f.to_dense() - x).norm())


def _tensorly_cp(weights, factors) -> torch.Tensor:
    """``sum_r weights[r] * outer(factors[0][:, r], factors[1][:, r], ...)`` computed by TensorLy."""
    tensorly = pytest.importorskip("tensorly")
    dense = tensorly.cp_to_tensor((weights.numpy(), [f.numpy() for f in factors]))
    return torch.from_numpy(dense)


@FEW
@given(m=st.integers(1, 12), n=st.integers(1, 12), data=st.data(), seed=st.integers(0, 2**16))
def test_svd_shapes_params_and_error_non_increasing_in_rank(m, n, data, seed):
    x = _tensor((m, n), seed)
    r = data.draw(st.integers(1, min(m, n)))
    f = truncated_svd(x, r)
    assert f.to_dense().shape == (m, n)
    assert f.num_params == sum(t.numel() for t in (f.U, f.S, f.Vh))  # every stored number, counted
    # a rank-r matrix is a 2-way CP tensor: TensorLy's reconstruction is an independent reference
    torch.testing.assert_close(f.to_dense(), _tensorly_cp(f.S, (f.U, f.Vh.T)), rtol=0, atol=1e-12)
    errors = [_err(truncated_svd(x, k), x) for k in range(1, min(m, n) + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10 * max(float(x.norm()), 1.0)
    g = randomized_svd(x, r, seed=seed)
    assert g.to_dense().shape == (m, n) and g.rank == r
    assert _err(g, x) >= errors[r - 1] - 1e-10  # Eckart–Young: nothing beats the truncated SVD


@FEW
@given(shape=st.lists(st.integers(2, 6), min_size=2, max_size=4), data=st.data(), seed=st.integers(0, 2**16))
def test_tucker_shapes_params_and_hosvd_error_non_increasing_in_rank(shape, data, seed):
    x = _tensor(shape, seed)
    n = len(shape)
    modes = tuple(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))))
    bounds = [min(shape[m], math.prod(shape) // shape[m]) for m in modes]
    ranks = tuple(data.draw(st.integers(1, b)) for b in bounds)
    t = tucker_hooi(x, ranks, modes=modes, n_iter_max=3)
    assert t.to_dense().shape == tuple(shape) and t.ranks == ranks and t.modes == modes
    assert t.num_params == tucker_num_params(shape, ranks, modes)
    assert t.num_params == t.core.numel() + sum(shape[m] * r for m, r in zip(modes, ranks))
    # the leading singular subspaces are nested, so a larger rank on every mode never does worse
    bigger = tuple(min(r + 1, b) for r, b in zip(ranks, bounds))
    assert _err(tucker_hosvd(x, bigger, modes=modes), x) <= _err(tucker_hosvd(x, ranks, modes=modes), x) + 1e-12
    assert _err(t, x) <= _err(tucker_hosvd(x, ranks, modes=modes), x) + 1e-12


@FEW
@given(shape=st.lists(st.integers(2, 8), min_size=2, max_size=4), frac=st.floats(0.01, 1.0))
def test_tucker_fraction_rank_respects_budget(shape, frac):
    modes = tuple(range(len(shape)))
    ranks = tucker_ranks(shape, frac, modes)
    assert all(1 <= r <= s for r, s in zip(ranks, shape))
    if tucker_num_params(shape, (1,) * len(shape), modes) <= frac * math.prod(shape):
        assert tucker_num_params(shape, ranks, modes) <= frac * math.prod(shape)


@FEW
@given(shape=st.lists(st.integers(2, 6), min_size=2, max_size=4), data=st.data(), seed=st.integers(0, 2**16))
def test_cp_shapes_params_and_monotone_errors(shape, data, seed):
    x = _tensor(shape, seed)
    r = data.draw(st.integers(1, min(5, math.prod(shape) // max(shape))))
    c = cp_als(x, r, init=data.draw(st.sampled_from(["svd", "random"])), n_iter_max=15, tol=0, seed=seed)
    assert c.to_dense().shape == tuple(shape) and c.rank == r
    assert all(f.shape == (s, r) for f, s in zip(c.factors, shape))
    assert c.num_params == c.weights.numel() + sum(f.numel() for f in c.factors)  # every stored number
    torch.testing.assert_close(c.to_dense(), _tensorly_cp(c.weights, c.factors), rtol=0, atol=1e-10)
    # Only rounding may raise the error: exact fits of small tensors can have components ~40x ||X|| that
    # cancel, leaving ~1e-12 of noise in the measured relative error.
    assert all(b <= a + 1e-10 for a, b in zip(c.errors, c.errors[1:]))
    assert c.errors[-1] == pytest.approx(_err(c, x) / float(x.norm()), abs=1e-7)
