"""Saving a compressed model as a transformers directory that rankwise and stock ``from_pretrained`` both reload.

Layout of a rankwise directory::

    config.json              the model's config + "quantization_config": {"quant_method": "rankwise",
                             "version": 1, "ranks": {module name: rank}}, plus "modules": {module name:
                             spec} for factorized layers of other types (conv, TT, Kronecker, embeddings)
    model.safetensors        every tensor once (tied embeddings stored once); factorized layers as
                             <name>.down.weight (rank, in), <name>.up.weight (out, rank), <name>.up.bias
    every other file of the input directory (tokenizer, chat template, generation config,
                             sentence-transformers modules ...), see io/sidecar.py
    README.md                a model card (io/sidecar.write_model_card)
    rankwise_report.json     the compression report, when given
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from torch import nn

from ..layers.linear import LowRankLinear
from .atomic import atomic_output_dir

REPORT_FILE = "rankwise_report.json"


def _outer_factorized(model: nn.Module):
    """``(name, module)`` of every factorized layer (a LowRankLinear or a module with ``spec()``) not inside
    another one: a layer built of factorized children is rebuilt whole from its own spec."""
    outer: list[str] = []
    for name, m in model.named_modules():
        if not (isinstance(m, LowRankLinear) or callable(getattr(m, "spec", None))):
            continue
        if any(name.startswith(prefix + ".") for prefix in outer):
            continue
        outer.append(name)
        yield name, m


def low_rank_ranks(model: nn.Module) -> dict[str, int]:
    """``{qualified name: rank}`` of every ``LowRankLinear`` in ``model`` (not inside another factorized layer)."""
    return {name: m.rank for name, m in _outer_factorized(model) if isinstance(m, LowRankLinear)}


def factorized_specs(model: nn.Module) -> dict[str, dict]:
    """``{qualified name: spec()}`` of every factorized layer with a ``spec()`` that is not a LowRankLinear
    (nor inside another factorized layer)."""
    return {name: m.spec() for name, m in _outer_factorized(model) if not isinstance(m, LowRankLinear)}


def source_dir(model: nn.Module) -> Path | None:
    """The directory ``model`` was loaded from (``model.name_or_path``), or ``None`` when it was not loaded from one."""
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    return source if str(source) and source.is_dir() else None


def source_name(directory: Path) -> str:
    """How a model card names the input: the GGUF file a rankwise cache dir was converted from, else the path."""
    try:
        return str(json.loads((directory / "rankwise_source.json").read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return str(directory)


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    report=None,
    tokenizer=None,
    quality: dict | None = None,
    force: bool = False,
    card: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (with its ``LowRankLinear`` layers) to ``out_dir``, atomically, with a model card.

    Every file of the directory the model was loaded from that the compression does not change is copied
    (tokenizer, chat template, generation config, sentence-transformers modules, ...; see
    :func:`rankwise.io.sidecar.copy_model_files`), so the output works in the same clients as the input.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model, typically after :func:`rankwise.compress_`. It is not modified.
    out_dir : path
        Output directory; must not exist unless ``force``.
    report : CompressReport, optional
        Stored as ``rankwise_report.json`` (read by ``rankwise info``); the card's method and budget.
    tokenizer : optional
        Saved alongside, over the input directory's tokenizer files.
    quality : dict, optional
        ``{measure: value}`` measured on the compressed model, written into the model card.
    force : bool
        Replace an existing ``out_dir``.
    card : dict, optional
        The model card's ``method`` and ``budget`` lines, instead of those derived from ``report``.

    Returns
    -------
    Path of the written directory.
    """
    from .hf_quantizer import RankwiseConfig
    from .sidecar import copy_model_files, write_model_card

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ValueError(f"save expects a transformers PreTrainedModel, got {type(model).__name__}")
    ranks = low_rank_ranks(model)
    config = RankwiseConfig(ranks, modules=factorized_specs(model))
    had = hasattr(model.config, "quantization_config")
    previous = getattr(model.config, "quantization_config", None)
    source = source_dir(model)
    with atomic_output_dir(out_dir, force=force) as tmp:
        model.config.quantization_config = config.to_dict()
        try:
            model.save_pretrained(tmp)
        finally:
            if had:
                model.config.quantization_config = previous
            else:
                del model.config.quantization_config
        if source is not None:
            copy_model_files(source, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
        named = str(getattr(model, "name_or_path", "") or type(model).__name__)
        base = source_name(source) if source is not None else named
        write_model_card(tmp, base_model=base, **(card or card_text(report, len(ranks))), quality=quality)
    return Path(out_dir)


def card_text(report, n_factorized: int) -> dict[str, str]:
    """The model card's ``method`` and ``budget`` lines for a compression (``report`` may be None)."""
    if report is None:
        return {"method": "compress: low-rank factorization", "budget": f"{n_factorized} layers factorized"}
    c = report.config
    return {
        "method": f"compress: {c.method} factorization, {c.allocate} rank allocation"
        + (", sequential" if c.sequential else ""),
        "budget": f"keep {c.keep} of the targeted layers' parameters "
        f"({report.params_after:,} of {report.params_before:,}; {n_factorized} layers factorized)",
    }


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The ``quantization_config`` of a rankwise directory; ``ValueError`` if ``path`` is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"rankwise directory {str(path)!r} not found")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(path)!r} is not a rankwise directory: it has no config.json")
    try:
        qc = json.loads(config_file.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {str(config_file)!r} is not valid JSON: {exc}") from None
    if qc.get("quant_method") != "rankwise":
        raise ValueError(
            f"{str(path)!r} is not a rankwise directory: "
            "config.json has no quantization_config with quant_method 'rankwise'"
        )
    return qc


def layer_table(path: str | os.PathLike) -> tuple[list, dict[str, int]]:
    """Per-layer ranks and parameter counts of a rankwise directory, read from the file headers only.

    Returns
    -------
    rows : list of ``(name, (out, in), rank, params_after, params_before)``, one per factorized layer,
        in natural name order (block 2 before block 10).
    totals : dict with ``layers_before``/``layers_after`` (factorized layers, dense vs factors) and
        ``model_before``/``model_after`` (every stored tensor, tied ones once).
    """
    from .models import check_safetensors

    path = Path(path)
    qc = read_quantization_config(path)
    ranks, modules = qc["ranks"], qc.get("modules", {})
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"rankwise directory {str(path)!r} has no .safetensors weights")
    from safetensors import safe_open

    for file in files:
        check_safetensors(file)
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    rows = []

    def natural(name: str) -> list:  # layers.2 < layers.10
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

    for name, rank in sorted(ranks.items(), key=lambda item: natural(item[0])):
        key = next((k for k in shapes if k == f"{name}.down.weight" or k.endswith(f".{name}.down.weight")), None)
        if key is None:
            raise ValueError(f"rankwise directory {str(path)!r} lists layer {name!r} but stores no {name}.down.weight")
        stem = key.removesuffix(".down.weight")
        (r, n), (m, _) = shapes[key], shapes[f"{stem}.up.weight"]
        bias = shapes.get(f"{stem}.up.bias", (0,))[0]
        rows.append((name, (m, n), rank, r * (m + n) + bias, m * n + bias))
    for name, spec in sorted(modules.items(), key=lambda item: natural(item[0])):
        if spec["layer"] == "tied_lowrank_head":  # no tensors of its own: its table is the embedding's row
            continue
        after = sum(math.prod(s) for k, s in shapes.items() if k.startswith(f"{name}.") or f".{name}." in k)
        rows.append((name, _dense_shape(spec), _rank_label(spec), after, _dense_params(spec)))
    stored = sum(math.prod(s) for s in shapes.values())
    after, before = sum(r[3] for r in rows), sum(r[4] for r in rows)
    totals = {
        "layers_before": before,
        "layers_after": after,
        "model_before": stored - after + before,
        "model_after": stored,
    }
    return rows, totals


def _rank_label(spec: dict) -> int | str:
    """The rank column of `rankwise info`: a tuple of ranks as "3x2"; quantized layers as "4b" (bits), "2b+r16"
    (with a rank-16 correction), "3b+h" (inputs Hadamard-rotated) or "40@4b" (rank-40 factors at 4 bits)."""
    rank = spec.get("rank", spec.get("ranks"))
    if "bits" in spec:
        correction = f"+r{spec['correction_rank']}" if spec.get("correction_rank") else ""
        correction += "+h" if spec.get("rotation") else ""
        return (f"{rank}@" if rank else "") + f"{spec['bits']}b{correction}"
    return rank if isinstance(rank, int) else "x".join(map(str, rank))


def _dense_shape(spec: dict) -> tuple[int, int]:
    """The dense weight a factorized layer's spec replaces, as a matrix (a kernel as (out, in/groups*kh*kw))."""
    if "kernel_size" in spec:
        return (spec["out_channels"], spec["in_channels"] // spec["groups"] * math.prod(spec["kernel_size"]))
    if "num_embeddings" in spec:
        return (spec["num_embeddings"], spec["embedding_dim"])
    return (spec["out_features"], spec["in_features"])


def _dense_params(spec: dict) -> int:
    bias = spec.get("out_channels", spec.get("out_features", 0)) if spec.get("bias") else 0
    return math.prod(_dense_shape(spec)) + bias


def load(path: str | os.PathLike, *, device: str = "cpu") -> nn.Module:
    """Load a directory written by :func:`save`, as the same transformers class, in eval mode.

    Equivalent to ``AutoModelForCausalLM.from_pretrained(path)`` (``AutoModel`` for encoders) after
    ``import rankwise``; the factorized layers come back as ``LowRankLinear`` with identical weights.
    """
    from .models import load_model

    read_quantization_config(path)
    return load_model(path, device=device)[0]
