"""Wall time and peak memory of `rankwise merge` vs mergekit on the same SmolLM2-sized checkpoints, as ratios.

Builds (once, cached) a random Llama base with SmolLM2-135M's shapes (bf16, tied embeddings) and three
fine-tunes (base + a shared and an independent perturbation), then, for each method, runs rankwise and
mergekit from the same YAML config, each in a fresh subprocess, recording wall time of the merge call
and peak resident memory above the process's memory after imports. Both compute in float32 and write
bf16; the maximum difference between their outputs is printed as a check.

    python benchmarks/merge_vs_mergekit.py [--layers 30] [--methods linear task_arithmetic ties]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise")) / "bench_merge"
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
PARAMS = {"linear": {}, "task_arithmetic": {"lambda": 0.8}, "ties": {"density": 0.5}}


def _llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, f, v = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"], SMOLLM2["vocab_size"]
    kv = h // SMOLLM2["num_attention_heads"] * SMOLLM2["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def build_inputs(layers: int) -> Path:
    """base/ and ft0..ft2/ under the cache: bf16 safetensors + a LlamaForCausalLM config.json."""
    import torch

    from rankwise.io import write_checkpoint

    root = CACHE / f"smollm2_shapes_{layers}l"
    if (root / "ft2" / "config.json").is_file():
        return root
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "max_position_embeddings": 2048,
        "torch_dtype": "bfloat16",
        **SMOLLM2,
    }
    shapes = _llama_shapes(layers)

    def tensors(kind: int):
        for j, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(j)
            w = torch.randn(shape, generator=g) * 0.05 + (1.0 if len(shape) == 1 else 0.0)
            if kind >= 0:  # a fine-tune: shared direction + its own noise
                shared = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + j))
                own = torch.randn(shape, generator=torch.Generator().manual_seed(20_000 + 1000 * kind + j))
                w = w + 0.002 * (shared + own)
            yield name, w.to(torch.bfloat16)

    for kind, name in [(-1, "base"), (0, "ft0"), (1, "ft1"), (2, "ft2")]:
        write_checkpoint(root / name, tensors(kind), config=config, force=True)
    return root


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(tool: str, config: Path, out: Path) -> None:
    """Run one merge in this (fresh) process; print JSON with seconds and peak RSS above the post-import RSS."""
    import torch  # noqa: F401  (imported by both tools; counted in the baseline)
    import yaml

    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
        opts = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)

        def run() -> None:
            run_merge(cfg, str(out), opts)

    else:
        from rankwise.merging import merge_to_dir
        from rankwise.merging.mergekit_yaml import read_mergekit_config

        spec = read_mergekit_config(config)

        def run() -> None:
            merge_to_dir(spec.models, out, spec.method, spec.base, dtype=spec.dtype, force=True, **spec.options)

    base_rss = _rss_mib()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mib": _rss_mib() - base_rss, "import_mib": base_rss}))


def _spawn(tool: str, config: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--config", str(config), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    ap.add_argument("--methods", nargs="+", default=list(PARAMS), choices=list(PARAMS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", choices=("rankwise", "mergekit"), help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.config, args.out)
        return

    import torch
    import yaml

    from rankwise.io import open_checkpoint

    root = build_inputs(args.layers)
    n_params = sum(torch.Size(s).numel() for s in _llama_shapes(args.layers).values())
    print(f"inputs: base + 3 fine-tunes, {n_params / 1e6:.1f}M params each, bf16, {root}")
    print(
        f"{'method':16s} {'rankwise s':>10s} {'mergekit s':>10s} {'time ratio':>10s} "
        f"{'rankwise MiB':>12s} {'mergekit MiB':>12s} {'mem ratio':>9s} {'max |diff|':>10s}"
    )
    for method in args.methods:
        cfg = {
            "merge_method": method,
            "base_model": str(root / "base"),
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "parameters": PARAMS[method],
            "models": [
                {"model": str(root / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate((1.0, 0.7, 0.5))
            ],
        }
        if method == "linear":
            cfg["parameters"] = {"weight": 1.0}
        config = root / f"{method}.yml"
        config.write_text(yaml.safe_dump(cfg))
        runs = {"rankwise": [], "mergekit": []}
        for _ in range(args.repeats):
            for tool in runs:  # alternate, so drifting machine load hits both alike
                runs[tool].append(_spawn(tool, config, root / f"out_{tool}_{method}"))
        best = {tool: min(r, key=lambda x: x["seconds"]) for tool, r in runs.items()}
        peak = {tool: max(x["peak_mib"] for x in r) for tool, r in runs.items()}
        ours, theirs = (
            open_checkpoint(root / f"out_rankwise_{method}"),
            open_checkpoint(root / f"out_mergekit_{method}"),
        )
        diff = max(float((ours.get(k).float() - theirs.get(k).float()).abs().max()) for k in theirs.keys())
        print(
            f"{method:16s} {best['rankwise']['seconds']:10.2f} {best['mergekit']['seconds']:10.2f} "
            f"{best['mergekit']['seconds'] / best['rankwise']['seconds']:9.2f}x "
            f"{peak['rankwise']:12.0f} {peak['mergekit']:12.0f} {peak['mergekit'] / peak['rankwise']:8.2f}x "
            f"{diff:10.2e}"
        )
    print("ratios are mergekit / rankwise (> 1: rankwise faster / smaller); MiB = peak RSS above the post-import RSS")


if __name__ == "__main__":
    main()
