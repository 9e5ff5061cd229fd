"""sweep(model, keeps, ...): calibrate and factorize once, then allocate, predict and (optionally) measure every budget.

The passes that cost time (calibration, loss gradients, factorization) depend on the model and the
calibration data, not on the budget: their curves and factors wait in the spill directory while each
``keep`` is allocated (milliseconds), its predicted loss increase read off the curves, and, when asked,
the model with those ranks is measured (the dense model in memory, the factorized layers swapped in and
out) or written as a rankwise directory without calibrating again.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ._validate import fraction
from .compress import CompressConfig, allocate_layers, budget_curve, emit_blocks, plan_compression
from .compress_report import CompressReport, layer_report
from .io.atomic import atomic_output_dir
from .pipeline import swap_in
from .streamed import StreamedRun, peak_rss_mib
from .targets import replace_module

SWEEP_FILE = "sweep.json"


@dataclass
class SweepRow:
    """One budget: parameters of the targeted layers, the allocator's predicted loss increase, the
    measured quality (perplexity for causal LMs, mean embedding cosine to the dense model for encoders)."""

    keep: float
    params_before: int
    params_after: int
    predicted_loss: float
    quality: float | None = None


def check_keeps(keeps) -> list[float]:
    """Each keep a fraction in (0, 1], none twice; returned in decreasing order."""
    if not keeps:
        raise ValueError("--keep needs at least one fraction in (0, 1]")
    seen = set()
    for k in keeps:
        fraction(k, "keep")
        if float(k) in seen:
            raise ValueError(f"keep {float(k)} is given twice")
        seen.add(float(k))
    return sorted(seen, reverse=True)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equal-length lists (average ranks for ties)."""

    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else float("nan")


def sweep(
    model,
    out_dir: str | Path,
    keeps,
    config: CompressConfig,
    calib: torch.Tensor | None,
    *,
    measure=None,
    measure_name: str = "quality",
    choose=None,
    device="auto",
    force: bool = False,
    progress: bool = True,
) -> tuple[list[SweepRow], dict[float, CompressReport], float | None]:
    """Compress ``model`` at every ``keep`` from one calibration; write the table to ``out_dir``.

    Parameters
    ----------
    model : what :func:`rankwise.io.models.model_dir` accepts.
    out_dir : new directory: ``sweep.json`` (rows and the per-keep reports), ``sweep.csv``, and with
        ``save`` the rankwise directory ``keep-<save>/``.
    keeps : fractions in (0, 1]; ``config.keep`` is ignored.
    measure : optional ``model -> float``, called once per keep on the dense model with that keep's
        factorized layers swapped in (:func:`perplexity_measure`, :func:`cosine_measure`).
    choose : optional ``rows -> keep or None``: the keep to write as a model (``keep-<keep>/``), decided
        once the rows are measured; None writes no model.

    Returns
    -------
    ``(rows, reports, chosen keep or None)``.
    """
    keeps = check_keeps(keeps)
    if config.include_head:  # measure_at and the saved keep swap in the block layers' factors only
        raise ValueError(
            "include_head: sweep measures and writes the block layers only; accepted: include_head=False, or "
            "rankwise.streamed.compress_checkpoint at each keep"
        )
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass --force to overwrite it")
    rows, reports = [], {}
    with StreamedRun(
        model,
        out.with_name(out.name + ".rankwise-run"),
        config,
        calib,
        device=device,
        force=force,
        progress=progress,
        disk_for=out,
    ) as run:
        pipe, curves, timings = plan_compression(run.source, run.targets, config, calib, run.work, progress=progress)
        curve = budget_curve(config, curves)
        for keep in keeps:
            rank_of = allocate_layers(config, curves, keep)
            reports[keep] = CompressReport(
                [layer_report(c, rank_of[c.name]) for c in curves],
                CompressConfig.from_dict(config.to_dict() | {"keep": keep}),
                dict(timings),
                curve=curve,
            )
            r = reports[keep]
            rows.append(SweepRow(keep, r.params_before, r.params_after, r.predicted_loss))
        if measure is not None:
            from .io.models import load_weights

            dense = load_weights(run.hf_dir)[0]
            for row in rows:
                t0 = time.perf_counter()
                row.quality = measure_at(pipe, dense, reports[row.keep].ranks, measure)
                reports[row.keep].timings["evaluation"] = time.perf_counter() - t0
            del dense
        chosen = choose(rows) if choose is not None else None
        if chosen is not None and float(chosen) not in keeps:
            raise ValueError(f"keep {chosen} to save is not one of the swept keeps ({', '.join(map(str, keeps))})")
        with atomic_output_dir(out, force=force) as tmp:
            if chosen is not None:
                keep = float(chosen)
                rank_of = {layer.name: layer.rank for layer in reports[keep].layers}
                run.write(
                    tmp / f"keep-{keep}",
                    False,
                    lambda writer: (emit_blocks(pipe, rank_of, run.block_writer(writer), progress), reports[keep])[1],
                )
            for r in reports.values():
                r.peak_rss_mib = peak_rss_mib()
            write_table(tmp, rows, reports, measure_name)
    run.work.remove()
    return rows, reports, chosen


def measure_at(pipe, dense: nn.Module, ranks: dict[str, int], measure) -> float:
    """``measure(dense)`` with the layers of ``ranks`` factorized from the spilled factors, then restored."""
    originals = {}
    for i in range(pipe.source.num_blocks):
        factors = pipe.factors(i)
        chosen = {n: f.truncate(ranks[n]) for n, f in factors.items() if n in ranks}
        originals.update({n: dense.get_submodule(n) for n in chosen})
        swap_in(dense, chosen, lambda name: originals[name].weight.dtype)
    try:
        return float(measure(dense))
    finally:
        for name, layer in originals.items():
            replace_module(dense, name, layer)


def write_table(
    out: Path, rows: list[SweepRow], reports: dict[float, CompressReport], measure_name: str = "quality"
) -> None:
    """``sweep.json`` (rows, Spearman of predicted loss vs measured quality, each keep's report) and ``sweep.csv``."""
    measured = [r for r in rows if r.quality is not None]
    rho = spearman([r.predicted_loss for r in measured], [r.quality for r in measured]) if len(measured) > 1 else None
    doc = {
        "rows": [asdict(r) for r in rows],
        "quality_measure": measure_name,
        "spearman_predicted_vs_quality": rho,
        "reports": {str(k): v.to_dict() for k, v in reports.items()},
    }
    (out / SWEEP_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["keep", "params_before", "params_after", "predicted_loss", "quality"])
    for r in rows:
        w.writerow(
            [
                r.keep,
                r.params_before,
                r.params_after,
                f"{r.predicted_loss:.6g}",
                "" if r.quality is None else f"{r.quality:.6g}",
            ]
        )
    (out / "sweep.csv").write_text(buf.getvalue())


def perplexity_measure(ids: torch.Tensor):
    """A ``measure`` for causal LMs: perplexity on ``ids``."""
    from .eval import perplexity

    return lambda model: perplexity(model, ids, progress=False)


def cosine_measure(ref: nn.Module, tokenizer, sentences: list[str]):
    """A ``measure`` for encoders: mean cosine of sentence embeddings to ``ref``'s."""
    from .eval import embedding_similarity

    return lambda model: embedding_similarity(model, ref, tokenizer, sentences)
