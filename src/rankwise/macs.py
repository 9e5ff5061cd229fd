"""Multiply-accumulates (MACs) of the ways to store a layer, and the allocation under a parameter and a MAC budget.

A layer's options are priced at the sizes seen during calibration (:attr:`ModuleStats.sizes`, positions per
example), so that a MAC budget, like the parameter budget, is one number summed over layers. Per example:

- Conv2d (groups 1, kernel kh x kw, input H x W, output Ho x Wo): dense ``Ho Wo out in kh kw``; SVD rank r
  (kxk in -> r, 1x1 r -> out) ``Ho Wo r (in kh kw + out)``; Tucker-2 (r_out, r_in) (1x1 at the input size,
  kxk core, 1x1) ``H W in r_in + Ho Wo (r_in r_out kh kw + r_out out)``; CP rank R (1x1, depthwise kx1 at
  Ho x W, depthwise 1xk, 1x1) ``H W in R + Ho W R kh + Ho Wo R (kw + out)``;
- Linear (n rows): dense ``n out in``, rank r ``n r (in + out)``; Embedding: dense 0 (a lookup), rank r
  ``n r dim``.

Bias additions are not counted. Under a MAC budget an option that does not need fewer MACs than the dense
layer is never offered: it cannot be worth its loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .allocate import allocate_options


def conv_macs(conv: nn.Conv2d, sizes: torch.Tensor, fmt: str | None, r0=None, r1=None):
    """MACs per example of ``conv`` stored as ``fmt`` (None: dense) at ranks ``r0`` (SVD / CP rank, Tucker r_out)
    and ``r1`` (Tucker r_in); ranks may be int tensors (the result is then a float64 tensor of their shape).

    sizes : Tensor, shape (3,): positions per example at the input (H W), output (Ho Wo) and Ho W.
    """
    out, cin, kh, kw = conv.weight.shape
    s_in, s_out, s_mid = (float(v) for v in sizes)
    if fmt is None:
        return s_out * out * cin * kh * kw
    if fmt == "svd":
        return s_out * r0 * (cin * kh * kw + out)
    if fmt == "tucker":
        return s_in * cin * r1 + s_out * (r1 * r0 * kh * kw + r0 * out)
    if fmt == "cp":
        return s_in * cin * r0 + s_mid * r0 * kh + s_out * r0 * (kw + out)
    raise ValueError(f"format must be None, 'svd', 'tucker' or 'cp', got {fmt!r}")


def matrix_macs(layer: nn.Module, sizes: torch.Tensor, rank=None):
    """MACs per example of a Linear (dense or rank ``rank``) or an Embedding (dense lookup or rank ``rank``)."""
    rows = float(sizes[0])
    if isinstance(layer, nn.Embedding):
        return 0.0 if rank is None else rows * rank * layer.embedding_dim
    m, n = layer.weight.shape
    return rows * m * n if rank is None else rows * rank * (m + n)


def allocate_budgets(
    params: list[list[float]],
    macs: list[list[float]],
    losses: list[list[float]],
    param_budget: float,
    mac_budget: float,
    *,
    steps: int = 24,
) -> list[int]:
    """One option per layer minimising the summed loss with ``sum params <= param_budget`` and
    ``sum macs <= mac_budget``.

    Where one constraint alone gives an allocation that meets the other, that allocation is optimal (up to
    :func:`rankwise.allocate.allocate_options`' own approximation) and is returned. Otherwise both bind: the
    allocator runs on the combined price ``params / param_budget + t * macs / mac_budget`` (the Lagrangian of
    both constraints, ``t`` the ratio of their multipliers) with the budget ``1 + t``, ``t`` bisected in log
    scale to where the MAC constraint turns binding, and the best allocation meeting both is kept; where none
    does (a discrete edge case), the combined budget is shrunk until one does. ``ValueError`` (one line) if
    the cheapest options exceed either budget.

    References
    ----------
    H. Everett, "Generalized Lagrange multiplier method for solving problems of optimum allocation of
    resources", Operations Research 11 (1963).
    """
    p_t = [torch.tensor(p, dtype=torch.float64) for p in params]
    m_t = [torch.tensor(m, dtype=torch.float64) for m in macs]
    for name, costs, budget, knob in (
        ("parameters", p_t, param_budget, "keep"),
        ("MACs", m_t, mac_budget, "keep_macs"),
    ):
        least = sum(float(c.min()) for c in costs)
        if least > budget:
            raise ValueError(
                f"the budget of {budget:.6g} {name} is below the {least:.6g} that the smallest option of every "
                f"layer needs; accepted: a larger {knob}"
            )

    def fits(idx: list[int]) -> bool:
        spent_p = sum(float(p[i]) for p, i in zip(p_t, idx))
        return spent_p <= param_budget and sum(float(m[i]) for m, i in zip(m_t, idx)) <= mac_budget

    for costs, budget in ((m_t, mac_budget), (p_t, param_budget)):
        idx = allocate_options([list(zip(c.tolist(), v)) for c, v in zip(costs, losses)], budget)
        if fits(idx):
            return idx

    def solve(t: float, shrink: float = 1.0) -> list[int]:
        priced = [list(zip((p / param_budget + t * m / mac_budget).tolist(), v)) for p, m, v in zip(p_t, m_t, losses)]
        return allocate_options(priced, (1.0 + t) * shrink)

    best, best_loss = None, float("inf")
    lo, hi = -12.0, 12.0  # log10 t
    for _ in range(steps):
        mid = (lo + hi) / 2
        idx = solve(10.0**mid)
        if fits(idx) and sum(v[i] for v, i in zip(losses, idx)) < best_loss:
            best, best_loss = idx, sum(v[i] for v, i in zip(losses, idx))
        if sum(float(m[i]) for m, i in zip(m_t, idx)) > mac_budget:
            lo = mid
        else:
            hi = mid
    shrink = 1.0
    while best is None:
        shrink *= 0.99
        idx = solve(10.0**hi, shrink)
        best = idx if fits(idx) else None
    return best
