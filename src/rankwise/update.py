"""Closed-form refit of the up factor of each factorized layer to the dense outputs.

The refit uses the compressed model's inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibrate import _bar, model_inputs
from .layers.linear import LowRankLinear, dense_weight
from .targets import replace_module


def refit_(
    model: nn.Module,
    targets: dict[str, nn.Module],
    new: dict[str, LowRankLinear],
    calib: torch.Tensor,
    *,
    batch_size: int = 2,
    damping: float = 1e-6,
    progress: bool = True,
) -> None:
    """Refit ``up.weight`` (B) of every layer in ``new`` so that ``B A x'`` matches the dense ``W x``.

    ``x`` is the layer's input in the dense model and ``x'`` its input in the compressed model on the
    same calibration tokens, so each layer also absorbs the error its compressed predecessors put in
    its input. With ``A = down.weight`` (r, n) kept, least squares over all calibration tokens gives

        ``B = W K A^T (A G' A^T + d I)^{-1}``,  ``K = sum x x'^T``, ``G' = sum x' x'^T``  (n, n)

    (``d`` a relative ridge). Per batch the dense model runs first and keeps its layer inputs for that
    batch only, then the compressed model runs and accumulates ``K`` and ``G'``; nothing else is stored.
    ``model`` is left with its dense ``targets`` in place; ``new`` layers are updated in place.

    All layers are refit at once, each against its predecessors' unrefit outputs; on SmolLM2 this
    overcompensates and raised perplexity (BENCHMARKS.md), so ``CompressConfig.update`` is off by default.

    References
    ----------
    X. Wang et al., "SVD-LLM: Truncation-aware SVD for LLM compression", arXiv:2403.07378 (parameter
    update after truncation); X. Wang et al., "SVD-LLM V2", arXiv:2503.12340.
    """
    device = next(model.parameters()).device
    dense_in: dict[str, torch.Tensor] = {}
    K = {n: None for n in new}
    G = {n: None for n in new}
    mode = {"compressed": False}

    def pre_hook(name):
        def hook(module, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).float()
            if not mode["compressed"]:
                dense_in[name] = rows
                return
            xd = dense_in.pop(name).float()
            k, g = xd.T @ rows, rows.T @ rows
            K[name] = k.double() if K[name] is None else K[name] + k.double()
            G[name] = g.double() if G[name] is None else G[name] + g.double()

        return hook

    handles = [targets[n].register_forward_pre_hook(pre_hook(n)) for n in new]
    handles += [layer.register_forward_pre_hook(pre_hook(n)) for n, layer in new.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in _bar(range(0, calib.shape[0], batch_size), progress, "update"):
                batch = calib[start : start + batch_size].to(device)
                mode["compressed"] = False
                model(**model_inputs(batch))
                for n, layer in new.items():
                    replace_module(model, n, layer)
                mode["compressed"] = True
                try:
                    model(**model_inputs(batch))
                finally:
                    for n, layer in targets.items():
                        if n in new:
                            replace_module(model, n, layer)
                dense_in.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for n, layer in new.items():
        W = dense_weight(targets[n]).detach().to(torch.float64)
        A = layer.down.weight.detach().to(torch.float64)
        AG = A @ G[n].to(A.device)
        lhs = AG @ A.T
        lhs = lhs + damping * float(torch.diagonal(lhs).mean().clamp_min(1e-300)) * torch.eye(
            lhs.shape[0], dtype=lhs.dtype, device=lhs.device
        )
        rhs = W @ K[n].to(A.device) @ A.T  # (m, r)
        B = torch.linalg.solve(lhs, rhs.T).T
        if torch.isfinite(B).all():
            with torch.no_grad():
                layer.up.weight.copy_(B.to(layer.up.weight.dtype))
