"""TT-matrix and Kronecker Linear layers, low-rank and TT Embeddings: exact at full rank, errors as predicted."""

import math

import pytest
import torch
from torch import nn

from rankwise.formats.kron import kron_decompose
from rankwise.formats.svd import truncated_svd
from rankwise.formats.tt import tt_matrix
from rankwise.layers.embedding import LowRankEmbedding, TTEmbedding
from rankwise.layers.kron import KronLinear
from rankwise.layers.registry import empty_layer
from rankwise.layers.tt import TTLinear, balanced_factors


def _linear(n_in=24, n_out=30, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out, bias=bias).to(dtype)


def _embedding(dtype=torch.float32, padding_idx=None):
    torch.manual_seed(0)
    return nn.Embedding(60, 24, padding_idx=padding_idx).to(dtype)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


X = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(2))


def test_balanced_factors():
    assert balanced_factors(768, 3) == (12, 8, 8)
    assert balanced_factors(49152, 3) == (48, 32, 32)
    assert balanced_factors(97, 2) == (97, 1)
    assert math.prod(balanced_factors(576, 4)) == 576


@pytest.mark.parametrize("cls", [TTLinear, KronLinear])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_reproduces_the_dense_layer(cls, bias):
    linear = _linear(bias=bias)
    layer = cls.from_dense(linear)
    assert _rel(layer(X), linear(X)) < 1e-5
    assert _rel(layer.to_dense()(X), linear(X)) < 1e-5
    assert layer(X).shape == (4, 5, 30)


def test_tt_linear_lower_rank_error_is_the_tt_matrix_error_within_the_tt_svd_bound():
    linear = _linear(dtype=torch.float64)
    W = linear.weight.detach()
    layer = TTLinear.from_dense(linear, 3, row_dims=(5, 3, 2), col_dims=(4, 3, 2))
    ttm = tt_matrix(W, (5, 3, 2), (4, 3, 2), 3)
    assert layer.ranks == ttm.ranks == (3, 3)
    err = float((layer.dense_weight() - W).norm())
    assert math.isclose(err, float((ttm.to_dense() - W).norm()), rel_tol=1e-12)
    # Oseledets 2011, Thm 2.2: error^2 <= sum over bonds of the discarded tail of that unfolding
    paired = W.reshape(5, 3, 2, 4, 3, 2).permute(0, 3, 1, 4, 2, 5).reshape(20, 9, 4)
    bound = math.sqrt(
        sum(truncated_svd(paired.reshape(math.prod(paired.shape[: k + 1]), -1)).tail_error(3) ** 2 for k in range(2))
    )
    assert err <= bound * (1 + 1e-12) and err > 0.5 * bound
    x = X.double()
    assert _rel(layer(x), x @ ttm.to_dense().T + linear.bias) < 1e-12
    assert layer.num_params == 1 * 5 * 4 * 3 + 3 * 3 * 3 * 3 + 3 * 2 * 2 * 1 + 30


def test_kron_linear_lower_rank_error_is_the_discarded_spectrum():
    linear = _linear(dtype=torch.float64)
    W = linear.weight.detach()
    layer = KronLinear.from_dense(linear, 3, a_shape=(6, 4), b_shape=(5, 6))
    full = kron_decompose(W, (6, 4), (5, 6))
    assert math.isclose(float((layer.dense_weight() - W).norm()), float(full.spectrum[3:].norm()), rel_tol=1e-9)
    x = X.double()
    assert _rel(layer(x), x @ layer.dense_weight().T + linear.bias) < 1e-12
    assert layer.num_params == 3 * (24 + 30) + 30


@pytest.mark.parametrize("cls", [LowRankEmbedding, TTEmbedding])
def test_embedding_full_rank_reproduces_the_table(cls):
    emb = _embedding(padding_idx=0)
    layer = cls.from_dense(emb)
    assert _rel(layer(IDS), emb(IDS)) < 1e-5
    assert _rel(layer.to_dense().weight, emb.weight) < 1e-5
    assert layer.to_dense().padding_idx == 0


def test_embedding_lower_rank_errors():
    emb = _embedding(dtype=torch.float64)
    E = emb.weight.detach()
    low = LowRankEmbedding.from_dense(emb, 5)
    assert math.isclose(float((low.dense_weight() - E).norm()), truncated_svd(E).tail_error(5), rel_tol=1e-9)
    assert _rel(low(IDS), E[IDS] - (E - low.dense_weight())[IDS]) < 1e-12
    h = torch.randn(3, 24, dtype=torch.float64)
    assert _rel(low.logits(h), h @ low.dense_weight().T) < 1e-12
    tt = TTEmbedding.from_dense(emb, 4)
    ttm = tt_matrix(E, (5, 4, 3), (4, 3, 2), 4)
    assert torch.allclose(tt.dense_weight(), ttm.to_dense(), atol=1e-12)
    assert _rel(tt(IDS), ttm.to_dense()[IDS]) < 1e-12
    # frequency weights: the weighted error is the whitened SVD's tail, below the plain SVD's weighted error
    weights = torch.linspace(0.1, 3.0, 60, dtype=torch.float64)
    weighted = LowRankEmbedding.from_dense(emb, 5, row_weights=weights)

    def werr(layer: LowRankEmbedding) -> float:
        return float((weights[:, None] * (layer.dense_weight() - E)).norm())

    assert werr(weighted) < werr(low)
    assert math.isclose(werr(weighted), truncated_svd(weights[:, None] * E).tail_error(5), rel_tol=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TTLinear.from_dense(_linear(), 2),
        lambda: KronLinear.from_dense(_linear(), 2),
        lambda: LowRankEmbedding.from_dense(_embedding(), 3),
        lambda: TTEmbedding.from_dense(_embedding(), 2),
    ],
)
def test_spec_empty_round_trip_and_fine_tuning(make):
    layer = make()
    spec = layer.spec()
    old = nn.Linear(2, 2)
    empty = empty_layer(old, spec)
    assert set(empty.state_dict()) == set(layer.state_dict())
    empty.load_state_dict(layer.state_dict())
    inp = IDS if "embedding" in spec["layer"] else X
    assert torch.equal(empty(inp), layer(inp))
    layer(inp).square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    meta = empty_layer(old.to("meta"), spec)
    assert all(p.is_meta for p in meta.parameters())


def test_bad_shapes_and_ranks_name_layer_format_and_accepted_values():
    with pytest.raises(
        ValueError,
        match=r"^tt_linear: format 'tt' needs row_dims of at least 2 positive ints multiplying "
        r"to 30, got \(4, 8\); accepted e.g. \(5, 3, 2\)$",
    ):
        TTLinear.from_dense(_linear(), 2, row_dims=(4, 8))
    with pytest.raises(
        ValueError,
        match=r"^kron_linear: format 'kronecker' needs a_shape and b_shape with "
        r"a_shape\[0\]\*b_shape\[0\] = 30 and a_shape\[1\]\*b_shape\[1\] = 24",
    ):
        KronLinear.from_dense(_linear(), 2, a_shape=(7, 4), b_shape=(5, 6))
    with pytest.raises(ValueError, match=r"^kron_linear 30x24: rank=99 is out of range; accepted: 1 <= rank <= 20"):
        KronLinear.from_dense(_linear(), 99)
    with pytest.raises(
        ValueError, match=r"^lowrank_embedding 60x24: rank=25 is out of range; accepted: 1 <= rank <= 24"
    ):
        LowRankEmbedding.from_dense(_embedding(), 25)
    with pytest.raises(ValueError, match=r"^tt_embedding: an nn.Embedding with max_norm=1.0"):
        TTEmbedding.from_dense(nn.Embedding(60, 24, max_norm=1.0))
