"""compress_(model, ModuleCompressConfig(...), inputs): factorize the Conv2d / Linear / Embedding layers of any
nn.Module under one parameter budget, data-aware, choosing each layer's format (SVD, Tucker-2, CP) and rank together.

Per layer, every candidate (format, rank) gets a predicted loss increase in one unit (see
:mod:`rankwise.calibrate_modules`): ``s * ||D (W - W') L||_F^2`` with ``D`` the output-channel loss-gradient
weights, ``L`` the input whitening factor and ``s`` the mean output-gradient second moment. For the SVD of the
(out, in*kh*kw) kernel ``L`` whitens the full patch covariance and the prediction is exact (the truncated SVD of
``D W L``); for Tucker-2 and CP ``L`` whitens the input-channel mode by the channel covariance averaged over the
kernel offsets (the patch metric without cross-offset correlations; exact for 1x1 kernels). One allocator
(:func:`rankwise.allocate.allocate_options`) then picks the option of every layer minimising the summed
prediction within ``keep`` of the targets' dense parameters and, with ``keep_macs``, within that fraction of
their dense MACs at the calibrated input sizes (:mod:`rankwise.macs`; for speed: parameters and time are not
where each other are in a CNN, whose high-resolution layers hold few parameters and many MACs). With
``sequential`` the chosen layers are then refitted in module order so that each one's outputs on its inputs in
the model compressed so far match the dense layer's outputs on the dense model's inputs (asymmetric
reconstruction, :mod:`rankwise.refit_modules`).

References
----------
X. Wang et al., "SVD-LLM: Truncation-aware SVD for LLM compression", arXiv:2403.07378 (whitening).
Y.-C. Hsu et al., "Language model compression with weighted low-rank factorization", arXiv:2207.00112.
Y.-D. Kim et al., "Compression of deep convolutional neural networks ...", arXiv:1511.06530 (Tucker-2).
V. Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned CP-decomposition",
arXiv:1412.6553.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from ._validate import fraction
from .allocate import allocate_options
from .calibrate_modules import ModuleStats, collect_module_stats
from .compress_report import ModuleCompressReport, ModuleLayerReport
from .formats._ops import check_tolerance
from .formats.cp import CP, cp_als
from .formats.svd import whitened_svd, whitening_factor
from .formats.tucker import Tucker, tucker_hooi, tucker_hosvd
from .layer_options import Option, format_options
from .layers.conv import CPConv2d, SVDConv2d, TuckerConv2d
from .layers.embedding import LowRankEmbedding
from .layers.linear import LowRankLinear
from .macs import allocate_budgets, conv_macs, matrix_macs
from .refit_modules import refit_target
from .targets import replace_module

CONV_FORMATS = ("svd", "tucker", "cp")
KINDS = {"conv2d": nn.Conv2d, "linear": nn.Linear, "embedding": nn.Embedding}


@dataclass(frozen=True)
class ModuleCompressConfig:
    """How :func:`rankwise.compress_` compresses any nn.Module; frozen, JSON-serializable with ``asdict``.

    keep : fraction in (0, 1] of the targets' dense parameters kept (one global budget).
    keep_macs : None, or fraction in (0, 1] of the targets' dense MACs per calibration example kept (a second
        budget, at the input sizes seen in calibration; ``keep=1`` leaves the MACs the only budget).
    format : conv format, "auto" (the allocator chooses among ``auto_formats``), "svd", "tucker" or "cp".
    auto_formats : formats "auto" compares (CP costs an ALS per candidate rank, so it is opt-in).
    method : "whiten" (data-aware) or "svd" (data-free; no calibration inputs needed).
    fisher : weight the predicted losses by loss-gradient second moments (needs backward passes).
    fisher_channels : with ``fisher``, weight each output channel by its own second moment (True), or every
        channel of a layer by the layer's mean (False: the layers' scales only; the factors then fit the
        unweighted whitened kernel). Per-channel weights estimated from a few batches can hurt: on EasyOCR's
        recognizer with 128 calibration words they lowered the word accuracy at keep 0.2 from 0.949 to 0.906
        on 256 held-out calibration words, and made it move with the calibration words (BENCHMARKS.md).
    kinds : which layer types are targets, among "conv2d", "linear", "embedding".
    include, exclude : regexes over qualified module names.
    min_in_channels : convolutions with fewer input channels (e.g. the first, on images) stay dense.
    batch_size, batches : calibration batching (tensor inputs / callable inputs).
    cp_fractions : the parameter fractions at which CP candidates are fitted.
    damping : relative ridge of the input whitening (see :func:`rankwise.formats.whitening_factor`).
    sequential : after the allocation, refit each chosen layer at its option, in module order, so that its
        outputs on its inputs in the model compressed so far match the dense layer's on the dense model's inputs
        (two forwards of the calibration batches per refitted layer, each stopped at that layer; the ridge of
        that least-squares fit is ``damping``); needs ``inputs`` even with ``stats``.
    """

    keep: float = 0.3
    keep_macs: float | None = None
    format: str = "auto"
    auto_formats: tuple[str, ...] = ("svd", "tucker")
    method: str = "whiten"
    fisher: bool = True
    fisher_channels: bool = True
    kinds: tuple[str, ...] = ("conv2d",)
    include: str | None = None
    exclude: str | None = None
    min_in_channels: int = 2
    batch_size: int = 32
    batches: int = 8
    cp_fractions: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.45)
    cp_iters: int = 30
    damping: float = 1e-6
    seed: int = 0
    sequential: bool = False

    def __post_init__(self):
        fraction(self.keep, "keep")
        fraction(self.keep_macs, "keep_macs", none_ok=True)
        check_tolerance(self.damping, "damping")
        if self.keep_macs is not None and self.method == "svd":
            raise ValueError(
                "keep_macs needs the layers' input sizes from calibration, which method='svd' (data-free) skips; "
                "accepted: method='whiten' with keep_macs, or keep_macs=None"
            )
        for name in ("fisher", "fisher_channels", "sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.sequential and self.method == "svd":
            raise ValueError(
                "sequential refits on input statistics, which method='svd' (data-free) skips; accepted: "
                "method='whiten' with sequential=True, or sequential=False"
            )
        if self.format not in ("auto", *CONV_FORMATS):
            raise ValueError(f"format must be one of auto, {', '.join(CONV_FORMATS)}, got {self.format!r}")
        bad = [f for f in self.auto_formats if f not in CONV_FORMATS]
        if not self.auto_formats or bad:
            raise ValueError(
                f"auto_formats must be a non-empty subset of {', '.join(CONV_FORMATS)}, got {self.auto_formats!r}"
            )
        if self.method not in ("whiten", "svd"):
            raise ValueError(f"method must be 'whiten' or 'svd', got {self.method!r}")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {', '.join(KINDS)}, got {self.kinds!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is not None:
                try:
                    re.compile(value)
                except (re.error, TypeError) as err:
                    raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}") from None
        for name in ("min_in_channels", "batch_size", "batches", "cp_iters"):
            if (
                isinstance(getattr(self, name), bool)
                or not isinstance(getattr(self, name), int)
                or getattr(self, name) < 1
            ):
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")

    @property
    def formats(self) -> tuple[str, ...]:
        return self.auto_formats if self.format == "auto" else (self.format,)


def find_module_targets(model: nn.Module, config: ModuleCompressConfig) -> dict[str, nn.Module]:
    """Qualified name -> layer for every Conv2d (groups=1, >= min_in_channels inputs) / Linear / Embedding
    of the chosen kinds, in module order, filtered by ``include`` / ``exclude``."""
    kinds = tuple(KINDS[k] for k in config.kinds)
    targets = {}
    for name, module in model.named_modules():
        if type(module) not in kinds:
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.in_channels < config.min_in_channels):
            continue
        if config.include and not re.search(config.include, name):
            continue
        if config.exclude and re.search(config.exclude, name):
            continue
        targets[name] = module
    if not targets:
        raise ValueError(
            f"no target layer of kinds {', '.join(config.kinds)} in this {type(model).__name__} "
            f"(include={config.include!r}, exclude={config.exclude!r})"
        )
    return targets


class _Metric:
    """The loss metric of one layer: output weights ``rows`` (D), input factor ``whitening`` (L), scale s."""

    def __init__(self, stats: ModuleStats | None, config: ModuleCompressConfig, n_out: int, whiten: bool = True):
        self.rows, self.scale, self.whitening = None, 1.0, None
        if stats is None:
            return
        if config.fisher and stats.grad_sq is not None and config.fisher_channels:
            g = stats.grad_sq.double()
            g = g.clamp_min(max(float(g.mean()), 1e-300) * 1e-4)  # no zero rows: D must stay invertible
            self.scale = float(g.mean())
            self.rows = torch.sqrt(g / self.scale)
        elif config.fisher and stats.grad_sq is not None:
            self.scale = float(stats.grad_sq.double().mean())
        if stats.gram is not None and whiten:  # the full patch whitening serves the SVD only
            self.whitening = whitening_factor(stats.gram, damping=config.damping)


def _sizes(stats: ModuleStats | None) -> torch.Tensor | None:
    return None if stats is None else stats.sizes


def _conv_candidates(conv: nn.Conv2d, stats: ModuleStats | None, config: ModuleCompressConfig):
    W = conv.weight.detach().double()
    out, cin, kh, kw = W.shape
    bias = 0 if conv.bias is None else out
    dense_params = W.numel() + bias
    sizes, priced = _sizes(stats), config.keep_macs is not None
    metric = _Metric(stats, config, out, whiten="svd" in config.formats)
    dense = Option(None, None, dense_params, 0.0, None if sizes is None else conv_macs(conv, sizes, None))
    options, fits = [dense], {}

    def macs(fmt, r0, r1=None):
        return None if sizes is None else conv_macs(conv, sizes, fmt, r0.double(), None if r1 is None else r1.double())

    if "svd" in config.formats:
        f = whitened_svd(W.reshape(out, -1), whitening=metric.whitening, rows=metric.rows)
        fits["svd"] = f
        rmax = min(out, cin * kh * kw)
        tail = torch.flip(torch.cumsum(torch.flip(f.spectrum.double() ** 2, [0]), 0), [0])
        tail = torch.cat([tail, tail.new_zeros(max(rmax + 1 - len(tail), 0))])
        r = torch.arange(1, rmax + 1)
        loss = metric.scale * tail[r]
        options += format_options(
            "svd", r[:, None], r * (cin * kh * kw + out) + bias, loss, macs("svd", r), dense, priced
        )
    if "tucker" in config.formats or "cp" in config.formats:
        L_in = None
        if stats is not None and stats.gram is not None:
            gram = stats.gram.reshape(cin, kh * kw, cin, kh * kw)
            # the mean of the per-offset channel covariances: ||(W - W') x_1 L_in^T||^2 is then the patch metric
            # with the cross-offset correlations dropped (exact for 1x1 kernels), in the same units as the SVD's
            L_in = whitening_factor(torch.einsum("akbk->ab", gram) / (kh * kw), damping=config.damping)
        Wp = W if L_in is None else torch.einsum("oihw,ij->ojhw", W, L_in)
        Wp = Wp if metric.rows is None else Wp * metric.rows[:, None, None, None]
        fits["weighted"], fits["L_in"] = Wp, L_in
        energy = float(Wp.norm()) ** 2
    if "tucker" in config.formats:
        full = tucker_hosvd(Wp, (min(out, cin * kh * kw), min(cin, out * kh * kw)), modes=(0, 1))
        kept = torch.cumsum(torch.cumsum((full.core.double() ** 2).sum((2, 3)), 0), 1)
        r0s, r1s = torch.meshgrid(torch.arange(1, kept.shape[0] + 1), torch.arange(1, kept.shape[1] + 1), indexing="ij")
        r0s, r1s = r0s.flatten(), r1s.flatten()
        params = out * r0s + r0s * r1s * kh * kw + r1s * cin + bias
        loss = metric.scale * (energy - kept.flatten()).clamp_min(0)
        ranks = torch.stack([r0s, r1s], 1)
        options += format_options("tucker", ranks, params, loss, macs("tucker", r0s, r1s), dense, priced)
    if "cp" in config.formats:
        ranks, losses = [], []
        for frac in config.cp_fractions:
            rank = max(1, int(frac * W.numel() // (out + cin + kh + kw)))
            cp = cp_als(Wp, rank, n_iter_max=config.cp_iters, seed=config.seed)
            fits[("cp", rank)] = cp
            ranks.append(rank)
            losses.append(metric.scale * energy * cp.errors[-1] ** 2)
        r = torch.tensor(ranks)
        params = r * (out + cin + kh + kw) + bias
        options += format_options("cp", r[:, None], params, torch.tensor(losses), macs("cp", r), dense, priced)
    return options, fits, metric


def _build_conv(conv: nn.Conv2d, opt: Option, fits: dict, metric: _Metric, config: ModuleCompressConfig) -> nn.Module:
    if opt.format == "svd":
        return SVDConv2d.from_factors(conv, [fits["svd"].truncate(opt.rank)])
    Wp, L_in = fits["weighted"], fits["L_in"]

    def unweight(out_factor: torch.Tensor, in_factor: torch.Tensor):
        out_f = out_factor if metric.rows is None else out_factor / metric.rows[:, None]
        in_f = (
            in_factor
            if L_in is None
            else torch.linalg.solve_triangular(L_in.T, in_factor, upper=True)
            if bool(torch.equal(L_in, torch.tril(L_in)))
            else torch.linalg.solve(L_in.T, in_factor)
        )
        return out_f, in_f

    if opt.format == "tucker":
        t = tucker_hooi(Wp, opt.rank, modes=(0, 1), n_iter_max=10)
        u_out, u_in = unweight(*t.factors)
        return TuckerConv2d.from_factors(conv, Tucker(t.core, (u_out, u_in), (0, 1)))
    cp = fits[("cp", opt.rank)]
    a_out, a_in = unweight(cp.factors[0], cp.factors[1])
    return CPConv2d.from_factors(conv, CP(cp.weights, (a_out, a_in, *cp.factors[2:])))


def _matrix_candidates(layer: nn.Module, sizes, priced: bool, metric: _Metric, scale_cols=None):
    W = layer.weight.detach().double()
    m, n = W.shape
    bias = 0 if getattr(layer, "bias", None) is None else m
    f = whitened_svd(W, whitening=metric.whitening if scale_cols is None else None, scale=scale_cols, rows=metric.rows)
    rmax = min(m, n)
    tail = torch.flip(torch.cumsum(torch.flip(f.spectrum.double() ** 2, [0]), 0), [0])
    tail = torch.cat([tail, tail.new_zeros(max(rmax + 1 - len(tail), 0))])
    r = torch.arange(1, rmax + 1)
    dense = Option(None, None, m * n + bias, 0.0, None if sizes is None else matrix_macs(layer, sizes))
    macs = None if sizes is None else matrix_macs(layer, sizes, r.double())
    return [dense] + format_options(
        "svd", r[:, None], r * (m + n) + bias, metric.scale * tail[r], macs, dense, priced
    ), f


def _layer_options(layer: nn.Module, st: ModuleStats | None, config: ModuleCompressConfig, priced: bool):
    """The options of one target and a function building the layer of a chosen option."""
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            opts, fits, metric = _conv_candidates(layer, st, config)
            return opts, lambda o: _build_conv(layer, o, fits, metric, config)
        if isinstance(layer, nn.Linear):
            opts, f = _matrix_candidates(layer, _sizes(st), priced, _Metric(st, config, layer.out_features))
            return opts, lambda o: LowRankLinear.from_factors(f.truncate(o.rank), layer.bias, dtype=layer.weight.dtype)
        metric = _Metric(None, config, layer.embedding_dim)
        cols = None
        if st is not None:
            counts = st.counts.clamp_min(max(float(st.counts.max()), 1e-300) * 1e-4)
            metric.rows = counts.sqrt()
            if config.fisher and st.grad_sq is not None:
                if config.fisher_channels:
                    g = st.grad_sq.double().clamp_min(max(float(st.grad_sq.mean()), 1e-300) * 1e-4)
                    cols, metric.scale = torch.sqrt(g / g.mean()), float(g.mean())
                else:
                    metric.scale = float(st.grad_sq.double().mean())
        opts, f = _matrix_candidates(layer, _sizes(st), priced, metric, cols)
        return opts, lambda o: LowRankEmbedding.from_factors(layer, f.truncate(o.rank))


def compress_module_tree_(
    model: nn.Module,
    config: ModuleCompressConfig,
    inputs=None,
    *,
    stats: dict[str, ModuleStats] | None = None,
    progress: bool = True,
) -> ModuleCompressReport:
    """Factorize ``model``'s target layers in place under ``config.keep`` of their parameters: the handler of
    :func:`rankwise.compress_` for a :class:`ModuleCompressConfig`.

    Parameters
    ----------
    model : any nn.Module.
    config : :class:`ModuleCompressConfig`.
    inputs : calibration inputs, see :func:`rankwise.calibrate_modules.collect_module_stats` (a tensor of
        examples, or a callable ``run(model, i)``); None only with ``method="svd"`` or with ``stats`` (and
        not ``sequential``).
    stats : statistics from :func:`rankwise.calibrate_modules.collect_module_stats` on this same dense model
        (with ``fisher`` as in ``config``), to compress at several budgets while calibrating once.
    progress : show a progress bar over the calibration batches.

    Returns
    -------
    A :class:`rankwise.compress_report.ModuleCompressReport`: one
    :class:`~rankwise.compress_report.ModuleLayerReport` per target (its predicted loss in the units of the
    module docstring), totals, ``summary()`` and ``to_json()``.
    """
    targets = find_module_targets(model, config)
    if config.sequential and inputs is None:
        raise ValueError(
            "sequential=True refits on the compressed model's inputs and needs inputs (a tensor of examples or a "
            "callable run(model, i)), also when stats are given"
        )
    if stats is not None and config.method == "whiten":
        missing = [n for n in targets if n not in stats]
        if missing:
            raise ValueError(f"stats has no statistics for target {missing[0]!r}; collect them on this model's targets")
        stats = {n: stats[n] for n in targets}
    elif config.method == "svd":
        stats = dict.fromkeys(targets)
    else:
        if inputs is None:
            raise ValueError(
                "inputs are required for method='whiten'; accepted: a tensor of examples, a callable "
                "run(model, i), or method='svd' (data-free)"
            )
        stats = collect_module_stats(
            model,
            targets,
            inputs,
            fisher=config.fisher,
            batch_size=config.batch_size,
            batches=config.batches,
            seed=config.seed,
            progress=progress,
        )
    if config.keep_macs is not None:
        unsized = [n for n, st in stats.items() if st is None or st.sizes is None]
        if unsized:
            raise ValueError(
                f"keep_macs needs the input size of every target from calibration; target {unsized[0]!r} has none "
                "(statistics collected by an older rankwise?); accepted: stats from collect_module_stats, or inputs"
            )
    priced = config.keep_macs is not None
    all_options, builders = [], []
    for name, layer in targets.items():
        opts, build = _layer_options(layer, stats[name], config, priced)
        all_options.append(opts)
        builders.append(build)
    budget = config.keep * sum(opts[0].params for opts in all_options)
    if priced:
        mac_budget = config.keep_macs * sum(opts[0].macs for opts in all_options)
        chosen = allocate_budgets(
            *([[getattr(o, key) for o in opts] for opts in all_options] for key in ("params", "macs", "loss")),
            budget,
            mac_budget,
        )
    else:
        chosen = allocate_options([[(o.params, o.loss) for o in opts] for opts in all_options], budget)
    layers, replaced = [], {}
    for (name, layer), opts, build, i in zip(targets.items(), all_options, builders, chosen):
        opt = opts[i]
        if opt.format is not None:
            if config.sequential and replaced and not isinstance(layer, nn.Embedding):
                try:
                    refit = refit_target(model, name, layer, stats[name], inputs, config, replaced)
                except BaseException:  # the model is left as it was given (Ctrl-C included)
                    for n, (dense, _) in replaced.items():
                        replace_module(model, n, dense)
                    raise
                # only the chosen format is fitted again (auto would refit every format's candidates)
                chosen_format = opt.format if isinstance(layer, nn.Conv2d) else "svd"
                build = _layer_options(*refit, replace(config, format=chosen_format), priced)[1]
            with torch.no_grad():
                new = build(opt).to(next(layer.parameters()).device)
            replace_module(model, name, new)
            replaced[name] = (layer, new)
            params = sum(p.numel() for p in new.parameters())
        else:
            params = opt.params
        kind = next(k for k, cls in KINDS.items() if type(layer) is cls)
        layers.append(
            ModuleLayerReport(
                name, kind, opt.format, opt.rank, opts[0].params, params, opts[0].macs, opt.macs, opt.loss
            )
        )
    return ModuleCompressReport(layers, config)
