"""The metric a layer is factorized and priced in: whitened / asvd / plain SVD, optionally loss-weighted.

``factorize`` gives a layer's full-rank SVD in the compression method's metric; ``layer_cost`` turns its
spectrum into the allocator's per-triplet loss increase (:class:`rankwise.allocate.LayerCost`);
``predicted_loss`` reads a layer's estimated loss at a rank off that curve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .allocate import LayerCost
from .calibrate import CalibStats
from .formats.svd import SVD, whitened_svd, whitening_factor
from .targets import layer_shape

if TYPE_CHECKING:
    from .compress import CompressConfig


def predicted_loss(cost: LayerCost, rank: int | None) -> float:
    """The allocator's estimated loss increase of one layer at ``rank`` (None: dense, no loss)."""
    return 0.0 if rank is None else float(cost.gains.double().clamp_min(0)[rank:].sum())


def factorize(
    W: torch.Tensor, config: CompressConfig, stats: CalibStats | None, name: str, cache: dict | None = None
) -> SVD:
    """Full-rank SVD of ``D W M`` (``W`` shape (m, n)) in the method's metric, returned as factors of ``W``.

    ``M`` is the identity ("svd"), ``diag(mean|x|^alpha)`` ("asvd") or the whitening factor of the
    input covariance ("whiten"). With an allocator that needs loss gradients ("loss-aware"),
    ``D = diag(sqrt(E[g^2]))`` weights each output row by its loss gradient (both sides whitened), so
    that truncating the SVD minimises the Kronecker-factored Fisher estimate of the loss increase
    ``sum_j E[g_j^2] ||((W - W_r) M)_j||^2``; otherwise ``D = I``. Truncate later with ``SVD.truncate``.
    ``cache`` (a dict kept across calls) holds one whitening factor per shared input (q/k/v, gate/up).

    References
    ----------
    Y.-C. Hsu et al., "Language model compression with weighted low-rank factorization", arXiv:2207.00112.
    X. Wang et al., "SVD-LLM: Truncation-aware SVD for LLM compression", arXiv:2403.07378.
    """
    rows = output_weights(stats, name)[0] if config.needs_loss_gradients else None
    if config.method == "svd":
        return whitened_svd(W, rows=rows)
    st = stats.inputs[name]
    if config.method == "asvd":
        mean = st.mean_abs
        # dead input channels would give scale 0 (not invertible): floor them at a tiny fraction of the max
        return whitened_svd(
            W, scale=mean.clamp_min(max(float(mean.max()), 1e-12) * 1e-6) ** config.asvd_alpha, rows=rows
        )
    cache = {} if cache is None else cache
    if id(st) not in cache:
        cache[id(st)] = whitening_factor(st.covariance)
    return whitened_svd(W, whitening=cache[id(st)], rows=rows)


def output_weights(stats: CalibStats | None, name: str) -> tuple[torch.Tensor, float]:
    """``(sqrt(g / mean g), mean g)`` for ``g = E[(dL/dy)^2]`` (shape (m,)), floored at 1e-4 of its mean
    so that no output row is weighted (and later divided) by zero."""
    g = stats.out_grad_sq.get(name) if stats is not None else None
    if g is None:
        raise ValueError(f"the loss-aware metric needs loss gradients for {name}, but calibration gave none")
    g = g.to(torch.float64)
    mean = max(float(g.mean()), 1e-300)
    g = g.clamp_min(mean * 1e-4)
    mean = float(g.mean())
    return torch.sqrt(g / mean), mean


def layer_cost(layer: nn.Module, f: SVD, stats: CalibStats | None, name: str, loss_weighted: bool) -> LayerCost:
    """Per-triplet loss increase ``S_i^2`` in the factorization's metric; with ``loss_weighted`` (an allocator
    that needs loss gradients) scaled by the mean output-gradient second moment, so that it estimates the
    loss change (comparable across layers)."""
    m, n = layer_shape(layer)
    bias = getattr(layer, "bias", None)
    gains = f.spectrum.double() ** 2
    if loss_weighted:
        gains = gains * output_weights(stats, name)[1]
    return LayerCost((m, n), 0 if bias is None else int(bias.numel()), gains.cpu())
