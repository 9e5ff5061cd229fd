"""The formats' one rank resolver (formats._ops.resolve_ranks): one rule for ints, fractions, tuples and None."""

import math
import re

import pytest
import torch

from rankwise.formats._ops import resolve_rank, resolve_ranks
from rankwise.formats.cp import cp_rank
from rankwise.formats.ht import ht_num_params, ht_ranks
from rankwise.formats.svd import svd_rank
from rankwise.formats.tt import tt_num_params, tt_ranks
from rankwise.formats.tucker import tucker_hosvd, tucker_num_params, tucker_ranks


def _cost(ranks):  # a made-up parameter count, increasing in every rank
    return sum(3 * r for r in ranks) + 2 * ranks[0]


def test_none_is_every_maximum():
    assert resolve_ranks(None, (3, 7, 5), _cost, 1000) == (3, 7, 5)
    assert svd_rank((9, 4), None) == 4
    assert tucker_ranks((3, 4, 5), None, (0, 1, 2)) == (3, 4, 5)
    assert tt_ranks((2, 3, 4), None) == (2, 4)


def test_int_is_clamped_per_mode_or_must_fit_every_mode():
    assert resolve_ranks(5, (3, 7, 5), _cost, 1000) == (3, 5, 5)
    assert resolve_ranks(3, (3, 7, 5), _cost, 1000, clamp=False) == (3, 3, 3)
    with pytest.raises(ValueError, match=r"^rank=4 is out of range; accepted: 1 <= rank <= 3 for this shape$"):
        resolve_ranks(4, (3, 7, 5), _cost, 1000, clamp=False)
    with pytest.raises(ValueError, match=r"^rank=8 is out of range; accepted: 1 <= rank <= 7 for this shape$"):
        resolve_ranks(8, (3, 7, 5), _cost, 1000)


@pytest.mark.parametrize("keep", [0.01, 0.05, 0.2, 0.37, 0.9, 1.0])
def test_fraction_is_the_largest_common_rank_within_budget(keep):
    max_ranks, dense = (3, 7, 5), 120
    budget = keep * dense
    clamped = [tuple(min(R, m) for m in max_ranks) for R in range(1, 8)]
    fitting = [r for r in clamped if _cost(r) <= budget]
    expected = fitting[-1] if fitting else clamped[0]  # brute force over every common rank
    assert resolve_ranks(keep, max_ranks, _cost, dense) == expected


@pytest.mark.parametrize("keep", [0.02, 0.1, 0.25, 0.5, 1.0])
def test_every_format_resolves_a_fraction_against_its_own_parameter_count(keep):
    m, n = 40, 24
    assert svd_rank((m, n), keep) == max([r for r in range(1, n + 1) if r * (m + n + 1) <= keep * m * n] or [1])
    shape = (6, 7, 8)
    total = math.prod(shape)
    assert cp_rank(shape, keep) == max([r for r in range(1, 49) if r * (1 + 21) <= keep * total] or [1])
    tt = [tuple(min(R, b) for b in (6, 8)) for R in range(1, 9)]
    assert tt_ranks(shape, keep) == ([r for r in tt if tt_num_params(shape, r) <= keep * total] or tt[:1])[-1]
    bounds = ht_ranks(shape, None)
    ht = [tuple(min(R, b) for b in bounds) for R in range(1, max(bounds) + 1)]
    assert ht_ranks(shape, keep) == ([r for r in ht if ht_num_params(shape, r) <= keep * total] or ht[:1])[-1]
    ranks = tucker_ranks(shape, keep, (0, 1, 2))
    assert tucker_num_params(shape, ranks, (0, 1, 2)) <= max(
        keep * total, tucker_num_params(shape, (1, 1, 1), (0, 1, 2))
    )


@pytest.mark.parametrize(
    "resolve",
    [
        lambda r: svd_rank((4, 3), r),
        lambda r: cp_rank((3, 4, 5), r),
        lambda r: tucker_ranks((3, 4, 5), r, (0, 1, 2)),
        lambda r: tt_ranks((2, 3, 4), r),
        lambda r: ht_ranks((2, 3, 4), r),
    ],
)
def test_one_rule_for_ints_and_fractions_in_every_format(resolve):
    # an int is a rank and a float a fraction: 1 is rank 1 on every mode, 2.0 is a bad fraction, True neither
    one = resolve(1)
    assert set(one if isinstance(one, tuple) else (one,)) == {1}
    msg = "rank as a float must be a fraction of the dense parameter count in (0, 1], got 2.0"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        resolve(2.0)
    with pytest.raises(ValueError, match=r"^rank=0 is out of range; accepted: 1 <= rank <= \d+ for this shape$"):
        resolve(0)
    single = r"rank must be an int in \[1, \d+\]"
    several = r"rank must be an int, a tuple of \d ints, a float in \(0, 1\] or None"
    with pytest.raises(ValueError, match=f"^({single}|{several}), got True$"):
        resolve(True)


def test_tuple_messages():
    with pytest.raises(ValueError, match=re.escape("rank must have 3 entries (one per mode), got 2: (1, 2)")):
        resolve_ranks((1, 2), (3, 7, 5), _cost, 1000)
    with pytest.raises(ValueError, match=re.escape("rank[1] must be an int in [1, 7], got 2.5")):
        resolve_ranks((1, 2.5, 3), (3, 7, 5), _cost, 1000)
    with pytest.raises(ValueError, match=re.escape("rank must be an int in [1, 3], got (1, 2)")):
        resolve_rank((1, 2), 3, lambda r: r, 9)


def test_tucker_none_is_exact_and_truncate_takes_a_fraction():
    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = tucker_hosvd(x, None)
    assert t.ranks == (4, 5, 6)
    assert float((t.to_dense() - x).norm() / x.norm()) < 1e-12
    small = t.truncate(0.3)  # budget 36: common ratio k/6 -> (1, 2, 2) stores 30, the next step (2, 2, 3) 48
    assert small.ranks == (1, 2, 2) and small.num_params == 30
    assert t.truncate((2, 2, 3)).num_params == 48
