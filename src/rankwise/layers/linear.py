"""LowRankLinear: a rank-r replacement for nn.Linear (and transformers' Conv1D), y = up(down(x))."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.svd import SVD, truncated_svd


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a Linear whose weight is stored (in, out). Matched by name, as
    importing transformers here only for ``isinstance`` would make it a dependency of every layer."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of ``layer`` as (out_features, in_features), for nn.Linear and transformers' Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if is_conv1d(layer):  # weight is (in, out)
        return layer.weight.T
    raise ValueError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


class LowRankLinear(nn.Module):
    """``y = x A^T B^T + b`` with ``A = down.weight`` (rank, in) and ``B = up.weight`` (out, rank).

    Two plain ``nn.Linear`` children, so the layer fine-tunes, casts and moves like any other and its
    state dict keys are ``down.weight``, ``up.weight`` and ``up.bias``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} layer, "
                f"got {rank}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_factors(
        cls, factors: SVD, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> LowRankLinear:
        """Build from ``W ≈ U diag(S) Vh``, splitting ``sqrt(S)`` onto both sides to balance their scales."""
        m, n = factors.shape
        dtype = dtype or factors.U.dtype
        layer = cls(n, m, factors.rank, bias=bias is not None, device=factors.U.device, dtype=dtype)
        root = torch.sqrt(factors.S.to(torch.float64))
        with torch.no_grad():
            layer.down.weight.copy_((factors.Vh.to(torch.float64) * root[:, None]).to(dtype))
            layer.up.weight.copy_((factors.U.to(torch.float64) * root).to(dtype))
            if bias is not None:
                layer.up.bias.copy_(bias.to(dtype))
        return layer

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: float | None = None) -> LowRankLinear:
        """Data-free truncated SVD of ``layer``'s weight (nn.Linear or Conv1D); full rank reproduces it."""
        W = dense_weight(layer).detach()
        return cls.from_factors(truncated_svd(W, rank), getattr(layer, "bias", None), dtype=W.dtype)

    def to_dense(self) -> nn.Linear:
        """The equivalent nn.Linear (product of the factors, computed in float64)."""
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.up.bias is not None,
            device=self.up.weight.device,
            dtype=self.up.weight.dtype,
        )
        with torch.no_grad():
            W = self.up.weight.to(torch.float64) @ self.down.weight.to(torch.float64)
            dense.weight.copy_(W.to(dense.weight.dtype))
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )
