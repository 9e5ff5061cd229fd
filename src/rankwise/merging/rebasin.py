"""Git Re-Basin weight matching: permute one model's hidden units and channels onto another's, then average."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._validate import int_at_least
from . import METHODS

PAPER = "https://arxiv.org/abs/2209.04836"
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# layers that act on each unit / channel alike, so they commute with a permutation of units / channels
_PASSTHROUGH = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which tensors each hidden permutation acts on.

    sizes : the number of units (channels) of each permutation group, one group per hidden layer.
    axes : tensor name -> {axis: (group, block)}: along ``axis`` the tensor holds ``sizes[group]``
        consecutive blocks of ``block`` entries (``block > 1`` for a linear layer after a flattened
        convolution: its input features are channel-major, ``c * H * W + h * W + w``).
    """

    sizes: tuple[int, ...]
    axes: dict[str, dict[int, tuple[int, int]]]


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """Read the permutation symmetry of a sequential MLP or CNN from its module graph.

    ``model`` must be an ``nn.Sequential`` (nested Sequentials allowed) of Linear / Conv1d / Conv2d
    layers, BatchNorm1d / BatchNorm2d, element-wise activations, pooling, Dropout and Flatten. The outputs
    of every weighted layer but the last form one permutation group (its units or channels), which also
    permutes the following BatchNorm and the inputs of the next weighted layer.

    Raises ValueError naming the first module that is not one of those.
    """
    for name, m in model.named_modules():
        if list(m.children()) and not isinstance(m, nn.Sequential):
            raise ValueError(f"model must be an nn.Sequential chain; {name or 'the model'!r} is a {type(m).__name__}")
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    weighted = [n for n, m in leaves if isinstance(m, _WEIGHTED)]
    if len(weighted) < 2:
        raise ValueError(f"model must have at least 2 Linear/Conv layers to permute between, got {len(weighted)}")
    sizes: list[int] = []
    axes: dict[str, dict[int, tuple[int, int]]] = {}
    current = None  # the group of the units flowing out of the last weighted layer
    for name, m in leaves:
        if isinstance(m, _WEIGHTED):
            if getattr(m, "groups", 1) != 1:
                raise ValueError(f"module {name!r} is a grouped convolution (groups={m.groups}); supported: groups=1")
            n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            n_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            if current is not None:
                if n_in % sizes[current]:
                    raise ValueError(
                        f"module {name!r} reads {n_in} inputs, not a multiple of the {sizes[current]} units before it"
                    )
                axes.setdefault(f"{name}.weight", {})[1] = (current, n_in // sizes[current])
            if name == weighted[-1]:
                current = None
                continue
            current = len(sizes)
            sizes.append(n_out)
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    axes.setdefault(f"{name}.{p}", {})[0] = (current, 1)
        elif isinstance(m, _NORMS):
            if current is not None:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(m, p, None) is not None:
                        axes[f"{name}.{p}"] = {0: (current, 1)}
        elif not isinstance(m, _PASSTHROUGH):
            raise ValueError(
                f"cannot permute through module {name!r} ({type(m).__name__}); supported: Linear, Conv1d, "
                f"Conv2d, BatchNorm1d/2d, element-wise activations, pooling, Dropout, Flatten"
            )
    return PermutationSpec(tuple(sizes), axes)


def _expand(perm: Tensor, block: int) -> Tensor:
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(-1)


def _permute(t: Tensor, axes: dict[int, tuple[int, int]], perms: Sequence[Tensor], skip: int | None = None) -> Tensor:
    for axis, (g, block) in axes.items():
        if g != skip:
            t = t.index_select(axis, _expand(perms[g].to(t.device), block))
    return t


def apply_permutation(state: dict[str, Tensor], spec: PermutationSpec, perms: Sequence[Tensor]) -> dict[str, Tensor]:
    """A new state dict whose unit ``i`` of group ``g`` is unit ``perms[g][i]`` of ``state``; function-preserving."""
    return {k: _permute(v, spec.axes[k], perms) if k in spec.axes else v.clone() for k, v in state.items()}


def weight_matching(
    state_a: dict[str, Tensor], state_b: dict[str, Tensor], spec: PermutationSpec, *, max_iter: int = 100, seed: int = 0
) -> list[Tensor]:
    """Permutations of ``b``'s units maximising the inner product of its weights with ``a``'s.

    Coordinate descent: each step fixes all groups but one and solves the linear assignment problem
    for that group exactly (``scipy.optimize.linear_sum_assignment``), the groups visited in an order
    drawn from ``seed`` each sweep, until a sweep improves nothing or ``max_iter`` sweeps. Computed in
    float64. Returns one int64 permutation per group, shape (sizes[g],).

    References
    ----------
    S. K. Ainsworth, J. Hayase, S. Srinivasa. "Git Re-Basin: Merging Models modulo Permutation
    Symmetries." ICLR 2023, arXiv:2209.04836 (Algorithm 1, weight matching).
    """
    from scipy.optimize import linear_sum_assignment

    int_at_least(max_iter, "max_iter", 1)
    perms = [torch.arange(n) for n in spec.sizes]
    g = torch.Generator().manual_seed(seed)
    a64 = {k: state_a[k].detach().cpu().double() for k in spec.axes}
    b64 = {k: state_b[k].detach().cpu().double() for k in spec.axes}
    for _ in range(max_iter):
        improved = False
        for group in torch.randperm(len(spec.sizes), generator=g).tolist():
            n = spec.sizes[group]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for k, axes in spec.axes.items():
                for axis, (gg, _) in axes.items():
                    if gg != group:
                        continue
                    wb = _permute(b64[k], axes, perms, skip=group)
                    wa = a64[k].movedim(axis, 0).reshape(n, -1)
                    cost += wa @ wb.movedim(axis, 0).reshape(n, -1).T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.int64)
            rows = torch.arange(n)
            if cost[rows, new].sum() > cost[rows, perms[group]].sum() + 1e-12 * cost.abs().sum():
                perms[group] = new
                improved = True
        if not improved:
            break
    return perms


def _check_pair(state_a: dict[str, Tensor], state_b: dict[str, Tensor], label: str) -> None:
    for k in sorted(state_a.keys() | state_b.keys()):
        if k not in state_a or k not in state_b or state_a[k].shape != state_b[k].shape:
            sa = tuple(state_a[k].shape) if k in state_a else "missing"
            sb = tuple(state_b[k].shape) if k in state_b else "missing"
            raise ValueError(f"{label} differs from the reference model at tensor {k!r}: {sb} vs {sa}")


def align(model_b: nn.Module, model_a: nn.Module, *, max_iter: int = 100, seed: int = 0) -> nn.Module:
    """A copy of ``model_b`` with its hidden units permuted to match ``model_a`` (weight matching).

    The copy computes the same function as ``model_b`` (up to float rounding); neither input is modified.
    Both must be sequential MLPs/CNNs of the same architecture, see :func:`permutation_spec`.

    References
    ----------
    S. K. Ainsworth, J. Hayase, S. Srinivasa. "Git Re-Basin: Merging Models modulo Permutation
    Symmetries." ICLR 2023, arXiv:2209.04836.
    """
    spec = permutation_spec(model_a)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    _check_pair(state_a, state_b, "model_b")
    perms = weight_matching(state_a, state_b, spec, max_iter=max_iter, seed=seed)
    out = copy.deepcopy(model_b)
    out.load_state_dict(apply_permutation(state_b, spec, perms))
    return out


@METHODS.register(
    "rebasin", paper=PAPER, scope="model", min_models=2, needs_base=False, options={"max_iter": 100, "seed": 0}
)
def rebasin(
    models: Sequence[nn.Module], base: nn.Module | None = None, *, max_iter: int = 100, seed: int = 0
) -> dict[str, Tensor]:
    """Align ``models[1:]`` to ``models[0]`` by weight matching, then average all of them.

    ``base`` is ignored (the models are trained independently, from different seeds). Integer buffers
    are taken from ``models[0]``.

    References
    ----------
    S. K. Ainsworth, J. Hayase, S. Srinivasa. "Git Re-Basin: Merging Models modulo Permutation
    Symmetries." ICLR 2023, arXiv:2209.04836.
    """
    if len(models) < 2:
        raise ValueError(f"merge method 'rebasin' needs at least 2 models, got {len(models)}")
    ref = models[0]
    states = [ref.state_dict()]
    for i, m in enumerate(models[1:], start=1):
        _check_pair(states[0], m.state_dict(), f"models[{i}]")
        states.append(align(m, ref, max_iter=max_iter, seed=seed).state_dict())
    return {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in states[0].items()
    }
