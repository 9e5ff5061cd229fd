"""Check a rankwise HTML report as a person sees it: headless Chromium, no network, every figure on screen.

1. Layout: a copy of the page with a probe script appended (the report itself has no script) is loaded with
   ``chromium --headless --dump-dom``; the probe writes each ``<img>``'s box, whether it decoded, and the
   page height into the DOM.
2. Screenshot: the report itself, ``chromium --headless --screenshot`` with a window as tall as the page,
   device scale 1, every host name mapped to nothing (a page that needs the network shows holes).
3. Checks: the screenshot is not blank (many colours, a fair share of non-white pixels); every figure
   decoded, has a non-empty box inside the screenshot, and the screenshot's pixels in that box match the
   figure's PNG resized to the box (mean absolute difference below ``--tolerance`` of 255).

    python benchmarks/report_screenshot.py REPORT.html [--width 1400] [--keep-screenshot shot.png]

Exit status 0 when every check passes, 1 otherwise; a table of the figures is printed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PROBE = """<script>
const boxes = [...document.images].map(i => {const r = i.getBoundingClientRect();
  return {id: i.id, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
          ok: i.complete && i.naturalWidth > 0};});
const layout = {height: document.documentElement.scrollHeight, images: boxes};
document.body.setAttribute("data-layout", JSON.stringify(layout));
</script>"""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=3000",
]


def chromium() -> str | None:
    """Path of a Chromium binary on PATH, or None."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def layout(browser: str, page: Path, width: int, tmp: Path) -> dict:
    """The page's height and each image's box (CSS pixels), from the probe copy's dumped DOM."""
    probe = tmp / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [browser, *FLAGS, f"--window-size={width},1000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.search(r'data-layout="([^"]*)"', dom)
    if found is None:
        raise RuntimeError("the probe wrote no layout (did Chromium run the page?)")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(browser: str, page: Path, width: int, height: int, tmp: Path) -> Image.Image:
    shot = tmp / "shot.png"
    subprocess.run(
        [browser, *FLAGS, f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return Image.open(shot).convert("RGB")


def embedded_pngs(page: Path) -> dict[str, Image.Image | None]:
    """id -> decoded image (None: not a PNG) of every ``<img>`` data URI in the page."""
    found = re.findall(r'<img id="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page.read_text(encoding="utf-8"))
    images = {}
    for name, data in found:
        try:
            images[name] = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        except (OSError, ValueError):
            images[name] = None
    return images


def check(page: Path, width: int = 1400, tolerance: float = 12.0, keep: Path | None = None) -> list[str]:
    """Render ``page``; return the failed checks (empty: the page shows every figure)."""
    page = page.resolve()
    browser = chromium()
    if browser is None:
        return ["no Chromium on PATH (Debian: apt-get install chromium)"]
    failures = []
    with tempfile.TemporaryDirectory(prefix="rankwise-shot-") as tmp:
        tmp = Path(tmp)
        lay = layout(browser, page, width, tmp)
        shot = screenshot(browser, page, width, int(lay["height"]), tmp)
        if keep is not None:
            shot.save(keep)
    pixels = np.asarray(shot, dtype=np.float64)
    colours = len(shot.getcolors(maxcolors=1 << 24))
    ink = float((pixels.min(axis=2) < 250).mean())
    print(f"screenshot {shot.width}x{shot.height}: {colours} colours, {ink:.1%} non-white pixels")
    if colours < 100 or ink < 0.05:
        failures.append(f"the screenshot looks blank ({colours} colours, {ink:.1%} non-white)")
    figures = embedded_pngs(page)
    boxes = {b["id"]: b for b in lay["images"]}
    print(f"{'figure':<10} {'PNG':>11} {'box on screen':>24} {'decoded':>8} {'mean |diff|':>12}")
    for name, image in figures.items():
        b = boxes.get(name)
        if b is None:
            failures.append(f"figure {name}: not in the rendered page")
            continue
        x, y, w, h = (round(b[k]) for k in ("x", "y", "w", "h"))
        if image is None or not b["ok"]:
            failures.append(
                f"figure {name}: the browser did not decode it"
                if not b["ok"]
                else f"figure {name}: its data is not a PNG"
            )
            continue
        inside = w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= shot.width and y + h <= shot.height
        diff = float("nan")
        if inside:
            seen = np.asarray(shot.crop((x, y, x + w, y + h)), dtype=np.float64)
            want = np.asarray(image.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float64)
            diff = float(np.abs(seen - want).mean())
        size, box = f"{image.width}x{image.height}", f"{w}x{h} at ({x},{y})"
        print(f"{name:<10} {size:>11} {box:>24} {str(b['ok']):>8} {diff:>12.2f}")
        if not inside:
            failures.append(f"figure {name}: its box {w}x{h} at ({x},{y}) is empty or off the page")
        elif not diff <= tolerance:
            failures.append(f"figure {name}: the screen differs from the PNG by {diff:.1f} / 255 on average")
    if len(figures) != len(boxes):
        failures.append(f"the page has {len(boxes)} images but {len(figures)} embedded PNG figures")
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path, help="the report's HTML file")
    ap.add_argument("--width", type=int, default=1400, help="browser window width in CSS pixels")
    ap.add_argument("--tolerance", type=float, default=12.0, help="largest mean |difference| (of 255) per figure")
    ap.add_argument("--keep-screenshot", type=Path, help="save the screenshot here")
    args = ap.parse_args()
    failures = check(args.page, args.width, args.tolerance, args.keep_screenshot)
    for f in failures:
        print("FAIL:", f)
    print("every figure is shown" if not failures else f"{len(failures)} check(s) failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
