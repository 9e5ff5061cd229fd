"""KronLinear: an nn.Linear as a sum of Kronecker products, y = sum_i (A_i ⊗ B_i) x applied factor by factor.

References
----------
C. F. Van Loan, N. Pitsianis, "Approximation with Kronecker products", in Linear Algebra for Large Scale
and Real-Time Applications, Kluwer (1993); the layer form follows e.g. A. Edalati et al., "Kronecker
decomposition for GPT compression", ACL 2022, arXiv:2110.08152.
"""

from __future__ import annotations

import torch
from torch import nn

from .._validate import is_int
from ..formats.kron import Kronecker, kron_decompose
from .registry import LAYERS
from .tt import balanced_factors


def kron_shapes(layer: str, out_features: int, in_features: int, a_shape=None, b_shape=None):
    """(a_shape, b_shape) with a_shape[i] * b_shape[i] = (out, in)[i]; default: near-square splits."""
    if a_shape is None and b_shape is None:
        (m1, m2), (n1, n2) = balanced_factors(out_features, 2), balanced_factors(in_features, 2)
        return (m1, n1), (m2, n2)
    ok = lambda s: isinstance(s, (list, tuple)) and len(s) == 2 and all(is_int(v) and v >= 1 for v in s)  # noqa: E731
    if ok(a_shape) and b_shape is None:
        b_shape = (out_features // a_shape[0], in_features // a_shape[1])
    if not (
        ok(a_shape)
        and ok(b_shape)
        and a_shape[0] * b_shape[0] == out_features
        and a_shape[1] * b_shape[1] == in_features
    ):
        raise ValueError(
            f"{layer}: format 'kronecker' needs a_shape and b_shape with a_shape[0]*b_shape[0] = "
            f"{out_features} and a_shape[1]*b_shape[1] = {in_features}, got {a_shape!r} and {b_shape!r}"
        )
    return tuple(a_shape), tuple(b_shape)


@LAYERS.register("kron_linear", paper="https://doi.org/10.1007/978-94-015-8196-7_17")
class KronLinear(nn.Module):
    """``y = x W^T + b`` with ``W = sum_i kron(A[i], B[i])``, ``A`` (r, m1, n1), ``B`` (r, m2, n2).

    For ``x`` viewed as (n1, n2), ``kron(A, B) x = A X B^T``: two small contractions per term, never W.
    State dict keys ``A``, ``B``, ``bias``.
    """

    layer_type = "kron_linear"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(spec["in_features"]), int(spec["out_features"])
        self.a_shape, self.b_shape, self.rank = tuple(spec["a_shape"]), tuple(spec["b_shape"]), int(spec["rank"])
        self.A = nn.Parameter(torch.empty(self.rank, *self.a_shape, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(self.rank, *self.b_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if spec["bias"] else None

    def spec(self) -> dict:
        return {
            "layer": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "a_shape": list(self.a_shape),
            "b_shape": list(self.b_shape),
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_factors(cls, kron: Kronecker, bias: torch.Tensor | None = None, dtype=None) -> KronLinear:
        dtype = dtype or kron.A.dtype
        out, cin = kron.shape
        spec = {
            "in_features": cin,
            "out_features": out,
            "a_shape": tuple(kron.A.shape[1:]),
            "b_shape": tuple(kron.B.shape[1:]),
            "rank": kron.rank,
            "bias": bias is not None,
        }
        layer = cls(spec, device=kron.A.device, dtype=dtype)
        with torch.no_grad():
            layer.A.copy_(kron.A.to(dtype))
            layer.B.copy_(kron.B.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank=None, *, a_shape=None, b_shape=None) -> KronLinear:
        """Nearest sum of ``rank`` Kronecker products (data-free); ``rank`` int, float fraction or None (exact)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"kron_linear.from_dense expects an nn.Linear, got {type(linear).__name__}")
        a, b = kron_shapes("kron_linear", linear.out_features, linear.in_features, a_shape, b_shape)
        try:
            kron = kron_decompose(linear.weight.detach().to(torch.float64), a, b, rank)
        except ValueError as exc:
            raise ValueError(f"kron_linear {linear.out_features}x{linear.in_features}: {exc}") from None
        return cls.from_factors(kron, linear.bias, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        X = x.reshape(-1, self.a_shape[1], self.b_shape[1])
        T = torch.einsum("bjl,rkl->brjk", X, self.B)
        y = torch.einsum("rij,brjk->bik", self.A, T).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        return Kronecker(self.A.detach().to(torch.float64), self.B.detach().to(torch.float64)).to_dense()

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.A.device, dtype=self.A.dtype
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().to(self.A.dtype))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"a_shape={self.a_shape}, b_shape={self.b_shape}, rank={self.rank}, bias={self.bias is not None}"
