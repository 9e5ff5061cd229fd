"""The ways to store one layer (:class:`Option`: format, rank, parameters, MACs, predicted loss) and the front
of those worth offering to the allocator, built from tensors over a whole rank grid at once (a Tucker-2 grid of a
1024-channel layer is a million rank pairs: one Python object per pair made the options cost more than the
decompositions)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MAX_OPTIONS = 160  # per format and layer: enough resolution for the allocator, cheap for its greedy top-up


@dataclass
class Option:
    """One way to store a layer: ``format`` None is the dense layer."""

    format: str | None
    rank: int | tuple[int, ...] | None
    params: int
    loss: float
    macs: float | None = None  # per calibration example; None where the input sizes are unknown


def front_index(cost: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Indices of the options no option of lower ``cost`` (ties: of lower loss, then earlier) beats, in cost
    order, thinned to at most ``_MAX_OPTIONS`` (+ the last) spread over the front."""
    order = torch.argsort(loss, stable=True)
    order = order[torch.argsort(cost[order], stable=True)]
    sorted_loss = loss[order]
    best_before = torch.cat([sorted_loss.new_full((1,), math.inf), torch.cummin(sorted_loss, 0).values[:-1]])
    front = order[sorted_loss < best_before]
    if len(front) > _MAX_OPTIONS:
        step = len(front) / _MAX_OPTIONS
        front = front[[*(int(i * step) for i in range(_MAX_OPTIONS)), len(front) - 1]]
    return front


def format_options(fmt: str, ranks: torch.Tensor, params, loss, macs, dense: Option, priced: bool) -> list[Option]:
    """The options of one format (``ranks`` (n, k) ints; params, loss and macs (n,) tensors, macs None where
    the sizes are unknown) that store fewer parameters than ``dense`` and, when ``priced`` by MACs, need fewer
    MACs, on the front of loss against parameters and (when priced) against MACs."""
    params, loss = params.to(torch.float64), loss.to(torch.float64)
    mask = params < dense.params
    if priced:
        mask &= macs < dense.macs
    keep = torch.nonzero(mask).flatten()
    picked = keep[front_index(params[keep], loss[keep])]
    if priced:
        extra = keep[front_index(macs[keep], loss[keep])]
        picked = torch.cat([picked, extra[~torch.isin(extra, picked)]])
    rank_list = ranks[picked].tolist()
    return [
        Option(fmt, r[0] if len(r) == 1 else tuple(r), int(p), v, None if macs is None else m)
        for r, p, v, m in zip(
            rank_list,
            params[picked].tolist(),
            loss[picked].tolist(),
            [None] * len(picked) if macs is None else macs[picked].tolist(),
        )
    ]
