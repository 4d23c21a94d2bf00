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
from dataclasses import dataclass
from typing import Callable, Mapping

import cv2
import numpy as np
from PIL import Image

from pipeline.config import require
from pipeline.heatmaps import HEATMAP_METHODS
from pipeline.images import ImageError, ImageRef, load_image
from pipeline.provenance import Status
from pipeline.rundir import REPORT, RunDir, atomic_path, atomic_write_text, read_json
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


@dataclass
class ReportInputs:
    """Everything the page shows, read from a run."""

    run_name: str
    config: dict  # the resolved config as plain data
    images: list[ImageOutputs]
    records: list[dict]  # the leaderboard's rows
    seconds: dict[str, float]  # per stage, summed over the images' finished records


def read_report_inputs(run: RunDir, config: dict, status: Callable[[str, str, Mapping], Status],
                       thumbnail: Callable[[ImageRef], str | None] = lambda ref: None) -> ReportInputs:
    """The report's inputs from a run directory.

    Args:
        run: the run.
        config: the config to show (the one its results were made with).
        status: ``status(image, stage, latest)``, each output's state; only done outputs are read,
            and a failed, blocked or stale one is listed with its reason.
        thumbnail: the run-relative path of an image's copy in the run, or ``None`` to link the original.
    """
    latest = run.latest()
    readers = {"ascend": run.opinion, "decode": run.labels, "surgery": run.heatmaps}
    images = []
    for ref in run.load_images():
        docs, failures = {}, []
        for stage, path in readers.items():
            st = status(ref.id, stage, latest)
            docs[stage] = read_json(path(ref.id)) if st.state == "done" else None
            if st.state in ("failed", "blocked"):
                failures.append((stage, st.reason))
            elif st.state == "stale":
                failures.append((stage, f"{ref.rel}: stale, {st.reason}; rerun {stage}"))
        src = thumbnail(ref) or os.path.relpath(os.path.abspath(ref.path), os.path.abspath(run.root))
        images.append(ImageOutputs(ref, src, docs["ascend"], docs["decode"], docs["surgery"], failures))
    seconds: dict[str, float] = {}
    for rec in run.manifest_records():
        if rec["status"] == "done":
            seconds[rec["stage"]] = seconds.get(rec["stage"], 0.0) + float(rec.get("seconds") or 0)
    return ReportInputs(run.root.name, config, images, run.records()[:50], seconds)


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
                "base": "", "sheet": ""}
        if item.opinion:
            card["words"] = [[w, d["frequency"]] for w, d in list(item.opinion["words"].items())[: cfg.words_per_card]]
        if item.labels:
            card["labels"] = [[d["word"], d["frequency"], d.get("score")] for d in item.labels["labels"]]
            card["prompts"] = [[p["text"], p["score"]] for p in item.labels["prompts"]]
        if item.heatmaps:
            # each map: the word, its overlay per method, its SAM mask ("" without one), its points, its row in
            # the atlas; the paths are the stage's own, less the prefix they share, which the card holds once as "base"
            atlas = item.heatmaps.get("atlas")
            labels = [(row, d) for row, d in enumerate(item.heatmaps["labels"][: cfg.maps_per_card])
                      if d["overlays"] or atlas]
            paths = [p for _, d in labels for p in [*d["overlays"].values(), *([d["mask"]] if "mask" in d else [])]]
            base = card["base"] = _shared_prefix(paths)
            card["maps"] = [[d["word"], {m: p[len(base):] for m, p in d["overlays"].items()},
                             d["mask"][len(base):] if "mask" in d else "", _some_points(d, cfg.points_per_map), row]
                            for row, d in labels]
            if atlas:  # every map in one grayscale picture: the page colours a method's map where it has no overlay
                card["atlas"] = {"src": atlas["path"], "cell": atlas["cell"], "grids": atlas["grids"],
                                 "cols": item.heatmaps["methods"], "rows": len(item.heatmaps["labels"])}
            card["sheet"] = item.heatmaps.get("sheet", "")
            card["size"] = item.heatmaps["size"]
            methods.update(item.heatmaps["methods"])
        for stage, error in item.failures:
            failures.append({"image": ref.rel, "id": ref.id, "stage": stage, "error": error})
        cards.append(card)
    shown = [m for m in HEATMAP_METHODS if m in methods]
    return {"run": inputs.run_name, "model": inputs.config.get("model"), "config": inputs.config, "cards": cards,
            "failures": failures, "records": inputs.records,
            "seconds": {k: round(v, 1) for k, v in inputs.seconds.items()}, "page_size": cfg.page_size,
            "methods": shown, "method_names": {m: HEATMAP_METHODS[m] for m in shown},
            "default_method": "surgery" if "surgery" in shown else (shown[0] if shown else None)}


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
        data = build_report_data(read_report_inputs(run, config, ctx.status, thumbnail), ctx.config)
        atomic_write_text(run.file(REPORT), render_report(data))
        return [REPORT]


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipsight: __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f5f5f4;color:#1c1917}
header{background:#1c1917;color:#fafaf9;padding:12px 20px}header h1{margin:0;font-size:18px}
main{padding:16px 20px}.bar{display:flex;gap:12px;align-items:center;flex-wrap:wrap;margin-bottom:12px}
input[type=search]{padding:6px 10px;font-size:14px;width:260px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.card{background:#fff;border-radius:8px;padding:10px;box-shadow:0 1px 3px #0002}
.card img{width:100%;max-height:260px;object-fit:contain;background:#eee;border-radius:4px}
.card h3{font-size:13px;margin:6px 0;word-break:break-all}.chip{display:inline-block;background:#e7e5e4;border-radius:10px;
padding:1px 8px;margin:2px;cursor:pointer}.chip:hover{background:#fde68a}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #e7e5e4;text-align:left;vertical-align:top}
details{background:#fff;border-radius:8px;padding:8px 12px;margin-bottom:12px}pre{white-space:pre-wrap;font-size:12px}
.fail{color:#b91c1c}.muted{color:#78716c}button{padding:4px 10px}
.maps{display:grid;grid-template-columns:repeat(4,1fr);gap:4px;margin-top:6px}.maps figure{margin:0;font-size:11px;text-align:center}
.maps img{width:100%;height:auto;max-height:none;border-radius:3px;display:block}.maps .fig{position:relative}
.maps svg{position:absolute;inset:0;width:100%;height:100%;pointer-events:none}.maps svg.atl{opacity:.6}.toggle button.on{background:#1c1917;color:#fff}
</style></head><body>
<svg width="0" height="0" style="position:absolute" aria-hidden="true"><filter id="jet" color-interpolation-filters="sRGB">
<feComponentTransfer><feFuncR type="table" tableValues="__JETR__"/><feFuncG type="table" tableValues="__JETG__"/>
<feFuncB type="table" tableValues="__JETB__"/></feComponentTransfer></filter></svg>
<header><h1>clipsight report: __TITLE__</h1><div id="summary" class="muted"></div></header>
<main>
<details id="failures-box"><summary id="failures-title"></summary><table id="failures"></table></details>
<details><summary>Leaderboard: CLIP's most unusual words</summary><table id="records"></table></details>
<details><summary>Run config</summary><pre id="config"></pre></details>
<div class="bar"><input id="filter" type="search" placeholder="filter by word…" aria-label="filter by word">
<span id="toggle" class="toggle"></span><span id="count" class="muted"></span><button id="prev">&larr;</button><span id="page"></span><button id="next">&rarr;</button></div>
<div id="cards" class="grid"></div>
</main>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
let page = 0, shown = D.cards, method = D.default_method, showPoints = false;
const names = D.method_names;
function toggle() {
  $('toggle').innerHTML = D.methods.length ? 'heatmaps: ' + D.methods.map(m =>
    `<button data-method="${m}" class="${m === method ? 'on' : ''}">${names[m]}</button>`).join('') +
    `<label><input type="checkbox" id="points"${showPoints ? ' checked' : ''}> SAM points</label>` : '';
}
$('summary').textContent = `${D.cards.length} images · model ${D.model} · ` +
  Object.entries(D.seconds).map(([k, v]) => `${k} ${v}s`).join(' · ');
$('failures-title').textContent = `${D.failures.length} failures`;
if (!D.failures.length) $('failures-box').style.display = 'none';
$('failures').innerHTML = '<tr><th>image</th><th>stage</th><th>reason</th></tr>' + D.failures.map(f =>
  `<tr class="fail"><td><a href="#${esc(f.id)}">${esc(f.image)}</a></td><td>${esc(f.stage)}</td><td>${esc(f.error)}</td></tr>`).join('');
$('records').innerHTML = '<tr><th>word</th><th>length</th><th>pieces</th><th>images</th><th>score</th><th>unusualness</th></tr>' +
  D.records.map(r => `<tr><td><a href="#" data-word="${esc(r.word)}" class="w">${esc(r.word)}</a></td><td>${r.length}</td>` +
  `<td>${r.pieces}</td><td>${r.images}</td><td>${esc(r.score)}</td><td>${r.unusualness}</td></tr>`).join('');
$('config').textContent = JSON.stringify(D.config, null, 2);
function card(c) {
  const max = Math.max(1, ...c.words.map(w => w[1]));
  const chips = c.words.map(([w, n]) => `<span class="chip" data-word="${esc(w)}" title="${n}" style="font-size:${11 + 9 * n / max}px">${esc(w)}</span>`).join('');
  const labels = c.labels.map(([w, n, s]) => `<tr><td>${esc(w)}</td><td>${n}</td><td>${s === null ? '' : s.toFixed(3)}</td></tr>`).join('');
  const prompts = c.prompts.map(([t, s]) => `<li>${esc(t)} <span class="muted">${s === null ? '' : s.toFixed(3)}</span></li>`).join('');
  const dots = pts => pts.length ? `<svg viewBox="0 0 ${c.size[0]} ${c.size[1]}" preserveAspectRatio="none">` + pts.map(([x, y, l]) =>
    `<circle cx="${x}" cy="${y}" r="${Math.max(c.size[0], c.size[1]) / 30}" fill="${l ? '#22c55e' : '#ef4444'}" stroke="#fff"/>`).join('') + '</svg>' : '';
  const fromAtlas = (w, row) => {  // the map's cell of the grayscale atlas, coloured by the JET filter, over the picture
    const a = c.atlas, [H, W] = a.cell, [gh, gw] = a.grids[method], col = a.cols.indexOf(method);
    return `<img loading="lazy" class="map" data-method="${method}" src="${esc(c.src)}" alt="${esc(w)}">` +
      `<svg class="atl" viewBox="0 0 ${gw} ${gh}" preserveAspectRatio="none"><image href="${esc(a.src)}" x="${-col * W}" ` +
      `y="${-row * H}" width="${a.cols.length * W}" height="${a.rows * H}" filter="url(#jet)"/></svg>`;
  };
  const drawn = (w, overlays, row) => overlays[method] ?
    `<img loading="lazy" class="map" data-method="${method}" src="${esc(c.base + overlays[method])}" alt="${esc(w)}">` :
    fromAtlas(w, row);
  const maps = method ? c.maps.filter(([w, overlays]) => overlays[method] || (c.atlas && c.atlas.grids[method]))
    .map(([w, overlays, mask, pts, row]) =>
    `<figure><div class="fig">${drawn(w, overlays, row)}` +
    `${showPoints ? dots(pts) : ''}</div><figcaption>${esc(w)}` +
    (mask ? ` <a href="${esc(c.base + mask)}">mask</a>` : '') + '</figcaption></figure>').join('') : '';
  return `<div class="card" id="${esc(c.id)}"><img loading="lazy" src="${esc(c.src)}" alt="${esc(c.rel)}"><h3>${esc(c.rel)}</h3>` +
    `<div>${chips || '<span class="muted">no opinion</span>'}</div>` +
    (labels ? `<table><tr><th>label</th><th>count</th><th>score</th></tr>${labels}</table>` : '') +
    (maps ? `<div class="maps">${maps}</div>` : '') +
    (c.sheet ? `<a href="${esc(c.sheet)}">all heatmaps</a>` : '') +
    (prompts ? `<details><summary>best prompts</summary><ol>${prompts}</ol></details>` : '') + '</div>';
}
function render() {
  const n = Math.max(1, Math.ceil(shown.length / D.page_size));
  page = Math.min(page, n - 1);
  $('cards').innerHTML = shown.slice(page * D.page_size, (page + 1) * D.page_size).map(card).join('');
  $('count').textContent = `${shown.length} of ${D.cards.length} images`;
  $('page').textContent = `page ${page + 1} / ${n}`;
}
function filter(q) {
  q = q.trim().toLowerCase();
  shown = q ? D.cards.filter(c => c.words.some(w => w[0].toLowerCase().includes(q)) ||
                                   c.labels.some(l => l[0].toLowerCase().includes(q))) : D.cards;
  page = 0; render();
}
$('filter').addEventListener('input', e => filter(e.target.value));
$('prev').onclick = () => { page = Math.max(0, page - 1); render(); };
$('next').onclick = () => { page += 1; render(); };
document.addEventListener('click', e => {
  const m = e.target.dataset && e.target.dataset.method;
  if (m && e.target.tagName === 'BUTTON') { method = m; toggle(); render(); return; }
  if (e.target.id === 'points') { showPoints = e.target.checked; render(); return; }
  const w = e.target.dataset && e.target.dataset.word;
  if (w) { e.preventDefault(); $('filter').value = w; filter(w); }
});
toggle(); render();
</script></body></html>
"""
