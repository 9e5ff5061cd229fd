"""Rank allocation: the budget is met exactly, the loss-aware allocator beats uniform and matches brute force."""

import itertools

import pytest
import torch

from rankwise.allocate import ALLOCATORS, LayerCost, allocate_ranks


def layers_with_spectra(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(48, 32), (32, 32), (64, 32), (32, 80), (16, 16)]
    out = []
    for i, (m, n) in enumerate(shapes):
        decay = 0.5 + 0.4 * i / len(shapes)
        g = torch.sort(torch.rand(min(m, n), generator=gen, dtype=torch.float64), descending=True).values
        out.append(LayerCost((m, n), m if i % 2 else 0, (10.0**i) * g * decay ** torch.arange(min(m, n))))
    return out


def total(layers, ranks):
    return sum(layer.params(r) for layer, r in zip(layers, ranks))


def loss(layers, ranks):
    return sum(0.0 if r is None else float(layer.gains[r:].sum()) for layer, r in zip(layers, ranks))


@pytest.mark.parametrize("keep", [0.2, 0.45, 0.6, 0.8, 0.95])
def test_loss_aware_allocation_meets_the_budget_within_one_rank_step(keep):
    layers = layers_with_spectra()
    dense = sum(layer.dense_params for layer in layers)
    ranks = allocate_ranks("loss-aware", layers, keep, min_rank=2)
    spent = total(layers, ranks)
    assert spent <= keep * dense
    assert spent > keep * dense - max(layer.step for layer in layers)
    assert all(r is None or 2 <= r <= layer.max_rank for layer, r in zip(layers, ranks))
    assert loss(layers, ranks) <= loss(layers, allocate_ranks("uniform", layers, keep))


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 1.0])
def test_uniform_keeps_the_same_fraction_of_every_layer(keep):
    layers = layers_with_spectra()
    ranks = allocate_ranks("uniform", layers, keep)
    for layer, r in zip(layers, ranks):
        assert layer.params(r) <= keep * layer.dense_params
        if r is not None:
            assert layer.params(r) > keep * layer.dense_params - layer.step
            assert 1 <= r <= layer.max_rank
        else:  # dense only when the rank that fits would store as many parameters as the dense layer
            assert (keep * layer.dense_params - layer.bias) // layer.step > layer.max_rank
    assert total(layers, ranks) <= keep * sum(layer.dense_params for layer in layers)


def test_loss_aware_matches_brute_force_on_small_problem():
    gen = torch.Generator().manual_seed(3)
    spectra = [
        torch.sort(torch.rand(5, generator=gen, dtype=torch.float64) * s, descending=True)[0] for s in (1.0, 5.0, 0.2)
    ]
    layers = [LayerCost((6, 5), 0, spectrum) for spectrum in spectra]
    for keep in (0.4, 0.6, 0.8):
        budget = keep * sum(layer.dense_params for layer in layers)
        options = [list(range(1, layer.max_rank + 1)) + [None] for layer in layers]
        best = min(loss(layers, c) for c in itertools.product(*options) if total(layers, c) <= budget)
        ranks = allocate_ranks("loss-aware", layers, keep)
        assert total(layers, ranks) <= budget
        assert loss(layers, ranks) == pytest.approx(best, rel=1e-12)


def test_a_layer_whose_truncation_is_costly_stays_dense():
    cheap = LayerCost((64, 64), 0, torch.full((64,), 1e-6, dtype=torch.float64))
    costly = LayerCost((64, 64), 0, torch.full((64,), 1e3, dtype=torch.float64))
    ranks = allocate_ranks("loss-aware", [cheap, costly], 0.6)
    assert ranks[1] is None and ranks[0] is not None
    assert total([cheap, costly], ranks) <= 0.6 * 2 * 64 * 64


def test_bad_allocator_and_budget_messages():
    layers = layers_with_spectra()
    known = ALLOCATORS.names()
    assert {"loss-aware", "uniform"} <= set(known) and known == sorted(known)
    with pytest.raises(ValueError, match=r"^unknown allocator 'greedy'; known: .+$") as err:
        allocate_ranks("greedy", layers, 0.5)
    assert str(err.value).split("known: ")[1].split(", ") == known  # every registered name, sorted
    with pytest.raises(
        ValueError,
        match=r"^keep is too small: even rank 16 for every layer exceeds the budget of "
        r"\d+ parameters$",
    ):
        allocate_ranks("loss-aware", layers, 0.05, min_rank=16)


@pytest.mark.parametrize("name", ALLOCATORS.names())
def test_every_allocator_meets_the_budget_and_more_budget_never_loses_more(name):
    layers = layers_with_spectra(seed=1)
    dense = sum(layer.dense_params for layer in layers)
    losses = []
    for keep in (0.2, 0.4, 0.6, 0.8, 1.0):
        ranks = allocate_ranks(name, layers, keep, min_rank=2)
        assert len(ranks) == len(layers)
        assert total(layers, ranks) <= keep * dense
        assert all(r is None or (isinstance(r, int) and 2 <= r <= layer.max_rank) for layer, r in zip(layers, ranks))
        assert allocate_ranks(name, layers, keep, min_rank=2) == ranks  # deterministic
        losses.append(loss(layers, ranks))
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[0] > 0.0  # keep 0.2 cannot leave every layer dense


def test_fisher_is_an_alias_of_loss_aware():
    layers = layers_with_spectra(seed=2)
    assert ALLOCATORS.get("fisher") is ALLOCATORS.get("loss-aware") and ALLOCATORS.get("fisher").name == "loss-aware"
    assert "fisher" in ALLOCATORS and "fisher" not in ALLOCATORS.names()  # accepted, not advertised
    for keep in (0.3, 0.7):
        assert allocate_ranks("fisher", layers, keep) == allocate_ranks("loss-aware", layers, keep)


def test_no_parameters_are_spent_where_no_loss_is_predicted():
    exact = LayerCost((32, 32), 0, torch.cat([torch.ones(4), torch.zeros(28)]).double())  # exactly rank 4
    other = LayerCost((32, 32), 0, torch.linspace(1.0, 0.1, 32, dtype=torch.float64))
    # budget 1843: rank 4 (256) + dense (1024) fit; ranks 5..15 of the first layer would lower no predicted loss
    assert allocate_ranks("loss-aware", [exact, other], 0.9) == [4, None]
