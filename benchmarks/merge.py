"""Merging on the digits suite: every registered method side by side, and Git Re-Basin loss barriers.

Part 1 merges the suite's fine-tuned backbones with every method and scores each task with the merged
backbone and that task's own head (test split). Hyper-parameters are each paper's default or are
chosen by a small sweep on the held-out *validation* split (part of the training images, never the
test split); AdaMerging adapts on the unlabeled test inputs, as the paper does (test-time adaptation),
with its own init / learning rate chosen by adapting on the unlabeled val inputs and scoring val labels.
AdaMerging++ is the same on the TIES-processed task vectors (trim density 0.2).
Normalized accuracy = merged / individually fine-tuned accuracy, per task, averaged over tasks.
The default suite is the "pretrained backbone, gentle fine-tunes" regime of the papers, chosen with
``--split val`` (see BENCHMARKS.md): an MLP of width 1024 ending in a parameter-free layer norm (the
heads see normalised features, as CLIP's heads do), pretrained on the digits under generic jitter with
label smoothing 0.1, the hard tasks, fine-tunes by SGD lr 0.001 for 20 epochs.

Part 2 trains two models on the plain digits from different seeds and measures the loss barrier on
the straight path between them, before and after weight matching:
``max_alpha [L((1 - alpha) a + alpha b) - ((1 - alpha) L(a) + alpha L(b))]`` on an 11-point grid.

    python benchmarks/merge.py [--arch mlp] [--width 256] [--tasks default|hard] [--ft-lr 0.03] [--ft-epochs 15]
        [--heads finetuned|probe|zeroshot] [--pretrain plain|augmented] [--label-smoothing 0] [--no-feature-norm]
        [--split test|val] [--seed 0] [--small-sweep] [--skip-barrier]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import rankwise
from rankwise.merging import METHODS
from rankwise.merging.adamerging import learn_coefficients
from rankwise.merging.rebasin import align

from suites.digits import (
    DEFAULT_TASKS,
    HARD_TASKS,
    load_digits_suite,
    make_model,
    split_data,
    train_classifier,
)

SCALES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
# each method's sweep on the validation split; single entries are the paper's setting
GRIDS = {
    "linear": [{}],
    "task_arithmetic": [{"scale": s} for s in SCALES],
    "ties": [{"density": 0.2, "scale": s} for s in (0.5, 0.7, 1.0, 1.5, 2.0, 2.5, 3.0)],
    "dare": [
        {"density": d, "scale": s, "sign_consensus": True, "normalize": True}
        for d in (0.1, 0.3, 0.5)
        for s in (0.5, 1.0, 1.5, 2.0, 3.0)
    ],
    "model_stock": [{}],
    "tsv": [{"scale": s} for s in (0.5, 0.7, 1.0, 1.3, 1.6, 2.0)],
    "iso_c": [{"scale": s} for s in (0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0)],
}
# --small-sweep: the cheaper sweeps used to compare suite configurations on val (no DARE, linear, Model Stock)
SMALL_GRIDS = {
    "task_arithmetic": GRIDS["task_arithmetic"],
    "tsv": [{"scale": s} for s in (0.7, 1.0, 1.3, 1.6)],
    "iso_c": [{"scale": s} for s in (0.7, 1.0, 1.6, 2.5)],
    "ties": [{"density": 0.2, "scale": s} for s in (0.5, 1.0, 1.5)],
}
ADA_BATCH = 16  # unlabeled inputs per task per step, as in the paper
ADA_DENSITY = 0.2  # AdaMerging++: TIES's default trim density
DATA_FREE = ("linear", "task_arithmetic", "ties", "dare", "model_stock", "tsv", "iso_c")


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def merge_all(
    suite, ada_steps: int, ada_lrs: tuple[float, ...], split: str = "test", grids: dict = GRIDS
) -> list[dict]:
    """One row per method: chosen options, per-task accuracy on ``split``, normalized accuracy, merge wall time.

    Options are chosen on val whatever ``split``; ``split="val"`` scores the rows on val too (AdaMerging
    then adapts on the unlabeled val inputs), for choosing a suite configuration without looking at test.
    """
    individual = {t: suite.accuracy(ft, t, split) for t, ft in zip(suite.tasks, suite.finetuned)}
    rows = [
        {"method": "base (no merge)", "options": "", "acc": suite.evaluate(suite.base, split), "time": 0.0},
        {"method": "individual fine-tunes", "options": "", "acc": individual, "time": 0.0},
    ]
    missing = sorted(set(METHODS.names()) - set(GRIDS) - {"adamerging", "rebasin"})
    if missing and grids is GRIDS:
        raise SystemExit(f"no sweep defined for merge method(s) {missing}")
    chosen = {}
    for method, grid in grids.items():
        best = None
        for options in grid:
            state = rankwise.merge(suite.finetuned, method=method, base=suite.base, **options)
            val = _mean(suite.evaluate(state, "val"))
            if best is None or val > best[0]:
                best = (val, options)
        chosen[method] = best[1]
        t0 = time.perf_counter()
        state = rankwise.merge(suite.finetuned, method=method, base=suite.base, **best[1])
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "options": _fmt(best[1]), "acc": suite.evaluate(state, split), "time": seconds})
    ta_scale = min(chosen["task_arithmetic"]["scale"], 1.0)
    for name, density in (("adamerging", None), ("adamerging++", ADA_DENSITY)):
        # hyper-parameters: adapt on the unlabeled val inputs, pick by val accuracy; then adapt on test inputs
        best = None
        for init in sorted({ta_scale, 0.3}):
            for lr in ada_lrs:
                options = {"init": init, "lr": lr, "steps": ada_steps, "batch_size": ADA_BATCH, "density": density}
                res = learn_coefficients(
                    suite.finetuned,
                    suite.base,
                    [suite.inputs(t, "val") for t in suite.tasks],
                    heads=suite.heads,
                    seed=0,
                    **options,
                )
                val = _mean(suite.evaluate(res.state, "val"))
                if best is None or val > best[0]:
                    best = (val, options)
        t0 = time.perf_counter()
        res = learn_coefficients(
            suite.finetuned,
            suite.base,
            [suite.inputs(t, split) for t in suite.tasks],
            heads=suite.heads,
            seed=0,
            **best[1],
        )
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "method": name,
                "options": _fmt({k: v for k, v in best[1].items() if v is not None}),
                "acc": suite.evaluate(res.state, split),
                "time": seconds,
                "note": f"entropy {res.entropy[0]:.3f} -> {res.entropy[-1]:.3f}; "
                f"lambda range [{res.coefficients.min():.2f}, {res.coefficients.max():.2f}]",
            }
        )
    for r in rows:
        r["norm"] = sum(r["acc"][t] / individual[t] for t in suite.tasks) / len(suite.tasks)
    return rows


@torch.no_grad()
def entropy_vs_accuracy(suite) -> None:
    """AdaMerging's premise, checked on val: does lower mean entropy go with higher accuracy along task arithmetic?"""
    individual = {t: suite.accuracy(ft, t, "val") for t, ft in zip(suite.tasks, suite.finetuned)}
    print("task arithmetic on val: scale -> task-averaged entropy (nats) / normalized accuracy %")
    for scale in (0.0, *SCALES[:5]):
        model = suite.load_backbone(
            rankwise.merge(suite.finetuned, method="task_arithmetic", base=suite.base, scale=scale)
        )
        ent = []
        for t, head in zip(suite.tasks, suite.heads):
            logp = torch.log_softmax(head(model(suite.inputs(t, "val"))), -1)
            ent.append(-(logp.exp() * logp).sum(-1).mean().item())
        acc = suite.evaluate(model, "val")
        print(f"  {scale:g}: {sum(ent) / len(ent):.3f} / {100 * _mean({t: acc[t] / individual[t] for t in acc}):.1f}")


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def print_merges(suite, rows: list[dict]) -> None:
    head = "| method | options | " + " | ".join(suite.tasks) + " | mean acc | normalized | time (s) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        accs = " | ".join(f"{100 * r['acc'][t]:.1f}" for t in suite.tasks)
        print(
            f"| {r['method']} | {r['options']} | {accs} | {100 * _mean(r['acc']):.1f} | "
            f"{100 * r['norm']:.1f} | {r['time']:.2f} |"
        )
    for r in rows:
        if "note" in r:
            print(f"\n{r['method']}: {r['note']}")
    by = {r["method"]: r["norm"] for r in rows}
    ta = by["task_arithmetic"]
    best = max((m for m in DATA_FREE if m in by), key=by.get)
    closed = (by[best] - ta) / (1.0 - ta)
    print(
        f"\nbest data-free merge: {best} at {100 * by[best]:.1f}% normalized; task arithmetic "
        f"{100 * ta:.1f}%: closes {100 * closed:.0f}% of the gap to the individual models (target >= 50%)"
    )
    for name in ("adamerging", "adamerging++"):
        print(
            f"{name} {100 * by[name]:.1f}% vs task arithmetic {100 * ta:.1f}%: "
            f"{'beats' if by[name] > ta else 'does NOT beat'} it"
        )


def _loss(template, state, x, y) -> float:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def barrier(a, b, x, y, points: int = 11) -> float:
    """Max over the grid of loss on the straight path minus the linear interpolation of the end losses."""
    sa, sb = a.state_dict(), b.state_dict()
    alphas = torch.linspace(0, 1, points).tolist()
    losses = [_loss(a, {k: (1 - t) * sa[k] + t * sb[k] for k in sa}, x, y) for t in alphas]
    return max(loss - ((1 - t) * losses[0] + t * losses[-1]) for loss, t in zip(losses, alphas))


def _accuracy(template, state, x, y) -> float:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def barriers() -> None:
    x, y = split_data("digits", "train")
    xt, yt = split_data("digits", "test")
    print(
        "| model | barrier train (naive) | barrier train (aligned) | barrier test (naive) | barrier test (aligned) "
        "| test reduction | midpoint test acc naive / rebasin | align time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arch, width, epochs in (("mlp", 128, 30), ("cnn", 64, 20)):
        a, b = (train_classifier(make_model(arch, seed=s, width=width), x, y, epochs=epochs, seed=s) for s in (1, 2))
        t0 = time.perf_counter()
        b_aligned = align(b, a, seed=0)
        seconds = time.perf_counter() - t0
        tr0, tr1 = barrier(a, b, x, y), barrier(a, b_aligned, x, y)
        te0, te1 = barrier(a, b, xt, yt), barrier(a, b_aligned, xt, yt)
        naive = rankwise.merge([a, b], method="linear")
        rebased = rankwise.merge([a, b], method="rebasin", seed=0)
        accs = f"{100 * _accuracy(a, naive, xt, yt):.1f} / {100 * _accuracy(a, rebased, xt, yt):.1f}"
        print(
            f"| {arch} width {width} | {tr0:.3f} | {tr1:.3f} | {te0:.3f} | {te1:.3f} | {100 * (1 - te1 / te0):.0f}% "
            f"| {accs} | {seconds:.2f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--tasks", default="hard", choices=("default", "hard"))
    p.add_argument("--ft-lr", type=float, default=0.001, help="SGD learning rate of the fine-tunes")
    p.add_argument("--ft-epochs", type=int, default=20)
    p.add_argument(
        "--heads",
        default="finetuned",
        choices=("finetuned", "probe", "zeroshot"),
        help="task heads fine-tuned with the backbone, or linear probes on the base kept frozen",
    )
    p.add_argument(
        "--pretrain",
        default="augmented",
        choices=("plain", "augmented"),
        help="base trained on the plain digits, or on them under generic random jitter",
    )
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the base's training loss")
    p.add_argument(
        "--feature-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the backbone ends with a parameter-free layer norm (CLIP-like normalised features)",
    )
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="the suite's training seed")
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "val"),
        help="score the merges on test (the report) or on val (to choose a suite configuration)",
    )
    p.add_argument("--ada-steps", type=int, default=200)
    p.add_argument(
        "--ada-lr",
        type=float,
        nargs="+",
        default=[1e-3, 1e-2],
        help="AdaMerging learning rates to choose from on the val split",
    )
    p.add_argument(
        "--small-sweep",
        action="store_true",
        help="smaller option sweeps, fewer methods (for comparing suite configurations on val)",
    )
    p.add_argument("--skip-barrier", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    tasks = DEFAULT_TASKS if args.tasks == "default" else HARD_TASKS
    t0 = time.perf_counter()
    suite = load_digits_suite(
        args.arch,
        tasks,
        width=args.width,
        ft_lr=args.ft_lr,
        ft_epochs=args.ft_epochs,
        heads=args.heads,
        pretrain=args.pretrain,
        label_smoothing=args.label_smoothing,
        base_epochs=args.base_epochs,
        seed=args.seed,
        feature_norm=args.feature_norm,
    )
    norm = ", feature norm" if args.feature_norm else ""
    print(
        f"suite ({args.arch}, width {args.width}{norm}, tasks {args.tasks}, heads {args.heads}, seed {args.seed}, "
        f"base: {args.pretrain} digits, label smoothing {args.label_smoothing:g}, {args.base_epochs} epochs; "
        f"fine-tunes: SGD lr {args.ft_lr:g} for {args.ft_epochs} epochs) "
        f"ready in {time.perf_counter() - t0:.1f} s; scored on "
        f"{args.split}\n"
    )
    print_merges(
        suite,
        merge_all(suite, args.ada_steps, tuple(args.ada_lr), args.split, SMALL_GRIDS if args.small_sweep else GRIDS),
    )
    print()
    entropy_vs_accuracy(suite)
    if not args.skip_barrier:
        print()
        barriers()


if __name__ == "__main__":
    main()
