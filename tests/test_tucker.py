"""Tests of rankwise.formats.tucker: HOSVD, HOOI and partial (Tucker-2) decompositions."""

import math

import numpy as np
import pytest
import torch

from rankwise.formats._ops import multi_mode_dot
from rankwise.formats.tucker import tucker_hooi, tucker_hosvd, tucker_num_params, tucker_ranks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact_tucker(shape, ranks, modes, seed=0):
    g = _gen(seed)
    core_shape = list(shape)
    for r, m in zip(ranks, modes):
        core_shape[m] = r
    core = torch.randn(*core_shape, dtype=torch.float64, generator=g)
    factors = [torch.randn(shape[m], r, dtype=torch.float64, generator=g) for r, m in zip(ranks, modes)]
    return multi_mode_dot(core, factors, modes)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _noisy(shape, ranks, seed, noise=0.3):
    x = _exact_tucker(shape, ranks, range(len(shape)), seed)
    return x + noise * float(x.norm()) / math.sqrt(x.numel()) * torch.randn(
        *shape, dtype=torch.float64, generator=_gen(seed + 100)
    )


@pytest.mark.parametrize("method", [tucker_hosvd, tucker_hooi])
def test_exact_rank_recovery(method):
    x = _exact_tucker((9, 10, 11), (3, 4, 5), (0, 1, 2))
    t = method(x, (3, 4, 5))
    assert t.ranks == (3, 4, 5) and t.shape == (9, 10, 11) and t.core.shape == (3, 4, 5)
    assert _rel(t.to_dense(), x) < 1e-10


def test_tucker2_on_conv_channel_modes_exact_recovery():
    x = _exact_tucker((12, 10, 3, 3), (4, 5), (0, 1), seed=1)
    t = tucker_hooi(x, (4, 5), modes=(0, 1))
    assert t.modes == (0, 1) and t.core.shape == (4, 5, 3, 3)
    assert t.num_params == 4 * 5 * 9 + 12 * 4 + 10 * 5
    assert _rel(t.to_dense(), x) < 1e-10


@pytest.mark.parametrize("modes", [None, (1, 2)])
def test_factors_are_orthonormal(modes):
    x = torch.randn(8, 9, 10, dtype=torch.float64, generator=_gen(2))
    for t in (tucker_hosvd(x, 3, modes=modes), tucker_hooi(x, 3, modes=modes, n_iter_max=5)):
        for f in t.factors:
            assert float((f.T @ f - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-12


def test_hooi_error_not_above_hosvd_and_non_increasing():
    x = _noisy((12, 11, 10), (4, 4, 4), seed=3, noise=1.0)
    hosvd = tucker_hosvd(x, (3, 3, 3))
    hooi = tucker_hooi(x, (3, 3, 3), n_iter_max=20, tol=0)
    assert len(hooi.errors) == 21 and hooi.errors[0] == pytest.approx(hosvd.errors[0], rel=1e-12)
    assert _rel(hooi.to_dense(), x) <= _rel(hosvd.to_dense(), x)
    assert all(b <= a + 1e-14 for a, b in zip(hooi.errors, hooi.errors[1:]))
    # the recorded error (norm identity) is the true one
    assert hooi.errors[-1] == pytest.approx(_rel(hooi.to_dense(), x), rel=1e-10)


def test_rank_above_product_of_other_ranks_gets_a_completed_orthonormal_basis():
    # mode 2's projected unfolding has only 1 * 1 columns: its extra basis vectors carry no energy
    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=_gen(12))
    t = tucker_hooi(x, (1, 1, 3), n_iter_max=4)
    f = t.factors[2]
    assert f.shape == (6, 3)
    assert float((f.T @ f - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-12
    assert t.errors[-1] == pytest.approx(_rel(t.to_dense(), x), rel=1e-10)
    assert t.errors[-1] <= t.errors[0]


def test_hooi_stops_when_error_change_below_tol():
    x = _noisy((10, 10, 10), (3, 3, 3), seed=4)
    t = tucker_hooi(x, 3, n_iter_max=50, tol=1e-2)  # the first sweep already changes the error by < 1e-2
    assert len(t.errors) == 2
    assert t.errors[0] - t.errors[1] < 1e-2
    assert len(tucker_hooi(x, 3, n_iter_max=0).errors) == 1


def test_matches_or_beats_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker, tucker

    x = _noisy((14, 12, 10), (5, 4, 3), seed=5, noise=0.5)
    ours = tucker_hooi(x, (4, 4, 3), n_iter_max=10, tol=0)
    core, factors = tucker(x.numpy(), rank=[4, 4, 3], n_iter_max=10, tol=0, init="svd")
    theirs = float(np.linalg.norm(tl.tucker_to_tensor((core, factors)) - x.numpy()) / np.linalg.norm(x.numpy()))
    assert _rel(ours.to_dense(), x) <= theirs * (1 + 1e-3)

    k = torch.randn(16, 12, 3, 3, dtype=torch.float64, generator=_gen(6))
    ours = tucker_hooi(k, (6, 5), modes=(0, 1), n_iter_max=10, tol=0)
    (core, factors), _ = partial_tucker(k.numpy(), rank=[6, 5], modes=[0, 1], n_iter_max=10, tol=0, init="svd")
    dense = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    theirs = float(np.linalg.norm(dense - k.numpy()) / np.linalg.norm(k.numpy()))
    assert _rel(ours.to_dense(), k) <= theirs * (1 + 1e-3)


def test_fraction_rank_uses_uniform_ratio_within_budget():
    shape = (20, 10, 30)
    ranks = tucker_ranks(shape, 0.1, (0, 1, 2))
    budget = 0.1 * 20 * 10 * 30
    assert tucker_num_params(shape, ranks, (0, 1, 2)) <= budget
    # same ratio of rank to size on every mode (rounded), and one step larger would exceed the budget
    assert ranks == (6, 3, 9)
    assert tucker_num_params(shape, (7, 3, 10), (0, 1, 2)) > budget
    x = torch.randn(*shape, generator=_gen(7))
    assert tucker_hosvd(x, 0.1).ranks == ranks


def test_dtypes_follow_the_input():
    x = torch.randn(6, 7, 8, generator=_gen(8))
    assert tucker_hooi(x, 2, n_iter_max=2).core.dtype == torch.float32
    half = tucker_hosvd(x.to(torch.bfloat16), 2)
    assert half.core.dtype == torch.float32 and half.factors[0].dtype == torch.float32


def test_input_is_not_modified():
    x = torch.randn(6, 7, 8, generator=_gen(9))
    before = x.clone()
    tucker_hooi(x, 3, n_iter_max=3)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tucker_hosvd(torch.full((3, 3, 3), float("inf")), 1), "x contains 27 NaN/Inf entries"),
        (lambda: tucker_hosvd(torch.ones(3, 3, 3, dtype=torch.int32), 1), "x must have a floating dtype"),
        (lambda: tucker_hosvd(torch.ones(5), 1), "x must have at least 2 dimensions, got 1"),
        (lambda: tucker_hosvd(torch.ones(3, 4, 5), 0), "rank=0 is out of range; accepted: 1 <= rank <= 3"),
        (
            lambda: tucker_hosvd(torch.ones(3, 4, 5), (2, 5, 2)),
            "rank[1]=5 is out of range; accepted: 1 <= rank[1] <= 4",
        ),
        (lambda: tucker_hosvd(torch.ones(3, 4, 5), (2, 2)), "rank must have 3 entries (one per mode), got 2"),
        (lambda: tucker_hosvd(torch.ones(3, 4, 5), 0.0), "rank as a float must be a fraction"),
        (
            lambda: tucker_hosvd(torch.ones(3, 4, 5), "2"),
            "rank must be an int, a tuple of 3 ints, a float in (0, 1] or None, got '2'",
        ),
        (
            lambda: tucker_hosvd(torch.ones(3, 4, 5), 2, modes=(0, 0)),
            "modes must be a non-empty sequence of distinct ints in [0, 2], got (0, 0)",
        ),
        (
            lambda: tucker_hosvd(torch.ones(3, 4, 5), 2, modes=(3,)),
            "modes must be a non-empty sequence of distinct ints in [0, 2], got (3,)",
        ),
        (
            lambda: tucker_hosvd(torch.ones(3, 4, 5), 2, modes=1),
            "modes must be a sequence of distinct ints in [0, 2], got 1",
        ),
        (lambda: tucker_hooi(torch.ones(3, 4, 5), 2, n_iter_max=-1), "n_iter_max must be an int >= 0, got -1"),
        (lambda: tucker_hooi(torch.ones(3, 4, 5), 2, tol=-1e-3), "tol must be a float >= 0, got -0.001"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
