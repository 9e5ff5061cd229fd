"""Git Re-Basin weight matching: exact recovery of a known permutation, function preservation, the merge."""

import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.merging.rebasin import align, apply_permutation, permutation_spec, weight_matching

from suites.digits import make_model


def _permuted_copy(model: nn.Module, seed: int) -> tuple[nn.Module, list[torch.Tensor]]:
    spec = permutation_spec(model)
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=g) for n in spec.sizes]
    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutation(model.state_dict(), spec, perms))
    return out, perms


def test_spec_of_a_cnn_follows_channels_through_flatten():
    spec = permutation_spec(make_model("cnn", seed=0, width=24))
    assert spec.sizes == (16, 32, 24)
    assert spec.axes["0.weight"] == {0: (0, 1)}
    assert spec.axes["2.weight"] == {1: (0, 1), 0: (1, 1)}
    # the linear after Flatten reads 32 channels x 16 pixels, channel-major
    assert spec.axes["6.weight"] == {1: (1, 16), 0: (2, 1)}
    assert spec.axes["8.weight"] == {1: (2, 1)}
    assert "8.bias" not in spec.axes  # the logits are not permuted


def test_spec_covers_batchnorm():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    spec = permutation_spec(model)
    assert spec.sizes == (6,)
    assert {k for k, v in spec.axes.items() if v == {0: (0, 1)}} == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    }


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_permuting_preserves_the_function(arch):
    model = make_model(arch, seed=0, width=32).eval()
    permuted, _ = _permuted_copy(model, seed=1)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert sum(not torch.equal(v, model.state_dict()[k]) for k, v in permuted.state_dict().items()) >= 4
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_weight_matching_recovers_a_known_permutation_exactly(arch):
    model = make_model(arch, seed=0, width=32)
    permuted, perms = _permuted_copy(model, seed=3)
    before = {k: v.clone() for k, v in permuted.state_dict().items()}
    aligned = align(permuted, model, seed=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[name], tensor), name
    found = weight_matching(model.state_dict(), permuted.state_dict(), permutation_spec(model))
    for p, q in zip(perms, found):
        assert torch.equal(q, torch.argsort(p))  # the inverse of the permutation applied
    for name, tensor in permuted.state_dict().items():  # the input is not modified
        assert torch.equal(tensor, before[name])


def test_matching_two_random_models_increases_their_inner_product_and_is_seeded():
    a, b = make_model("mlp", seed=0, width=48), make_model("mlp", seed=1, width=48)
    spec = permutation_spec(a)

    def inner(sb):
        return sum((a.state_dict()[k].double() * sb[k].double()).sum() for k in spec.axes).item()

    aligned = align(b, a, seed=5)
    assert inner(aligned.state_dict()) > inner(b.state_dict()) + 1.0
    again = align(b, a, seed=5)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in aligned.state_dict().items())
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aligned(x), b(x), rtol=1e-5, atol=1e-6)


def test_rebasin_merge_of_a_model_and_its_permuted_copy_is_the_model():
    model = make_model("cnn", seed=0, width=16)
    permuted, _ = _permuted_copy(model, seed=4)
    merged = rankwise.merge([model, permuted], method="rebasin")
    assert merged.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(merged[name], tensor), name


def test_rebasin_merge_averages_the_models_after_undoing_their_permutations():
    # b and c are small perturbations of a, then permuted: weight matching must undo each permutation,
    # so the merge is the plain average of a and the unpermuted perturbed copies (built without align)
    a = make_model("mlp", seed=0, width=12)
    g = torch.Generator().manual_seed(6)
    near = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in a.state_dict().items()} for _ in range(2)]
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    spec = permutation_spec(a)
    for model, sd, seed in ((b, near[0], 7), (c, near[1], 8)):
        perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed)) for n in spec.sizes]
        assert all(not torch.equal(p, torch.arange(len(p))) for p in perms)
        model.load_state_dict(apply_permutation(sd, spec, perms))
    merged = rankwise.merge([a, b, c], method="rebasin", seed=1)
    assert merged.keys() == a.state_dict().keys()
    for name, tensor in a.state_dict().items():
        expected = (tensor + near[0][name] + near[1][name]) / 3
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-7, msg=name)
        assert not torch.allclose(merged[name], tensor, rtol=0, atol=1e-5)  # the perturbations count


def test_bad_input():
    with pytest.raises(
        ValueError,
        match=r"^cannot permute through module '1' \(LayerNorm\); "
        r"supported: Linear, Conv1d",
    ):
        permutation_spec(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"^model must have at least 2 Linear/Conv layers to permute between, got 1$"):
        permutation_spec(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ValueError, match=r"^model must be an nn.Sequential chain; 'the model' is a ModuleList$"):
        permutation_spec(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    a, b = make_model("mlp", seed=0, width=8), make_model("mlp", seed=0, width=9)
    with pytest.raises(
        ValueError,
        match=r"^model_b differs from the reference model at tensor '1.bias': "
        r"\(9,\) vs \(8,\)$",
    ):
        align(b, a)
    with pytest.raises(ValueError, match=r"^merge method 'rebasin' needs at least 2 fine-tuned models, got 1$"):
        rankwise.merge([a], method="rebasin")
    with pytest.raises(ValueError, match=r"^max_iter must be an int >= 1, got 0$"):
        align(a, a, max_iter=0)
