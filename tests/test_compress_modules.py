"""compress_ with a ModuleCompressConfig on a small CNN: predicted losses exact where the metric is, one budget,
clear errors."""

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from rankwise import CompressConfig, compress_
from rankwise.allocate import allocate_options
from rankwise.compress_modules import ModuleCompressConfig, compress_module_tree_, find_module_targets


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(True),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(True),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(True),
        nn.Conv2d(16, 24, 3, stride=2, padding_mode="reflect", padding=1),
        nn.Flatten(),
        nn.Linear(24 * 4 * 4, 10),
    ).double()


IMAGES = torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _layer_inputs(model, names):
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(IMAGES)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("fmt", ["svd", "tucker"])
def test_predicted_loss_is_the_output_error_on_the_calibration_inputs(fmt):
    # without Fisher weights the metric is the per-example squared output error of each layer on its own inputs:
    # exact for the SVD of the reshaped kernel (full patch whitening) and for Tucker-2 of a 1x1 kernel
    dense = _cnn()
    model = copy.deepcopy(dense)
    include = r"^5$" if fmt == "tucker" else None  # Tucker's prediction is exact for the 1x1 conv only
    config = ModuleCompressConfig(keep=0.5, format=fmt, fisher=False, damping=0.0, kinds=("conv2d",), include=include)
    report = compress_(model, config, IMAGES)
    inputs = _layer_inputs(dense, [r.name for r in report.layers])
    checked = 0
    for r in report.layers:
        if r.format is None or (fmt == "tucker" and dense.get_submodule(r.name).kernel_size != (1, 1)):
            continue
        x = inputs[r.name]
        with torch.no_grad():
            measured = float((model.get_submodule(r.name)(x) - dense.get_submodule(r.name)(x)).norm() ** 2)
        if fmt == "svd":
            assert measured / len(x) == pytest.approx(r.loss, rel=1e-7)
        else:  # the prediction is the truncated HOSVD's; the layer is its HOOI refinement, never worse
            assert measured / len(x) <= r.loss * (1 + 1e-9)
            assert measured / len(x) >= 0.5 * r.loss
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("fmt", ["auto", "svd", "tucker", "cp"])
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_one_budget_over_all_targets(fmt, keep):
    model = _cnn()
    config = ModuleCompressConfig(keep=keep, format=fmt, kinds=("conv2d", "linear"), cp_iters=5)
    report = compress_(model, config, IMAGES)
    assert [r.name for r in report.layers] == ["2", "5", "7", "9"]  # the 1-channel first conv stays out
    dense = _cnn()
    assert report.params_before == sum(
        p.numel() for n in ("2", "5", "7", "9") for p in dense.get_submodule(n).parameters()
    )
    assert report.params_after <= keep * report.params_before
    assert report.ranks == {r.name: r.rank for r in report.layers if r.format is not None}
    for r in report.layers:
        layer = model.get_submodule(r.name)
        assert r.params_after == sum(p.numel() for p in layer.parameters())
        if r.format is not None and r.kind == "conv2d":
            allowed = {"svd", "tucker"} if fmt == "auto" else {fmt}
            assert r.format in allowed and type(layer).__name__.lower().startswith(r.format)
    assert torch.isfinite(model(IMAGES)).all()


def test_keep_one_leaves_the_model_dense_and_data_free_needs_no_inputs():
    model = _cnn()
    report = compress_(model, ModuleCompressConfig(keep=1.0, kinds=("conv2d", "linear")), IMAGES)
    assert all(r.format is None for r in report.layers) and report.ranks == {}
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten) for m in model)
    report = compress_(model, ModuleCompressConfig(keep=0.5, method="svd", format="svd"))
    assert report.params_after <= 0.5 * report.params_before
    assert report.macs_before is None  # data-free: no input sizes


def test_embedding_targets_weight_rows_by_token_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8)).double()
    # every token appears, frequent ones far more often (Zipf-like): rows are weighted by their counts
    ids = torch.cat([torch.arange(50), torch.randint(0, 5, (250,), generator=torch.Generator().manual_seed(3))])
    ids = ids.reshape(30, 10)
    dense = copy.deepcopy(model)
    report = compress_(model, ModuleCompressConfig(keep=0.5, kinds=("embedding",), fisher=False), ids)
    assert report.layers[0].format == "svd" and report.layers[0].rank == 6  # 6 * (50 + 16) <= 400 < 7 * 66
    counts = torch.bincount(ids.reshape(-1), minlength=50).double() / 30  # per example, as the metric counts
    row_err = ((model[0].dense_weight() - dense[0].weight.detach()) ** 2).sum(1)
    assert float((counts * row_err).sum()) == pytest.approx(report.layers[0].loss, rel=1e-9)
    from rankwise.layers.embedding import LowRankEmbedding

    plain = ((LowRankEmbedding.from_dense(dense[0], 6).dense_weight() - dense[0].weight.detach()) ** 2).sum(1)
    assert float((counts * row_err).sum()) < float((counts * plain).sum())


def test_compress_with_a_module_config_is_the_module_walk_bit_for_bit():
    expected, model = _cnn(), _cnn()
    expected_report = compress_module_tree_(expected, ModuleCompressConfig(keep=0.3), IMAGES, progress=False)
    report = compress_(model, ModuleCompressConfig(keep=0.3), calib=IMAGES)
    assert report == expected_report
    assert [(r.name, r.format, r.rank) for r in report.layers] == [
        ("2", "svd", 8),
        ("5", None, None),
        ("7", "tucker", (10, 2)),
    ]
    assert [type(m) for m in model] == [type(m) for m in expected]
    state, expected_state = model.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[k], expected_state[k]) for k in state)


def test_module_report_totals_summary_and_json():
    report = compress_(_cnn(), ModuleCompressConfig(keep=0.3), calib=IMAGES)
    lines = report.summary().splitlines()
    assert lines[0].split() == ["layer", "kind", "format", "rank", "kept", "macs"]
    assert [line.split()[:4] for line in lines[2:5]] == [
        ["2", "conv2d", "svd", "8"],
        ["5", "conv2d", "dense", "-"],
        ["7", "conv2d", "tucker", "10x2"],
    ]
    kept = report.params_after / report.params_before
    macs = report.macs_after / report.macs_before
    assert lines[-1] == (
        f"params {report.params_before:,} -> {report.params_after:,} (kept {kept:.3f}, target 0.3); "
        f"macs kept {macs:.3f}; format=auto method=whiten sequential=False"
    )
    assert report.macs_after == sum(r.macs_after for r in report.layers) < report.macs_before
    assert report.predicted_loss == sum(r.loss for r in report.layers) > 0
    d = json.loads(report.to_json())
    assert d["layers"][2]["rank"] == [10, 2] and d["layers"][1]["format"] is None
    assert (d["params_before"], d["params_after"], d["config"]["keep"]) == (
        report.params_before,
        report.params_after,
        0.3,
    )


def test_compress_with_a_data_free_module_config_keeps_the_truncated_svd_of_each_kernel():
    dense, model = _cnn(), _cnn()
    report = compress_(model, ModuleCompressConfig(keep=0.5, method="svd", format="svd", kinds=("conv2d", "linear")))
    assert [(r.name, r.format, r.rank) for r in report.layers] == [
        ("2", None, None),
        ("5", None, None),
        ("7", "svd", 14),
        ("9", "svd", 1),
    ]
    for r in report.layers[2:]:
        W = dense.get_submodule(r.name).weight.detach()
        U, S, Vh = torch.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)
        k = r.rank
        expected = (U[:, :k] * S[:k]) @ Vh[:k]
        got = model.get_submodule(r.name).to_dense().weight.detach().reshape(W.shape[0], -1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_compress_names_the_accepted_configs_and_points_a_plain_module_at_module_compress_config():
    model = _cnn()
    with pytest.raises(
        TypeError, match=r"^config must be a rankwise\.CompressConfig or rankwise\.ModuleCompressConfig, got dict$"
    ):
        compress_(model, {"keep": 0.3}, IMAGES)
    any_module = r"; for the Conv2d / Linear / Embedding layers of any nn\.Module use rankwise\.ModuleCompressConfig$"
    with pytest.raises(
        ValueError,
        match=r"^Sequential has no block stack \(an nn\.ModuleList of identical blocks\) to compress "
        r"block by block" + any_module,
    ):
        compress_(model, CompressConfig(keep=0.3), IMAGES)

    class Stack(nn.Module):  # a block stack, but a forward that takes no token ids
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    with pytest.raises(
        ValueError, match=r"^Stack\.forward takes no input_ids \(CompressConfig calibrates on token ids\)" + any_module
    ):
        compress_(Stack(), CompressConfig(keep=0.3), torch.randn(4, 8))
    dense = _cnn()  # nothing replaced or changed
    assert [type(m) for m in model] == [type(m) for m in dense]
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in model.state_dict().items())


def test_bad_inputs_name_the_failing_layer_and_the_accepted_values():
    model = _cnn()
    with pytest.raises(
        ValueError,
        match=r"^calibration batch 0 could not run through the model: layer '0' \(Conv2d\) "
        r"failed: .*expected input\[32, 3, 16, 16\] to have 1 channels",
    ):
        compress_(model, ModuleCompressConfig(), torch.randn(48, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^inputs are required for method='whiten'"):
        compress_(model, ModuleCompressConfig())
    with pytest.raises(ValueError, match=r"^format must be one of auto, svd, tucker, cp, got 'tt'$"):
        ModuleCompressConfig(format="tt")
    with pytest.raises(ValueError, match=r"^damping must be a relative tolerance in \[0, 1\), got 1.0$"):
        ModuleCompressConfig(damping=1.0)
    with pytest.raises(ValueError, match=r"^no target layer of kinds embedding in this Sequential"):
        find_module_targets(model, ModuleCompressConfig(kinds=("embedding",)))
    assert isinstance(model[2], nn.Conv2d) and model[1].inplace  # nothing replaced, in-place ReLUs restored


def test_allocate_options_matches_brute_force_and_rejects_too_small_budgets():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        options = []
        for _ in range(4):
            params = sorted(torch.randint(1, 50, (4,), generator=g).tolist())
            losses = sorted(torch.rand(4, generator=g).tolist(), reverse=True)
            options.append(list(zip(params, losses)))
        budget = float(torch.randint(10, 150, (1,), generator=g))
        if sum(o[0][0] for o in options) > budget:
            continue
        idx = allocate_options(options, budget)
        assert sum(o[i][0] for o, i in zip(options, idx)) <= budget
        best = min(
            sum(o[i][1] for o, i in zip(options, c))
            for c in itertools.product(range(4), repeat=4)
            if sum(o[i][0] for o, i in zip(options, c)) <= budget
        )
        got = sum(o[i][1] for o, i in zip(options, idx))
        assert got <= best + max(o[0][1] - o[-1][1] for o in options)  # within one layer's range of the optimum
    with pytest.raises(ValueError, match=r"^the budget of 5 parameters is below the 8 that the smallest"):
        allocate_options([[(4, 1.0), (9, 0.0)], [(4, 1.0)]], 5)


def test_sequential_refit_matches_the_dense_layers_outputs_from_the_compressed_models_inputs():
    # format svd without Fisher weights, no ridge: the refitted layer 5 (a 1x1 conv: its patches are the pixels)
    # minimises ||W X - W' X'||_F over rank r, X the dense model's inputs and X' its inputs once layer 2 is
    # compressed (asymmetric reconstruction). Brute force: with Q a basis of the range of X', the minimum is the
    # tail of the singular values of Q^T Y (Y = X W^T, the dense outputs) plus ||Y - Q Q^T Y||^2 (out of reach)
    import torch.nn.functional as F

    dense = _cnn()
    config = ModuleCompressConfig(keep=0.4, format="svd", fisher=False, damping=0.0, include=r"^(2|5)$")
    plain, seq = copy.deepcopy(dense), copy.deepcopy(dense)
    report_plain = compress_(plain, config, IMAGES)
    report = compress_(seq, ModuleCompressConfig(**{**config.__dict__, "sequential": True}), IMAGES)
    assert [(r.format, r.rank) for r in report.layers] == [(r.format, r.rank) for r in report_plain.layers]
    assert [r.format for r in report.layers] == ["svd", "svd"]
    assert torch.equal(
        seq[2].to_dense().weight, plain[2].to_dense().weight
    )  # the first target's inputs are the dense ones
    x, x_now = _layer_inputs(dense, ["5"])["5"], _layer_inputs(seq, ["5"])["5"]
    assert float((x_now - x).norm() / x.norm()) > 1e-2  # layer 2's error reaches layer 5
    X, X_now = (F.unfold(t, 1).transpose(1, 2).reshape(-1, 16) for t in (x, x_now))
    Y = X @ dense[5].weight.detach().reshape(16, -1).T
    U, S, _ = torch.linalg.svd(X_now, full_matrices=False)
    # an orthonormal basis of X_now's range (layer 2's low rank leaves it singular), cut where the refit's
    # pseudo-inverse cuts: eigenvalues of X_now^T X_now below 1e-12 of the largest
    Q = U[:, S > 1e-6 * S[0]]
    best = float((torch.linalg.svdvals(Q.T @ Y)[report.layers[1].rank :] ** 2).sum() + (Y - Q @ (Q.T @ Y)).norm() ** 2)
    with torch.no_grad():
        err_seq = float((seq[5](x_now) - dense[5](x)).norm() ** 2)
        err_plain = float((plain[5](x_now) - dense[5](x)).norm() ** 2)
    assert err_seq == pytest.approx(best, rel=1e-7)
    assert err_plain > 1.05 * err_seq
    again = copy.deepcopy(dense)  # deterministic although X_now is singular (no arbitrary null-space component)
    compress_(again, ModuleCompressConfig(**{**config.__dict__, "sequential": True}), IMAGES)
    assert torch.equal(again[5].to_dense().weight, seq[5].to_dense().weight)
    with pytest.raises(ValueError, match=r"^sequential=True refits on the compressed model's inputs and needs inputs"):
        compress_(copy.deepcopy(dense), ModuleCompressConfig(sequential=True), stats={})
    with pytest.raises(ValueError, match=r"^sequential refits on input statistics, which method='svd'"):
        ModuleCompressConfig(sequential=True, method="svd")
    with pytest.raises(ValueError, match=r"^sequential must be True or False, got 1$"):
        ModuleCompressConfig(sequential=1)


def test_fisher_channels_false_scales_each_layer_by_its_mean_gradient_moment_only():
    # the factors then fit the unweighted whitened kernel, and the predicted loss is the layer's squared output
    # error on its calibration inputs times the mean squared output gradient of the layer
    from rankwise.calibrate_modules import collect_module_stats

    dense = _cnn()
    config = ModuleCompressConfig(keep=0.3, format="svd", damping=0.0, fisher_channels=False)
    stats = collect_module_stats(dense, find_module_targets(dense, config), IMAGES)
    model, weighted = copy.deepcopy(dense), copy.deepcopy(dense)
    report = compress_(model, config, stats=stats)
    compress_(weighted, ModuleCompressConfig(**{**config.__dict__, "fisher_channels": True}), stats=stats)
    inputs = _layer_inputs(dense, [r.name for r in report.layers])
    checked = 0
    for r in report.layers:
        if r.format is None:
            continue
        x, name = inputs[r.name], r.name
        with torch.no_grad():
            err = float((model.get_submodule(name)(x) - dense.get_submodule(name)(x)).norm() ** 2) / len(x)
        assert err * float(stats[name].grad_sq.mean()) == pytest.approx(r.loss, rel=1e-7)
        checked += 1
    assert checked >= 2
    assert [r.rank for r in report.layers] == [9, None, 2]
    assert not torch.allclose(model[2].to_dense().weight, weighted[2].to_dense().weight)  # same rank, other weights
    with pytest.raises(ValueError, match=r"^fisher_channels must be True or False, got 'no'$"):
        ModuleCompressConfig(fisher_channels="no")


def test_sequential_refit_of_linear_targets_and_its_bad_inputs():
    # Linear targets: the refitted last layer reaches the least-squares optimum of ||W X - W' X'|| at its rank
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    X = torch.randn(64, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    config = ModuleCompressConfig(keep=0.5, format="svd", fisher=False, damping=0.0, kinds=("linear",), sequential=True)
    seq = copy.deepcopy(dense)
    report = compress_(seq, config, X)
    chosen = [r for r in report.layers if r.format is not None]
    assert len(chosen) >= 2 and chosen[0].name == "0"
    last = chosen[-1]
    x, x_now = _inputs_of(dense, last.name, X), _inputs_of(seq, last.name, X)
    Y = x @ dense.get_submodule(last.name).weight.detach().T
    U, S, _ = torch.linalg.svd(x_now, full_matrices=False)
    Q = U[:, S > 1e-6 * S[0]]  # where the refit's pseudo-inverse cuts (x_now is nearly singular after a rank 1)
    best = float((torch.linalg.svdvals(Q.T @ Y)[last.rank :] ** 2).sum() + (Y - Q @ (Q.T @ Y)).norm() ** 2)
    with torch.no_grad():
        err = float((seq.get_submodule(last.name)(x_now) - dense.get_submodule(last.name)(x)).norm() ** 2)
    assert err == pytest.approx(best, rel=1e-7)
    # a calibration callable that stops short of a refitted layer, or fails: one line naming the layer; the
    # model keeps its dense layers
    from rankwise.calibrate_modules import collect_module_stats

    stats = collect_module_stats(dense, {n: dense.get_submodule(n) for n in ("0", "2", "4")}, X, fisher=False)
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match=r"^calibration batch 0 never reached '2', the layer being refitted"):
        compress_(model, config, lambda m, i: m[0](X), stats=stats)
    assert all(type(m) is nn.Linear for m in model[::2])
    with pytest.raises(ValueError, match=r"^calibration batch 0 could not run through the model to refit '2': "):
        compress_(model, config, lambda m, i: m(X[:, :5]), stats=stats)
    assert all(type(m) is nn.Linear for m in model[::2])
    with pytest.raises(
        ValueError, match=r"^calibration batch 0 gave '2' an input of shape \(64, 12\); it takes 10 features$"
    ):
        compress_(model, config, lambda m, i: m[2](X), stats=stats)
    assert all(type(m) is nn.Linear for m in model[::2])


def _inputs_of(model, name, X):
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(X)
    handle.remove()
    return seen[0]
