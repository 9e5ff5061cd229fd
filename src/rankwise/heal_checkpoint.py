"""heal_checkpoint(dir, out, config): heal a rankwise directory towards its dense model and write a new one.

The dense teacher is ``ref`` or, by default, the base model the directory's model card names (what
``rankwise compress`` recorded). The healing text defaults to ``builtin_text("calib")``, the half of the
built-in text that ``rankwise eval`` never reads. The output is written under a temporary name and renamed
when complete: bad input, an error or an interrupt (Ctrl-C) leave no partial output and the input untouched.

Memory: with full-vocabulary KL (``top_k=0``) the teacher runs on the fly beside the student, both in the
stored dtype (SmolLM2-135M: two float32 copies, ~1.1 GB); with ``top_k=k`` the teacher is loaded first,
its top-k log-probabilities over the healing text are cached (n_tokens x k x 12 bytes) and it is freed
before the student is loaded, so only one model is ever in memory.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import torch

from ._validate import is_int
from .heal import HealConfig, HealReport, heal_, teacher_top_k

HEAL_REPORT_FILE = "rankwise_heal.json"


def healing_ids(tokenizer, text: str | None, seq_len: int, tokens: int | None) -> torch.Tensor:
    """The healing sequences: ``tokens // seq_len`` of them (``None``: as many as the text holds).

    ``ValueError`` when ``tokens`` is below ``seq_len`` or the text holds fewer tokens than needed (named).
    """
    from .data import builtin_text, token_sequences

    if tokens is not None and (not is_int(tokens) or tokens < seq_len):
        raise ValueError(f"the healing tokens must be an int >= the sequence length ({seq_len}), got {tokens!r}")
    text = builtin_text("calib") if text is None else text
    return token_sequences(tokenizer, text, seq_len, None if tokens is None else tokens // seq_len, what="healing")


def resolve_teacher(path: Path, ref: str | os.PathLike | None) -> Path:
    """The dense model's directory: ``ref``, else the ``base_model`` of ``path``'s model card."""
    from .io.models import model_dir
    from .io.sidecar import card_base_model

    if ref is None:
        ref = card_base_model(path)
        if ref is None:
            raise ValueError(
                f"{str(path)!r} names no base model (no base_model in its README.md model card): "
                "pass --ref MODEL, the dense model it was compressed from"
            )
    return model_dir(ref)


def heal_checkpoint(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: HealConfig | None = None,
    *,
    ref: str | os.PathLike | None = None,
    text: str | None = None,
    tokens: int | None = None,
    seq_len: int = 512,
    force: bool = False,
    progress: bool = True,
) -> HealReport:
    """Heal the rankwise directory ``model`` (:func:`rankwise.heal.heal_`) and write it to ``out_dir``.

    Parameters
    ----------
    model : a directory written by ``rankwise compress`` / :func:`rankwise.save`; read only.
    out_dir : output directory; must not exist unless ``force``.
    config : :class:`rankwise.heal.HealConfig` (default ``HealConfig()``).
    ref : the dense model (directory, file or alias); default: the base model the model card names.
    text : healing text (default: the built-in calibration half, disjoint from ``rankwise eval``'s).
    tokens, seq_len : how many tokens of ``text`` to read (default all whole sequences), cut into sequences.

    Returns
    -------
    HealReport; the output holds it as ``rankwise_heal.json`` beside the input's compression report.

    Raises
    ------
    FileExistsError for an existing output; FileNotFoundError / ValueError for a directory that is not a
    rankwise checkpoint (what it lacks is named), no base model to distil from, or too little healing text
    (the tokens needed are named).
    """
    from .io.atomic import atomic_output_dir
    from .io.checkpoint import REPORT_FILE, load, read_quantization_config, save, source_name
    from .io.models import load_tokenizer, load_weights, model_dir
    from .io.sidecar import write_model_card

    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(
            f"output directory {str(out)!r} already exists; pass --force (force=True) to overwrite it"
        )
    config = HealConfig() if config is None else config
    if not isinstance(config, HealConfig):
        raise ValueError(f"config must be a rankwise.heal.HealConfig, got {type(config).__name__}")
    path = Path(model)
    qc = read_quantization_config(path)
    model_dir(path)  # config.json and intact safetensors weights
    teacher_dir = resolve_teacher(path, ref)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(
            f"rankwise directory {str(path)!r} has no tokenizer files, so the healing text cannot be tokenized"
        )
    ids = healing_ids(tokenizer, text, seq_len, tokens)
    teacher, _ = load_weights(teacher_dir)
    cached = None
    if config.top_k:
        cached = teacher_top_k(teacher, ids, config.top_k, progress=progress)
        teacher = None
        gc.collect()
    student = load(path)
    report = heal_(student, teacher, ids, config, cached=cached, progress=progress)
    base = source_name(teacher_dir)
    with atomic_output_dir(out, force=force) as tmp:
        save(student, tmp, force=True)
        if (path / REPORT_FILE).is_file():
            shutil.copyfile(path / REPORT_FILE, tmp / REPORT_FILE)
        (tmp / HEAL_REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
        factors = "orthonormal" if config.orthogonal else "free"
        loss = f"top-{config.top_k} KL" if config.top_k else "full-vocabulary KL"
        write_model_card(
            tmp,
            base_model=base,
            quality=None,
            method=f"compress, then heal: {len(report.losses)} steps of distillation towards the "
            f"base model ({loss}, {factors} factors, {report.tokens:,} tokens)",
            budget=f"{len(qc['ranks']) + len(qc.get('modules', {}))} layers factorized; "
            f"{report.trained_params:,} parameters healed",
        )
    return report
