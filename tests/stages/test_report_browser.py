"""The report in a real headless browser: cards render, the word filter and the heatmap toggle work, no console errors.

Needs playwright (a dev dependency) and a Chromium on the machine: Debian's
``chromium`` package, or the path in ``$CLIPSIGHT_CHROMIUM``. Without a browser the
test is skipped with the reason; it never passes silently.
"""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from pipeline.toyworld import write_scenes
from runall import app
from tests.conftest import fast_args

FAST = fast_args(ascend__iterations=20, ascend__candidates=8, ascend__bank_size=16, ascend__views=8,
                 surgery__single_resolution=512)  # real labels from the toy; the default single-text size


def _chromium() -> str | None:
    for candidate in (os.environ.get("CLIPSIGHT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found: install it (Debian: apt-get install chromium) or set CLIPSIGHT_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    write_scenes(root / "demo", 3, 5)
    (root / "demo" / "truth.json").unlink()
    (root / "demo" / "broken.png").write_bytes(b"not an image")
    r = CliRunner().invoke(app, ["--input", str(root / "demo"), "--config", "configs/demo.yaml", "--output",
                                 str(root / "out"), "--quiet", *FAST], catch_exceptions=False)
    assert r.exit_code == 1, r.output  # the broken file fails; everything else finishes
    return root / "out" / "demo"


def test_report_renders_filters_and_toggles(browser, demo_run):
    data = json.loads((demo_run / "report.html").read_text().split('<script id="data" type="application/json">')[1]
                      .split("</script>")[0].replace("<\\/", "</"))
    page = browser.new_page(viewport={"width": 1600, "height": 6000})  # every card on screen, so lazy images load
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((demo_run / "report.html").as_uri())

    cards = page.locator(".card")
    assert cards.count() == len(data["cards"]) == 6
    for c in data["cards"]:
        assert page.locator(f'[id="{c["id"]}"] h3').inner_text() == c["rel"]
    thumbs_loaded = page.eval_on_selector_all(".card > img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert thumbs_loaded.count(True) == 5  # every decodable image shows; the broken one cannot
    page.click("#failures-title")  # open the failures list
    assert "broken.png" in page.locator("#failures").inner_text() and "not an image" in page.locator("#failures").inner_text()

    # filter by a word that some but not all cards have
    counts = {}
    for c in data["cards"]:
        for w in {w for w, _ in c["words"]} | {l[0] for l in c["labels"]}:
            counts[w] = counts.get(w, 0) + 1
    word = next(w for w, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n < len(data["cards"]))
    expected = sum(any(word.lower() in w.lower() for w in [x[0] for x in c["words"]] + [l[0] for l in c["labels"]])
                   for c in data["cards"])
    page.fill("#filter", word)
    assert cards.count() == expected and 0 < expected < 6
    page.fill("#filter", "")
    assert cards.count() == 6

    # the heatmap toggle swaps every card's maps between methods
    maps = page.locator("img.map")
    assert maps.count() > 0
    for method in ("raw", "surgery", "single"):
        page.click(f'#toggle button[data-method="{method}"]')
        srcs = page.eval_on_selector_all("img.map", "els => els.map(e => e.getAttribute('src'))")
        assert srcs and all(s.endswith(f"__{method}.png") for s in srcs), srcs
        assert page.locator(f'#toggle button[data-method="{method}"]').get_attribute("class") == "on"
    assert page.locator(".maps svg circle").count() == 0
    page.click("#points")  # SAM point prompts drawn over the maps
    assert page.locator(".maps svg circle").count() > 0
    assert page.locator("#points").is_checked()
    page.wait_for_load_state("load")
    loaded = page.eval_on_selector_all("img.map", "els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert all(loaded), "an overlay did not load"
    assert errors == [], errors


def test_maps_without_overlay_files_are_drawn_from_the_atlas(browser, tmp_path):
    """surgery.overlays off: one atlas per image, and the page colours every method's map from it."""
    write_scenes(tmp_path / "imgs", 3, 2)
    (tmp_path / "imgs" / "truth.json").unlink()
    r = CliRunner().invoke(app, ["--input", str(tmp_path / "imgs"), "--config", "configs/demo.yaml", "--output",
                                 str(tmp_path / "out"), "--quiet", *FAST, "--set", "surgery.overlays=false",
                                 "--set", "surgery.methods=[surgery,naclip]"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "imgs"
    assert not list((run / "surgery").glob("*/*.png"))  # no file per label and method
    page = browser.new_page(viewport={"width": 1600, "height": 4000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((run / "report.html").as_uri())
    for method in ("surgery", "naclip"):
        page.click(f'#toggle button[data-method="{method}"]')
        n = page.locator(".maps svg.atl image").count()
        assert n > 0 and n == page.locator("img.map").count()
        hrefs = page.eval_on_selector_all(".maps svg.atl image", "els => els.map(e => e.getAttribute('href'))")
        assert all(h.endswith("__maps.png") and (run / h).is_file() for h in hrefs)
    shot = page.locator(".maps .fig").first.screenshot()  # the drawn map: coloured, not the grey atlas
    from io import BytesIO

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(BytesIO(shot)).convert("RGB")).astype(int)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).mean() > 0.2  # JET: red or blue, far from grey
    assert errors == [], errors
