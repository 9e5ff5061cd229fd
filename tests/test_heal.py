"""Healing: the distillation loss falls, runs are bit-identical, orthonormal factors stay orthonormal, the
healed directory reloads with identical logits, and bad input is refused with one line and no output."""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import rankwise
import rankwise.heal
from rankwise.cli import main
from rankwise.eval import next_token_agreement
from rankwise.heal import (
    HealConfig,
    backward_in_chunks,
    heal_,
    kl_full,
    kl_top_k,
    lr_factor,
    split_head,
    teacher_top_k,
)
from rankwise.heal_checkpoint import heal_checkpoint
from rankwise.heal_orthogonal import OrthonormalLowRank, orthonormal_factors, qr_retraction, tangent_projection
from rankwise.layers import LowRankLinear

from _tiny_models import factorize_some, save_model_dir, tiny_llama, token_ids, tree_digest
from test_cli_compress import FAST, no_output, run_bad

HEAL = ["--seq-len", "32", "--tokens", "256"]  # 8 healing sequences of 32 tokens, one step each


def teacher_and_student(rank: int = 4):
    """A tiny Llama with peaked next-token distributions (init std 0.2) and a copy whose block linears are
    truncated to ``rank``."""
    teacher = tiny_llama(initializer_range=0.2)
    names = {n: rank for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    return teacher, factorize_some(copy.deepcopy(teacher), names)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model_dir(tiny_llama(), tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def compressed(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "c"
    assert main(["compress", str(llama_dir), "--keep", "0.6", "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.parametrize("orthogonal", [False, True])
def test_loss_falls_and_held_out_kl_drops(orthogonal):
    teacher, student = teacher_and_student()
    held_out = token_ids(4, 32, seed=5)
    before = next_token_agreement(student, teacher, held_out, progress=False).kl
    # lr 3e-3: at 1e-2 the orthonormal factors (entries ~ 1/sqrt(n), moved ~lr per AdamW step) overfit these 16
    # random sequences: training loss 0.76 of its start, held-out KL 1.009 of its start
    config = HealConfig(steps=30, batch_size=2, lr=3e-3, orthogonal=orthogonal)
    report = heal_(student, teacher, token_ids(16, 32), config, progress=False)
    after = next_token_agreement(student, teacher, held_out, progress=False).kl
    assert len(report.losses) == 30 and report.tokens == 30 * 2 * 32
    first, last = sum(report.losses[:5]) / 5, sum(report.losses[-5:]) / 5
    assert last < 0.85 * first  # measured 0.805 (free) and 0.787 (orthonormal)
    assert after < 0.99 * before  # measured 0.931 and 0.933 on random held-out tokens
    assert not student.training and all(not p.requires_grad for p in student.parameters())
    assert all(isinstance(m, LowRankLinear) for n, m in student.named_modules() if n.endswith("_proj"))


@pytest.mark.parametrize(
    "config",
    [
        HealConfig(steps=6, batch_size=2, lr=1e-2),
        HealConfig(steps=6, lr=1e-2, orthogonal=True),
        HealConfig(steps=6, lr=1e-2, train_norms=True, top_k=16),
    ],
)
def test_two_runs_are_bitwise_equal(config):
    teacher, student = teacher_and_student()
    ids = token_ids(5, 32)
    states = []
    for _ in range(2):
        s = copy.deepcopy(student)
        heal_(s, teacher, ids, config, progress=False)
        states.append(s.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    changed = [k for k in states[0] if not torch.equal(states[0][k], student.state_dict()[k])]
    assert changed and all((".up." in k or ".down." in k or "norm" in k) for k in changed)
    assert any("norm" in k for k in changed) == config.train_norms


def test_gradient_checkpointing_gives_the_same_factors():
    teacher, student = teacher_and_student()
    ids = token_ids(4, 32)
    states = []
    for checkpointing in (False, True):
        s = copy.deepcopy(student)
        heal_(s, teacher, ids, HealConfig(steps=4, lr=1e-2, checkpointing=checkpointing), progress=False)
        states.append(s.state_dict())
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6, rtol=0) for k in states[0])


def test_autocast_runs_the_bodies_in_bfloat16_and_the_rest_in_float32():
    teacher, student = teacher_and_student()
    ids, held_out = token_ids(16, 32), token_ids(4, 32, seed=5)
    seen = {}

    def record(name):
        return lambda module, args: seen.setdefault(name, []).append(args[0].dtype)

    for model, tag in ((student, "student"), (teacher, "teacher")):
        model.model.layers[0].mlp.down_proj.register_forward_pre_hook(record(f"{tag} body"))
        model.lm_head.register_forward_pre_hook(record(f"{tag} head"))
    before = next_token_agreement(student, teacher, held_out, progress=False).kl
    plain = copy.deepcopy(student)
    config = HealConfig(steps=30, batch_size=2, lr=3e-3)
    seen.clear()
    report = heal_(student, teacher, ids, HealConfig(**{**asdict(config), "autocast": True}), progress=False)
    # split_head's check (16 tokens, whole model and body) runs each model twice in float32 before the steps;
    # then every step's body in bfloat16 (the student's twice: forward and checkpointed recomputation)
    for tag, calls in (("student", 2 + 2 * 30), ("teacher", 2 + 30)):
        body = seen[f"{tag} body"]
        assert body == [torch.float32] * 2 + [torch.bfloat16] * (calls - 2)
        assert set(seen[f"{tag} head"]) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in student.parameters())
    reference = heal_(plain, teacher, ids, config, progress=False).losses
    assert report.losses[0] == pytest.approx(reference[0], rel=0.02)  # one bf16 forward: the same loss to 2%
    after = next_token_agreement(student, teacher, held_out, progress=False).kl
    plain_after = next_token_agreement(plain, teacher, held_out, progress=False).kl
    assert after < 0.99 * before and abs(after - plain_after) < 0.1 * (before - plain_after)


def test_backward_in_chunks_gives_the_whole_loss_and_its_gradients():
    torch.manual_seed(0)
    body, head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 50)
    x, teacher = torch.randn(3, 7, 6), torch.randn(21, 50) * 3  # the KL is computed in float32
    whole = kl_full(head(body(x)), teacher.view(3, 7, 50))
    whole.backward()
    expected = [p.grad.clone() for p in (*body.parameters(), *head.parameters())]
    body.zero_grad(), head.zero_grad()
    loss = backward_in_chunks(body(x), head, lambda z, rows: kl_full(z, teacher[rows], reduction="sum"), chunk=4)
    assert float(loss.detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    got = [p.grad for p in (*body.parameters(), *head.parameters())]
    assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-8) for g, e in zip(got, expected))


class ScaledLogits(LlamaForCausalLM):
    """A Llama whose logits are scaled after the output layer (as Cohere's logit_scale does)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_split_head_only_where_the_logits_are_the_output_layer_of_the_last_hidden_state():
    teacher, _ = teacher_and_student()
    ids = token_ids(1, 16)
    body, head = split_head(teacher, ids)
    assert body is teacher.model and head is teacher.lm_head
    scaled = ScaledLogits(teacher.config).eval()
    scaled.load_state_dict(teacher.state_dict())
    assert split_head(scaled, ids) is None


@pytest.mark.parametrize("top_k", [0, 16])
def test_output_layer_by_chunks_heals_as_the_whole_logits(monkeypatch, top_k):
    teacher, student = teacher_and_student()
    ids = token_ids(3, 160)  # 160 positions: one whole chunk of 128 and a partial one
    config = HealConfig(steps=3, lr=1e-2, top_k=top_k)
    states, losses = [], []
    for chunks in (True, False):
        if not chunks:
            monkeypatch.setattr(rankwise.heal, "split_head", lambda model, ids: None)
        s = copy.deepcopy(student)
        losses.append(heal_(s, teacher, ids, config, progress=False).losses)
        states.append(s.state_dict())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6, rtol=0) for k in states[0])


def test_orthonormal_factors_keep_the_layer_and_stay_orthonormal():
    torch.manual_seed(0)
    layer = LowRankLinear.from_dense(torch.nn.Linear(24, 16), 6)
    x = torch.randn(5, 24)
    wrapper = OrthonormalLowRank(layer)
    torch.testing.assert_close(wrapper(x), layer(x), atol=1e-6, rtol=0)
    opt = torch.optim.AdamW(wrapper.parameters(), lr=0.05)
    eye = torch.eye(6)
    for _ in range(5):
        opt.zero_grad()
        (wrapper(x) ** 2).sum().backward()
        # the hooks left the Euclidean gradients' tangent projections (to float32 rounding of the Euclidean ones)
        u, vh, s = (t.detach().clone().requires_grad_() for t in (wrapper.u.weight, wrapper.vh.weight, wrapper.s))
        ((x @ vh.T * s) @ u.T + wrapper.bias.detach()).pow(2).sum().backward()
        for w, g, euclid in ((u, wrapper.u.weight.grad, u.grad), (vh.T, wrapper.vh.weight.grad.T, vh.grad.T)):
            tangent = tangent_projection(w.detach().double(), euclid.double())
            torch.testing.assert_close(g.double(), tangent, atol=1e-6 * float(euclid.norm()), rtol=0)
        opt.step()
        assert (wrapper.u.weight.T @ wrapper.u.weight - eye).abs().max() > 1e-3  # the step left the manifold
        wrapper.retract_()
        torch.testing.assert_close(wrapper.u.weight.T @ wrapper.u.weight, eye, atol=1e-6, rtol=0)
        torch.testing.assert_close(wrapper.vh.weight @ wrapper.vh.weight.T, eye, atol=1e-6, rtol=0)
    with torch.no_grad():
        y = wrapper(x)
        wrapper.fold_into(layer)
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)


def test_qr_retraction_is_the_q_with_a_positive_diagonal_and_fixes_orthonormal_matrices():
    torch.manual_seed(0)
    x = torch.randn(9, 4, dtype=torch.float64)
    q = qr_retraction(x)
    r = q.T @ x  # x = q r with r upper triangular, positive diagonal
    torch.testing.assert_close(q @ r, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.tril(r, -1), torch.zeros(4, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (torch.diagonal(r) > 0).all()
    torch.testing.assert_close(qr_retraction(q), q, atol=1e-12, rtol=0)
    g = torch.randn(9, 4, dtype=torch.float64)
    xi = tangent_projection(q, g)
    torch.testing.assert_close(q.T @ xi + xi.T @ q, torch.zeros(4, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(tangent_projection(q, xi), xi, atol=1e-12, rtol=0)  # a projection


def test_orthonormal_heal_folds_back_orthogonal_factors():
    """After an orthonormal heal each layer is U |s|^1/2 sign(s) times |s|^1/2 Vh: ``up``'s columns and ``down``'s
    rows are orthogonal, with squared norms |s| on both sides."""
    teacher, student = teacher_and_student()
    heal_(
        student, teacher, token_ids(8, 32), HealConfig(steps=8, batch_size=2, lr=1e-2, orthogonal=True), progress=False
    )
    layers = [m for m in student.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 14
    for m in layers:
        gu, gd = (w.double().T @ w.double() for w in (m.up.weight, m.down.weight.T))
        norms = torch.diagonal(gu)
        torch.testing.assert_close(torch.diagonal(gd), norms, atol=0, rtol=1e-6)
        scale = torch.outer(norms, norms).sqrt()
        torch.testing.assert_close(gu / scale, torch.eye(len(norms), dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(gd / scale, torch.eye(len(norms), dtype=torch.float64), atol=1e-6, rtol=0)


def test_orthonormal_context_restores_the_layers_after_an_error():
    _, student = teacher_and_student()
    ids = token_ids(2, 16)
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="stop"):
            with orthonormal_factors(student):
                torch.testing.assert_close(student(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
                raise RuntimeError("stop")
        assert torch.equal(student(input_ids=ids).logits, expected)


def test_top_k_kl_is_a_lower_bound_and_exact_on_the_whole_vocabulary():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7, 50), torch.randn(3, 7, 50) * 3
    logp = F.log_softmax(teacher, dim=-1)
    full = float(kl_full(student, teacher))
    by_hand = float((logp.exp() * (logp - F.log_softmax(student, dim=-1))).sum(-1).mean())
    assert full == pytest.approx(by_hand, rel=1e-6)
    v, i = logp.topk(50, dim=-1)
    assert float(kl_top_k(student, v, i)) == pytest.approx(full, rel=1e-5)
    bounds = [float(kl_top_k(student, *logp.topk(k, dim=-1))) for k in (1, 5, 20)]
    assert all(b < full for b in bounds) and bounds == sorted(bounds)


def test_teacher_top_k_matches_the_full_log_softmax():
    teacher, _ = teacher_and_student()
    ids = token_ids(2, 16)
    v, i = teacher_top_k(teacher, ids, 8, progress=False)
    with torch.no_grad():
        ref = F.log_softmax(teacher(input_ids=ids).logits, dim=-1).topk(8, dim=-1)
    assert torch.equal(i, ref.indices) and torch.allclose(v, ref.values, atol=1e-6, rtol=0)


def test_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 10, 0.2) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert lr_factor(10, 10, 0.2) == pytest.approx(0.0, abs=1e-12)


def test_cli_heal_matches_the_api_and_round_trips(compressed, llama_dir, tmp_path, capsys):
    digest = tree_digest(compressed)
    assert main(["heal", str(compressed), "--out", str(tmp_path / "h"), *HEAL, "--lr", "1e-2"]) == 0
    out = capsys.readouterr().out
    assert "healed 8 steps on 256 tokens" in out and f"saved {tmp_path / 'h'}" in out
    assert tree_digest(compressed) == digest
    healed = rankwise.load(tmp_path / "h")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "h").eval()
    ids = token_ids(2, 20)
    with torch.no_grad():
        logits = healed(input_ids=ids).logits
        assert torch.equal(stock(input_ids=ids).logits, logits)
        assert not torch.equal(rankwise.load(compressed)(input_ids=ids).logits, logits)
    # the same heal through the API, in memory: the saved weights are exactly the trained ones
    from rankwise.data import builtin_text, token_sequences
    from rankwise.io.models import load_model

    student = rankwise.load(compressed)
    teacher, tokenizer, _ = load_model(llama_dir)
    ids8 = token_sequences(tokenizer, builtin_text("calib"), 32, 8)
    heal_(student, teacher, ids8, HealConfig(lr=1e-2), progress=False)
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, logits)
    names = sorted(p.name for p in (tmp_path / "h").iterdir())
    assert {"rankwise_heal.json", "rankwise_report.json", "README.md", "tokenizer.json"} <= set(names)
    assert (tmp_path / "h" / "rankwise_report.json").read_bytes() == (compressed / "rankwise_report.json").read_bytes()


def test_compress_with_heal_steps(llama_dir, tmp_path, capsys):
    args = ["compress", str(llama_dir), "--keep", "0.6", *FAST]
    assert main([*args, "--out", str(tmp_path / "c"), "--heal-steps", "3"]) == 0
    assert "healed 3 steps on 96 tokens" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the unhealed scratch directory is gone
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    heal_checkpoint(
        tmp_path / "plain", tmp_path / "api", HealConfig(steps=3), ref=llama_dir, seq_len=32, progress=False
    )
    ids = token_ids(2, 20)
    with torch.no_grad():
        healed, api = (rankwise.load(tmp_path / name)(input_ids=ids).logits for name in ("c", "api"))
        assert torch.equal(healed, api)


def test_compress_heal_then_quantize(llama_dir, tmp_path, capsys):
    """``--bits`` with ``--heal-steps``: the healed factors quantized as ``compress --bits`` quantizes (GPTQ in the
    metric of each layer's inputs through the healed model); exact reloads, honest bytes, the same as the API."""
    from rankwise.heal_checkpoint import QUANT_CALIB_SEQS, quantize_healed_
    from rankwise.layers import QuantLinear, QuantLowRankLinear
    from rankwise.quantize import QuantizeConfig, module_bytes

    args = ["compress", str(llama_dir), "--keep", "0.6", *FAST, "--heal-steps", "3"]
    assert main([*args, "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "q")]) == 0
    text = capsys.readouterr().out
    assert "healed 3 steps on 96 tokens" in text and "4-bit GPTQ of the healed factors" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    model = rankwise.load(tmp_path / "q")
    layers = [m for n, m in model.named_modules() if re.fullmatch(r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", n)]
    assert len(layers) == 14 and all(isinstance(m, (QuantLinear, QuantLowRankLinear)) for m in layers)
    assert any(isinstance(m, QuantLowRankLinear) for m in layers)
    counted = int(re.search(r"whole model ([\d,]+) bytes", text).group(1).replace(",", ""))
    assert counted == module_bytes(model)
    ids = token_ids(2, 20)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(input_ids=ids).logits, logits)
    # the API: heal the same compression, then quantize_healed_ on the same healing sequences
    assert main([*args, "--out", str(tmp_path / "h")]) == 0
    healed = rankwise.load(tmp_path / "h")
    from rankwise.heal_checkpoint import healing_ids
    from rankwise.io.models import load_model

    seqs = healing_ids(load_model(llama_dir)[1], None, 32, None)  # what the heal read; GPTQ's inputs: the first 32
    dense_logits = healed(input_ids=ids).logits.detach()
    info = quantize_healed_(healed, seqs, QuantizeConfig(4, 32), progress=False)
    assert len(seqs) > QUANT_CALIB_SEQS and info["model_bytes"] == counted
    with torch.no_grad():
        assert torch.equal(healed(input_ids=ids).logits, logits)
    # 4-bit factors stay close to the healed model they quantize
    err = float((logits - dense_logits).norm() / dense_logits.norm())
    assert 0 < err < 0.05


def test_bad_inputs_are_one_line_and_write_nothing(compressed, llama_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "c")]
    run_bad(
        ["heal", str(llama_dir), *out],
        capsys,
        r"^rankwise heal: error: '.*llama' is not a rankwise directory: config.json has no "
        r"quantization_config with quant_method 'rankwise'$",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    run_bad(
        ["heal", str(empty), *out],
        capsys,
        r"^rankwise heal: error: '.*empty' is not a rankwise directory: it has no config.json$",
    )
    run_bad(
        ["heal", str(tmp_path / "nothing"), *out],
        capsys,
        r"^rankwise heal: error: rankwise directory '.*nothing' not found$",
    )
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one sequence.")
    run_bad(
        ["heal", str(compressed), *out, "--text", str(short)],
        capsys,
        r"^rankwise heal: error: healing text too short: need 512 tokens \(1 x 512\), got 7$",
    )
    run_bad(
        ["heal", str(compressed), *out, "--seq-len", "32", "--tokens", "16"],
        capsys,
        r"^rankwise heal: error: --tokens must be at least --seq-len \(32\), got 16$",
    )
    run_bad(
        ["heal", str(compressed), *out, "--lr", "0"],
        capsys,
        r"^rankwise heal: error: lr must be a number in \(0, 1\], got 0.0$",
    )
    run_bad(
        ["heal", str(compressed), *out, "--top-k", "-1"],
        capsys,
        r"^rankwise heal: error: top_k must be an int >= 0, got -1$",
    )
    no_card = tmp_path / "no_card"
    shutil.copytree(compressed, no_card)
    (no_card / "README.md").unlink()
    run_bad(
        ["heal", str(no_card), *out],
        capsys,
        r"^rankwise heal: error: '.*no_card' names no base model \(no base_model in its README.md model card\): "
        r"pass --ref MODEL, the dense model it was compressed from$",
    )
    run_bad(
        ["compress", str(llama_dir), *out, "--heal-steps", "0"],
        capsys,
        r"^rankwise compress: error: --heal-steps must be an int >= 1, got 0$",
    )
    run_bad(
        ["compress", str(llama_dir), *out, "--heal-steps", "2", "--resume"],
        capsys,
        r"^rankwise compress: error: --resume cannot be combined with --heal-steps "
        r"\(the unhealed model is not kept\)$",
    )
    run_bad(
        ["heal", str(compressed), *out, "--bits", "5"],
        capsys,
        r"^rankwise heal: error: --bits must be one of 2, 3, 4, 8, got 5$",
    )
    run_bad(
        ["heal", str(compressed), *out, "--group-size", "32"],
        capsys,
        r"^rankwise heal: error: --group-size needs --bits \(2, 3, 4 or 8\)$",
    )
    run_bad(
        ["compress", str(llama_dir), *out, "--bits-per-weight", "3", "--heal-steps", "2"],
        capsys,
        r"^rankwise compress: error: --heal-steps heals low-rank compressions; with quantization only --bits "
        r"\(the healed factors quantized\), not --method qlr, --bits-per-weight or --size$",
    )
    assert no_output(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep me")
    run_bad(
        ["heal", str(compressed), *out],
        capsys,
        r"^rankwise heal: error: output directory '.*c' already exists; pass --force \(force=True\) to "
        r"overwrite it$",
    )
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["mine.txt"]


def test_interrupted_heal_leaves_no_output(compressed, tmp_path, capsys, monkeypatch):
    digest = tree_digest(compressed)
    real, calls = torch.optim.AdamW.step, []

    def step_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    run_bad(
        ["heal", str(compressed), "--out", str(tmp_path / "c"), *HEAL],
        capsys,
        r"^rankwise heal: interrupted; no output was written$",
        after_loading=True,
    )
    assert len(calls) == 3 and no_output(tmp_path)
    assert tree_digest(compressed) == digest


def test_public_names():
    assert rankwise.heal_ is heal_ and rankwise.HealConfig is HealConfig
    assert {"HealConfig", "heal_"} <= set(rankwise.__all__)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^steps must be an int >= 1 or None, got 0$"):
        HealConfig(steps=0)
    with pytest.raises(ValueError, match=r"^warmup must be a number in \[0, 1\], got 1.5$"):
        HealConfig(warmup=1.5)
    with pytest.raises(ValueError, match=r"^max_grad_norm must be a number > 0, got 0$"):
        HealConfig(max_grad_norm=0)
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match=r"^healing needs at least batch_size=4 sequences, got 3$"):
        heal_(student, teacher, token_ids(3, 8), HealConfig(batch_size=4), progress=False)
