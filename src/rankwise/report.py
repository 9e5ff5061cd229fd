"""write_report(dir, out): one self-contained HTML page (plots embedded as PNG data URIs) for a rankwise output.

Three kinds of directory are read: a compressed model (``rankwise_report.json``, from ``rankwise compress``),
a sweep (``sweep.json``, from ``rankwise sweep``) and a delta (``rankwise_delta.json`` beside the PEFT
adapter, from ``rankwise delta extract``). This module gathers what the page shows (:func:`load_run`) and
writes it; the plots are drawn by :mod:`rankwise.report_figures` (matplotlib, the ``report`` extra).
The page references nothing outside itself: no scripts, fonts or style sheets, so it opens offline.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .allocate import ALLOCATORS
from .compress_report import tied_label
from .io.atomic import atomic_output_files
from .io.checkpoint import REPORT_FILE

SWEEP_FILE = "sweep.json"
DELTA_FILE = "rankwise_delta.json"
_BLOCK = re.compile(r"^(?P<stack>.*?)\.(?P<block>\d+)\.(?P<type>.+)$")


@dataclass
class LayerView:
    """One factorized layer (a tied LM head named as its table's two uses, see
    :func:`rankwise.compress_report.tied_label`): ``rank`` None means it was left dense; ``spectrum`` its
    singular values in the truncated metric divided by the first (possibly only the leading ones)."""

    name: str
    shape: tuple[int, int]
    rank: int | None
    params_before: int
    params_after: int
    spectrum: list[float]

    @property
    def kept(self) -> float:
        return self.params_after / max(self.params_before, 1)


@dataclass
class RunView:
    """What the report shows of one run.

    panels : heat-map panels, title -> layers (one panel; a sweep has one per keep).
    curve : ``(kept fraction, predicted loss)`` of the allocator at other budgets; ``chosen`` the points
        of this run, ``(kept fraction, predicted loss, label)``.
    quality : ``(kept fraction, measured value)`` where measured, named ``quality_name``.
    facts : ``(what, value)`` rows of the summary table.
    """

    kind: str
    source: Path
    metric: str
    loss_name: str
    panels: dict[str, list[LayerView]]
    curve: list[tuple[float, float]] = field(default_factory=list)
    chosen: list[tuple[float, float, str]] = field(default_factory=list)
    quality: list[tuple[float, float]] = field(default_factory=list)
    quality_name: str = "quality"
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def layers(self) -> list[LayerView]:
        """The layers of the first panel (every panel holds the same layers)."""
        return next(iter(self.panels.values()))


def split_name(name: str) -> tuple[int | None, str]:
    """``(block index, layer type)`` of ``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``;
    a layer outside a block stack is ``(None, name)``."""
    m = _BLOCK.match(name)
    return (int(m.group("block")), m.group("type")) if m else (None, name)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable JSON file: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(doc).__name__}, expected an object")
    return doc


def _field(doc: dict, key: str, path: Path):
    if key not in doc:
        raise ValueError(f"{str(path)!r} has no {key!r} field; is it a rankwise output?")
    return doc[key]


def _compress_layers(report: dict, path: Path) -> list[LayerView]:
    layers = []
    for d in _field(report, "layers", path):
        try:
            layers.append(
                LayerView(
                    tied_label(d["name"], d.get("tied")),
                    tuple(d["shape"]),
                    d["rank"],
                    int(d["params_before"]),
                    int(d["params_after"]),
                    list(d.get("spectrum", [])),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{str(path)!r} has a malformed layer entry ({err!r}): {str(d)[:80]}") from None
    if not layers:
        raise ValueError(f"{str(path)!r} lists no layers")
    return layers


def _metric(config: dict) -> str:
    metric = {"svd": "plain", "asvd": "activation-scaled (ASVD)", "whiten": "whitened (SVD-LLM)"}.get(
        config.get("method"), str(config.get("method"))
    )
    return metric + (", Fisher-weighted rows" if _loss_weighted(config.get("allocate")) else "") + " weight"


def _loss_weighted(allocate: object) -> bool:
    """Whether the allocator named in a saved config (current name or alias) weighted rows by loss gradients."""
    return allocate in ALLOCATORS and bool(ALLOCATORS.get(allocate).meta.get("loss_gradients", False))


def _kept(point: dict, total: int) -> float:
    return point["params_after"] / max(total, 1)


def _load_compress(directory: Path) -> RunView:
    path = directory / REPORT_FILE
    r = _read_json(path)
    config, before = _field(r, "config", path), int(_field(r, "params_before", path))
    after, loss = int(_field(r, "params_after", path)), float(_field(r, "predicted_loss", path))
    run = RunView(
        "compress",
        directory,
        _metric(config),
        "predicted loss increase",
        {f"keep {config.get('keep')}": _compress_layers(r, path)},
        timings=dict(r.get("timings", {})),
        peak_rss_mib=r.get("peak_rss_mib"),
    )
    run.curve = [(_kept(p, before), float(p["predicted_loss"])) for p in r.get("curve", [])]
    run.chosen = [(after / before, loss, f"keep {config.get('keep')}")]
    run.facts = [
        ("model", str(directory)),
        ("parameters (targeted layers)", f"{before:,} -> {after:,} ({after / before:.3f})"),
        ("method / allocator", f"{config.get('method')} / {config.get('allocate')}"),
        ("predicted loss increase", f"{loss:.5g}"),
    ]
    return run


def _load_sweep(directory: Path) -> RunView:
    path = directory / SWEEP_FILE
    doc = _read_json(path)
    rows, reports = _field(doc, "rows", path), _field(doc, "reports", path)
    if not rows or not isinstance(reports, dict):
        raise ValueError(f"{str(path)!r} holds no swept budget")
    panels = {f"keep {k}": _compress_layers(r, path) for k, r in reports.items()}
    first = next(iter(reports.values()))
    run = RunView(
        "sweep",
        directory,
        _metric(first.get("config", {})),
        "predicted loss increase",
        panels,
        timings=dict(first.get("timings", {})),
        peak_rss_mib=first.get("peak_rss_mib"),
    )
    run.timings.pop("evaluation", None)
    evals = [float(r.get("timings", {}).get("evaluation", 0.0)) for r in reports.values()]
    if any(evals):
        run.timings["evaluation (all keeps)"] = sum(evals)
    before = int(rows[0]["params_before"])
    run.curve = [(_kept(p, before), float(p["predicted_loss"])) for p in first.get("curve", [])]
    run.chosen = [(_kept(r, before), float(r["predicted_loss"]), f"keep {r['keep']}") for r in rows]
    run.quality = [(_kept(r, before), float(r["quality"])) for r in rows if r.get("quality") is not None]
    run.quality_name = doc.get("quality_measure", "measured quality")
    rho = doc.get("spearman_predicted_vs_quality")
    run.facts = [
        ("sweep", str(directory)),
        ("keeps", ", ".join(str(r["keep"]) for r in rows)),
        ("parameters (targeted layers)", f"{before:,}"),
    ]
    if rho is not None:
        run.facts.append((f"Spearman(predicted loss, {run.quality_name})", f"{rho:.3f}"))
    return run


def _load_delta(directory: Path) -> RunView:
    path = directory / DELTA_FILE
    doc = _read_json(path)
    layers = _compress_layers(doc, path)
    dense, params = int(_field(doc, "dense_params", path)), int(_field(doc, "num_params", path))
    err = float(_field(doc, "relative_error", path))
    run = RunView(
        "delta",
        directory,
        "fine-tuned minus base weight",
        "relative squared error of the delta",
        {"delta": layers},
        timings=dict(doc.get("timings", {})),
        peak_rss_mib=doc.get("peak_rss_mib"),
    )
    run.curve = [(p["params_after"] / max(dense, 1), float(p["predicted_loss"])) for p in doc.get("curve", [])]
    run.chosen = [(params / max(dense, 1), err**2, "this delta")]
    run.facts = [
        ("adapter", str(directory)),
        ("factor parameters", f"{params:,} of {dense:,} dense ({params / max(dense, 1):.4f})"),
        ("relative error ||D - BA|| / ||D||", f"{err:.4g}"),
        ("full-rank modules", ", ".join(doc.get("saved_modules", [])) or "none"),
    ]
    return run


def load_run(directory: str | os.PathLike) -> RunView:
    """Read a rankwise output directory (compressed model, sweep or delta) into a :class:`RunView`.

    Raises
    ------
    FileNotFoundError if ``directory`` does not exist; ValueError if it holds none of the files a rankwise
    output has (they are named) or one of them is malformed.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"directory {str(d)!r} not found")
    for name, loader in ((REPORT_FILE, _load_compress), (SWEEP_FILE, _load_sweep), (DELTA_FILE, _load_delta)):
        if (d / name).is_file():
            return loader(d)
    raise ValueError(
        f"{str(d)!r} is not a rankwise output: it has no {REPORT_FILE} (rankwise compress), "
        f"{SWEEP_FILE} (rankwise sweep) or {DELTA_FILE} (rankwise delta extract)"
    )


def figure_paths(out: Path, names: list[str]) -> list[Path]:
    """Where the PNG of each figure goes: beside ``out``, named ``<out stem>-<figure>.png``."""
    return [out.with_name(f"{out.stem}-{name}.png") for name in names]


def render_html(run: RunView, figures: dict[str, tuple[str, bytes]]) -> str:
    """The page: a summary table, timings and peak memory, then each figure (title, PNG bytes) inline."""
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in run.facts)
    times = "".join(f"<tr><th>{esc(k)}</th><td>{v:.1f} s</td></tr>" for k, v in run.timings.items())
    if run.peak_rss_mib is not None:
        times += f"<tr><th>peak memory (RSS)</th><td>{run.peak_rss_mib:,.0f} MiB</td></tr>"
    body = [f"<h1>rankwise {esc(run.kind)} report</h1>", f"<table>{rows}</table>"]
    if times:
        body += ["<h2>Time and memory</h2>", f"<table>{times}</table>"]
    for name, (title, png) in figures.items():
        data = base64.b64encode(png).decode("ascii")
        body += [
            f"<h2>{esc(title)}</h2>",
            f'<img id="{esc(name)}" alt="{esc(title)}" src="data:image/png;base64,{data}">',
        ]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%;display:block}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>rankwise '
        f"{esc(run.kind)} report: {esc(run.source.name)}</title><style>{style}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(directory: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write the HTML report of ``directory`` to ``out`` and its figures as PNG files beside it.

    Everything is written under temporary names and renamed once complete; an existing ``out`` (or
    figure file) raises ``FileExistsError`` unless ``force``, before anything is drawn. Returns the
    written paths, the HTML first.
    """
    from .report_figures import FIGURES, check_matplotlib, draw

    out = Path(out)
    run = load_run(directory)
    check_matplotlib()
    names = [name for name, (_, applies) in FIGURES.items() if applies(run)]
    paths = [out, *figure_paths(out, names)]
    with atomic_output_files(paths, force=force) as tmp:
        figures = {name: (FIGURES[name][0], draw(name, run)) for name in names}
        for path, (_, png) in zip(paths[1:], figures.values()):
            (tmp / path.name).write_bytes(png)
        (tmp / out.name).write_text(render_html(run, figures), encoding="utf-8")
    return paths
