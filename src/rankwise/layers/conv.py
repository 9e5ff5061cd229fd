"""Factorized Conv2d layers (Tucker-2, CP, SVD of the reshaped kernel) that convolve with the factors.

Each layer is a short chain of ``nn.Conv2d`` children, so it fine-tunes, casts and moves like any model,
never rebuilds the dense kernel in ``forward``, and the chain's convolutions are what the dense layer's
stride, padding (any mode), dilation and bias become:

- ``tucker_conv2d``: W ≈ core ×_0 U_out ×_1 U_in: 1x1 (in -> r_in), kxk core (r_in -> r_out), 1x1
  (r_out -> out, bias) (Kim et al. 2016);
- ``cp_conv2d``: W ≈ sum_r a_r ∘ b_r ∘ c_r ∘ d_r: 1x1 (in -> R), depthwise kx1, depthwise 1xk,
  1x1 (R -> out, bias) (Lebedev et al. 2015);
- ``svd_conv2d``: the (out, in/groups * kh * kw) reshape ≈ U S Vh per group: kxk (in -> groups * r),
  1x1 grouped (-> out, bias) (Zhang et al. 2016).

References
----------
Y.-D. Kim et al., "Compression of deep convolutional neural networks for fast and low power mobile
applications", ICLR 2016, arXiv:1511.06530.
V. Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned CP-decomposition",
ICLR 2015, arXiv:1412.6553.
X. Zhang et al., "Accelerating very deep convolutional networks for classification and detection",
TPAMI 38(10), 2016, arXiv:1505.06798.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.cp import CP, cp_als
from ..formats.svd import SVD, svd_rank, truncated_svd
from ..formats.tucker import Tucker, tucker_hooi, tucker_ranks
from .registry import LAYERS

_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def _check_conv(conv: nn.Module, layer: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{layer}.from_dense expects an nn.Conv2d, got {type(conv).__name__}")


def _reject_groups(conv: nn.Conv2d, layer: str, fmt: str) -> None:
    if conv.groups != 1:
        raise ValueError(
            f"{layer}: format {fmt!r} cannot express a grouped convolution (groups={conv.groups}); "
            "accepted: groups=1, or format 'svd' (factorizes each group)"
        )


def _conv(
    cin,
    cout,
    kernel,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    bias=False,
    padding_mode="zeros",
    device=None,
    dtype=None,
) -> nn.Conv2d:
    return nn.Conv2d(
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
        device=device,
        dtype=dtype,
    )


class _FactorizedConv2d(nn.Module):
    """What the three factorized convolutions share: the dense layer's geometry, ``spec``, ``to_dense``."""

    layer_type = ""

    def __init__(self, geometry: dict, bias: bool):
        super().__init__()
        for key in _GEOMETRY:
            value = geometry[key]
            setattr(self, key, tuple(value) if isinstance(value, list) else value)
        self.has_bias = bias

    @staticmethod
    def geometry(conv: nn.Conv2d) -> dict:
        return {key: getattr(conv, key) for key in _GEOMETRY}

    def _rank_spec(self) -> dict:
        raise NotImplementedError

    def spec(self) -> dict:
        """Everything needed to rebuild this layer empty (JSON-serializable)."""
        geometry = {k: list(v) if isinstance(v, tuple) else v for k, v in self.geometry(self).items()}
        return {"layer": self.layer_type, **geometry, "bias": self.has_bias, **self._rank_spec()}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        """The dense kernel the factors represent, shape (out, in/groups, kh, kw), in float64 (for to_dense)."""
        raise NotImplementedError

    def to_dense(self) -> nn.Conv2d:
        """The equivalent nn.Conv2d (kernel from the factors, in float64, cast back)."""
        last = list(self.parameters())[-1]
        dense = _conv(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.has_bias,
            padding_mode=self.padding_mode,
            device=last.device,
            dtype=last.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().to(last.dtype))
            if self.has_bias:
                dense.bias.copy_(self.last.bias)
        return dense

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{k}={v}" for k, v in self._rank_spec().items())
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, {ranks}"


@LAYERS.register("tucker_conv2d", paper="https://arxiv.org/abs/1511.06530")
class TuckerConv2d(_FactorizedConv2d):
    """Tucker-2 convolution: ``first`` 1x1 (in -> r_in), ``core`` kxk (r_in -> r_out), ``last`` 1x1 (+ bias)."""

    layer_type = "tucker_conv2d"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__(spec, spec["bias"])
        r_out, r_in = spec["ranks"]
        self.ranks = (r_out, r_in)
        self.first = _conv(self.in_channels, r_in, 1, device=device, dtype=dtype)
        self.core = _conv(
            r_in,
            r_out,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.last = _conv(r_out, self.out_channels, 1, bias=self.has_bias, device=device, dtype=dtype)

    def _rank_spec(self) -> dict:
        return {"ranks": list(self.ranks)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, tucker: Tucker) -> TuckerConv2d:
        """Build from a Tucker of ``conv.weight`` over modes (0, 1): factors (out, r_out) and (in, r_in)."""
        if tucker.modes != (0, 1) or tuple(tucker.shape) != tuple(conv.weight.shape):
            raise ValueError(
                f"tucker_conv2d needs a Tucker-2 over modes (0, 1) of shape {tuple(conv.weight.shape)}, "
                f"got modes {tucker.modes} of shape {tuple(tucker.shape)}"
            )
        dt, dev = conv.weight.dtype, conv.weight.device
        spec = {**cls.geometry(conv), "bias": conv.bias is not None, "ranks": tucker.ranks}
        layer = cls(spec, device=dev, dtype=dt)
        u_out, u_in = tucker.factors
        with torch.no_grad():
            layer.first.weight.copy_(u_in.T[:, :, None, None].to(dev, dt))
            layer.core.weight.copy_(tucker.core.to(dev, dt))
            layer.last.weight.copy_(u_out[:, :, None, None].to(dev, dt))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank=None) -> TuckerConv2d:
        """Data-free Tucker-2 (HOOI) of ``conv``'s kernel; ``rank`` int, (r_out, r_in), float fraction or None."""
        _check_conv(conv, "tucker_conv2d")
        _reject_groups(conv, "tucker_conv2d", "tucker")
        W = conv.weight.detach().to(torch.float64)
        ranks = tucker_conv_ranks(conv, rank)
        return cls.from_factors(conv, tucker_hooi(W, ranks, modes=(0, 1)))

    def dense_weight(self) -> torch.Tensor:
        u_in = self.first.weight.to(torch.float64)[:, :, 0, 0]
        u_out = self.last.weight.to(torch.float64)[:, :, 0, 0]
        return torch.einsum("oa,abhw,bi->oihw", u_out, self.core.weight.to(torch.float64), u_in)


def tucker_conv_ranks(conv: nn.Conv2d, rank) -> tuple[int, int]:
    """(r_out, r_in) for a Tucker-2 of ``conv``'s kernel: None (full), int, pair or float fraction."""
    shape = tuple(conv.weight.shape)
    out, cin, kh, kw = shape
    try:
        return tucker_ranks(shape, rank, (0, 1))
    except ValueError as exc:
        raise ValueError(f"tucker_conv2d {out}x{cin}x{kh}x{kw}: {exc}") from None


@LAYERS.register("cp_conv2d", paper="https://arxiv.org/abs/1412.6553")
class CPConv2d(_FactorizedConv2d):
    """CP convolution: ``first`` 1x1 (in -> R), ``vertical`` depthwise kx1, ``horizontal`` depthwise 1xk,
    ``last`` 1x1 (R -> out, + bias)."""

    layer_type = "cp_conv2d"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__(spec, spec["bias"])
        self.rank = r = int(spec["rank"])
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        pad = self.padding if isinstance(self.padding, str) else None
        ph, pw = (0, 0) if pad else self.padding
        self.first = _conv(self.in_channels, r, 1, device=device, dtype=dtype)
        self.vertical = _conv(
            r,
            r,
            (kh, 1),
            stride=(sh, 1),
            padding=pad or (ph, 0),
            dilation=(dh, 1),
            groups=r,
            padding_mode=self.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.horizontal = _conv(
            r,
            r,
            (1, kw),
            stride=(1, sw),
            padding=pad or (0, pw),
            dilation=(1, dw),
            groups=r,
            padding_mode=self.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.last = _conv(r, self.out_channels, 1, bias=self.has_bias, device=device, dtype=dtype)

    def _rank_spec(self) -> dict:
        return {"rank": self.rank}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, cp: CP) -> CPConv2d:
        """Build from a CP of ``conv.weight`` (4 factors: out, in, kh, kw); the weights go to ``last``."""
        if tuple(cp.shape) != tuple(conv.weight.shape):
            raise ValueError(f"cp_conv2d needs a CP of shape {tuple(conv.weight.shape)}, got {tuple(cp.shape)}")
        dt, dev = conv.weight.dtype, conv.weight.device
        layer = cls({**cls.geometry(conv), "bias": conv.bias is not None, "rank": cp.rank}, device=dev, dtype=dt)
        a_out, a_in, a_h, a_w = cp.factors
        with torch.no_grad():
            layer.first.weight.copy_(a_in.T[:, :, None, None].to(dev, dt))
            layer.vertical.weight.copy_(a_h.T[:, None, :, None].to(dev, dt))
            layer.horizontal.weight.copy_(a_w.T[:, None, None, :].to(dev, dt))
            layer.last.weight.copy_((a_out * cp.weights)[:, :, None, None].to(dev, dt))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank=None, *, seed: int = 0, n_iter_max: int = 100) -> CPConv2d:
        """Data-free CP (ALS) of ``conv``'s kernel; ``rank`` int or float fraction (required: CP has no full rank)."""
        _check_conv(conv, "cp_conv2d")
        _reject_groups(conv, "cp_conv2d", "cp")
        if rank is None:
            raise ValueError("cp_conv2d: format 'cp' needs a rank; accepted: an int >= 1 or a float in (0, 1]")
        W = conv.weight.detach().to(torch.float64)
        try:
            cp = cp_als(W, rank, seed=seed, n_iter_max=n_iter_max)
        except ValueError as exc:
            raise ValueError(f"cp_conv2d {'x'.join(map(str, W.shape))}: {exc}") from None
        return cls.from_factors(conv, cp)

    def dense_weight(self) -> torch.Tensor:
        def f(conv: nn.Conv2d) -> torch.Tensor:
            return conv.weight.to(torch.float64)

        return torch.einsum(
            "or,ri,rh,rw->oihw",
            f(self.last)[:, :, 0, 0],
            f(self.first)[:, :, 0, 0],
            f(self.vertical)[:, 0, :, 0],
            f(self.horizontal)[:, 0, 0, :],
        )


@LAYERS.register("svd_conv2d", paper="https://arxiv.org/abs/1505.06798")
class SVDConv2d(_FactorizedConv2d):
    """SVD of the (out, in/groups * kh * kw) kernel per group: ``first`` kxk (in -> groups * r), ``last``
    grouped 1x1 (-> out, + bias)."""

    layer_type = "svd_conv2d"

    def __init__(self, spec: dict, device=None, dtype=None):
        super().__init__(spec, spec["bias"])
        self.rank = r = int(spec["rank"])
        g = self.groups
        self.first = _conv(
            self.in_channels,
            g * r,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=g,
            padding_mode=self.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.last = _conv(g * r, self.out_channels, 1, groups=g, bias=self.has_bias, device=device, dtype=dtype)

    def _rank_spec(self) -> dict:
        return {"rank": self.rank}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, svds: list[SVD]) -> SVDConv2d:
        """Build from one SVD per group of the group's (out/groups, in/groups * kh * kw) kernel matrix."""
        if len(svds) != conv.groups or len({s.rank for s in svds}) != 1:
            raise ValueError(f"svd_conv2d needs {conv.groups} SVDs (one per group) of one rank, got {len(svds)}")
        dt, dev = conv.weight.dtype, conv.weight.device
        layer = cls({**cls.geometry(conv), "bias": conv.bias is not None, "rank": svds[0].rank}, device=dev, dtype=dt)
        kernel = conv.weight.shape[1:]
        with torch.no_grad():
            root = [s.S.to(torch.float64).sqrt() for s in svds]
            first = torch.cat(
                [(s.Vh.to(torch.float64) * q[:, None]).reshape(s.rank, *kernel) for s, q in zip(svds, root)]
            )
            last = torch.cat([s.U.to(torch.float64) * q for s, q in zip(svds, root)])
            layer.first.weight.copy_(first.to(dev, dt))
            layer.last.weight.copy_(last[:, :, None, None].to(dev, dt))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank=None) -> SVDConv2d:
        """Data-free truncated SVD per group; ``rank`` int (per group), float fraction or None (full)."""
        _check_conv(conv, "svd_conv2d")
        return cls.from_factors(conv, [truncated_svd(W, r) for W, r in _group_matrices(conv, rank)])

    def dense_weight(self) -> torch.Tensor:
        g, r = self.groups, self.rank
        first = self.first.weight.to(torch.float64).reshape(g, r, -1)
        last = self.last.weight.to(torch.float64)[:, :, 0, 0].reshape(g, -1, r)
        return (last @ first).reshape(self.out_channels, *self.first.weight.shape[1:])


def _group_matrices(conv: nn.Conv2d, rank) -> list[tuple[torch.Tensor, int]]:
    """Each group's (out/groups, in/groups * kh * kw) kernel matrix in float64, with its resolved rank."""
    W = conv.weight.detach().to(torch.float64)
    g = conv.groups
    mats = list(W.reshape(g, W.shape[0] // g, -1))
    shape = tuple(mats[0].shape)
    try:
        r = svd_rank(shape, rank)
    except ValueError as exc:
        raise ValueError(f"svd_conv2d {'x'.join(map(str, W.shape))} (groups={g}): {exc}") from None
    return [(m, r) for m in mats]


CONV_FORMATS = {"tucker": TuckerConv2d, "cp": CPConv2d, "svd": SVDConv2d}


def conv_from_dense(conv: nn.Conv2d, format: str = "tucker", rank=None, **options) -> _FactorizedConv2d:
    """Factorize ``conv`` data-free in ``format`` ('tucker', 'cp' or 'svd') at ``rank``."""
    if format not in CONV_FORMATS:
        raise ValueError(f"format for a Conv2d must be one of {', '.join(sorted(CONV_FORMATS))}, got {format!r}")
    return CONV_FORMATS[format].from_dense(conv, rank, **options)


def conv_output(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv``'s forward with another kernel (for tests and error predictions)."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
