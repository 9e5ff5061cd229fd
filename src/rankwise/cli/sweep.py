"""CLI command sweep (thin: argument parsing only, the work is in rankwise.sweep)."""

from __future__ import annotations

import argparse
import sys

from .compress import (
    DEFAULT_EVAL_TOKENS,
    DEFAULT_SENTENCES,
    add_calibration_options,
    add_report_option,
    check_report_option,
    config_and_calibration,
    write_run_report,
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``sweep``; it sets func to a callable(args) -> int."""
    p = sub.add_parser(
        "sweep",
        help="compress at several budgets from one calibration; table of size vs predicted and measured quality",
        description="Calibrate and factorize MODEL once, then allocate every --keep, print and write "
        "(OUT/sweep.csv, OUT/sweep.json) the parameters, the allocator's predicted loss increase and, "
        "with --eval, the measured quality; --save or --out-best writes one model to OUT/keep-K/.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="transformers model dir, .gguf/.safetensors file, or alias (smollm2, minilm)"
    )
    p.add_argument(
        "--keep",
        type=float,
        nargs="+",
        required=True,
        metavar="K",
        help="fractions in (0, 1] of the targeted parameters",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument(
        "--eval",
        action="store_true",
        help="measure every keep: perplexity (causal LMs) or embedding cosine to the dense model (encoders)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=DEFAULT_EVAL_TOKENS,
        metavar="N",
        help=f"causal LMs: held-out tokens scored (default {DEFAULT_EVAL_TOKENS})",
    )
    p.add_argument(
        "--sentences",
        type=int,
        default=DEFAULT_SENTENCES,
        metavar="N",
        help=f"encoders: held-out sentences (default {DEFAULT_SENTENCES})",
    )
    p.add_argument("--save", type=float, metavar="K", help="write the model compressed at this keep (one of --keep)")
    p.add_argument(
        "--out-best",
        type=float,
        metavar="Q",
        help="with --eval: write the smallest keep whose perplexity is <= Q (encoders: whose cosine is >= Q)",
    )
    add_calibration_options(p)
    add_report_option(p)
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run_sweep)


def run_sweep(args) -> int:
    from ..data import builtin_text, token_sequences
    from ..eval import split_sentences
    from ..io.models import dir_kind, load_weights
    from ..sweep import check_keeps, cosine_measure, perplexity_measure, sweep

    keeps = check_keeps(args.keep)
    if args.save is not None and args.out_best is not None:
        raise ValueError("--save and --out-best are alternatives; give one")
    if args.save is not None and float(args.save) not in keeps:
        raise ValueError(f"--save {args.save} is not one of the swept keeps ({', '.join(map(str, keeps))})")
    if args.out_best is not None and not args.eval:
        raise ValueError("--out-best needs --eval (it chooses by measured quality)")
    check_report_option(args)
    config, hf_dir, tokenizer, calib = config_and_calibration(args)
    causal = dir_kind(hf_dir) == "causal-lm"
    measure = None
    if args.eval:
        text = builtin_text("eval")
        if causal:
            measure = perplexity_measure(
                token_sequences(tokenizer, text, 512, max(1, args.eval_tokens // 512), what="evaluation")
            )
        else:
            measure = cosine_measure(load_weights(hf_dir)[0], tokenizer, split_sentences(text)[: args.sentences])
    better = (lambda q: q <= args.out_best) if causal else (lambda q: q >= args.out_best)
    failed = []

    def choose(rows):
        if args.save is not None:
            return args.save
        if args.out_best is None:
            return None
        ok = [r.keep for r in rows if better(r.quality)]
        if not ok:
            failed.append(rows)
        return min(ok) if ok else None

    what = "perplexity" if causal else "cosine"
    rows, reports, chosen = sweep(
        hf_dir,
        args.out,
        keeps,
        config,
        calib,
        measure=measure,
        measure_name=what,
        choose=choose,
        device=args.device,
        force=args.force,
    )
    print(f"{'keep':>6} {'params':>14} {'kept':>6} {'predicted loss':>15} {what if args.eval else '':>11}")
    for r in rows:
        q = f"{r.quality:11.4f}" if r.quality is not None else ""
        print(
            f"{r.keep:>6} {r.params_after:>14,} {r.params_after / r.params_before:>6.3f} {r.predicted_loss:>15.6g} {q}"
        )
    print(
        f"wrote {args.out}/sweep.csv and sweep.json"
        + (f"; model at {args.out}/keep-{float(chosen)}" if chosen is not None else "")
    )
    write_run_report(args)
    if failed:
        best = min(rows, key=lambda r: r.quality) if causal else max(rows, key=lambda r: r.quality)
        print(
            f"rankwise sweep: no swept keep reaches {what} {'<=' if causal else '>='} {args.out_best} "
            f"(best {best.quality:.4f} at keep {best.keep}); no model written",
            file=sys.stderr,
        )
        return 1
    return 0
