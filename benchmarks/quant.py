"""Quantization benchmark: RTN and GPTQ against rankwise's byte-budget allocation (bit widths and Q + LR) and
low-rank + quantized factors, on the block linears of SmolLM2-135M or all-MiniLM-L6-v2, same calibration and
evaluation text.

Every row: bits per weight over all block linears (codes, scales, zero points, factors, biases counted
from the tensors the layers store) and the quality against the dense model: for SmolLM2 perplexity on
held-out text, KL divergence and next-token top-1 agreement; for MiniLM (float32 weights) the mean cosine
similarity of the mean-pooled sentence embeddings to the dense model's on held-out sentences (the measure of
``benchmarks/llm.py``) and the share of sentences whose nearest neighbour among them (cosine) is the one the
dense model finds. Then, per target bpw, the best RTN/GPTQ row at that size (within +0.25 bpw above it, so the
baselines are never given fewer bytes) against rankwise's row at or below it, and the share of the baseline's
gap to dense closed (gap: perplexity minus dense perplexity; for MiniLM 1 - cosine).

    python benchmarks/quant.py                                  # the full setting
    python benchmarks/quant.py --calib-seqs 8 --eval-tokens 2048 --rows gptq-3-128 budget-3.0
    python benchmarks/quant.py --model minilm                   # 32 x 128 calibration tokens, 256 sentences
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rankwise.calibrate import collect_stats
from rankwise.compress import CompressConfig, compress_
from rankwise.data import builtin_text, token_sequences
from rankwise.eval import next_token_agreement, perplexity, sentence_embeddings, split_sentences
from rankwise.io.models import load_model
from rankwise.quant_budget import layer_candidates, quantize_to_budget_
from rankwise.quantize import QuantizeConfig, layer_weight, quantize_
from rankwise.targets import find_targets

# (algorithm, bits, group size, symmetric): 4/3/2 bits at group 128 and 64, and the symmetric widths that land
# nearest 3.0 and 2.5 bits per weight (3-bit group 128: 3.125 plus the short last group; 2-bit group 32: 2.5)
BASELINES = [
    (alg, bits, group, sym)
    for alg in ("gptq", "rtn")
    for bits, group, sym in (
        (3, 128, False),
        (3, 128, True),
        (2, 64, False),
        (2, 32, True),
        (4, 128, False),
        (3, 64, False),
        (2, 128, False),
    )
]
TARGETS = (3.0, 2.5)
LOWRANK_BITS = 4  # low-rank + quantized factors (and dense-kept layers): keep = target bpw / (this + group overhead)


def row_names() -> list[str]:
    """Every row, the ones the targets compare first (a run cut short still has them)."""
    names = [f"{a}-{b}-{g}" + ("-sym" if s else "") for a, b, g, s in BASELINES]
    ours = [f"budget-{t}" for t in TARGETS] + [f"lowrank-q{LOWRANK_BITS}-{t}" for t in TARGETS]
    return names[:2] + ours[:2] + names[2:4] + ours[2:] + names[4:]


def build(name: str, dense, targets: list[str], stats, calib, candidates: dict):
    """A quantized copy of ``dense`` for row ``name`` and its per-layer reports; ``candidates`` caches the
    budget rows' per-layer candidates (built once, for every budget)."""
    model = copy.deepcopy(dense)
    kind, *rest = name.split("-")
    if kind in ("rtn", "gptq"):
        cfg = QuantizeConfig(int(rest[0]), int(rest[1]), symmetric=len(rest) > 2, algorithm=kind)
        return model, quantize_(model, {n: cfg for n in targets}, stats, progress=False)
    if kind == "budget":
        if not candidates:
            candidates.update(layer_candidates(dense, targets, stats, progress=False))
        return model, quantize_to_budget_(
            model, targets, stats, bits_per_weight=float(rest[0]), built=candidates, progress=False
        )
    target = float(rest[1])
    per_weight = LOWRANK_BITS + 24 / 128  # 4-bit codes + float16 scale + uint8 zero per 128 weights
    compress_(model, CompressConfig(keep=target / per_weight), calib, stats=stats, progress=False)
    # every target quantized: factorized layers' factors, and the layers the allocator left dense (their
    # rank would not have saved parameters) as they are, at the same bits
    cfg = QuantizeConfig(LOWRANK_BITS, 128)
    return model, quantize_(model, {n: cfg for n in targets}, stats, progress=False)


@dataclass
class Setting:
    """A model, its calibration tokens and how its quality is measured against the dense model: ``measure(model)``
    gives the gap to dense (0 = dense, lower is better) and the row's quality columns."""

    dense: torch.nn.Module
    calib: torch.Tensor
    what: str
    columns: str
    measure: Callable[[torch.nn.Module], tuple[float, str]]


def smollm2(args) -> Setting:
    """SmolLM2-135M: perplexity, KL and next-token top-1 agreement on ``--eval-tokens`` of the eval split."""
    dense, tok, _ = load_model("smollm2", progress=False)
    seq_len = args.seq_len or 512
    calib = token_sequences(tok, builtin_text("calib"), seq_len, args.calib_seqs)
    ids = token_sequences(tok, builtin_text("eval"), seq_len, args.eval_tokens // seq_len, what="evaluation")
    dense_ppl = perplexity(dense, ids, progress=False)

    def measure(model):
        a = next_token_agreement(model, dense, ids, progress=False)
        return a.perplexity - dense_ppl, f"{a.perplexity:>8.3f} {a.kl:>8.4f} {a.top1:>6.3f}"

    what = f"evaluation {ids.numel()} held-out tokens; dense perplexity {dense_ppl:.3f} (float32: 32 bits per weight)"
    return Setting(dense, calib, what, f"{'ppl':>8} {'KL':>8} {'top1':>6}", measure)


def minilm(args) -> Setting:
    """all-MiniLM-L6-v2: mean embedding cosine to dense and nearest-neighbour agreement on ``--sentences``
    sentences of the eval split."""
    dense, tok, _ = load_model("minilm", progress=False)
    calib = token_sequences(tok, builtin_text("calib"), args.seq_len or 128, args.calib_seqs)
    sentences = split_sentences(builtin_text("eval"))[: args.sentences]
    ref = sentence_embeddings(dense, tok, sentences).double()

    def neighbours(emb):
        sim = F.normalize(emb, dim=-1) @ F.normalize(emb, dim=-1).T
        return sim.fill_diagonal_(-2).argmax(-1)

    ref_nn = neighbours(ref)

    def measure(model):
        emb = sentence_embeddings(model, tok, sentences).double()
        cos = float(F.cosine_similarity(emb, ref, dim=-1).mean())
        agree = float((neighbours(emb) == ref_nn).double().mean())
        return 1 - cos, f"{cos:>8.4f} {agree:>6.3f}"

    what = f"evaluation {len(sentences)} held-out sentences (mean-pooled embeddings)"
    return Setting(dense, calib, what, f"{'cosine':>8} {'nn':>6}", measure)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--fisher-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="calibration (and SmolLM2 evaluation) sequence length (512; MiniLM 128)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="SmolLM2 evaluation tokens")
    p.add_argument("--sentences", type=int, default=256, help="MiniLM evaluation sentences")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", nargs="*", default=row_names(), help=f"rows to run (default all: {' '.join(row_names())})")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    setting = (smollm2 if args.model == "smollm2" else minilm)(args)
    dense, calib = setting.dense, setting.calib
    targets = list(find_targets(dense))
    t0 = time.perf_counter()
    stats = collect_stats(
        dense, {n: dense.get_submodule(n) for n in targets}, calib, fisher_seqs=args.fisher_seqs, progress=False
    )
    print(
        f"{args.model}: {len(targets)} block linears; calibration {calib.shape[0]} x {calib.shape[1]} tokens "
        f"({args.fisher_seqs} sequences with loss gradients) in {time.perf_counter() - t0:.0f}s; {setting.what}"
    )
    weights = sum(layer_weight(dense.get_submodule(n)).numel() for n in targets)
    head = f"{'row':<22} {'bpw':>6} {'MB':>7} {setting.columns} {'time s':>7}"
    print(head + "\n" + "-" * len(head))
    results, candidates = {}, {}
    for name in args.rows:
        t0 = time.perf_counter()
        model, reports = build(name, dense, targets, stats, calib, candidates)
        spent = time.perf_counter() - t0
        nbytes = sum(r.bytes for r in reports) + sum(
            layer_weight(model.get_submodule(n)).numel() * 4 for n in targets if n not in {r.name for r in reports}
        )
        gap, columns = setting.measure(model)
        results[name] = (8 * nbytes / weights, gap)
        print(f"{name:<22} {8 * nbytes / weights:>6.3f} {nbytes / 1e6:>7.2f} {columns} {spent:>7.0f}", flush=True)
        if name.startswith("budget"):
            mix: dict[str, int] = {}
            for r in reports:
                c = r.config
                key = f"{c['bits']}b/g{c['group_size']}" + (f"+r{c['correction_rank']}" if c["correction_rank"] else "")
                key += "+h" if c.get("rotate") else ""
                if "rank" in c:
                    key = f"lowrank+{key} factors"
                mix[key] = mix.get(key, 0) + 1
            print("    layers by choice: " + ", ".join(f"{k} x{v}" for k, v in sorted(mix.items())))
        del model
    for name, ours in results.items():  # every budget row run (the targets', and e.g. budget-3.25 at a baseline's bpw)
        if not name.startswith("budget-"):
            continue
        t = float(name.split("-")[1])
        base = {n: v for n, v in results.items() if n.split("-")[0] in ("rtn", "gptq") and t - 0.5 < v[0] <= t + 0.25}
        if not base:
            continue
        best = min(base, key=lambda n: base[n][1])
        gap = base[best][1]
        closed = (gap - ours[1]) / gap if gap > 0 else float("nan")
        print(
            f"at {t} bpw: best baseline {best} ({base[best][0]:.3f} bpw) gap to dense {gap:.4g}; rankwise budget "
            f"({ours[0]:.3f} bpw) gap {ours[1]:.4g}: {100 * closed:.1f}% of the baseline's gap to dense closed "
            f"(target >= 20%)"
        )


if __name__ == "__main__":
    main()
