"""The factorization protocol: every registered format speaks the same words; truncation errors are exact."""

import math

import pytest
import torch

from rankwise.formats import (
    FORMATS,
    Factorization,
    can_truncate,
    decompose,
    format_class,
)
from rankwise.formats.tt import tt_round


def _x(shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# the arguments after the tensor that each format's decompose function takes for a small example
CASES = {
    "svd": ((6, 8), (4,), {}),
    "tucker": ((5, 6, 3, 3), ((3, 4),), {"modes": (0, 1)}),
    "cp": ((4, 5, 3), (3,), {}),
    "tt": ((3, 4, 5), (2,), {}),
    "tt_matrix": ((6, 8), ((2, 3), (2, 4), 3), {}),
    "ht": ((3, 4, 2, 3), (2,), {}),
    "kronecker": ((6, 8), ((2, 2), (3, 4), 3), {}),
}


def test_every_format_is_registered_and_has_a_case():
    assert FORMATS.names() == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_protocol_words(name):
    shape, args, kwargs = CASES[name]
    f = decompose(name, _x(shape), *args, **kwargs)
    assert isinstance(f, Factorization)
    assert isinstance(f, format_class(name)) and type(f).name == name
    assert tuple(f.shape) == shape and tuple(f.to_dense().shape) == shape
    assert all(isinstance(r, int) and r >= 1 for r in f.ranks)
    assert can_truncate(f) == (name not in ("cp", "ht"))


def test_num_params_counts_the_stored_tensors():
    x = _x((5, 6, 3, 3))
    tucker = decompose("tucker", x, (3, 4), modes=(0, 1))
    assert tucker.num_params == tucker.core.numel() + sum(f.numel() for f in tucker.factors) == 3 * 4 * 9 + 15 + 24
    tt = decompose("tt", _x((3, 4, 5)), 2)
    assert tt.num_params == 1 * 3 * 2 + 2 * 4 * 2 + 2 * 5 * 1
    kron = decompose("kronecker", _x((6, 8)), (2, 2), (3, 4), 3)
    assert kron.num_params == 3 * (4 + 12)


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"^unknown factorization format 'tensor_ring'; known: cp, ht, kronecker, svd, tt, tt_matrix, tucker$",
    ):
        format_class("tensor_ring")


def test_svd_truncation_error_is_the_discarded_spectrum():
    x = _x((7, 9))
    full = decompose("svd", x)
    for r in (1, 3, 6):
        err = float((full.to_dense() - full.truncate(r).to_dense()).norm())
        assert math.isclose(err, full.tail_error(r), rel_tol=1e-10)


def test_tucker_truncation_error_is_the_discarded_core_energy():
    x = _x((6, 5, 3, 3))
    t = decompose("tucker", x, (5, 4), modes=(0, 1))
    small = t.truncate((2, 3))
    assert small.ranks == (2, 3) and small.modes == (0, 1)
    err = float((t.to_dense() - small.to_dense()).norm())
    predicted = math.sqrt(float(t.core.norm() ** 2 - small.core.norm() ** 2))
    assert math.isclose(err, predicted, rel_tol=1e-9)
    with pytest.raises(ValueError, match=r"rank\[0\]=6 is out of range; accepted: 1 <= rank\[0\] <= 5"):
        t.truncate((6, 3))


def test_kronecker_truncation_error_is_the_discarded_spectrum():
    x = _x((6, 8))
    k = decompose("kronecker", x, (2, 2), (3, 4))
    for r in (1, 2, 3):
        err = float((k.to_dense() - k.truncate(r).to_dense()).norm())
        assert math.isclose(err, float(k.spectrum[r:].norm()), rel_tol=1e-9)


def test_tt_truncation_is_tt_rounding_and_full_rank_is_exact():
    tt = decompose("tt", _x((3, 4, 5)))
    assert torch.allclose(tt.truncate(tt.ranks).to_dense(), tt.to_dense(), atol=1e-12)
    small = tt.truncate(2)
    assert small.ranks == (2, 2)
    assert all(torch.equal(a, b) for a, b in zip(small.cores, tt_round(tt, 2).cores))
    ttm = decompose("tt_matrix", _x((6, 8)), (2, 3), (2, 4))
    assert torch.allclose(ttm.truncate(ttm.ranks).to_dense(), ttm.to_dense(), atol=1e-12)
    assert ttm.truncate(1).ranks == (1,)
