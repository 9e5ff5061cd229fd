"""CLI commands for delta (thin: argument parsing only, the work is in the library)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _extract(args: argparse.Namespace) -> int:
    from ..delta import extract_delta

    out = Path(args.out)
    if out.exists() and not args.force:  # fail before the (long) extraction, not after it
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass --force to overwrite it")
    delta = extract_delta(
        args.base,
        args.finetuned,
        rank=args.rank,
        keep=args.keep,
        energy=args.energy,
        include=args.include,
        exclude=args.exclude,
        save_modules=args.save_module or (),
        exact_other="skip" if args.skip_other else "store",
        progress=True,
    )
    delta.save_peft(out, force=args.force)
    ranks = sorted(delta.ranks.values())
    saved = sorted({name.rpartition(".")[0] for name in delta.exact})
    span = f"ranks {ranks[0]}..{ranks[-1]}" if ranks else "no low-rank layers"
    print(
        f"wrote {out}: {len(ranks)} LoRA layers ({span}), {delta.num_params} factor parameters, "
        f"relative error {delta.relative_error():.4g}, {len(delta.exact)} tensors stored exactly"
        + (f" (full-rank modules: {', '.join(saved)})" if saved else "")
    )
    return 0


def _apply(args: argparse.Namespace) -> int:
    from ..delta import apply_delta_checkpoint

    apply_delta_checkpoint(args.base, args.delta, args.out, force=args.force)
    print(f"wrote {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on sub; each sets func to a callable(args) -> int."""
    delta = sub.add_parser("delta", help="store a fine-tune as a low-rank delta (PEFT LoRA adapter), apply one")
    verbs = delta.add_subparsers(dest="verb", required=True)

    ext = verbs.add_parser("extract", help="factorize FINETUNED - BASE into a PEFT LoRA adapter directory")
    ext.add_argument("base", help="base model: HF directory, .safetensors, .gguf or alias (smollm2)")
    ext.add_argument("finetuned", help="fine-tuned model, same architecture as BASE")
    ext.add_argument("--out", required=True, help="adapter directory to write")
    budget = ext.add_mutually_exclusive_group()
    budget.add_argument("--rank", type=int, help="the same LoRA rank for every changed layer")
    budget.add_argument("--keep", type=float, help="fraction in (0, 1] of the dense parameters spent on factors")
    budget.add_argument("--energy", type=float, help="fraction in (0, 1] of the deltas' squared Frobenius norm kept")
    ext.add_argument("--include", metavar="REGEX", help="factorize only the Linear layers whose name matches")
    ext.add_argument("--exclude", metavar="REGEX", help="then leave out the layers whose name matches")
    ext.add_argument(
        "--save-module",
        action="append",
        metavar="NAME",
        help="store this module (name or dotted "
        "suffix, e.g. lm_head) at full rank, in the adapter's modules_to_save; repeatable",
    )
    ext.add_argument(
        "--skip-other",
        action="store_true",
        help="drop changed embeddings/norms/biases and the layers "
        "--include/--exclude leave out, instead of storing them exactly",
    )
    ext.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ext.set_defaults(func=_extract)

    app = verbs.add_parser("apply", help="write BASE + the adapter in DIR as a merged checkpoint")
    app.add_argument("base", help="base model: HF directory, .safetensors, .gguf or alias (smollm2)")
    app.add_argument("delta", help="PEFT LoRA adapter directory (from `rankwise delta extract` or any LoRA trainer)")
    app.add_argument("--out", required=True, help="merged model directory to write")
    app.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    app.set_defaults(func=_apply)
