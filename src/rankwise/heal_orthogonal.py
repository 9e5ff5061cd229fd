"""Healing with orthonormal factors: each LowRankLinear trained as U diag(s) Vh, U and Vh kept orthonormal.

While :func:`orthonormal_factors` is active, every ``LowRankLinear`` of the model is replaced by an
:class:`OrthonormalLowRank` holding the SVD of its weight ``up @ down``; torch's orthogonal
parametrization (``torch.nn.utils.parametrizations.orthogonal``) keeps ``U``'s columns and ``Vh``'s rows
orthonormal whatever the optimizer does, and the singular values ``s`` are free parameters. On exit the
trained factors are folded back into the original layers (``up = U |s|^1/2 sign(s)``, ``down = |s|^1/2 Vh``),
so the model saves as before.

References
----------
M. Lezcano-Casado and D. Martinez-Rubio, "Cheap orthogonal constraints in neural networks: a simple
parametrization of the orthogonal and unitary group", ICML 2019 (the trivialization torch implements).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from .layers.linear import LowRankLinear
from .targets import replace_module


def factor_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, Vh)`` with ``U diag(s) Vh = up @ down`` in float64, from two QRs and the SVD of an r x r core.

    up : (out, r), down : (r, in); U : (out, r) orthonormal columns, Vh : (r, in) orthonormal rows.
    """
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


class OrthonormalLowRank(nn.Module):
    """``y = U (s * (Vh x)) + b`` with ``U`` (out, r) and ``Vh`` (r, in) orthonormal, built from a LowRankLinear."""

    def __init__(self, layer: LowRankLinear):
        super().__init__()
        dtype, device = layer.up.weight.dtype, layer.up.weight.device
        U, s, Vh = factor_svd(layer.up.weight.detach(), layer.down.weight.detach())
        self.vh = nn.Linear(layer.in_features, layer.rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(layer.rank, layer.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.vh.weight.copy_(Vh.to(dtype))
            self.u.weight.copy_(U.to(dtype))
        self.s = nn.Parameter(s.to(dtype))
        self.bias = layer.up.bias  # the layer's own bias parameter, trained in place
        orthogonal(self.vh)
        orthogonal(self.u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.u(self.vh(x) * self.s)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def fold_into(self, layer: LowRankLinear) -> None:
        """Write the trained factors into ``layer``'s ``up`` and ``down`` (sqrt of ``|s|`` on each side)."""
        s = self.s.double()
        root = s.abs().sqrt()
        layer.up.weight.copy_((self.u.weight.double() * (root * torch.sign(s))).to(layer.up.weight.dtype))
        layer.down.weight.copy_((self.vh.weight.double() * root[:, None]).to(layer.down.weight.dtype))


@contextlib.contextmanager
def orthonormal_factors(model: nn.Module, enabled: bool = True):
    """Swap every LowRankLinear of ``model`` for an :class:`OrthonormalLowRank` (when ``enabled``); on exit,
    fold the trained factors back and restore the original layers, also after an exception."""
    if not enabled:
        yield model
        return
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    swapped = {}
    try:
        for name, layer in layers.items():
            swapped[name] = OrthonormalLowRank(layer)
            replace_module(model, name, swapped[name])
        yield model
        for name, wrapper in swapped.items():
            wrapper.fold_into(layers[name])
    finally:
        for name in swapped:
            replace_module(model, name, layers[name])
