"""Read mergekit's YAML merge configs and map them, with mergekit's parameter semantics, onto rankwise methods."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

# mergekit method -> (rankwise method, fixed options, mergekit's defaults of its shared parameters)
_METHODS: dict[str, tuple[str, dict, dict]] = {
    "linear": ("linear", {}, {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", {}, {"normalize": False, "lambda": 1.0}),
    "ties": ("ties", {}, {"normalize": True, "lambda": 1.0, "density": 1.0}),
    "dare_ties": (
        "dare",
        {"sign_consensus": True},
        {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True},
    ),
    "dare_linear": (
        "dare",
        {"sign_consensus": False},
        {"normalize": False, "lambda": 1.0, "density": 1.0, "rescale": True},
    ),
    "model_stock": ("model_stock", {}, {"filter_wise": False}),
}
_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
    "modules",
}
_IGNORED = {"tokenizer_source", "tokenizer", "chat_template"}
_PER_MODEL = {"weight", "density"}
# parameters mergekit accepts that do not change the merged values in rankwise
_NO_EFFECT = {"int8_mask"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class MergeSpec:
    """A mergekit config translated to a rankwise call.

    The call is ``merge_to_dir(models, out, method, base, dtype=..., **options)``.
    """

    method: str
    models: list[Path]
    base: Path | None
    options: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None
    notes: list[str] = field(default_factory=list)


def _scalar(value: object, where: str) -> object:
    if isinstance(value, (list, dict)):
        raise ValueError(
            f"{where} is a per-layer gradient or filter ({value!r}); rankwise reads scalar mergekit parameters only"
        )
    return value


def _path(ref: object, where: str, root: Path) -> Path:
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{where} must be a model path string, got {ref!r}")
    if "+" in ref and not Path(ref).exists():
        raise ValueError(f"{where}={ref!r} applies a LoRA (model+lora); apply it first with `rankwise delta apply`")
    p = Path(ref)
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p  # mergekit resolves against the working directory; a path next to the config also works
    if not p.exists():
        raise FileNotFoundError(
            f"{where} {ref!r} does not exist (rankwise reads local model dirs or .safetensors files only)"
        )
    return p


def _dtype(value: object, key: str) -> torch.dtype:
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{key} must be one of {', '.join(_DTYPES)}, got {value!r}")
    return _DTYPES[name]


def read_mergekit_config(path: str | os.PathLike) -> MergeSpec:
    """Parse a mergekit YAML config into a :class:`MergeSpec`.

    Supported: ``merge_method`` in linear, task_arithmetic, ties, dare_ties, dare_linear, model_stock;
    ``base_model``; ``models: [{model, parameters: {weight, density}}]``; global ``parameters``
    (weight, density, normalize, lambda, rescale, int8_mask, filter_wise: false); ``dtype`` / ``out_dtype``
    (the merged tensors' dtype: rankwise always computes in float32). ``tokenizer_source``, ``tokenizer``
    and ``chat_template`` are ignored with a note (the base's tokenizer files are copied). Defaults are
    mergekit's: e.g. TIES ``density: 1.0`` and ``normalize: true``, DARE ``rescale: true`` (L1-norm
    matching), weights 1.0 when absent. As in mergekit, a model listed in ``models`` that is also
    ``base_model`` is the base, and ``linear`` averages ``base_model`` in with the listed models.

    Raises
    ------
    ValueError naming unknown keys, unsupported methods or features (slices, gradients, LoRA refs);
    FileNotFoundError naming a missing config or model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merge config {str(path)!r} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"merge config {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"merge config {str(path)!r} must be a YAML mapping with merge_method and models")
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {str(path)!r}; accepted: {', '.join(sorted(_TOP_KEYS))}"
        )
    for key in ("slices", "modules"):
        if key in cfg:
            raise ValueError(f"{key!r} in {str(path)!r} is not supported; rankwise reads the 'models' form only")
    mk = cfg.get("merge_method")
    if mk not in _METHODS:
        raise ValueError(f"merge_method {mk!r} in {str(path)!r} is not supported; supported: {', '.join(_METHODS)}")
    method, fixed, defaults = _METHODS[mk]
    root = path.parent
    base = _path(cfg["base_model"], "base_model", root) if cfg.get("base_model") is not None else None
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"models in {str(path)!r} must be a non-empty list of {{model: PATH, parameters: {{...}}}}")

    glob = dict(cfg.get("parameters") or {})
    accepted = (set(defaults) | _PER_MODEL | _NO_EFFECT) - ({"weight", "density"} if mk == "model_stock" else set())
    if mk == "linear":
        accepted -= {"density"}
    bad = sorted(set(glob) - accepted)
    if bad:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, bad))} for merge_method {mk!r}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    glob = {k: _scalar(v, f"parameters.{k}") for k, v in glob.items()}

    models, per_model = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"models[{i}] in {str(path)!r} must be a mapping with a 'model' key, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ValueError(
                f"unknown key(s) {', '.join(map(repr, extra))} in models[{i}]; accepted: model, parameters"
            )
        p = _path(entry["model"], f"models[{i}].model", root)
        params = dict(entry.get("parameters") or {})
        bad = sorted(set(params) - (accepted & _PER_MODEL))
        if bad:
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, bad))} in models[{i}] for merge_method {mk!r}; "
                f"accepted: {', '.join(sorted(accepted & _PER_MODEL)) or 'none'}"
            )
        if base is not None and method != "linear" and p.resolve() == base.resolve():
            continue  # the base listed among the models is the base, not a task
        models.append(p)
        per_model.append({k: _scalar(v, f"models[{i}].parameters.{k}") for k, v in params.items()})

    if mk == "linear" and base is not None:
        # mergekit averages base_model in with the listed models (taking its weight from the global parameters)
        if all(p.resolve() != base.resolve() for p in models):
            models.insert(0, base)
            per_model.insert(0, {})
        base = None

    def resolved(key: str, default: object) -> list:
        return [pm.get(key, glob.get(key, default)) for pm in per_model]

    options = dict(fixed)
    notes = [f"{k!r} is ignored (the base model's tokenizer files are copied)" for k in sorted(_IGNORED & set(cfg))]
    if mk != "model_stock":
        options["weights"] = resolved("weight", 1.0)
    if "density" in defaults:
        options["density"] = resolved("density", defaults["density"])
    if "normalize" in defaults:
        options["normalize"] = bool(glob.get("normalize", defaults["normalize"]))
    if "lambda" in defaults:
        options["scale"] = float(glob.get("lambda", defaults["lambda"]))
    if "rescale" in defaults:
        options["rescale"] = "l1" if glob.get("rescale", defaults["rescale"]) else "none"
        notes.append("dare draws its own seeded masks (--seed); results differ from mergekit's unseeded draws")
    if glob.get("filter_wise"):
        raise ValueError("model_stock with filter_wise: true is not supported; rankwise computes one ratio per tensor")
    out = cfg.get("out_dtype") or cfg.get("dtype")
    dtype = _dtype(out, "out_dtype" if cfg.get("out_dtype") else "dtype") if out is not None else None
    return MergeSpec(method, models, base, options, dtype, notes)
