"""Make the README's pictures from a fresh demo run; writes ``docs/images/``.

    python docs/make_figures.py [--keep DIR]

Runs the README's demo (six toy scenes, ``configs/demo.yaml``, the shipped toy CLIP) in a
temporary folder, then, in headless Chromium through playwright:

* ``report.png``: the report's first screen;
* ``map.png``: one heatmap opened large, with its colour scale;

and copies one contact sheet as ``contact-sheet.png``. Needs the dev extra (playwright)
and a Chromium (Debian's ``chromium``, or the path in ``$CLIPSIGHT_CHROMIUM``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGES = ROOT / "docs" / "images"


def chromium() -> str:
    from pipeline.doctor import find_chromium

    return find_chromium() or sys.exit("no Chromium found: install it (Debian: apt-get install chromium) or set "
                                       "CLIPSIGHT_CHROMIUM")


def run_demo(work: Path) -> Path:
    """The README's first command, in ``work``; returns the run directory."""
    py = [sys.executable, str(ROOT / "runall.py")]
    subprocess.run([*py, "toy", "scenes", "--out", str(work / "demo"), "--count", "6"], check=True, cwd=work)
    done = subprocess.run([*py, "--input", str(work / "demo"), "--config", str(ROOT / "configs" / "demo.yaml"),
                           "--output", str(work / "outputs"), "--quiet"], cwd=work)
    if done.returncode != 0:
        sys.exit(f"the demo run failed (exit {done.returncode})")
    return work / "outputs" / "demo"


def screenshots(run: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
        page.goto((run / "report.html").as_uri())
        page.wait_for_load_state("load")
        page.wait_for_selector(".card")  # the cards come from their page file after the page opens
        page.click('#toggle button[data-method="surgery"]')
        page.wait_for_timeout(300)
        page.screenshot(path=str(IMAGES / "report.png"))
        page.locator(".maps figure").first.click()
        box = page.locator("#lightbox")
        box.wait_for(state="visible")
        page.wait_for_timeout(300)
        box.locator(".lb").screenshot(path=str(IMAGES / "map.png"))
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="run the demo here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = run_demo(work)
        screenshots(run)
        sheets = sorted((run / "surgery").glob("*__sheet.png"))
        shutil.copyfile(sheets[0], IMAGES / "contact-sheet.png")
    for name in ("report.png", "map.png", "contact-sheet.png"):
        print(IMAGES / name)


if __name__ == "__main__":
    main()
