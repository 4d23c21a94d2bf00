"""The report in a real headless browser: cards render, the word filter and the heatmap toggle work, no console errors.

Needs playwright (a dev dependency) and a Chromium on the machine: Debian's
``chromium`` package, or the path in ``$CLIPSIGHT_CHROMIUM``. Without a browser the
test is skipped with the reason; it never passes silently.
"""

import json

import pytest
from typer.testing import CliRunner

from pipeline.doctor import find_chromium
from pipeline.toy.world import write_scenes
from runall import app
from stages.report import load_report
from tests.conftest import fast_args

FAST = fast_args(ascend__iterations=20, ascend__candidates=8, ascend__bank_size=16, ascend__views=8,
                 surgery__single_resolution=512)  # real labels from the toy; the default single-text size


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found: install it (Debian: apt-get install chromium) or set CLIPSIGHT_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def _cards(page, n: int) -> int:
    """The number of cards drawn, once it is ``n``: the page loads its cards' scripts after it opens, and a filter
    reads the word index first."""
    page.wait_for_function("n => document.querySelectorAll('.card').length === n", arg=n, timeout=10_000)
    return page.locator(".card").count()


def _loaded(page, selector: str) -> list[bool]:
    """Whether each image matching ``selector`` decoded, once every one has finished: lazy images load when
    seen, and the page's load event does not wait for them."""
    for img in page.locator(selector).all():
        img.scroll_into_view_if_needed()
    page.wait_for_function(f"() => [...document.querySelectorAll({selector!r})].every(e => e.complete)", timeout=15_000)
    return page.eval_on_selector_all(selector, "els => els.map(e => e.complete && e.naturalWidth > 0)")


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
    data = load_report(demo_run / "report.html")
    page = browser.new_page(viewport={"width": 1600, "height": 6000})  # every card on screen, so lazy images load
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((demo_run / "report.html").as_uri())

    cards = page.locator(".card")
    assert _cards(page, 6) == len(data["cards"]) == data["total"] == 6
    for c in data["cards"]:
        assert page.locator(f'[id="{c["id"]}"] h3').inner_text() == c["rel"]
    thumbs_loaded = _loaded(page, ".card .pic > img")
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
    assert _cards(page, expected) == expected and 0 < expected < 6
    assert page.inner_text("#count") == f"{expected} of 6 images"
    page.fill("#filter", "")
    assert _cards(page, 6) == 6

    # the heatmap toggle swaps every card's maps between methods
    maps = page.locator("img.map")
    assert maps.count() > 0
    for method in ("raw", "surgery", "single"):
        page.click(f'#toggle button[data-method="{method}"]')
        srcs = page.eval_on_selector_all("img.map", "els => els.map(e => e.getAttribute('src'))")
        assert srcs and all(s.endswith(f"__{method}.png") for s in srcs), srcs
        assert page.locator(f'#toggle button[data-method="{method}"]').get_attribute("class") == "on"
    assert page.locator("#points").count() == 0  # SAM never ran: no SAM points control
    # the export's boxes, over each picture, behind a toggle
    boxes = sum(len(b[3]) for c in data["cards"] for b in c.get("boxes", []))
    assert boxes > 0 and page.locator("svg.boxes rect").count() == 0
    page.click("#boxes")
    assert page.locator("svg.boxes rect").count() == boxes
    page.click("#boxes")
    assert page.locator("svg.boxes rect").count() == 0
    broken = page.locator(".card", has=page.locator("h3", has_text="broken.png"))
    assert "not an image" in broken.locator(".fail").first.inner_text()  # the reason is on the card itself
    # the placeholder replaces the picture on its load error, which fires after each re-render: wait for it
    broken.locator(".missing").wait_for(state="attached", timeout=10_000)
    assert broken.locator(".missing").count() == 1 and broken.locator("img").count() == 0  # no broken-image icon
    assert page.locator("#pager").is_hidden()  # one page: no pager
    page.wait_for_load_state("load")
    loaded = _loaded(page, "img.map")
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
    page.wait_for_selector(".card")
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
    # JET: red or blue, far from grey (the grey atlas itself gives none; the first label's map, with the demo's words)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).mean() > 0.1
    assert errors == [], errors


def test_maps_open_large_scale_switches_leaderboard_sorts_and_fits_a_phone(browser, demo_run):
    page = browser.new_page(viewport={"width": 1400, "height": 3000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((demo_run / "report.html").as_uri())
    page.wait_for_selector(".card")
    page.click('#toggle button[data-method="surgery"]')
    first = page.locator(".maps figure").first
    word = first.locator("figcaption").inner_text().split()[0]
    first.click()  # opens large, over the picture, with the colour scale and how it is scaled
    box = page.locator("#lightbox")
    assert box.is_visible() and box.locator("h2").inner_text() == word
    assert box.locator(".legend").is_visible() and "scaled to this word alone" in box.inner_text()
    assert box.locator(".fig img").bounding_box()["width"] >= 400
    lo_word = box.locator(".legend-n span").first.inner_text()
    box.locator('button[data-scale="image"]').click()
    assert "one scale for every word of this image" in box.inner_text()
    lo_image = box.locator(".legend-n span").first.inner_text()
    assert float(lo_image) <= float(lo_word)  # the image's scale spans every word's range
    assert box.locator("svg.atl filter feFuncR[type=linear]").count() == 1  # the map is re-scaled in the page
    page.keyboard.press("Escape")
    assert box.is_hidden()
    assert page.locator('#toggle button[data-scale="image"]').get_attribute("class") == "on"  # the cards follow
    assert page.locator(".maps svg.atl").count() == page.locator(".maps figure").count()

    page.click("#records-box summary")
    page.click('#records th[data-sort="images"]')
    images = [int(x) for x in page.eval_on_selector_all("#records tr td:nth-child(5)", "els => els.map(e => e.textContent)")]
    assert images == sorted(images, reverse=True) and len(images) > 1
    page.click('#records th[data-sort="images"]')
    images = [int(x) for x in page.eval_on_selector_all("#records tr td:nth-child(5)", "els => els.map(e => e.textContent)")]
    assert images == sorted(images)
    pictures = page.eval_on_selector_all("#records img", "els => els.map(e => e.getAttribute('src'))")
    assert pictures and all((demo_run / p).is_file() for p in pictures)  # each word's best image, as a thumbnail

    page.set_viewport_size({"width": 380, "height": 800})  # a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 380
    board = page.locator("#records").bounding_box()
    assert board["x"] + board["width"] <= 380
    page.screenshot(path=str(demo_run / "phone.png"))
    assert errors == [], errors


def test_sam_points_are_offered_and_drawn_when_sam_ran(browser, tmp_path):
    from PIL import Image

    from pipeline.run.images import ImageRef
    from stages.report import ImageOutputs, ReportConfig, ReportInputs, build_report_data, write_report

    Image.new("RGB", (64, 48), "gray").save(tmp_path / "a.png")
    Image.new("L", (64, 48), 255).save(tmp_path / "m.png")
    Image.new("RGB", (64, 48), "red").save(tmp_path / "o.png")
    label = {"word": "red", "slug": "red", "overlays": {"surgery": "o.png"}, "mask": "m.png",
             "points": [[10, 10], [50, 40]], "point_labels": [1, 0], "peak": {}}
    doc = {"image": "a", "size": [64, 48], "methods": ["surgery"], "labels": [label]}
    inputs = ReportInputs("sam", {"model": "toy"}, [ImageOutputs(ImageRef("a", str(tmp_path / "a.png"), "a.png"), "a.png",
                                                                 None, None, doc, [])], [], {})
    write_report(tmp_path, build_report_data(inputs, ReportConfig()))
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto((tmp_path / "report.html").as_uri())
    page.wait_for_selector(".card")
    assert page.locator(".maps svg circle").count() == 0
    page.click("#points")
    assert page.locator(".maps svg circle").count() == 2 and page.locator("#points").is_checked()


def test_compare_page_opens_with_every_map_and_no_console_error(browser, demo_run, tmp_path):
    """``compare`` of the demo run and a second toy run (another seed) over the same images, in the browser."""
    root = demo_run.parent.parent
    r = CliRunner().invoke(app, ["--input", str(root / "demo"), "--config", "configs/demo.yaml", "--output",
                                 str(tmp_path / "out"), "--run-name", "other", "--quiet", *FAST, "--set", "seed=4",
                                 "--set", "surgery.single_resolution=128"],
                           catch_exceptions=False)
    assert r.exit_code == 1, r.output  # the broken file fails again
    r = CliRunner().invoke(app, ["compare", str(demo_run), str(tmp_path / "out" / "other"), "--out", str(tmp_path / "cmp")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    page = browser.new_page(viewport={"width": 1400, "height": 6000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "cmp" / "compare.html").as_uri())
    page.wait_for_load_state("load")
    assert page.locator(".card").count() == doc["overall"]["images_compared"] == 5
    drawn = sum(len(r.get("maps", {}).get(s, {})) for r in doc["images"] for s in ("a", "b"))
    assert drawn > 0 and page.locator(".maps img").count() == drawn
    loaded = _loaded(page, ".maps img")
    assert all(loaded), "a map did not load"
    assert "broken.png" in page.inner_text("body")  # in neither run's labels: listed, not dropped
    assert errors == [], errors


def test_cards_and_the_word_index_load_only_when_shown(browser, tmp_path):
    """130 cards, 60 a page: the first screen loads one page file, a filter reads the word index and the pages of
    its matches, a failure's link opens its card's page, and a report without its folder says so."""
    from PIL import Image

    from pipeline.run.images import ImageRef
    from stages.report import ImageOutputs, ReportConfig, ReportInputs, build_report_data, write_report

    Image.new("RGB", (32, 24), "gray").save(tmp_path / "a.png")
    items = [ImageOutputs(ImageRef(f"i{k:03d}", str(tmp_path / "a.png"), f"img{k:03d}.png"), "a.png",
                          {"words": {f"w{k}": {"frequency": 3}, "common": {"frequency": 1}}}, None, None,
                          [("decode", f"img{k:03d}.png: broken")] if k == 125 else []) for k in range(130)]
    written = write_report(tmp_path, build_report_data(ReportInputs("big", {}, items, [], {}), ReportConfig(page_size=60)))
    assert [w for w in written if w.startswith("report/cards-")] == [f"report/cards-0000{n}.js" for n in range(3)]
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors, scripts = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: scripts.append(r.url.rsplit("/", 1)[1]) if r.url.endswith(".js") else None)
    page.goto((tmp_path / "report.html").as_uri())
    assert _cards(page, 60) == 60 and scripts == ["cards-00000.js"]  # the first screen: one page file, no index
    assert page.inner_text("#count") == "130 of 130 images" and page.inner_text("#page") == "page 1 / 3"
    page.click("#next")
    page.wait_for_function("() => document.querySelector('.card h3').textContent === 'img060.png'")
    assert _cards(page, 60) == 60 and scripts[-1] == "cards-00001.js"

    page.fill("#filter", "w12")  # w12 and w120..w129: on the first and the third page
    assert _cards(page, 11) == 11 and page.inner_text("#count") == "11 of 130 images"
    assert page.locator(".card h3").all_inner_texts() == ["img012.png", *[f"img{k}.png" for k in range(120, 130)]]
    assert "words.js" in scripts and any(s.startswith("index-") for s in scripts) and "cards-00002.js" in scripts
    page.fill("#filter", "")
    page.click("#failures-title")
    page.click("#failures a")  # the failed image's card is on the last page
    page.wait_for_function("() => document.getElementById('page').textContent === 'page 3 / 3'")
    assert page.locator('[id="i125"] .fail').inner_text() == "decode: img125.png: broken"
    assert page.locator('[id="i125"]').is_visible()
    assert errors == [], errors

    import shutil

    shutil.rmtree(tmp_path / "report")  # report.html copied without its folder
    page.reload()
    page.wait_for_selector("#cards .fail")
    assert "keep the report folder beside report.html" in page.inner_text("#cards")
