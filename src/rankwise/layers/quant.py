"""Quantized linear layers: packed group-quantized weights dequantized in forward, optionally plus a low-rank term.

``QuantLinear``: ``y = x Q^T (+ x R^T L^T) + b`` with ``Q`` a packed group-quantized matrix (see
:mod:`rankwise.quant` for the code layout) and an optional float16 low-rank correction ``L R`` (Q + LR).
``QuantLowRankLinear``: the two factors of a low-rank layer, each a ``QuantLinear``: ``y = up(down(x))``.
Both register in :data:`rankwise.layers.registry.LAYERS`, so checkpoints name them in their
``quantization_config`` and ``rankwise.load`` / stock ``from_pretrained`` rebuild them empty before the
stored tensors load.

State-dict keys: ``codes`` (uint8, (out, ceil(in * bits / 8))), ``scale`` (float16, (out, groups)),
``zero`` (uint8, (out, groups); asymmetric only), ``bias``, ``correction_up`` (out, r) and
``correction_down`` (r, in) (float16; Q + LR only), ``signs`` (int8, (in,); with an input rotation: the layer
applies ``Q R^T``, ``R = diag(signs) blockdiag(H)``, ``H`` the Hadamard matrix of the spec's ``rotation`` size); a
``QuantLowRankLinear`` holds ``down.*`` and ``up.*``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import is_int
from ..quant import QuantizedMatrix, check_bits, dequantize, pack_codes, rotate_inputs, unpack_codes
from .registry import LAYERS


def _int(spec: dict, key: str, low: int) -> int:
    v = spec.get(key)
    if not is_int(v) or v < low:
        raise ValueError(f"quantized layer spec needs {key} as an int >= {low}, got {v!r}")
    return v


def _dense_linear(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    dtype = bias.dtype if bias is not None else torch.float32
    dense = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(W.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


@LAYERS.register("quant_linear", paper="https://arxiv.org/abs/2210.17323")
class QuantLinear(nn.Module):
    """``y = x Q^T + x R^T L^T + b``; ``Q`` stored packed, dequantized on every forward (never cached)."""

    layer_type = "quant_linear"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = _int(spec, "in_features", 1), _int(spec, "out_features", 1)
        self.bits, self.group_size = check_bits(spec.get("bits")), _int(spec, "group_size", 1)
        self.symmetric, self.correction_rank = bool(spec.get("symmetric")), _int(spec, "correction_rank", 0)
        self.rotation = _int(spec, "rotation", 0) if spec.get("rotation") else 0  # Hadamard block of the inputs
        if self.rotation and (self.in_features % self.rotation or self.rotation & (self.rotation - 1)):
            raise ValueError(
                f"rotation must be a power of two dividing in_features={self.in_features}, got {self.rotation}"
            )
        groups = math.ceil(self.in_features / self.group_size)
        packed = math.ceil(self.in_features * self.bits / 8)
        self.register_buffer("codes", torch.zeros(self.out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(self.out_features, groups, dtype=torch.float16, device=device))
        zero = None if self.symmetric else torch.zeros(self.out_features, groups, dtype=torch.uint8, device=device)
        self.register_buffer("zero", zero)
        r = self.correction_rank
        half = dict(device=device, dtype=torch.float16)
        self.correction_up = nn.Parameter(torch.zeros(self.out_features, r, **half)) if r else None
        self.correction_down = nn.Parameter(torch.zeros(r, self.in_features, **half)) if r else None
        bias = spec.get("bias")
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)) if bias else None
        signs = torch.ones(self.in_features, dtype=torch.int8, device=device) if self.rotation else None
        self.register_buffer("signs", signs)

    def spec(self) -> dict:
        return {
            "layer": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "correction_rank": self.correction_rank,
            "bias": self.bias is not None,
        } | ({"rotation": self.rotation} if self.rotation else {})

    @classmethod
    def from_quantized(
        cls,
        q: QuantizedMatrix,
        bias: torch.Tensor | None = None,
        correction=None,
        dtype: torch.dtype = torch.float32,
        rotation: tuple[torch.Tensor, int] | None = None,
    ) -> QuantLinear:
        """From a :class:`~rankwise.quant.QuantizedMatrix` and, for Q + LR, ``correction = (L, R)``
        (shapes (out, r) and (r, in)); ``rotation = (signs, block)``: ``q`` quantizes ``W R``
        (:func:`rankwise.quant.gptq_rotated`) and the layer applies ``Q R^T``."""
        if rotation is not None and correction is not None:
            raise ValueError("a quantized layer takes a low-rank correction or an input rotation, not both")
        out, cin = q.shape
        spec = {
            "in_features": cin,
            "out_features": out,
            "bits": q.bits,
            "group_size": q.group_size,
            "symmetric": q.symmetric,
            "correction_rank": 0 if correction is None else int(correction[0].shape[1]),
            "bias": bias is not None,
            "rotation": 0 if rotation is None else rotation[1],
        }
        layer = cls(spec, device=q.codes.device, dtype=dtype)
        with torch.no_grad():
            if rotation is not None:
                layer.signs.copy_(rotation[0])
            layer.codes.copy_(pack_codes(q.codes, q.bits))
            layer.scale.copy_(q.scale)
            if q.zero is not None:
                layer.zero.copy_(q.zero)
            if correction is not None:
                layer.correction_up.copy_(correction[0])
                layer.correction_down.copy_(correction[1])
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def quantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized ``Q``, shape (out, in)."""
        codes = unpack_codes(self.codes, self.bits, self.in_features)
        return dequantize(codes, self.scale, self.zero, self.bits, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation:
            return F.linear(rotate_inputs(x, self.signs, self.rotation), self.quantized_weight(x.dtype), self.bias)
        y = F.linear(x, self.quantized_weight(x.dtype), self.bias)
        if self.correction_rank:
            y = y + F.linear(F.linear(x, self.correction_down.to(x.dtype)), self.correction_up.to(x.dtype))
        return y

    def dense_weight(self) -> torch.Tensor:
        W = self.quantized_weight(torch.float64)
        if self.rotation:
            return rotate_inputs(W, self.signs, self.rotation, transpose=True)  # Q R^T
        if self.correction_rank:
            W = W + self.correction_up.double() @ self.correction_down.double()
        return W

    def to_dense(self) -> nn.Linear:
        """The equivalent nn.Linear (dequantized weight plus correction, in the bias' dtype or float32)."""
        return _dense_linear(self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, correction_rank={self.correction_rank}"
            + (f", rotation={self.rotation}" if self.rotation else "")
        )


@LAYERS.register("quant_lowrank_linear", paper="https://arxiv.org/abs/2403.07378")
class QuantLowRankLinear(nn.Module):
    """A low-rank layer with quantized factors: ``y = up(down(x))``, both :class:`QuantLinear`."""

    layer_type = "quant_lowrank_linear"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = _int(spec, "in_features", 1), _int(spec, "out_features", 1)
        self.rank = _int(spec, "rank", 1)
        common = {
            "bits": spec.get("bits"),
            "group_size": spec.get("group_size"),
            "symmetric": spec.get("symmetric"),
            "correction_rank": 0,
        }
        self.down = QuantLinear(
            common | {"in_features": self.in_features, "out_features": self.rank, "bias": False}, device, dtype
        )
        self.up = QuantLinear(
            common | {"in_features": self.rank, "out_features": self.out_features, "bias": bool(spec.get("bias"))},
            device,
            dtype,
        )

    def spec(self) -> dict:
        return {
            "layer": self.layer_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bits": self.down.bits,
            "group_size": self.down.group_size,
            "symmetric": self.down.symmetric,
            "bias": self.up.bias is not None,
        }

    @classmethod
    def from_layers(cls, down: QuantLinear, up: QuantLinear) -> QuantLowRankLinear:
        spec = {
            "in_features": down.in_features,
            "out_features": up.out_features,
            "rank": down.out_features,
            "bits": down.bits,
            "group_size": down.group_size,
            "symmetric": down.symmetric,
            "bias": up.bias is not None,
        }
        layer = cls(spec, device=down.codes.device)
        layer.down, layer.up = down, up
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        return self.up.dense_weight() @ self.down.dense_weight()

    def to_dense(self) -> nn.Linear:
        return _dense_linear(self.dense_weight(), self.up.bias)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
