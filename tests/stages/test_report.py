"""stages.report: the page's data from a run's outputs, with no browser: paths come from the data."""

import zlib

from pipeline.run.config import to_dict
from pipeline.run.images import ImageRef
from pipeline.run.rundir import RunDir, atomic_write_json
from pipeline.run.provenance import Provenance
from stages import RESULT_KEYS, STAGES, RunConfig
from pipeline.run.provenance import Status
from stages.report import (INDEX_BUCKETS, ImageOutputs, ReportConfig, ReportInputs, build_report_data, leaderboard_page,
                           load_report, page_data, read_report_inputs, render_report, write_report)


def _heatmaps(overlays, mask=None):
    label = {"word": "red", "slug": "red", "overlays": overlays, "points": [[1, 2], [3, 4], [5, 6]],
             "point_labels": [1, 1, 0], "peak": {}}
    if mask:
        label["mask"] = mask
    return {"image": "a", "size": [64, 48], "methods": list(overlays), "labels": [label], "sheet": "surgery/a__sheet.png"}


def test_cards_take_their_paths_from_the_surgery_outputs():
    inputs = ReportInputs("run", {"model": "toy"}, [
        ImageOutputs(ImageRef("a", "/x/a.png", "a.png"), "../x/a.png",
                     {"words": {"red": {"frequency": 3}, "odd": {"frequency": 1}}},
                     {"labels": [{"word": "red", "frequency": 3, "score": 0.2, "source": "human"},
                                 {"word": "ring", "frequency": 2, "score": 0.1, "evidence": [
                                     {"kind": "tile", "box": [0.5, 0.0, 0.5, 0.5]}, {"kind": "image", "box": [0, 0, 1, 1]}]},
                                 {"word": "blue", "frequency": 2, "score": 0.1, "evidence": [{"kind": "image", "box": [0, 0, 1, 1]}]}],
                      "prompts": [{"text": "red", "score": 0.3}]},
                     _heatmaps({"raw": "surgery/a/raw.png", "single": "surgery/a/single.png"}, mask="surgery/a/m.png"),
                     []),
        ImageOutputs(ImageRef("b", "/x/b.png", "b.png"), "../x/b.png", None, None, None, [("ascend", "b.png: empty")]),
    ], [{"word": "odd", "length": "3", "pieces": "1", "images": "1", "score": "", "unusualness": "1.3",
          "best_image": "a", "broken": "False"}], {"ascend": 1.26})
    data = build_report_data(inputs, ReportConfig(points_per_map=1))
    a, b = data["cards"]
    assert a["src"] == "../x/a.png" and a["sheet"] == "surgery/a__sheet.png"
    word, overlays, mask, points, row, ranges = a["maps"][0]
    assert a["base"] == "surgery/a/"  # the prefix the stage's paths share, held once per card
    assert word == "red" and overlays == {"raw": "raw.png", "single": "single.png"}
    assert mask == "m.png" and points == [[1, 2, 1], [5, 6, 0]] and row == 0  # one point of each kind
    assert a["words"] == [["red", 3], ["odd", 1]]
    # where each label came from: no evidence (one view), the tiles among its evidence, or the whole picture
    # and its source (a label written before sources existed is the opinion's)
    assert a["labels"] == [["red", 3, 0.2, None, "human"], ["ring", 2, 0.1, [[0.5, 0.0, 0.5, 0.5]], "opinion"],
                           ["blue", 2, 0.1, [], "opinion"]]
    assert data["methods"] == ["raw", "single"] and data["default_method"] == "raw"  # only what exists, one order
    assert set(data["method_names"]) == {"raw", "single"}
    assert b["maps"] == [] and b["sheet"] == "" and data["failures"] == [
        {"image": "b.png", "id": "b", "card": 1, "stage": "ascend", "error": "b.png: empty"}]  # its card: the 2nd
    assert b["failures"] == [["ascend", "b.png: empty"]] and a["failures"] == []  # the reason is on the card too
    assert data["seconds"] == {"ascend": 1.3} and data["model"] == "toy"
    assert data["records"] == [{"word": "odd", "length": 3, "pieces": 1, "images": 1, "score": None,
                                "unusualness": 1.3, "broken": False, "best_image": "a", "picture": "../x/a.png",
                                "card": 0}]  # the best image's card, for its link
    assert data["has_masks"]  # a SAM mask exists, so the page offers SAM points


def test_the_page_embeds_the_data_and_builds_no_file_names(tmp_path):
    run = RunDir(tmp_path / "r")
    ref = ImageRef("a", str(tmp_path / "a.png"), "a.png")
    run.save_images([ref])
    atomic_write_json(run.heatmaps("a"), _heatmaps({"surgery": "surgery/a/s.png"}))
    run.append_manifest([{"image": "a", "stage": "surgery", "status": "done", "seconds": 2.0, "outputs": [],
                          "provenance": "made-with-other-settings"},
                         {"image": "a", "stage": "decode", "status": "failed", "error": "bad", "outputs": []}])
    prov = Provenance(to_dict(RunConfig(model="toy")), RESULT_KEYS, {n: st.needs for n, st in STAGES.items()})
    atomic_write_json(run.labels("a"), {"labels": [], "prompts": []})
    atomic_write_json(run.opinion("a"), {"words": {}})
    run.append_manifest([{"image": "a", "stage": "ascend", "status": "done", "outputs": [],
                          "provenance": prov.expected["ascend"]}])
    status = lambda image, stage, latest: prov.status(run, latest, image, stage)  # noqa: E731
    data = build_report_data(read_report_inputs(run, {"model": "toy"}, status), ReportConfig())
    card = data["cards"][0]
    assert card["src"] == "../a.png" and card["labels"] == [] and card["maps"] == []  # failed and stale: not shown
    assert [(f["stage"], f["error"]) for f in data["failures"]] == [
        ("decode", "bad (decode)"), ("surgery", "a.png: stale, made with settings this run does not know; rerun surgery")]
    assert data["seconds"] == {"ascend": 0.0, "surgery": 2.0}
    written = write_report(tmp_path / "out", data)
    assert written == ["report.html", "report/cards-00000.js"]  # a card without words: no word index
    assert load_report(tmp_path / "out" / "report.html") == {**data, "total": 1, "pages": "report"}  # all of it, back
    page = (tmp_path / "out" / "report.html").read_text()
    assert '"rel":' not in page and "__" not in page.split("<script>")[1]  # no card inline; no output file name


def test_shared_prefix_always_leaves_a_name():
    from stages.report import _shared_prefix

    assert _shared_prefix(["s/i/i__red__raw.png", "s/i/i__red__single.png", "s/i/i__ring__raw.png"]) == "s/i/i__"
    assert _shared_prefix(["s/i/i__red__raw.png"]) == "s/i/i__red__"
    assert _shared_prefix(["s/i/i__red__raw.png", "s/i/i__red__raw.png.x"]) == "s/i/i__red__"
    assert _shared_prefix([]) == "" and _shared_prefix(["a.png", "b.png"]) == ""


def test_maps_without_overlay_files_are_drawn_from_the_atlas():
    doc = _heatmaps({})  # surgery.overlays off: no PNG per map
    doc["methods"] = ["raw", "naclip"]
    doc["atlas"] = {"path": "surgery/a__maps.png", "cell": [4, 4], "grids": {"raw": [4, 4], "naclip": [4, 4]}}
    inputs = ReportInputs("run", {}, [ImageOutputs(ImageRef("a", "/x/a.png", "a.png"), "thumbs/a.jpg", None, None, doc, [])],
                          [], {})
    data = build_report_data(inputs, ReportConfig())
    card = data["cards"][0]
    assert card["maps"][0][:2] == ["red", {}] and card["maps"][0][4] == 0
    assert not data["has_masks"] and not data["has_scales"]  # no SAM, no ranges: the page offers neither control
    assert card["atlas"] == {"src": "surgery/a__maps.png", "cell": [4, 4], "grids": {"raw": [4, 4], "naclip": [4, 4]},
                             "cols": ["raw", "naclip"], "rows": 1}
    page = render_report(data)
    assert 'filter id="jet"' in page and "__JET" not in page  # the colour map's tables are filled in


def test_one_scale_per_image_comes_from_every_word_range():
    doc = _heatmaps({})
    doc["methods"] = ["surgery"]
    doc["labels"][0]["range"] = {"surgery": [0.1, 0.3]}
    doc["labels"].append({**doc["labels"][0], "word": "ring", "range": {"surgery": [-0.2, 0.05]}})
    doc["atlas"] = {"path": "surgery/a__maps.png", "cell": [4, 4], "grids": {"surgery": [4, 4]}}
    inputs = ReportInputs("run", {}, [ImageOutputs(ImageRef("a", "/x/a.png", "a.png"), "a.jpg", None, None, doc, [])],
                          [], {})
    data = build_report_data(inputs, ReportConfig())
    card = data["cards"][0]
    assert card["scale"] == {"surgery": [-0.2, 0.3]} and data["has_scales"]
    assert [m[5] for m in card["maps"]] == [{"surgery": [0.1, 0.3]}, {"surgery": [-0.2, 0.05]}]


def test_header_timings_are_the_latest_command_only(tmp_path):
    run = RunDir(tmp_path / "r")
    ref = ImageRef("a", str(tmp_path / "a.png"), "a.png")
    run.save_images([ref])
    old = {"image": "a", "stage": "ascend", "status": "done", "seconds": 50.0, "outputs": [], "session": "2026-01-01T00:00:00Z"}
    new = {**old, "seconds": 7.0, "session": "2026-01-02T00:00:00Z"}
    run.append_manifest([old, new, {**new, "stage": "decode", "seconds": 1.0},
                         {"image": None, "stage": "report", "status": "done", "seconds": 0.5, "outputs": [],
                          "session": "2026-01-03T00:00:00Z"}])  # a later report-only command did no image work
    inputs = read_report_inputs(run, {}, lambda image, stage, latest: Status("pending", ""))
    assert inputs.session == "2026-01-02T00:00:00Z"
    assert inputs.seconds == {"ascend": 7.0, "decode": 1.0} and inputs.counts == {"ascend": 1, "decode": 1}


def test_the_merged_leaderboard_is_a_page_of_its_own():
    rows = [{"word": "odd", "length": 3, "pieces": 1, "images": 2, "score": None, "unusualness": 1.3,
             "best_image": "r1/a", "broken": False}]
    page = leaderboard_page("2 runs merged", rows, {"r1/a": "../r1/thumbs/a.jpg"})
    embedded = page_data(page)
    assert embedded["total"] == 0 and embedded["records"][0]["picture"] == "../r1/thumbs/a.jpg"
    assert embedded["run"] == "2 runs merged"


def test_a_rebuild_rewrites_only_the_pages_that_changed(tmp_path):
    items = [ImageOutputs(ImageRef(f"i{k}", f"/x/{k}.png", f"{k}.png"), f"{k}.png",
                          {"words": {f"w{k}": {"frequency": 2}}}, None, None, []) for k in range(7)]
    cfg = ReportConfig(page_size=3)  # pages of cards 0-2, 3-5 and 6
    first = write_report(tmp_path, build_report_data(ReportInputs("r", {}, items, [], {}), cfg))
    assert first[:4] == ["report.html", "report/cards-00000.js", "report/cards-00001.js", "report/cards-00002.js"]
    before = {rel: (tmp_path / rel).stat().st_ino for rel in first}  # a rewrite renames a new file into place
    items[4].opinion = {"words": {"w4": {"frequency": 2}, "odd": {"frequency": 1}}}  # image 4 redone: a new word
    second = write_report(tmp_path, build_report_data(ReportInputs("r", {}, items, [], {}), cfg))
    changed = {rel for rel in second if rel not in before or (tmp_path / rel).stat().st_ino != before[rel]}
    odd = f"report/index-{zlib.crc32(b'odd') % INDEX_BUCKETS:03d}.js"
    assert changed == {"report/cards-00001.js", "report/words.js", odd}  # its page, the word list, odd's bucket
    assert load_report(tmp_path / "report.html")["cards"][4]["words"] == [["w4", 2], ["odd", 1]]
    items.pop()  # a smaller run: the third page's file goes
    third = write_report(tmp_path, build_report_data(ReportInputs("r", {}, items, [], {}), cfg))
    assert "report/cards-00002.js" not in third and not (tmp_path / "report" / "cards-00002.js").exists()
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(r.split("/")[1] for r in third[1:])


def test_cards_written_as_they_come_make_the_same_report(tmp_path):
    from stages.report import ReportPages

    items = [ImageOutputs(ImageRef(f"i{k}", f"/x/{k}.png", f"{k}.png"), f"{k}.png",
                          {"words": {f"w{k % 3}": {"frequency": 2}}}, None, None,
                          [("ascend", "bad")] if k == 4 else []) for k in range(8)]
    records = [{"word": "w1", "length": 2, "pieces": 1, "images": 3, "score": None, "unusualness": 1.0,
                "best_image": "i7", "broken": False}]
    cfg = ReportConfig(page_size=3)
    whole = write_report(tmp_path / "a", build_report_data(ReportInputs("r", {}, items, records, {}), cfg))
    pages = ReportPages(tmp_path / "b", cfg.page_size)
    data = build_report_data(ReportInputs("r", {}, iter(items), records, {}), cfg, pages)  # read once, as a run's
    assert "cards" not in data and data["total"] == 8 and data["records"][0]["card"] == 7
    assert data["failures"][0]["card"] == 4 and data["records"][0]["picture"] == "7.png"
    assert pages.finish(data) == whole
    assert all((tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes() for rel in whole)
