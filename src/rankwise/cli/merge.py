"""CLI commands for merge (thin: argument parsing only, the work is in the library)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _rank(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _merge(args: argparse.Namespace) -> int:
    import torch

    from ..merging import METHODS, merge_to_dir
    from ..merging.mergekit_yaml import read_mergekit_config

    out = Path(args.out)
    if out.exists() and not args.force:  # fail before reading any model
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass --force to overwrite it")
    flags = {
        "weights": args.weights,
        "density": args.density,
        "scale": args.scale,
        "seed": args.seed,
        "rank": args.rank,
        "normalize": args.normalize,
        "sign_consensus": args.sign_consensus or None,
        "rescale": args.rescale,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if args.method is None:
        if len(args.inputs) != 1 or Path(args.inputs[0]).suffix not in (".yml", ".yaml") or args.base or given:
            raise ValueError(
                "give either --method M --base BASE MODEL... or a single mergekit CONFIG.yml (with only --out/--force)"
            )
        spec = read_mergekit_config(args.inputs[0])
        for note in spec.notes:
            print(f"rankwise merge: note: {note}", file=sys.stderr)
        method, models, base, options, dtype = spec.method, spec.models, spec.base, spec.options, spec.dtype
    else:
        METHODS.get(args.method)
        method, models, base, options = args.method, args.inputs, args.base, given
        dtype = getattr(torch, args.dtype) if args.dtype else None
    for key in ("weights", "density"):
        if isinstance(options.get(key), list) and len(options[key]) == 1:
            options[key] = options[key][0]  # one value applies to every model
    merge_to_dir(models, out, method, base, force=args.force, dtype=dtype, **options)
    print(f"wrote {out}: {method} merge of {len(models)} model(s){' onto ' + str(base) if base else ''}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on sub; each sets func to a callable(args) -> int."""
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned models in weight space (or run a mergekit YAML config)",
        description="rankwise merge --method M --base BASE MODEL... --out DIR, or rankwise merge CONFIG.yml --out DIR",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="MODEL", help="fine-tuned model dirs / .safetensors, or one mergekit CONFIG.yml"
    )
    p.add_argument("--out", required=True, help="merged model directory to write")
    p.add_argument("--method", help="linear, task_arithmetic, ties, dare, model_stock, tsv, iso_c, ...")
    p.add_argument("--base", help="the pre-trained model the fine-tunes share")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model (or one for all)")
    p.add_argument("--density", type=float, nargs="+", help="fraction of each task vector kept (ties, dare)")
    p.add_argument("--lambda", dest="scale", type=float, help="scaling of the merged task vector")
    p.add_argument("--seed", type=int, help="seed of random steps (dare)")
    p.add_argument("--rank", type=_rank, help="per-task rank for tsv: int, or fraction of each layer's rank (0.25)")
    p.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=None, help="divide by the summed weights"
    )
    p.add_argument("--sign-consensus", action="store_true", help="dare: elect signs as TIES does (dare_ties)")
    p.add_argument("--rescale", choices=("density", "l1", "none"), help="dare: how kept entries are rescaled")
    p.add_argument("--dtype", choices=_DTYPES, help="dtype of the merged tensors (default: the base's)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_merge)
