"""TTLinear: an nn.Linear as a TT-matrix (matrix product operator) whose cores multiply the input directly.

References
----------
A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing neural networks", NeurIPS 2015,
arXiv:1509.06569; I. V. Oseledets, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5) (2011).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validate import is_int
from ..formats.tt import TTMatrix, tt_matrix
from .registry import LAYERS


def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """``n`` as a product of ``d`` factors as equal as its prime factors allow, largest first.

    >>> balanced_factors(768, 3)
    (12, 8, 8)
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"balanced_factors needs an int n >= 1, got {n!r}")
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    buckets = [1] * d
    for q in sorted(primes, reverse=True):  # largest prime into the currently smallest bucket
        buckets[buckets.index(min(buckets))] *= q
    return tuple(sorted(buckets, reverse=True))


def check_tt_dims(layer: str, name: str, dims, size: int, d: int | None = None) -> tuple[int, ...]:
    """``dims`` (None: balanced factors of ``size`` in ``d`` parts) checked to multiply to ``size``."""
    if dims is None:
        return balanced_factors(size, d or 3)
    if (
        not isinstance(dims, (list, tuple))
        or len(dims) < 2
        or any(not is_int(m) or m < 1 for m in dims)
        or math.prod(dims) != size
    ):
        raise ValueError(
            f"{layer}: format 'tt' needs {name} of at least 2 positive ints multiplying to {size}, "
            f"got {dims!r}; accepted e.g. {balanced_factors(size, 3)}"
        )
    return tuple(dims)


def tt_matrix_apply(cores, x: torch.Tensor, col_dims: tuple[int, ...]) -> torch.Tensor:
    """``x @ W^T`` for the TT-matrix ``W`` of ``cores`` (r_{k-1}, m_k, n_k, r_k), core by core.

    x : Tensor, shape (B, prod(col_dims)); returns shape (B, prod(m_k)). The state after core k has
    shape (B, m_1...m_k, r_k, n_{k+1}...n_d): each step is one contraction over (r_{k-1}, n_k), so the
    cost is sum_k B m_1..m_k r_{k-1} n_k r_k n_{k+1}..n_d and the dense W is never formed.
    """
    batch = x.shape[0]
    state = x.reshape(batch, 1, 1, col_dims[0], -1)  # (B, M_done=1, r_0=1, n_1, N_rest)
    for k, core in enumerate(cores):
        r1 = core.shape[3]
        rest = state.shape[-1] // (col_dims[k + 1] if k + 1 < len(col_dims) else 1)
        out = torch.einsum("barnc,rmns->bamsc", state, core)
        if k + 1 < len(col_dims):
            state = out.reshape(batch, -1, r1, col_dims[k + 1], rest)
        else:
            state = out
    return state.reshape(batch, -1)


@LAYERS.register("tt_linear", paper="https://arxiv.org/abs/1509.06569")
class TTLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` (out, in) a TT-matrix: ``cores[k]`` (r_{k-1}, m_k, n_k, r_k),
    prod m_k = out_features, prod n_k = in_features. State dict keys ``cores.{k}`` and ``bias``."""

    layer_type = "tt_linear"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(spec["in_features"]), int(spec["out_features"])
        self.row_dims, self.col_dims = tuple(spec["row_dims"]), tuple(spec["col_dims"])
        self.ranks = tuple(spec["ranks"])
        full = (1, *self.ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], m, n, full[k + 1], device=device, dtype=dtype))
            for k, (m, n) in enumerate(zip(self.row_dims, self.col_dims))
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if spec["bias"] else None

    def spec(self) -> dict:
        return {
            "layer": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "row_dims": list(self.row_dims),
            "col_dims": list(self.col_dims),
            "ranks": list(self.ranks),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_factors(cls, ttm: TTMatrix, bias: torch.Tensor | None = None, dtype=None) -> TTLinear:
        dtype = dtype or ttm.cores[0].dtype
        out, cin = ttm.shape
        spec = {
            "in_features": cin,
            "out_features": out,
            "row_dims": ttm.row_dims,
            "col_dims": ttm.col_dims,
            "ranks": ttm.ranks,
            "bias": bias is not None,
        }
        layer = cls(spec, device=ttm.cores[0].device, dtype=dtype)
        with torch.no_grad():
            for p, core in zip(layer.cores, ttm.cores):
                p.copy_(core.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank=None, *, row_dims=None, col_dims=None, d: int = 3) -> TTLinear:
        """TT-SVD of ``linear.weight`` reshaped as a TT-matrix (data-free).

        rank : int (maximal bond), tuple of d-1 ints, float fraction or None (exact), as in :func:`tt_svd`.
        row_dims, col_dims : factorizations of out_features and in_features (default: ``d`` balanced factors).
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"tt_linear.from_dense expects an nn.Linear, got {type(linear).__name__}")
        rows = check_tt_dims("tt_linear", "row_dims", row_dims, linear.out_features, d)
        cols = check_tt_dims("tt_linear", "col_dims", col_dims, linear.in_features, len(rows))
        if len(rows) != len(cols):
            raise ValueError(f"tt_linear: format 'tt' needs row_dims and col_dims of one length, got {rows} and {cols}")
        try:
            ttm = tt_matrix(linear.weight.detach().to(torch.float64), rows, cols, rank)
        except ValueError as exc:
            raise ValueError(f"tt_linear {linear.out_features}x{linear.in_features}: {exc}") from None
        return cls.from_factors(ttm, linear.bias, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = tt_matrix_apply(list(self.cores), x.reshape(-1, self.in_features), self.col_dims)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix of the cores, in float64."""
        return TTMatrix(tuple(c.detach().to(torch.float64) for c in self.cores)).to_dense()

    def to_dense(self) -> nn.Linear:
        ref = self.cores[0]
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=ref.device, dtype=ref.dtype
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().to(ref.dtype))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"row_dims={self.row_dims}, col_dims={self.col_dims}, ranks={self.ranks}, bias={self.bias is not None}"
