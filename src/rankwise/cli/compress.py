"""CLI commands compress, eval and info (thin: argument parsing only, the work is in the library)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_EVAL_TOKENS = 8192
DEFAULT_SENTENCES = 256
DEFAULT_CHAT_TOKENS = 64
QUANT_OPTIONS = ("bits", "rank", "group_size", "bits_per_weight", "size")


def add_calibration_options(p: argparse.ArgumentParser) -> None:
    """The options shared by compress and sweep: method, allocator, calibration data, targets, device."""
    from ..allocate import ALLOCATORS
    from ..compress import METHODS, CompressConfig

    d = CompressConfig()
    p.add_argument("--method", help=f"{', '.join(METHODS)} (default {d.method})")
    p.add_argument("--allocate", help=f"rank allocator: {', '.join(ALLOCATORS.names())} (default {d.allocate})")
    p.add_argument(
        "--calib", metavar="FILE", help="UTF-8 text file for calibration (default: built-in text, disjoint from eval's)"
    )
    p.add_argument(
        "--calib-tokens",
        type=int,
        metavar="N",
        help=f"calibration tokens, cut into sequences of --seq-len (default {d.calib_seqs * d.seq_len})",
    )
    p.add_argument("--seq-len", type=int, help=f"calibration sequence length (default {d.seq_len})")
    p.add_argument(
        "--include",
        metavar="REGEX",
        help="compress every linear layer whose name matches (default: those in the blocks)",
    )
    p.add_argument("--exclude", metavar="REGEX", help="then leave out the layers whose name matches")
    p.add_argument("--seed", type=int, help=f"seed for every random step (default {d.seed})")
    p.add_argument(
        "--device",
        default="auto",
        help="where blocks are computed: auto (CUDA when present), cpu, cuda, cuda:N (default auto)",
    )


def add_report_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report",
        action="store_true",
        help="also write OUT/report.html (plots of ranks, spectra, predicted "
        "loss, timings; see `rankwise report`); needs matplotlib (the report extra)",
    )


def check_report_option(args) -> None:
    """With ``--report``: fail on a missing matplotlib before the run, not after it."""
    if args.report:
        from ..report_figures import check_matplotlib

        check_matplotlib()


def write_run_report(args) -> None:
    """With ``--report``: ``OUT/report.html`` and its figures beside it, in OUT."""
    if args.report:
        from ..report import write_report

        paths = write_report(args.out, Path(args.out) / "report.html")
        print(f"report: {paths[0]}")


def config_and_calibration(args, extra: tuple[str, ...] = ()):
    """``(config, model directory, tokenizer, calibration ids)`` from the shared options; the config is
    validated before the model is read."""
    from ..compress import CompressConfig
    from ..data import builtin_text, token_sequences
    from ..io.models import load_tokenizer, model_dir

    names = ("method", "allocate", "include", "exclude", "seed", "seq_len", *extra)
    given = {k: getattr(args, k) for k in names}
    given = {k: v for k, v in given.items() if v is not None}
    if args.calib_tokens is not None:
        seq_len = given.get("seq_len", CompressConfig.seq_len)
        if args.calib_tokens < seq_len:
            raise ValueError(f"--calib-tokens must be at least --seq-len ({seq_len}), got {args.calib_tokens}")
        given["calib_seqs"] = args.calib_tokens // seq_len
    config = CompressConfig(**given)
    if Path(args.out).exists() and not args.force:
        raise FileExistsError(f"output directory {args.out!r} already exists; pass --force to overwrite it")
    text = _read_text(args.calib, "--calib") if args.calib else builtin_text("calib")
    hf_dir = model_dir(args.model)
    tokenizer = load_tokenizer(hf_dir)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer files, so calibration text cannot be tokenized")
    return (
        config,
        hf_dir,
        tokenizer,
        token_sequences(tokenizer, text, config.seq_len, config.calib_seqs, what="calibration"),
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on sub; each sets func to a callable(args) -> int."""
    from ..compress import CompressConfig

    d = CompressConfig()
    p = sub.add_parser(
        "compress",
        help="factorize a model's layers under one parameter budget and save it",
        description="Factorize the linear layers of MODEL's transformer blocks to keep a fraction "
        "of their parameters, then save a directory that rankwise.load and transformers' "
        "from_pretrained (after `import rankwise`) both reload.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="transformers model dir, .gguf/.safetensors file, or alias (smollm2, minilm)"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument(
        "--keep", type=float, help=f"fraction in (0, 1] of the targeted layers' parameters to keep (default {d.keep})"
    )
    add_calibration_options(p)
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        help=f"calibrate each block on the compressed blocks' outputs, a second pass (default {d.sequential})",
    )
    p.add_argument(
        "--include-head",
        action=argparse.BooleanOptionalAction,
        help="put the LM head (with the input embedding when they are tied) inside the budget, as one more "
        f"target of the loss-aware allocation (default {d.include_head})",
    )
    p.add_argument(
        "--head-weight",
        type=float,
        help=f"with --include-head: factor on the head's predicted loss (default {d.head_weight}; "
        "1 and 4 beat the blocks alone on SmolLM2, 4 more, see BENCHMARKS.md)",
    )
    p.add_argument(
        "--heal-steps",
        type=int,
        metavar="N",
        help="then heal: N steps of distillation towards MODEL on "
        "the calibration text (see `rankwise heal`) before --out is written (default: no healing)",
    )
    q = p.add_argument_group("quantization (block by block; GPTQ with the calibration statistics)")
    q.add_argument(
        "--bits",
        type=int,
        help="quantize the factors of every factorized layer (and the layers left "
        "dense) to this many bits (2, 3, 4, 8); with --method qlr every target layer, plus a rank "
        "--rank correction",
    )
    q.add_argument("--rank", type=int, help="--method qlr: rank of the low-rank correction of the quantization error")
    q.add_argument("--group-size", type=int, help="input columns per quantization scale: 32, 64, 128 (default 128)")
    q.add_argument(
        "--bits-per-weight",
        type=float,
        metavar="X",
        help="a byte budget over the target layers' weights "
        "(codes, scales, zero points, factors counted): bit widths and Q+LR corrections chosen per layer",
    )
    q.add_argument("--size", metavar="SIZE", help="a byte budget for the whole model's weights, e.g. 160MB")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run into --out from its last finished block"
    )
    add_report_option(p)
    p.add_argument(
        "--force", action="store_true", help="replace an existing --out directory (and an interrupted run's files)"
    )
    p.set_defaults(func=run_compress)

    from ..data import CHAT_PROMPTS

    p = sub.add_parser(
        "eval",
        help="perplexity of a causal LM (and its agreement with --ref), or embedding similarity of an encoder to --ref",
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help="model dir (rankwise or transformers), .gguf file or alias")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on (default: built-in held-out text)")
    p.add_argument(
        "--ref",
        metavar="MODEL",
        help="reference model (required for encoders; for LMs: its perplexity, "
        "the mean KL divergence to it and the next-token top-1 agreement with it)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_EVAL_TOKENS,
        metavar="N",
        help=f"causal LMs: tokens scored (default {DEFAULT_EVAL_TOKENS})",
    )
    p.add_argument("--seq-len", type=int, default=512, help="causal LMs: sequence length (default 512)")
    p.add_argument(
        "--chat",
        type=int,
        metavar="N",
        help=f"causal LMs with --ref: also the top-1 agreement along the "
        f"reference's greedy answers to the first N of {len(CHAT_PROMPTS)} built-in chat prompts",
    )
    p.add_argument(
        "--chat-tokens",
        type=int,
        default=DEFAULT_CHAT_TOKENS,
        metavar="N",
        help=f"--chat: longest answer, in tokens (default {DEFAULT_CHAT_TOKENS})",
    )
    p.add_argument(
        "--sentences",
        type=int,
        default=DEFAULT_SENTENCES,
        metavar="N",
        help=f"encoders: sentences compared (default {DEFAULT_SENTENCES})",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("info", help="per-layer ranks and parameter counts of a rankwise directory")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=run_info)


def _read_text(path: str, option: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{option} file {path!r} not found")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{option} file {path!r} is not UTF-8 text: {exc}") from None


def _positive(value, option: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{option} must be an int >= 1, got {value}")


def interrupted(out: str) -> int:
    """What an interrupted compression tells the user; exit status 2."""
    from ..streamed import run_dir

    print(
        f"rankwise compress: interrupted; no output was written. The finished blocks are kept in "
        f"{str(run_dir(out))!r}: rerun with --resume to continue",
        file=sys.stderr,
    )
    return 2


def check_heal_steps(args) -> None:
    _positive(args.heal_steps, "--heal-steps")
    if args.heal_steps is not None and args.resume:
        raise ValueError("--resume cannot be combined with --heal-steps (the unhealed model is not kept)")


def run_compress(args) -> int:
    from ..streamed import compress_checkpoint, resolve_device

    resolve_device(args.device)
    if any(getattr(args, k) is not None for k in QUANT_OPTIONS) or args.method == "qlr":
        from .quant import run_quantized_compress

        if args.report:
            raise ValueError(
                "--report covers low-rank compressions; quantizing runs (--bits, --method qlr, "
                "--bits-per-weight, --size) print their summary instead"
            )
        return run_quantized_compress(args)
    check_report_option(args)
    check_heal_steps(args)
    config, hf_dir, _, calib = config_and_calibration(args, ("keep", "sequential", "include_head", "head_weight"))
    if args.heal_steps is not None:
        return compress_and_heal(args, config, hf_dir, calib)
    try:
        report = compress_checkpoint(
            hf_dir, args.out, config, calib, device=args.device, resume=args.resume, force=args.force
        )
    except KeyboardInterrupt:
        return interrupted(args.out)
    out = Path(args.out)
    print(report.summary())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"saved {out} ({size / 2**20:.1f} MiB of weights); reload with rankwise.load({str(out)!r})")
    write_run_report(args)
    return 0


def compress_and_heal(args, config, hf_dir: Path, calib, quant=None) -> int:
    """``compress --heal-steps N``: compress into a temporary directory next to --out, heal it into --out on the
    calibration text (then quantize it with ``quant``, ``--bits``), remove the temporary directory (also on
    error or interrupt)."""
    import shutil
    import tempfile

    from ..heal import HealConfig
    from ..heal_checkpoint import heal_checkpoint
    from ..streamed import compress_checkpoint

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.unhealed-", dir=out.parent))
    try:
        report = compress_checkpoint(hf_dir, scratch / "compressed", config, calib, device=args.device)
        print(report.summary())
        text = _read_text(args.calib, "--calib") if args.calib else None
        healed = heal_checkpoint(
            scratch / "compressed",
            out,
            HealConfig(steps=args.heal_steps, seed=config.seed),
            ref=hf_dir,
            text=text,
            seq_len=config.seq_len,
            quant=quant,
            force=args.force,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(healed.summary())
    print(f"saved {out}; reload with rankwise.load({str(out)!r})")
    write_run_report(args)
    return 0


def run_eval(args) -> int:
    from ..data import CHAT_PROMPTS, builtin_text, chat_prompts, token_sequences
    from ..eval import (
        chat_agreement,
        embedding_similarity,
        next_token_agreement,
        perplexity,
        pipeline_similarity,
        sentence_transformer,
        split_sentences,
    )
    from ..io.models import dir_kind, load_tokenizer, load_weights, model_dir

    _positive(args.tokens, "--tokens")
    _positive(args.sentences, "--sentences")
    _positive(args.chat_tokens, "--chat-tokens")
    if args.chat is not None and not 1 <= args.chat <= len(CHAT_PROMPTS):
        raise ValueError(f"--chat must be an int from 1 to {len(CHAT_PROMPTS)} (built-in prompts), got {args.chat}")
    text = _read_text(args.text, "--text") if args.text else builtin_text("eval")
    source = args.text or "built-in held-out text"
    hf_dir = model_dir(args.model)
    tokenizer = load_tokenizer(hf_dir)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer files, so the text cannot be tokenized")
    kind = dir_kind(hf_dir)
    if kind == "encoder" and args.ref is None:
        raise ValueError(
            f"model {args.model!r} is an encoder: pass --ref MODEL to compare its sentence embeddings against"
        )
    if args.chat is not None:
        if kind == "encoder":
            raise ValueError(f"--chat applies to causal LMs; model {args.model!r} is an encoder")
        if args.ref is None:
            raise ValueError("--chat needs --ref MODEL: it measures agreement with the reference's answers")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"--chat needs a chat template, and model {args.model!r} has none (no chat_template "
                "in its tokenizer files)"
            )
    ref_dir = model_dir(args.ref) if args.ref else None
    if kind == "causal-lm":
        if args.tokens < args.seq_len:
            raise ValueError(f"--tokens must be at least --seq-len ({args.seq_len}), got {args.tokens}")
        ids = token_sequences(tokenizer, text, args.seq_len, args.tokens // args.seq_len, what="evaluation")
        model, _ = load_weights(hf_dir, device=args.device)
        shape = f"{ids.numel()} tokens ({ids.shape[0]} x {ids.shape[1]}) of {source}"
        if ref_dir is None:
            print(f"perplexity {perplexity(model, ids):.3f} on {shape}")
            return 0
        ref, _ = load_weights(ref_dir, device=args.device)
        a = next_token_agreement(model, ref, ids)
        print(f"perplexity {a.perplexity:.3f} on {shape}")
        print(f"reference perplexity {a.ref_perplexity:.3f}; ratio {a.perplexity / a.ref_perplexity:.3f}")
        print(
            f"KL divergence to reference {a.kl:.5f} nats/token; next-token top-1 agreement {a.top1:.4f} "
            f"({a.tokens} predicted tokens)"
        )
        if args.chat is not None:
            c = chat_agreement(model, ref, tokenizer, chat_prompts(args.chat), max_new_tokens=args.chat_tokens)
            print(
                f"chat: top-1 agreement {c.top1:.4f} along the reference's greedy answers to {c.prompts} built-in "
                f"prompts ({c.tokens} answer tokens, at most {args.chat_tokens} each)"
            )
        return 0
    sentences = split_sentences(text)[: args.sentences]
    if not sentences:
        raise ValueError(f"--text file {args.text!r} holds no sentence of 20 to 400 characters")
    pipelines = [sentence_transformer(d, device=args.device) for d in (hf_dir, ref_dir)]
    if all(p is not None for p in pipelines):
        sim = pipeline_similarity(*pipelines, sentences)
        modules = " -> ".join(type(m).__name__ for m in pipelines[0])
        how = f"through the model's sentence-transformers pipeline ({modules})"
    else:
        model, _ = load_weights(hf_dir, device=args.device)
        ref, _ = load_weights(ref_dir, device=args.device)
        sim = embedding_similarity(model, ref, tokenizer, sentences)
        how = "mean-pooled last hidden states (no sentence-transformers pipeline in both)"
    print(f"mean cosine similarity to {args.ref} {sim:.5f} over {len(sentences)} sentences of {source}; {how}")
    return 0


def run_info(args) -> int:
    from ..io.checkpoint import REPORT_FILE, layer_table, read_quantization_config

    rows, totals = layer_table(args.dir)
    head = f"{'layer':<48} {'shape':>11} {'rank':>5} {'params':>10} {'dense':>10} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for name, (m, n), rank, after, before in rows:
        print(f"{name[-48:]:<48} {f'{m}x{n}':>11} {rank:>5} {after:>10,} {before:>10,} {after / before:>6.3f}")
    for name, spec in read_quantization_config(args.dir).get("modules", {}).items():
        if spec["layer"] == "tied_lowrank_head":
            print(f"tied: {name} computes with the factors of {spec['embedding']} above (no tensors of its own)")
    print("-" * len(head))
    print(
        f"factorized layers: {totals['layers_after']:,} / {totals['layers_before']:,} params "
        f"(ratio {totals['layers_after'] / max(totals['layers_before'], 1):.3f})"
    )
    print(
        f"whole model:       {totals['model_after']:,} / {totals['model_before']:,} params "
        f"(ratio {totals['model_after'] / totals['model_before']:.3f}, "
        f"compression {totals['model_before'] / totals['model_after']:.2f}x)"
    )
    report = Path(args.dir) / REPORT_FILE
    if report.is_file():
        r = json.loads(report.read_text())
        c = r["config"]
        print(
            f"targeted layers:   {r['params_after']:,} / {r['params_before']:,} params "
            f"(kept {r['params_after'] / r['params_before']:.3f}; "
            f"layers left dense count at full size)"
        )
        print(
            f"compressed with keep={c['keep']} method={c['method']} allocate={c['allocate']} update={c['update']}; "
            + ", ".join(f"{k} {v:.1f}s" for k, v in r.get("timings", {}).items())
        )
    return 0
