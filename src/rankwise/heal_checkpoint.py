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
from .quantize import QuantizeConfig

QUANT_CALIB_SEQS = 32  # healing sequences whose inputs give each layer's X^T X for GPTQ

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
    quant=None,
    force: bool = False,
    progress: bool = True,
) -> HealReport:
    """Heal the rankwise directory ``model`` (:func:`rankwise.heal.heal_`) and write it to ``out_dir``; with
    ``quant``, quantize the healed model's block linears before writing (:func:`quantize_healed_`).

    Parameters
    ----------
    model : a directory written by ``rankwise compress`` / :func:`rankwise.save`; read only.
    out_dir : output directory; must not exist unless ``force``.
    config : :class:`rankwise.heal.HealConfig` (default ``HealConfig()``).
    ref : the dense model (directory, file or alias); default: the base model the model card names.
    text : healing text (default: the built-in calibration half, disjoint from ``rankwise eval``'s).
    tokens, seq_len : how many tokens of ``text`` to read (default all whole sequences), cut into sequences.
    quant : a :class:`rankwise.quantize.QuantizeConfig` without correction (default: no quantization).

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
    if quant is not None and (not isinstance(quant, QuantizeConfig) or quant.correction_rank):
        raise ValueError(f"quant must be a rankwise QuantizeConfig without correction_rank, got {quant!r}")
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
    if quant is not None:
        report.quantization = quantize_healed_(student, ids, quant, progress=progress)
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
            f"base model ({loss}, {factors} factors, {report.tokens:,} tokens)"
            + (f", then {quant.bits}-bit GPTQ (group {quant.group_size})" if quant is not None else ""),
            budget=f"{len(qc['ranks']) + len(qc.get('modules', {}))} layers factorized; "
            f"{report.trained_params:,} parameters healed",
        )
    return report


@torch.no_grad()
def quantize_healed_(student: torch.nn.Module, ids: torch.Tensor, quant: QuantizeConfig, *, progress: bool = True):
    """Quantize every block linear of the healed ``student`` in place, as ``rankwise compress --bits`` does: the
    factors of its low-rank layers, the layers left dense as they are. GPTQ's ``X^T X`` is each layer's input on
    the first :data:`QUANT_CALIB_SEQS` healing sequences, through the healed model (the inputs it will see).
    Returns the :class:`rankwise.quant_checkpoint.QuantRunReport`'s figures as a dict."""
    from .calibrate import collect_stats
    from .layers.linear import LowRankLinear
    from .quant_checkpoint import QuantRunReport
    from .quantize import layer_weight, module_bytes, quantize_
    from .targets import block_stack, inside_low_rank, is_linear

    prefix = block_stack(student)[0] + "."
    targets = {
        n: m
        for n, m in student.named_modules()
        if n.startswith(prefix) and (isinstance(m, LowRankLinear) or (is_linear(m) and not inside_low_rank(student, n)))
    }
    stats = collect_stats(student, targets, ids[:QUANT_CALIB_SEQS], fisher_seqs=0, progress=progress)
    weights = sum(layer_weight(m).numel() for m in targets.values())
    reports = quantize_(student, {n: quant for n in targets}, stats, progress=progress)
    target_bytes = sum(r.bytes for r in reports)
    method = f"{quant.bits}-bit GPTQ of the healed factors"
    run = QuantRunReport(reports, weights, target_bytes, module_bytes(student), method)
    return {"summary": run.summary(), "bits_per_weight": run.bits_per_weight, "model_bytes": run.model_bytes}
