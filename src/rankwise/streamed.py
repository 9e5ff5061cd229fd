"""compress_checkpoint(model, out_dir, config, calib): a checkpoint compressed block by block, never whole in memory.

Blocks are read from the input safetensors one at a time (:class:`rankwise.io.stream.CheckpointSource`),
calibrated, factorized, and written to the output shards as soon as the global allocation has given
their ranks. The output is a rankwise directory (``rankwise.load`` and stock ``from_pretrained`` after
``import rankwise`` reload it), written under a temporary name and renamed when complete. The spill
directory ``<out>.rankwise-run`` keeps what finished blocks computed until the run ends: an interrupted
run continues from it with ``resume=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .compress import CompressConfig, _check_calib, run_compression
from .compress_report import CompressReport
from .head import find_head, swap_head
from .io.atomic import atomic_output_dir
from .io.checkpoint import REPORT_FILE, card_text, factorized_specs, source_name
from .io.lazy import ShardedWriter
from .io.sidecar import copy_model_files, write_model_card
from .io.stream import CheckpointSource, persistent_tensors, release_module
from .pipeline import swap_in
from .targets import find_targets, replace_module
from .workdir import WorkDir, check_free_disk, fingerprint, model_fingerprint


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as torch reads it (``ValueError`` if it cannot)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    return dev


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (``getrusage``; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_dir(out_dir: str | Path) -> Path:
    """The spill directory of a compression writing ``out_dir``."""
    out = Path(out_dir)
    return out.with_name(out.name + ".rankwise-run")


def _spill_bytes(source: CheckpointSource, targets, config: CompressConfig, calib: torch.Tensor) -> int:
    """Upper bound of what the run writes: statistics, stored activations, factors, the output."""
    hidden = int(source.model.config.hidden_size) if hasattr(source.model.config, "hidden_size") else 4096
    acts = calib.numel() * hidden * 4
    grads = source.num_blocks * min(config.fisher_seqs, calib.shape[0]) * calib.shape[1] * hidden * 4
    stats = sum(source.ckpt.shape(source.keys[f"{n}.weight"])[-1] ** 2 * 8 for n in targets)
    factors = sum(4 * torch.Size(source.ckpt.shape(source.keys[f"{n}.weight"])).numel() for n in targets)
    output = sum(f.stat().st_size for f in source.hf_dir.glob("*.safetensors"))
    head = head_spill_bytes(source.model) if config.include_head else 0
    return 2 * acts + grads + stats + factors + head + output


def head_spill_bytes(model) -> int:
    """Upper bound of what ``include_head`` spills. A tied table (vocab, hidden): its statistics (the head input's
    second moment, hidden^2, the logits' expected squared gradients and the predicted token frequencies, vocab
    each) and its factors at full rank ``k`` (U, S,
    Vh and the spectrum), float64 as :mod:`rankwise.pipeline` keeps them. An untied head: its float32 factors, up
    to its largest allocatable rank (U and Vh smaller than the dense weight, S and the spectrum ``k`` each)."""
    _, head, tied = find_head(model)
    vocab, hidden = head.weight.shape
    k = min(vocab, hidden)
    if tied is None:
        return 4 * (vocab * hidden + 2 * k)
    return 8 * (hidden * hidden + 2 * vocab) + 8 * (vocab * k + k + k * hidden + k)


class StreamedRun:
    """One model read block by block, its targets, its spill directory; writes rankwise directories.

    Use as a context manager (the checkpoint is closed on exit). See :func:`compress_checkpoint` for the
    parameters and errors; ``extra``: more fields of the spill directory's manifest (what else a ``resume``
    must match).
    """

    def __init__(
        self,
        model,
        work_dir: Path,
        config: CompressConfig,
        calib: torch.Tensor | None,
        *,
        device="auto",
        resume: bool = False,
        force: bool = False,
        progress: bool = True,
        disk_for: Path | None = None,
        extra: dict | None = None,
    ):
        from transformers import AutoModel, AutoModelForCausalLM

        from .io.models import dir_kind, model_dir

        if not isinstance(config, CompressConfig):
            raise ValueError(f"config must be a rankwise.CompressConfig, got {type(config).__name__}")
        _check_calib(calib, config.needs_data, config)
        self.config, self.calib, self.progress = config, calib, progress
        dev = resolve_device(device)
        self.hf_dir = model_dir(model, progress=progress)
        auto = AutoModelForCausalLM if dir_kind(self.hf_dir) == "causal-lm" else AutoModel
        self.source = CheckpointSource(self.hf_dir, auto, None, dev, torch.float32)
        try:
            self.targets = find_targets(self.source.model, config.include, config.exclude)
            manifest = {
                "model": model_fingerprint(self.hf_dir),
                "config": config.to_dict(),
                "calib": None if calib is None else [list(calib.shape), fingerprint(calib)],
                **(extra or {}),
            }
            check_free_disk(
                Path(disk_for or work_dir).parent,
                _spill_bytes(self.source, self.targets, config, calib if calib is not None else torch.zeros(1, 1)),
                "the spilled statistics and the output",
            )
            self.work = WorkDir(work_dir, manifest, resume=resume, force=force)
        except BaseException:
            self.source.close()
            raise
        self.stored = {name: self.source.stored_dtype(name) for name in self.source.keys}
        self.head: tuple[str, str | None] | None = None  # (head, tied embedding) once factorized

    def write_head(self, name: str, embedding: str | None, factors) -> None:
        """``emit_head`` for :func:`rankwise.compress.run_compression`: swaps the factorized head (and its tied
        embedding) into the model; :meth:`write` writes their tensors in place of the dense ones."""
        swap_head(self.source.model, name, embedding, factors)
        if factors is not None:
            self.head = (name, embedding)

    def __enter__(self) -> StreamedRun:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None and issubclass(kind, (ValueError, FileNotFoundError, FileExistsError)):
            self.work.remove()  # bad input: nothing of this run is worth resuming
        self.source.close()

    def swap(self, new: dict[str, nn.Module]) -> None:
        """Put the layers ``new`` (qualified name -> module) into the loaded model in place of the ones there,
        which return to the meta device at once (the run's target list still names the dense ones)."""
        for name, layer in new.items():
            old = self.source.model.get_submodule(name)
            replace_module(self.source.model, name, layer)
            release_module(old)

    def swap_factors(self, factors) -> None:
        """:func:`rankwise.pipeline.swap_in` (float32 ``LowRankLinear`` layers from ``{name: SVD or None}``), the
        dense layers swapped out returned to the meta device."""
        dense = [self.source.model.get_submodule(name) for name, f in factors.items() if f is not None]
        swap_in(self.source.model, factors, lambda name: torch.float32)
        for layer in dense:
            release_module(layer)

    def write_block(self, writer: ShardedWriter, i: int) -> None:
        """Write block ``i``'s tensors: the dense ones in the dtype the checkpoint stored them in, a low-rank
        layer's factors and bias in the stored dtype of the weight and bias they replace, the tensors of other
        replaced layers (packed codes, float16 scales ...) as the layer holds them."""
        source, stored = self.source, self.stored
        prefix = f"{source.stack_name}.{i}."
        for name, t in persistent_tensors(source.stack[i]).items():
            full = prefix + name
            owner, _, leaf = full.rpartition(".")
            if full in stored:
                dtype = stored[full]
            elif owner.endswith((".down", ".up")) and isinstance(source.model.get_submodule(owner), nn.Linear):
                layer = owner.rsplit(".", 1)[0]  # a LowRankLinear's <layer>.down.weight / <layer>.up.bias
                dtype = stored[f"{layer}.bias" if leaf == "bias" else f"{layer}.weight"]
            else:
                dtype = t.dtype
            writer.add(full, t.detach().to(dtype))

    def block_writer(self, writer: ShardedWriter):
        """``emit(i, factors)`` for :func:`rankwise.compress.run_compression`: swaps the factorized layers
        into block ``i`` and writes its tensors (:meth:`write_block`)."""

        def write_block(i: int, factors) -> None:
            self.swap_factors(factors)
            self.write_block(writer, i)

        return write_block

    def _write_head(self, writer: ShardedWriter) -> tuple[str, ...]:
        """Write the factorized head's (or tied embedding's) tensors; the prefixes of the dense ones they replace."""
        if self.head is None:
            return ()
        replaced = tuple(n for n in self.head if n is not None)
        dtype = next(self.stored[f"{n}.weight"] for n in replaced if f"{n}.weight" in self.stored)  # the table's
        for module in replaced:
            for name, t in persistent_tensors(self.source.model.get_submodule(module)).items():
                writer.add(f"{module}.{name}", t.detach().to(dtype))
        return tuple(m + "." for m in replaced)

    def write(self, out: Path, force: bool, emit_all, card=None):
        """Write a rankwise directory atomically: ``emit_all(writer) -> report`` writes the blocks (with
        :meth:`block_writer` or :meth:`write_block`), then the tensors outside the stack, the config, the input's
        other files and the model card. ``card``: ``report -> {"method", "budget"}`` for a report that is not a
        :class:`~rankwise.compress_report.CompressReport` (then no ``rankwise_report.json`` is written)."""
        from transformers import AutoConfig

        from .io.hf_quantizer import RankwiseConfig

        with atomic_output_dir(out, force=force) as tmp:
            writer = ShardedWriter(tmp)
            report = emit_all(writer)
            report.peak_rss_mib = peak_rss_mib()
            skip = (self.source.stack_name + ".", *self._write_head(writer))
            for name, key in self.source.keys.items():
                if not name.startswith(skip):
                    writer.add(name, self.source.ckpt.get(key))
            writer.close()
            cfg = AutoConfig.from_pretrained(self.hf_dir)  # the input's, stored dtype included
            specs = factorized_specs(self.source.model)
            ranks = {} if card else {n: r for n, r in report.ranks.items() if n not in specs}
            cfg.quantization_config = RankwiseConfig(ranks, modules=specs).to_dict()
            if self.head is not None and self.head[1] is not None:
                cfg.tie_word_embeddings = False  # tied by the head's spec (see rankwise.head.swap_head)
            cfg.save_pretrained(tmp)
            copy_model_files(self.hf_dir, tmp)
            text = card(report) if card else card_text(report, len(report.ranks))
            write_model_card(tmp, base_model=source_name(self.hf_dir), **text, quality=None)
            if not card:
                (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
        return report


def compress_checkpoint(
    model: str | Path,
    out_dir: str | Path,
    config: CompressConfig,
    calib: torch.Tensor | None,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> CompressReport:
    """Compress the transformers model ``model`` names into the rankwise directory ``out_dir``.

    Parameters
    ----------
    model : what :func:`rankwise.io.models.model_dir` accepts: a transformers directory with safetensors
        weights, a ``.safetensors`` file in one, a ``.gguf`` file (converted once, cached) or an alias.
    config, calib : as for :func:`rankwise.compress_`.
    device : where each block is computed ("auto": CUDA when present); blocks are computed in float32
        and the output keeps each tensor's stored dtype.
    resume : continue the interrupted run whose spill directory is ``<out_dir>.rankwise-run``.
    force : replace an existing ``out_dir`` (and an interrupted run's spill directory).

    Raises
    ------
    ValueError for bad configuration or calibration data, a checkpoint the model cannot be read from
    (the tensor is named), NaN/Inf weights (named), too little free disk (bytes named) and a
    ``resume`` whose run differs (the field named). FileExistsError for an existing output.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(
            f"output directory {str(out)!r} already exists; pass --force (force=True) to overwrite it"
        )
    with StreamedRun(
        model, run_dir(out), config, calib, device=device, resume=resume, force=force, progress=progress
    ) as run:
        report = run.write(
            out,
            force,
            lambda writer: run_compression(
                run.source,
                run.targets,
                config,
                calib,
                run.work,
                emit=run.block_writer(writer),
                emit_head=run.write_head,
                progress=progress,
            ),
        )
    run.work.remove()
    return report
