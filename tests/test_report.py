"""rankwise report: the HTML page and its PNG figures for a compressed model, a sweep and a delta; bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from rankwise.cli import main  # noqa: E402
from rankwise.io.checkpoint import REPORT_FILE  # noqa: E402
from rankwise.report import load_run  # noqa: E402

from _tiny_models import save_model_dir, tiny_llama  # noqa: E402
from test_delta import finetune  # noqa: E402
from test_delta import tiny_llama as tiny_llama64  # noqa: E402

FAST = ["--seq-len", "32", "--calib-tokens", "256"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A compressed model (with --report), a sweep and a delta, all from tiny Llamas."""
    root = tmp_path_factory.mktemp("runs")
    llama = save_model_dir(tiny_llama(), root / "llama")
    assert main(["compress", str(llama), "--keep", "0.6", "--report", "--out", str(root / "c"), *FAST]) == 0
    assert (
        main(
            [
                "sweep",
                str(llama),
                "--keep",
                "0.9",
                "0.6",
                "--eval",
                "--eval-tokens",
                "512",
                "--report",
                "--out",
                str(root / "s"),
                *FAST,
            ]
        )
        == 0
    )
    base = tiny_llama64()
    ft, _ = finetune(base)
    base.save_pretrained(root / "base")
    ft.save_pretrained(root / "ft")
    assert (
        main(["delta", "extract", str(root / "base"), str(root / "ft"), "--keep", "0.05", "--out", str(root / "d")])
        == 0
    )
    return root


def check_page(html_path, expected: set[str]) -> None:
    """Every figure beside the page decodes, is not one colour, and is embedded in the page byte for byte;
    the page loads nothing from elsewhere."""
    page = html_path.read_text(encoding="utf-8")
    pngs = sorted(html_path.parent.glob(f"{html_path.stem}-*.png"))
    assert {p.stem[len(html_path.stem) + 1 :] for p in pngs} == expected
    embedded = re.findall(r'<img id="([a-z]+)" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert {name for name, _ in embedded} == expected and len(embedded) == len(expected)
    for name, data in embedded:
        png = (html_path.parent / f"{html_path.stem}-{name}.png").read_bytes()
        assert base64.b64decode(data) == png
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.format == "PNG" and image.width >= 300 and image.height >= 150
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50, f"{name}: {len(colours)} colours"
        assert max(n for n, _ in colours) < 0.97 * image.width * image.height, f"{name} is (almost) one colour"
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, re.I)


def test_compress_report_figures_and_budget_curve(runs):
    c = runs / "c"
    check_page(c / "report.html", {"ranks", "spectra", "budget", "timings"})
    r = json.loads((c / REPORT_FILE).read_text())
    at_keep = [p for p in r["curve"] if p["keep"] == 0.6]
    assert at_keep == [{"keep": 0.6, "params_after": r["params_after"], "predicted_loss": r["predicted_loss"]}]
    losses = [p["predicted_loss"] for p in sorted(r["curve"], key=lambda p: p["keep"])]
    assert all(a >= b for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]
    run = load_run(c)
    assert run.chosen == [(r["params_after"] / r["params_before"], r["predicted_loss"], "keep 0.6")]
    assert [layer.rank for layer in run.layers] == [layer["rank"] for layer in r["layers"]]
    assert "peak memory (RSS)" in (c / "report.html").read_text()


def test_compress_run_saved_with_the_old_allocator_name_reads_the_same(runs, tmp_path):
    old = shutil.copytree(runs / "c", tmp_path / "old")
    r = json.loads((old / REPORT_FILE).read_text())
    assert r["config"]["allocate"] == "loss-aware"
    r["config"]["allocate"] = "fisher"  # what checkpoints wrote before the rename
    (old / REPORT_FILE).write_text(json.dumps(r))
    assert load_run(old).metric == load_run(runs / "c").metric == "whitened (SVD-LLM), Fisher-weighted rows weight"


def test_sweep_report_shows_quality_and_the_same_curve_as_compress(runs, tmp_path, capsys):
    out = tmp_path / "sweep.html"
    assert main(["report", str(runs / "s"), "--out", str(out)]) == 0
    check_page(out, {"ranks", "spectra", "budget", "quality", "timings"})
    check_page(runs / "s" / "report.html", {"ranks", "spectra", "budget", "quality", "timings"})  # sweep --report
    doc = json.loads((runs / "s" / "sweep.json").read_text())
    assert doc["quality_measure"] == "perplexity"
    compress_curve = json.loads((runs / "c" / REPORT_FILE).read_text())["curve"]
    assert doc["reports"]["0.6"]["curve"] == compress_curve  # one calibration, same allocator: same numbers
    run = load_run(runs / "s")
    assert list(run.panels) == ["keep 0.9", "keep 0.6"]
    assert run.quality == [(r["params_after"] / r["params_before"], r["quality"]) for r in doc["rows"]]


def test_delta_report_and_its_error_curve(runs, tmp_path):
    out = tmp_path / "delta.html"
    assert main(["report", str(runs / "d"), "--out", str(out)]) == 0
    check_page(out, {"ranks", "spectra", "budget", "timings"})
    rec = json.loads((runs / "d" / "rankwise_delta.json").read_text())
    config = json.loads((runs / "d" / "adapter_config.json").read_text())
    ranks = {layer["name"]: layer["rank"] for layer in rec["layers"] if layer["rank"]}
    assert {m: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]} == ranks
    assert rec["num_params"] == sum(layer["params_after"] for layer in rec["layers"]) <= 0.05 * rec["dense_params"]
    errors = [p["predicted_loss"] for p in rec["curve"]]
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-20  # the deltas have rank 3: the whole budget recovers them exactly
    at_keep = [p for p in rec["curve"] if p["keep"] == 0.05]
    assert at_keep[0]["params_after"] == rec["num_params"]
    assert at_keep[0]["predicted_loss"] == pytest.approx(rec["relative_error"] ** 2, rel=1e-9)
    assert rec["saved_modules"] == ["model.norm"]


def run_cli(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_not_a_rankwise_output(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code, out, err = run_cli(["report", tmp_path / "d", "--out", tmp_path / "r.html"], capsys)
    assert code == 2 and out == ""
    assert err == (
        f"rankwise report: error: {str(tmp_path / 'd')!r} is not a rankwise output: it has no "
        "rankwise_report.json (rankwise compress), sweep.json (rankwise sweep) or rankwise_delta.json "
        "(rankwise delta extract)\n"
    )
    code, _, err = run_cli(["report", tmp_path / "missing", "--out", tmp_path / "r.html"], capsys)
    assert code == 2 and err == f"rankwise report: error: directory {str(tmp_path / 'missing')!r} not found\n"
    (tmp_path / "d" / "sweep.json").write_text("[1, 2]")
    code, _, err = run_cli(["report", tmp_path / "d", "--out", tmp_path / "r.html"], capsys)
    assert code == 2 and "holds a JSON list, expected an object" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_existing_out_needs_force(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    out.write_text("mine")
    code, _, err = run_cli(["report", runs / "c", "--out", out], capsys)
    assert code == 2
    assert err == (
        f"rankwise report: error: output {str(out)!r} already exists; pass --force (force=True) to overwrite it\n"
    )
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    code, _, _ = run_cli(["report", runs / "c", "--out", out, "--force"], capsys)
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>")
    assert len(list(tmp_path.glob("r-*.png"))) == 4 and len(list(tmp_path.iterdir())) == 5


def test_missing_matplotlib_is_one_line_before_any_work(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    message = "the report needs matplotlib, which is not installed: pip install 'rankwise[report]'\n"
    code, _, err = run_cli(["report", runs / "c", "--out", tmp_path / "r.html"], capsys)
    assert code == 2 and err == "rankwise report: error: " + message
    code, _, err = run_cli(["compress", runs / "llama", "--report", "--out", tmp_path / "c", *FAST], capsys)
    assert code == 2 and err == "rankwise compress: error: " + message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (Debian package chromium)")
def test_chromium_shows_every_figure_offline(runs, tmp_path):
    from report_screenshot import check

    assert check(runs / "c" / "report.html") == []
    page = (runs / "c" / "report.html").read_text()
    start = page.index("base64,") + len("base64,")
    (tmp_path / "broken.html").write_text(page[:start] + "AAAA" + page[start + 4 :])  # the first figure, corrupted
    for name in ("ranks", "spectra", "budget", "timings"):
        shutil.copy(runs / "c" / f"report-{name}.png", tmp_path / f"broken-{name}.png")
    assert "figure ranks: the browser did not decode it" in check(tmp_path / "broken.html")
