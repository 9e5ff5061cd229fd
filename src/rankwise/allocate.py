"""Rank allocation under one global parameter budget: uniform (SVD-LLM) and loss-aware (Fisher-weighted)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .registry import Registry

ALLOCATORS = Registry("allocator")


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


@ALLOCATORS.register("fisher", paper="https://arxiv.org/abs/2207.00112", loss_gradients=True)
def loss_aware(layers: list[LayerCost], budget: float, *, min_rank: int = 1) -> list[int | None]:
    """Minimise the summed estimated loss increase ``sum_l gains_l[r_l:].sum()`` under the budget.

    With :func:`rankwise.metric.layer_cost` the gains are the squared singular values of the
    Fisher-weighted whitened weight ``diag(sqrt(E[g^2])) W L``, i.e. a Kronecker-factored Fisher
    estimate of the loss increase of dropping each triplet, comparable across layers.

    Each layer chooses among ranks ``min_rank..max_rank`` and "dense". A Lagrange multiplier ``lam``
    (price of a parameter) is bisected so that every layer's ``argmin loss + lam * params`` fits the
    budget (exact for the convex hull of each layer's loss curve); the budget left over is then spent
    greedily, one rank step at a time, on the largest loss decrease per parameter.

    References
    ----------
    Y.-C. Hsu et al., "Language model compression with weighted low-rank factorization" (FWSVD),
    ICLR 2022, arXiv:2207.00112 (Fisher-weighted reconstruction).
    H. Everett, "Generalized Lagrange multiplier method for solving problems of optimum allocation of
    resources", Operations Research 11 (1963).
    """
    tails, params, options = [], [], []
    for layer in layers:
        lo = min(max(min_rank, 1), layer.max_rank)
        g = layer.gains.to(torch.float64).clamp_min(0)
        tail = torch.cat([torch.flip(torch.cumsum(torch.flip(g, [0]), 0), [0]), g.new_zeros(1)])  # tail[r]: loss at r
        ranks = torch.arange(lo, layer.max_rank + 1)
        opts = ranks.tolist() + [None]
        loss = torch.cat([tail[ranks.clamp_max(len(tail) - 1)], g.new_zeros(1)])  # options, then dense (no loss)
        cost = torch.cat([ranks * layer.step + layer.bias, torch.tensor([layer.dense_params])]).to(torch.float64)
        tails.append(loss), params.append(cost), options.append(opts)
    # every layer's options in one padded matrix: a price lam is one argmin per row (padding never wins)
    width = max(len(o) for o in options)
    loss_m = torch.stack([torch.cat([t, t.new_full((width - len(t),), torch.inf)]) for t in tails])
    cost_m = torch.stack([torch.cat([c, c.new_zeros(width - len(c))]) for c in params])

    def choose(lam: float) -> list[int]:
        return torch.argmin(loss_m + lam * cost_m, dim=1).tolist()

    def total(idx: list[int]) -> float:
        return float(cost_m.gather(1, torch.tensor(idx)[:, None]).sum())

    floor = [0] * len(layers)
    if total(floor) > budget:
        raise ValueError(
            f"keep is too small: even rank {min_rank} for every layer exceeds the budget of {int(budget)} parameters"
        )
    hi = max(float(t[0]) for t in tails) + 1.0
    while total(choose(hi)) > budget:
        hi *= 2
    lo = 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
    idx = choose(hi)
    spent = total(idx)
    # top-up: the best next option per layer (one rank step, or dense from max_rank) while it fits
    while True:
        best, best_rate = None, 0.0
        for k, (loss, cost) in enumerate(zip(tails, params)):
            i = idx[k]
            if i + 1 >= len(cost):
                continue
            extra = float(cost[i + 1] - cost[i])
            if spent + extra > budget:
                continue
            rate = float(loss[i] - loss[i + 1]) / extra
            if best is None or rate > best_rate:
                best, best_rate = k, rate
        if best is None:
            break
        spent += float(params[best][idx[best] + 1] - params[best][idx[best]])
        idx[best] += 1
    return [opts[i] for opts, i in zip(options, idx)]


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
    together (``format="auto"`` in :func:`rankwise.compress_modules.compress_modules_`).

    A Lagrange multiplier ``lam`` (the price of a parameter) is bisected so that every layer's
    ``argmin loss + lam * params`` fits (optimal on the lower convex hull of each layer's options); the
    budget left over then buys, greedily by loss decrease per parameter, each layer's next cheaper-loss
    option that fits. Returns the chosen index per layer; ``ValueError`` if even the cheapest options
    exceed the budget.

    References
    ----------
    H. Everett, "Generalized Lagrange multiplier method for solving problems of optimum allocation of
    resources", Operations Research 11 (1963).
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

    def choose(lam: float) -> list[int]:
        # ties broken towards fewer parameters, so that a huge lam gives the cheapest options
        return [int(torch.argmin(v + lam * p + 1e-12 * p / max(float(p.max()), 1.0))) for v, p in zip(losses, params)]

    def total(idx: list[int]) -> float:
        return sum(float(p[i]) for p, i in zip(params, idx))

    hi = 1.0
    while total(choose(hi)) > budget:
        hi *= 2
        if hi > 1e300:
            idx = [int(torch.argmin(p)) for p in params]
            break
    else:
        lo = 0.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if total(choose(mid)) > budget:
                lo = mid
            else:
                hi = mid
        idx = choose(hi)
    spent = total(idx)
    while True:
        best, best_rate = None, 0.0
        for k, (v, p) in enumerate(zip(losses, params)):
            now_v, now_p = float(v[idx[k]]), float(p[idx[k]])
            for j in range(len(p)):
                extra, gain = float(p[j]) - now_p, now_v - float(v[j])
                if gain <= 0 or spent + extra > budget:
                    continue
                rate = gain / max(extra, 1e-300) if extra > 0 else float("inf")
                if best is None or rate > best_rate:
                    best, best_rate = (k, j), rate
        if best is None:
            return idx
        k, j = best
        spent += float(params[k][j]) - float(params[k][idx[k]])
        idx[k] = j
