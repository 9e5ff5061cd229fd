"""Calibration statistics: exact against brute force, shared inputs deduplicated, Fisher diagonal exact."""

import pytest
import torch

from rankwise.calibrate import collect_stats, predicted_token_moments
from rankwise.targets import find_targets

from _tiny_models import small_llama, tiny_model


def stored_inputs(model, targets, calib, batches=((0, 4), (4, 6))):
    """Brute force: keep every target's input and every output gradient of the per-sequence summed loss,
    the batches given as (start, stop) spans."""
    xs, gs = {n: [] for n in targets}, {n: [] for n in targets}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for n, m in targets.items()
    ]

    def grad_hook(name):
        def hook(mod, args, out):
            out.register_hook(lambda g: gs[name].append(g.reshape(-1, g.shape[-1])))

        return hook

    hooks += [m.register_forward_hook(grad_hook(n)) for n, m in targets.items()]
    emb = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    for p in model.parameters():
        p.requires_grad_(False)
    for start, stop in batches:
        b = calib[start:stop]
        out = model(input_ids=b, attention_mask=torch.ones_like(b))
        loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), b[:, 1:].reshape(-1)
        )
        (loss * len(b)).backward()
    for h in hooks + [emb]:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}, {n: torch.cat(v) for n, v in gs.items()}


def test_stats_equal_brute_force_and_inputs_are_shared():
    model = small_llama()
    targets = find_targets(model)
    calib = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, targets, calib, fisher_seqs=6, progress=False)
    xs, gs = stored_inputs(model, targets, calib)
    for name in targets:
        X = xs[name]
        st = stats.inputs[name]
        assert st.count == 6 * 16
        torch.testing.assert_close(st.gram, X.T @ X, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.mean_abs, X.abs().mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stats.out_grad_sq[name], gs[name].pow(2).mean(0), rtol=1e-5, atol=1e-12)
    layer = "model.layers.0."
    q, k, v = (stats.inputs[layer + f"self_attn.{p}_proj"] for p in "qkv")
    assert q is k and k is v
    assert stats.inputs[layer + "mlp.gate_proj"] is stats.inputs[layer + "mlp.up_proj"]
    assert stats.inputs[layer + "self_attn.o_proj"] is not q
    assert len(stats.groups()) == 2 * 4  # per block: attention input, o_proj, MLP input, down_proj
    assert stats.loss is not None and stats.loss > 0


def test_fisher_sequences_are_counted_exactly_not_by_batch():
    """fisher_seqs=1 with batches of 4: gradients of the first sequence only, inputs of all six."""
    model = small_llama()
    targets = find_targets(model)
    calib = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, targets, calib, fisher_seqs=1, progress=False)
    _, gs = stored_inputs(model, targets, calib[:1], batches=((0, 1),))
    xs, _ = stored_inputs(model, targets, calib)
    for name in targets:
        assert stats.inputs[name].count == 6 * 16
        torch.testing.assert_close(stats.inputs[name].gram, xs[name].T @ xs[name], rtol=1e-5, atol=1e-5)
        assert gs[name].shape[0] == 16
        torch.testing.assert_close(stats.out_grad_sq[name], gs[name].pow(2).mean(0), rtol=1e-5, atol=1e-12)
    # per-sequence summed loss: a token's gradient does not depend on the batch it ran in
    one = collect_stats(model, targets, calib, fisher_seqs=6, batch_size=1, progress=False)
    four = collect_stats(model, targets, calib, fisher_seqs=6, batch_size=4, progress=False)
    for name in targets:
        torch.testing.assert_close(one.out_grad_sq[name], four.out_grad_sq[name], rtol=1e-6, atol=0)  # float32 g^2


def test_statistics_computed_once_per_distinct_input(monkeypatch):
    from rankwise import calibrate

    calls = []
    original = calibrate.InputStats.add
    monkeypatch.setattr(calibrate.InputStats, "add", lambda self, x: (calls.append(x.shape), original(self, x))[1])
    model = small_llama()
    collect_stats(model, find_targets(model), torch.zeros(4, 8, dtype=torch.long), batch_size=2, progress=False)
    assert len(calls) == 2 * 4 * 2  # 2 batches x 2 blocks x 4 distinct inputs (not 7 layers)


def test_encoder_stats_and_gauss_newton_gradients_equal_brute_force():
    """Encoders: the loss is <z, h> for a Gaussian z seeded by the batch index over the last hidden state h;
    the squared output gradients equal a plain autograd run of that loss, the inputs are shared by q/k/v."""
    model = tiny_model("bert", vocab_size=80, hidden_size=64, intermediate_size=96, dtype=torch.float64)
    targets = find_targets(model)
    assert all(n.startswith("encoder.layer.") for n in targets) and len(targets) == 12
    calib = torch.randint(0, 80, (4, 10), generator=torch.Generator().manual_seed(3))
    stats = collect_stats(model, targets, calib, fisher_seqs=4, batch_size=4, progress=False)
    assert {
        stats.inputs[f"encoder.layer.0.attention.self.{p}"] is stats.inputs["encoder.layer.0.attention.self.query"]
        for p in ("key", "value")
    } == {True}

    grads = {}

    def keep_grad(name):
        def hook(mod, args, out):
            out.register_hook(lambda g: grads.__setitem__(name, g))

        return hook

    hooks = [m.register_forward_hook(keep_grad(n)) for n, m in targets.items()]
    emb = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    h = model(input_ids=calib, attention_mask=torch.ones_like(calib)).last_hidden_state
    z = torch.randn(h.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)  # batch 0: seed 0
    (h.float() * z).sum().backward()  # the per-sequence losses summed: <z, h> / 4 per sequence, times 4
    for hk in hooks + [emb]:
        hk.remove()
    for name in targets:
        assert stats.inputs[name].count == 40
        expected = grads[name].reshape(-1, grads[name].shape[-1]).pow(2).mean(0)
        torch.testing.assert_close(stats.out_grad_sq[name], expected, rtol=1e-5, atol=1e-12)


def test_unused_target_is_reported():
    model = small_llama()
    targets = find_targets(model)
    targets["lm_head"] = model.lm_head
    extra = torch.nn.Linear(3, 3)
    targets["unused"] = extra
    with pytest.raises(ValueError, match=r"^calibration never reached layer\(s\) unused: they are not used"):
        collect_stats(model, targets, torch.zeros(1, 4, dtype=torch.long), progress=False)


def test_predicted_token_moments_are_expected_squared_cross_entropy_gradients():
    # E_{y ~ p}[(dCE/dlogit)^2] over the scored positions (all but each row's last), from autograd for every label
    logits = torch.randn(2, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p_sum, pq_sum = predicted_token_moments(logits, chunk=2)  # chunks across rows: the sums do not depend on them
    expected_p, expected_pq = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for row in logits:
        for z in row[:-1]:
            p = torch.softmax(z, -1)
            expected_p += p
            for y in range(7):
                x = z.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x[None], torch.tensor([y])), x)
                expected_pq += p[y] * g**2
    # the softmax is taken in float32 (SmolLM2's logits rows are 49,152 wide), the sums in float64
    torch.testing.assert_close(p_sum, expected_p, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(pq_sum, expected_pq, rtol=1e-6, atol=1e-9)
