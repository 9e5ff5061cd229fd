"""What a compression run reports: one :class:`LayerReport` per target, the :class:`CompressReport` of the run
(totals, timings, its config, the allocator's predicted-loss curve), and its one-screen summary; for any
nn.Module (:class:`rankwise.ModuleCompressConfig`) the same as :class:`ModuleLayerReport` /
:class:`ModuleCompressReport`."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .metric import predicted_loss

if TYPE_CHECKING:
    from .compress import CompressConfig
    from .compress_modules import ModuleCompressConfig


def tied_label(name: str, tied: str | None) -> str:
    """How summaries and reports name a layer: a tied LM head as its table's two uses, ``"<embedding> + <head>
    (tied)"``."""
    return name if tied is None else f"{tied} + {name} (tied)"


@dataclass
class LayerReport:
    """One target layer: ``rank`` None means it was left dense (no rank would save parameters); ``tied`` names
    the input embedding that shares a tied LM head's table (factorized with it), else None."""

    name: str
    shape: tuple[int, int]
    rank: int | None
    params_before: int
    params_after: int
    error: float  # relative whitened (or scaled / plain, by method) Frobenius error of the truncation
    seconds: float
    loss: float = 0.0  # the allocator's predicted loss increase of this layer at its rank
    spectrum: list[float] = field(
        default_factory=list, repr=False
    )  # singular values in the truncated metric / the first
    tied: str | None = None

    @property
    def label(self) -> str:
        return tied_label(self.name, self.tied)


class _Totals:
    """The totals of a run's ``layers`` (each with ``name``, ``rank``, ``params_before``, ``params_after`` and
    ``loss``) and its JSON form (``to_dict`` is the run's)."""

    layers: list

    @property
    def ranks(self) -> dict:
        """Module name -> rank of every factorized target (dense-kept layers are absent); a tied table is listed
        once, under the head's name (its embedding, ``LayerReport.tied``, has the same rank)."""
        return {layer.name: layer.rank for layer in self.layers if layer.rank is not None}

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def predicted_loss(self) -> float:
        """The allocator's objective at the chosen ranks: the targets' summed predicted loss increases."""
        return sum(layer.loss for layer in self.layers)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@dataclass
class CompressReport(_Totals):
    """Per-layer results, totals, timings (seconds) and the config that produced them."""

    layers: list[LayerReport]
    config: CompressConfig
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None  # the process's peak resident memory when the run ended, if measured
    curve: list[dict] = field(default_factory=list)  # the allocator at other budgets, see budget_curve

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "layers": [asdict(layer) | {"shape": list(layer.shape)} for layer in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "predicted_loss": self.predicted_loss,
            "timings": dict(self.timings),
            "peak_rss_mib": self.peak_rss_mib,
            "curve": list(self.curve),
        }

    def summary(self) -> str:
        """A one-screen table: one row per layer kind (block index replaced by ``*``), then totals."""
        groups: dict[str, list[LayerReport]] = {}
        for layer in self.layers:
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", layer.label), []).append(layer)
        head = f"{'layers':<44} {'n':>4} {'shape':>11} {'ranks (min-max)':>16} {'kept':>6} {'err':>6}"
        lines = [head, "-" * len(head)]
        for key, ls in groups.items():
            rs = [layer.rank if layer.rank is not None else min(layer.shape) for layer in ls]
            dense = sum(layer.rank is None for layer in ls)
            rtxt = f"{min(rs)}-{max(rs)}" + (f" {dense}d" if dense else "")
            kept = sum(layer.params_after for layer in ls) / sum(layer.params_before for layer in ls)
            err = sum(layer.error for layer in ls) / len(ls)
            shape = "x".join(map(str, ls[0].shape))
            lines.append(f"{key[-44:]:<44} {len(ls):>4} {shape:>11} {rtxt:>16} {kept:>6.3f} {err:>6.3f}")
        c = self.config
        lines.append("-" * len(head))
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,} "
            f"(kept {self.params_after / self.params_before:.3f}, "
            f"target {c.keep}); method={c.method} allocate={c.allocate} update={c.update} sequential={c.sequential}"
        )
        lines.append("time " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def layer_report(curve, rank: int | None, error: float | None = None, tied: str | None = None) -> LayerReport:
    """A :class:`LayerReport` from a layer's allocator curve and its rank (None: left dense); the relative
    error in the truncated metric is the curve's (``sqrt(tail / total)``) unless given; ``tied``: the input
    embedding sharing a tied head's table."""
    cost = curve.cost
    gains = cost.gains.double().clamp_min(0)
    loss = predicted_loss(cost, rank)
    if error is None:
        error = 0.0 if rank is None else (loss / max(float(gains.sum()), 1e-300)) ** 0.5
    spectrum = (gains / max(float(gains[0]), 1e-300)).sqrt() if len(gains) else gains
    return LayerReport(
        curve.name,
        cost.shape,
        rank,
        cost.dense_params,
        cost.params(rank),
        error,
        curve.seconds,
        loss,
        [float(f"{v:.5g}") for v in spectrum.tolist()],
        tied,
    )


@dataclass
class ModuleLayerReport:
    """One target of :func:`rankwise.compress_` with a :class:`rankwise.ModuleCompressConfig`: ``format`` and
    ``rank`` None mean it was left dense; a Tucker-2 rank is ``(output, input)``; MACs are per calibration
    example (None without calibration inputs); ``loss`` is the allocator's predicted loss increase."""

    name: str
    kind: str  # "conv2d", "linear" or "embedding"
    format: str | None
    rank: int | tuple[int, ...] | None
    params_before: int
    params_after: int
    macs_before: float | None
    macs_after: float | None
    loss: float


@dataclass
class ModuleCompressReport(_Totals):
    """Per-layer results and totals of compressing any nn.Module, and the config that produced them."""

    layers: list[ModuleLayerReport]
    config: ModuleCompressConfig

    @property
    def macs_before(self) -> float | None:
        """Summed MACs per calibration example of the targets (None without calibration)."""
        macs = [layer.macs_before for layer in self.layers]
        return None if None in macs else sum(macs)

    @property
    def macs_after(self) -> float | None:
        macs = [layer.macs_after for layer in self.layers]
        return None if None in macs else sum(macs)

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "layers": [asdict(layer) for layer in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "predicted_loss": self.predicted_loss,
        }

    def summary(self) -> str:
        """One row per target (name, kind, format, rank, parameters and MACs kept), then the totals."""
        head = f"{'layer':<36} {'kind':>9} {'format':>7} {'rank':>10} {'kept':>6} {'macs':>6}"
        lines = [head, "-" * len(head)]

        def kept(after, before):
            return "-" if after is None or before is None else f"{after / before:.3f}"

        for layer in self.layers:
            rank = (
                "-"
                if layer.rank is None
                else "x".join(map(str, layer.rank if isinstance(layer.rank, tuple) else [layer.rank]))
            )
            lines.append(
                f"{layer.name[-36:]:<36} {layer.kind:>9} {layer.format or 'dense':>7} {rank:>10} "
                f"{kept(layer.params_after, layer.params_before):>6} {kept(layer.macs_after, layer.macs_before):>6}"
            )
        c = self.config
        params = kept(self.params_after, self.params_before)
        macs = kept(self.macs_after, self.macs_before) + ("" if c.keep_macs is None else f" (target {c.keep_macs})")
        lines.append("-" * len(head))
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,} (kept {params}, target {c.keep}); "
            f"macs kept {macs}; format={c.format} method={c.method} sequential={c.sequential}"
        )
        return "\n".join(lines)
