"""AdaMerging: the entropy objective decreases, coefficients are per task and per layer, the merge formula holds."""

import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.merging.adamerging import learn_coefficients, ties_vectors

from suites.digits import make_model

K = 3


def _setup(with_heads: bool):
    """A base MLP, K fine-tunes = base + seeded perturbations, K unlabeled input sets, optional heads."""
    g = torch.Generator().manual_seed(0)
    base = make_model("mlp", num_classes=10, seed=0, width=16).eval()
    models = []
    for _ in range(K):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        models.append(m)
    inputs = [torch.rand(40, 1, 8, 8, generator=g) for _ in range(K)]
    heads = None
    if with_heads:
        torch.manual_seed(1)
        heads = [nn.Linear(10, c) for c in (10, 4, 2)]
    return base, models, inputs, heads


def _entropy(logits):
    p = torch.softmax(logits, -1)
    return -(p * p.log()).sum(-1).mean()


@pytest.mark.parametrize("with_heads", [False, True])
def test_entropy_decreases_and_coefficients_are_per_layer(with_heads):
    base, models, inputs, heads = _setup(with_heads)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in [base, *models]]
    res = learn_coefficients(models, base, inputs, heads=heads, steps=30, lr=1e-2, init=0.3)
    assert len(res.entropy) == 31
    assert res.entropy[-1] < 0.5 * res.entropy[0]
    names = [n for n, _ in base.named_parameters()]
    assert res.names == tuple(names) and len(names) == 6
    assert res.coefficients.shape == (K, 6)
    assert res.coefficients.min() >= 0 and res.coefficients.max() <= 1
    # learned per layer: each task's coefficients moved away from 0.3 and differ between layers
    assert (res.coefficients - 0.3).abs().max() > 0.2
    assert res.coefficients.std(dim=1).min() > 1e-3
    # the returned state is the merge formula at the learned coefficients, and its entropy is the last traced
    sb = base.state_dict()
    for j, n in enumerate(names):
        want = sb[n] + sum(res.coefficients[k, j] * (models[k].state_dict()[n] - sb[n]) for k in range(K))
        torch.testing.assert_close(res.state[n], want, rtol=1e-6, atol=1e-6)
    merged = copy.deepcopy(base)
    merged.load_state_dict(res.state)
    with torch.no_grad():
        outs = [merged(x) if heads is None else heads[k](merged(x)) for k, x in enumerate(inputs)]
        final = torch.stack([_entropy(o) for o in outs]).mean().item()
    assert final == pytest.approx(res.entropy[-1], rel=1e-5)
    # nothing given was modified, and no gradient was left on the inputs' parameters
    for m, sd in zip([base, *models], before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
        assert all(p.grad is None for p in m.parameters())
    if heads is not None:
        assert all(p.grad is None for h in heads for p in h.parameters())


def test_zero_steps_is_task_arithmetic_at_init():
    base, models, inputs, _ = _setup(False)
    res = learn_coefficients(models, base, inputs, steps=0, init=0.4)
    assert len(res.entropy) == 1
    assert torch.equal(res.coefficients, torch.full((K, 6), 0.4))
    ta = rankwise.merge(models, method="task_arithmetic", base=base, scale=0.4)
    for n, v in ta.items():
        torch.testing.assert_close(res.state[n], v, rtol=1e-6, atol=1e-6)


def test_minibatches_are_seeded_and_the_registered_method_matches():
    base, models, inputs, heads = _setup(True)
    kw = dict(heads=heads, steps=10, lr=1e-2, batch_size=8, seed=3)
    a = learn_coefficients(models, base, inputs, **kw)
    b = learn_coefficients(models, base, inputs, **kw)
    assert torch.equal(a.coefficients, b.coefficients) and a.entropy == b.entropy
    c = learn_coefficients(models, base, inputs, **{**kw, "seed": 4})
    assert not torch.equal(a.coefficients, c.coefficients)
    state = rankwise.merge(models, method="adamerging", base=base, inputs=inputs, **kw)
    assert state.keys() == base.state_dict().keys()
    assert all(torch.equal(state[n], a.state[n]) for n in state)


def test_bad_input():
    base, models, inputs, _ = _setup(False)
    with pytest.raises(ValueError, match=r"^adamerging needs inputs= one unlabeled input tensor per model, got None$"):
        rankwise.merge(models, method="adamerging", base=base)
    with pytest.raises(ValueError, match=r"^merge method 'adamerging' needs a base model \(base=\.\.\. / --base\)$"):
        rankwise.merge(models, method="adamerging", inputs=inputs)
    with pytest.raises(ValueError, match=r"^inputs must hold one tensor per model \(3\), got 2$"):
        learn_coefficients(models, base, inputs[:2])
    with pytest.raises(ValueError, match=r"^heads must hold one module per model \(3\) or be None, got 1$"):
        learn_coefficients(models, base, inputs, heads=[nn.Linear(10, 2)])
    with pytest.raises(ValueError, match=r"^steps must be an int >= 0, got -1$"):
        learn_coefficients(models, base, inputs, steps=-1)
    other = make_model("mlp", seed=0, width=17)
    with pytest.raises(ValueError, match=r"^models\[1\] does not match base at tensor '1.bias': \(17,\) vs \(16,\)$"):
        learn_coefficients([models[0], other], base, inputs[:2])


def test_ties_vectors_hand_example():
    v = torch.tensor([[3.0, -1.0, 0.5, -4.0], [-2.0, 2.0, 1.0, -0.1]])
    # density 0.5 keeps the 2 largest magnitudes per task: [3, 0, 0, -4] and [-2, 2, 0, 0];
    # elected signs of the sum [1, 2, 0, -4]: +, +, + (tie), -; disagreeing entries are dropped
    want = torch.tensor([[3.0, 0.0, 0.0, -4.0], [0.0, 2.0, 0.0, 0.0]])
    before = v.clone()
    assert torch.equal(ties_vectors(v, 0.5), want)
    assert torch.equal(v, before)


def test_adamerging_plus_plus_merges_the_ties_processed_vectors():
    base, models, inputs, heads = _setup(True)
    res = learn_coefficients(models, base, inputs, heads=heads, steps=5, lr=1e-2, init=0.3, density=0.2)
    assert res.entropy[-1] < res.entropy[0]
    sb = base.state_dict()
    for j, n in enumerate(res.names):
        tv = ties_vectors(torch.stack([m.state_dict()[n] - sb[n] for m in models]), 0.2)
        assert (tv != 0).sum() <= K * max(1, int(0.2 * sb[n].numel()))
        want = sb[n] + torch.tensordot(res.coefficients[:, j], tv, dims=1)
        torch.testing.assert_close(res.state[n], want, rtol=1e-6, atol=1e-6)
    plain = learn_coefficients(models, base, inputs, heads=heads, steps=0, init=0.3)
    plus = learn_coefficients(models, base, inputs, heads=heads, steps=0, init=0.3, density=0.2)
    ties = rankwise.merge(models, method="ties", base=base, density=0.2, scale=0.3, normalize=False)
    assert not torch.equal(plain.state["1.weight"], plus.state["1.weight"])
    for n in plus.names:  # at init every coefficient is 0.3: TIES without the disjoint mean, scale 0.3
        torch.testing.assert_close(plus.state[n], ties[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^density must be a fraction in \(0, 1\] or None, got 0$"):
        learn_coefficients(models, base, inputs, density=0)
