"""Hierarchical Tucker (HT) format: HT-SVD of a dense tensor on a balanced binary dimension tree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._ops import (
    RankSpec,
    Tensor,
    check_tensor,
    check_tolerance,
    compute_dtype,
    fold,
    resolve_ranks,
    unfold,
)
from .protocol import FORMATS
from .tt import truncated_left_basis


@dataclass(frozen=True)
class HTNode:
    """One node t of the dimension tree.

    dims : the tensor modes t spans (a contiguous range, in order).
    children : indices of the two children in ``HT.nodes``, or () for a leaf.
    factor : leaf: basis ``U_t``, shape (n_t, k_t), orthonormal columns; interior node: transfer
        tensor ``B_t``, shape (k_left, k_right, k_t), with ``U_t = (U_left ⊗ U_right) B_t`` (B_t
        reshaped to (k_left k_right, k_t)); orthonormal columns at every node but the root (k = 1).
    """

    dims: tuple[int, ...]
    children: tuple[int, ...]
    factor: Tensor

    @property
    def rank(self) -> int:
        return int(self.factor.shape[-1])

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass(frozen=True)
class HT:
    """A tensor of ``shape`` in hierarchical Tucker format.

    nodes : tuple of 2d-1 :class:`HTNode` in pre-order (parent before its left, then right subtree);
    ``nodes[0]`` is the root, spanning every mode, with rank 1.
    """

    name: ClassVar[str] = "ht"
    shape: tuple[int, ...]
    nodes: tuple[HTNode, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        """One rank per node, in the order of ``nodes`` (the root's is 1)."""
        return tuple(node.rank for node in self.nodes)

    @property
    def num_params(self) -> int:
        """sum over leaves of n_t k_t plus sum over interior nodes of k_left k_right k_t."""
        return sum(node.factor.numel() for node in self.nodes)

    def frame(self, index: int) -> Tensor:
        """The orthonormal basis of node ``index`` as a matrix, shape (prod of its mode sizes, k_t)."""
        node = self.nodes[index]
        if node.is_leaf:
            return node.factor
        left, right = (self.frame(c) for c in node.children)
        kl, kr, k = node.factor.shape
        partial = (left @ node.factor.reshape(kl, kr * k)).reshape(left.shape[0], kr, k)
        return torch.einsum("akt,bk->abt", partial, right).reshape(-1, k)

    def to_dense(self) -> Tensor:
        """The full tensor, shape ``self.shape``."""
        return self.frame(0).reshape(self.shape)


def dimension_tree(d: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Balanced binary tree over modes 0..d-1 as (dims, children) in pre-order.

    A node spanning more than one mode splits into its first ceil(m/2) modes and the rest.
    """
    nodes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def build(dims: tuple[int, ...]) -> int:
        index = len(nodes)
        nodes.append((dims, ()))
        if len(dims) > 1:
            half = (len(dims) + 1) // 2
            left = build(dims[:half])
            right = build(dims[half:])
            nodes[index] = (dims, (left, right))
        return index

    build(tuple(range(d)))
    return tuple(nodes)


def _node_bounds(shape: Sequence[int], tree) -> tuple[int, ...]:
    total = math.prod(shape)
    inner = [math.prod(shape[i] for i in dims) for dims, _ in tree]
    return tuple(1 if i == 0 else min(n, total // n) for i, n in enumerate(inner))


def ht_num_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameter count of an HT of ``shape`` on :func:`dimension_tree` with per-node ``ranks``."""
    tree = dimension_tree(len(shape))
    return sum(
        shape[dims[0]] * ranks[i] if not kids else ranks[kids[0]] * ranks[kids[1]] * ranks[i]
        for i, (dims, kids) in enumerate(tree)
    )


def ht_ranks(shape: Sequence[int], rank: RankSpec | None) -> tuple[int, ...]:
    """Resolve a rank spec into one rank per node of :func:`dimension_tree` (root first, rank 1).

    ``None``: the largest ranks the shape allows. ``int R``: ``k_t = min(R, prod n_t, prod of the other
    n)`` (nodes that cannot reach R keep their largest rank); R must be in [1, largest bound]. ``tuple``
    of 2d-1 ints in node order: root entry 1, each within its bound, ``k_t <= k_left k_right``, the
    root's two children equal; no clamping. ``float`` in (0, 1]: the largest ``R`` (clamped as for an
    int) whose HT stores at most that fraction of ``prod(shape)`` (R = 1 when even that exceeds the budget).
    """
    tree = dimension_tree(len(shape))
    bounds = _node_bounds(shape, tree)
    entries = f"2d-1 = {len(tree)} entries (one per tree node, root first)"
    ranks = resolve_ranks(rank, bounds, lambda r: ht_num_params(shape, r), math.prod(shape), entries=entries)
    if isinstance(rank, (list, tuple)):
        for i, (_, kids) in enumerate(tree):
            if kids and ranks[i] > ranks[kids[0]] * ranks[kids[1]]:
                raise ValueError(
                    f"rank[{i}]={ranks[i]} exceeds rank[{kids[0]}] * rank[{kids[1]}] = "
                    f"{ranks[kids[0]] * ranks[kids[1]]}; "
                    f"accepted: a node's rank <= the product of its children's ranks"
                )
        a, b = tree[0][1]
        if ranks[a] != ranks[b]:
            raise ValueError(f"rank[{a}]={ranks[a]} and rank[{b}]={ranks[b]} (the root's children) must be equal")
    return ranks


def _post_order(tree, index: int = 0) -> list[int]:
    kids = tree[index][1]
    return [i for c in kids for i in _post_order(tree, c)] + [index]


def ht_svd(x: Tensor, rank: RankSpec | None = None, *, eps: float | None = None) -> HT:
    """HT-SVD: truncated hierarchical SVD, leaves to root (Grasedyck 2010, leaves-to-root truncation).

    Nodes are visited children first. At each node the current tensor (``x`` projected onto the
    bases already computed) is matricized with that node's mode as rows (for an interior node the
    merged (k_left k_right) mode of its children), its leading left singular vectors become the
    node's basis, and the tensor is projected onto them. The projections are orthogonal and nested,
    so ``||x - ht||_F^2`` is exactly the sum of the squared tails discarded at the nodes. The root's
    right child spans the complement of its left one and is truncated losslessly, so 2d-3 nodes
    truncate. Each node's matrix is the node's matricization of ``x`` multiplied by matrices with
    orthonormal rows or columns, so its tail is no larger than that of ``x``: ``||x - ht||_F^2 <=
    sum over those nodes of the tail of x's matricization <= (2d-3) ||x - x_best||_F^2``, the
    quasi-optimality bound of Grasedyck's HSVD.

    Parameters
    ----------
    x : Tensor, shape (n_1, ..., n_d), d >= 2, floating, finite
    rank : int, tuple of 2d-1 ints (node order of :func:`dimension_tree`), float in (0, 1] or None;
        see :func:`ht_ranks`.
    eps : float in [0, 1), optional
        Target relative error: each of the 2d-3 truncations discards at most
        ``delta * ||x||_F`` with the per-node threshold ``delta = eps / sqrt(2d-3)``, hence
        ``||x - ht.to_dense()||_F <= sqrt(2d-3) * delta * ||x||_F = eps * ||x||_F``. With ``rank`` also
        given, each node takes the smaller of the two ranks.

    Returns
    -------
    HT on :func:`dimension_tree` (d), leaf bases and non-root transfer tensors with orthonormal
    columns, float64 for float64 input, float32 otherwise, on ``x``'s device.

    References
    ----------
    L. Grasedyck, "Hierarchical singular value decomposition of tensors", SIAM J. Matrix Anal. Appl.
    31(4), 2029–2054 (2010).
    """
    check_tensor(x, "x", min_ndim=2)
    shape = tuple(x.shape)
    d = len(shape)
    tree = dimension_tree(d)
    caps = ht_ranks(shape, rank)
    C = x.to(compute_dtype(x))
    tol_sq = None
    if eps is not None:
        tol_sq = (check_tolerance(eps) ** 2) * float(torch.sum(C.to(torch.float64) ** 2)) / (2 * d - 3)
    leaf_of = {dims[0]: i for i, (dims, kids) in enumerate(tree) if not kids}
    active = [leaf_of[m] for m in range(d)]  # the tree node behind each mode of C
    root_right = tree[0][1][1]
    factors: dict[int, Tensor] = {}
    for t in _post_order(tree)[:-1]:
        kids = tree[t][1]
        if kids:
            pos = active.index(kids[0])
            C = C.reshape(*C.shape[:pos], C.shape[pos] * C.shape[pos + 1], *C.shape[pos + 2 :])
            active[pos : pos + 2] = [t]
        else:
            pos = active.index(t)
        M = unfold(C, pos)
        if t == root_right:
            # the other root child is already projected: M has rank <= its k, truncating there is exact
            cap, tol = min(M.shape), None
        else:
            cap, tol = caps[t], tol_sq
            if tol is None and cap > min(M.shape):
                raise ValueError(
                    f"rank[{t}]={cap} for the node over modes {tree[t][0]} exceeds {min(M.shape)}, the most its "
                    f"matricization allows given the other ranks in rank={rank!r}"
                )
        U, rest = truncated_left_basis(M, cap, tol)
        C = fold(rest, pos, (*C.shape[:pos], U.shape[1], *C.shape[pos + 1 :]))
        factors[t] = U if not kids else U.reshape(factors[kids[0]].shape[-1], factors[kids[1]].shape[-1], U.shape[1])
    factors[0] = C.reshape(*C.shape, 1)
    nodes = tuple(HTNode(dims, kids, factors[i]) for i, (dims, kids) in enumerate(tree))
    return HT(shape, nodes)


# No truncate(): cutting an HT's ranks needs it re-orthogonalized first; decompose again with ht_svd.
FORMATS.register(HT.name, paper="https://doi.org/10.1137/090764189", decompose=ht_svd)(HT)
