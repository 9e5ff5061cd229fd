"""The sequential refit of :func:`rankwise.compress_` for a ``ModuleCompressConfig(sequential=True)``:
asymmetric reconstruction. A layer chosen for factorization is refitted so that its outputs on its inputs in the
model compressed so far (``x'``) match the dense layer's outputs on the dense model's inputs (``x``): the error
of the layers before it is compensated, not inherited. ``E||W x - W' x'||^2 = E||(W_t - W') x'||^2 + const``
with ``W_t = W E[x x'^T] E[x' x'^T]^+``, so the layer's format is fitted to ``W_t`` in the metric of ``x'``.

References
----------
X. Zhang, J. Zou, K. He, J. Sun, "Accelerating very deep convolutional networks for classification and
detection", TPAMI 2016, arXiv:1505.06798.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from .calibrate_modules import ModuleStats, batch_runner, layer_rows, row_products
from .targets import replace_module


class _Taken(Exception):
    """Raised by the input hook once the refitted layer's input is taken: the rest of the forward is not needed."""


def layer_input(model: nn.Module, name: str, layer: nn.Module, run, i: int) -> torch.Tensor:
    """``layer``'s (the target ``name``) input when calibration batch ``i`` runs through ``model`` (the forward
    stops there); ``ValueError`` naming the target when the batch fails or never reaches it."""
    taken = []

    def hook(module, args):
        taken.append(args[0].detach())
        raise _Taken

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run(model, i)
    except _Taken:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure is reported with the target being refitted
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"calibration batch {i} could not run through the model to refit {name!r}: {msg}") from None
    finally:
        handle.remove()
    if not taken:
        raise ValueError(f"calibration batch {i} never reached {name!r}, the layer being refitted (sequential=True)")
    x, conv = taken[0], isinstance(layer, nn.Conv2d)
    takes = layer.in_channels if conv else layer.in_features
    if x.ndim < (3 if conv else 1) or x.shape[-3 if conv else -1] != takes:
        raise ValueError(
            f"calibration batch {i} gave {name!r} an input of shape {tuple(x.shape)}; it takes {takes} "
            f"{'channels' if conv else 'features'}"
        )
    return x


def refit_target(
    model: nn.Module, name: str, layer: nn.Module, st: ModuleStats, inputs, config, replaced: dict
) -> tuple[nn.Module, ModuleStats]:
    """What the dense target ``layer`` (qualified ``name``, still in ``model``) is refitted to: a copy of it
    holding ``W_t`` and ``st`` with the second moment of ``x'`` (the output weights stay the dense model's).

    ``inputs`` and ``config`` (a ``ModuleCompressConfig``: batching, and ``damping``, the ridge of ``W_t``'s
    least squares relative to the mean diagonal) as for calibration; ``replaced`` maps every target replaced so
    far to its (dense, compressed) modules, the dense ones swapped back in for the ``x`` pass. Two forwards per
    calibration batch, each stopped at ``layer``.
    """
    run, n_batches = batch_runner(inputs, config.batch_size, config.batches)
    cross = gram = 0
    examples = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(n_batches):
            for n, (dense, _) in replaced.items():
                replace_module(model, n, dense)
            try:
                x = layer_input(model, name, layer, run, i)
            finally:
                for n, (_, new) in replaced.items():
                    replace_module(model, n, new)
            rows, count = layer_rows(layer, x)
            rows_now, _ = layer_rows(layer, layer_input(model, name, layer, run, i))
            cross = cross + row_products(rows, rows_now)
            gram = gram + row_products(rows_now, rows_now)
            examples += count
    finally:
        model.train(was_training)
    W = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    ridge = config.damping * float(torch.diagonal(gram).mean().clamp_min(1e-300))
    evals, evecs = torch.linalg.eigh(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype))
    # the pseudo-inverse: no component along inputs the compressed model never produces (dead channels); an
    # arbitrary one there (LAPACK's least squares gave a different one per call) would enter the fit
    inverse = torch.where(evals > float(evals.max()) * 1e-12, 1 / evals, torch.zeros_like(evals))
    target = ((W @ cross) @ evecs) * inverse @ evecs.T
    fitted = copy.deepcopy(layer)
    with torch.no_grad():
        fitted.weight.copy_(target.reshape(layer.weight.shape))
    return fitted, replace(st, gram=gram / examples, examples=examples)
