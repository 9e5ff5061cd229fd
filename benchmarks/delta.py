"""Benchmark: `rankwise delta extract` vs `mergekit-extract-lora` on a real SmolLM2-135M fine-tune, same rank.

The fine-tuned model is made here (no second checkpoint ships offline): SmolLM2-135M-Instruct, every
Linear weight of the decoder layers trained with AdamW for a few dozen seeded steps on sequences of
``builtin_text("calib")``, cached under ``~/.cache/rankwise``. Each extractor runs in its own
subprocess (wall time, peak RSS from ``ru_maxrss``); both adapters are then read back with
``rankwise.delta.load_peft`` and judged the same way: relative Frobenius error of the delta over
the decoder Linear layers, and perplexity on ``builtin_text("eval")`` of base + LoRA, against the
base's and the fine-tuned model's.

    python benchmarks/delta.py [--ranks 16 64] [--steps 24] [--eval-seqs 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rankwise.data import builtin_text, token_sequences
from rankwise.delta import apply_delta_, load_peft
from rankwise.io import atomic_output_dir
from rankwise.io.models import cache_dir, converted_gguf, resolve

SEQ_LEN = 128
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "wall = time.perf_counter() - t\n"
    "print(json.dumps({'rc': rc.returncode, 'wall_s': wall, 'err': rc.stderr[-2000:],\n"
    "                  'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
)


def finetuned_dir(base: Path, steps: int, lr: float, batch: int, seed: int) -> Path:
    """A briefly fine-tuned copy of ``base`` (decoder Linear weights, AdamW), made once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / f"smollm2-ft-steps{steps}-lr{lr:g}-b{batch}-seq{SEQ_LEN}-seed{seed}"
    if out.exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for w in trained:
        w.requires_grad_(True)
    seqs = token_sequences(tok, builtin_text("calib"), SEQ_LEN)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        ids = seqs[torch.randint(0, seqs.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"  fine-tune step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    with atomic_output_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def measure(cmd: list[str], threads: int) -> dict:
    """Run ``cmd`` in a subprocess limited to ``threads`` BLAS/OpenMP threads; wall time and peak RSS."""
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    res = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True, env=env)
    stats = json.loads(res.stdout)
    if stats["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed ({stats['rc']}): {stats['err']}")
    return stats


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor) -> float:
    nll = [model(input_ids=s[None], labels=s[None]).loss for s in seqs]
    return math.exp(float(torch.stack(nll).mean()))


def relative_error(delta, true: dict[str, torch.Tensor]) -> float:
    err = tot = 0.0
    for module, D in true.items():
        approx = delta.weight_delta(module) if module in delta.lora else torch.zeros((), dtype=torch.float64)
        err += float(torch.linalg.norm(D.double() - approx) ** 2)
        tot += float(torch.linalg.norm(D.double()) ** 2)
    return math.sqrt(err / tot)


def adapter_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="threads of each extractor's subprocess (the same for both)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    base = converted_gguf(resolve("smollm2"), progress=True)
    ft = finetuned_dir(base, args.steps, args.lr, args.batch, args.seed)
    mergekit = shutil.which("mergekit-extract-lora")
    if mergekit is None:
        sys.exit("mergekit-extract-lora is not installed (pip install mergekit)")

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ft_model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    seqs = token_sequences(tok, builtin_text("eval"), 256, args.eval_seqs, what="evaluation")
    fb, ff = base_model.state_dict(), ft_model.state_dict()
    true = {
        n[: -len(".weight")]: ff[n] - fb[n]
        for n in fb
        if n.endswith(".weight") and ".layers." in n and fb[n].ndim == 2 and not torch.equal(fb[n], ff[n])
    }
    ppl_base, ppl_ft = perplexity(base_model, seqs), perplexity(ft_model, seqs)
    dense = sum(D.numel() for D in true.values())
    print(
        f"pair: {len(true)} changed decoder Linear layers, {dense / 1e6:.1f}M weights; eval {seqs.numel()} tokens; "
        f"ppl base {ppl_base:.3f}, fine-tuned {ppl_ft:.3f}"
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="rankwise-delta-bench-") as tmp:
        tmp = Path(tmp)
        rw = [sys.executable, "-m", "rankwise.cli", "delta", "extract", str(base), str(ft)]
        for r in args.ranks:
            keep = r * sum(sum(D.shape) for D in true.values()) / dense  # rank r's parameter count, allocated freely
            runs = [
                (
                    f"mergekit r={r}",
                    [
                        mergekit,
                        "--model",
                        str(ft),
                        "--base-model",
                        str(base),
                        "--out-path",
                        str(tmp / f"mk{r}"),
                        "--max-rank",
                        str(r),
                        "--quiet",
                    ],
                    tmp / f"mk{r}",
                ),
                (f"rankwise r={r}", [*rw, "--out", str(tmp / f"rw{r}"), "--rank", str(r)], tmp / f"rw{r}"),
                (
                    f"rankwise keep={keep:.4f}",
                    [*rw, "--out", str(tmp / f"rk{r}"), "--keep", f"{keep:.6f}"],
                    tmp / f"rk{r}",
                ),
            ]
            for label, cmd, out in runs:
                stats = measure(cmd, args.threads)
                delta = load_peft(out)
                merged = apply_delta_(copy.deepcopy(base_model), delta)
                ppl = perplexity(merged, seqs)
                del merged
                rows.append(
                    dict(
                        label=label,
                        rank=r,
                        wall=stats["wall_s"],
                        peak=stats["peak_mib"],
                        size=adapter_mib(out),
                        params=sum(A.numel() + B.numel() for A, B in delta.lora.values()),
                        err=relative_error(delta, true),
                        ppl=ppl,
                        recovered=(ppl_base - ppl) / (ppl_base - ppl_ft),
                    )
                )
                print(
                    f"  {label}: {stats['wall_s']:.1f} s, {stats['peak_mib']:.0f} MiB, "
                    f"err {rows[-1]['err']:.4f}, ppl {ppl:.3f}",
                    flush=True,
                )

    print(
        "\n| method | LoRA params | adapter MiB | rel. Frobenius error | ppl (base+LoRA) | "
        "ppl gain recovered | wall s | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['label']} | {row['params'] / 1e6:.2f}M | {row['size']:.0f} | {row['err']:.4f} | "
            f"{row['ppl']:.3f} | {100 * row['recovered']:.1f}% | {row['wall']:.1f} | {row['peak']:.0f} |"
        )
    print(f"\nreference: ppl base {ppl_base:.3f}, fine-tuned {ppl_ft:.3f}\n")
    print(
        "| rank | rankwise/mergekit error | rankwise/mergekit wall | rankwise/mergekit peak RSS | "
        "keep-budget/mergekit error |"
    )
    print("|---|---|---|---|---|")
    for r in args.ranks:
        mk, rw_row, rk = (
            next(x for x in rows if x["rank"] == r and x["label"].startswith(p))
            for p in ("mergekit", "rankwise r", "rankwise keep")
        )
        print(
            f"| {r} | {rw_row['err'] / mk['err']:.4f} | {rw_row['wall'] / mk['wall']:.2f} | "
            f"{rw_row['peak'] / mk['peak']:.2f} | {rk['err'] / mk['err']:.4f} |"
        )


if __name__ == "__main__":
    main()
