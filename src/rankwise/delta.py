"""Fine-tunes as low-rank deltas: extract ``W_ft - W_base`` per layer under one budget, apply it back in place."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .formats._ops import gram_singular_values
from .formats.svd import truncated_svd

EXACT_OTHER = ("store", "skip")
# modules whose 2-D ".weight" is a lookup table, not a Linear map (names of HF embedding modules)
_EMBEDDING = re.compile(r"(^|\.)(embed\w*|wte|wpe|shared|\w*embeddings)$")


@dataclass
class Delta:
    """A fine-tune stored as ``base + delta``.

    lora : dict module name -> (A, B), A : Tensor, shape (r, in_features); B : Tensor, shape
        (out_features, r); ``B @ A`` approximates ``W_ft - W_base`` in (out, in) orientation, scaling 1.
    bias : dict module name -> Tensor, shape (out_features,), exact ``b_ft - b_base`` of LoRA'd modules.
    exact : dict parameter name -> Tensor, the fine-tuned value of every parameter of a module stored
        exactly (embeddings, norms, non-targeted layers that changed).
    transposed : module names whose weight is stored (in, out) (transformers' Conv1D).
    spectra : dict module name -> Tensor, the singular values computed for the layer's delta: all
        ``min(m, n)`` of them (with ``keep`` / ``energy``, from the Gram eigenvalues: exact to about
        ``1e-8`` of the largest, see :func:`~rankwise.formats._ops.gram_singular_values`; full rank:
        from the SVD), or with a fixed rank the leading ones that
        :func:`~rankwise.formats.svd.truncated_svd` computed (empty for a delta read from a PEFT adapter).
    energy : dict module name -> float, ``||W_ft - W_base||_F**2`` of the layer (same layers as ``spectra``).
    dense_params : ``sum(m * n)`` over the layers of ``spectra`` (the budget's reference).
    shapes : dict module name -> (out_features, in_features) of every layer in ``lora`` or ``bias``.
    tied : dict parameter name -> the name in ``exact`` it is tied to (a tied output head), so that
        exports can name both.
    """

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    dense_params: int = 0
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(A.shape[0]) for name, (A, _) in self.lora.items()}

    @property
    def num_params(self) -> int:
        """Parameters of the LoRA factors only (``sum r * (m + n)``)."""
        return sum(A.numel() + B.numel() for A, B in self.lora.values())

    def relative_error(self) -> float:
        """``||D - B A||_F / ||D||_F`` over every layer of ``spectra`` (dropped layers count in full)."""
        kept = sum(float((s[: self.ranks.get(n, 0)].double() ** 2).sum()) for n, s in self.spectra.items())
        total = sum(self.energy.values())
        return math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0

    def weight_delta(self, module: str) -> torch.Tensor:
        """``B @ A`` (in float64) in the orientation of the module's stored weight."""
        A, B = self.lora[module]
        D = B.double() @ A.double()
        return D.T if module in self.transposed else D

    def apply_to(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The value of parameter ``name`` after applying the delta to its base value ``tensor``."""
        if name in self.exact:
            return self.exact[name].to(tensor.dtype).clone()
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in self.lora:
            D = self.weight_delta(module)
            if tuple(D.shape) != tuple(tensor.shape):
                raise ValueError(f"delta for {name!r} has shape {tuple(D.shape)}, the model's tensor {tuple(tensor.shape)}")
            return (tensor.double() + D.to(tensor.device)).to(tensor.dtype)
        if leaf == "bias" and module in self.bias:
            return (tensor.double() + self.bias[module].double().to(tensor.device)).to(tensor.dtype)
        return tensor

    def targets(self) -> list[str]:
        """Every parameter name the delta changes."""
        names = [f"{m}.weight" for m in self.lora] + [f"{m}.bias" for m in self.bias] + list(self.exact)
        return sorted(set(names))

    def save_peft(self, out: str | os.PathLike, *, force: bool = False) -> None:
        """Write a PEFT LoRA adapter directory (see :func:`rankwise.peft_export.save_peft`)."""
        from .peft_export import save_peft

        save_peft(self, out, force=force)


def _check_fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class _Source:
    """One model, read tensor by tensor: names, shapes, the layer kind of each module, values on demand."""

    def __init__(self, model: object, what: str):
        from .io.lazy import StateDictCheckpoint, open_checkpoint

        self.kinds: dict[str, str] = {}  # module name -> "linear" | "conv1d"; others are guessed by name
        self.tied: dict[str, str] = {}  # parameter name -> the first name of the same tensor
        if isinstance(model, nn.Module):
            params = dict(model.named_parameters())  # drops tied duplicates (lm_head tied to embed_tokens)
            first = {id(p): n for n, p in params.items()}
            self.tied = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if n not in params}
            persistent = set(model.state_dict(keep_vars=True))
            buffers = {n: b for n, b in model.named_buffers() if n in persistent}
            self.ckpt = StateDictCheckpoint({**params, **buffers}, f"<{what} {type(model).__name__}>")
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear):
                    self.kinds[name] = "linear"
                elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
                    self.kinds[name] = "conv1d"
                elif len(list(mod.children())) == 0 and getattr(mod, "weight", None) is not None:
                    self.kinds[name] = "other"
        elif isinstance(model, Mapping):
            if not all(isinstance(v, torch.Tensor) for v in model.values()):
                raise ValueError(f"{what} state dict must map names to tensors")
            self.ckpt = StateDictCheckpoint(model, f"<{what} state dict>")
        elif isinstance(model, (str, os.PathLike)):
            from .io.models import converted_gguf, resolve

            path = resolve(model)
            self.ckpt = open_checkpoint(converted_gguf(path) if path.suffix == ".gguf" else path)
            config = self.ckpt.config or {}
            embed = [n for n in self.ckpt.keys() if _EMBEDDING.search(n.rpartition(".")[0]) and "position" not in n]
            if config.get("tie_word_embeddings") and "lm_head.weight" not in self.ckpt and len(embed) == 1:
                self.tied = {"lm_head.weight": embed[0]}  # transformers ties the head to the input embedding
        else:
            raise ValueError(f"{what} must be a path, an nn.Module or a state dict, got {type(model).__name__}")

    def kind(self, module: str, shape: tuple[int, ...]) -> str:
        """``"linear"``/``"conv1d"`` for matrices acting on features, else ``"other"``."""
        if module in self.kinds:
            return self.kinds[module]
        return "linear" if len(shape) == 2 and not _EMBEDDING.search(module) else "other"


def _check_same_architecture(base: _Source, ft: _Source) -> list[str]:
    names_b, names_f = base.ckpt.keys(), ft.ckpt.keys()
    for name in sorted(set(names_b) ^ set(names_f)):
        where = "base" if name in names_b else "finetuned"
        raise ValueError(f"models differ in architecture: tensor {name!r} is only in the {where} model")
    for name in names_b:
        sb, sf = base.ckpt.shape(name), ft.ckpt.shape(name)
        if sb != sf:
            raise ValueError(f"models differ in architecture: tensor {name!r} has shape {sb} in base, {sf} in finetuned")
    return names_b


def _targeted(module: str, target_modules: Sequence[str] | None) -> bool:
    if target_modules is None:
        return True
    return any(module == t or module.endswith("." + t) for t in target_modules)


def allocate_delta_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    *,
    budget: int | None = None,
    energy: float | None = None,
) -> dict[str, int]:
    """Ranks per layer maximising the kept squared Frobenius norm of the deltas, greedily.

    Each singular triplet ``i`` of a layer of shape (m, n) costs ``m + n`` parameters and removes
    ``s_i**2`` from the total squared error (Eckart–Young); triplets are taken in decreasing order of
    ``s_i**2 / (m + n)``, which within a layer is the order of the spectrum, so every layer keeps a
    prefix. With ``budget`` a triplet is taken while it fits (``sum r * (m + n) <= budget``); with
    ``energy`` the shortest such sequence keeping ``energy * sum ||D||_F**2`` is taken.

    References
    ----------
    C. Eckart, G. Young, "The approximation of one matrix by another of lower rank", Psychometrika 1 (1936).
    """
    names = list(spectra)
    ratios, owners = [], []
    for i, name in enumerate(names):
        m, n = shapes[name]
        ratios.append(spectra[name].double() ** 2 / (m + n))
        owners.append(torch.full((spectra[name].numel(),), i, dtype=torch.int64))
    ranks = dict.fromkeys(names, 0)
    if not names:
        return ranks
    ratio, owner = torch.cat(ratios), torch.cat(owners)
    order = torch.sort(ratio, descending=True, stable=True).indices  # stable: ties keep spectrum order
    if energy is not None:
        costs = torch.tensor([sum(shapes[n]) for n in names], dtype=torch.float64)
        gains = ratio[order] * costs[owner[order]]
        cum = torch.cumsum(gains, 0)
        take = min(int(torch.searchsorted(cum, energy * cum[-1])) + 1, len(order))
        for i in owner[order[:take]].tolist():
            ranks[names[i]] += 1
        return ranks
    left = budget
    for i in owner[order].tolist():
        cost = sum(shapes[names[i]])
        if cost <= left:
            ranks[names[i]] += 1
            left -= cost
    return ranks


def extract_delta(
    base: object,
    finetuned: object,
    *,
    rank: int | None = None,
    keep: float | None = None,
    energy: float | None = None,
    target_modules: Sequence[str] | None = None,
    exact_other: str = "store",
) -> Delta:
    """Low-rank factorization of ``W_ft - W_base`` for every Linear-style weight, ranks under one budget.

    Parameters
    ----------
    base, finetuned : path (HF model directory, sharded directory, ``.safetensors`` file, ``.gguf``
        or a model alias, read one tensor at a time), nn.Module or state dict; same architecture.
    rank : int, the same rank for every changed layer (must be <= min(m, n) of each).
    keep : float in (0, 1], LoRA factors may take ``keep * sum(m * n)`` parameters over the changed
        targeted layers; ranks are allocated greedily by ``s_i**2 / (m + n)``.
    energy : float in (0, 1], keep this fraction of ``sum ||W_ft - W_base||_F**2`` with the fewest
        factor parameters (same greedy order). None of the three: full rank (exact).
    target_modules : module names (or dotted suffixes, as PEFT matches them) to factorize; default
        every 2-D Linear / Conv1D weight that is not an embedding.
    exact_other : ``"store"`` keeps the fine-tuned value of every other changed tensor (embeddings,
        norms, biases), ``"skip"`` drops them.

    Returns
    -------
    Delta with ``A`` (r, n), ``B`` (m, r) per layer, ``B = U sqrt(S)``, ``A = sqrt(S) Vh``.

    Raises
    ------
    ValueError for mismatched architectures (the first differing tensor is named), a rank larger than
    a layer allows, bad rank/keep/energy values, or target modules that match nothing.

    References
    ----------
    E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    C. Eckart, G. Young, "The approximation of one matrix by another of lower rank", Psychometrika 1 (1936).
    """
    given = [k for k, v in (("rank", rank), ("keep", keep), ("energy", energy)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of rank, keep, energy; got {' and '.join(given)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if keep is not None:
        keep = _check_fraction(keep, "keep")
    if energy is not None:
        energy = _check_fraction(energy, "energy")
    if exact_other not in EXACT_OTHER:
        raise ValueError(f"exact_other must be one of {', '.join(EXACT_OTHER)}, got {exact_other!r}")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    b, f = _Source(base, "base"), _Source(finetuned, "finetuned")
    names = _check_same_architecture(b, f)

    layers: dict[str, tuple[int, int]] = {}  # changed targeted layers -> (out, in)
    transposed: set[str] = set()
    matched: dict[str, str] = {}  # targeted Linear-style module -> kind
    for name in names:
        module, _, leaf = name.rpartition(".")
        shape = b.ckpt.shape(name)
        kind = b.kind(module, shape)
        if kind in ("linear", "conv1d") and leaf == "weight" and len(shape) == 2 and _targeted(module, target_modules):
            matched[module] = kind
    other_modules: set[str] = set()
    bias_modules: set[str] = set()
    for name in names:
        module, _, leaf = name.rpartition(".")
        if not b.ckpt.dtype(name).is_floating_point or torch.equal(b.ckpt.get(name), f.ckpt.get(name)):
            continue
        if module in matched and leaf == "weight":
            shape = b.ckpt.shape(name)
            layers[module] = (shape[1], shape[0]) if matched[module] == "conv1d" else shape
            if matched[module] == "conv1d":
                transposed.add(module)
        elif module in matched and leaf == "bias":
            bias_modules.add(module)
        else:
            other_modules.add(module)
    if target_modules is not None and not matched:
        raise ValueError(f"target_modules {list(target_modules)!r} match no Linear weight of the base model")
    if rank is not None:
        for module, (m, n) in layers.items():
            if rank > min(m, n):
                raise ValueError(f"rank {rank} is larger than layer {module!r} allows (max {min(m, n)} for its {m}x{n} delta)")

    def delta_of(module: str) -> torch.Tensor:
        wb, wf = b.ckpt.get(f"{module}.weight"), f.ckpt.get(f"{module}.weight")
        dt = torch.float64 if wb.dtype == torch.float64 else torch.float32
        D = wf.to(dt) - wb.to(dt)
        return D.T if module in transposed else D

    spectra: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    if keep is not None or energy is not None:
        for module in layers:  # first pass: singular values only, to allocate before keeping factors
            D = delta_of(module)
            spectra[module] = gram_singular_values(D).to(D.dtype)
        budget = None if keep is None else int(keep * sum(m * n for m, n in layers.values()))
        ranks = allocate_delta_ranks(spectra, layers, budget=budget, energy=energy)
    out = Delta(transposed=frozenset(transposed), dense_params=sum(m * n for m, n in layers.values()))
    out.shapes = dict(layers)
    for module, (m, n) in layers.items():
        r = rank if rank is not None else ranks[module] if ranks else min(m, n)
        D = delta_of(module)
        out.energy[module] = float(D.double().norm()) ** 2
        if r == 0:
            continue
        svd = truncated_svd(D, r)  # the leading triplets only (a Gram-matrix route for small ranks)
        if module not in spectra:  # keep/energy computed every singular value in the first pass
            spectra[module] = svd.spectrum
        root = torch.sqrt(svd.S[:r])
        out.lora[module] = ((svd.Vh[:r] * root[:, None]).contiguous(), (svd.U[:, :r] * root).contiguous())
    out.spectra = spectra
    if exact_other == "store":
        for module in sorted(bias_modules):
            out.bias[module] = f.ckpt.get(f"{module}.bias").double() - b.ckpt.get(f"{module}.bias").double()
            out.bias[module] = out.bias[module].to(f.ckpt.dtype(f"{module}.bias"))
            shape = b.ckpt.shape(f"{module}.weight")
            out.shapes[module] = (shape[1], shape[0]) if matched[module] == "conv1d" else shape
        for name in names:
            if name.rpartition(".")[0] in other_modules:
                out.exact[name] = f.ckpt.get(name).clone()
        out.tied = {alias: name for alias, name in b.tied.items() if name in out.exact}
    return out


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


@torch.no_grad()
def apply_delta_(model: nn.Module, delta: Delta) -> nn.Module:
    """Add ``delta`` to ``model``'s weights in place (``W += B @ A``, ``b += db``, exact tensors copied).

    Every tensor the delta names is checked (present, same shape) before any is changed, so a
    mismatched model raises ``ValueError`` and is left untouched. Conv1D weights get ``(B @ A)^T``.
    Tied parameters are updated once. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    # orientation comes from the model's own layer types (a PEFT adapter's fan_in_fan_out is global)
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")}
    delta = dataclasses.replace(delta, transposed=frozenset(conv1d & set(delta.lora)))
    tensors = _named_tensors(model)
    for name in delta.targets():
        if name not in tensors:
            raise ValueError(f"delta changes tensor {name!r}, which the model does not have")
    seen: set[int] = set()
    updates = []
    for name in delta.targets():
        t = tensors[name]
        if id(t) in seen:
            continue
        seen.add(id(t))
        updates.append((t, delta.apply_to(name, t)))  # computes (and shape-checks) everything first
    for t, new in updates:
        t.copy_(new)
    return model

