"""Calibration statistics for any nn.Module: input second moments of Conv2d patches / Linear inputs, token counts
of Embeddings, and output loss-gradient second moments, from the model's own inputs (images or a callable).

Units are per calibration example, so that the loss estimates of different layers add up: ``gram`` is the sum
over an example's positions of ``p p^T`` (``p`` a conv patch, shape (in/groups * kh * kw,), or a linear input),
averaged over examples; ``grad_sq`` is the mean over examples and positions of ``(dL/dy)^2`` per output
channel; ``sizes`` the mean number of positions per example at which a layer runs (to price options in MACs).
Then ``||diag(sqrt(grad_sq)) (W - W') L||_F^2`` with ``L L^T = gram`` estimates the loss increase of replacing
``W`` by ``W'`` (a Kronecker-factored Fisher, as for Linear layers in :mod:`rankwise.compress`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import _bar

Runner = Callable[[nn.Module, int], torch.Tensor]


@dataclass
class ModuleStats:
    """Statistics of one target layer (see the module docstring for their units)."""

    gram: torch.Tensor | None = None  # (n, n) float64; None for embeddings
    counts: torch.Tensor | None = None  # (num_embeddings,) float64 row counts, embeddings only
    grad_sq: torch.Tensor | None = None  # (out,) float64 sum of (dL/dy)^2 until finished
    grad_count: int = 0
    examples: int = 0
    # (3,) float64 positions per example: a conv's input H*W, output Ho*Wo and Ho*W (CP's vertical conv);
    # a Linear's / Embedding's rows (tokens), three times
    sizes: torch.Tensor | None = None

    def finish(self) -> ModuleStats:
        n = max(self.examples, 1)
        gram = None if self.gram is None else self.gram / n
        counts = None if self.counts is None else self.counts / n
        grad = None if self.grad_sq is None else self.grad_sq / max(self.grad_count, 1)
        sizes = None if self.sizes is None else self.sizes / n
        return ModuleStats(gram, counts, grad, self.grad_count, self.examples, sizes)

    def add_sizes(self, positions: tuple[int, int, int]) -> None:
        step = torch.tensor(positions, dtype=torch.float64)
        self.sizes = step if self.sizes is None else self.sizes + step


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patches ``conv`` multiplies, shape (B, groups, positions, in/groups * kh * kw), so that
    ``conv(x)`` = per group ``patches @ W_g^T`` (``W_g`` the group's (out/groups, in/groups*kh*kw) kernel)."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    elif isinstance(conv.padding, str):
        if conv.padding == "valid":
            padding = 0
        else:  # 'same' (stride 1): pad as torch does, the extra pixel of an even total on the bottom/right
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            x = F.pad(x, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2])
            padding = 0
    else:
        padding = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    b, _, positions = cols.shape
    return cols.reshape(b, conv.groups, -1, positions).transpose(2, 3)


def conv_output_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """The (height, width) of ``conv``'s output on an (h, w) input."""
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return h, w
        padding = (0, 0)
    else:
        padding = conv.padding
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip((h, w), padding, conv.dilation, conv.kernel_size, conv.stride)
    )


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    values = (
        out.values()
        if isinstance(out, dict)
        else out
        if isinstance(out, (list, tuple))
        else [getattr(out, "logits", None)]
    )
    return next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


class _LayerTracker:
    """Forward hooks on every submodule that remember which one was running when an exception escaped."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.failed: str | None = None
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args) -> None:
            self.stack.append(name)

        return hook

    def _leave(self, module, args, out) -> None:  # returns None: the output is left as it is
        self.stack.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def batch_runner(inputs, batch_size: int, batches: int):
    """``(run, n_batches)`` for calibration inputs: a tensor of examples run in chunks of ``batch_size``, or a
    callable ``run(model, i)`` called ``batches`` times."""
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim < 1 or inputs.shape[0] == 0:
            raise ValueError(f"inputs must be a non-empty tensor of examples (N, ...), got shape {tuple(inputs.shape)}")
        chunks = list(torch.split(inputs, batch_size))

        def run(m: nn.Module, i: int) -> torch.Tensor:
            return m(chunks[i])

        return run, len(chunks)
    if callable(inputs):
        return inputs, batches
    raise ValueError(f"inputs must be a tensor of examples or a callable run(model, i), got {type(inputs).__name__}")


def collect_module_stats(
    model: nn.Module,
    targets: dict[str, nn.Module],
    inputs,
    *,
    fisher: bool = True,
    batch_size: int = 32,
    batches: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, ModuleStats]:
    """Run the calibration inputs through ``model`` and collect :class:`ModuleStats` for every target.

    Parameters
    ----------
    inputs : Tensor, shape (N, ...) (e.g. images (N, C, H, W)), run in batches of ``batch_size``; or a
        callable ``run(model, i) -> Tensor`` called for ``i`` in ``range(batches)``. A scalar result is
        the loss whose gradients weight the output channels; a tensor output (or the model's output for
        a tensor input) is contracted with a fixed Gaussian draw, so that ``E[(dL/dy)^2]`` is the output
        sensitivity (the Gauss-Newton diagonal of the squared output change).
    fisher : also run backward passes for ``grad_sq``.
    progress : show a progress bar over the batches.

    Raises ``ValueError`` naming the layer in which a calibration batch failed to run.

    References
    ----------
    Y.-C. Hsu et al., "Language model compression with weighted low-rank factorization", ICLR 2022,
    arXiv:2207.00112; X. Wang et al., "SVD-LLM", arXiv:2403.07378 (input whitening).
    """
    run, n_batches = batch_runner(inputs, batch_size, batches)
    stats = {name: ModuleStats() for name in targets}
    handles = []
    for name, layer in targets.items():
        handles.append(layer.register_forward_pre_hook(lambda m, args, st=stats[name]: _add_input(m, args[0], st)))
        if fisher:
            handles.append(layer.register_forward_hook(lambda m, args, out, st=stats[name]: _watch_grad(out, st)))
    inplace = {m: m.inplace for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)}
    for m in inplace:
        m.inplace = False  # an in-place op on a watched output would invalidate its gradient hook
    tracker = _LayerTracker(model)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    try:
        for i in _bar(range(n_batches), progress, "calibration batches"):
            try:
                with torch.set_grad_enabled(fisher):
                    out = run(model, i)
            except Exception as exc:  # noqa: BLE001 - any failure is reported with the layer it came from
                where = tracker.stack[-1] if tracker.stack else "(before any layer)"
                kind = type(model.get_submodule(where)).__name__ if tracker.stack else ""
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(
                    f"calibration batch {i} could not run through the model: layer {where!r} ({kind}) failed: {msg}"
                ) from None
            finally:
                tracker.stack.clear()
            if fisher:
                y = _first_tensor(out)
                if y is None or not y.requires_grad:
                    raise ValueError(
                        "fisher=True needs a differentiable output (a loss or a float tensor) from "
                        "each calibration batch; got none"
                    )
                loss = y if y.ndim == 0 else (y * torch.randn(y.shape, generator=generator).to(y)).sum()
                model.zero_grad(set_to_none=True)
                loss.backward()
    finally:
        tracker.remove()
        for h in handles:
            h.remove()
        for m, value in inplace.items():
            m.inplace = value
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: st.finish() for name, st in stats.items()}


def _add_input(layer: nn.Module, x: torch.Tensor, st: ModuleStats) -> None:
    x = x.detach()
    if isinstance(layer, nn.Embedding):
        counts = torch.bincount(x.reshape(-1), minlength=layer.num_embeddings).double()
        st.counts = counts if st.counts is None else st.counts + counts
        st.examples += x.shape[0] if x.ndim > 1 else 1
        st.add_sizes((x.numel(),) * 3)
        return
    rows, examples = layer_rows(layer, x)
    g = row_products(rows, rows)
    st.gram = g if st.gram is None else st.gram + g
    st.examples += examples
    if isinstance(layer, nn.Conv2d):
        x = x if x.ndim == 4 else x[None]
        (h, w), (ho, wo) = x.shape[-2:], conv_output_size(layer, *x.shape[-2:])
        st.add_sizes((x.shape[0] * h * w, x.shape[0] * ho * wo, x.shape[0] * ho * w))
    else:
        st.add_sizes((rows.shape[0],) * 3)


def layer_rows(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows a Conv2d (its patches, in the input's dtype; targets have groups=1) or Linear (float64) multiplies
    by its weight's transpose for the input ``x``, and the number of examples in ``x``."""
    if isinstance(layer, nn.Conv2d):
        x = x if x.ndim == 4 else x[None]
        return conv_patches(layer, x)[:, 0].reshape(-1, layer.weight[0].numel()), x.shape[0]
    return x.reshape(-1, x.shape[-1]).double(), x.shape[0] if x.ndim > 1 else 1


def row_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` in float64, the products in the inputs' precision (at least float32) over chunks of rows."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    total = 0
    for ca, cb in zip(*(torch.split(t, max(1, (1 << 24) // max(a.shape[1], b.shape[1]))) for t in (a, b))):
        total = total + (ca.T.to(dtype) @ cb.to(dtype)).double()
    return total


def _watch_grad(out: torch.Tensor, st: ModuleStats) -> None:
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return
    channel = 1 if out.ndim == 4 else out.ndim - 1

    def hook(grad: torch.Tensor) -> None:
        g = grad.detach().double() ** 2
        dims = [d for d in range(g.ndim) if d != channel]
        total = g.sum(dim=dims)
        st.grad_sq = total if st.grad_sq is None else st.grad_sq + total
        st.grad_count += g.numel() // g.shape[channel]

    out.register_hook(hook)
