"""Benchmark: `rankwise sweep MODEL --keep ... --eval` against one `rankwise compress` + `rankwise eval` per keep.

Every command runs in its own subprocess, one after the other (wall time and peak RSS of each), with
the same thread count. The sweep calibrates and factorizes once; the separate runs do it once per keep.
Printed: the sweep's table (keep, parameters, predicted loss increase, perplexity) next to the separate
runs' perplexities, the Spearman correlation of predicted loss and measured perplexity over the sweep,
whether the predicted loss is monotone in the budget, and the wall times with their ratio.

    python benchmarks/sweep.py [--model smollm2] [--keeps 0.9 0.8 0.7 0.6 0.5] [--separate 0.7] [--threads 1]
                               [--report DIR] [--json out.json]

``--separate`` runs compress + eval for those keeps only (default: every keep); ``--report DIR`` keeps the
sweep's directory there, with its HTML report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from rankwise.sweep import spearman

MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)\n"
    "wall = time.perf_counter() - t\n"
    "print(json.dumps({'rc': rc.returncode, 'wall_s': wall, 'out': rc.stdout[-4000:], 'err': rc.stderr[-2000:],\n"
    "                  'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
)


def measure(args: list[str], threads: int) -> dict:
    """Run ``rankwise ARGS`` in a subprocess limited to ``threads`` threads; wall time, peak RSS, stdout."""
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    cmd = [sys.executable, "-m", "rankwise.cli", *args]
    res = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True, env=env)
    stats = json.loads(res.stdout)
    if stats["rc"] != 0:
        raise RuntimeError(f"rankwise {' '.join(args)} failed ({stats['rc']}): {stats['err']}")
    print(f"  rankwise {' '.join(args)}: {stats['wall_s']:.1f} s, peak {stats['peak_mib']:.0f} MiB", flush=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--separate", type=float, nargs="+", help="keeps run as compress + eval (default: all)")
    ap.add_argument("--report", type=Path, help="keep the sweep directory here, with --report")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    keeps = [str(k) for k in args.keeps]
    with tempfile.TemporaryDirectory(prefix="rankwise-sweep-bench-") as tmp:
        tmp = Path(tmp)
        print("sweep:", flush=True)
        where = args.report or tmp / "sweep"
        sweep = measure(
            ["sweep", args.model, "--keep", *keeps, "--eval", "--out", str(where)]
            + (["--report"] if args.report else []),
            args.threads,
        )
        doc = json.loads((where / "sweep.json").read_text())
        phases = next(iter(doc["reports"].values()))["timings"]
        evals = sum(r["timings"].get("evaluation", 0.0) for r in doc["reports"].values())
        print(
            "  sweep phases: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if k != "evaluation")
            + (f", evaluation of every keep {evals:.1f} s" if evals else ""),
            flush=True,
        )
        print("separate compress + eval:", flush=True)
        separate = {}
        for k in [str(k) for k in args.separate] if args.separate else keeps:
            out = str(tmp / f"keep-{k}")
            c = measure(["compress", args.model, "--keep", k, "--out", out], args.threads)
            print("  " + c["out"].strip().splitlines()[-2], flush=True)  # the compress timings line
            e = measure(["eval", out], args.threads)
            ppl = float(re.search(r"perplexity ([0-9.]+)", e["out"]).group(1))
            separate[k] = {
                "compress_s": c["wall_s"],
                "eval_s": e["wall_s"],
                "peak_mib": c["peak_mib"],
                "perplexity": ppl,
                "timings": c["out"].strip().splitlines()[-2],
            }
    rows = doc["rows"]
    n_eval = len(rows)
    pred, ppl = [r["predicted_loss"] for r in rows], [r["quality"] for r in rows]
    monotone = all(a["predicted_loss"] <= b["predicted_loss"] for a, b in zip(rows, rows[1:]))  # keeps decrease
    total_sep = sum(s["compress_s"] + s["eval_s"] for s in separate.values())
    one = [s["compress_s"] + s["eval_s"] for s in separate.values()]
    mean_c = sum(s["compress_s"] for s in separate.values()) / len(separate)
    mean_e = sum(s["eval_s"] for s in separate.values()) / len(separate)
    print("\n| keep | kept params | predicted loss increase | perplexity (sweep) | perplexity (compress + eval) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        s = separate.get(str(r["keep"]), {"perplexity": float("nan")})
        print(
            f"| {r['keep']} | {r['params_after']:,} | {r['predicted_loss']:.4g} | {r['quality']:.3f} "
            f"| {s['perplexity']:.3f} |"
        )
    print(
        f"\nSpearman(predicted loss, sweep perplexity) = {spearman(pred, ppl):.3f}; "
        f"predicted loss monotone in the budget: {monotone}"
    )
    print(
        f"sweep wall {sweep['wall_s']:.1f} s (peak {sweep['peak_mib']:.0f} MiB); {len(one)} compress + eval "
        f"{total_sep:.1f} s (each {', '.join(f'{t:.0f}' for t in one)} s)"
    )
    print(
        f"sweep / (mean compress {mean_c:.0f} s + {n_eval} x mean eval {mean_e:.0f} s) = "
        f"{sweep['wall_s'] / (mean_c + n_eval * mean_e):.2f}; {n_eval} separate runs would take "
        f"{n_eval * (mean_c + mean_e) / sweep['wall_s']:.2f}x the sweep"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "sweep": {k: sweep[k] for k in ("wall_s", "peak_mib", "out")},
                    "rows": rows,
                    "separate": separate,
                    "monotone": monotone,
                    "spearman": spearman(pred, ppl),
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
