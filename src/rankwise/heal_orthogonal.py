"""Healing with orthonormal factors: each LowRankLinear trained as U diag(s) Vh, U and Vh kept orthonormal.

While :func:`orthonormal_factors` is active, every ``LowRankLinear`` of the model is replaced by an
:class:`OrthonormalLowRank` holding the SVD of its weight ``up @ down``, with the singular values ``s`` free.
``U`` (out, r) and ``Vh`` (r, in) are plain parameters kept on the Stiefel manifold by Riemannian steps:
their gradients are projected onto the manifold's tangent space as the backward pass computes them, the
optimizer takes its step, and :func:`retract_` maps them back onto the manifold with the QR retraction
(``qf(X)``: the Q of ``X = QR`` with a positive diagonal in ``R``). That costs two QRs of (n, r) matrices per
layer and step, and two products of that size for the projections: on SmolLM2 at keep 0.6 a 512-token step
costs 1.3-1.4x the CPU time of a free step. torch's orthogonal parametrization, used before, rebuilt every factor
from Householder reflectors in every forward and backward pass and took ~175 CPU s for one 128-token step,
against ~3 s with free factors (BENCHMARKS.md). On exit the trained factors are folded back into the original
layers (``up = U |s|^1/2 sign(s)``, ``down = |s|^1/2 Vh``), so the model saves as before.

References
----------
P.-A. Absil, R. Mahony and R. Sepulchre, "Optimization Algorithms on Matrix Manifolds", Princeton University
Press, 2008: the Riemannian gradient of a Riemannian submanifold as the projection of the Euclidean one
(section 3.6; for the Stiefel manifold ``G - X sym(X^T G)``) and the QR-based retraction ``qf`` on the Stiefel
manifold (section 4.1).
A. Stathopoulos and K. Wu, "A block orthogonalization procedure with constant synchronization requirements",
SIAM J. Sci. Comput. 23(6), 2002 (Cholesky QR).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

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


def qr_retraction(x: torch.Tensor) -> torch.Tensor:
    """``qf(x)``: the orthonormal Q of ``x = QR`` with ``R``'s diagonal positive (unique for a full-rank ``x``).

    x : (n, r) with n >= r; computed in float64 and returned in ``x``'s dtype. Computed as Cholesky QR
    (``R = chol(x^T x)^T``, ``Q = x R^-1``), the same Q as a Householder QR with the signs fixed and 1.6x faster
    on SmolLM2's factors; its accuracy degrades with ``cond(x)^2``, harmless here: after a tangent step ``d`` from
    an orthonormal ``x0``, ``x^T x = I + d^T d``, whose condition number is at most ``1 + ||d||_2^2``.
    """
    xd = x.double()
    lower = torch.linalg.cholesky(xd.T @ xd)
    return torch.linalg.solve_triangular(lower, xd.T, upper=False).T.to(x.dtype)


def tangent_projection(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The projection of ``g`` onto the tangent space of the Stiefel manifold at ``x`` (orthonormal columns, both
    (n, r)): ``g - x sym(x^T g)``, the Riemannian gradient of the embedded metric when ``g`` is the Euclidean one."""
    xtg = x.T @ g
    return g - x @ ((xtg + xtg.T) / 2)


class OrthonormalLowRank(nn.Module):
    """``y = U (s * (Vh x)) + b`` with ``U`` (out, r) and ``Vh`` (r, in) orthonormal, built from a LowRankLinear.

    The gradients of ``U`` and ``Vh`` are tangent to the Stiefel manifold (projected in a hook as they are
    computed); call :meth:`retract_` after each optimizer step to put the factors back on it.
    """

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
        # Vh's rows are the orthonormal vectors: project and retract its transpose
        self.u.weight.register_hook(lambda g: tangent_projection(self.u.weight.detach(), g))
        self.vh.weight.register_hook(lambda g: tangent_projection(self.vh.weight.detach().T, g.T).T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.u(self.vh(x) * self.s)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def retract_(self) -> None:
        """Map ``U`` and ``Vh`` back onto the Stiefel manifold (:func:`qr_retraction`) after an optimizer step."""
        self.u.weight.copy_(qr_retraction(self.u.weight))
        self.vh.weight.copy_(qr_retraction(self.vh.weight.T).T)

    @torch.no_grad()
    def fold_into(self, layer: LowRankLinear) -> None:
        """Write the trained factors into ``layer``'s ``up`` and ``down`` (sqrt of ``|s|`` on each side)."""
        s = self.s.double()
        root = s.abs().sqrt()
        layer.up.weight.copy_((self.u.weight.double() * (root * torch.sign(s))).to(layer.up.weight.dtype))
        layer.down.weight.copy_((self.vh.weight.double() * root[:, None]).to(layer.down.weight.dtype))


def retract_(model: nn.Module) -> None:
    """:meth:`OrthonormalLowRank.retract_` on every orthonormal layer of ``model`` (after each optimizer step)."""
    for module in model.modules():
        if isinstance(module, OrthonormalLowRank):
            module.retract_()


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
