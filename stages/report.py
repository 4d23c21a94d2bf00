"""report: one static, self-contained ``report.html`` a person can browse.

No server and no network: inline CSS and JS, with the run's data embedded as JSON
and the images referenced by paths relative to the run directory. Cards are drawn
a page at a time, so the page stays usable at thousands of images.
"""

from __future__ import annotations

import csv
import html
import json
import os
from dataclasses import dataclass

from pipeline.config import require, to_dict
from pipeline.rundir import atomic_write_text, read_json
from pipeline.runner import RunContext


@dataclass(frozen=True)
class ReportConfig:
    page_size: int = 60  # cards per page
    words_per_card: int = 24  # opinion chips shown per card
    maps_per_card: int = 8  # label heatmaps shown per card (the contact sheet has them all)
    points_per_map: int = 8  # SAM point prompts drawn per map, of each kind

    def __post_init__(self) -> None:
        require(self.page_size >= 1, f"report.page_size must be >= 1, got {self.page_size}")


def collect_report_data(ctx: RunContext) -> dict:
    """Everything the page shows, as plain data."""
    cfg: ReportConfig = ctx.config.report
    failed_by_image: dict[str, list[tuple[str, str]]] = {}
    for (image, stage), rec in ctx.run.latest().items():
        if image is not None and rec["status"] == "failed":
            failed_by_image.setdefault(image, []).append((stage, rec["error"]))
    cards, failures = [], []
    methods: set[str] = set()
    for ref in ctx.run.load_images():
        card = {"id": ref.id, "rel": ref.rel, "src": os.path.relpath(os.path.abspath(ref.path), os.path.abspath(ctx.run.root)),
                "words": [], "labels": [], "prompts": [], "maps": [], "sheet": 0}
        op_path, lab_path = ctx.run.file("ascend", f"{ref.id}.json"), ctx.run.file("labels", f"{ref.id}.json")
        if op_path.is_file():
            words = json.loads(op_path.read_text(encoding="utf-8"))["words"]
            card["words"] = [[w, d["frequency"]] for w, d in list(words.items())[: cfg.words_per_card]]
        if lab_path.is_file():
            lab = json.loads(lab_path.read_text(encoding="utf-8"))
            card["labels"] = [[d["word"], d["frequency"], d.get("score")] for d in lab["labels"]]
            card["prompts"] = [[p["text"], p["score"]] for p in lab["prompts"]]
        surgery = read_json(ctx.run.file("surgery", f"{ref.id}.json"))
        if surgery:
            # compact: the page rebuilds the deterministic overlay paths from the id and the slug
            card["maps"] = [[d["word"], d["slug"], int("mask" in d), _some_points(d, cfg.points_per_map)]
                            for d in surgery["labels"][: cfg.maps_per_card] if d["overlays"]]
            card["sheet"] = int("sheet" in surgery)
            card["size"] = surgery["size"]
            methods.update(surgery["methods"])
        for stage, error in failed_by_image.get(ref.id, []):
            failures.append({"image": ref.rel, "id": ref.id, "stage": stage, "error": error})
        cards.append(card)
    records = []
    if ctx.run.file("records.csv").is_file():
        with open(ctx.run.file("records.csv"), encoding="utf-8") as f:
            records = list(csv.DictReader(f))[:50]
    seconds: dict[str, float] = {}
    for rec in ctx.run.manifest_records():
        if rec["status"] == "done":
            seconds[rec["stage"]] = seconds.get(rec["stage"], 0.0) + float(rec.get("seconds") or 0)
    return {"run": ctx.run.root.name, "model": ctx.config.model, "config": to_dict(ctx.config), "cards": cards,
            "failures": failures, "records": records, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "page_size": cfg.page_size, "methods": [m for m in ("surgery", "raw", "single") if m in methods]}


def _some_points(label: dict, n: int) -> list[list[int]]:
    """The first ``n`` positive and ``n`` negative points as ``[x, y, label]`` (strongest first)."""
    pts = list(zip(label.get("points", []), label.get("point_labels", [])))
    pos = [[x, y, 1] for (x, y), lab in pts if lab == 1][:n]
    neg = [[x, y, 0] for (x, y), lab in pts if lab == 0][:n]
    return pos + neg


def render_report(data: dict) -> str:
    """The HTML page for ``collect_report_data``'s output."""
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(data["run"])).replace("__DATA__", payload)


class ReportStage:
    name = "report"

    def run_all(self, ctx: RunContext) -> list[str]:
        atomic_write_text(ctx.run.file("report.html"), render_report(collect_report_data(ctx)))
        return ["report.html"]


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
.maps svg{position:absolute;inset:0;width:100%;height:100%;pointer-events:none}.toggle button.on{background:#1c1917;color:#fff}
</style></head><body>
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
let page = 0, shown = D.cards, method = D.methods[0] || null, showPoints = false;
const names = {surgery: 'surgery', raw: 'raw CLIP', single: 'single-text surgery'};
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
  const base = `surgery/${c.id}/${c.id}__`;
  const dots = pts => pts.length ? `<svg viewBox="0 0 ${c.size[0]} ${c.size[1]}" preserveAspectRatio="none">` + pts.map(([x, y, l]) =>
    `<circle cx="${x}" cy="${y}" r="${Math.max(c.size[0], c.size[1]) / 30}" fill="${l ? '#22c55e' : '#ef4444'}" stroke="#fff"/>`).join('') + '</svg>' : '';
  const maps = method ? c.maps.map(([w, slug, mask, pts]) =>
    `<figure><div class="fig"><img loading="lazy" class="map" data-method="${method}" src="${esc(base + slug + '__' + method + '.png')}" alt="${esc(w)}">` +
    `${showPoints ? dots(pts) : ''}</div><figcaption>${esc(w)}` +
    (mask ? ` <a href="${esc(base + slug + '__sam.png')}">mask</a>` : '') + '</figcaption></figure>').join('') : '';
  return `<div class="card" id="${esc(c.id)}"><img loading="lazy" src="${esc(c.src)}" alt="${esc(c.rel)}"><h3>${esc(c.rel)}</h3>` +
    `<div>${chips || '<span class="muted">no opinion</span>'}</div>` +
    (labels ? `<table><tr><th>label</th><th>count</th><th>score</th></tr>${labels}</table>` : '') +
    (maps ? `<div class="maps">${maps}</div>` : '') +
    (c.sheet ? `<a href="${esc('surgery/' + c.id + '__sheet.png')}">all heatmaps</a>` : '') +
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
