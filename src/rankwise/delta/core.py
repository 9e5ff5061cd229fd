"""The delta data class: a fine-tune stored as ``base + B @ A`` per layer (plus exact tensors), and reading one
from a PEFT LoRA adapter."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..allocate import allocate_delta_ranks
from .peft import read_peft, save_peft

DELTA_FILE = "rankwise_delta.json"  # what extraction found, beside the adapter (read by ``rankwise report``)
CURVE_KEEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # factor budgets of the report's error curve


@dataclass
class Delta:
    """A fine-tune stored as ``base + delta``.

    lora : dict module name -> (A, B), A : Tensor, shape (r, in_features); B : Tensor, shape
        (out_features, r); ``B @ A`` approximates ``W_ft - W_base`` in (out, in) orientation, scaling 1.
    bias : dict module name -> Tensor, shape (out_features,), exact ``b_ft - b_base`` of LoRA'd modules.
    exact : dict parameter name -> Tensor, the fine-tuned value of every parameter of a module stored
        exactly (embeddings, norms, non-targeted layers that changed).
    transposed : module names whose weight is stored (in, out) (transformers' Conv1D).
    spectra : dict module name -> Tensor, the singular values computed for the layer's delta: all
        ``min(m, n)`` of them (with ``keep`` / ``energy``, from the Gram eigenvalues: exact to about
        ``1e-8`` of the largest, see :func:`~rankwise.formats._ops.gram_singular_values`; full rank:
        from the SVD), or with a fixed rank the leading ones that
        :func:`~rankwise.formats.svd.truncated_svd` computed (empty for a delta read from a PEFT adapter).
    energy : dict module name -> float, ``||W_ft - W_base||_F**2`` of the layer (same layers as ``spectra``).
    dense_params : ``sum(m * n)`` over the layers of ``spectra`` (the budget's reference).
    shapes : dict module name -> (out_features, in_features) of every layer in ``lora`` or ``bias``.
    tied : dict parameter name -> the name in ``exact`` it is tied to (a tied output head), so that
        exports can name both.
    timings : seconds spent per phase of the extraction.
    """

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    dense_params: int = 0
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(A.shape[0]) for name, (A, _) in self.lora.items()}

    @property
    def num_params(self) -> int:
        """Parameters of the LoRA factors only (``sum r * (m + n)``)."""
        return sum(A.numel() + B.numel() for A, B in self.lora.values())

    def relative_error(self) -> float:
        """``||D - B A||_F / ||D||_F`` over every layer of ``spectra`` (dropped layers count in full)."""
        kept = sum(float((s[: self.ranks.get(n, 0)].double() ** 2).sum()) for n, s in self.spectra.items())
        total = sum(self.energy.values())
        return math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0

    def weight_delta(self, module: str) -> torch.Tensor:
        """``B @ A`` (in float64) in the orientation of the module's stored weight."""
        A, B = self.lora[module]
        D = B.double() @ A.double()
        return D.T if module in self.transposed else D

    def apply_to(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The value of parameter ``name`` after applying the delta to its base value ``tensor``."""
        if name in self.exact:
            return self.exact[name].to(tensor.dtype).clone()
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in self.lora:
            D = self.weight_delta(module)
            if tuple(D.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"delta for {name!r} has shape {tuple(D.shape)}, the model's tensor {tuple(tensor.shape)}"
                )
            return (tensor.double() + D.to(tensor.device)).to(tensor.dtype)
        if leaf == "bias" and module in self.bias:
            return (tensor.double() + self.bias[module].double().to(tensor.device)).to(tensor.dtype)
        return tensor

    def targets(self) -> list[str]:
        """Every parameter name the delta changes."""
        names = [f"{m}.weight" for m in self.lora] + [f"{m}.bias" for m in self.bias] + list(self.exact)
        return sorted(set(names))

    def error_curve(self, keeps=CURVE_KEEPS) -> list[dict]:
        """The relative squared error ``||D - BA||^2 / ||D||^2`` the greedy allocation reaches at each factor
        budget ``keep * dense_params``: ``[{"keep", "params_after", "predicted_loss"}]``; empty unless every
        layer's whole spectrum is known (a fixed ``rank`` computes the leading singular values only)."""
        total = sum(self.energy.values())
        if not self.spectra or total <= 0 or any(len(s) < min(self.shapes[n]) for n, s in self.spectra.items()):
            return []
        points = []
        for keep in keeps:
            ranks = allocate_delta_ranks(self.spectra, self.shapes, budget=int(keep * self.dense_params))
            kept = sum(float((s[: ranks[n]].double() ** 2).sum()) for n, s in self.spectra.items())
            points.append(
                {
                    "keep": keep,
                    "params_after": sum(r * sum(self.shapes[n]) for n, r in ranks.items()),
                    "predicted_loss": max(total - kept, 0.0) / total,
                }
            )
        return points

    def record(self) -> dict:
        """What :data:`DELTA_FILE` holds: per layer its rank, sizes and normalized spectrum; totals, the error
        curve, the modules stored at full rank, timings and this process's peak memory."""
        from ..streamed import peak_rss_mib

        layers = []
        for name, s in self.spectra.items():
            m, n = self.shapes[name]
            r = self.ranks.get(name, 0)
            top = max(float(s[0]), 1e-300) if len(s) else 1.0
            layers.append(
                {
                    "name": name,
                    "shape": [m, n],
                    "rank": r,
                    "params_before": m * n,
                    "params_after": r * (m + n),
                    "spectrum": [float(f"{float(v) / top:.5g}") for v in s],
                }
            )
        return {
            "layers": layers,
            "dense_params": self.dense_params,
            "num_params": self.num_params,
            "relative_error": self.relative_error(),
            "curve": self.error_curve(),
            "saved_modules": sorted({name.rpartition(".")[0] for name in self.exact}),
            "timings": dict(self.timings),
            "peak_rss_mib": peak_rss_mib(),
        }

    def save_peft(self, out: str | os.PathLike, *, force: bool = False) -> None:
        """Write a PEFT LoRA adapter directory (see :func:`rankwise.delta.peft.save_peft`) with :data:`DELTA_FILE`."""
        save_peft(self, out, force=force, extra={DELTA_FILE: json.dumps(self.record(), indent=1) + "\n"})


def load_peft(path: str | os.PathLike) -> Delta:
    """Read a PEFT LoRA adapter directory as a :class:`Delta` (scaling ``alpha / r`` folded into ``B``).

    Accepts adapters from any tool (rank/alpha patterns, rsLoRA, ``lora_B.bias``, modules_to_save); see
    :func:`rankwise.delta.peft.read_peft` for what it raises.
    """
    return Delta(**read_peft(path))
