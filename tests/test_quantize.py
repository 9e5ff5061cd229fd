"""quantize_: quantized layers (dense, low-rank factors, Q + LR), their errors, checkpoints that reload exactly."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.calibrate import collect_stats
from rankwise.io.checkpoint import read_quantization_config
from rankwise.layers import LowRankLinear, QuantLinear, QuantLowRankLinear
from rankwise.quant import (
    gptq_rotated,
    hessian_error,
    quantize_with_correction,
    rotate_inputs,
    rotation_block,
    rotation_signs,
)
from rankwise.quantize import QuantizeConfig, layer_weight, module_bytes, quantize_, quantize_dense, quantize_factors
from rankwise.targets import find_targets

from _tiny_models import factorize_some, tiny_bert, tiny_llama, token_ids


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama()
    targets = find_targets(model)
    return model, collect_stats(model, targets, token_ids(4, 32), progress=False)


def _problem(rows=48, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X = torch.randn(256, cols, generator=g, dtype=torch.float64) @ mix
    return W, X.T @ X


def test_correction_at_full_rank_reproduces_w():
    W, H = _problem()
    q, L, R, err = quantize_with_correction(W, H, 2, 32, 48)
    approx = q.dequantize(torch.float64) + L.double() @ R.double()
    assert err == pytest.approx(hessian_error(W, approx, H), rel=1e-12)
    assert hessian_error(W, approx, H) < 1e-5 * hessian_error(W, torch.zeros_like(W), H)  # float16 factors only


def test_correction_error_falls_with_rank_and_refits():
    W, H = _problem(seed=1)
    errors = [quantize_with_correction(W, H, 2, 32, r, refits=1)[3] for r in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2]
    assert quantize_with_correction(W, H, 2, 32, 4, refits=3)[3] <= errors[1]


def test_factor_quantization_gptq_beats_rtn():
    W, H = _problem(seed=2)
    layer = LowRankLinear.from_dense(torch.nn.Linear(64, 48).double(), 16)
    with torch.no_grad():
        layer.down.weight.copy_(torch.randn(16, 64, dtype=torch.float64))
        layer.up.weight.copy_(W[:, :16])
    before = layer_weight(layer)
    quantized = {alg: quantize_factors(layer, H, QuantizeConfig(3, 32, algorithm=alg)) for alg in ("rtn", "gptq")}
    errors = {alg: hessian_error(before, q.dense_weight(), H) for alg, q in quantized.items()}
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_quant_linear_forward_is_dequantized_matmul():
    W, H = _problem(seed=3)
    linear = torch.nn.Linear(64, 48).double()
    with torch.no_grad():
        linear.weight.copy_(W)
    model = torch.nn.ModuleDict({"l": linear})
    (report,) = quantize_(model, {"l": QuantizeConfig(4, 32, correction_rank=3)}, _stats({"l": H}), progress=False)
    layer = model["l"]
    assert report.kind == "quant+lr" and layer.correction_rank == 3
    x = torch.randn(5, 64, dtype=torch.float64)
    Q = layer.quantized_weight(torch.float64)
    expected = x @ Q.T + x @ layer.correction_down.double().T @ layer.correction_up.double().T + linear.bias
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-12)
    relative = (hessian_error(W, layer.dense_weight(), H) / hessian_error(W, 0 * W, H)) ** 0.5
    assert report.error == pytest.approx(relative)


def _stats(grams):
    from rankwise.calibrate import CalibStats, InputStats

    return CalibStats({n: InputStats(G, torch.zeros(G.shape[0], dtype=torch.float64), 1) for n, G in grams.items()})


def test_quantize_save_reload_identical_logits_and_size(calibrated, tmp_path, capsys):
    dense, stats = calibrated
    model = tiny_llama()
    names = list(find_targets(model))
    factorize_some(model, {names[0]: 8, names[4]: 12})
    plan = {
        names[0]: QuantizeConfig(4, 32),
        names[4]: QuantizeConfig(8, 32, symmetric=True),
        names[1]: QuantizeConfig(3, 32, correction_rank=4),
        names[2]: QuantizeConfig(2, 64, symmetric=True),
        names[6]: QuantizeConfig(4, 64, algorithm="rtn"),
        names[3]: QuantizeConfig(3, 32, rotate=True),
    }
    reports = quantize_(model, plan, stats, progress=False)
    assert [r.kind for r in reports] == ["lowrank+quant", "lowrank+quant", "quant+lr", "quant", "quant", "quant"]
    assert model.get_submodule(names[3]).spec()["rotation"] == 32
    for r in reports:
        assert r.bytes == module_bytes(model.get_submodule(r.name))
        assert 0 < r.error < 1
    assert isinstance(model.get_submodule(names[0]), QuantLowRankLinear)
    assert isinstance(model.get_submodule(names[1]), QuantLinear)
    ids = token_ids(2, 16, seed=1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    rankwise.save(model, tmp_path / "q")
    qc = read_quantization_config(tmp_path / "q")
    assert qc["ranks"] == {}
    assert qc["modules"][names[0]] == {
        "layer": "quant_lowrank_linear",
        "in_features": 32,
        "out_features": 32,
        "rank": 8,
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
        "bias": False,
    }
    for reloaded in (rankwise.load(tmp_path / "q"), AutoModelForCausalLM.from_pretrained(tmp_path / "q")):
        assert reloaded.get_submodule(names[1]).scale.dtype == torch.float16
        assert reloaded.get_submodule(names[0]).up.codes.dtype == torch.uint8
        assert torch.equal(reloaded.get_submodule(names[3]).signs, model.get_submodule(names[3]).signs)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, expected)
    on_disk = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert abs(on_disk - module_bytes(model)) < 0.01 * module_bytes(model)
    from rankwise.cli import main

    assert main(["info", str(tmp_path / "q")]) == 0
    rows = dict(re.findall(r"^(model\.layers\.\S+) +\d+x\d+ +(\S+) ", capsys.readouterr().out, re.M))
    assert rows[names[3]] == "3b+h" and rows[names[1]] == "3b+r4" and rows[names[0]] == "8@4b"


def test_quant_layers_match_their_dense_equivalents():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    H = torch.eye(64, dtype=torch.float64)
    model = torch.nn.ModuleDict({"a": linear, "b": LowRankLinear.from_dense(torch.nn.Linear(64, 48), 10)})
    quantize_(
        model,
        {"a": QuantizeConfig(3, 32, correction_rank=2), "b": QuantizeConfig(4, 32)},
        _stats({"a": H, "b": H}),
        progress=False,
    )
    x = torch.randn(3, 64)
    for name in ("a", "b"):
        layer = model[name]
        assert torch.allclose(layer(x), layer.to_dense()(x), atol=1e-5)
    assert model["b"].up.bias is not None and model["b"].down.bias is None


def _hadamard_reference(block: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix from its closed form, H[i, j] = (-1)^popcount(i & j) / sqrt(block)."""
    i = torch.arange(block)
    bits = torch.tensor([bin(int(v)).count("1") for v in (i[:, None] & i[None, :]).flatten()]).view(block, block)
    return (1 - 2 * (bits % 2)).double() / block**0.5


def test_input_rotation_is_the_orthogonal_signed_block_hadamard():
    signs, n, block = rotation_signs(96, seed=3), 96, rotation_block(96)
    assert block == 32 and rotation_block(576) == 64 and rotation_block(1536) == 128 and rotation_block(7) == 1
    R = torch.diag(signs.double()) @ torch.block_diag(*[_hadamard_reference(block)] * (n // block))
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(rotate_inputs(x, signs, block), x @ R, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate_inputs(x, signs, block, transpose=True), x @ R.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(R.T @ R, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert set(signs.tolist()) == {-1, 1} and torch.equal(signs, rotation_signs(96, seed=3))


def test_rotated_gptq_error_is_the_rotated_problem_s_error_and_smaller_with_outliers():
    W, H = _problem(48, 128)
    W[:, :4] *= 12  # a few outlier input columns, as in transformer weights
    signs, block = rotation_signs(128), rotation_block(128)
    R = rotate_inputs(torch.eye(128, dtype=torch.float64), signs, block)
    q = gptq_rotated(W, H, 3, 64, signs, block)
    Q = q.dequantize(torch.float64)
    # the error of Q R^T in the layer's metric is that of Q against W R in the rotated metric (R orthogonal)
    assert hessian_error(W, Q @ R.T, H) == pytest.approx(hessian_error(W @ R, Q, R.T @ H @ R), rel=1e-9)
    layer = torch.nn.Linear(128, 48, bias=False, dtype=torch.float64)
    layer.weight.data.copy_(W)
    rotated = quantize_dense(layer, H, QuantizeConfig(3, 64, rotate=True))
    torch.testing.assert_close(rotated.dense_weight(), Q @ R.T, rtol=0, atol=1e-12)
    x = torch.randn(3, 128, dtype=torch.float64)
    torch.testing.assert_close(rotated(x), x @ rotated.dense_weight().T, rtol=0, atol=1e-12)
    plain = quantize_dense(layer, H, QuantizeConfig(3, 64))
    ratio = hessian_error(W, rotated.dense_weight(), H) / hessian_error(W, plain.dense_weight(), H)
    assert ratio < 0.5  # measured 0.402
    assert module_bytes(rotated) == module_bytes(plain) + 128  # the int8 signs


def test_bad_config():
    with pytest.raises(ValueError, match=r"^rotate needs algorithm='gptq' and no correction_rank$"):
        QuantizeConfig(rotate=True, algorithm="rtn")
    with pytest.raises(ValueError, match=r"^rotate needs algorithm='gptq' and no correction_rank$"):
        QuantizeConfig(rotate=True, correction_rank=4)
    with pytest.raises(ValueError, match=r"^rotate needs an even input width, got 33$"):
        quantize_dense(torch.nn.Linear(33, 4), torch.eye(33, dtype=torch.float64), QuantizeConfig(4, 32, rotate=True))
    spec = {"in_features": 96, "out_features": 4, "bits": 4, "group_size": 32, "correction_rank": 0, "rotation": 64}
    with pytest.raises(ValueError, match=r"^rotation must be a power of two dividing in_features=96, got 64$"):
        QuantLinear(spec)
    with pytest.raises(ValueError, match=r"^bits must be one of 2, 3, 4, 8, got 6$"):
        QuantizeConfig(bits=6)
    with pytest.raises(ValueError, match=r"^group_size must be one of 32, 64, 128, got 16$"):
        QuantizeConfig(group_size=16)
    with pytest.raises(ValueError, match=r"^algorithm must be one of gptq, rtn, got 'awq'$"):
        QuantizeConfig(algorithm="awq")
    with pytest.raises(ValueError, match=r"^correction_rank must be an int >= 0, got -1$"):
        QuantizeConfig(correction_rank=-1)


def test_low_rank_layer_takes_no_correction(calibrated):
    _, stats = calibrated
    model = tiny_llama()
    name = next(iter(find_targets(model)))
    factorize_some(model, {name: 8})
    with pytest.raises(ValueError, match="is low-rank already; correction_rank applies to dense layers only"):
        quantize_(model, {name: QuantizeConfig(3, 32, correction_rank=2)}, stats, progress=False)


def test_budget_spends_within_budget_and_more_bytes_lose_less(calibrated):
    import copy

    from rankwise.quant_budget import layer_candidates, quantize_to_budget_

    dense, stats = calibrated
    names = list(find_targets(dense))
    built = layer_candidates(dense, names, stats, progress=False)
    weights = sum(layer_weight(dense.get_submodule(n)).numel() for n in names)
    losses = []
    for bpw in (2.8, 3.4, 4.2):
        model = copy.deepcopy(dense)
        reports = quantize_to_budget_(model, names, stats, bits_per_weight=bpw, built=built, progress=False)
        assert 8 * sum(module_bytes(model.get_submodule(n)) for n in names) / weights <= bpw
        chosen = [next(c for c in built[r.name] if c.describe() == r.config) for r in reports]
        assert [c.bytes for c in chosen] == [r.bytes for r in reports]
        losses.append(sum(c.loss for c in chosen))
    assert losses[0] > losses[1] > losses[2]
    kinds = {c.kind for cands in built.values() for c in cands}
    assert kinds == {"quant", "quant+lr", "lowrank+quant"}


def test_budget_candidates_of_biased_layers_keep_the_model_dtype():
    """Every candidate of a float32 BERT's biased linears (the low-rank ones included) stores float32 biases and runs
    on float32 inputs, giving its dense equivalent's output."""
    from rankwise.quant_budget import layer_candidates

    model = tiny_bert()
    names = list(find_targets(model))
    stats = collect_stats(model, find_targets(model), token_ids(4, 32), fisher_seqs=2, progress=False)
    built = layer_candidates(model, names, stats, progress=False)
    x = torch.randn(3, model.config.hidden_size)
    for name in names[:2]:
        assert {c.kind for c in built[name]} == {"quant", "quant+lr", "lowrank+quant"}
        for c in built[name]:
            biases = [t for n, t in c.layer.named_parameters() if n.endswith("bias")]
            assert [b.dtype for b in biases] == [torch.float32]
            torch.testing.assert_close(
                c.layer(x).double(), x.double() @ c.layer.dense_weight().T + biases[0].double(), atol=1e-5, rtol=0
            )
