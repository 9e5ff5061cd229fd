"""The report's figures: PNG bytes drawn by matplotlib (the ``report`` extra) from a :class:`~rankwise.report.RunView`.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no display needed).
``FIGURES`` maps a figure's name to its title and to whether it applies to a run; :func:`draw` renders one.
"""

from __future__ import annotations

import io
import math

from .report import RunView, split_name

MATPLOTLIB_MISSING = "the report needs matplotlib, which is not installed: pip install 'rankwise[report]'"


def check_matplotlib() -> None:
    """Raise ``ValueError`` (one line, naming the extra) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(MATPLOTLIB_MISSING) from None


def _figure(width: float, height: float):
    check_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grid(layers) -> tuple[list[str], list[str], dict[tuple[str, str], object]]:
    """Rows (blocks, then "other"), columns (layer types in model order) and the layer of each cell."""
    rows, cols, cells = [], [], {}
    for layer in layers:
        block, kind = split_name(layer.name)
        row = "other" if block is None else str(block)
        if kind not in cols:
            cols.append(kind)
        cells[(row, kind)] = layer
    blocks = sorted({r for r, _ in cells if r != "other"}, key=int)
    rows = blocks + (["other"] if any(r == "other" for r, _ in cells) else [])
    return rows, cols, cells


def _short(kinds: list[str]) -> list[str]:
    """Layer types by their last name component where that is unambiguous (``self_attn.q_proj`` -> ``q_proj``)."""
    last = [k.rsplit(".", 1)[-1] for k in kinds]
    return last if len(set(last)) == len(last) else kinds


def draw_ranks(run: RunView) -> bytes:
    """Heat map per panel: blocks x layer types, colour = kept fraction of the layer's parameters, text = rank."""
    import numpy as np

    rows, cols, _ = _grid(run.layers)
    n = len(run.panels)
    fig = _figure(1.6 + n * (0.55 * len(cols) + 0.6), 1.6 + 0.24 * len(rows))
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, (title, layers) in zip(axes, run.panels.items()):
        _, _, cells = _grid(layers)
        kept = np.full((len(rows), len(cols)), np.nan)
        for (r, c), layer in cells.items():
            kept[rows.index(r), cols.index(c)] = layer.kept
        image = ax.imshow(kept, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        if len(rows) * len(cols) <= 600:
            for (r, c), layer in cells.items():
                v = kept[rows.index(r), cols.index(c)]
                ax.text(
                    cols.index(c),
                    rows.index(r),
                    "d" if layer.rank is None else str(layer.rank),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < 0.6 else "black",
                )
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(cols)), _short(cols), rotation=60, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
        ax.set_xlabel("layer type")
    axes[0].set_ylabel("block")
    fig.colorbar(image, ax=list(axes), label="kept fraction", shrink=0.8)
    fig.suptitle("rank per layer (d: left dense), coloured by the kept fraction of its parameters", fontsize=9)
    return _png(fig)


def draw_spectra(run: RunView) -> bytes:
    """Normalized singular values per layer type (one line per layer, coloured by block), the cut marked."""
    from matplotlib import colormaps

    groups: dict[str, list] = {}
    for layer in run.layers:
        if len(layer.spectrum) > 1:
            groups.setdefault(split_name(layer.name)[1], []).append(layer)
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = _figure(3.2 * ncols + 0.5, 2.6 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    blocks = [split_name(layer.name)[0] or 0 for layer in run.layers]
    top = max(max(blocks), 1)
    mark = len(run.panels) == 1
    for ax, (kind, layers) in zip(axes, groups.items()):
        for layer in layers:
            color = colormaps["viridis"]((split_name(layer.name)[0] or 0) / top)
            ax.plot(range(1, len(layer.spectrum) + 1), [max(v, 1e-12) for v in layer.spectrum], color=color, lw=0.8)
            if mark and layer.rank is not None and layer.rank <= len(layer.spectrum):
                ax.plot(layer.rank, max(layer.spectrum[layer.rank - 1], 1e-12), "o", color="red", ms=3)
        ax.set_yscale("log")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("index", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("s_i / s_1")
    legend = "colour: block, light = deep" + ("; red: kept rank" if mark else "")
    fig.suptitle(f"singular values of the {run.metric} ({legend})", fontsize=10)
    return _png(fig)


def draw_budget(run: RunView) -> bytes:
    """The allocator's predicted loss against the kept fraction, this run's point(s) marked."""
    fig = _figure(6.5, 4.2)
    ax = fig.subplots()
    if run.curve:
        x, y = zip(*sorted(run.curve))
        ax.plot(x, y, "-o", color="tab:blue", ms=4, label="allocator at other budgets")
    for x, y, label in run.chosen:
        ax.plot(x, y, "*", color="tab:red", ms=13)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.plot([], [], "*", color="tab:red", ms=10, label="this run" if len(run.chosen) == 1 else "swept budgets")
    if all(y > 0 for _, y in run.curve) and all(y > 0 for _, y, _ in run.chosen):
        ax.set_yscale("log")
    ax.set_xlabel("kept fraction of the targeted parameters")
    ax.set_ylabel(run.loss_name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def draw_quality(run: RunView) -> bytes:
    """Measured quality against the kept fraction."""
    fig = _figure(6.5, 4.2)
    ax = fig.subplots()
    x, y = zip(*sorted(run.quality))
    ax.plot(x, y, "-s", color="tab:green", ms=6)
    for a, b in run.quality:
        ax.annotate(f"{b:.4g}", (a, b), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("kept fraction of the targeted parameters")
    ax.set_ylabel(run.quality_name)
    ax.grid(alpha=0.3)
    return _png(fig)


def draw_timings(run: RunView) -> bytes:
    """Seconds spent in each phase."""
    names, secs = list(run.timings), list(run.timings.values())
    fig = _figure(6.5, 0.9 + 0.35 * len(names))
    ax = fig.subplots()
    ax.barh(range(len(names)), secs, color="tab:orange")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


# name -> (title, applies to a run); the order is the page's
FIGURES = {
    "ranks": ("Ranks and kept fraction per layer", lambda run: True),
    "spectra": ("Normalized spectra per layer type", lambda run: any(len(x.spectrum) > 1 for x in run.layers)),
    "budget": ("Predicted loss against the budget", lambda run: bool(run.curve or run.chosen)),
    "quality": ("Measured quality", lambda run: bool(run.quality)),
    "timings": ("Timings", lambda run: bool(run.timings)),
}
_DRAW = {
    "ranks": draw_ranks,
    "spectra": draw_spectra,
    "budget": draw_budget,
    "quality": draw_quality,
    "timings": draw_timings,
}


def draw(name: str, run: RunView) -> bytes:
    """The PNG bytes of figure ``name`` (one of ``FIGURES``) for ``run``."""
    return _DRAW[name](run)
