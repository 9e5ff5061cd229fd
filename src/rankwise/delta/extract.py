"""Extracting a fine-tune as a low-rank delta: factorize ``W_ft - W_base`` per layer under one budget."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .._validate import fraction, int_at_least, regex
from ..allocate import allocate_delta_ranks
from ..calibrate import _bar
from ..formats._ops import gram_singular_values
from ..formats.svd import truncated_svd
from ..io.reader import ModelReader
from .core import Delta

EXACT_OTHER = ("store", "skip")


def _check_same_architecture(base: ModelReader, ft: ModelReader) -> list[str]:
    names_b, names_f = base.ckpt.keys(), ft.ckpt.keys()
    for name in sorted(set(names_b) ^ set(names_f)):
        where = "base" if name in names_b else "finetuned"
        raise ValueError(f"models differ in architecture: tensor {name!r} is only in the {where} model")
    for name in names_b:
        sb, sf = base.ckpt.shape(name), ft.ckpt.shape(name)
        if sb != sf:
            raise ValueError(
                f"models differ in architecture: tensor {name!r} has shape {sb} in base, {sf} in finetuned"
            )
    return names_b


def _targeted(module: str, target_modules: Sequence[str] | None) -> bool:
    if target_modules is None:
        return True
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _saved_modules(b: ModelReader, names: list[str], save_modules: Sequence[str]) -> set[str]:
    """The modules of ``names`` that ``save_modules`` name (whole name or dotted suffix); a tied head
    (``lm_head`` tied to the input embedding) resolves to the module holding the tensor."""
    if isinstance(save_modules, str):
        save_modules = [save_modules]
    modules = {n.rpartition(".")[0] for n in names}
    tied = {alias.rpartition(".")[0]: name.rpartition(".")[0] for alias, name in b.tied.items()}
    saved = set()
    for wanted in save_modules:
        ok = isinstance(wanted, str) and wanted != ""
        hits = [m for m in modules | set(tied) if m == wanted or m.endswith("." + wanted)] if ok else []
        if not hits:
            sample = ", ".join(sorted(modules)[:3])
            raise ValueError(f"save_modules entry {wanted!r} names no module of the base model (e.g. {sample})")
        saved.update(tied.get(m, m) for m in hits)
    return saved


def extract_delta(
    base: object,
    finetuned: object,
    *,
    rank: int | None = None,
    keep: float | None = None,
    energy: float | None = None,
    target_modules: Sequence[str] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    save_modules: Sequence[str] = (),
    exact_other: str = "store",
    progress: bool = False,
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
    include, exclude : regexes searched in the module names: only the matching layers of the targets
        are factorized, then those matching ``exclude`` are left out (as mergekit-extract-lora's
        ``--include-regex`` / ``--exclude-regex``); what they leave out follows ``exact_other``.
    save_modules : module names (or dotted suffixes) stored at full rank, changed or not: every
        tensor of the module is kept exactly and exported in PEFT's ``modules_to_save`` (as
        mergekit-extract-lora's ``--save-module``, e.g. ``lm_head``); a tied head saves the embedding
        it is tied to (the adapter keeps the two tied).
    exact_other : ``"store"`` keeps the fine-tuned value of every other changed tensor (embeddings,
        norms, biases), ``"skip"`` drops them.
    progress : show progress bars (the layers' spectra, their factorization).

    Returns
    -------
    Delta with ``A`` (r, n), ``B`` (m, r) per layer, ``B = U sqrt(S)``, ``A = sqrt(S) Vh``.

    Raises
    ------
    ValueError for mismatched architectures (the first differing tensor is named), a rank larger than
    a layer allows, bad rank/keep/energy values, invalid regexes, or target modules, ``include`` or
    ``save_modules`` entries that match nothing.

    References
    ----------
    E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
    C. Eckart, G. Young, "The approximation of one matrix by another of lower rank", Psychometrika 1 (1936).
    """
    given = [k for k, v in (("rank", rank), ("keep", keep), ("energy", energy)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of rank, keep, energy; got {' and '.join(given)}")
    int_at_least(rank, "rank", 1, none_ok=True)
    if keep is not None:
        keep = fraction(keep, "keep")
    if energy is not None:
        energy = fraction(energy, "energy")
    if exact_other not in EXACT_OTHER:
        raise ValueError(f"exact_other must be one of {', '.join(EXACT_OTHER)}, got {exact_other!r}")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    inc, exc = regex(include, "include"), regex(exclude, "exclude")
    b, f = ModelReader(base, "base"), ModelReader(finetuned, "finetuned")
    names = _check_same_architecture(b, f)
    saved = _saved_modules(b, names, save_modules)

    layers: dict[str, tuple[int, int]] = {}  # changed targeted layers -> (out, in)
    transposed: set[str] = set()
    matched: dict[str, str] = {}  # targeted Linear-style module -> kind
    for name in names:
        module, _, leaf = name.rpartition(".")
        shape = b.ckpt.shape(name)
        kind = b.kind(module, shape)
        if kind in ("linear", "conv1d") and leaf == "weight" and len(shape) == 2 and _targeted(module, target_modules):
            matched[module] = kind
    if inc is not None and not any(inc.search(m) for m in matched):
        raise ValueError(
            f"include={include!r} matches no Linear layer of the base model (of {len(matched)}, "
            f"e.g. {', '.join(list(matched)[:3])})"
        )
    matched = {
        m: k
        for m, k in matched.items()
        if (inc is None or inc.search(m)) and not (exc and exc.search(m)) and m not in saved
    }
    other_modules: set[str] = set()
    bias_modules: set[str] = set()
    for name in names:
        module, _, leaf = name.rpartition(".")
        if module in saved:
            continue
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
                raise ValueError(
                    f"rank {rank} is larger than layer {module!r} allows (max {min(m, n)} for its {m}x{n} delta)"
                )

    def delta_of(module: str) -> torch.Tensor:
        wb, wf = b.ckpt.get(f"{module}.weight"), f.ckpt.get(f"{module}.weight")
        dt = torch.float64 if wb.dtype == torch.float64 else torch.float32
        D = wf.to(dt) - wb.to(dt)
        return D.T if module in transposed else D

    spectra: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    t0 = time.perf_counter()
    if keep is not None or energy is not None:
        # singular values first, to allocate before keeping any factors
        for module in _bar(layers, progress, "delta spectra"):
            D = delta_of(module)
            spectra[module] = gram_singular_values(D).to(D.dtype)
        budget = None if keep is None else int(keep * sum(m * n for m, n in layers.values()))
        ranks = allocate_delta_ranks(spectra, layers, budget=budget, energy=energy)
    out = Delta(transposed=frozenset(transposed), dense_params=sum(m * n for m, n in layers.values()))
    out.timings["allocation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out.shapes = dict(layers)
    for module, (m, n) in _bar(list(layers.items()), progress, "extract layers"):
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
    out.timings["factorization"] = time.perf_counter() - t0
    if exact_other == "store":
        for module in sorted(bias_modules):
            out.bias[module] = f.ckpt.get(f"{module}.bias").double() - b.ckpt.get(f"{module}.bias").double()
            out.bias[module] = out.bias[module].to(f.ckpt.dtype(f"{module}.bias"))
            shape = b.ckpt.shape(f"{module}.weight")
            out.shapes[module] = (shape[1], shape[0]) if matched[module] == "conv1d" else shape
        for name in names:
            if name.rpartition(".")[0] in other_modules:
                out.exact[name] = f.ckpt.get(name).clone()
    for name in names:
        if name.rpartition(".")[0] in saved:
            out.exact[name] = f.ckpt.get(name).clone()
    out.tied = {alias: name for alias, name in b.tied.items() if name in out.exact}
    return out
