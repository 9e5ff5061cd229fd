"""Group quantization: RTN bounds, GPTQ against least-squares and exhaustive references, bit packing."""

import itertools

import pytest
import torch

from rankwise.quant import (
    check_bits,
    dequantize,
    gptq,
    group_params,
    hessian_error,
    pack_codes,
    quantize_column,
    quantize_rtn,
    stored_bytes,
    unpack_codes,
)


def _problem(rows: int, cols: int, seed: int = 0, tokens: int = 64):
    """A weight and a correlated input second moment H = X^T X (full rank)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix
    return W, X.T @ X


def _sequential_least_squares(W, H, scale, zero, bits):
    """GPTQ's definition: quantize column j, then set the later columns to their least-squares optimum
    given the quantized ones (solved directly), for j = 0, 1, ... ."""
    cur = W.clone()
    cols = W.shape[1]
    for j in range(cols):
        cur[:, j] = quantize_column(cur[:, j], scale, zero, bits)[1]
        C, F = slice(0, j + 1), slice(j + 1, cols)
        if j + 1 < cols:
            cur[:, F] = W[:, F] + (W[:, C] - cur[:, C]) @ torch.linalg.solve(H[F, F], H[C, F].T).T
    return cur


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_equals_sequential_least_squares(symmetric):
    W, H = _problem(5, 6)
    q = gptq(W, H, 2, 32, symmetric=symmetric, damp=0.0)
    scale, zero = group_params(W, 2, symmetric)  # one group: set from the original weights
    ref = _sequential_least_squares(W, H, scale, zero, 2)
    assert torch.allclose(q.dequantize(torch.float64), ref, rtol=0, atol=1e-10)


def test_gptq_between_exhaustive_optimum_and_rtn():
    W, H = _problem(4, 6, seed=1)
    bits = 2
    q = gptq(W, H, bits, 32, damp=0.0)
    rtn = quantize_rtn(W, bits, 32)
    assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero)
    # the objective splits over rows: search all 4^6 code vectors of each row with its scale and zero point
    grid = torch.tensor(list(itertools.product(range(2**bits), repeat=6)), dtype=torch.float64)
    best = 0.0
    for r in range(W.shape[0]):
        levels = (grid - float(rtn.zero[r, 0])) * float(rtn.scale[r, 0])
        D = W[r] - levels
        best += float(((D @ H) * D).sum(1).min())
    e_gptq, e_rtn = hessian_error(W, q.dequantize(torch.float64), H), hessian_error(W, rtn.dequantize(torch.float64), H)
    assert best <= e_gptq * (1 + 1e-12)
    assert e_gptq < e_rtn


def test_gptq_lazy_batches_match_one_block():
    W, H = _problem(8, 96, seed=2, tokens=200)
    one = gptq(W, H, 3, 32, block_size=96)
    lazy = gptq(W, H, 3, 32, block_size=32)
    assert torch.equal(one.codes, lazy.codes) and torch.equal(one.scale, lazy.scale)


def test_gptq_beats_rtn_on_real_scale_layer():
    W, H = _problem(64, 256, seed=3, tokens=512)
    for bits in (2, 3, 4):
        e_gptq = hessian_error(W, gptq(W, H, bits, 64).dequantize(torch.float64), H)
        e_rtn = hessian_error(W, quantize_rtn(W, bits, 64).dequantize(torch.float64), H)
        assert e_gptq < 0.7 * e_rtn


def test_gptq_dead_inputs_are_zeroed():
    W, H = _problem(4, 40, seed=4)
    H[:, 3] = 0
    H[3, :] = 0
    q = gptq(W, H, 4, 32).dequantize(torch.float64)
    assert torch.all(q[:, 3].abs() <= float(gptq(W, H, 4, 32).scale.max()) / 2 + 1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_within_half_step(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(7, 100, generator=g, dtype=torch.float64)  # 100 columns: a short last group
    q = quantize_rtn(W, bits, 32, symmetric=symmetric)
    assert q.scale.shape == (7, 4) and q.codes.shape == (7, 100)
    assert int(q.codes.max()) <= 2**bits - 1
    step = q.scale.double().repeat_interleave(32, 1)[:, :100]
    # scales are rounded to float16: the range may overshoot by that rounding
    assert torch.all((W - q.dequantize(torch.float64)).abs() <= step * (0.5 + 2**-10) + 1e-12)


def test_rtn_asymmetric_represents_zero_and_endpoints():
    W = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-3.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    q = quantize_rtn(W, 2, 32)
    assert torch.equal(q.dequantize(torch.float64), W)


def test_dequantize_formula():
    codes = torch.tensor([[0, 3, 1]], dtype=torch.uint8)
    scale = torch.tensor([[0.5]], dtype=torch.float16)
    assert dequantize(codes, scale, None, 2, 32).tolist() == [[-0.75, 0.75, -0.25]]
    assert dequantize(codes, scale, torch.tensor([[1]], dtype=torch.uint8), 2, 32).tolist() == [[-0.5, 1.0, 0.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(0)
    for cols in (1, 7, 8, 33):
        codes = torch.randint(0, 2**bits, (5, cols), generator=g).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols * bits // 8))
        assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_pack_layout():
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    assert pack_codes(torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.uint8), 3).tolist() == [[7, 0, 5 << 5]]
    assert pack_codes(torch.tensor([[200]], dtype=torch.uint8), 8).tolist() == [[200]]


def test_stored_bytes():
    q = quantize_rtn(torch.randn(6, 100), 3, 64)
    assert q.nbytes == 6 * (38 + 2 * 3) == stored_bytes(6, 100, 3, 64, False)
    assert stored_bytes(6, 100, 4, 32, True) == 6 * (50 + 4 * 2)


def test_bad_bits():
    with pytest.raises(ValueError, match=r"^bits must be one of 2, 3, 4, 8, got 5$"):
        check_bits(5)
    with pytest.raises(ValueError, match=r"^bits must be one of 2, 3, 4, 8, got 5$"):
        quantize_rtn(torch.randn(2, 4), 5, 32)
