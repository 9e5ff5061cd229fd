"""MAC pricing of the layer options and the allocation under a MAC budget (and a parameter budget besides)."""

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rankwise import compress_
from rankwise.allocate import allocate_options
from rankwise.calibrate_modules import collect_module_stats
from rankwise.compress_modules import ModuleCompressConfig, _conv_candidates
from rankwise.layers.conv import CPConv2d, SVDConv2d, TuckerConv2d
from rankwise.macs import allocate_budgets, conv_macs, matrix_macs


def _hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of every nn.Conv2d / nn.Linear that runs in ``model(x)``, counted from the real outputs."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def test_conv_macs_of_every_format_match_a_hand_count_and_the_layers_that_run():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    # output 3 x 5 (Ho = (5 + 2 - 2 - 1) // 2 + 1, Wo = 6 - 1); CP's vertical conv runs at 3 x 6
    stats = collect_module_stats(conv, {"": conv}, x, fisher=False)[""]
    assert stats.sizes.tolist() == [30.0, 15.0, 18.0]  # per example: H W, Ho Wo, Ho W
    hand = {
        (None, None): 15 * 4 * 3 * 3 * 2,  # 1080
        ("svd", 2): 15 * 2 * (3 * 3 * 2 + 4),  # 660
        ("tucker", (2, 3)): 30 * 3 * 3 + 15 * (3 * 2 * 3 * 2 + 2 * 4),  # 930
        ("cp", 2): 30 * 3 * 2 + 18 * 2 * 3 + 15 * 2 * (2 + 4),  # 468
    }
    layers = {
        (None, None): conv,
        ("svd", 2): SVDConv2d.from_dense(conv, 2),
        ("tucker", (2, 3)): TuckerConv2d.from_dense(conv, (2, 3)),
        ("cp", 2): CPConv2d.from_dense(conv, 2, n_iter_max=2),
    }
    for (fmt, rank), expected in hand.items():
        r0, r1 = rank if isinstance(rank, tuple) else (rank, None)
        assert conv_macs(conv, stats.sizes, fmt, r0, r1) == expected
        assert _hook_macs(layers[fmt, rank], x) == 2 * expected  # two examples
    ranks = torch.tensor([1, 2])
    assert conv_macs(conv, stats.sizes, "svd", ranks).tolist() == [330.0, 660.0]


def test_matrix_macs_and_same_padding_sizes():
    lin = nn.Linear(5, 3)
    stats = collect_module_stats(lin, {"": lin}, torch.randn(4, 7, 5), fisher=False)[""]
    assert stats.sizes.tolist() == [7.0, 7.0, 7.0]
    assert matrix_macs(lin, stats.sizes) == 7 * 15 and matrix_macs(lin, stats.sizes, 2) == 7 * 2 * 8
    emb = nn.Embedding(10, 6)
    stats = collect_module_stats(emb, {"": emb}, torch.randint(0, 10, (3, 4)), fisher=False)[""]
    assert matrix_macs(emb, stats.sizes) == 0.0 and matrix_macs(emb, stats.sizes, 2) == 4 * 2 * 6
    conv = nn.Conv2d(2, 2, 4, padding="same", dilation=2)
    stats = collect_module_stats(conv, {"": conv}, torch.randn(1, 2, 9, 7), fisher=False)[""]
    assert stats.sizes.tolist() == [63.0, 63.0, 63.0]


def _strided_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),  # Tucker's first 1x1 runs at 4x the output positions
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
    ).double()


def _input_of(model: nn.Module, name: str) -> torch.Tensor:
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(IMAGES[:1])
    h.remove()
    return seen[0]


IMAGES = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_options_priced_by_macs_never_cost_the_dense_macs():
    model = _strided_cnn()
    conv = model[2]
    stats = collect_module_stats(model, {"2": conv}, IMAGES, fisher=False)["2"]
    free, _, _ = _conv_candidates(conv, stats, ModuleCompressConfig(format="tucker"))
    priced, _, _ = _conv_candidates(conv, stats, ModuleCompressConfig(format="tucker", keep_macs=0.5))
    dense = free[0].macs
    assert dense == 36 * 32 * 16 * 9 and priced[0].macs == dense
    assert any(o.macs >= dense for o in free[1:])  # near-full Tucker: fewer parameters, more MACs than dense
    assert priced[1:] and all(o.macs < dense and o.params < priced[0].params for o in priced[1:])


@pytest.mark.parametrize("keep,keep_macs", [(1.0, 0.4), (1.0, 0.7), (0.5, 0.5), (0.3, 0.8), (0.8, 0.3)])
def test_compress_under_a_mac_budget_stays_within_both_budgets(keep, keep_macs):
    dense = _strided_cnn()
    model = copy.deepcopy(dense)
    config = ModuleCompressConfig(keep=keep, keep_macs=keep_macs, fisher=False)
    report = compress_(model, config, IMAGES)
    assert [r.name for r in report.layers] == ["0", "2", "4", "6"]
    assert report.macs_after <= keep_macs * report.macs_before
    assert report.params_after <= keep * report.params_before
    assert any(r.format is not None for r in report.layers)
    for r in report.layers:
        if r.format is not None:
            assert r.macs_after < r.macs_before and r.params_after < r.params_before
        # the priced MACs are the MACs the replaced layer runs on a calibration example
        assert _hook_macs(model.get_submodule(r.name), _input_of(dense, r.name)) == r.macs_after


def _brute_force(params, macs, losses, pb, mb):
    best = None
    for c in itertools.product(*(range(len(p)) for p in params)):
        if sum(p[i] for p, i in zip(params, c)) <= pb and sum(m[i] for m, i in zip(macs, c)) <= mb:
            loss = sum(v[i] for v, i in zip(losses, c))
            best = loss if best is None else min(best, loss)
    return best


def test_allocate_budgets_meets_both_and_is_near_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(30):
        params, macs, losses = [], [], []
        for _ in range(4):
            params.append(sorted(torch.randint(1, 50, (4,), generator=g).tolist()))
            macs.append(sorted(torch.randint(1, 50, (4,), generator=g).tolist()))
            losses.append(sorted(torch.rand(4, generator=g).tolist(), reverse=True))
        pb, mb = (float(torch.randint(20, 150, (1,), generator=g)) for _ in range(2))
        if sum(p[0] for p in params) > pb or sum(m[0] for m in macs) > mb:
            continue
        idx = allocate_budgets(params, macs, losses, pb, mb)
        assert sum(p[i] for p, i in zip(params, idx)) <= pb
        assert sum(m[i] for m, i in zip(macs, idx)) <= mb
        got = sum(v[i] for v, i in zip(losses, idx))
        assert got <= _brute_force(params, macs, losses, pb, mb) + max(v[0] - v[-1] for v in losses)
        checked += 1
    assert checked >= 10
    # a MAC budget that does not bind gives the parameter budget's allocation
    params, losses = [[1, 5, 9], [2, 4, 8]], [[3.0, 1.0, 0.0], [2.0, 1.5, 0.0]]
    pairs = [list(zip(p, v)) for p, v in zip(params, losses)]
    assert allocate_budgets(params, params, losses, 10, 1e9) == allocate_options(pairs, 10)


def test_bad_mac_budgets_are_one_line_errors():
    for bad in (0, 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=rf"^keep_macs must be a fraction in \(0, 1\] or None, got {bad!r}$"):
            ModuleCompressConfig(keep_macs=bad)
    with pytest.raises(ValueError, match=r"^keep_macs needs the layers' input sizes from calibration, which "):
        ModuleCompressConfig(keep_macs=0.5, method="svd", format="svd")
    with pytest.raises(
        ValueError,
        match=r"^the budget of 3 MACs is below the 4 that the smallest option of every layer needs; "
        r"accepted: a larger keep_macs$",
    ):
        allocate_budgets([[1, 5], [1, 5]], [[2, 9], [2, 9]], [[1.0, 0.0], [1.0, 0.0]], 10, 3)
    model = _strided_cnn()
    stats = collect_module_stats(model, {"2": model[2]}, IMAGES, fisher=False)
    stats["2"].sizes = None  # as from statistics that did not record the sizes
    with pytest.raises(ValueError, match=r"^keep_macs needs the input size of every target from calibration; "):
        compress_(model, ModuleCompressConfig(keep_macs=0.5, include="^2$", fisher=False), stats=stats)
    assert isinstance(model[2], nn.Conv2d)  # nothing replaced


def test_benchmark_flag_rejects_a_bad_mac_budget_in_one_line():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "cnn_craft.py"), "--keep-macs", "0.5", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "cnn_craft.py: error: --keep-macs: keep_macs must be a fraction in (0, 1] or None, got 0.0\n"
