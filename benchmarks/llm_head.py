"""SmolLM2's tied embedding / LM head inside the budget (include_head) vs the blocks alone, same total parameters.

One calibration (loss-aware whitening, the head priced from the loss-head pass) gives every layer's curve;
at each whole-model keep K both variants are allocated from those same curves so that the model's total
parameter count is K times the dense one: "blocks" spends it on the block linears only (the 49152x576 table
untouched), "head" on the block linears and the tied table together. Perplexity, KL / top-1 agreement with
the dense model on held-out text, then speed at the lowest K (CPU time, one 512-token prompt): the forward with
every position's logits, generate's prefill (the last position's logits only) and greedy decoding with the KV cache.

    python benchmarks/llm_head.py --keeps 0.8 0.6 --calib-seqs 16 --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm import smollm2  # noqa: E402

from rankwise.allocate import (
    LayerCost,  # noqa: E402
    allocate_ranks,  # noqa: E402
)
from rankwise.blocks import InMemorySource  # noqa: E402
from rankwise.compress import CompressConfig, emit_blocks, plan_compression  # noqa: E402
from rankwise.data import builtin_text, token_sequences  # noqa: E402
from rankwise.eval import next_token_agreement  # noqa: E402
from rankwise.head import find_head, swap_head  # noqa: E402
from rankwise.pipeline import swap_in  # noqa: E402
from rankwise.targets import block_stack, find_targets  # noqa: E402
from rankwise.workdir import WorkDir  # noqa: E402


def scaled(cost: LayerCost, weight: float) -> LayerCost:
    """The head's curve times ``weight`` (what ``CompressConfig.head_weight`` does)."""
    return LayerCost(cost.shape, cost.bias, cost.gains * weight)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build(dense, pipe, curves, keep_targets: float, with_head: bool, config):
    """A copy of ``dense`` compressed at ``keep_targets`` of the chosen curves' dense parameters."""
    chosen = [c for c in curves if with_head or c.block >= 0]
    ranks = allocate_ranks(config.allocate, [c.cost for c in chosen], keep_targets, min_rank=config.min_rank)
    rank_of = {c.name: None for c in curves} | {c.name: r for c, r in zip(chosen, ranks)}
    model = copy.deepcopy(dense)
    emit_blocks(pipe, rank_of, lambda i, f: swap_in(model, f, lambda n: torch.float32), progress=False)
    name, _, embedding = find_head(model)
    r = rank_of[name]
    swap_head(model, name, embedding, None if r is None else pipe.factors("head")[name].truncate(r))
    return model, r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy steps timed after the prompt")
    p.add_argument("--head-weights", type=float, nargs="+", default=[1.0], help="CompressConfig.head_weight values")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, tok = smollm2()
    dense.requires_grad_(False)
    calib = token_sequences(tok, builtin_text("calib"), args.seq_len, args.calib_seqs)
    evals = token_sequences(
        tok, builtin_text("eval"), args.seq_len, max(1, args.eval_tokens // args.seq_len), what="evaluation"
    )
    config = CompressConfig(calib_seqs=calib.shape[0], seq_len=calib.shape[1], include_head=True)
    total = count(dense)
    targets = find_targets(dense)
    blocks = sum(c.weight.numel() for c in targets.values())
    head = find_head(dense)[1].weight.numel()
    print(f"SmolLM2: {total:,} parameters, block linears {blocks:,}, tied table {head:,}; threads {args.threads}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = InMemorySource(dense, block_stack(dense)[0], torch.device("cpu"))
        pipe, curves, _ = plan_compression(source, targets, config, calib, WorkDir(Path(tmp) / "w", {}), progress=False)
        print(f"calibration + factorization (with the head): {time.perf_counter() - t0:.1f}s", flush=True)
        print("| whole-model keep | variant | params | head rank | perplexity | KL | top-1 |")
        print("|---|---|---|---|---|---|---|")
        models = {}
        for keep in args.keeps:
            outside = total - blocks - head  # norms
            variants = [("blocks", False, 1.0)] + [(f"head x{w:g}", True, w) for w in args.head_weights]
            for variant, with_head, weight in variants:
                budget = keep * total - outside - (0 if with_head else head)
                weighted = [c if c.block >= 0 else dataclasses.replace(c, cost=scaled(c.cost, weight)) for c in curves]
                share = budget / (blocks + (head if with_head else 0))
                model, r = build(dense, pipe, weighted, share, with_head, config)
                a = next_token_agreement(model, dense, evals, progress=False)
                print(
                    f"| {keep} | {variant} | {count(model) / total:.4f} | {r if r is not None else 'dense'} | "
                    f"{a.perplexity:.2f} | {a.kl:.4f} | {a.top1:.4f} |  (dense ppl {a.ref_perplexity:.2f})",
                    flush=True,
                )
                models[keep, variant] = model
    low = min(args.keeps)
    variants = ("blocks", f"head x{args.head_weights[0]:g}")
    ratios = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved: the machine is shared, compare within a round
        tp = {name: speeds(dense if name == "dense" else models[low, name], args) for name in ("dense", *variants)}
        for name in variants:
            ratios[name].append({k: tp[name][k] / tp["dense"][k] for k in SPEEDS})
        rows = (f"{k} " + " ".join(f"{m} {v[m]:.1f}" for m in SPEEDS) for k, v in tp.items())
        print("tok/s (CPU time): " + "; ".join(rows), flush=True)
    for name, rs in ratios.items():
        print(
            f"{name} at whole-model keep {low}, x dense (median of {len(rs)} rounds): "
            + ", ".join(f"{m} {statistics.median(r[m] for r in rs):.2f}x" for m in SPEEDS)
        )


SPEEDS = ("forward", "prefill", "decode")


def speeds(model, args) -> dict[str, float]:
    """Tokens per second of process CPU time (with one thread, what the model itself cost whatever else runs),
    medians of ``args.repeats`` after a warm-up, on ``args.seq_len`` random ids:

    - ``forward``: one forward computing the logits at every position (what perplexity evaluation runs);
    - ``prefill``: the same with ``logits_to_keep=1``, the prompt pass of ``generate`` (transformers asks for the
      last position's logits only, so the LM head costs one row);
    - ``decode``: ``args.decode_tokens`` greedy steps with the KV cache after that prompt (the head runs per token).
    """
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    runs = {m: [] for m in SPEEDS}
    new_name = "cache" in inspect.signature(model.forward).parameters  # transformers 5.2x: past_key_values -> cache
    with torch.no_grad():
        for i in range(args.repeats + 1):
            c = time.process_time()
            model(input_ids=ids)
            forward = time.process_time() - c
            c = time.process_time()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            prefill = time.process_time() - c
            c = time.process_time()
            for _ in range(args.decode_tokens):
                cache = {"cache": out.cache} if new_name else {"past_key_values": out.past_key_values}
                out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **cache)
            decode = time.process_time() - c
            if i:  # the first round warms up
                tokens = (args.seq_len, args.seq_len, args.decode_tokens)
                for m, t, n in zip(SPEEDS, (forward, prefill, decode), tokens):
                    runs[m].append(n / t)
    return {m: statistics.median(v) for m, v in runs.items()}


if __name__ == "__main__":
    main()
