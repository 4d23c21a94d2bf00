"""report: one static, self-contained ``report.html`` a person can browse.

No server and no network: inline CSS and JS, with the run's data embedded as JSON
and the images referenced by paths relative to the run directory. Cards are drawn
a page at a time, so the page stays usable at thousands of images.

``build_report_data`` is the pure core: plain data in (each image's outputs, the
failures, the leaderboard, timings), the page's data out, with every file path taken
from the stages' outputs. ``read_report_inputs`` reads those from a run directory.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import cv2
import numpy as np
from PIL import Image

from pipeline.config import require
from pipeline.heatmaps import HEATMAP_METHODS
from pipeline.images import ImageError, ImageRef, load_image
from pipeline.provenance import Status
from pipeline.rundir import EXPORT_REGIONS, REPORT, RunDir, atomic_path, atomic_write_text, read_json, read_output
from pipeline.runner import StageContext, WholeRunStage


@dataclass(frozen=True)
class ReportConfig:
    thumbnail_side: int = 512  # originals are copied into thumbs/ at most this size, so a copied run shows them; 0 links the originals
    page_size: int = 60  # cards per page
    words_per_card: int = 24  # opinion chips shown per card
    maps_per_card: int = 8  # label heatmaps shown per card (the contact sheet has them all)
    points_per_map: int = 8  # SAM point prompts drawn per map, of each kind

    def __post_init__(self) -> None:
        require(self.page_size >= 1, f"report.page_size must be >= 1, got {self.page_size}")
        require(self.thumbnail_side == 0 or self.thumbnail_side >= 16,
                f"report.thumbnail_side must be 0 (link the originals) or >= 16, got {self.thumbnail_side}")


@dataclass
class ImageOutputs:
    """One image of a run and what the stages wrote for it (``None`` where a stage has no output)."""

    ref: ImageRef
    src: str  # the picture to show, relative to the run directory (its thumbnail, or the original)
    opinion: dict | None  # each output only when it is done with the run's settings
    labels: dict | None
    heatmaps: dict | None
    failures: list[tuple[str, str]]  # (stage, reason) of the stages that failed, were blocked or are stale
    regions: list[dict] | None = None  # the export's classes and boxes (export/regions.json), when surgery is done


@dataclass
class ReportInputs:
    """Everything the page shows, read from a run."""

    run_name: str
    config: dict  # the resolved config as plain data
    images: list[ImageOutputs]
    records: list[dict]  # the leaderboard's rows
    seconds: dict[str, float]  # per stage, summed over the latest command's finished records
    counts: dict[str, int] = field(default_factory=dict)  # per stage, the images the latest command finished
    session: str = ""  # when the latest command started ("" for runs older than sessions)


def read_report_inputs(run: RunDir, config: dict, status: Callable[[str, str, Mapping], Status],
                       thumbnail: Callable[[ImageRef], str | None] = lambda ref: None,
                       session: str | None = None) -> ReportInputs:
    """The report's inputs from a run directory.

    Args:
        run: the run.
        config: the config to show (the one its results were made with).
        status: ``status(image, stage, latest)``, each output's state; only done outputs are read,
            and a failed, blocked or stale one is listed with its reason.
        thumbnail: the run-relative path of an image's copy in the run, or ``None`` to link the original.
        session: the command whose timings the header shows (default: the latest that processed images).
    """
    latest = run.latest()
    readers = {"ascend": run.opinion, "decode": run.labels, "surgery": run.heatmaps}
    regions = (read_json(run.file(EXPORT_REGIONS)) or {}).get("images", {})
    images = []
    for ref in run.load_images():
        docs, failures = {}, []
        for stage, path in readers.items():
            st = status(ref.id, stage, latest)
            docs[stage], why = read_output(path(ref.id), run.root) if st.state == "done" else (None, None)
            if st.state == "done" and not isinstance(docs[stage], dict):  # done by its record, but it does not parse
                docs[stage] = None
                failures.append((stage, f"{ref.rel}: {why or 'not a ' + stage + ' output'}; rerun {stage} with --force"))
            if st.state in ("failed", "blocked", "damaged"):
                failures.append((stage, st.reason))
            elif st.state == "stale":
                failures.append((stage, f"{ref.rel}: stale, {st.reason}; rerun {stage}"))
        src = thumbnail(ref) or os.path.relpath(os.path.abspath(ref.path), os.path.abspath(run.root))
        boxes = regions.get(ref.id) if docs["surgery"] else None  # boxes from a current export of current maps
        images.append(ImageOutputs(ref, src, docs["ascend"], docs["decode"], docs["surgery"], failures, boxes))
    records = run.manifest_records()
    if session is None:
        session = max((r.get("session", "") for r in records if r.get("image") is not None), default="")
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for rec in records:
        if rec["status"] == "done" and rec.get("session", "") == session:
            seconds[rec["stage"]] = seconds.get(rec["stage"], 0.0) + float(rec.get("seconds") or 0)
            counts[rec["stage"]] = counts.get(rec["stage"], 0) + (rec.get("image") is not None)
    return ReportInputs(run.root.name, config, images, run.records()[:50], seconds, counts, session)


def write_thumbnail(run: RunDir, ref: ImageRef, side: int, max_side: int) -> str | None:
    """Copy an original into the run at most ``side`` pixels (once); its run-relative path, or ``None`` if unreadable."""
    path = run.thumbnail(ref.id)
    if not path.is_file():
        try:
            picture = load_image(ref.path, max_side=max_side)
        except ImageError:
            return None
        picture.thumbnail((side, side), Image.LANCZOS)
        with atomic_path(path) as tmp:
            picture.save(tmp, format="JPEG", quality=88)
    return run.rel(path)


def build_report_data(inputs: ReportInputs, cfg: ReportConfig) -> dict:
    """The page's data: a card per image, the failures, the leaderboard, timings and the config."""
    cards, failures = [], []
    methods: set[str] = set()
    for item in inputs.images:
        ref = item.ref
        card = {"id": ref.id, "rel": ref.rel, "src": item.src, "words": [], "labels": [], "prompts": [], "maps": [],
                "base": "", "sheet": "", "failures": [[stage, error] for stage, error in item.failures]}
        if item.opinion:
            card["words"] = [[w, d["frequency"]] for w, d in list(item.opinion["words"].items())[: cfg.words_per_card]]
        if item.labels:
            card["labels"] = [[d["word"], d["frequency"], d.get("score")] for d in item.labels["labels"]]
            card["prompts"] = [[p["text"], p["score"]] for p in item.labels["prompts"]]
        if item.heatmaps:
            _add_maps(card, item.heatmaps, cfg)
            methods.update(item.heatmaps["methods"])
            if item.regions:  # [class, score, source, [[x, y, w, h], ...]] in whole pixels, as many classes as maps
                card["boxes"] = [[d["label"], d["score"], d["regions"][0]["source"],
                                  [[round(v) for v in r["box"]] for r in d["regions"]]]
                                 for d in item.regions if d["regions"]][: cfg.maps_per_card]
        for stage, error in item.failures:
            failures.append({"image": ref.rel, "id": ref.id, "stage": stage, "error": error})
        cards.append(card)
    shown = [m for m in HEATMAP_METHODS if m in methods]
    return {"run": inputs.run_name, "model": inputs.config.get("model"), "config": inputs.config, "cards": cards,
            "failures": failures, "records": leaderboard_rows(inputs.records, {c["id"]: c["src"] for c in cards}),
            "seconds": {k: round(v, 1) for k, v in inputs.seconds.items()}, "counts": inputs.counts,
            "session": inputs.session, "page_size": cfg.page_size,
            "methods": shown, "method_names": {m: HEATMAP_METHODS[m] for m in shown},
            "default_method": "surgery" if "surgery" in shown else (shown[0] if shown else None),
            "has_masks": any(m[2] for c in cards for m in c["maps"]),
            "has_boxes": any(c.get("boxes") for c in cards),
            "has_scales": any(c.get("scale") for c in cards)}


def _add_maps(card: dict, heatmaps: dict, cfg: ReportConfig) -> None:
    """A card's maps: per map the word, its overlay per method, its SAM mask ("" without one), its points, its
    row in the atlas and its similarity range per method; the paths are the stage's own, less the prefix they
    share, which the card holds once as "base". ``scale`` is each method's range over all the image's words."""
    atlas = heatmaps.get("atlas")
    labels = [(row, d) for row, d in enumerate(heatmaps["labels"][: cfg.maps_per_card]) if d["overlays"] or atlas]
    paths = [p for _, d in labels for p in [*d["overlays"].values(), *([d["mask"]] if "mask" in d else [])]]
    base = card["base"] = _shared_prefix(paths)
    card["maps"] = [[d["word"], {m: p[len(base):] for m, p in d["overlays"].items()},
                     d["mask"][len(base):] if "mask" in d else "", _some_points(d, cfg.points_per_map), row,
                     d.get("range", {})]
                    for row, d in labels]
    if atlas:  # every map in one grayscale picture: the page colours a method's map where it has no overlay
        card["atlas"] = {"src": atlas["path"], "cell": atlas["cell"], "grids": atlas["grids"],
                         "cols": heatmaps["methods"], "rows": len(heatmaps["labels"])}
        ranges = [d["range"] for d in heatmaps["labels"] if d.get("range")]
        if ranges and len(ranges) == len(heatmaps["labels"]):
            card["scale"] = {m: [min(r[m][0] for r in ranges), max(r[m][1] for r in ranges)]
                             for m in heatmaps["methods"] if all(m in r for r in ranges)}
    card["sheet"] = heatmaps.get("sheet", "")
    card["size"] = heatmaps["size"]


def leaderboard_rows(records: list[dict], pictures: Mapping[str, str]) -> list[dict]:
    """``records.csv`` rows for the page, typed, each with the picture of its best image ("" if none)."""
    rows = []
    for r in records:
        score = r.get("score")
        rows.append({"word": r["word"], "length": int(r["length"]), "pieces": int(r["pieces"]),
                     "images": int(r["images"]), "score": None if score in (None, "") else float(score),
                     "unusualness": float(r["unusualness"]), "broken": str(r.get("broken")) == "True",
                     "best_image": r.get("best_image", ""), "picture": pictures.get(r.get("best_image", ""), "")})
    return rows


def leaderboard_page(title: str, records: list[dict], pictures: Mapping[str, str]) -> str:
    """A page with the leaderboard alone (``rank --runs``), drawn by the report's own code."""
    data = build_report_data(ReportInputs(title, {}, [], [], {}), ReportConfig())
    data["records"] = leaderboard_rows(records, pictures)
    return render_report(data)


def _shared_prefix(paths: list[str]) -> str:
    """The longest prefix of every path that ends at a "/" or "__" and leaves each path a non-empty rest."""
    prefix = os.path.commonprefix(paths) if paths else ""
    cut = max(prefix.rfind("/") + 1, prefix.rfind("__") + 2)
    while cut and any(len(p) <= cut for p in paths):
        cut = max(prefix.rfind("/", 0, cut - 1) + 1, prefix.rfind("__", 0, cut - 2) + 2)
    return prefix[:cut]


def _some_points(label: dict, n: int) -> list[list[int]]:
    """The first ``n`` positive and ``n`` negative points as ``[x, y, label]`` (strongest first)."""
    pts = list(zip(label.get("points", []), label.get("point_labels", [])))
    pos = [[x, y, 1] for (x, y), lab in pts if lab == 1][:n]
    neg = [[x, y, 0] for (x, y), lab in pts if lab == 0][:n]
    return pos + neg


def render_report(data: dict) -> str:
    """The HTML page for ``build_report_data``'s output."""
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    ramp = cv2.applyColorMap(np.linspace(0, 255, 17).round().astype(np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    tables = {f"__JET{c}__": " ".join(f"{v / 255:.3f}" for v in ramp[:, i]) for i, c in enumerate("RGB")}
    tables["__JETCSS__"] = ",".join(f"rgb({r},{g},{b})" for r, g, b in ramp.tolist())
    page = _PAGE.replace("__TITLE__", html.escape(data["run"]))
    for key, values in tables.items():  # the overlays' colour map, for maps the page draws from the atlas
        page = page.replace(key, values)
    return page.replace("__DATA__", payload)


class ReportStage(WholeRunStage[ReportConfig]):
    name = "report"
    needs = ("ascend", "decode", "surgery")

    def run_all(self, ctx: StageContext[ReportConfig]) -> list[str]:
        side, run = ctx.config.thumbnail_side, ctx.run
        config = run.load_config() if run.has_config() else ctx.settings.config  # what the results were made with
        thumbnail = (lambda ref: write_thumbnail(run, ref, side, ctx.settings.max_side)) if side else (lambda ref: None)
        inputs = read_report_inputs(run, config, ctx.status, thumbnail)
        atomic_write_text(run.file(REPORT), render_report(build_report_data(inputs, ctx.config)))
        return [REPORT]


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipsight: __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f5f5f4;color:#1c1917}
header{background:#1c1917;color:#fafaf9;padding:12px 20px}header h1{margin:0;font-size:18px}header .muted{color:#d6d3d1}
main{padding:16px 20px}.bar{display:flex;gap:12px;align-items:center;flex-wrap:wrap;margin-bottom:12px}
input[type=search]{padding:6px 10px;font-size:14px;width:260px;max-width:100%}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.card{background:#fff;border-radius:8px;padding:10px;box-shadow:0 1px 3px #0002}
.card>img,.card>.pic>img,.missing{width:100%;max-height:260px;object-fit:contain;background:#eee;border-radius:4px;display:block}
.pic svg.boxes{position:absolute;inset:0;width:100%;height:100%;pointer-events:auto}
.missing{display:flex;align-items:center;justify-content:center;height:120px;color:#78716c}
.card h3{font-size:13px;margin:6px 0;word-break:break-all}.chip{display:inline-block;background:#e7e5e4;border-radius:10px;
padding:1px 8px;margin:2px;cursor:pointer}.chip:hover{background:#fde68a}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #e7e5e4;text-align:left;vertical-align:top}
details{background:#fff;border-radius:8px;padding:8px 12px;margin-bottom:12px}pre{white-space:pre-wrap;font-size:12px}
.fail{color:#b91c1c}.muted{color:#78716c}button{padding:4px 10px}.card .fail{font-size:12px;margin:4px 0;word-break:break-word}
.maps{display:grid;grid-template-columns:repeat(4,1fr);gap:4px;margin-top:6px}.maps figure{margin:0;font-size:11px;text-align:center;cursor:zoom-in}
.maps img{width:100%;height:auto;max-height:none;border-radius:3px;display:block}.fig{position:relative}
.fig svg{position:absolute;inset:0;width:100%;height:100%;pointer-events:none}.fig svg.atl{opacity:.6}
.toggle button.on,.lb button.on{background:#1c1917;color:#fff}
.board{overflow-x:auto}#records th{cursor:pointer;user-select:none;white-space:nowrap}#records th.sorted{text-decoration:underline}
#records img{width:40px;height:40px;object-fit:cover;border-radius:3px;display:block}#records td.word{word-break:break-all}
.tag{font-size:11px;background:#fee2e2;color:#991b1b;border-radius:8px;padding:0 6px;margin-left:4px}
@media (max-width:640px){main{padding:10px}.grid{grid-template-columns:1fr}#records .wide{display:none}
#records td,#records th{padding:2px 4px;font-size:12px}#records th{white-space:normal}#records img{width:32px;height:32px}#records td.word{min-width:8em;word-break:normal;overflow-wrap:anywhere}}
#lightbox{position:fixed;inset:0;background:#000c;display:flex;align-items:center;justify-content:center;z-index:9;padding:12px}
#lightbox[hidden]{display:none}.lb{background:#fff;border-radius:8px;padding:12px;display:flex;gap:16px;flex-wrap:wrap;
max-width:96vw;max-height:96vh;overflow:auto}.lb .fig img{display:block;width:min(80vh,70vw,720px);height:auto;border-radius:4px}
.lb .side{min-width:220px;max-width:320px}.legend{height:14px;border-radius:3px;background:linear-gradient(to right,__JETCSS__)}
.legend-n{display:flex;justify-content:space-between;font-size:12px}
</style></head><body>
<svg width="0" height="0" style="position:absolute" aria-hidden="true"><filter id="jet" color-interpolation-filters="sRGB">
<feComponentTransfer><feFuncR type="table" tableValues="__JETR__"/><feFuncG type="table" tableValues="__JETG__"/>
<feFuncB type="table" tableValues="__JETB__"/></feComponentTransfer></filter></svg>
<header><h1>clipsight report: __TITLE__</h1><div id="summary" class="muted"></div></header>
<main>
<details id="failures-box"><summary id="failures-title"></summary><table id="failures"></table></details>
<details id="records-box"><summary>Leaderboard: CLIP's most unusual words</summary><p class="muted" id="records-note"></p>
<div class="board"><table id="records"></table></div></details>
<details id="config-box"><summary>Run config</summary><pre id="config"></pre></details>
<div class="bar" id="bar"><input id="filter" type="search" placeholder="filter by word…" aria-label="filter by word">
<span id="toggle" class="toggle"></span><span id="count" class="muted"></span>
<span id="pager"><button id="prev">&larr;</button><span id="page"></span><button id="next">&rarr;</button></span></div>
<div id="cards" class="grid"></div>
</main>
<div id="lightbox" hidden role="dialog" aria-modal="true"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const fmt = x => x === null || x === undefined ? '–' : Number(x).toFixed(3);
let page = 0, shown = D.cards, method = D.default_method, showPoints = false, showBoxes = false, scale = 'word', filterId = 0, open = null;
let sortKey = null, sortDir = 1;
const names = D.method_names;
const JET = ['__JETR__', '__JETG__', '__JETB__'];
const BOX_COLOURS = ['#facc15', '#22d3ee', '#f472b6', '#4ade80', '#fb923c', '#a78bfa'];
function toggle() {
  const methods = D.methods.length > 1 ? 'heatmaps: ' + D.methods.map(m =>
    `<button data-method="${m}" class="${m === method ? 'on' : ''}">${names[m]}</button>`).join('') : '';
  const scales = D.has_scales ? ' colours: ' + [['word', 'each word its own'], ['image', 'one per image']].map(([k, t]) =>
    `<button data-scale="${k}" class="${k === scale ? 'on' : ''}">${t}</button>`).join('') : '';
  const points = D.has_masks ? ` <label><input type="checkbox" id="points"${showPoints ? ' checked' : ''}> SAM points</label>` : '';
  const boxes = D.has_boxes ? ` <label><input type="checkbox" id="boxes"${showBoxes ? ' checked' : ''}> boxes</label>` : '';
  $('toggle').innerHTML = methods + scales + points + boxes;
}
const timing = Object.entries(D.seconds).map(([k, v]) => `${k} ${v}s` + (D.counts[k] ? ` (${D.counts[k]} images)` : ''));
$('summary').textContent = [`${D.cards.length} images`, `model ${D.model}`,
  timing.length ? (D.session ? `latest run, started ${D.session.replace('T', ' ')}: ` : 'latest run: ') + timing.join(' · ') : '']
  .filter(Boolean).join(' · ');
$('failures-title').textContent = `${D.failures.length} failures`;
if (!D.failures.length) $('failures-box').style.display = 'none';
$('failures').innerHTML = '<tr><th>image</th><th>stage</th><th>reason</th></tr>' + D.failures.map(f =>
  `<tr class="fail"><td><a href="#${esc(f.id)}">${esc(f.image)}</a></td><td>${esc(f.stage)}</td><td>${esc(f.error)}</td></tr>`).join('');
const COLS = [['picture', '', ''], ['word', 'word', ''], ['length', 'length', 'wide'], ['pieces', 'pieces', 'wide'],
  ['images', 'images', ''], ['score', 'score', ''], ['unusualness', 'unusual&shy;ness', '']];
function board() {
  const rows = D.records.slice();
  if (sortKey) rows.sort((a, b) => {
    const x = a[sortKey], y = b[sortKey];
    if (x === null || y === null) return (x === null) - (y === null);  // blanks last either way
    return (typeof x === 'string' ? x.localeCompare(y) : x - y) * sortDir;
  });
  $('records').innerHTML = '<tr>' + COLS.map(([k, t, cls]) => k === 'picture' ? '<th></th>' :
    `<th data-sort="${k}" class="${cls} ${k === sortKey ? 'sorted' : ''}" title="sort">${t}${k === sortKey ? (sortDir > 0 ? ' ▲' : ' ▼') : ''}</th>`).join('') + '</tr>' +
    rows.map(r => `<tr><td>${r.picture ? `<a href="#${esc(r.best_image)}"><img loading="lazy" src="${esc(r.picture)}" alt="${esc(r.best_image)}"></a>` : ''}</td>` +
    `<td class="word"><a href="#" data-word="${esc(r.word)}">${esc(r.word)}</a>${r.broken ? '<span class="tag" title="holds bytes that are not valid UTF-8, as CLIP produced them">broken bytes</span>' : ''}</td>` +
    `<td class="wide">${r.length}</td><td class="wide">${r.pieces}</td><td>${r.images}</td>` +
    `<td title="${r.score === null ? 'never a label' : 'best label score'}">${fmt(r.score)}</td><td>${r.unusualness.toFixed(3)}</td></tr>`).join('');
}
if (!D.records.length) $('records-box').style.display = 'none';
$('records-note').textContent = 'Click a column to sort. score: the best stock-CLIP label score; – when the word was never a label.' +
  (D.records.some(r => r.broken) ? ' Words with broken bytes are ranked last unless rank.keep_broken is set.' : '');
$('config').textContent = JSON.stringify(D.config, null, 2);
if (!Object.keys(D.config).length) $('config-box').style.display = 'none';
if (!D.cards.length) $('bar').style.display = 'none';
function transfer(c, m, range) {  // the map's values on the chosen scale: a linear step, then the JET table
  const s = c.scale && c.scale[m];
  if (scale !== 'image' || !s || !range || !range[m] || s[1] <= s[0]) return null;
  const [lo, hi] = range[m], span = s[1] - s[0];
  const slope = (hi - lo) / span, icpt = (lo - s[0]) / span, id = `f${filterId++}`;
  return {id, svg: `<filter id="${id}" color-interpolation-filters="sRGB"><feComponentTransfer>` +
    ['R', 'G', 'B'].map(k => `<feFunc${k} type="linear" slope="${slope}" intercept="${icpt}"/>`).join('') +
    '</feComponentTransfer><feComponentTransfer>' + ['R', 'G', 'B'].map((k, i) =>
    `<feFunc${k} type="table" tableValues="${JET[i]}"/>`).join('') + '</feComponentTransfer></filter>'};
}
function fromAtlas(c, w, row, m, range, cls) {  // the map's cell of the grayscale atlas, coloured, over the picture
  const a = c.atlas, [H, W] = a.cell, [gh, gw] = a.grids[m], col = a.cols.indexOf(m), f = transfer(c, m, range);
  return `<img loading="lazy" class="${cls}" data-method="${m}" src="${esc(c.src)}" alt="${esc(w)}">` +
    `<svg class="atl" viewBox="0 0 ${gw} ${gh}" preserveAspectRatio="none">${f ? f.svg : ''}<image href="${esc(a.src)}" x="${-col * W}" ` +
    `y="${-row * H}" width="${a.cols.length * W}" height="${a.rows * H}" filter="url(#${f ? f.id : 'jet'})"/></svg>`;
}
function card(c, ci) {
  const max = Math.max(1, ...c.words.map(w => w[1]));
  const chips = c.words.map(([w, n]) => `<span class="chip" data-word="${esc(w)}" title="${n}" style="font-size:${11 + 9 * n / max}px">${esc(w)}</span>`).join('');
  const labels = c.labels.map(([w, n, s]) => `<tr><td>${esc(w)}</td><td>${n}</td><td>${s === null ? '' : s.toFixed(3)}</td></tr>`).join('');
  const prompts = c.prompts.map(([t, s]) => `<li>${esc(t)} <span class="muted">${s === null ? '' : s.toFixed(3)}</span></li>`).join('');
  const dots = pts => pts.length ? `<svg viewBox="0 0 ${c.size[0]} ${c.size[1]}" preserveAspectRatio="none">` + pts.map(([x, y, l]) =>
    `<circle cx="${x}" cy="${y}" r="${Math.max(c.size[0], c.size[1]) / 30}" fill="${l ? '#22c55e' : '#ef4444'}" stroke="#fff"/>`).join('') + '</svg>' : '';
  const drawn = (w, overlays, row, range) => overlays[method] && !(scale === 'image' && c.scale && c.scale[method]) ?
    `<img loading="lazy" class="map" data-method="${method}" src="${esc(c.base + overlays[method])}" alt="${esc(w)}">` :
    fromAtlas(c, w, row, method, range, 'map');
  const maps = method ? c.maps.map((m, mi) => [m, mi]).filter(([[w, overlays]]) => overlays[method] || (c.atlas && c.atlas.grids[method]))
    .map(([[w, overlays, mask, pts, row, range], mi]) =>
    `<figure data-card="${ci}" data-map="${mi}" title="open large"><div class="fig">${drawn(w, overlays, row, range)}` +
    `${showPoints ? dots(pts) : ''}</div><figcaption>${esc(w)}` +
    (mask ? ` <a href="${esc(c.base + mask)}">mask</a>` : '') + '</figcaption></figure>').join('') : '';
  const fails = c.failures.map(([st, e]) => `<div class="fail">${esc(st)}: ${esc(e)}</div>`).join('');
  const boxes = showBoxes && c.boxes && c.size ? `<svg class="boxes" viewBox="0 0 ${c.size[0]} ${c.size[1]}">` +
    c.boxes.map(([l, s, src, bs], i) => bs.map(([x, y, w, h]) => `<g><title>${esc(l)} ${fmt(s)} (${esc(src)})</title>` +
    `<rect x="${x}" y="${y}" width="${w}" height="${h}" fill="none" stroke="${BOX_COLOURS[i % BOX_COLOURS.length]}" ` +
    `stroke-width="${Math.max(c.size[0], c.size[1]) / 120}"/><text x="${x + 1}" y="${y + Math.max(c.size[0], c.size[1]) / 18}" ` +
    `font-size="${Math.max(c.size[0], c.size[1]) / 18}" fill="${BOX_COLOURS[i % BOX_COLOURS.length]}" stroke="#000" ` +
    `stroke-width="${Math.max(c.size[0], c.size[1]) / 400}">${esc(l)}</text></g>`).join('')).join('') + '</svg>' : '';
  return `<div class="card" id="${esc(c.id)}"><div class="fig pic"><img loading="lazy" src="${esc(c.src)}" alt="${esc(c.rel)}" data-missing="1">${boxes}</div><h3>${esc(c.rel)}</h3>` +
    fails + `<div>${chips || '<span class="muted">no opinion</span>'}</div>` +
    (labels ? `<table><tr><th>label</th><th>count</th><th>score</th></tr>${labels}</table>` : '') +
    (maps ? `<div class="maps">${maps}</div>` : '') +
    (c.sheet ? `<a href="${esc(c.sheet)}">all heatmaps</a>` : '') +
    (prompts ? `<details><summary>best prompts</summary><ol>${prompts}</ol></details>` : '') + '</div>';
}
function lightbox() {  // one map, large, over its picture, with the colour scale and how it is scaled
  const box = $('lightbox');
  if (!open) { box.hidden = true; box.innerHTML = ''; return; }
  const c = shown[open.card], [w, overlays, mask, pts, row, range] = c.maps[open.map];
  const canScale = !!(c.atlas && c.atlas.grids[method] && c.scale && c.scale[method] && range && range[method]);
  const pic = c.atlas && c.atlas.grids[method] ? fromAtlas(c, w, row, method, range, 'big') :
    `<img class="big" src="${esc(c.base + overlays[method])}" alt="${esc(w)}">`;
  const [lo, hi] = scale === 'image' && canScale ? c.scale[method] : (range && range[method]) || [null, null];
  const how = scale === 'image' && canScale ? 'one scale for every word of this image: absent words stay blue' :
    'scaled to this word alone: its lowest patch is blue and its highest red, whether or not the word is in the image';
  box.innerHTML = `<div class="lb"><div class="fig">${pic}</div><div class="side"><h2>${esc(w)}</h2>` +
    `<div>${esc(names[method])} · ${esc(c.rel)}</div><p class="muted">${how}</p>` +
    `<div class="legend" title="colour scale"></div><div class="legend-n"><span>${fmt(lo)}</span><span>similarity</span><span>${fmt(hi)}</span></div>` +
    (canScale ? `<p>${[['word', 'each word its own'], ['image', 'one per image']].map(([k, t]) =>
      `<button data-scale="${k}" class="${k === scale ? 'on' : ''}">${t}</button>`).join(' ')}</p>` : '') +
    (mask ? `<p><a href="${esc(c.base + mask)}">SAM mask</a></p>` : '') +
    `<p><button id="lb-close">close</button> <span class="muted">(Esc)</span></p></div></div>`;
  box.hidden = false;
}
function render() {
  const n = Math.max(1, Math.ceil(shown.length / D.page_size));
  page = Math.min(page, n - 1);
  filterId = 0;
  const first = page * D.page_size;
  $('cards').innerHTML = shown.slice(first, first + D.page_size).map((c, i) => card(c, first + i)).join('');
  $('cards').querySelectorAll('img[data-missing]').forEach(img => img.addEventListener('error', () => {
    const c = D.cards.find(x => x.id === img.closest('.card').id);
    const why = c && c.failures.length ? c.failures[0][1] : 'the picture could not be loaded';
    img.outerHTML = `<div class="missing" title="${esc(why)}">picture unavailable</div>`;
  }, {once: true}));
  $('count').textContent = `${shown.length} of ${D.cards.length} images`;
  $('page').textContent = `page ${page + 1} / ${n}`;
  $('pager').style.display = D.cards.length > D.page_size ? '' : 'none';
  lightbox();
}
function filter(q) {
  q = q.trim().toLowerCase();
  shown = q ? D.cards.filter(c => c.words.some(w => w[0].toLowerCase().includes(q)) ||
                                   c.labels.some(l => l[0].toLowerCase().includes(q))) : D.cards;
  page = 0; open = null; render();
}
$('filter').addEventListener('input', e => filter(e.target.value));
$('prev').onclick = () => { page = Math.max(0, page - 1); render(); };
$('next').onclick = () => { page += 1; render(); };
document.addEventListener('keydown', e => { if (e.key === 'Escape' && open) { open = null; lightbox(); } });
document.addEventListener('click', e => {
  const t = e.target, d = t.dataset || {};
  if (d.method && t.tagName === 'BUTTON') { method = d.method; toggle(); render(); return; }
  if (d.scale && t.tagName === 'BUTTON') { scale = d.scale; toggle(); render(); return; }
  if (d.sort) { sortDir = sortKey === d.sort ? -sortDir : (d.sort === 'word' ? 1 : -1); sortKey = d.sort; board(); return; }
  if (t.id === 'points') { showPoints = t.checked; render(); return; }
  if (t.id === 'boxes') { showBoxes = t.checked; render(); return; }
  if (t.id === 'lb-close' || t.id === 'lightbox') { open = null; lightbox(); return; }
  const fig = t.closest && t.closest('figure[data-card]');
  if (fig && t.tagName !== 'A') { open = {card: +fig.dataset.card, map: +fig.dataset.map}; lightbox(); return; }
  if (d.word) { e.preventDefault(); $('filter').value = d.word; filter(d.word); }
});
toggle(); board(); render();
</script></body></html>
"""
