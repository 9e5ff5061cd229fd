"""Benchmark: compressing EasyOCR's CRAFT text detector (benchmarks/craft.py) - rankwise vs TensorLy-Torch.

Targets: every Conv2d with more than one input channel (all 27 convolutions; the first reads RGB), at ``--keeps``
fractions of their parameters, no fine-tuning. Methods as in :mod:`cnn`:

- ``rankwise-auto`` / ``rankwise-tucker`` / ``rankwise-svd``: :func:`rankwise.compress_` (``ModuleCompressConfig``),
  data-aware, calibrated on ``--calib`` rendered pages (``--calib-size`` pixels; their words disjoint from the
  evaluation pages'); the calibration output is the score maps themselves, which ``collect_module_stats``
  contracts with a fixed Gaussian draw: the output-channel weights are then the Gauss-Newton diagonal of the
  squared change of the score maps (the gradient of an MSE to the dense maps, zero at the dense model, has none);
- ``tltorch-tucker2`` / ``tltorch-tucker`` / ``tltorch-cp``: TensorLy-Torch ``FactorizedConv.from_conv`` (data-free).

``--fisher layer`` weights each layer's predicted loss by its mean output sensitivity only
(``ModuleCompressConfig.fisher_channels=False``; with ``channels layer`` every rankwise row twice);
``--sequential`` refits each chosen layer to the dense layer's outputs from its inputs in the model compressed so
far (``sequential=True``); ``--damping`` sets the input whitening's (and that refit's) relative ridge.
``--keep-macs`` adds, per value, rankwise rows under a MAC budget alone (keep 1.0 of the parameters, that
fraction of the targets' conv MACs at the calibration size; :mod:`rankwise.macs`); TensorLy-Torch has none.

Reported: box F1 against the dense model's boxes (IoU 0.5, greedy matching) on ``--pages`` 768x768 evaluation
pages, and the dense model's F1 against the rendered words' boxes; the targets' parameters; conv MACs of one page
(forward hooks on nn.Conv2d; TensorLy-Torch's functional convolutions are not seen, so n/a); CPU latency of one
768x768 page (median and min of ``--repeats``) and "x dense", the medians' ratio to the dense model's timed
interleaved call by call (and "min x", the minima's).

    PYTHONPATH=src python benchmarks/cnn_craft.py [--pages 8] [--keeps 0.5 0.3] [--keep-macs 0.5] [--methods ...]
        [--fisher channels layer] [--sequential] [--damping 1e-6]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the model definitions and cnn.py's measuring helpers
from cnn import METHODS, compress, conv_macs, latency
from craft import f1, load_craft, match_counts, page_boxes, render_pages
from crnn import word_lists

from rankwise.calibrate_modules import collect_module_stats
from rankwise.compress_modules import ModuleCompressConfig, find_module_targets


def score_runner(pages):
    """A calibration callable: the model's score maps on one calibration page (a tensor, not a loss)."""
    return lambda model, i: model(pages[i % len(pages)][0][None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=8)
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--keep-macs", type=float, nargs="*", default=[])
    ap.add_argument("--methods", nargs="+", default=["rankwise-auto", "rankwise-tucker", "tltorch-tucker2"],
                    choices=METHODS)  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--fisher",
        nargs="+",
        choices=("channels", "layer"),
        default=["channels"],
        help="rankwise's output weights per channel and/or the layer's mean only (fisher_channels=False)",
    )
    ap.add_argument("--sequential", action="store_true", help="rankwise's sequential refit (sequential=True)")
    ap.add_argument("--damping", type=float, default=1e-6, help="rankwise's whitening ridge (ModuleCompressConfig)")
    args = ap.parse_args()
    for keep_macs in args.keep_macs:
        try:
            ModuleCompressConfig(keep=1.0, keep_macs=keep_macs)
        except ValueError as err:
            print(f"cnn_craft.py: error: --keep-macs: {err}", file=sys.stderr)
            sys.exit(2)
    torch.set_num_threads(args.threads)
    dense = load_craft()
    calib_words, eval_words = word_lists(1200, 2000)
    evals = render_pages(eval_words, args.pages, 768, seed=1000)
    calib = render_pages(calib_words, args.calib, args.calib_size, seed=0)
    targets = find_module_targets(dense, ModuleCompressConfig(kinds=("conv2d",), min_in_channels=2))
    target_params = sum(sum(p.numel() for p in m.parameters()) for m in targets.values())
    page = evals[0][0][None]
    print(
        f"CRAFT craft_mlt_25k: {len(targets)} target convs, {target_params:,} params; {len(evals)} eval pages 768 px "
        f"({sum(len(b) for _, b in evals)} words), {len(calib)} calibration pages {args.calib_size} px "
        f"({sum(len(b) for _, b in calib)} words); threads {args.threads}",
        flush=True,
    )
    stats = None
    if any(m.startswith("rankwise") for m in args.methods):
        t0 = time.perf_counter()
        stats = collect_module_stats(dense, targets, score_runner(calib), fisher=True, batches=len(calib))
        print(f"rankwise calibration (patch second moments + score-map sensitivities): {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    reference = page_boxes(dense, evals)
    t_eval = time.perf_counter() - t0
    truth = f1([match_counts(found, boxes) for found, (_, boxes) in zip(reference, evals)])
    print(f"dense vs rendered words: box F1 {truth:.3f} (IoU 0.5); {len(evals)} pages in {t_eval:.1f}s", flush=True)
    head = (
        f"{'method':<16} {'keep':>5} {'MACs':>5} {'params':>10} {'F1/dense':>8} {'GMAC/page':>9} {'s/page':>7} "
        f"{'dense s':>7} {'x dense':>7} {'min x':>6} {'fit s':>6}  formats"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{'dense':<16} {1.0:>5.2f} {1.0:>5.2f} {target_params:>10,} {1.0:>8.3f} {conv_macs(dense, page) / 1e9:>9.1f} "
        f"{'':>7} {'':>7} {1.0:>7.2f} {1.0:>6.2f} {0:>6.1f}",
        flush=True,
    )
    budgets = [(keep, None) for keep in args.keeps] + [(1.0, keep_macs) for keep_macs in args.keep_macs]
    for keep, keep_macs in budgets:
        rows = [(m, f) for m in args.methods for f in (args.fisher if m.startswith("rankwise") else ["channels"])]
        for method, fisher in rows:
            if keep_macs is not None and not method.startswith("rankwise"):
                continue
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            params, formats = compress(
                model,
                method,
                keep,
                list(targets),
                stats,
                keep_macs,
                fisher_channels=fisher == "channels",
                damping=args.damping,
                sequential=(score_runner(calib), len(calib)) if args.sequential else None,
            )
            label = f"{method}/{fisher}" if method.startswith("rankwise") and len(args.fisher) > 1 else method
            fit = time.perf_counter() - t0
            model.eval()
            found = page_boxes(model, evals)
            score = f1([match_counts(f, r) for f, r in zip(found, reference)])
            macs = f"{conv_macs(model, page) / 1e9:>9.1f}" if method.startswith("rankwise") else f"{'n/a':>9}"
            t, t_anchor, t_min, anchor_min = latency(model, page, args.repeats, dense)
            mac_keep = f"{keep_macs:>5.2f}" if keep_macs is not None else f"{'':>5}"
            print(
                f"{label:<16} {keep:>5.2f} {mac_keep} {params:>10,} {score:>8.3f} {macs} {t:>7.2f} {t_anchor:>7.2f} "
                f"{t / t_anchor:>7.2f} {t_min / anchor_min:>6.2f} {fit:>6.1f}  {formats}",
                flush=True,
            )


if __name__ == "__main__":
    main()
