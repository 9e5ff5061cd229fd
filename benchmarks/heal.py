"""Healing benchmark: SmolLM2-135M compressed at several keeps, then distilled towards the dense model.

Prints, for every keep: perplexity dense / compressed / healed on held-out text, the fraction of the
compressed model's perplexity gap to dense that healing closes, KL(dense || model) and next-token top-1
agreement with the dense model before and after, and the heal's wall time. Compression uses the same
calibration as ``benchmarks/llm.py`` (default 8 x 512 tokens of ``builtin_text("calib")``, CompressConfig
defaults); healing reads ``builtin_text("calib")`` too; evaluation reads the disjoint ``builtin_text("eval")``.

    python benchmarks/heal.py --keeps 0.8 0.6 0.4 --tokens 61440 --seq-len 512
    python benchmarks/heal.py --keeps 0.6 --tokens 57344 --held-out 8 --steps 128 --lr 1e-4 --eval-tokens 2048
    python benchmarks/heal.py --keeps 0.6 --steps 24 --lr 1e-4 3e-4 1e-3     # a short learning-rate sweep
    python benchmarks/heal.py --tiny          # free vs orthonormal factors on tiny random Llamas (seconds)
    python benchmarks/heal.py --keeps 0.6 --step-cost 4 --threads 1      # CPU time of a step, chunks vs whole
    python benchmarks/heal.py --keeps 0.6 --tokens 57344 --held-out 8 --steps 128 --autocast 0 1  # float32 vs bf16
    python benchmarks/heal.py --keeps 0.6 --step-cost 2 --orthogonal 0 1 --seq-len 128 --threads 1  # orth. vs free
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import rankwise
from rankwise.calibrate import collect_stats
from rankwise.compress import CompressConfig, compress_
from rankwise.data import builtin_text, token_sequences
from rankwise.eval import next_token_agreement
from rankwise.heal import HealConfig, heal_
from rankwise.io.models import load_model
from rankwise.targets import find_targets


def compressed_models(args, tokenizer, load_dense) -> dict[float, Path]:
    """``{keep: rankwise directory}``, compressed once and kept under ``--work`` for later runs."""
    work = Path(args.work)
    todo = [k for k in args.keeps if not (work / f"keep{k}" / "config.json").is_file()]
    if todo:
        dense = load_dense()
        calib = token_sequences(tokenizer, builtin_text("calib"), 512, args.calib_seqs)
        t0 = time.perf_counter()
        stats = collect_stats(dense, find_targets(dense), calib, fisher_seqs=args.calib_seqs, progress=False)
        print(f"calibration statistics on {calib.shape[0]} x {calib.shape[1]} tokens: {time.perf_counter() - t0:.1f} s")
        for keep in todo:
            model = load_dense()
            t0 = time.perf_counter()
            config = CompressConfig(keep=keep, calib_seqs=calib.shape[0], seq_len=512)
            compress_(model, config, calib, stats=stats, progress=False)
            print(f"compressed at keep {keep}: {time.perf_counter() - t0:.1f} s")
            rankwise.save(model, work / f"keep{keep}", force=True)
    return {k: work / f"keep{k}" for k in args.keeps}


def tiny_comparison(steps: int = 60, seeds: int = 3) -> None:
    """Free vs orthonormal factors, and full-vocabulary vs top-32 KL (free factors), at the same steps on random
    tiny Llamas (init std 0.2, so that their next-token distributions are peaked): block linears truncated to
    rank 4, random token ids; prints the held-out full-vocabulary KL to the teacher after healing as a
    fraction of before, mean over ``seeds`` models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.layers import LowRankLinear
    from rankwise.targets import replace_module

    print(
        f"tiny Llamas (hidden 32, 2 blocks, vocab 2000), rank 4, {steps} steps of 2 x 32 random tokens, "
        f"held-out KL after / before, mean of {seeds} seeds"
    )
    for lr in (1e-3, 3e-3, 1e-2):
        ratios = {"free": [], "orthonormal": [], "top-32": []}
        for seed in range(seeds):
            torch.manual_seed(seed)
            config = LlamaConfig(
                vocab_size=2000,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                initializer_range=0.2,
            )
            teacher = LlamaForCausalLM(config).eval()
            gen = torch.Generator().manual_seed(seed)
            ids, held_out = (torch.randint(0, 2000, (n, 32), generator=gen) for n in (32, 8))
            for variant in ratios:
                student = LlamaForCausalLM(config).eval()
                student.load_state_dict(teacher.state_dict())
                for name, m in list(student.named_modules()):
                    if isinstance(m, torch.nn.Linear) and ".layers." in name:
                        replace_module(student, name, LowRankLinear.from_dense(m, 4))
                before = next_token_agreement(student, teacher, held_out, progress=False).kl
                how = HealConfig(
                    steps=steps,
                    batch_size=2,
                    lr=lr,
                    orthogonal=variant == "orthonormal",
                    top_k=32 if variant == "top-32" else 0,
                )
                heal_(student, teacher, ids, how, progress=False)
                ratios[variant].append(next_token_agreement(student, teacher, held_out, progress=False).kl / before)
        print(f"lr {lr:.0e}: " + "  ".join(f"{k} {sum(v) / seeds:.3f}" for k, v in ratios.items()))


def step_cost(path: Path, dense, ids: torch.Tensor, steps: int, orthogonal: list[int]) -> None:
    """CPU (user + sys) and wall seconds per heal step of the model at ``path`` (setup included: loading excluded,
    the orthonormal factors' SVDs included), free and/or orthonormal factors (``orthogonal``), each with the output
    layer and the KL by chunks and with the whole logits, one after the other in this process (the same ``steps``
    sequences)."""
    import resource

    import rankwise.heal

    split = rankwise.heal.split_head
    for orth in orthogonal:
        for variant in ("by chunks", "whole logits"):
            rankwise.heal.split_head = split if variant == "by chunks" else (lambda model, ids: None)
            model = rankwise.load(path)
            r0, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            config = HealConfig(steps=steps, orthogonal=bool(orth), checkpointing=False)
            heal_(model, dense, ids[:steps], config, progress=False)
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
            user, system = ((getattr(r1, k) - getattr(r0, k)) / steps for k in ("ru_utime", "ru_stime"))
            cpu = f"user {user:.2f} + sys {system:.2f} = {user + system:.2f} s CPU/step"
            factors = "orthonormal" if orth else "free"
            print(f"{factors} factors, {variant}: {cpu}, wall {wall / steps:.2f} s/step", flush=True)
    rankwise.heal.split_head = split


def gap_closed(before, after) -> float:
    """The fraction of the compressed model's perplexity gap to dense that healing closed (nan without text)."""
    if not before:
        return float("nan")
    return (before.perplexity - after.perplexity) / (before.perplexity - before.ref_perplexity)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--calib-seqs", type=int, default=8, help="compression calibration sequences of 512 tokens")
    p.add_argument("--tokens", type=int, default=61440, help="healing tokens (distinct), cut into --seq-len sequences")
    p.add_argument(
        "--held-out",
        type=int,
        default=0,
        help="healing sequences after --tokens kept out of training: "
        "the gap closed on them chooses the learning rate without reading the evaluation text",
    )
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, help="optimizer steps (default: one pass over the healing tokens)")
    p.add_argument("--lr", type=float, nargs="+", default=[HealConfig.lr])
    p.add_argument("--train-norms", action="store_true")
    p.add_argument("--orthogonal", type=int, nargs="+", default=[0], help="0 free factors, 1 orthonormal (both: 0 1)")
    p.add_argument("--top-k", type=int, nargs="+", default=[0], help="0 = full-vocabulary KL, k = cached top-k")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument(
        "--autocast", type=int, nargs="+", default=[0], help="0 float32, 1 bfloat16 autocast of the bodies (both: 0 1)"
    )
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/rankwise-heal-bench", help="where the compressed models are kept")
    p.add_argument(
        "--step-cost",
        type=int,
        metavar="STEPS",
        help="only time STEPS heal steps of the first keep, output layer by chunks vs whole logits "
        "(free and/or orthonormal factors: --orthogonal)",
    )
    p.add_argument("--tiny", action="store_true", help="only the free vs orthonormal comparison on tiny Llamas")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        return tiny_comparison()
    dense, tokenizer, _ = load_model("smollm2", progress=False)
    dense.float()
    paths = compressed_models(args, tokenizer, lambda: load_model("smollm2", progress=False)[0].float())
    n_train = args.tokens // args.seq_len
    heal_ids = token_sequences(tokenizer, builtin_text("calib"), args.seq_len, n_train + args.held_out, what="healing")
    heal_ids, held_ids = heal_ids[:n_train], heal_ids[n_train:]
    eval_ids = token_sequences(tokenizer, builtin_text("eval"), 512, args.eval_tokens // 512, what="evaluation")
    print(
        f"healing text {heal_ids.shape[0]} x {heal_ids.shape[1]} tokens (calib split), {held_ids.shape[0]} more "
        f"held out of training; evaluation {eval_ids.shape[0]} x {eval_ids.shape[1]} tokens (eval split); "
        f"torch threads {args.threads}"
    )
    head = (
        f"{'keep':>4} {'lr':>7} {'orth':>4} {'bf16':>4} {'top-k':>5} {'norms':>5} {'steps':>5} {'ppl dense':>9} "
        f"{'ppl comp':>9} {'ppl healed':>10} {'gap closed':>10} {'KL comp':>8} {'KL healed':>9} {'top1 comp':>9} "
        f"{'top1 heal':>9} {'heal s':>7} {'heal cpu s':>10} {'held-out gap closed':>19}"
    )
    if args.step_cost:
        return step_cost(paths[args.keeps[0]], dense, heal_ids, args.step_cost, args.orthogonal)
    rows = []
    for keep, path in paths.items():
        before = next_token_agreement(rankwise.load(path), dense, eval_ids, progress=False)
        held = args.held_out and next_token_agreement(rankwise.load(path), dense, held_ids, progress=False)
        for lr in args.lr:
            for orth, bf16 in ((o, a) for o in args.orthogonal for a in args.autocast):
                for k in args.top_k:
                    model = rankwise.load(path)
                    config = HealConfig(
                        steps=args.steps,
                        batch_size=args.batch,
                        lr=lr,
                        train_norms=args.train_norms,
                        orthogonal=bool(orth),
                        top_k=k,
                        checkpointing=args.checkpointing,
                        autocast=bool(bf16),
                    )
                    cpu = time.process_time()
                    report = heal_(model, dense, heal_ids, config, progress=False)
                    cpu = time.process_time() - cpu
                    after = next_token_agreement(model, dense, eval_ids, progress=False)
                    closed = gap_closed(before, after)
                    held_closed = gap_closed(held, next_token_agreement(model, dense, held_ids, progress=False))
                    rows.append(
                        f"{keep:>4} {lr:>7.0e} {orth:>4} {bf16:>4} {k:>5} {int(args.train_norms):>5} "
                        f"{len(report.losses):>5} {before.ref_perplexity:>9.3f} {before.perplexity:>9.3f} "
                        f"{after.perplexity:>10.3f} {closed:>10.3f} {before.kl:>8.4f} {after.kl:>9.4f} "
                        f"{before.top1:>9.4f} {after.top1:>9.4f} {report.seconds:>7.1f} {cpu:>10.1f} "
                        f"{held_closed:>19.3f}"
                    )
                    print(rows[-1], flush=True)
    print(head)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
