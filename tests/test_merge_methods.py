"""Merge methods against hand-computed values and their defining properties; driver validation messages."""

from __future__ import annotations

import math

import pytest
import torch

import rankwise
from rankwise.io import write_checkpoint
from rankwise.merging import METHODS, merge
from rankwise.merging.model_stock import model_stock
from rankwise.merging.tsv import nearest_orthonormal


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_registry_lists_every_method_with_paper_and_options():
    for name in ("dare", "iso_c", "linear", "model_stock", "task_arithmetic", "ties", "tsv"):
        entry = METHODS.get(name)
        assert entry.paper.startswith("https://arxiv.org/abs/")
        assert entry.meta["scope"] == "tensor" and isinstance(entry.meta["options"], dict)
    with pytest.raises(ValueError, match=r"unknown merge method 'soup'; known: .*dare, iso_c, linear, model_stock"):
        merge([{"w": torch.ones(1)}], "soup")


def test_linear_is_the_weighted_sum_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    # small integers and dyadic weights: every sum is exact, so the comparison can be bit-for-bit
    models = [
        {"w": torch.randint(-8, 8, (5, 4), generator=g).float(), "b": torch.randint(-8, 8, (5,), generator=g).float()}
        for _ in range(3)
    ]
    w = [0.5, 0.25, 1.25]
    out = merge(models, "linear", weights=w)
    for k in ("w", "b"):
        assert torch.equal(out[k], (0.5 * models[0][k] + 0.25 * models[1][k] + 1.25 * models[2][k]) / 2.0)
    raw = merge(models, "linear", weights=w, normalize=False)
    assert torch.equal(raw["w"], 0.5 * models[0]["w"] + 0.25 * models[1]["w"] + 1.25 * models[2]["w"])
    # the same from checkpoints on disk, read lazily, and through the callable package
    paths = []
    for i, m in enumerate(models):
        write_checkpoint(tmp_path / f"m{i}", m)
        paths.append(tmp_path / f"m{i}")
    lazy = rankwise.merge(paths, "linear", weights=w)
    assert all(torch.equal(lazy[k], out[k]) for k in out)


def test_task_arithmetic_formula_and_dtype_kept():
    base = {"w": _t([1.0, 2.0], [3.0, 4.0]).bfloat16(), "step": torch.tensor(7)}
    m1 = {"w": _t([2.0, 2.0], [3.0, 6.0]).bfloat16(), "step": torch.tensor(9)}
    m2 = {"w": _t([1.0, 0.0], [4.0, 4.0]).bfloat16(), "step": torch.tensor(9)}
    out = merge([m1, m2], "task_arithmetic", base, weights=[1.0, 0.5], scale=0.5)
    # deltas (1, 0; 0, 2) and (0, -2; 1, 0): base + 0.5 * (d1 + 0.5 d2)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"].float(), _t([1.5, 1.5], [3.25, 5.0]))
    assert torch.equal(out["step"], torch.tensor(7))  # integer buffers come from the base
    assert merge([m1, m2], "task_arithmetic", base, dtype=torch.float32)["w"].dtype == torch.float32


# TIES, by hand (density 0.6 keeps the 3 largest of 5 entries per task vector):
#   d1 = [ 4,   -1,  2, -3, 0.5 ] -> [ 4,   0,  2, -3, 0]
#   d2 = [-2,    3,  1,  5, -0.5] -> [-2,   3,  0,  5, 0]
#   d3 = [ 1.5, -2, -6,  1, 0.25] -> [ 1.5, -2, -6, 0, 0]
_D = [[4.0, -1.0, 2.0, -3.0, 0.5], [-2.0, 3.0, 1.0, 5.0, -0.5], [1.5, -2.0, -6.0, 1.0, 0.25]]


def test_ties_matches_hand_computed_example():
    base = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    models = [{"x": base + torch.tensor(d)} for d in _D]
    # equal weights: summed signs [+3.5, +1, -4, +2, 0 -> +]; agreeing means (4+1.5)/2, 3, -6, 5, none -> 0
    out = merge(models, "ties", {"x": base}, density=0.6)["x"]
    assert torch.equal(out - base, torch.tensor([2.75, 3.0, -6.0, 5.0, 0.0]))
    # weights [1, .5, 1]: weighted sums [4.5, -.5, -4, -.5, 0] -> signs [+, -, -, -, +]
    out = merge(models, "ties", {"x": base}, density=0.6, weights=[1.0, 0.5, 1.0])["x"]
    assert torch.equal(out - base, torch.tensor([2.75, -2.0, -6.0, -3.0, 0.0]))
    out = merge(models, "ties", {"x": base}, density=0.6, weights=[1.0, 0.5, 1.0], normalize=False, scale=2.0)["x"]
    assert torch.equal(out - base, torch.tensor([11.0, -4.0, -12.0, -6.0, 0.0]))


def test_dare_drops_and_rescales_with_a_seed():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(100, 100, generator=g), "b": torch.randn(100, 100, generator=g)}
    ft = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    delta = ft["a"] - base["a"]
    out = merge([ft], "dare", base, density=0.3, seed=5)
    d_out = out["a"] - base["a"]
    kept = d_out != 0
    # every entry is dropped or divided by the density; about 30% are kept (4 sigma of Binomial(1e4, .3))
    assert torch.allclose(d_out[kept], delta[kept] / 0.3, rtol=1e-5, atol=1e-5)
    assert abs(kept.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 1e4)
    # per-tensor masks differ; the same seed reproduces them bit for bit, whatever else is merged
    assert not torch.equal(kept, (out["b"] - base["b"]) != 0)
    again = merge([{"a": ft["a"]}], "dare", {"a": base["a"]}, density=0.3, seed=5)["a"]
    assert torch.equal(again, out["a"])
    assert not torch.equal(merge([ft], "dare", base, density=0.3, seed=6)["a"], out["a"])
    # mergekit-style L1 rescaling keeps the task vector's L1 norm
    l1 = merge([ft], "dare", base, density=0.3, seed=5, rescale="l1")["a"] - base["a"]
    assert math.isclose(l1.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)
    # at density 1 DARE is task arithmetic, and DARE-TIES is TIES
    models = [{"x": torch.tensor(d)} for d in _D]
    zero = {"x": torch.zeros(5)}
    assert torch.equal(merge(models, "dare", zero, density=1.0)["x"], merge(models, "task_arithmetic", zero)["x"])
    # untrimmed sums [3.5, 0 -> +, -3, 3, 0.25]: agreeing means (4+1.5)/2, 3, -6, (5+1)/2, (.5+.25)/2
    assert torch.equal(
        merge(models, "dare", zero, density=1.0, sign_consensus=True, normalize=True)["x"],
        torch.tensor([2.75, 3.0, -6.0, 3.0, 0.375]),
    )


def test_model_stock_matches_the_formula_on_a_constructed_example():
    # unit task vectors with pairwise cos 0.5: t = N cos / (1 + (N - 1) cos) = 1.5 / 2 = 0.75
    s3 = math.sqrt(3.0)
    deltas = torch.tensor(
        [[1.0, 0.0, 0.0], [0.5, s3 / 2, 0.0], [0.5, s3 / 6, math.sqrt(2.0 / 3.0)]], dtype=torch.float64
    )
    assert torch.allclose(
        deltas @ deltas.T, torch.tensor([[1, 0.5, 0.5], [0.5, 1, 0.5], [0.5, 0.5, 1]], dtype=torch.float64)
    )
    base = torch.tensor([[2.0, -1.0, 3.0]], dtype=torch.float64)
    fts = [base + 2.0 * d for d in deltas]  # scaling every task vector leaves the angle unchanged
    out = model_stock([f.clone() for f in fts], base)  # methods overwrite their inputs (the driver's copies)
    expected = 0.75 * torch.stack(fts).mean(dim=0) + 0.25 * base
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    # orthogonal task vectors (cos 0) keep the base; identical ones (cos 1) give their average
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(model_stock([base + e for e in eye], base), base, atol=1e-12, rtol=0)
    same = [base + deltas[0] for _ in range(3)]
    assert torch.allclose(model_stock(same, base), base + deltas[0], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"'model_stock' needs at least 3 fine-tuned models besides the base, got 2"):
        merge([{"w": base}, {"w": base}], "model_stock", {"w": base})


def _orthogonal_tasks(m=12, n=10, tasks=3, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, tasks * r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, tasks * r, generator=g, dtype=torch.float64))
    S = torch.rand(tasks * r, generator=g, dtype=torch.float64) + 0.5
    return [(U[:, i * r : (i + 1) * r] * S[i * r : (i + 1) * r]) @ V[:, i * r : (i + 1) * r].T for i in range(tasks)]


def test_tsv_at_full_task_rank_with_orthogonal_subspaces_is_task_arithmetic():
    base = torch.randn(12, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    models = [{"w": base + d} for d in _orthogonal_tasks()]
    tsv = merge(models, "tsv", {"w": base}, rank=2)["w"]
    ta = merge(models, "task_arithmetic", {"w": base})["w"]
    assert (tsv - ta).norm() / (ta - base).norm() < 1e-12
    # overlapping task subspaces: Procrustes decorrelation changes the sum
    g = torch.Generator().manual_seed(4)
    shared = [
        {
            "w": base
            + torch.randn(12, 1, generator=g, dtype=torch.float64)
            @ torch.randn(1, 10, generator=g, dtype=torch.float64)
        }
        for _ in range(3)
    ]
    assert (
        merge(shared, "tsv", {"w": base}, rank=1)["w"] - merge(shared, "task_arithmetic", {"w": base})["w"]
    ).norm() > 1e-3
    # biases get the mean task vector
    b = merge([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}], "tsv", {"w": torch.zeros(2)})["w"]
    assert torch.equal(b, torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match=r"merging tensor 'w': rank=11 is out of range; accepted: 1 <= rank <= 10"):
        merge(models, "tsv", {"w": base}, rank=11)


def test_procrustes_gives_the_nearest_orthonormal_columns():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(9, 4, generator=g, dtype=torch.float64)
    q = nearest_orthonormal(a)
    assert torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # no other orthonormal frame is closer (a QR basis of the same span, for one)
    qr, _ = torch.linalg.qr(a)
    assert (a - q).norm() <= (a - qr).norm() + 1e-12
    assert torch.allclose(nearest_orthonormal(q), q, atol=1e-12)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrix():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 6, generator=g, dtype=torch.float64)
    deltas = [torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    out = merge([{"w": base + d} for d in deltas], "iso_c", {"w": base}, scale=1.5)["w"]
    s_sum = torch.linalg.svdvals(sum(deltas))
    s_out = torch.linalg.svdvals(out - base)
    assert torch.allclose(s_out, torch.full((6,), 1.5 * s_sum.mean().item(), dtype=torch.float64), atol=1e-10)
    # same singular subspaces as the sum: projecting the sum onto the result's row space loses nothing
    _, _, vh = torch.linalg.svd(out - base, full_matrices=False)
    assert torch.allclose(sum(deltas) @ vh.T @ vh, sum(deltas), atol=1e-10)


def test_driver_names_the_first_mismatch_and_unknown_options():
    base = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    good = {"a.weight": torch.ones(2, 3), "b.weight": torch.ones(4)}
    with pytest.raises(
        ValueError, match=r"tensor 'a.weight' has shape \(2, 3\) in base \(<state dict>\) but \(3, 2\) in models\[1\]"
    ):
        merge([good, {"a.weight": torch.ones(3, 2), "b.weight": torch.ones(5)}], "task_arithmetic", base)
    with pytest.raises(ValueError, match=r"tensor 'b.weight' is in base \(<state dict>\) but not in models\[0\]"):
        merge([{"a.weight": torch.ones(2, 3)}], "task_arithmetic", base)
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) 'density' for merge method 'task_arithmetic'; accepted: normalize, scale, weights",
    ):
        merge([good], "task_arithmetic", base, density=0.5)
    with pytest.raises(ValueError, match=r"merge method 'ties' needs a base model"):
        merge([good], "ties")
    with pytest.raises(
        ValueError, match=r"merging tensor 'a.weight': weights must give one number per fine-tuned model \(1\), got 2"
    ):
        merge([good], "ties", base, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"merging tensor 'a.weight': density must be in \(0, 1\], got 0"):
        merge([good], "ties", base, density=0)
    with pytest.raises(ValueError, match=r"seed must be an int >= 0, got 'x'"):
        merge([good], "dare", base, seed="x")
    with pytest.raises(ValueError, match=r"models must be a list of models .* got str"):
        merge("model_dir", "linear")
    snapshot = {k: v.clone() for k, v in good.items()}
    merge([good, good, good], "model_stock", base)
    assert all(torch.equal(good[k], snapshot[k]) for k in good)  # inputs untouched


def test_modules_merge_into_a_loadable_state_dict_and_stay_unchanged():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)) for _ in range(3)]
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    out = rankwise.merge(nets[1:], "task_arithmetic", nets[0], scale=0.5)
    for k, v in before[0].items():
        if v.is_floating_point():
            expected = v + 0.5 * ((before[1][k] - v) + (before[2][k] - v))
            assert torch.allclose(out[k], expected, rtol=0, atol=1e-6)
        else:  # BatchNorm's num_batches_tracked: copied from the base
            assert torch.equal(out[k], v)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(out)
    assert all(torch.equal(n.state_dict()[k], b[k]) for n, b in zip(nets, before) for k in b)
