"""CLI command heal (thin: argument parsing only, the work is in rankwise.heal_checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path


def heal_config(args):
    from ..heal import HealConfig

    given = {
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch,
        "orthogonal": args.orthogonal,
        "top_k": args.top_k,
        "seed": args.seed,
        "checkpointing": args.checkpointing,
        "autocast": args.autocast,
    }
    return HealConfig(train_norms=args.train_norms, **{k: v for k, v in given.items() if v is not None})


def heal_quantization(bits, group_size):
    """The :class:`rankwise.quantize.QuantizeConfig` of ``--bits`` / ``--group-size`` after healing, or None."""
    from ..quant import check_bits
    from ..quantize import QuantizeConfig

    if bits is None:
        if group_size is not None:
            raise ValueError("--group-size needs --bits (2, 3, 4 or 8)")
        return None
    return QuantizeConfig(check_bits(bits, "--bits"), 128 if group_size is None else group_size)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on sub; each sets func to a callable(args) -> int."""
    from ..heal import HealConfig

    d = HealConfig()
    p = sub.add_parser(
        "heal",
        help="distil a compressed model towards its dense original and save it",
        description="Fine-tune the factors of the rankwise directory DIR so that its next-token "
        "distributions follow the dense model's (KL divergence), on text disjoint from `rankwise "
        "eval`'s, and save the result as a new rankwise directory.",
    )
    p.add_argument("dir", metavar="DIR", help="a rankwise directory (written by rankwise compress)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--ref", metavar="MODEL", help="the dense model (default: the base model DIR's model card names)")
    p.add_argument("--text", metavar="FILE", help="UTF-8 healing text (default: built-in text, disjoint from eval's)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one pass over the healing sequences)")
    p.add_argument("--tokens", type=int, metavar="N", help="healing tokens read from the text (default: all of it)")
    p.add_argument("--seq-len", type=int, default=512, help="healing sequence length (default 512)")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {d.lr})")
    p.add_argument("--batch", type=int, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--train-norms", action="store_true", help="also train the normalization layers")
    p.add_argument(
        "--orthogonal",
        action=argparse.BooleanOptionalAction,
        help=f"keep each factor pair orthonormal, singular values free (default {d.orthogonal})",
    )
    p.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        help=f"recompute each block's activations in the backward pass (default {d.checkpointing})",
    )
    p.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        help=f"run the transformer bodies in bfloat16 autocast; output layer, loss, weights and optimizer stay "
        f"float32 (default {d.autocast})",
    )
    p.add_argument(
        "--top-k",
        type=int,
        help="KL on the teacher's top-k tokens, cached before training so the "
        f"teacher is freed (default {d.top_k}: the whole vocabulary, teacher run on the fly)",
    )
    p.add_argument("--seed", type=int, help="seed of the data order (default 0)")
    p.add_argument(
        "--bits", type=int, help="then quantize the healed factors (and the layers left dense) to 2, 3, 4 or 8 bits"
    )
    p.add_argument("--group-size", type=int, help="--bits: input columns per quantization scale (default 128)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run_heal)


def run_heal(args) -> int:
    from ..heal_checkpoint import heal_checkpoint
    from .compress import _read_text

    config = heal_config(args)
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be an int >= 2, got {args.seq_len}")
    if args.tokens is not None and args.tokens < args.seq_len:
        raise ValueError(f"--tokens must be at least --seq-len ({args.seq_len}), got {args.tokens}")
    quant = heal_quantization(args.bits, args.group_size)
    text = _read_text(args.text, "--text") if args.text else None
    report = heal_checkpoint(
        args.dir,
        args.out,
        config,
        ref=args.ref,
        text=text,
        tokens=args.tokens,
        seq_len=args.seq_len,
        quant=quant,
        force=args.force,
    )
    print(report.summary())
    print(f"saved {Path(args.out)}; reload with rankwise.load({args.out!r})")
    return 0
