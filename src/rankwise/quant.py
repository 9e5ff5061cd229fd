"""Group-wise weight quantization: round-to-nearest, GPTQ error feedback, bit packing, error in the Hessian metric.

A weight matrix ``W`` (out, in) is split along its input dimension into groups of ``group_size`` columns
(the last group may be shorter); each (row, group) gets a float16 scale and, when asymmetric, a uint8
zero point. Codes are unsigned ``bits``-bit integers ``q`` in ``[0, 2**bits - 1]``:

- asymmetric: ``w = scale * (q - zero)``, the range ``[min(w, 0), max(w, 0)]`` mapped onto the codes
  (so that 0 is representable, as in GPTQ's reference quantizer);
- symmetric: ``w = scale * (q - (2**bits - 1) / 2)``, levels symmetric about 0 covering ``[-amax, amax]``
  (no zero point is stored; 0 itself is not a level, which matters little at 4 bits and up).

Packing (:func:`pack_codes`): each row's codes are concatenated as a little-endian bit stream, ``bits``
bits per code, the first code in the lowest bits of the first byte, and the row padded to whole bytes:
8-bit codes are one byte each, 4-bit codes two per byte (low nibble first), 2-bit codes four per byte,
3-bit codes eight per three bytes. A packed row takes ``ceil(in * bits / 8)`` bytes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)


def check_bits(bits: object, what: str = "bits") -> int:
    """``bits`` if it is a supported width, else ``ValueError`` naming the accepted ones."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{what} must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    return int(bits)


def check_group_size(group_size: object) -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    return int(group_size)


@dataclass(frozen=True)
class QuantizedMatrix:
    """A group-quantized matrix of shape (rows, cols).

    codes : uint8, shape (rows, cols), unpacked codes in ``[0, 2**bits - 1]``.
    scale : float16, shape (rows, groups); zero : uint8, shape (rows, groups), or None (symmetric).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes, float16 scales, uint8 zero points."""
        return stored_bytes(*self.shape, self.bits, self.group_size, self.symmetric)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.bits, self.group_size, dtype)


def stored_bytes(rows: int, cols: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of a packed (rows, cols) matrix with its scales (2 bytes) and zero points (1 byte) per group."""
    groups = math.ceil(cols / group_size)
    return rows * (math.ceil(cols * bits / 8) + groups * (2 if symmetric else 3))


def _expand(per_group: Tensor, cols: int, group_size: int) -> Tensor:
    """(rows, groups) -> (rows, cols): each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :cols]


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``scale * (codes - zero)`` group-wise, shape of ``codes``; the symmetric offset is ``(2**bits - 1) / 2``."""
    cols = codes.shape[1]
    offset = (2**bits - 1) / 2 if zero is None else _expand(zero, cols, group_size).to(dtype)
    return (codes.to(dtype) - offset) * _expand(scale, cols, group_size).to(dtype)


def group_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Scale (float16-rounded) and zero point of one group ``w`` (rows, g): ``(scale, zero)`` each shape (rows,)."""
    maxq = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(1)
        scale = 2 * amax / maxq
        zero = None
    else:
        lo, hi = w.amin(1).clamp_max(0), w.amax(1).clamp_min(0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float16)
    # a scale that underflows float16 to 0 would make every code of its group meaningless
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(torch.float16).tiny))
    if not symmetric:
        zero = torch.round(-lo / scale.to(w.dtype)).clamp(0, maxq).to(torch.uint8)
    return scale, zero


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> tuple[Tensor, Tensor]:
    """Codes (uint8) and dequantized values of columns ``w`` (rows,) or (rows, k) under per-row ``scale``/``zero``."""
    maxq = 2**bits - 1
    s = scale.to(w.dtype)
    off = torch.full_like(s, maxq / 2) if zero is None else zero.to(w.dtype)
    if w.ndim == 2:
        s, off = s[:, None], off[:, None]
    q = torch.clamp(torch.round(w / s + off), 0, maxq)
    return q.to(torch.uint8), (q - off) * s


def quantize_rtn(W: Tensor, bits: int, group_size: int, *, symmetric: bool = False) -> QuantizedMatrix:
    """Round each weight to the nearest level of its group (no error feedback).

    Parameters
    ----------
    W : Tensor, shape (rows, cols)
    bits : 2, 3, 4 or 8; group_size : columns per group (the last group may be shorter).
    """
    check_bits(bits)
    W = W.detach().to(torch.float64)
    rows, cols = W.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    for a in range(0, cols, group_size):
        scale, zero = group_params(W[:, a : a + group_size], bits, symmetric)
        codes[:, a : a + group_size] = quantize_column(W[:, a : a + group_size], scale, zero, bits)[0]
        scales.append(scale)
        zeros.append(zero)
    zero = None if symmetric else torch.stack(zeros, 1)
    return QuantizedMatrix(codes, torch.stack(scales, 1), zero, bits, group_size)


def gptq(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedMatrix:
    """GPTQ: quantize the columns of ``W`` in order, each rounding error fed back into the columns not yet
    quantized so that ``tr((W - Q) H (W - Q)^T)`` stays small.

    Quantizing column ``j`` with error ``e = (w_j - q_j) / U[j, j]`` and updating the later columns by
    ``-e U[j, j:]``, where ``U`` is the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``), is the
    optimal brain surgeon update: the later columns take their least-squares optimum given the
    quantized ones. Updates inside a block of ``block_size`` columns are applied column by column; the
    columns after the block receive the block's accumulated errors in one matrix product (lazy batch
    updates). A group's scale and zero point are set from its error-updated weights when its first
    column is reached (group boundaries fall inside blocks: ``block_size`` is a multiple of the group).

    Parameters
    ----------
    W : Tensor, shape (rows, cols)
    H : Tensor, shape (cols, cols), the input second moment ``X^T X`` (any positive scale).
    damp : ridge ``damp * mean(diag H)`` added to ``H`` (dead inputs, whose diagonal is 0, get weight 0).

    References
    ----------
    E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, "GPTQ: Accurate post-training quantization for
    generative pre-trained transformers", ICLR 2023, arXiv:2210.17323.
    B. Hassibi, D. G. Stork, "Second order derivatives for network pruning: Optimal brain surgeon", NeurIPS 1992.
    """
    check_bits(bits)
    W = W.detach().to(torch.float64).clone()
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) to match W's {cols} columns, got {tuple(H.shape)}")
    block_size = max(group_size, block_size // group_size * group_size)
    U = inverse_hessian_cholesky(H, damp, W)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    for a in range(0, cols, block_size):
        b = min(a + block_size, cols)
        Wb, Ub = W[:, a:b], U[a:b, a:b]
        err = torch.empty_like(Wb)
        for j in range(b - a):
            if (a + j) % group_size == 0:
                scale, zero = group_params(Wb[:, j : j + group_size], bits, symmetric)
                scales.append(scale)
                zeros.append(zero)
            codes[:, a + j], q = quantize_column(Wb[:, j], scale, zero, bits)
            err[:, j] = (Wb[:, j] - q) / Ub[j, j]
            Wb[:, j:] -= err[:, j : j + 1] * Ub[j : j + 1, j:]
        W[:, b:] -= err @ U[a:b, b:]
    zero = None if symmetric else torch.stack(zeros, 1)
    return QuantizedMatrix(codes, torch.stack(scales, 1), zero, bits, group_size)


def inverse_hessian_cholesky(H: Tensor, damp: float, W: Tensor) -> Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^{-1}``, float64; zeroes dead columns of ``W`` in place."""
    H = H.detach().to(torch.float64).clone()
    H = (H + H.T) / 2
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    mean = float(torch.diagonal(H).mean())
    H += max(damp, 0.0) * mean * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"H is not positive definite even with damping {damp}; pass a larger damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def hessian_error(W: Tensor, What: Tensor, H: Tensor) -> float:
    """``tr((W - What) H (W - What)^T)``: the summed squared output error on inputs with ``X^T X = H``."""
    D = W.detach().to(torch.float64) - What.detach().to(torch.float64)
    return float(((D @ H.to(torch.float64)) * D).sum())


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack (rows, cols) codes into (rows, ceil(cols * bits / 8)) uint8, little-endian bit stream per row."""
    check_bits(bits)
    rows, cols = codes.shape
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.to(torch.uint8)[..., None] >> shifts) & 1).reshape(rows, cols * bits)
    nbytes = math.ceil(cols * bits / 8)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - cols * bits)).reshape(rows, nbytes, 8)
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (rows, cols) uint8 codes."""
    check_bits(bits)
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed[..., None] >> shifts) & 1).reshape(rows, -1)[:, : cols * bits].reshape(rows, cols, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def rotation_block(n: int) -> int:
    """The Hadamard block size for ``n`` inputs: the largest power of two dividing ``n``, at most 128 (1: none)."""
    return min(128, n & -n)


@functools.lru_cache(maxsize=16)
def _hadamard(block: int, device: str, dtype: torch.dtype) -> Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < block:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(block)).to(device=device, dtype=dtype)


def rotation_signs(n: int, seed: int = 0) -> Tensor:
    """Seeded random signs (int8, +-1) of the input rotation of an ``n``-input layer."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)


def rotate_inputs(x: Tensor, signs: Tensor, block: int, *, transpose: bool = False) -> Tensor:
    """``x R`` (``transpose``: ``x R^T``) for ``R = diag(signs) blockdiag(H, ..., H)``, ``H`` the orthonormal
    (symmetric) Hadamard matrix of size ``block``, so ``R`` is orthogonal; ``x`` of shape (..., n), in
    ``O(n block)`` per row without forming ``R``."""
    n = x.shape[-1]
    H = _hadamard(block, str(x.device), x.dtype)
    s = signs.to(x.dtype)
    if transpose:
        return (x.reshape(*x.shape[:-1], n // block, block) @ H).reshape(x.shape) * s
    return ((x * s).reshape(*x.shape[:-1], n // block, block) @ H).reshape(x.shape)


def gptq_rotated(W: Tensor, H: Tensor, bits: int, group_size: int, signs: Tensor, block: int, **kw) -> QuantizedMatrix:
    """GPTQ of ``W R`` in the metric ``R^T H R`` (incoherence processing): the layer applies ``Q R^T``.

    References
    ----------
    J. Chee, Y. Cai, V. Kuleshov, C. De Sa, "QuIP: 2-bit quantization of large language models with guarantees",
    NeurIPS 2023, arXiv:2307.13304 (incoherence processing); A. Tseng et al., "QuIP#", ICML 2024,
    arXiv:2402.04396 (randomized Hadamard transforms).
    """
    W, H = W.detach().to(torch.float64), H.to(torch.float64)
    HR = rotate_inputs(H, signs, block)  # H R; its transpose R^T H (H symmetric), rotated again: R^T H R
    return gptq(rotate_inputs(W, signs, block), rotate_inputs(HR.T, signs, block), bits, group_size, **kw)


def quantize_with_correction(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int,
    rank: int,
    *,
    symmetric: bool = False,
    refits: int = 2,
    damp: float = 0.01,
    whitening: Tensor | None = None,
) -> tuple[QuantizedMatrix, Tensor, Tensor, float]:
    """``W ≈ Q + L R``: a GPTQ-quantized ``Q`` and a rank-``rank`` correction fitted to its error in the
    metric of ``H`` (the whitened SVD of ``W - Q``), alternated ``refits`` times: ``Q`` is re-quantized from
    ``W - L R`` and the correction refitted. Returns ``(Q, L (rows, rank), R (rank, cols), error)`` of the
    iterate with the smallest :func:`hessian_error`, so extra refits never make it worse. ``whitening``:
    :func:`rankwise.formats.svd.whitening_factor` of ``H`` when the caller has it already.

    References
    ----------
    C. Zhang et al., "LQER: Low-rank quantization error reconstruction for LLMs", ICML 2024, arXiv:2402.02446.
    R. Saha et al., "Compressing large language models using low rank and low precision decomposition"
    (CALDERA), NeurIPS 2024, arXiv:2405.18886.
    """
    from .formats.svd import whitened_svd, whitening_factor

    W64 = W.detach().to(torch.float64)
    M = whitening_factor(H) if whitening is None else whitening
    LR = torch.zeros_like(W64)
    best = None
    for _ in range(max(refits, 1)):
        q = gptq(W64 - LR, H, bits, group_size, symmetric=symmetric, damp=damp)
        Q = q.dequantize(torch.float64)
        f = whitened_svd(W64 - Q, rank, whitening=M)
        root = f.S.to(torch.float64).sqrt()
        L, R = (f.U * root).to(torch.float16), (root[:, None] * f.Vh).to(torch.float16)
        LR = L.double() @ R.double()  # the correction as stored: float16 factors
        err = hessian_error(W64, Q + LR, H)
        if best is None or err < best[3]:
            best = (q, L, R, err)
    return best
