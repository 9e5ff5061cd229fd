"""compress_quantized(model, out_dir, ...): the quantizing forms of ``rankwise compress``, block by block.

Three forms share one calibration: the block-by-block passes of :mod:`rankwise.pipeline` (each block's
input statistics ``X^T X`` and, where the allocation needs them, the loss gradients), with every block's
statistics spilled to ``<out>.rankwise-run`` and kept for the write pass:

- low-rank + quantized factors (``--bits B`` with a factorization method): the streamed compression at
  ``keep`` (:func:`rankwise.compress.run_compression`), each block's factorized layers then quantized by
  :func:`rankwise.quantize.quantize_` before it is written (the layers left dense quantized as they are,
  at the same bits);
- Q + LR (``--method qlr --bits B --rank R``): every target layer quantized with a rank-R correction as its
  block is written;
- a byte budget (``--bits-per-weight X`` or ``--size S``): pass C builds every layer's candidates
  (:func:`rankwise.quant_budget.layer_candidates`) and keeps their bytes and estimated losses; after the
  global allocation (:func:`rankwise.quant_budget.allocate_budget`) each block's chosen candidates are built
  again from the same statistics (deterministic) and written.

Memory is one block and its statistics, as for :func:`rankwise.streamed.compress_checkpoint`; an interrupted
run continues from the spill directory with ``resume=True``. The output is written atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .calibrate import CalibStats, _bar
from .compress import CompressConfig, run_compression
from .io.stream import release_module
from .pipeline import Pipeline, spilled_stats
from .quant_budget import (
    allocate_budget,
    build_candidate,
    check_budget,
    check_size_covers,
    layer_candidates,
    layer_options,
)
from .quantize import QuantizeConfig, QuantLayerReport, layer_weight, quantize_
from .streamed import StreamedRun, run_dir


@dataclass
class QuantRunReport:
    """What a quantizing compression stored: per-layer reports and byte counts."""

    layers: list[QuantLayerReport]
    target_weights: int  # dense weights of every target layer
    target_bytes: int  # bytes every target layer stores now (quantized, factorized or left dense)
    model_bytes: int  # bytes of every tensor written (tied ones once): the size of the weights on disk
    method: str
    peak_rss_mib: float | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.target_bytes / self.target_weights

    def summary(self) -> str:
        kinds: dict[str, list[QuantLayerReport]] = {}
        for r in self.layers:
            c = r.config
            rank = f" r{c['correction_rank']}" if c["correction_rank"] else ""
            rank += " rotated" if c.get("rotate") else ""
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
        if self.peak_rss_mib is not None:
            lines.append(f"peak memory {self.peak_rss_mib / 1024:.2f} GiB")
        return "\n".join(lines)

    def card(self) -> dict[str, str]:
        group = self.layers[0].config["group_size"] if self.layers else "-"
        return {
            "method": f"compress: {self.method} (rankwise.quant: GPTQ error feedback, group size {group})",
            "budget": f"{self.bits_per_weight:.3f} bits per weight over {len(self.layers)} block linears; "
            f"{self.model_bytes:,} bytes of weights",
        }


class QuantPipeline(Pipeline):
    """The passes of :class:`~rankwise.pipeline.Pipeline` for a quantizing run: A (every block's statistics,
    spilled and kept for the write pass), B (loss gradients, when ``fisher``), and a pass C that builds each
    layer's byte-budget candidates and keeps only their ``(bytes, loss)`` (``candidates``; else it does
    nothing). No candidate's tensors are held or spilled: the chosen ones are built again at write time."""

    def __init__(self, source, targets, config, work, *, fisher: bool, candidates: bool, device, progress: bool):
        super().__init__(
            source,
            targets,
            config,
            None,
            None,
            work,
            device=device,
            dtype=torch.float32,
            progress=progress,
            keep_stats=True,
        )
        self.needs_grad, self.candidates = fisher and config.fisher_seqs > 0, candidates

    def _done(self, i: int) -> bool:
        return self.work.has(f"options-{i}.pt")

    def _factorize_block(self, i, targets, stats) -> None:
        options = {}
        if self.candidates:
            built = layer_candidates(self.source.model, list(targets), stats, progress=False)
            options = {n: [(c.bytes, c.loss) for c in cs] for n, cs in built.items()}
        self.work.save(f"options-{i}.pt", options)

    def _curves(self) -> dict[str, list[tuple[int, float]]]:
        """``{layer: [(bytes, loss) of each candidate]}`` in model order (empty without ``candidates``)."""
        options = {}
        for i, names in enumerate(self.groups):
            if names:
                options.update(self.work.load(f"options-{i}.pt"))
        return options


def stored_bytes_outside(run: StreamedRun, names: list[str]) -> int:
    """Bytes the checkpoint stores for every tensor outside the layers ``names`` (a tied tensor once)."""
    prefixes = tuple(n + "." for n in names)
    outside = {key: name for name, key in run.source.keys.items() if not name.startswith(prefixes)}
    size = {dtype: torch.empty(0, dtype=dtype).element_size() for dtype in set(run.stored.values())}
    return sum(torch.Size(run.source.ckpt.shape(k)).numel() * size[run.stored[n]] for k, n in outside.items())


def compress_quantized(
    model,
    out_dir: str | Path,
    calib: torch.Tensor,
    *,
    config: CompressConfig | None = None,
    quant: QuantizeConfig | None = None,
    bits_per_weight: float | None = None,
    size: int | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> QuantRunReport:
    """Quantize (and optionally factorize) the block linears of ``model`` block by block into a rankwise directory.

    Parameters
    ----------
    model : what :func:`rankwise.io.models.model_dir` accepts (directory, file or alias).
    calib : LongTensor, shape (n_seqs, seq_len), calibration token ids.
    config : the factorization (low-rank + quantized factors), or only its targets, calibration and
        ``fisher_seqs`` (Q + LR and budgets).
    quant : how to quantize the factors (with ``config``) or every target (``correction_rank`` > 0: Q + LR).
    bits_per_weight, size : a byte budget instead of ``quant``: over the target layers' weights, or the
        whole model's bytes as written.
    device, resume, force : as for :func:`rankwise.streamed.compress_checkpoint`.
    """
    budget = bits_per_weight is not None or size is not None
    if budget == (quant is not None):
        raise ValueError(
            "give either a quantization (quant) or a byte budget (bits_per_weight or size), not both or neither"
        )
    if budget:
        check_budget(bits_per_weight, size)
    if calib is None:
        raise ValueError("quantizing runs need calib: GPTQ quantizes every layer in the metric of its inputs")
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass --force to overwrite it")
    config = config or CompressConfig()
    lowrank = quant is not None and not quant.correction_rank
    settings = {"quant": quant and quant.to_dict(), "bits_per_weight": bits_per_weight, "size": size}
    with StreamedRun(
        model, run_dir(out), config, calib, device=device, resume=resume, force=force, progress=progress, extra=settings
    ) as run:
        names = list(run.targets)
        weights = sum(layer_weight(m).numel() for m in run.targets.values())
        fixed = stored_bytes_outside(run, names)
        if size is not None:
            check_size_covers(size, fixed)
        reports: list[QuantLayerReport] = []
        if lowrank:
            method = f"{config.method} low-rank at keep {config.keep} + {quant.bits}-bit factors"
        elif quant is not None:
            method = f"Q + LR ({quant.bits}-bit, rank {quant.correction_rank})"
        else:
            method = "byte budget (" + (f"{bits_per_weight} bits per weight)" if size is None else f"{size:,} bytes)")

        def emit_all(writer) -> QuantRunReport:
            if lowrank:
                _lowrank_blocks(run, writer, config, calib, quant, reports, progress)
            else:
                limits = {"dense_weights": weights, "bits_per_weight": bits_per_weight, "size": size, "fixed": fixed}
                _quantized_blocks(run, writer, config, calib, quant, reports, progress, **limits)
            target = sum(r.bytes for r in reports)
            return QuantRunReport(reports, weights, target, target + fixed, method)

        report = run.write(out, force, emit_all, card=QuantRunReport.card)
    run.work.remove()
    return report


def _quantize_block(run: StreamedRun, writer, i: int, names: list[str], quant: QuantizeConfig, reports: list) -> None:
    """Quantize the layers ``names`` of block ``i`` (dense or low-rank, :func:`rankwise.quantize.quantize_`) in
    the metric of the block's spilled statistics, and write the block."""
    model = run.source.model
    replaced = [model.get_submodule(n) for n in names]
    stats = CalibStats(spilled_stats(run.work, i, run.source.device))
    reports.extend(quantize_(model, {n: quant for n in names}, stats, progress=False))
    for layer in replaced:
        release_module(layer)
    run.write_block(writer, i)


def _lowrank_blocks(run: StreamedRun, writer, config, calib, quant, reports: list, progress: bool) -> None:
    """The streamed compression at ``config.keep``; each block's factors (and layers left dense) quantized."""

    def emit(i: int, factors) -> None:
        run.swap_factors(factors)
        _quantize_block(run, writer, i, list(factors), quant, reports)

    run_compression(run.source, run.targets, config, calib, run.work, emit=emit, progress=progress, keep_stats=True)


def _quantized_blocks(run: StreamedRun, writer, config, calib, quant, reports: list, progress: bool, **budget) -> None:
    """Q + LR (``quant``) or a byte budget (``budget``: :func:`rankwise.quant_budget.allocate_budget`'s
    arguments but the options): every block's statistics (and candidates), then each block built and written."""
    pipe = QuantPipeline(
        run.source,
        run.targets,
        config,
        run.work,
        fisher=quant is None,
        candidates=quant is None,
        device=run.source.device,
        progress=progress,
    )
    options = pipe.calibrate(calib)
    if quant is None:
        picks = dict(zip(options, allocate_budget(list(options.values()), **budget)))
    model = run.source.model
    for i in _bar(range(run.source.num_blocks), progress, "write blocks"):
        run.source.load_block(i)
        if quant is not None:
            _quantize_block(run, writer, i, pipe.groups[i], quant, reports)
        else:
            stats, new = pipe.block_stats(i), {}
            for name in pipe.groups[i]:
                layer = model.get_submodule(name)
                W = layer_weight(layer)
                c = build_candidate(layer, name, stats, *layer_options(tuple(W.shape))[picks[name]], {})
                nbytes, loss = options[name][picks[name]]
                if c.bytes != nbytes or not math.isclose(c.loss, loss, rel_tol=1e-6, abs_tol=1e-300):
                    raise RuntimeError(
                        f"layer {name}: its candidate built again stores {c.bytes:,} bytes at loss {c.loss:.6g}, the "
                        f"allocated one {nbytes:,} at {loss:.6g}"
                    )
                new[name] = c.layer
                reports.append(QuantLayerReport(name, c.kind, c.describe(), c.bytes, W.numel(), c.error, 0.0))
            run.swap(new)
            run.write_block(writer, i)
        run.source.release_block(i)
