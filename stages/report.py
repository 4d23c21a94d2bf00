"""report: a static ``report.html`` a person can browse, with its cards in ``report/`` beside it.

No server and no network: inline CSS and JS, with the run's summary, failures,
leaderboard and config embedded as JSON, and the images referenced by paths relative
to the run directory. The cards live in page files (``report/cards-00000.js``, one
script per page of ``page_size`` cards) that the page loads when it shows them, so its
first screen costs the same at any run size and a ``file://`` page needs no server.
The word filter reads an index (``report/words.js``, every word with its bucket, and
``report/index-000.js``..., each bucket's words with their cards), not every card.
A rebuild rewrites only the files whose content changed.

``build_report_data`` is the pure core: plain data in (each image's outputs, the
failures, the leaderboard, timings), the page's data out, with every file path taken
from the stages' outputs. ``read_report_inputs`` reads those from a run directory, each
image's when it is reached, and ``ReportPages`` writes each card with its page, so the
stage never holds every image's outputs or cards.
"""

from __future__ import annotations

import functools
import html
import json
import os
import zlib
from array import array
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import cv2
import numpy as np
from PIL import Image

from pipeline.run.config import require
from pipeline.heatmaps import titles
from pipeline.model.discovery import BOXED
from pipeline.run.images import ImageError, ImageRef, load_image
from pipeline.run.provenance import (Status, output_states, reads_stamp, root_line, set_stamp, stamp_of,
                                     states_digest)
from pipeline.run.shards import caption_of
from pipeline.run.rundir import (EXPORT_REGIONS, EXPORT_STAMP, LEADERBOARD, REPORT, RunDir, atomic_path, atomic_write_text,
                                read_json, read_output)
from pipeline.run.stage import StageContext, WholeRunStage

# The page: HTML, CSS and script in one file, packaged with the library; render_report fills in its __KEYS__.
PAGE_TEMPLATE = files("pipeline") / "templates" / "report.html"
PAGES = "report"  # the folder beside report.html that holds its page and index files
INDEX_BUCKETS = 64  # the word index's files: a filter loads only the buckets of the words it matches


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
    images: Iterable[ImageOutputs]  # read once, in the run's order: from a run, each image read as it is reached
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
    records = list(latest.values())  # a record since redone took no part in the latest session's timings
    if session is None:
        session = max((r.get("session", "") for r in records if r.get("image") is not None), default="")
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for rec in records:
        if rec["status"] == "done" and rec.get("session", "") == session:
            seconds[rec["stage"]] = seconds.get(rec["stage"], 0.0) + float(rec.get("seconds") or 0)
            counts[rec["stage"]] = counts.get(rec["stage"], 0) + (rec.get("image") is not None)
    del records
    return ReportInputs(run.root.name, config, _image_outputs(run, status, thumbnail, latest), run.records()[:50],
                        seconds, counts, session)


def _image_outputs(run: RunDir, status: Callable[[str, str, Mapping], Status],
                   thumbnail: Callable[[ImageRef], str | None], latest: Mapping) -> Iterator[ImageOutputs]:
    """Each image's outputs, read when it is reached, so the report never holds every image's documents."""
    readers = {"ascend": run.opinion, "decode": run.labels, "surgery": run.heatmaps}
    regions = (read_json(run.file(EXPORT_REGIONS)) or {}).get("images", {})
    for ref in run.load_images():
        docs, failures = {}, []
        states = {stage: status(ref.id, stage, latest) for stage in readers}
        stopped = [stage for stage, st in states.items() if st.state in ("failed", "blocked")]
        for stage, path in readers.items():
            st = states[stage]
            docs[stage], why = read_output(path(ref.id), run.root) if st.state == "done" else (None, None)
            if st.state == "done" and not isinstance(docs[stage], dict):  # done by its record, but it does not parse
                docs[stage] = None
                failures.append((stage, f"{ref.rel}: {why or 'not a ' + stage + ' output'}; rerun {stage} with --force"))
            if stage in stopped[:1]:  # one line, the root cause's, however many stages it stopped
                failures.append((st.cause or stage, root_line(list(states.values())) or ""))
            elif st.state == "damaged":
                failures.append((stage, st.reason))
            elif st.state == "stale":
                failures.append((stage, f"{ref.rel}: stale, {st.reason}; rerun {stage}"))
        src = thumbnail(ref) or os.path.relpath(os.path.abspath(ref.path), os.path.abspath(run.root))
        boxes = regions.get(ref.id) if docs["surgery"] else None  # boxes from a current export of current maps
        yield ImageOutputs(ref, src, docs["ascend"], docs["decode"], docs["surgery"], failures, boxes)


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


def build_report_data(inputs: ReportInputs, cfg: ReportConfig, pages: ReportPages | None = None) -> dict:
    """The page's data: a card per image (``cards``), the failures, the leaderboard, timings and the config. With
    ``pages``, each card goes to it as it is made and the data keeps only their number (``total``)."""
    cards, failures = [], []
    methods: set[str] = set()
    best = {r.get("best_image", "") for r in inputs.records}
    found: dict[str, tuple[int, str]] = {}  # the leaderboard's best images: their card and picture
    flags = {"has_masks": False, "has_boxes": False, "has_scales": False}
    total = 0
    for item in inputs.images:
        ref = item.ref
        card = {"id": ref.id, "rel": ref.rel, "src": item.src, "caption": caption_of(ref), "words": [], "labels": [],
                "prompts": [], "maps": [],
                "base": "", "sheet": "", "failures": [[stage, error] for stage, error in item.failures]}
        if item.opinion:
            card["words"] = [[w, d["frequency"]] for w, d in list(item.opinion["words"].items())[: cfg.words_per_card]]
        if item.labels:
            card["labels"] = [[d["word"], d["frequency"], d.get("score"), _where(d), d.get("source", "opinion")]
                              for d in item.labels["labels"]]
            card["prompts"] = [[p["text"], p["score"]] for p in item.labels["prompts"]]
        if item.heatmaps:
            _add_maps(card, item.heatmaps, cfg)
            methods.update(item.heatmaps["methods"])
            if item.regions:  # [class, score, source, [[x, y, w, h], ...]] in whole pixels, as many classes as maps
                card["boxes"] = [[d["label"], d["score"], d["regions"][0]["source"],
                                  [[round(v) for v in r["box"]] for r in d["regions"]]]
                                 for d in item.regions if d["regions"]][: cfg.maps_per_card]
        for stage, error in item.failures:
            failures.append({"image": ref.rel, "id": ref.id, "card": total, "stage": stage, "error": error})
        if ref.id in best:
            found[ref.id] = (total, item.src)
        flags["has_masks"] |= any(m[2] for m in card["maps"])
        flags["has_boxes"] |= bool(card.get("boxes"))
        flags["has_scales"] |= bool(card.get("scale"))
        if pages is None:
            cards.append(card)
        else:
            pages.add(card)
        total += 1
    names = titles()
    shown = [m for m in names if m in methods]
    records = leaderboard_rows(inputs.records, {i: src for i, (_, src) in found.items()})
    for r in records:  # the card of each word's best image, so the leaderboard opens its page
        r["card"] = found[r["best_image"]][0] if r["best_image"] in found else None
    return {"run": inputs.run_name, "model": inputs.config.get("model"), "config": inputs.config,
            **({"cards": cards} if pages is None else {"total": total}),
            "failures": failures, "records": records,
            "seconds": {k: round(v, 1) for k, v in inputs.seconds.items()}, "counts": inputs.counts,
            "session": inputs.session, "page_size": cfg.page_size,
            "methods": shown, "method_names": {m: names[m] for m in shown},
            "default_method": "surgery" if "surgery" in shown else (shown[0] if shown else None), **flags}


def _where(label: dict) -> list[list[float]] | None:
    """Where in the picture a label came from: the boxes (fractions) of the tiles among its evidence, ``[]`` for the
    whole image, ``None`` for a label with no evidence (an opinion of one view)."""
    if "evidence" not in label:
        return None
    return [[round(v, 3) for v in e["box"]] for e in label["evidence"] if e.get("kind") in BOXED]


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


def write_merged_leaderboard(roots: list[Path], out: Path, records: list[dict]) -> Path:
    """``out/leaderboard.html`` for runs merged by ``rank --runs``: each word's best image by the thumbnail its
    run's report made (``<run>/<id>``, as the merged records name images)."""
    pictures = {}
    for root in roots:
        rd = RunDir(root)
        for ref in rd.load_images():
            if rd.thumbnail(ref.id).is_file():
                pictures[f"{root.name}/{ref.id}"] = os.path.relpath(rd.thumbnail(ref.id), out)
    page = out / LEADERBOARD
    atomic_write_text(page, leaderboard_page(f"{len(roots)} runs merged", records, pictures))
    return page


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


class ReportPages:
    """The paged report's files, written as its cards arrive: a page file each ``page_size`` cards (``add``), then
    the word list, the word index's buckets and ``report.html`` (``finish``). A file whose content is unchanged is
    left as it is, and the page and index files of an earlier, larger report are removed."""

    def __init__(self, root: Path, page_size: int, folder: str = PAGES):
        self.root, self.size, self.folder = root, page_size, folder
        self.buffer: list[dict] = []
        self.total = 0
        self.postings: dict[str, array] = {}  # each word's cards: the opinion chips and labels a card is found by
        self.written: list[str] = []

    def add(self, card: dict) -> None:
        for w in dict.fromkeys([w for w, _ in card["words"]] + [lab[0] for lab in card["labels"]]):
            self.postings.setdefault(w, array("l")).append(self.total)
        self.buffer.append(card)
        self.total += 1
        if len(self.buffer) == self.size:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            n = (self.total - 1) // self.size
            self._write(f"{self.folder}/cards-{n:05d}.js", _script("page", n, self.buffer))
            self.buffer = []

    def _write(self, rel: str, text: str) -> None:
        path, body = self.root / rel, text.encode("utf-8")
        if not path.is_file() or path.stat().st_size != len(body) or path.read_bytes() != body:
            atomic_write_text(path, text)
        self.written.append(rel)

    def finish(self, data: dict) -> list[str]:
        """Write what is left and ``report.html`` for ``data`` (``build_report_data``'s, less its cards); every
        file's path relative to the root, ``report.html`` first."""
        self._flush()
        bucket = {w: zlib.crc32(w.encode("utf-8")) % INDEX_BUCKETS for w in self.postings}
        buckets: dict[int, dict[str, list[int]]] = {}
        for w, cards in self.postings.items():  # one pass: each word into its bucket, in first-seen order
            buckets.setdefault(bucket[w], {})[w] = cards.tolist()
        if self.postings:
            self._write(f"{self.folder}/words.js",
                        _script("words", 0, [[w, bucket[w], len(v)] for w, v in sorted(self.postings.items())]))
            for b in sorted(buckets):
                self._write(f"{self.folder}/index-{b:03d}.js", _script("postings", b, buckets[b]))
        shell = {k: v for k, v in data.items() if k != "cards"}
        self._write(REPORT, render_report({**shell, "total": self.total, "pages": self.folder}))
        folder, kept = self.root / self.folder, set(self.written)
        for old in folder.glob("*.js") if folder.is_dir() else ():
            if f"{self.folder}/{old.name}" not in kept:  # a set: a million images make 16,667 page files
                old.unlink()
        return sorted(self.written, key=lambda rel: (rel != REPORT, rel))


def _script(kind: str, n: int, value) -> str:
    """A page or index file: one call the report's page defines, so a ``<script>`` tag loads it from ``file://``."""
    return f"clipsight.{kind}({n}, {json.dumps(value, ensure_ascii=False, separators=(',', ':'))});\n"


def write_report(root: Path, data: dict) -> list[str]:
    """``build_report_data``'s output (with its cards) as a paged report under ``root`` (``ReportPages``)."""
    pages = ReportPages(root, data["page_size"])
    for card in data["cards"]:
        pages.add(card)
    return pages.finish(data)


def page_data(text: str) -> dict:
    """The data a page (``render_report``'s) embeds: everything but the cards."""
    return json.loads(text.split('<script id="data" type="application/json">')[1].split("</script>")[0]
                      .replace("<\\/", "</"))


def load_report(page: Path) -> dict:
    """A written report's data, cards included (read back from its page files): what ``build_report_data`` gave."""
    data = page_data(page.read_text(encoding="utf-8"))
    cards = []
    for n in range(-(-data["total"] // data["page_size"])):
        js = (page.parent / data["pages"] / f"cards-{n:05d}.js").read_text(encoding="utf-8")
        cards += json.loads(js[js.index(",") + 1 : js.rindex(")")])
    return {**data, "cards": cards}


def render_report(data: dict) -> str:
    """The HTML page for ``build_report_data``'s output less its cards (``ReportPages.finish`` adds ``total`` and
    ``pages``; without them the page has no cards, as the merged leaderboard)."""
    data = {"total": 0, "pages": PAGES, **{k: v for k, v in data.items() if k != "cards"}}
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    ramp = cv2.applyColorMap(np.linspace(0, 255, 17).round().astype(np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    tables = {f"__JET{c}__": " ".join(f"{v / 255:.3f}" for v in ramp[:, i]) for i, c in enumerate("RGB")}
    tables["__JETCSS__"] = ",".join(f"rgb({r},{g},{b})" for r, g, b in ramp.tolist())
    page = PAGE_TEMPLATE.read_text(encoding="utf-8").replace("__TITLE__", html.escape(data["run"]))
    for key, values in tables.items():  # the overlays' colour map, for maps the page draws from the atlas
        page = page.replace(key, values)
    return page.replace("__DATA__", payload)


class ReportStage(WholeRunStage[ReportConfig]):
    name = "report"
    needs = ("ascend", "decode", "surgery")

    def run_all(self, ctx: StageContext[ReportConfig]) -> list[str]:
        side, run = ctx.config.thumbnail_side, ctx.run
        config = run.load_config() if run.has_config() else ctx.settings.config  # what the results were made with
        @functools.cache  # the run's latest records and each image's statuses, read once something needs them
        def states() -> tuple[Mapping, dict]:
            latest = run.latest()
            return latest, {r.id: {stage: ctx.status(r.id, stage, latest) for stage in self.needs}
                            for r in run.load_images()}

        digest = ctx.read_digest(self.name, lambda: states_digest(output_states(states()[1], states()[0])))
        stamp = reads_stamp({"report": ctx.provenance.settings.get("report"), "config": config,
                             "export": (read_json(run.file(EXPORT_STAMP)) or {}).get("stamp"),
                             "rank": stamp_of(run, "rank")}, digest)
        if not ctx.force and stamp_of(run, self.name) == stamp and run.file(REPORT).is_file():
            ctx.log.info("report: up to date")  # nothing it shows has changed
            folder = run.root / PAGES
            return [REPORT, *sorted(f"{PAGES}/{p.name}" for p in folder.glob("*.js"))] if folder.is_dir() else [REPORT]
        set_stamp(run, self.name, None)
        thumbnail = (lambda ref: write_thumbnail(run, ref, side, ctx.settings.max_side)) if side else (lambda ref: None)
        statuses = states()[1]
        inputs = read_report_inputs(run, config, lambda image, stage, _: statuses[image][stage], thumbnail)
        pages = ReportPages(run.root, ctx.config.page_size)  # cards written a page at a time, not all held
        written = pages.finish(build_report_data(inputs, ctx.config, pages))
        set_stamp(run, self.name, stamp)
        return written
