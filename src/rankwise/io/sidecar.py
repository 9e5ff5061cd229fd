"""The files a model directory carries besides its weights (tokenizer, chat template, sentence-transformers
modules, generation config), copied into every directory rankwise writes, and the model card it adds."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

CARD_NAME = "README.md"
# config.json is rewritten by every writer; README.md is replaced by the card (write_model_card); the
# two rankwise files describe the input (its compression report, the GGUF a cache dir was converted from)
REWRITTEN = frozenset({"config.json", CARD_NAME, "rankwise_report.json", "rankwise_source.json"})
# weights of the model itself at the top level: the writer stores the new ones
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
    ".ot",
    ".tflite",
)
# exports of the dense weights for other runtimes (sentence-transformers' ONNX / OpenVINO backends read
# them): copied, they would silently serve the unchanged model
EXPORT_DIRS = frozenset({"onnx", "openvino"})
# sentence-transformers modules whose load reads no files, so a modules.json entry naming a folder that
# does not exist is harmless for them (all-MiniLM-L6-v2 ships such a "2_Normalize" entry)
STATELESS_MODULES = frozenset({"sentence_transformers.models.Normalize"})


class SidecarWarning(UserWarning):
    """A file of the input model that is copied as it is although it looks broken or inconsistent."""


def _warn(message: str) -> None:
    warnings.warn(message, SidecarWarning, stacklevel=3)


def _is_weight_file(rel: Path) -> bool:
    name = rel.name
    return len(rel.parts) == 1 and (name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"))


def _sidecar_files(src: Path) -> list[Path]:
    """Relative paths of the files to copy, sorted; hidden files and folders (.git, .cache) are skipped."""
    found = []
    for root, dirs, files in os.walk(src):
        rel_root = Path(root).relative_to(src)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (rel_root == Path() and d in EXPORT_DIRS))
        for name in files:
            rel = rel_root / name
            if name.startswith(".") or _is_weight_file(rel) or (len(rel.parts) == 1 and name in REWRITTEN):
                continue
            found.append(rel)
    return sorted(found)


def _check_modules_json(src: Path) -> None:
    """Warn (once per problem) when sentence-transformers' modules.json is unreadable or names missing folders."""
    file = src / "modules.json"
    if not file.is_file():
        return
    try:
        modules = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError("expected a JSON list of module objects")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        _warn(f"{str(file)!r} is not a valid sentence-transformers modules.json ({reason}); copied as it is")
        return
    for m in modules:
        folder = m.get("path")
        if folder and not (src / str(folder)).is_dir() and m.get("type") not in STATELESS_MODULES:
            _warn(
                f"{str(file)!r} names module folder {folder!r}, which {str(src)!r} lacks; modules.json copied as it is"
            )


def copy_model_files(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy every file of the model directory ``src_dir`` that a rewritten model keeps unchanged into ``out_dir``.

    That is everything except the model's own weights (``*.safetensors``, ``*.bin``, ... and their
    ``*.index.json`` at the top level), ``config.json`` (rewritten by the writer), ``README.md`` (replaced by
    :func:`write_model_card`), rankwise's own ``rankwise_report.json`` / ``rankwise_source.json``, the
    ``onnx/`` and ``openvino/`` exports of the old weights, and hidden files. Sub-folders are copied whole,
    weights included: sentence-transformers keeps e.g. a ``2_Dense/`` projection there, which rankwise does
    not change. Symbolic links (Hugging Face cache snapshots) are copied as the files they point to.

    A file of the same relative path already in ``out_dir`` is replaced: the input's tokenizer, chat
    template and generation config are authoritative over re-serialized copies.

    Broken sidecars never raise, since this runs after the expensive work: a ``modules.json`` that is not
    valid JSON or names a missing module folder, and any ``*.json`` sidecar that does not parse, is copied
    as it is with a one-line :class:`SidecarWarning`; a file that cannot be read is skipped with one.

    Parameters
    ----------
    src_dir : the input model's directory (``model.name_or_path`` of a model loaded from one).
    out_dir : the output directory, which must exist (typically the temporary directory of an atomic write).

    Returns
    -------
    list of str, the relative (POSIX) paths copied, sorted.
    """
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"src_dir {str(src)!r} is not a directory")
    if not out.is_dir():
        raise FileNotFoundError(f"out_dir {str(out)!r} is not a directory")
    _check_modules_json(src)
    copied = []
    for rel in _sidecar_files(src):
        target = out / rel
        try:
            if rel.suffix == ".json":
                try:
                    json.loads((src / rel).read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    _warn(f"{str(src / rel)!r} is not valid JSON ({exc}); copied as it is")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)
        except OSError as exc:
            _warn(f"{str(src / rel)!r} could not be copied ({exc.strerror or exc}); the output lacks it")
            continue
        copied.append(rel.as_posix())
    return copied


def _is_low_rank_dir(out: Path) -> bool:
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "rankwise"


def _card_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_model_card(
    out_dir: str | os.PathLike, *, base_model: str, method: str, budget: str, quality: dict | None
) -> Path:
    """Write ``out_dir/README.md``: what the directory holds, how it was made, how to load it, its measured quality.

    The YAML front matter (``base_model``, ``library_name``, ``tags``) is what the Hugging Face Hub indexes;
    ``library_name`` is ``sentence-transformers`` when ``out_dir`` holds a ``modules.json``.

    Parameters
    ----------
    out_dir : an existing model directory (its sidecars already copied).
    base_model : the model the directory was made from (a Hub id or a path).
    method : what rankwise did, e.g. ``"compress: whiten + loss-aware allocation"`` or ``"merge: ties"``.
    budget : the budget in words, e.g. ``"keep 0.8 of the block linears' parameters"``.
    quality : ``{measure: value}`` measured on this directory (perplexity, KL divergence to the base, ...),
        or ``None`` when not measured; the card then says how to measure it.

    Returns
    -------
    Path of the card.
    """
    from .. import __version__

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"out_dir {str(out)!r} is not a directory")
    for name, value in (("base_model", base_model), ("method", method), ("budget", budget)):
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            raise ValueError(f"{name} must be a non-empty one-line string, got {value!r}")
    if quality is not None and not isinstance(quality, dict):
        raise ValueError(f"quality must be a dict of measure -> value or None, got {type(quality).__name__}")
    library = "sentence-transformers" if (out / "modules.json").is_file() else "transformers"
    lines = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        f"library_name: {library}",
        "tags:",
        "- rankwise",
        "- low-rank",
        "---",
        "",
        f"# {Path(base_model).name or base_model}, {method}",
        "",
        f"`{base_model}` rewritten by [rankwise](https://pypi.org/project/rankwise/) {__version__}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}` |",
        f"| method | {method} |",
        f"| budget | {budget} |",
        f"| rankwise version | {__version__} |",
        "",
        "## Quality",
        "",
    ]
    if quality:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {name} | {_card_value(value)} |" for name, value in quality.items()]
    else:
        lines.append(f"Not measured when written; `rankwise eval THIS_DIR --ref {base_model}` measures it.")
    lines += ["", "## Loading", "", "```python"]
    if _is_low_rank_dir(out):
        lines.append("import rankwise  # registers the low-rank layers with transformers' from_pretrained")
    lines += [
        "from transformers import AutoModel  # or AutoModelForCausalLM, or sentence_transformers.SentenceTransformer",
        'model = AutoModel.from_pretrained("THIS_DIR")',
        "```",
        "",
    ]
    card = out / CARD_NAME
    card.write_text("\n".join(lines), encoding="utf-8")
    return card


def card_base_model(model_dir: str | os.PathLike) -> str | None:
    """The ``base_model`` a rankwise model card (:func:`write_model_card`) names, or ``None`` when the
    directory has no card or its front matter names none."""
    try:
        lines = (Path(model_dir) / CARD_NAME).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0] != "---":
        return None
    for line in lines[1:]:
        if line == "---":
            return None
        if line.startswith("base_model: "):
            try:
                value = json.loads(line.removeprefix("base_model: "))
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, str) and value else None
    return None
