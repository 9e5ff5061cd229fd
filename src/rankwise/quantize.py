"""quantize_(model, plan, stats): replace linear and low-rank layers by quantized ones, with GPTQ error feedback.

Every layer is quantized in the metric of its calibration inputs' second moment ``X^T X`` (the
statistics :func:`rankwise.calibrate.collect_stats` collects for compression, so one calibration serves
both): a dense ``nn.Linear`` becomes a :class:`~rankwise.layers.QuantLinear` (optionally with a
low-rank correction, Q + LR); a :class:`~rankwise.layers.LowRankLinear` ``B A`` becomes a
:class:`~rankwise.layers.QuantLowRankLinear`: ``A`` is quantized against ``X^T X``, ``B`` is refitted in
closed form to the layer's product given the quantized ``Â`` and quantized against ``Â X^T X Â^T``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._validate import choice, int_at_least
from .calibrate import CalibStats, _bar
from .layers.linear import LowRankLinear, dense_weight
from .layers.quant import QuantLinear, QuantLowRankLinear
from .quant import (
    check_bits,
    check_group_size,
    gptq,
    gptq_rotated,
    hessian_error,
    quantize_rtn,
    quantize_with_correction,
    rotation_block,
    rotation_signs,
)
from .targets import replace_module

ALGORITHMS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantizeConfig:
    """How one layer is quantized; frozen and JSON-serializable (``asdict``).

    bits : 2, 3, 4 or 8; group_size : 32, 64 or 128 input columns per scale; symmetric : no zero points.
    algorithm : "gptq" (error feedback) or "rtn" (round to nearest).
    correction_rank : rank of the float16 low-rank correction of a dense layer's quantization error (Q + LR;
        0: none); refits : Q + LR alternations. damp : GPTQ's relative ridge on ``X^T X``.
    rotate : quantize a dense layer's weight with its inputs rotated by a seeded random-sign block Hadamard
        matrix (incoherence processing, :func:`rankwise.quant.gptq_rotated`); the layer rotates its inputs in
        forward. GPTQ only, no correction; needs an even input width.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    algorithm: str = "gptq"
    correction_rank: int = 0
    refits: int = 2
    damp: float = 0.01
    rotate: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        choice(self.algorithm, "algorithm", ALGORITHMS)
        for name in ("correction_rank", "refits"):
            int_at_least(getattr(self, name), name, 0)
        if self.correction_rank and self.algorithm != "gptq":
            raise ValueError("correction_rank needs algorithm='gptq' (the correction is fitted to GPTQ's error)")
        if self.rotate and (self.algorithm != "gptq" or self.correction_rank):
            raise ValueError("rotate needs algorithm='gptq' and no correction_rank")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantLayerReport:
    name: str
    kind: str  # "quant", "quant+lr" or "lowrank+quant"
    config: dict
    bytes: int  # stored bytes of the new layer (codes, scales, zero points, factors, bias)
    dense_weights: int  # weights of the dense layer it replaces
    error: float  # relative output error on the calibration inputs, sqrt(tr(D H D^T) / tr(W H W^T))
    seconds: float


def module_bytes(module: nn.Module) -> int:
    """Bytes of every tensor ``module`` stores (parameters and persistent buffers), each storage once."""
    seen, total = set(), 0
    for t in module.state_dict(keep_vars=True).values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantize_matrix(W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig):
    """The :class:`~rankwise.quant.QuantizedMatrix` of ``W`` (out, in) under ``config`` (no correction)."""
    if config.algorithm == "rtn":
        return quantize_rtn(W, config.bits, config.group_size, symmetric=config.symmetric)
    return gptq(W, H, config.bits, config.group_size, symmetric=config.symmetric, damp=config.damp)


def quantize_dense(
    layer: nn.Module, H: torch.Tensor, config: QuantizeConfig, whitening: torch.Tensor | None = None
) -> QuantLinear:
    """A :class:`QuantLinear` for ``layer`` (nn.Linear or Conv1D) whose inputs have second moment ``H``
    (``whitening``: its whitening factor, if known, for a Q + LR correction)."""
    W = dense_weight(layer).detach()
    bias = getattr(layer, "bias", None)
    dtype = W.dtype
    if config.rotate:
        block = rotation_block(W.shape[1])
        if block < 2:
            raise ValueError(f"rotate needs an even input width, got {W.shape[1]}")
        signs = rotation_signs(W.shape[1])
        kw = {"symmetric": config.symmetric, "damp": config.damp}
        q = gptq_rotated(W, H, config.bits, config.group_size, signs, block, **kw)
        return QuantLinear.from_quantized(q, bias, dtype=dtype, rotation=(signs, block))
    if config.correction_rank:
        rank = min(config.correction_rank, *W.shape)
        q, L, R, _ = quantize_with_correction(
            W,
            H,
            config.bits,
            config.group_size,
            rank,
            symmetric=config.symmetric,
            refits=config.refits,
            damp=config.damp,
            whitening=whitening,
        )
        return QuantLinear.from_quantized(q, bias, (L, R), dtype=dtype)
    return QuantLinear.from_quantized(quantize_matrix(W, H, config), bias, dtype=dtype)


def quantize_factors(layer: LowRankLinear, H: torch.Tensor, config: QuantizeConfig) -> QuantLowRankLinear:
    """Quantize ``A = down.weight`` against ``H``, refit ``B`` to ``B A`` given ``Â`` (least squares in the
    metric of ``H``), then quantize ``B`` against ``Â H Â^T``."""
    A, B = layer.down.weight.detach().double(), layer.up.weight.detach().double()
    dtype = layer.down.weight.dtype
    H = H.double()
    plain = QuantizeConfig(config.bits, config.group_size, config.symmetric, config.algorithm, damp=config.damp)
    qa = quantize_matrix(A, H, plain)
    Ah = qa.dequantize(torch.float64)
    HA = Ah @ H @ Ah.T
    ridge = 1e-9 * float(torch.diagonal(HA).mean()) * torch.eye(HA.shape[0], dtype=HA.dtype)
    B = torch.linalg.solve(HA + ridge, Ah @ H @ (B @ A).T).T
    qb = quantize_matrix(B, HA, plain)
    down = QuantLinear.from_quantized(qa, None, dtype=dtype)
    up = QuantLinear.from_quantized(qb, layer.up.bias, dtype=dtype)
    return QuantLowRankLinear.from_layers(down, up)


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a dense, low-rank or quantized layer applies, float64."""
    if isinstance(layer, LowRankLinear):
        return layer.up.weight.double() @ layer.down.weight.double()
    if isinstance(layer, (QuantLinear, QuantLowRankLinear)):
        return layer.dense_weight()
    return dense_weight(layer).detach().double()


@torch.no_grad()
def quantize_(
    model: nn.Module, plan: dict[str, QuantizeConfig], stats: CalibStats, *, progress: bool = True
) -> list[QuantLayerReport]:
    """Quantize every layer named in ``plan`` in place (dense: ``QuantLinear``, low-rank: ``QuantLowRankLinear``).

    Parameters
    ----------
    plan : qualified layer name -> :class:`QuantizeConfig`.
    stats : input statistics of those layers (:func:`rankwise.calibrate.collect_stats` on the dense model;
        a low-rank layer uses the statistics of the dense layer it replaced, under the same name).

    Returns
    -------
    One :class:`QuantLayerReport` per layer, in ``plan`` order; the error is relative to the layer's
    weight before quantization.
    """
    missing = [n for n in plan if n not in stats.inputs]
    if missing:
        raise ValueError(f"stats has no statistics for layer {missing[0]} ({len(missing)} missing)")
    reports = []
    for name, config in _bar(list(plan.items()), progress, "quantize layers"):
        if not isinstance(config, QuantizeConfig):
            raise ValueError(f"plan[{name!r}] must be a rankwise QuantizeConfig, got {type(config).__name__}")
        t0 = time.perf_counter()
        layer = model.get_submodule(name)
        H = stats.inputs[name].covariance.to(torch.float64)
        before = layer_weight(layer)
        if isinstance(layer, LowRankLinear):
            if config.correction_rank:
                raise ValueError(f"layer {name} is low-rank already; correction_rank applies to dense layers only")
            new, kind = quantize_factors(layer, H, config), "lowrank+quant"
        else:
            new, kind = quantize_dense(layer, H, config), "quant+lr" if config.correction_rank else "quant"
        error = (hessian_error(before, layer_weight(new), H) / max(hessian_error(before, 0 * before, H), 1e-300)) ** 0.5
        dense_weights = before.numel()
        replace_module(model, name, new.to(before.device))
        reports.append(
            QuantLayerReport(
                name, kind, config.to_dict(), module_bytes(new), dense_weights, error, time.perf_counter() - t0
            )
        )
    return reports
