"""Quantize a model to a byte budget: per layer, the bit width, correction or factorization that buys the most.

Every target layer is quantized once per candidate :class:`~rankwise.quantize.QuantizeConfig` (bit
widths, Q + LR corrections, GPTQ on Hadamard-rotated inputs) and factorized at a few ranks with quantized
factors (the whitened, Fisher-weighted SVD of :func:`rankwise.metric.factorize`, then
:func:`rankwise.quantize.quantize_factors`); each candidate's stored bytes are counted from the layer it builds
and its loss increase estimated from its output error on the calibration inputs, weighted per output channel
by the loss-gradient second moment when calibration collected one (``tr(diag(g) D C D^T)`` for the
weight error ``D``, the input second moment ``C`` and ``g = E[(dL/dy)^2]``; plain ``tr(D C D^T)`` without
gradients). A multiple-choice knapsack (:func:`rankwise.allocate.allocate_options`) then picks one
candidate per layer within the budget, and those layers are swapped in.

Bytes are counted honestly: a bits-per-weight budget covers everything the target layers store (codes,
scales, zero points, correction factors, biases) over their dense weight count; a size budget covers
every tensor the model stores, the untouched ones (embeddings, norms, layers left out) included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ._validate import is_number
from .allocate import allocate_options
from .calibrate import CalibStats, _bar
from .formats.svd import whitening_factor
from .layers.linear import LowRankLinear, dense_weight
from .quant import rotation_block
from .quantize import QuantizeConfig, QuantLayerReport, layer_weight, module_bytes, quantize_dense, quantize_factors
from .targets import replace_module

# bit widths 2/3/4 at group 128 and Q + LR at 2 and 3 bits: a ladder from ~2.2 to ~4.3 bits per weight; the same
# widths with Hadamard-rotated inputs (incoherence processing; MiniLM: GPTQ 3-bit 0.903 -> 0.934 cosine)
DEFAULT_CANDIDATES = (
    QuantizeConfig(2, 128),
    QuantizeConfig(2, 64),
    QuantizeConfig(3, 128),
    QuantizeConfig(4, 128),
    QuantizeConfig(2, 128, correction_rank=16),
    QuantizeConfig(3, 128, correction_rank=16),
    QuantizeConfig(2, 128, rotate=True),
    QuantizeConfig(2, 64, rotate=True),
    QuantizeConfig(3, 128, rotate=True),
    QuantizeConfig(4, 128, rotate=True),
)
# low-rank + quantized factors: ranks keeping these fractions of the dense parameters, factors at 4 bits
DEFAULT_LOWRANK_KEEPS = (0.4, 0.55, 0.7, 0.85)
FACTOR_CONFIG = QuantizeConfig(4, 128)
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``60MB``, ``1.5GB``, ``500KiB`` or ``123456`` (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if m is None or (unit and unit not in SIZE_UNITS):
        raise ValueError(
            f"size must be a number of bytes with an optional unit B, KB, MB, GB, KiB, MiB, GiB "
            f"(e.g. 60MB), got {text!r}"
        )
    return int(float(m.group(1)) * SIZE_UNITS[unit or "B"])


def untouched_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of every tensor ``model`` stores outside the layers ``names`` (tied tensors once)."""
    return module_bytes(model) - sum(module_bytes(model.get_submodule(n)) for n in names)


def check_size_covers(size: int, fixed: int) -> None:
    """``ValueError`` naming the minimum when ``size`` leaves nothing beyond the ``fixed`` bytes of the untouched
    tensors."""
    if size <= fixed:
        raise ValueError(
            f"size {size:,} bytes is below the {fixed:,} bytes the model's untouched tensors "
            f"(embeddings, norms, layers not quantized) need; the minimum is more than {fixed:,}"
        )


@torch.no_grad()
def check_size(model: nn.Module, names: list[str], size: int) -> int:
    """The bytes of the tensors outside ``names``; ``ValueError`` naming them when ``size`` leaves nothing beyond."""
    fixed = untouched_bytes(model, names)
    check_size_covers(size, fixed)
    return fixed


def candidate_loss(W: torch.Tensor, What: torch.Tensor, cov: torch.Tensor, grad_sq: torch.Tensor | None) -> float:
    """Estimated loss increase of replacing ``W`` by ``What``: ``tr(diag(g) D C D^T)`` (``g`` = 1 without gradients)."""
    D = W - What
    per_row = ((D @ cov) * D).sum(1)
    return float(per_row.sum() if grad_sq is None else per_row @ grad_sq.to(per_row))


@dataclass
class Candidate:
    """One way to quantize one layer: the layer it builds, its stored bytes, its estimated loss increase and
    relative output error (``sqrt(tr(D C D^T) / tr(W C W^T))``)."""

    config: QuantizeConfig
    layer: nn.Module
    bytes: int
    loss: float
    error: float
    rank: int | None = None  # low-rank + quantized factors at this rank; None: the dense layer quantized

    @property
    def kind(self) -> str:
        return "lowrank+quant" if self.rank else "quant+lr" if self.config.correction_rank else "quant"

    def describe(self) -> dict:
        return self.config.to_dict() | ({"rank": self.rank} if self.rank else {})


def layer_options(shape: tuple[int, int], candidates=DEFAULT_CANDIDATES, lowrank_keeps=DEFAULT_LOWRANK_KEEPS):
    """The ``(QuantizeConfig, rank or None)`` candidates of a dense (out, in) layer: every config of
    ``candidates`` on the dense weight (the rotated ones where the input width is even), then low rank at every
    fraction of ``lowrank_keeps`` of its parameters (below full rank) with :data:`FACTOR_CONFIG` factors."""
    m, n = shape
    ranks = [max(1, int(keep * m * n / (m + n))) for keep in lowrank_keeps]
    dense = [(c, None) for c in candidates if not c.rotate or rotation_block(n) >= 2]
    return dense + [(FACTOR_CONFIG, r) for r in ranks if r < min(m, n)]


@torch.no_grad()
def build_candidate(
    layer: nn.Module, name: str, stats: CalibStats, config: QuantizeConfig, rank: int | None, cache: dict
) -> Candidate:
    """One candidate of :func:`layer_options` for the dense ``layer`` (not modified): the layer it builds, its
    bytes, estimated loss and error. ``cache`` keeps what the layer's candidates share (pass the same dict
    for every candidate of one layer)."""
    from .compress import CompressConfig
    from .metric import factorize

    W = layer_weight(layer)
    st = stats.inputs[name]
    if "cov" not in cache:
        cache["cov"] = st.covariance.to(torch.float64)
        cache[id(st)] = whitening_factor(st.covariance)  # the form metric.factorize caches it in
    cov, g = cache["cov"], stats.out_grad_sq.get(name)
    if rank is None:
        new = quantize_dense(layer, cov, config, cache[id(st)])
    else:
        if "svd" not in cache:
            method = CompressConfig(allocate="loss-aware" if stats.out_grad_sq else "uniform")
            cache["svd"] = factorize(dense_weight(layer).detach(), method, stats, name, cache)
        bias = getattr(layer, "bias", None)  # in the layer's dtype, as every candidate stores it
        low = LowRankLinear.from_factors(cache["svd"].truncate(rank), bias, dtype=dense_weight(layer).dtype)
        new = quantize_factors(low, cov, config)
    What = new.dense_weight()
    total = max(candidate_loss(W, 0 * W, cov, None), 1e-300)
    error = (candidate_loss(W, What, cov, None) / total) ** 0.5
    return Candidate(config, new, module_bytes(new), candidate_loss(W, What, cov, g), error, rank)


@torch.no_grad()
def layer_candidates(
    model: nn.Module,
    names: list[str],
    stats: CalibStats,
    candidates=DEFAULT_CANDIDATES,
    *,
    lowrank_keeps=DEFAULT_LOWRANK_KEEPS,
    progress: bool = True,
) -> dict[str, list[Candidate]]:
    """Every layer of ``names`` built as every candidate of :func:`layer_options` (``model`` is not modified)."""
    built: dict[str, list[Candidate]] = {}
    for name in _bar(names, progress, "quantize candidates"):
        layer, cache = model.get_submodule(name), {}
        options = layer_options(tuple(layer_weight(layer).shape), candidates, lowrank_keeps)
        built[name] = [build_candidate(layer, name, stats, c, r, cache) for c, r in options]
    return built


def check_budget(bits_per_weight: float | None, size: int | None) -> None:
    """``ValueError`` unless exactly one budget is given and ``bits_per_weight`` is a number > 0."""
    if (bits_per_weight is None) == (size is None):
        raise ValueError("give exactly one budget: bits_per_weight (over the quantized layers) or size (bytes)")
    if size is None and (not is_number(bits_per_weight) or bits_per_weight <= 0):
        raise ValueError(f"bits_per_weight must be a number > 0, got {bits_per_weight!r}")


def allocate_budget(
    options: list[list[tuple[int, float]]],
    dense_weights: int,
    *,
    bits_per_weight: float | None = None,
    size: int | None = None,
    fixed: int = 0,
) -> list[int]:
    """Per layer, the index of the ``(bytes, loss)`` option :func:`allocate_options` picks within
    ``bits_per_weight`` over the layers' ``dense_weights``, or within ``size`` bytes less the ``fixed`` bytes of
    the untouched tensors (exactly one of the two). ``ValueError`` naming the minimum when even the cheapest
    options do not fit."""
    check_budget(bits_per_weight, size)
    budget = size - fixed if size is not None else bits_per_weight * dense_weights / 8
    cheapest = sum(min(b for b, _ in opts) for opts in options)
    if cheapest > budget:
        need = f"{cheapest * 8 / dense_weights:.3f} bits per weight" if size is None else f"{cheapest + fixed:,} bytes"
        raise ValueError(f"the budget is below the smallest quantization of every layer; the minimum is {need}")
    return allocate_options(options, budget)


@torch.no_grad()
def quantize_to_budget_(
    model: nn.Module,
    names: list[str],
    stats: CalibStats,
    *,
    bits_per_weight: float | None = None,
    size: int | None = None,
    candidates=DEFAULT_CANDIDATES,
    built=None,
    progress: bool = True,
) -> list[QuantLayerReport]:
    """Quantize the dense layers ``names`` of ``model`` in place within ``bits_per_weight`` (over those
    layers' dense weights) or ``size`` (bytes of the whole model); exactly one of the two.

    ``built``: :func:`layer_candidates` of this model (or of an identical copy), to try several budgets
    without quantizing again; its layers are swapped into ``model``. Raises ``ValueError`` naming the
    minimum when the budget is below what the cheapest candidates (and, for ``size``, the untouched
    tensors) need.
    """
    dense_weights = sum(layer_weight(model.get_submodule(n)).numel() for n in names)
    check_budget(bits_per_weight, size)
    fixed = check_size(model, names, size) if size is not None else 0
    built = built if built is not None else layer_candidates(model, names, stats, candidates, progress=progress)
    options = [[(c.bytes, c.loss) for c in built[n]] for n in names]
    choice = allocate_budget(options, dense_weights, bits_per_weight=bits_per_weight, size=size, fixed=fixed)
    reports = []
    for name, k in zip(names, choice):
        c = built[name][k]
        dense_weights = layer_weight(model.get_submodule(name)).numel()
        replace_module(model, name, c.layer)
        reports.append(QuantLayerReport(name, c.kind, c.describe(), c.bytes, dense_weights, c.error, 0.0))
    return reports
