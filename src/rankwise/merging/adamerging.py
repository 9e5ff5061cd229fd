"""AdaMerging: layer-wise task-arithmetic coefficients learned by entropy minimisation on unlabeled inputs."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._validate import fraction, int_at_least
from . import METHODS
from .ties import trim_to_density

PAPER = "https://arxiv.org/abs/2310.02575"


@dataclass(frozen=True)
class AdaMergingResult:
    """Learned coefficients and the objective's trace.

    names : the merged parameter tensors, in the order of ``coefficients``' columns.
    coefficients : Tensor, shape (n_models, len(names)); entry (k, l) scales task vector k in tensor l.
    entropy : the objective (mean prediction entropy over tasks) before each step, then after the last,
        ``steps + 1`` values.
    state : the merged state dict (base + sum_k coefficients[k, l] * task_vector[k, l]).
    """

    names: tuple[str, ...]
    coefficients: Tensor
    entropy: tuple[float, ...]
    state: dict[str, Tensor]


def _check_models(models: Sequence[nn.Module], base: nn.Module | None) -> None:
    if base is None:
        raise ValueError("adamerging needs base= the pretrained model the task vectors are taken from, got None")
    if len(models) < 1:
        raise ValueError(f"adamerging needs at least 1 fine-tuned model, got {len(models)}")
    ref = base.state_dict()
    for i, m in enumerate(models):
        sd = m.state_dict()
        for name in sorted(ref.keys() | sd.keys()):
            if name not in ref or name not in sd or sd[name].shape != ref[name].shape:
                got = tuple(sd[name].shape) if name in sd else "missing"
                want = tuple(ref[name].shape) if name in ref else "missing"
                raise ValueError(f"models[{i}] does not match base at tensor {name!r}: {got} vs {want}")


def _mean_entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def ties_vectors(vectors: Tensor, density: float) -> Tensor:
    """TIES-process the K task vectors of one tensor: trim each to ``density``, drop entries against the elected sign.

    vectors : Tensor, shape (K, *shape), the task vectors ``models[k] - base`` of one parameter tensor.
    Returns a new Tensor of the same shape: entry (k, i) is kept when it is among the ``density``
    fraction of largest magnitudes of ``vectors[k]`` and its sign agrees with that of the sum over k of
    the trimmed vectors (positive on ties); other entries are 0. This is AdaMerging++'s input.

    References
    ----------
    P. Yadav et al. "TIES-Merging: Resolving Interference When Merging Models." NeurIPS 2023.
    arXiv:2306.01708. E. Yang et al. "AdaMerging." ICLR 2024. arXiv:2310.02575 (AdaMerging++).
    """
    trimmed = torch.stack([trim_to_density(v.clone().contiguous(), density) for v in vectors])
    positive = trimmed.sum(0) >= 0
    return trimmed * torch.where(positive, trimmed > 0, trimmed < 0)


def learn_coefficients(
    models: Sequence[nn.Module],
    base: nn.Module,
    inputs: Sequence[Tensor],
    *,
    heads: Sequence[nn.Module] | None = None,
    steps: int = 100,
    lr: float = 1e-2,
    init: float = 0.3,
    batch_size: int | None = None,
    seed: int = 0,
    density: float | None = None,
) -> AdaMergingResult:
    """Learn one coefficient per task and per parameter tensor by minimising prediction entropy.

    The merged parameters are ``theta_l = base_l + sum_k lambda[k, l] * (models[k]_l - base_l)``
    (``models[k]_l - base_l`` TIES-processed when ``density`` is given: AdaMerging++) and with
    every ``lambda`` starting at ``init`` (task arithmetic) and clipped to [0, 1] in the forward pass, as
    in the paper. The objective is the Shannon entropy of the softmax predictions, averaged over the
    samples of each task and then over tasks: task ``k`` feeds ``inputs[k]`` through the merged model
    and then through ``heads[k]`` (task-specific heads, not merged) or, with ``heads=None``, reads the
    merged model's outputs as logits. Optimised with Adam. No labels are used.

    Parameters
    ----------
    models : the K fine-tuned models, same architecture as ``base``; not modified.
    base : the pretrained model; used as the functional template, not modified.
    inputs : K tensors, ``inputs[k]`` of shape (N_k, ...) accepted by the model (unlabeled).
    heads : K modules mapping the merged model's outputs (N_k, D) to logits (N_k, C_k); or None.
    steps, lr : Adam steps and learning rate.
    init : the starting coefficient (the task-arithmetic scale).
    batch_size : samples per task per step, drawn with ``seed``; None uses all inputs every step.
    seed : seeds the minibatch draws.
    density : None for AdaMerging (raw task vectors); a fraction in (0, 1] for AdaMerging++, which
        learns the coefficients of the TIES-processed task vectors (:func:`ties_vectors`) instead.

    Returns
    -------
    AdaMergingResult

    References
    ----------
    E. Yang, Z. Wang, L. Shen, S. Liu, G. Guo, X. Wang, D. Tao. "AdaMerging: Adaptive Model Merging
    for Multi-Task Learning." ICLR 2024. arXiv:2310.02575.
    """
    _check_models(models, base)
    k = len(models)
    if len(inputs) != k:
        raise ValueError(f"inputs must hold one tensor per model ({k}), got {len(inputs)}")
    if heads is not None and len(heads) != k:
        raise ValueError(f"heads must hold one module per model ({k}) or be None, got {len(heads)}")
    int_at_least(steps, "steps", 0)
    int_at_least(batch_size, "batch_size", 1, none_ok=True)

    fraction(density, "density", none_ok=True)

    template = copy.deepcopy(base).eval().requires_grad_(False)
    frozen_heads = [copy.deepcopy(h).eval().requires_grad_(False) for h in heads] if heads is not None else None
    base_params = {n: p.detach() for n, p in base.named_parameters() if p.is_floating_point()}
    names = tuple(base_params)
    device = next(iter(base_params.values())).device
    vectors = {
        n: torch.stack([dict(m.named_parameters())[n].detach().float() - base_params[n].float() for m in models])
        for n in names
    }  # each (K, *shape)
    if density is not None:
        vectors = {n: ties_vectors(v, density) for n, v in vectors.items()}
    raw = torch.full((k, len(names)), float(init), device=device, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr)
    g = torch.Generator().manual_seed(seed)

    def merged(lam: Tensor) -> dict[str, Tensor]:
        return {
            n: (base_params[n].float() + torch.tensordot(lam[:, j], vectors[n], dims=1)).to(base_params[n].dtype)
            for j, n in enumerate(names)
        }

    def objective(batches: list[Tensor]) -> Tensor:
        params = merged(raw.clamp(0.0, 1.0))
        losses = []
        for t, x in enumerate(batches):
            out = functional_call(template, params, (x,))
            losses.append(_mean_entropy(frozen_heads[t](out) if frozen_heads is not None else out))
        return torch.stack(losses).mean()

    def draw() -> list[Tensor]:
        if batch_size is None:
            return list(inputs)
        return [x[torch.randint(len(x), (min(batch_size, len(x)),), generator=g).to(x.device)] for x in inputs]

    trace = []
    for _ in range(steps):
        opt.zero_grad()
        loss = objective(draw())
        trace.append(loss.item())
        loss.backward()
        opt.step()
    with torch.no_grad():
        trace.append(objective(draw()).item())
        lam = raw.detach().clamp(0.0, 1.0)
        params = merged(lam)
    state = {}
    for n, v in base.state_dict().items():
        if n in params:
            state[n] = params[n].detach().clone()
        elif v.is_floating_point():  # buffers (e.g. running statistics): the fine-tunes' mean
            state[n] = torch.stack([m.state_dict()[n].float() for m in models]).mean(0).to(v.dtype)
        else:
            state[n] = v.clone()
    return AdaMergingResult(names, lam, tuple(trace), state)


@METHODS.register(
    "adamerging",
    paper=PAPER,
    scope="model",
    min_models=1,
    needs_base=True,
    options={
        "inputs": None,
        "heads": None,
        "steps": 100,
        "lr": 1e-2,
        "init": 0.3,
        "batch_size": None,
        "seed": 0,
        "density": None,
    },
)
def adamerging(
    models: Sequence[nn.Module], base: nn.Module | None, *, inputs: Sequence[Tensor] | None = None, **options
) -> dict[str, Tensor]:
    """Merged state dict of layer-wise AdaMerging; see :func:`learn_coefficients` for the options.

    References
    ----------
    E. Yang et al. "AdaMerging: Adaptive Model Merging for Multi-Task Learning." ICLR 2024.
    arXiv:2310.02575.
    """
    if inputs is None:
        raise ValueError("adamerging needs inputs= one unlabeled input tensor per model, got None")
    return learn_coefficients(models, base, inputs, **options).state
