"""``rankwise compress`` with --bits, --method qlr, --bits-per-weight or --size: option checks, then the library."""

from __future__ import annotations

import argparse
from pathlib import Path


def quant_settings(args) -> dict:
    """The quantization keyword arguments of :func:`rankwise.quant_checkpoint.compress_quantized`, checked."""
    from ..quant import check_bits
    from ..quant_budget import parse_size
    from ..quantize import QuantizeConfig

    if args.bits_per_weight is not None and args.size is not None:
        raise ValueError("give one byte budget: --bits-per-weight or --size, not both")
    if args.bits_per_weight is not None or args.size is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("bits", "rank", "group_size") if getattr(args, k) is not None]
        if given or args.method == "qlr":
            raise ValueError(
                f"a byte budget chooses bit widths and corrections per layer; drop {', '.join(given) or '--method qlr'}"
            )
        if args.size is not None:
            return {"size": parse_size(args.size)}
        if not args.bits_per_weight > 0:
            raise ValueError(f"--bits-per-weight must be a number > 0, got {args.bits_per_weight}")
        return {"bits_per_weight": args.bits_per_weight}
    qlr = args.method == "qlr"
    if args.bits is None:
        raise ValueError("--method qlr, --rank and --group-size need --bits (2, 3, 4 or 8)")
    check_bits(args.bits, "--bits")
    if qlr and (args.rank is None or args.rank < 1):
        raise ValueError(f"--method qlr needs --rank R, an int >= 1 (the correction's rank), got {args.rank}")
    if args.rank is not None and not qlr:
        raise ValueError("--rank applies to --method qlr (the factorized layers' ranks come from --keep)")
    group = 128 if args.group_size is None else args.group_size
    return {"quant": QuantizeConfig(args.bits, group, correction_rank=args.rank or 0)}


def run_quantized_compress(args) -> int:
    from ..quant_checkpoint import compress_quantized
    from .compress import check_heal_steps, compress_and_heal, config_and_calibration, interrupted

    settings = quant_settings(args)
    lowrank = "quant" in settings and not settings["quant"].correction_rank
    plain = argparse.Namespace(**{**vars(args), "method": None if args.method == "qlr" else args.method})
    if not lowrank and (args.keep is not None or args.sequential):
        raise ValueError("--keep and --sequential apply to low-rank factorization (--bits without --method qlr)")
    flags = (
        ("--sequential", args.sequential),
        ("--include-head", args.include_head),
        ("--head-weight", args.head_weight),
    )
    unsupported = [flag for flag, value in flags if value not in (None, False)]
    if unsupported:
        raise ValueError(
            f"{unsupported[0]} is not supported by quantizing runs (--bits, --method qlr, --bits-per-weight, --size); "
            "accepted: a low-rank compression without them"
        )
    if args.heal_steps is not None and not lowrank:
        raise ValueError(
            "--heal-steps heals low-rank compressions; with quantization only --bits (the healed factors quantized), "
            "not --method qlr, --bits-per-weight or --size"
        )
    check_heal_steps(args)
    config, hf_dir, _, calib = config_and_calibration(plain, ("keep",) if lowrank else ())
    if args.heal_steps is not None:
        return compress_and_heal(args, config, hf_dir, calib, quant=settings["quant"])
    try:
        report = compress_quantized(
            hf_dir, args.out, calib, config=config, device=args.device, resume=args.resume, force=args.force, **settings
        )
    except KeyboardInterrupt:
        return interrupted(args.out)
    out = Path(args.out)
    print(report.summary())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"saved {out} ({size:,} bytes of weights on disk, {report.model_bytes:,} counted); "
        f"reload with rankwise.load({str(out)!r})"
    )
    return 0
