"""Benchmark: rankwise.formats vs TensorLy (numpy and pytorch backends) on the same seeded tensors.

Problems (float64, same ranks and iteration counts on every side, TensorLy's stopping rule off):

- Tucker HOOI, 10 sweeps, 200x200x200 at rank 20 (HOSVD init on both sides);
- Tucker-2 (modes 0, 1) of a 256x256x3x3 conv kernel at rank 64, HOOI, 10 sweeps;
- CP-ALS, 50 sweeps, 100x100x100 at rank 16 (SVD init on both sides);
- TT-SVD of a 4^10 tensor at rank 8 and of an 8^6 tensor at rank 24;
- rank-256 SVD of a 4096x2048 matrix with singular values i^-0.5 (exact truncated SVD on both sides;
  the optimal error is known from the spectrum, and rankwise's randomized SVD is timed alongside).

Each call is timed ``--repeats`` times (best time kept, the machine is shared); the relative Frobenius
error ``||X - X̂|| / ||X||`` is computed afterwards from the dense reconstruction in float64. Both sides
get the same thread count: ``torch.set_num_threads`` and, for numpy's BLAS, ``threadpoolctl``.

    python benchmarks/decompositions.py [--threads 1] [--repeats 3] [--only tucker cp ...] [--gemm]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from rankwise.formats import cp_als, randomized_svd, truncated_svd, tucker_hooi
from rankwise.formats._ops import multi_mode_dot


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=_gen(seed)))
    return q


def _plus_noise(x: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    noise = torch.randn(x.shape, dtype=torch.float64, generator=_gen(seed))
    return x / x.norm() + level * noise / noise.norm()


def tucker_input() -> torch.Tensor:
    """Multilinear rank 30 with geometrically decaying core plus 10% noise, 200x200x200."""
    decay = 0.9 ** torch.arange(30, dtype=torch.float64)
    core = (
        torch.randn(30, 30, 30, dtype=torch.float64, generator=_gen(1))
        * decay[:, None, None]
        * decay[None, :, None]
        * decay
    )
    x = multi_mode_dot(core, [_orthonormal(200, 30, s) for s in (2, 3, 4)], [0, 1, 2])
    return _plus_noise(x, 0.1, 5)


def conv_input() -> torch.Tensor:
    """A 256x256x3x3 kernel whose channel spectra decay like i^-0.5 (as trained conv kernels do)."""
    decay = torch.arange(1, 257, dtype=torch.float64) ** -0.5
    g = torch.randn(256, 256, 3, 3, dtype=torch.float64, generator=_gen(6))
    return multi_mode_dot(g, [_orthonormal(256, 256, 7) * decay, _orthonormal(256, 256, 8) * decay], [0, 1])


def cp_input() -> torch.Tensor:
    """A rank-16 CP tensor with random Gaussian factors plus 10% noise, 100x100x100."""
    g = _gen(9)
    a, b, c = (torch.randn(100, 16, dtype=torch.float64, generator=g) for _ in range(3))
    return _plus_noise(torch.einsum("ir,jr,kr->ijk", a, b, c), 0.1, 10)


def tt_input(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    """A random TT tensor with bond rank ``rank`` (clipped by the shape) plus 10% noise."""
    g = _gen(seed)
    x = torch.ones(1, 1, dtype=torch.float64)
    for k, n in enumerate(shape):
        r_out = 1 if k == len(shape) - 1 else min(rank, math.prod(shape[: k + 1]), math.prod(shape[k + 1 :]))
        core = torch.randn(x.shape[-1], n, r_out, dtype=torch.float64, generator=g)
        x = (x @ core.reshape(x.shape[-1], -1)).reshape(-1, r_out)
    return _plus_noise(x.reshape(shape), 0.1, seed + 1)


def svd_input() -> torch.Tensor:
    """4096x2048 with singular values i^-0.5, i = 1..2048 (slowly decaying)."""
    s = torch.arange(1, 2049, dtype=torch.float64) ** -0.5
    return (_orthonormal(4096, 2048, 11) * s) @ _orthonormal(2048, 2048, 12).T


def _best_times(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Best wall time of each call over ``repeats`` rounds, the calls interleaved within each round so
    that a load spike on the shared machine hits every implementation alike."""
    best: dict[str, tuple[float, object]] = {k: (math.inf, None) for k in calls}
    for _ in range(repeats):
        for label, fn in calls.items():
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            best[label] = (min(best[label][0], seconds), out)
    return best


def _rel_error(approx, x: torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(approx) if not isinstance(approx, torch.Tensor) else approx).to(torch.float64)
    return float((a - x).norm() / x.norm())


def _tensorly_runs(x: torch.Tensor, call: Callable[[object], object]) -> dict[str, Callable[[], object]]:
    """``call(tensor)`` under TensorLy's numpy and pytorch backends, returning its dense reconstruction."""
    import tensorly as tl

    def run(backend: str, data) -> Callable[[], object]:
        def go():
            tl.set_backend(backend)
            return call(data)

        return go

    return {"tensorly numpy": run("numpy", x.numpy()), "tensorly pytorch": run("pytorch", x.clone())}


def problems() -> dict[str, tuple[Callable[[], torch.Tensor], Callable, Callable]]:
    """name -> (input builder, rankwise call returning a dense tensor, TensorLy call returning a dense tensor)."""
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker, tensor_train, tucker
    from tensorly.tenalg import multi_mode_dot as tl_multi_mode_dot
    from tensorly.tenalg import svd_interface

    def tl_tucker(t):
        core, factors = tucker(t, rank=[20, 20, 20], n_iter_max=10, tol=0, init="svd")
        return tl.tucker_to_tensor((core, factors))

    def tl_tucker2(t):
        (core, factors), _ = partial_tucker(t, rank=[64, 64], modes=[0, 1], n_iter_max=10, tol=0, init="svd")
        return tl_multi_mode_dot(core, factors, modes=[0, 1])

    def tl_cp(t):
        return tl.cp_to_tensor(parafac(t, 16, n_iter_max=50, tol=0, init="svd"))

    def tl_tt(rank):
        def call(t):
            return tl.tt_to_tensor(tensor_train(t, rank=[1] + [rank] * (t.ndim - 1) + [1]))

        return call

    def tl_svd(t):
        u, s, vh = svd_interface(t, n_eigenvecs=256, method="truncated_svd")
        return (u * s) @ vh

    table = {
        "Tucker HOOI 200^3, rank 20, 10 it": (
            tucker_input,
            lambda x: tucker_hooi(x, 20, n_iter_max=10, tol=0).to_dense(),
            tl_tucker,
        ),
        "Tucker-2 256x256x3x3, rank 64, 10 it": (
            conv_input,
            lambda x: tucker_hooi(x, 64, modes=(0, 1), n_iter_max=10, tol=0).to_dense(),
            tl_tucker2,
        ),
        "CP-ALS 100^3, rank 16, 50 it": (cp_input, lambda x: cp_als(x, 16, n_iter_max=50, tol=0).to_dense(), tl_cp),
        "SVD 4096x2048, rank 256": (svd_input, lambda x: truncated_svd(x, 256).to_dense(), tl_svd),
    }
    try:
        from rankwise.formats.tt import tt_svd
    except ImportError:
        print("note: rankwise.formats.tt.tt_svd is not available; the TT problems are skipped")
    else:
        table["TT-SVD 4^10, rank 8"] = (
            lambda: tt_input((4,) * 10, 12, 13),
            lambda x: tt_svd(x, rank=8, eps=None).to_dense(),
            tl_tt(8),
        )
        table["TT-SVD 8^6, rank 24"] = (
            lambda: tt_input((8,) * 6, 32, 15),
            lambda x: tt_svd(x, rank=24, eps=None).to_dense(),
            tl_tt(24),
        )
    return table


def gemm_table(repeats: int) -> None:
    """torch's matmul (MKL) against the CPU path of ``rankwise.formats._ops`` (numpy's OpenBLAS) on the
    products the decompositions run: the narrow ALS contractions and the Gram matrices (numpy calls syrk
    for ``x @ x.T``)."""
    from rankwise.formats._ops import gram, matmul

    print("\n| product (float64) | torch ms | rankwise._ops ms | ratio |\n|---|---:|---:|---:|")
    g = _gen(20)
    cases = {
        "(16 x 100) @ (100 x 10000), CP contraction": (
            torch.randn(100, 16, dtype=torch.float64, generator=g).T,
            torch.randn(100, 10000, dtype=torch.float64, generator=g),
        ),
        "(64 x 256) @ (256 x 2304), Tucker-2 contraction": (
            torch.randn(64, 256, dtype=torch.float64, generator=g),
            torch.randn(256, 2304, dtype=torch.float64, generator=g),
        ),
        "(4096 x 2048) @ (2048 x 256)": (
            torch.randn(4096, 2048, dtype=torch.float64, generator=g),
            torch.randn(2048, 256, dtype=torch.float64, generator=g),
        ),
    }
    for label, (a, b) in cases.items():
        t = _best_times({"torch": lambda a=a, b=b: a @ b, "ours": lambda a=a, b=b: matmul(a, b)}, repeats)
        print(
            f"| {label} | {t['torch'][0] * 1e3:.2f} | {t['ours'][0] * 1e3:.2f} | {t['torch'][0] / t['ours'][0]:.2f}x |"
        )
    a = torch.randn(2048, 4096, dtype=torch.float64, generator=g)
    t = _best_times({"torch": lambda: a @ a.T, "ours": lambda: gram(a)}, repeats)
    print(
        f"| Gram (2048 x 4096) @ its transpose | {t['torch'][0] * 1e3:.2f} | {t['ours'][0] * 1e3:.2f} | "
        f"{t['torch'][0] / t['ours'][0]:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and numpy's BLAS (both sides)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per call; the best is kept")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of problem names to run")
    parser.add_argument("--gemm", action="store_true", help="also time torch's matmul against rankwise's CPU GEMM path")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    print(f"threads={args.threads} repeats={args.repeats} torch={torch.__version__}\n")
    print("| problem | implementation | time (s) | rel. error | speed-up vs faster TensorLy |")
    print("|---|---|---:|---:|---:|")
    for name, (build, ours, theirs) in problems().items():
        if args.only and not any(s.lower() in name.lower() for s in args.only):
            continue
        x = build()
        calls = {"rankwise": lambda x=x, ours=ours: ours(x), **_tensorly_runs(x, theirs)}
        if name.startswith("SVD"):
            calls["rankwise randomized_svd (n_iter=8)"] = lambda x=x: randomized_svd(
                x, 256, n_iter=8, seed=0
            ).to_dense()
        results = _best_times(calls, args.repeats)
        errors = {k: _rel_error(out, x) for k, (_, out) in results.items()}
        anchor = min(results[k][0] for k in results if k.startswith("tensorly"))
        for label, (seconds, _) in results.items():
            ratio = f"**{anchor / seconds:.1f}x**" if label.startswith("rankwise") else f"{anchor / seconds:.2f}x"
            print(f"| {name} | {label} | {seconds:.3f} | {errors[label]:.6f} | {ratio} |")
        best_tl = min(errors[k] for k in errors if k.startswith("tensorly"))
        note = f"rankwise error / best TensorLy error - 1 = {errors['rankwise'] / best_tl - 1:+.1e}"
        if name.startswith("SVD"):
            s = torch.arange(1, 2049, dtype=torch.float64) ** -0.5
            optimal = float(s[256:].norm() / s.norm())  # Eckart–Young: the discarded singular values
            print(f"| {name} | optimal rank-256 error (from the spectrum) | - | {optimal:.6f} | - |")
            note += f"; rankwise / optimal - 1 = {errors['rankwise'] / optimal - 1:+.1e}"
            note += f"; randomized / optimal - 1 = {errors['rankwise randomized_svd (n_iter=8)'] / optimal - 1:+.1e}"
        print(f"|  | *{note}* | | | |")
    if args.gemm:
        gemm_table(args.repeats)


if __name__ == "__main__":
    main()
