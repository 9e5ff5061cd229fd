"""Rank allocation under one global parameter budget: uniform (SVD-LLM) and loss-aware (Fisher-weighted),
and the one multiple-choice knapsack solver behind the loss-aware and per-option allocations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .registry import Registry

ALLOCATORS = Registry("allocator")
DEFAULT_ALLOCATOR = "loss-aware"  # the default of CompressConfig.allocate


@dataclass(frozen=True)
class LayerCost:
    """What the allocator knows about one layer.

    shape : (out_features m, in_features n); bias : number of bias parameters (kept either way);
    gains : Tensor, shape (k,), float64, ``gains[i]`` = estimated loss increase from dropping the
    (i+1)-th singular triplet (``k = min(m, n)``). A rank-``r`` factorization costs ``r*(m+n)+bias``
    parameters and loses ``gains[r:].sum()``; the dense layer costs ``m*n+bias`` and loses nothing.
    """

    shape: tuple[int, int]
    bias: int
    gains: torch.Tensor

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1] + self.bias

    @property
    def step(self) -> int:
        return self.shape[0] + self.shape[1]

    @property
    def max_rank(self) -> int:
        """Largest rank that still stores fewer parameters than the dense layer."""
        m, n = self.shape
        return min((m * n - 1) // (m + n), m, n)

    def params(self, rank: int | None) -> int:
        return self.dense_params if rank is None else rank * self.step + self.bias


def allocate_ranks(name: str, layers: list[LayerCost], keep: float, *, min_rank: int = 1) -> list[int | None]:
    """Ranks (None = stay dense) with ``sum(params) <= keep * sum(dense params)``.

    Parameters
    ----------
    name : registered allocator, see ``ALLOCATORS.names()``.
    keep : float in (0, 1], the fraction of the layers' dense parameters kept.
    min_rank : smallest rank any factorized layer may get (guards against starving a layer).
    """
    budget = keep * sum(layer.dense_params for layer in layers)
    return ALLOCATORS.get(name).fn(layers, budget, min_rank=min_rank)


@ALLOCATORS.register("uniform", paper="https://arxiv.org/abs/2403.07378")
def uniform(layers: list[LayerCost], budget: float, *, min_rank: int = 1) -> list[int | None]:
    """The same kept fraction for every matrix (SVD-LLM's rule): the largest rank within ``keep`` of
    each layer's own parameters; a layer whose rank would not save parameters stays dense."""
    keep = budget / sum(layer.dense_params for layer in layers)
    ranks: list[int | None] = []
    for layer in layers:
        r = int((keep * layer.dense_params - layer.bias) // layer.step)
        ranks.append(None if r > layer.max_rank else max(r, min(min_rank, layer.max_rank), 1))
    return ranks


@ALLOCATORS.register("loss-aware", paper="https://arxiv.org/abs/2207.00112", aliases=("fisher",), loss_gradients=True)
def loss_aware(layers: list[LayerCost], budget: float, *, min_rank: int = 1) -> list[int | None]:
    """Minimise the summed estimated loss increase ``sum_l gains_l[r_l:].sum()`` under the budget.

    With :func:`rankwise.metric.layer_cost` the gains are the squared singular values of the
    Fisher-weighted whitened weight ``diag(sqrt(E[g^2])) W L``, i.e. a Kronecker-factored Fisher
    estimate of the loss increase of dropping each triplet, comparable across layers.

    Each layer chooses among ranks ``min_rank..max_rank`` and "dense", by :func:`choose_options` (a
    Lagrangian price per parameter, then the budget left over spent greedily on the largest loss
    decrease per parameter).

    References
    ----------
    Y.-C. Hsu et al., "Language model compression with weighted low-rank factorization" (FWSVD),
    ICLR 2022, arXiv:2207.00112 (Fisher-weighted reconstruction).
    H. Everett, "Generalized Lagrange multiplier method for solving problems of optimum allocation of
    resources", Operations Research 11 (1963).
    """
    costs, losses, options = [], [], []
    for layer in layers:
        lo = min(max(min_rank, 1), layer.max_rank)
        g = layer.gains.to(torch.float64).clamp_min(0)
        tail = torch.cat([torch.flip(torch.cumsum(torch.flip(g, [0]), 0), [0]), g.new_zeros(1)])  # tail[r]: loss at r
        ranks = torch.arange(lo, layer.max_rank + 1)
        options.append(ranks.tolist() + [None])
        losses.append(torch.cat([tail[ranks.clamp_max(len(tail) - 1)], g.new_zeros(1)]))  # ranks, then dense
        costs.append(torch.cat([ranks * layer.step + layer.bias, torch.tensor([layer.dense_params])]).double())
    if sum(float(c[0]) for c in costs) > budget:
        raise ValueError(
            f"keep is too small: even rank {min_rank} for every layer exceeds the budget of {int(budget)} parameters"
        )
    return [opts[i] for opts, i in zip(options, choose_options(costs, losses, budget))]


def choose_options(costs: list[torch.Tensor], losses: list[torch.Tensor], budget: float) -> list[int]:
    """One option per layer minimising the summed loss with the summed cost within ``budget`` (a
    multiple-choice knapsack): the one solver behind :func:`loss_aware` and :func:`allocate_options`.

    ``costs[k]``, ``losses[k]``: float64 tensors of the same length, layer ``k``'s options (any order,
    losses finite); the cheapest options together must fit (the callers check it and word the error).
    A Lagrange multiplier ``lam`` (the price of a parameter) is bisected to the smallest price at which
    every layer's ``argmin loss + lam * cost`` fits, ties going to the cheaper option (optimal on the
    lower convex hull of each layer's options, Everett 1963); the budget left over then buys, one move
    at a time, the option change of largest loss decrease per parameter among those that fit and lower
    the loss (any option of any layer, so a layer may also jump to a non-adjacent or dense option).
    Returns the chosen index per layer, into its own ``costs[k]``.

    References
    ----------
    H. Everett, "Generalized Lagrange multiplier method for solving problems of optimum allocation of
    resources", Operations Research 11 (1963).
    """
    n = len(costs)
    width = max(len(c) for c in costs)
    order = [torch.sort(c, stable=True).indices for c in costs]  # cheapest first: argmin's ties go to it
    cost = torch.zeros(n, width, dtype=torch.float64)
    loss = torch.full((n, width), torch.inf, dtype=torch.float64)
    valid = torch.zeros(n, width, dtype=torch.bool)
    for k, (c, v, o) in enumerate(zip(costs, losses, order)):
        cost[k, : len(o)], loss[k, : len(o)], valid[k, : len(o)] = c[o], v[o], True

    def choose(lam: float) -> torch.Tensor:
        return torch.argmin((loss + lam * cost).masked_fill(~valid, torch.inf), dim=1)

    def total(idx: torch.Tensor) -> float:
        return float(cost.gather(1, idx[:, None]).sum())

    hi = 1.0
    while total(choose(hi)) > budget:  # ends: a high enough price picks every layer's cheapest option
        hi *= 2
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if not lo < mid < hi:
            break
        if total(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
    idx = choose(hi)
    spent = total(idx)
    while True:
        extra = cost - cost.gather(1, idx[:, None])
        gain = loss.gather(1, idx[:, None]) - loss
        fits = valid & (gain > 0) & (spent + extra <= budget)
        if not bool(fits.any()):
            break
        rate = torch.where(extra > 0, gain / extra.clamp_min(1e-300), torch.inf).masked_fill(~fits, -torch.inf)
        k, j = divmod(int(torch.argmax(rate)), width)  # ties: the first layer, then its cheapest option
        spent += float(extra[k, j])
        idx[k] = j
    return [int(o[i]) for o, i in zip(order, idx.tolist())]


# Deltas: the spectra are exact (the delta's own singular values), so the allocation is a greedy knapsack
# on them with rank 0 (layer left out) allowed, and an energy target besides a parameter budget; it does not
# share the compression allocators' signature (LayerCost curves, None = stay dense), hence no registry entry.
def allocate_delta_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    *,
    budget: int | None = None,
    energy: float | None = None,
) -> dict[str, int]:
    """Ranks per layer maximising the kept squared Frobenius norm of the deltas, greedily.

    Each singular triplet ``i`` of a layer of shape (m, n) costs ``m + n`` parameters and removes
    ``s_i**2`` from the total squared error (Eckart–Young); triplets are taken in decreasing order of
    ``s_i**2 / (m + n)``, which within a layer is the order of the spectrum, so every layer keeps a
    prefix. With ``budget`` a triplet is taken while it fits (``sum r * (m + n) <= budget``); with
    ``energy`` the shortest such sequence keeping ``energy * sum ||D||_F**2`` is taken.

    References
    ----------
    C. Eckart, G. Young, "The approximation of one matrix by another of lower rank", Psychometrika 1 (1936).
    """
    names = list(spectra)
    ratios, owners = [], []
    for i, name in enumerate(names):
        m, n = shapes[name]
        ratios.append(spectra[name].double() ** 2 / (m + n))
        owners.append(torch.full((spectra[name].numel(),), i, dtype=torch.int64))
    ranks = dict.fromkeys(names, 0)
    if not names:
        return ranks
    ratio, owner = torch.cat(ratios), torch.cat(owners)
    order = torch.sort(ratio, descending=True, stable=True).indices  # stable: ties keep spectrum order
    if energy is not None:
        costs = torch.tensor([sum(shapes[n]) for n in names], dtype=torch.float64)
        gains = ratio[order] * costs[owner[order]]
        cum = torch.cumsum(gains, 0)
        take = min(int(torch.searchsorted(cum, energy * cum[-1])) + 1, len(order))
        for i in owner[order[:take]].tolist():
            ranks[names[i]] += 1
        return ranks
    left = budget
    for i in owner[order].tolist():
        cost = sum(shapes[names[i]])
        if cost <= left:
            ranks[names[i]] += 1
            left -= cost
    return ranks


def allocate_options(options: list[list[tuple[int, float]]], budget: float) -> list[int]:
    """Pick one option per layer, each a ``(parameters, estimated loss increase)`` pair, minimising the summed
    loss with the summed parameters within ``budget``: a multiple-choice knapsack, for choosing format and rank
    together (``format="auto"`` of :class:`rankwise.compress_modules.ModuleCompressConfig`).

    Solved by :func:`choose_options`, as the loss-aware rank allocator is. Returns the chosen index per
    layer; ``ValueError`` if even the cheapest options exceed the budget.
    """
    if any(not opts for opts in options):
        raise ValueError("allocate_options needs at least one option per layer")
    params = [torch.tensor([float(p) for p, _ in opts], dtype=torch.float64) for opts in options]
    losses = [torch.tensor([float(v) for _, v in opts], dtype=torch.float64) for opts in options]
    cheapest = sum(float(p.min()) for p in params)
    if cheapest > budget:
        raise ValueError(
            f"the budget of {int(budget)} parameters is below the {int(cheapest)} that the smallest "
            "factorization of every layer needs; accepted: a larger keep"
        )
    return choose_options(params, losses, budget)
