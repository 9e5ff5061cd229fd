"""Tests for rankwise.formats.ht: HT-SVD on a balanced dimension tree (Grasedyck 2010)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from rankwise.formats.ht import HT, HTNode, dimension_tree, ht_num_params, ht_svd


def random_ht(shape, ranks, seed=0) -> HT:
    """An HT with random (non-orthonormal) factors of the given per-node ranks."""
    g = torch.Generator().manual_seed(seed)
    nodes = []
    for i, (dims, kids) in enumerate(dimension_tree(len(shape))):
        size = (shape[dims[0]], ranks[i]) if not kids else (ranks[kids[0]], ranks[kids[1]], ranks[i])
        nodes.append(HTNode(dims, kids, torch.randn(*size, generator=g, dtype=torch.float64)))
    return HT(tuple(shape), tuple(nodes))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def matricization_tail_sq(x: torch.Tensor, dims: tuple[int, ...], k: int) -> float:
    """Squared norm of the singular values beyond k of x with modes ``dims`` as rows."""
    rest = [m for m in range(x.ndim) if m not in dims]
    M = x.permute(*dims, *rest).reshape(math.prod(x.shape[m] for m in dims), -1)
    s = torch.linalg.svdvals(M)
    return float((s[k:] ** 2).sum())


def truncated_nodes(d: int) -> list[int]:
    """The 2d-3 nodes whose truncation can lose anything: all but the root and the root's right child."""
    tree = dimension_tree(d)
    return [i for i in range(1, len(tree)) if i != tree[0][1][1]]


def test_dimension_tree_is_balanced_and_contiguous():
    assert dimension_tree(2) == (((0, 1), (1, 2)), ((0,), ()), ((1,), ()))
    assert dimension_tree(5) == (
        ((0, 1, 2, 3, 4), (1, 6)),
        ((0, 1, 2), (2, 5)),
        ((0, 1), (3, 4)),
        ((0,), ()),
        ((1,), ()),
        ((2,), ()),
        ((3, 4), (7, 8)),
        ((3,), ()),
        ((4,), ()),
    )
    for d in range(2, 12):
        tree = dimension_tree(d)
        assert len(tree) == 2 * d - 1
        assert [dims for dims, kids in tree if not kids] == [(m,) for m in range(d)]
        for dims, kids in tree:
            if kids:
                left, right = (tree[c][0] for c in kids)
                assert left + right == dims and len(left) - len(right) in (0, 1)


@pytest.mark.parametrize(
    "shape,ranks",
    [
        ((3, 4, 5, 3), (1, 2, 2, 2, 2, 2, 2)),
        ((4, 3, 5, 2, 3), (1, 3, 4, 2, 2, 3, 3, 2, 2)),
        ((5, 6), (1, 3, 3)),
    ],
)
def test_exact_rank_recovery_float64(shape, ranks):
    x = random_ht(shape, ranks, seed=1).to_dense()
    assert tuple(x.shape) == shape
    by_rank = ht_svd(x, ranks)
    assert by_rank.ranks == ranks
    assert rel_err(by_rank.to_dense(), x) < 1e-10
    by_eps = ht_svd(x, eps=1e-10)
    assert by_eps.ranks == ranks  # the minimal ranks are found from the tolerance alone
    assert rel_err(by_eps.to_dense(), x) < 1e-10


def test_full_rank_is_exact():
    x = torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ht = ht_svd(x)
    assert ht.ranks == (1, 10, 3, 4, 10, 2, 5)  # (0, 1) spans 12 entries but its complement only 10
    assert rel_err(ht.to_dense(), x) < 1e-12


@pytest.mark.parametrize("rank", [1, 2, 4, (1, 3, 2, 2, 3, 3, 2)])
def test_rank_truncation_obeys_grasedyck_bound(rank):
    x = torch.randn(4, 5, 3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = x.ndim
    ht = ht_svd(x, rank)
    err_sq = float(((ht.to_dense() - x) ** 2).sum())
    tails = [matricization_tail_sq(x, ht.nodes[t].dims, ht.ranks[t]) for t in truncated_nodes(d)]
    assert len(tails) == 2 * d - 3
    # Grasedyck 2010: ||x - ht||^2 <= sum of the node tails of x <= (2d-3) ||x - best||^2
    assert 0 < err_sq <= sum(tails) * (1 + 1e-10)
    assert err_sq <= (2 * d - 3) * max(tails) * (1 + 1e-10)


def test_two_modes_is_eckart_young():
    W = torch.randn(7, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = torch.linalg.svdvals(W)
    for k in (1, 3, 6):
        ht = ht_svd(W, k)
        assert float((ht.to_dense() - W).norm()) == pytest.approx(float(s[k:].norm()), rel=1e-12)


@pytest.mark.parametrize("eps", [0.5, 0.1, 1e-3, 1e-6])
def test_eps_error_bound(eps):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (5, 6, 4, 7, 3)], indexing="ij")
    x = 1.0 / (1.0 + sum(grids))
    d = x.ndim
    ht = ht_svd(x, eps=eps)
    delta = eps / math.sqrt(2 * d - 3)  # the per-node relative threshold
    assert float((ht.to_dense() - x).norm()) <= math.sqrt(2 * d - 3) * delta * float(x.norm()) * (1 + 1e-12)
    assert max(ht_svd(x, 2, eps=eps).ranks) <= 2


def test_rank_and_eps_together_take_the_smaller_rank():
    x = torch.randn(4, 5, 3, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    by_rank = ht_svd(x, 2)
    both = ht_svd(x, 2, eps=0.0)  # a zero tolerance keeps everything of a generic tensor: the rank decides
    assert both.ranks == by_rank.ranks == (1, 2, 2, 2, 2, 2, 2)
    assert float((both.to_dense() - x).norm()) == pytest.approx(float((by_rank.to_dense() - x).norm()), rel=1e-10)
    free = ht_svd(x, eps=0.9)
    loose = ht_svd(x, max(free.ranks) + 1, eps=0.9)  # a cap above every tolerance rank changes nothing
    assert loose.ranks == free.ranks and torch.equal(loose.to_dense(), free.to_dense())
    tight = ht_svd(x, min(free.ranks[1:]) - 1, eps=0.9)  # a cap below the (non-root) tolerance ranks is the limit
    assert max(tight.ranks) == min(free.ranks[1:]) - 1


def test_bases_orthonormal():
    x = torch.randn(4, 5, 3, 6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for rank in (None, 2, 3):
        ht = ht_svd(x, rank)
        for i, node in enumerate(ht.nodes[1:], start=1):
            F = node.factor.reshape(-1, node.rank)
            eye = torch.eye(node.rank, dtype=F.dtype)
            torch.testing.assert_close(F.T @ F, eye, atol=1e-12, rtol=0)
            frame = ht.frame(i)
            assert frame.shape == (math.prod(x.shape[m] for m in node.dims), node.rank)
            torch.testing.assert_close(frame.T @ frame, eye, atol=1e-12, rtol=0)
        assert ht.nodes[0].rank == 1


def test_num_params_formula():
    x = torch.randn(4, 5, 3, 6, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ht = ht_svd(x, 3)
    leaves = sum(x.shape[n.dims[0]] * n.rank for n in ht.nodes if n.is_leaf)
    inner = sum(ht.ranks[n.children[0]] * ht.ranks[n.children[1]] * n.rank for n in ht.nodes if not n.is_leaf)
    assert ht.num_params == leaves + inner == ht_num_params(x.shape, ht.ranks)
    frac = ht_svd(x, 0.3)
    assert frac.num_params <= 0.3 * x.numel()


def test_input_unchanged_bit_identical_and_low_precision():
    x = torch.randn(4, 5, 3, 6, generator=torch.Generator().manual_seed(6))
    before = x.clone()
    a, b = ht_svd(x, 3), ht_svd(x.clone(), 3)
    assert torch.equal(x, before)
    assert all(torch.equal(na.factor, nb.factor) for na, nb in zip(a.nodes, b.nodes))
    half = ht_svd(x.to(torch.bfloat16), 3)
    assert all(n.factor.dtype == torch.float32 for n in half.nodes)
    assert half.to_dense().dtype == torch.float32


def msg(text: str) -> str:
    return "^" + re.escape(text) + "$"


X = torch.ones(2, 3, 4, dtype=torch.float64)  # tree: root, (0, 1), (0,), (1,), (2,)


@pytest.mark.parametrize(
    "call,text",
    [
        (
            lambda: ht_svd(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]])),
            "x contains 1 NaN/Inf entries; only finite values are accepted",
        ),
        (
            lambda: ht_svd(torch.tensor([[float("-inf"), 1.0], [0.0, 1.0]])),
            "x contains 1 NaN/Inf entries; only finite values are accepted",
        ),
        (lambda: ht_svd(torch.ones(4)), "x must have at least 2 dimensions, got 1 (shape (4,))"),
        (
            lambda: ht_svd(torch.ones(2, 3, dtype=torch.int32)),
            "x must have a floating dtype (float16, bfloat16, float32, float64), got torch.int32",
        ),
        (lambda: ht_svd(X, 0), "rank=0 is out of range; accepted: 1 <= rank <= 4 for this shape"),
        (lambda: ht_svd(X, 7), "rank=7 is out of range; accepted: 1 <= rank <= 4 for this shape"),
        (
            lambda: ht_svd(X, (1, 4, 2)),
            "rank must have 2d-1 = 5 entries (one per tree node, root first), got 3: (1, 4, 2)",
        ),
        (lambda: ht_svd(X, (2, 4, 2, 3, 4)), "rank[0]=2 is out of range; accepted: 1 <= rank[0] <= 1 for this shape"),
        (lambda: ht_svd(X, (1, 4, 3, 3, 4)), "rank[2]=3 is out of range; accepted: 1 <= rank[2] <= 2 for this shape"),
        (
            lambda: ht_svd(X, (1, 4, 1, 3, 4)),
            "rank[1]=4 exceeds rank[2] * rank[3] = 3; accepted: a node's rank <= the product of its children's ranks",
        ),
        (lambda: ht_svd(X, (1, 3, 2, 3, 4)), "rank[1]=3 and rank[4]=4 (the root's children) must be equal"),
        (lambda: ht_svd(X, 0.0), "rank as a float must be a fraction of the dense parameter count in (0, 1], got 0.0"),
        (lambda: ht_svd(X, [1, 4, 2.0, 2, 4]), "rank[2] must be an int in [1, 2], got 2.0"),
        (lambda: ht_svd(X, eps=-0.1), "eps must be a relative tolerance in [0, 1), got -0.1"),
        # leaf (3,) cannot have rank 2 once its sibling and the root's children have rank 1
        (
            lambda: ht_svd(torch.ones(2, 2, 2, 2), (1, 1, 2, 2, 1, 1, 2)),
            "rank[6]=2 for the node over modes (3,) exceeds 1, the most its matricization allows "
            "given the other ranks in rank=(1, 1, 2, 2, 1, 1, 2)",
        ),
    ],
)
def test_bad_input_raises(call, text):
    with pytest.raises(ValueError, match=msg(text)):
        call()
