"""compress_(model, config, calib): the one entry point, its handler chosen by the config's type.

``CompressConfig``: a transformers model's block stack, walk -> calibrate block by block -> factorize ->
allocate -> swap, in place (this module). ``ModuleCompressConfig``: the Conv2d / Linear / Embedding layers of
any nn.Module (:mod:`rankwise.compress_modules`).
"""

from __future__ import annotations

import inspect
import re
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ._validate import fraction, int_at_least, number_in
from .allocate import ALLOCATORS, DEFAULT_ALLOCATOR, allocate_ranks
from .blocks import BlockSource, InMemorySource
from .calibrate import CalibStats, _bar
from .compress_modules import ModuleCompressConfig, compress_module_tree_
from .compress_report import CompressReport, ModuleCompressReport, layer_report
from .formats.svd import SVD
from .head import find_head, swap_head
from .layers.linear import dense_weight
from .metric import factorize, layer_cost, predicted_loss
from .pipeline import HEAD_NEEDS_CALIB, Pipeline, swap_in
from .targets import block_stack, check_finite_weights, find_targets, replace_module
from .workdir import WorkDir

METHODS = ("svd", "asvd", "whiten")
CONFIG_VERSION = 1
CURVE_KEEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # budgets of the report's predicted-loss curve


@dataclass(frozen=True)
class CompressConfig:
    """How to compress; frozen and JSON-serializable (``to_dict`` / ``from_dict``).

    keep : fraction in (0, 1] of the targeted layers' parameters kept (one global budget).
    method : "svd" (data-free), "asvd" (scale by mean|x|^asvd_alpha) or "whiten" (SVD-LLM).
    allocate : rank allocator, a name in ``rankwise.allocate.ALLOCATORS`` (an alias is replaced by the
        current name).
    include, exclude : regexes over qualified module names (default: linear layers of the block stack).
    calib_seqs, seq_len : calibration size used by callers that build ``calib`` from text.
    update : closed-form refit of each layer's up factor on the compressed model's own inputs.
    fisher_seqs : how many calibration sequences also run a backward pass for the Fisher weights.
    min_rank : smallest rank a factorized layer may get.
    sequential : calibrate each block on the outputs of the blocks before it after their compression
        (a second calibration pass once the ranks are allocated).
    include_head : the LM head (with the input embedding when they are tied) is one more target of the one
        budget, priced from the loss-head pass (needs an allocator with loss gradients; with ``sequential``
        the head keeps the factors of the dense model's statistics); a tied table is priced both as the head
        and as the input embedding, and factorized in the head's metric.
    head_weight : factor on the head's predicted loss curve before allocation (1.0: the second-order estimate
        as it is). On SmolLM2 1.0 beats the blocks alone at the same total parameters and 4.0 does better
        again (BENCHMARKS.md; 4.0 was picked by evaluation numbers, so it is not the default).
    """

    version: int = CONFIG_VERSION
    keep: float = 0.8
    method: str = "whiten"
    allocate: str = DEFAULT_ALLOCATOR
    include: str | None = None
    exclude: str | None = None
    calib_seqs: int = 32
    seq_len: int = 512
    update: bool = False  # measured on SmolLM2: the one-shot refit overcompensates (see BENCHMARKS.md)
    asvd_alpha: float = 0.5
    fisher_seqs: int = 8
    min_rank: int = 8
    seed: int = 0
    sequential: bool = False
    include_head: bool = False
    head_weight: float = 1.0

    def __post_init__(self):
        if self.version != CONFIG_VERSION:
            raise ValueError(f"version must be {CONFIG_VERSION} (the only config version), got {self.version!r}")
        fraction(self.keep, "keep")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        object.__setattr__(self, "allocate", ALLOCATORS.get(self.allocate).name)  # frozen: an alias -> its name
        for name in ("calib_seqs", "seq_len", "fisher_seqs", "min_rank", "seed"):
            v = getattr(self, name)
            low = 0 if name in ("fisher_seqs", "seed") else (2 if name == "seq_len" else 1)
            int_at_least(v, name, low)
        if self.needs_loss_gradients and self.fisher_seqs == 0:
            raise ValueError(
                f"fisher_seqs must be >= 1 with allocate={self.allocate!r} (it needs loss gradients), got 0"
            )
        for name in ("update", "sequential", "include_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.update and self.sequential:
            raise ValueError(
                "update and sequential are alternatives (both recalibrate on the compressed model); choose one"
            )
        if self.include_head and (self.update or not self.needs_loss_gradients):
            raise ValueError(
                f"include_head needs an allocator with loss gradients (the head is priced from the loss-head pass) "
                f"and update=False; got allocate={self.allocate!r}, update={self.update}"
            )
        number_in(self.asvd_alpha, "asvd_alpha", 0, 1)
        number_in(self.head_weight, "head_weight", 1e-6, 1e6)
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, str):
                    raise ValueError(f"{name} must be a regex string or None, got {type(v).__name__}")
                try:
                    re.compile(v)
                except re.error as err:
                    raise ValueError(f"{name}={v!r} is not a valid regular expression: {err}") from None

    @property
    def needs_loss_gradients(self) -> bool:
        """Whether the allocator measures layers by loss gradients (its registry entry says so)."""
        return bool(ALLOCATORS.get(self.allocate).meta.get("loss_gradients", False))

    @property
    def needs_data(self) -> bool:
        return self.method != "svd" or self.needs_loss_gradients or self.update or self.sequential

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "version" not in d:
            raise ValueError(f"config has no 'version' key; expected version {CONFIG_VERSION}")
        return cls(**d)


def compress_(
    model: nn.Module,
    config: CompressConfig | ModuleCompressConfig,
    calib=None,
    *,
    stats=None,
    progress: bool = True,
) -> CompressReport | ModuleCompressReport:
    """Compress ``model`` in place as ``config`` says; the handler is chosen by the config's type.

    Parameters
    ----------
    model : nn.Module.
    config : :class:`CompressConfig` (a transformers model, compressed block by block: see
        :func:`compress_blocks_`) or :class:`rankwise.compress_modules.ModuleCompressConfig` (the Conv2d /
        Linear / Embedding layers of any nn.Module: see :func:`rankwise.compress_modules.compress_module_tree_`).
    calib : the model's own calibration inputs: token ids for a ``CompressConfig``; for a
        ``ModuleCompressConfig`` a tensor of examples (images, token ids) or a callable ``run(model, i)``.
    stats : statistics collected once on this dense model, to compress at several budgets (the handler's).
    progress : show progress bars.

    Returns
    -------
    The handler's report: a :class:`CompressReport` (``CompressConfig``) or a
    :class:`rankwise.compress_report.ModuleCompressReport` (``ModuleCompressConfig``); both list their
    targets in ``layers`` and give ``ranks``, ``params_before`` / ``params_after``, ``summary()`` and
    ``to_json()``.

    Raises
    ------
    TypeError for a config of another type (the accepted config classes are named).
    """
    handler = HANDLERS.get(type(config))
    if handler is None:
        accepted = " or ".join(f"rankwise.{cls.__name__}" for cls in HANDLERS)
        raise TypeError(f"config must be a {accepted}, got {type(config).__name__}")
    return handler(model, config, calib, stats=stats, progress=progress)


def compress_blocks_(
    model: nn.Module,
    config: CompressConfig,
    calib: torch.Tensor | None = None,
    *,
    stats: CalibStats | None = None,
    progress: bool = True,
) -> CompressReport:
    """Factorize the target layers of ``model`` in place under one parameter budget, one block at a time.

    The passes of :mod:`rankwise.pipeline` run over the model's block stack: besides the model, memory
    holds one block's statistics and the calibration activations at one block boundary; statistics,
    gradients and factors of the other blocks wait in a temporary directory. To compress a checkpoint
    that does not fit in memory, use :func:`rankwise.streamed.compress_checkpoint` (``rankwise compress``).

    Parameters
    ----------
    model : a transformers model (causal LM or encoder) or any nn.Module whose forward accepts
        ``input_ids`` and ``attention_mask`` and holds its layers in a stack of identical blocks.
    config : :class:`CompressConfig`.
    calib : LongTensor, shape (n_seqs, seq_len), calibration token ids; None only for method "svd"
        with the "uniform" allocator.
    stats : statistics from :func:`rankwise.calibrate.collect_stats` on this same (dense) model and
        ``calib``, to compress at several budgets without calibrating again (with ``fisher_seqs >= 1``
        for an allocator that needs loss gradients).

    Returns
    -------
    :class:`CompressReport`.

    References
    ----------
    X. Wang et al., "SVD-LLM: Truncation-aware SVD for LLM compression", arXiv:2403.07378.
    Z. Yuan et al., "ASVD: Activation-aware SVD for compressing LLMs", arXiv:2312.05821.
    """
    stack = _block_model_stack(model, calib)
    _check_calib(calib, config.needs_data and (stats is None or config.update or config.sequential), config)
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(targets)
    if stats is not None and config.include_head:
        raise ValueError(HEAD_NEEDS_CALIB)
    if stats is not None:
        missing = [n for n in targets if n not in stats.inputs]
        if missing:
            raise ValueError(
                f"stats has no statistics for layer {missing[0]} ({len(missing)} missing); "
                "collect them on this model's targets"
            )
    param = next(model.parameters())
    source = InMemorySource(model, stack[0], param.device)  # computed where the model is
    dtypes = {n: dense_weight(m).dtype for n, m in targets.items()}
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        with tempfile.TemporaryDirectory(prefix="rankwise-") as tmp:
            work = WorkDir(Path(tmp) / "work", {})
            report = run_compression(
                source,
                targets,
                config,
                calib,
                work,
                stats=stats,
                dtype=param.dtype,
                progress=progress,
                emit=lambda i, factors: swap_in(model, factors, dtypes.get),
                emit_head=lambda name, embedding, factors: swap_head(model, name, embedding, factors),
            )
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    if config.update:
        t0 = time.perf_counter()
        from .update import refit_

        new = {n: model.get_submodule(n) for n in report.ranks}
        dense = {n: layer for n, layer in targets.items() if n in new}
        for name, layer in dense.items():  # refit_ compares against the dense layers: put them back first
            replace_module(model, name, layer)
        refit_(model, dense, new, calib, progress=progress)
        for name, layer in new.items():
            replace_module(model, name, layer)
        report.timings["update"] = time.perf_counter() - t0
    return report


HANDLERS = {CompressConfig: compress_blocks_, ModuleCompressConfig: compress_module_tree_}  # config type -> handler


def plan_compression(
    source: BlockSource,
    targets: dict[str, nn.Module],
    config: CompressConfig,
    calib: torch.Tensor | None,
    work: WorkDir,
    *,
    stats: CalibStats | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    keep_stats: bool = False,
) -> tuple[Pipeline, list, dict[str, float]]:
    """Passes A-C over ``source``'s blocks: ``(pipeline, every layer's curve, timings)``; the factors wait
    in ``work``. Any number of budgets can then be allocated (:func:`allocate_layers`) and written.
    With ``config.include_head`` the LM head's curve comes last (``pipe.head`` names it). ``keep_stats``:
    every block's input statistics stay in ``work`` too (:func:`rankwise.pipeline.spilled_stats`)."""
    head = None
    if config.include_head:
        name, layer, embedding = find_head(source.model)
        if name in targets:
            raise ValueError(f"include_head: {name!r} is also matched by include=; drop it from include= or exclude it")
        check_finite_weights({name: layer})
        head = (name, layer, embedding)
    pipe = Pipeline(
        source,
        targets,
        config,
        lambda W, st, name, cache: factorize(W, config, st, name, cache),
        lambda layer, f, st, name: layer_cost(layer, f, st, name, config.needs_loss_gradients),
        work,
        device=getattr(source, "device", torch.device("cpu")),
        dtype=dtype,
        progress=progress,
        head=head,
        keep_stats=keep_stats,
    )
    t0 = time.perf_counter()
    curves = pipe.calibrate(calib, stats)
    spent = time.perf_counter() - t0
    timings = {"factorization": sum(c.seconds for c in curves)}
    timings["calibration"] = spent - timings["factorization"]
    return pipe, curves, timings


def allocate_layers(config: CompressConfig, curves: list, keep: float) -> dict[str, int | None]:
    """``{layer: rank or None (dense)}`` under the budget ``keep`` with the config's allocator."""
    ranks = allocate_ranks(config.allocate, [c.cost for c in curves], float(keep), min_rank=config.min_rank)
    return {c.name: r for c, r in zip(curves, ranks)}


def emit_blocks(pipe: Pipeline, rank_of: dict[str, int | None], emit, progress: bool = True) -> None:
    """``emit(i, {name: SVD truncated to its rank, or None})`` for every block, with block ``i`` loaded."""
    source = pipe.source
    for i in _bar(range(source.num_blocks), progress, "write blocks"):
        spilled = pipe.factors(i)
        source.load_block(i)
        emit(i, {n: None if rank_of[n] is None else f.truncate(rank_of[n]) for n, f in spilled.items()})
        source.release_block(i)


def run_compression(
    source: BlockSource,
    targets: dict[str, nn.Module],
    config: CompressConfig,
    calib: torch.Tensor | None,
    work: WorkDir,
    *,
    emit,
    emit_head=None,
    stats: CalibStats | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    keep_stats: bool = False,
) -> CompressReport:
    """The passes over ``source``'s blocks, the global allocation, then ``emit(i, {name: SVD or None})``
    for every block in order, with block ``i`` loaded (factors truncated to their allocated ranks); with
    ``config.include_head``, then ``emit_head(head name, tied embedding name or None, SVD or None)``.
    ``keep_stats``: as for :func:`plan_compression` (``emit`` may read block ``i``'s statistics)."""
    if config.include_head and emit_head is None:
        raise ValueError("include_head: this compression path cannot write a factorized LM head (no emit_head)")
    pipe, curves, timings = plan_compression(
        source, targets, config, calib, work, stats=stats, dtype=dtype, progress=progress, keep_stats=keep_stats
    )
    t0 = time.perf_counter()
    rank_of = allocate_layers(config, curves, config.keep)
    curve = budget_curve(config, curves)
    timings["allocation"] = time.perf_counter() - t0
    errors: dict[str, float] = {}
    t0 = time.perf_counter()
    if config.sequential:

        def emit_refit(i: int, factors: dict[str, SVD | None]) -> None:  # the refit factors' own errors
            for name, f in factors.items():
                if f is not None:
                    errors[name] = f.tail_error(f.rank) / max(
                        float(torch.linalg.vector_norm(f.spectrum.double())), 1e-300
                    )
            emit(i, factors)

        pipe.sequential(calib, rank_of, emit_refit)
    else:
        emit_blocks(pipe, rank_of, emit, progress)
    head, tied = None, None
    if pipe.head is not None:
        head, tied = pipe.head[0], find_head(source.model)[2]
        r = rank_of[head]
        emit_head(head, tied, None if r is None else pipe.factors("head")[head].truncate(r))
    timings["sequential" if config.sequential else "write"] = time.perf_counter() - t0
    layers = [layer_report(c, rank_of[c.name], errors.get(c.name), tied if c.name == head else None) for c in curves]
    return CompressReport(layers, config, timings, curve=curve)


def budget_curve(config: CompressConfig, curves: list, keeps=CURVE_KEEPS) -> list[dict]:
    """The allocator's choice at each of ``keeps``: ``[{"keep", "params_after", "predicted_loss"}]``, for
    plotting the predicted loss against the budget; a keep too small for ``min_rank`` everywhere is left out."""
    points = []
    for keep in keeps:
        try:
            rank_of = allocate_layers(config, curves, keep)
        except ValueError:
            continue
        ranks = [rank_of[c.name] for c in curves]
        points.append(
            {
                "keep": keep,
                "params_after": sum(c.cost.params(r) for c, r in zip(curves, ranks)),
                "predicted_loss": sum(predicted_loss(c.cost, r) for c, r in zip(curves, ranks)),
            }
        )
    return points


def _block_model_stack(model: nn.Module, calib) -> tuple[str, nn.ModuleList]:
    """The block stack of a model that ``CompressConfig`` can compress (and, when calibration data will run
    through it, whose forward takes ``input_ids``); ``ValueError`` pointing at ``ModuleCompressConfig`` otherwise."""
    any_module = "for the Conv2d / Linear / Embedding layers of any nn.Module use rankwise.ModuleCompressConfig"
    stack = block_stack(model)
    if stack is None:
        raise ValueError(
            f"{type(model).__name__} has no block stack (an nn.ModuleList of identical blocks) to compress block by "
            f"block; {any_module}"
        )
    params = inspect.signature(model.forward).parameters
    if calib is not None and "input_ids" not in params and all(p.kind != p.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"{type(model).__name__}.forward takes no input_ids (CompressConfig calibrates on token ids); {any_module}"
        )
    return stack


def _check_calib(calib, needs_data: bool, config: CompressConfig) -> None:
    if calib is None:
        if needs_data:
            raise ValueError(
                f"calib is required for method={config.method!r}, allocate={config.allocate!r}, "
                f"update={config.update}; "
                "only method='svd' with allocate='uniform' and no update runs without calibration data"
            )
        return
    if (
        not isinstance(calib, torch.Tensor)
        or calib.dtype not in (torch.int64, torch.int32)
        or calib.ndim != 2
        or calib.numel() == 0
    ):
        desc = (
            f"{calib.dtype} tensor of shape {tuple(calib.shape)}"
            if isinstance(calib, torch.Tensor)
            else type(calib).__name__
        )
        raise ValueError(f"calib must be a LongTensor of token ids, shape (n_seqs, seq_len), got {desc}")
