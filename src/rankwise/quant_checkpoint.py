"""compress_quantized(model, out_dir, ...): the quantizing forms of ``rankwise compress``, in memory.

Three forms share one calibration (:func:`rankwise.calibrate.collect_stats` on the dense model):

- low-rank + quantized factors (``--bits B`` with a factorization method): :func:`rankwise.compress_` at
  ``keep``, then every factorized layer's factors quantized by :func:`rankwise.quantize.quantize_` (and
  the layers left dense quantized as they are, at the same bits);
- Q + LR (``--method qlr --bits B --rank R``): every target layer quantized with a rank-R correction;
- a byte budget (``--bits-per-weight X`` or ``--size S``): :func:`rankwise.quant_budget.quantize_to_budget_`.

The model is held in memory whole (unlike the streamed ``rankwise compress`` without quantization); the
output is written atomically by :func:`rankwise.io.checkpoint.save`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .calibrate import collect_stats
from .compress import CompressConfig, compress_
from .io.checkpoint import save
from .io.models import load_model
from .quant_budget import check_size, quantize_to_budget_
from .quantize import QuantizeConfig, QuantLayerReport, layer_weight, module_bytes, quantize_
from .targets import find_targets


@dataclass
class QuantRunReport:
    """What a quantizing compression stored: per-layer reports and byte counts."""

    layers: list[QuantLayerReport]
    target_weights: int  # dense weights of every target layer
    target_bytes: int  # bytes every target layer stores now (quantized, factorized or left dense)
    model_bytes: int  # bytes of every tensor of the model (tied ones once): the size of the weights on disk
    method: str

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.target_bytes / self.target_weights

    def summary(self) -> str:
        kinds: dict[str, list[QuantLayerReport]] = {}
        for r in self.layers:
            c = r.config
            rank = f" r{c['correction_rank']}" if c["correction_rank"] else ""
            key = f"{r.kind} {c['bits']}-bit g{c['group_size']}{rank}"
            kinds.setdefault(key, []).append(r)
        lines = [f"{'layers':<34} {'n':>4} {'bytes':>12} {'bpw':>6} {'err':>6}"]
        for key, rs in sorted(kinds.items()):
            b, w = sum(r.bytes for r in rs), sum(r.dense_weights for r in rs)
            err = sum(r.error for r in rs) / len(rs)
            lines.append(f"{key:<34} {len(rs):>4} {b:>12,} {8 * b / w:>6.3f} {err:>6.3f}")
        lines.append(
            f"{self.method}: target layers {self.target_bytes:,} bytes for {self.target_weights:,} weights "
            f"({self.bits_per_weight:.3f} bits per weight, everything counted); whole model "
            f"{self.model_bytes:,} bytes"
        )
        return "\n".join(lines)


def compress_quantized(
    model,
    out_dir: str | Path,
    calib: torch.Tensor,
    *,
    config: CompressConfig | None = None,
    quant: QuantizeConfig | None = None,
    bits_per_weight: float | None = None,
    size: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> QuantRunReport:
    """Quantize (and optionally factorize) the block linears of ``model`` and save a rankwise directory.

    Parameters
    ----------
    model : what :func:`rankwise.io.models.load_model` accepts (directory, file or alias).
    calib : LongTensor, shape (n_seqs, seq_len), calibration token ids.
    config : the factorization (low-rank + quantized factors), or only its targets, calibration and
        ``fisher_seqs`` (Q + LR and budgets).
    quant : how to quantize the factors (with ``config``) or every target (``correction_rank`` > 0: Q + LR).
    bits_per_weight, size : a byte budget instead of ``quant``: over the target layers' weights, or the
        whole model's bytes.
    """
    budget = bits_per_weight is not None or size is not None
    if budget == (quant is not None):
        raise ValueError(
            "give either a quantization (quant) or a byte budget (bits_per_weight or size), not both or neither"
        )
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass --force to overwrite it")
    config = config or CompressConfig()
    lowrank = quant is not None and not quant.correction_rank
    model, _, _ = load_model(model, progress=progress)
    targets = find_targets(model, config.include, config.exclude)
    names = list(targets)
    weights = sum(layer_weight(m).numel() for m in targets.values())
    if size is not None:
        check_size(model, names, size)
    fisher = config.fisher_seqs if (budget or (lowrank and config.needs_loss_gradients)) else 0
    stats = collect_stats(model, targets, calib, fisher_seqs=fisher, seed=config.seed, progress=progress)
    if budget:
        reports = quantize_to_budget_(
            model, names, stats, bits_per_weight=bits_per_weight, size=size, progress=progress
        )
        method = f"byte budget ({bits_per_weight} bits per weight)" if size is None else f"byte budget ({size:,} bytes)"
    elif lowrank:
        compress_(model, config, calib, stats=stats, progress=progress)
        # the layers the allocator left dense (no rank would save parameters) are quantized as they are
        reports = quantize_(model, {n: quant for n in names}, stats, progress=progress)
        method = f"{config.method} low-rank at keep {config.keep} + {quant.bits}-bit factors"
    else:
        reports = quantize_(model, {n: quant for n in names}, stats, progress=progress)
        method = f"Q + LR ({quant.bits}-bit, rank {quant.correction_rank})"
    target_bytes = sum(module_bytes(model.get_submodule(n)) for n in names)
    report = QuantRunReport(reports, weights, target_bytes, module_bytes(model), method)
    card = {
        "method": f"compress: {method} (rankwise.quant: GPTQ error feedback, group size "
        f"{reports[0].config['group_size'] if reports else '-'})",
        "budget": f"{report.bits_per_weight:.3f} bits per weight over {len(names)} block linears; "
        f"{report.model_bytes:,} bytes of weights",
    }
    save(model, out, force=force, card=card)  # the tokenizer files come with the input directory's files
    return report
