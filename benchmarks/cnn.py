"""Benchmark: compressing a real pretrained CNN (EasyOCR's CRNN recognizer) - rankwise vs TensorLy-Torch.

Targets: every Conv2d with more than one input channel (6 of the 7), at ``--keeps`` fractions of their parameters,
no fine-tuning. Methods:

- ``rankwise-auto``: :func:`rankwise.compress_` with a ``ModuleCompressConfig``, data-aware (patch-whitened inputs,
  CTC-loss gradient weights on the output channels, from ``--calib`` rendered words disjoint from the evaluation
  words), format and rank per layer chosen under the one budget among SVD and Tucker-2;
- ``rankwise-tucker`` / ``rankwise-svd``: the same with one format;
- ``tltorch-cp`` / ``tltorch-tucker`` / ``tltorch-tucker2``: TensorLy-Torch ``FactorizedConv.from_conv`` (data-free)
  with ``rank=keep`` on every target (CP; Tucker; Tucker with ``fixed_rank_modes='spatial'``), implementation
  ``factorized`` (its contraction path, not the rebuilt kernel).

rankwise calibrates once (timed separately) and compresses at every budget from the same statistics.

Reported: word accuracy and CER on ``--words`` rendered words, the targets' parameters, conv MACs per word (from
forward hooks on every nn.Conv2d; TensorLy-Torch's functional convolutions are not seen, so n/a), and CPU latency
of a batch of 32 words (median of ``--repeats``); "x dense" divides it by the dense model's median timed
interleaved with it, call by call (the shared machine's load drifts).

``--fisher layer`` weights each layer's predicted loss by its mean loss-gradient second moment only
(``ModuleCompressConfig.fisher_channels=False``); ``--sequential`` refits each chosen layer so that its
outputs on its inputs in the model compressed so far match the dense layer's (``sequential=True``);
``--heldout N`` evaluates on N held-out calibration-pool words instead of the evaluation words, to choose such
settings on calibration data. ``--damping`` sets the input
whitening's relative ridge (``ModuleCompressConfig.damping``; several values: a rankwise row for each), which
shrinks the calibration words' channel covariance towards the identity (data-free at the limit).

    PYTHONPATH=src python benchmarks/cnn.py [--words 400] [--keeps 0.3 0.2] [--methods ...] [--threads 1]
        [--fisher channels layer] [--sequential] [--heldout 256] [--damping 1e-6 1e-1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/crnn.py, the model definition
from crnn import CHARACTERS, evaluate, load_crnn, make_batches, word_lists

from rankwise.calibrate_modules import collect_module_stats
from rankwise.compress import compress_
from rankwise.compress_modules import ModuleCompressConfig, find_module_targets

METHODS = ("rankwise-auto", "rankwise-tucker", "rankwise-svd", "tltorch-cp", "tltorch-tucker", "tltorch-tucker2")
TLTORCH = {"tltorch-cp": ("cp", False), "tltorch-tucker": ("tucker", False), "tltorch-tucker2": ("tucker", True)}


def ctc_runner(batches):
    """A calibration callable: CTC loss of the model on rendered calibration words (their true labels)."""
    index = {c: i + 1 for i, c in enumerate(CHARACTERS)}

    def run(model: nn.Module, i: int) -> torch.Tensor:
        images, words = batches[i % len(batches)]
        logp = F.log_softmax(model(images), -1).transpose(0, 1)  # (T, B, C)
        targets = torch.tensor([index[c] for w in words for c in w])
        lengths = torch.tensor([len(w) for w in words])
        return F.ctc_loss(logp, targets, torch.full((len(words),), logp.shape[0]), lengths, zero_infinity=True)

    return run


def conv_macs(model: nn.Module, images: torch.Tensor) -> int:
    total = 0

    def hook(m, args, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return total // images.shape[0]


def latency(
    model: nn.Module, images: torch.Tensor, repeats: int, dense: nn.Module | None = None
) -> tuple[float, float, float, float]:
    """Median seconds of ``model(images)`` and, interleaved call by call, of ``dense(images)`` (the shared
    machine's load drifts; interleaving keeps the ratio fair), then the two minima. Without ``dense`` its
    values are 0."""
    times, anchor = [], []
    with torch.no_grad():
        model(images)
        for _ in range(repeats):
            t = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - t)
            if dense is not None:
                t = time.perf_counter()
                dense(images)
                anchor.append(time.perf_counter() - t)
    if not anchor:
        return statistics.median(times), 0.0, min(times), 0.0
    return statistics.median(times), statistics.median(anchor), min(times), min(anchor)


def tltorch_compress(model: nn.Module, targets: dict, factorization: str, keep: float, spatial: bool) -> nn.Module:
    import tltorch

    for name, conv in targets.items():
        kwargs = {"fixed_rank_modes": "spatial"} if spatial else {}
        t0, c0 = time.perf_counter(), time.process_time()
        new = tltorch.FactorizedConv.from_conv(
            conv, rank=keep, factorization=factorization, implementation="factorized", **kwargs
        )
        # progress on stderr: TensorLy-Torch's CP (parafac) takes many minutes per layer here
        print(
            f"  {factorization} {name}: {time.perf_counter() - t0:.1f}s wall, {time.process_time() - c0:.1f}s CPU",
            file=sys.stderr,
            flush=True,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def compress(
    model: nn.Module,
    method: str,
    keep: float,
    targets: list[str],
    stats,
    keep_macs: float | None = None,
    fisher_channels: bool = True,
    sequential=None,
    damping: float = 1e-6,
) -> tuple[int, str]:
    """Compress ``model``'s ``targets`` in place by ``method`` (one of METHODS) at ``keep`` of their parameters
    (and, for rankwise, ``keep_macs`` of their MACs, ``fisher_channels`` and ``damping`` as in
    ModuleCompressConfig, and with ``sequential`` = (calibration callable, its number of batches) the sequential
    refit); returns the targets' parameters after and, for rankwise, the format and rank per layer ("" for
    TensorLy-Torch)."""
    if method.startswith("rankwise"):
        runner, batches = sequential or (None, 8)
        config = ModuleCompressConfig(
            keep=keep,
            keep_macs=keep_macs,
            format=method.split("-")[1],
            kinds=("conv2d",),
            fisher_channels=fisher_channels,
            damping=damping,
            sequential=runner is not None,
            batches=batches,
        )
        report = compress_(model, config, runner, stats=stats)
        return report.params_after, " ".join(f"{r.format or 'dense'}:{r.rank}" for r in report.layers)
    fact, spatial = TLTORCH[method]
    tltorch_compress(model, {n: model.get_submodule(n) for n in targets}, fact, keep, spatial)
    return sum(sum(p.numel() for p in model.get_submodule(n).parameters()) for n in targets), ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=400)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.3, 0.2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--fisher",
        nargs="+",
        choices=("channels", "layer"),
        default=["channels"],
        help="rankwise's loss-gradient weights: per output channel, and/or the layer's mean only "
        "(fisher_channels=False); with both, every rankwise method gets a row for each",
    )
    ap.add_argument(
        "--damping",
        type=float,
        nargs="+",
        default=[1e-6],
        help="relative ridge of rankwise's input whitening (ModuleCompressConfig.damping); several: a row for each",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="rankwise refits each chosen layer to the dense layer's outputs from its inputs in the model "
        "compressed so far (sequential=True)",
    )
    ap.add_argument(
        "--heldout",
        type=int,
        default=0,
        help="evaluate on this many held-out calibration-pool words (the words after the --calib words; disjoint "
        "from both) instead of the --words evaluation words: to choose settings without the evaluation words",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_crnn()
    pool, eval_words = word_lists(args.calib + args.heldout, args.words)
    calib_words = pool[: args.calib]
    calib = make_batches(calib_words, offset=0)
    if args.heldout:
        eval_words = pool[args.calib :]
    evals = make_batches(eval_words, offset=args.calib if args.heldout else 10_000)
    timing_batch = max((b for b, w in evals if len(w) == 32), key=lambda b: b.shape[-1])
    config = ModuleCompressConfig(kinds=("conv2d",), min_in_channels=2)
    targets = find_module_targets(dense, config)
    target_params = sum(sum(p.numel() for p in m.parameters()) for m in targets.values())
    print(
        f"CRNN english_g2: {len(targets)} target convs, {target_params:,} params; {len(eval_words)} "
        f"{'held-out calibration-pool' if args.heldout else 'eval'} words, {len(calib_words)} calibration words; "
        f"timing batch {tuple(timing_batch.shape)}; threads {args.threads}; rankwise fisher: {' '.join(args.fisher)}"
        f"{', sequential' if args.sequential else ''}"
    )
    stats = None
    if any(m.startswith("rankwise") for m in args.methods):
        t0 = time.perf_counter()
        stats = collect_module_stats(dense, targets, ctc_runner(calib), fisher=True, batches=len(calib))
        print(
            f"rankwise calibration (patch second moments + CTC-loss gradients, {len(calib_words)} words): "
            f"{time.perf_counter() - t0:.1f}s, shared by every rankwise row (fit s excludes it)"
        )
    acc, cer = evaluate(dense, evals)
    t_dense = latency(dense, timing_batch, args.repeats)[0]
    head = (
        f"{'method':<26} {'keep':>5} {'params':>10} {'word acc':>8} {'CER':>6} {'MMAC/word':>10} {'ms/batch':>9} "
        f"{'x dense':>7} {'min x':>6} {'fit s':>6}  formats"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{'dense':<26} {1.0:>5.2f} {target_params:>10,} {acc:>8.3f} {cer:>6.3f} "
        f"{conv_macs(dense, timing_batch) / 1e6:>10.1f} {t_dense * 1e3:>9.1f} {1.0:>7.2f} {1.0:>6.2f} {0:>6.1f}"
    )
    rows = [
        (method, fisher, damping)
        for method in args.methods
        for fisher in (args.fisher if method.startswith("rankwise") else ["channels"])
        for damping in (args.damping if method.startswith("rankwise") else [None])
    ]
    for keep in args.keeps:
        for method, fisher, damping in rows:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            params, formats = compress(
                model,
                method,
                keep,
                list(targets),
                stats,
                fisher_channels=fisher == "channels",
                damping=damping,
                sequential=(ctc_runner(calib), len(calib)) if args.sequential else None,
            )
            rankwise = method.startswith("rankwise")
            label = method
            if rankwise and len(args.fisher) > 1:
                label += f"/{fisher}"
            if rankwise and len(args.damping) > 1:
                label += f"/d{damping:g}"
            macs = f"{conv_macs(model, timing_batch) / 1e6:>10.1f}" if rankwise else f"{'n/a':>10}"
            fit = time.perf_counter() - t0
            model.eval()
            acc, cer = evaluate(model, evals)
            t, t_anchor, t_min, anchor_min = latency(model, timing_batch, args.repeats, dense)
            print(
                f"{label:<26} {keep:>5.2f} {params:>10,} {acc:>8.3f} {cer:>6.3f} {macs} {t * 1e3:>9.1f} "
                f"{t / t_anchor:>7.2f} {t_min / anchor_min:>6.2f} {fit:>6.1f}  {formats}",
                flush=True,
            )


if __name__ == "__main__":
    main()
