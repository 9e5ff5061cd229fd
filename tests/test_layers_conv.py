"""Factorized Conv2d layers: exact at full rank, output error = the factorization's at lower rank, bad input."""

import math

import pytest
import torch
from torch import nn

from rankwise.formats.cp import CP, cp_als
from rankwise.formats.svd import truncated_svd
from rankwise.formats.tucker import tucker_hooi
from rankwise.layers.conv import (
    CPConv2d,
    SVDConv2d,
    TuckerConv2d,
    conv_from_dense,
    conv_output,
)
from rankwise.layers.registry import empty_layer

GEOMETRIES = [
    {"in_channels": 6, "out_channels": 8, "kernel_size": 3, "padding": 1},
    {"in_channels": 5, "out_channels": 7, "kernel_size": (3, 5), "stride": 2, "padding": (1, 2), "bias": False},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "dilation": 2, "padding": 2, "padding_mode": "reflect"},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": "same"},
    {
        "in_channels": 3,
        "out_channels": 9,
        "kernel_size": (2, 3),
        "stride": (2, 1),
        "padding": (0, 1),
        "padding_mode": "circular",
    },
]


def _conv(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(**kw).to(dtype)


def _x(conv, dtype=torch.float32, seed=1):
    return torch.randn(2, conv.in_channels, 11, 13, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("fmt", ["tucker", "svd"])
def test_full_rank_reproduces_the_dense_conv(geometry, fmt):
    conv = _conv(**geometry)
    layer = conv_from_dense(conv, fmt)
    x = _x(conv)
    assert _rel(layer(x), conv(x)) < 1e-5
    assert _rel(layer.to_dense()(x), conv(x)) < 1e-5
    assert layer.to_dense().weight.shape == conv.weight.shape


def test_grouped_svd_factorizes_each_group():
    conv = _conv(in_channels=6, out_channels=8, kernel_size=3, padding=1, groups=2)
    x = _x(conv)
    assert _rel(SVDConv2d.from_dense(conv)(x), conv(x)) < 1e-5
    low = SVDConv2d.from_dense(conv, 3)
    W = conv.weight.detach().double()
    predicted = math.sqrt(sum(truncated_svd(m).tail_error(3) ** 2 for m in W.reshape(2, 4, -1)))
    assert math.isclose(float((low.dense_weight() - W).norm().detach()), predicted, rel_tol=1e-5)
    assert low.num_params == 2 * 3 * (3 * 9 + 4) + 8


@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_lower_rank_error_is_the_factorizations(geometry):
    conv = _conv(dtype=torch.float64, **geometry)
    W = conv.weight.detach()
    x = _x(conv, torch.float64)
    # SVD of the reshape: the weight error is exactly the discarded singular values
    svd = SVDConv2d.from_dense(conv, 2)
    assert math.isclose(
        float((svd.dense_weight() - W).norm().detach()),
        truncated_svd(W.reshape(W.shape[0], -1)).tail_error(2),
        rel_tol=1e-9,
    )
    assert _rel(svd(x), conv_output(conv, x, svd.dense_weight())) < 1e-12
    # Tucker-2: orthonormal factors, the weight error is HOOI's reported error
    tucker = tucker_hooi(W, (3, 2), modes=(0, 1))
    layer = TuckerConv2d.from_factors(conv, tucker)
    assert math.isclose(
        float((layer.dense_weight() - W).norm().detach()), tucker.errors[-1] * float(W.norm()), rel_tol=1e-9
    )
    assert _rel(layer(x), conv_output(conv, x, tucker.to_dense())) < 1e-12
    assert layer.ranks == (3, 2)


def test_cp_conv_contracts_the_cp_exactly():
    conv = _conv(dtype=torch.float64, **GEOMETRIES[1])
    W = conv.weight.detach()
    cp = cp_als(W, 4, seed=0)
    layer = CPConv2d.from_factors(conv, cp)
    x = _x(conv, torch.float64)
    assert _rel(layer(x), conv_output(conv, x, cp.to_dense())) < 1e-12
    assert math.isclose(
        float((layer.dense_weight() - W).norm().detach()), cp.errors[-1] * float(W.norm()), rel_tol=1e-6
    )
    assert layer.num_params == 4 * (5 + 3 + 5 + 7)


def test_cp_conv_of_an_exact_cp_kernel_reproduces_the_conv():
    g = torch.Generator().manual_seed(3)
    cp = CP(torch.rand(3, generator=g) + 1, tuple(torch.randn(n, 3, generator=g) for n in (8, 6, 3, 3)))
    conv = _conv(**GEOMETRIES[0])
    with torch.no_grad():
        conv.weight.copy_(cp.to_dense())
    x = _x(conv)
    assert _rel(CPConv2d.from_dense(conv, 3)(x), conv(x)) < 1e-5


def test_factors_are_fine_tunable_and_weights_untouched():
    conv = _conv(**GEOMETRIES[0])
    before = conv.weight.detach().clone()
    for fmt, rank in (("tucker", 2), ("cp", 3), ("svd", 2)):
        layer = conv_from_dense(conv, fmt, rank)
        assert all(p.requires_grad for p in layer.parameters())
        layer(_x(conv)).square().sum().backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in layer.parameters())
    assert torch.equal(conv.weight, before)


@pytest.mark.parametrize("fmt,rank", [("tucker", (3, 2)), ("cp", 3), ("svd", 2)])
def test_spec_and_empty_rebuild_the_same_layer(fmt, rank):
    conv = _conv(**GEOMETRIES[2])
    layer = conv_from_dense(conv, fmt, rank)
    spec = layer.spec()
    assert spec["layer"] == f"{fmt}_conv2d"
    empty = empty_layer(conv, spec)
    assert set(empty.state_dict()) == set(layer.state_dict())
    empty.load_state_dict(layer.state_dict())
    x = _x(conv)
    assert torch.equal(empty(x), layer(x))
    meta = empty_layer(conv.to("meta"), spec)
    assert all(p.is_meta for p in meta.parameters())


def test_bad_input_is_one_line_naming_layer_format_and_accepted_values():
    grouped = _conv(in_channels=4, out_channels=4, kernel_size=3, groups=2)
    with pytest.raises(
        ValueError,
        match=r"^cp_conv2d: format 'cp' cannot express a grouped convolution \(groups=2\); "
        r"accepted: groups=1, or format 'svd' \(factorizes each group\)$",
    ):
        conv_from_dense(grouped, "cp", 2)
    with pytest.raises(ValueError, match=r"^tucker_conv2d: format 'tucker' cannot express a grouped"):
        conv_from_dense(grouped, "tucker", 2)
    conv = _conv(**GEOMETRIES[0])
    with pytest.raises(
        ValueError,
        match=r"^tucker_conv2d 8x6x3x3: rank\[1\]=7 is out of range; accepted: "
        r"1 <= rank\[1\] <= 6 for this shape$",
    ):
        conv_from_dense(conv, "tucker", (3, 7))
    with pytest.raises(
        ValueError,
        match=r"^svd_conv2d 8x6x3x3 \(groups=1\): rank=9 is out of range; accepted: "
        r"1 <= rank <= 8",
    ):
        conv_from_dense(conv, "svd", 9)
    with pytest.raises(ValueError, match=r"^format for a Conv2d must be one of cp, svd, tucker, got 'tt'$"):
        conv_from_dense(conv, "tt", 2)
    with pytest.raises(ValueError, match=r"^cp_conv2d: format 'cp' needs a rank"):
        conv_from_dense(conv, "cp")
