"""export: the run's labels and regions as files other tools read (COCO, Label Studio, FiftyOne, YOLO).

For every image whose labels are done, the pure core ``export_image`` maps the label words
to classes (``export.label_map``), keeps the best ``top_k`` at or above ``min_score``, and
gives each class its regions: the box around SAM's mask where SAM ran, else the boxes of
one heatmap method's map (``export.region_method``) by CAM's rule (``pipeline.regions``).
The stage always writes ``export/regions.json`` (what the report draws), and each format
in ``export.formats`` under ``export/<format>/`` through ``pipeline.exports``.

An export is redone only when its settings, its label map or an image's labels or maps
have changed since the last one (``export/export.json`` holds the stamp). Images whose
surgery is stale or missing are exported with their labels and no regions, and images
without current labels are left out; ``export.json`` lists both, with the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from pipeline.config import ConfigError, require
from pipeline.exports import (FORMATS, ExportImage, ExportLabel, LabelMap, load_label_map, run_key, save_png,
                              write_coco, write_fiftyone, write_labelstudio, write_yolo)
from pipeline.heatmaps import HEATMAP_METHODS
from pipeline.images import ImageRef
from pipeline.regions import Region, heatmap_regions, mask_region
from pipeline.rundir import RunDir, atomic_write_json, read_json
from pipeline.runner import StageContext, WholeRunStage

EXPORT = "export"
STAMP = "export/export.json"
REGIONS = "export/regions.json"


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ()  # any of coco, labelstudio, fiftyone, yolo; empty = regions.json only
    region_method: str = "single"  # the heatmap method whose maps give boxes where SAM made no mask
    tau: float = 0.5  # box threshold, a fraction of the map's maximum; `eval` reports the best on data with truth
    multi_instance: bool = False  # a box per connected component of at least min_area; off, the largest only
    min_area: float = 0.002  # with multi_instance: the smallest component kept, as a fraction of the image's area
    min_score: float | None = None  # labels whose stock-CLIP score is below this are not exported; null keeps all
    top_k: int = 0  # labels (classes) exported per image, best-scored first; 0 = all
    label_map: str | None = None  # a YAML file: map words to classes, drop words (see pipeline.exports.LabelMap)
    path_prefix: str = ""  # put before each image's relative path in Label Studio and FiftyOne (e.g. /data/local-files/?d=)
    yolo_confidence: bool = False  # a sixth column with the label's score in the YOLO .txt files

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        require(not bad, f"export.formats has an unknown format {bad[0]!r}; valid: {', '.join(FORMATS)}" if bad else "")
        require(self.region_method in HEATMAP_METHODS,
                f"export.region_method must be one of {list(HEATMAP_METHODS)}, got {self.region_method!r}")
        require(0 < self.tau <= 1, f"export.tau must be in (0, 1], got {self.tau}")
        require(0 <= self.min_area < 1, f"export.min_area must be in [0, 1) (a fraction of the image), got {self.min_area}")
        require(self.top_k >= 0, f"export.top_k must be >= 0 (0 = all), got {self.top_k}")


def export_image(ref: ImageRef, size: tuple[int, int], labels: list[dict], heatmaps: dict | None,
                 maps: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], cfg: ExportConfig,
                 label_map: LabelMap) -> ExportImage:
    """One image's export: classes with scores and regions, from its labels and (when current) its maps.

    Args:
        ref: the image.
        size: its ``(width, height)`` in pixels.
        labels: ``labels/<id>.json``'s labels (``word``, ``score``).
        heatmaps: ``surgery/<id>.json`` when surgery is done with today's settings, else ``None``
            (the image is exported without regions).
        maps: the region method's grid map per word (from ``surgery/<id>.npz``).
        masks: SAM's mask per word, where SAM made one.
        cfg: the export settings.
        label_map: words to classes.
    """
    width, height = size
    by_class: dict[str, list[dict]] = {}
    for d in sorted(labels, key=lambda d: -(d.get("score") or 0.0)):
        name = label_map.classify(d["word"])
        if name is not None:
            by_class.setdefault(name, []).append(d)
    ranges = {e["word"]: e.get("range", {}).get(cfg.region_method) for e in (heatmaps or {}).get("labels", [])}
    out = []
    for name, words in by_class.items():
        best = words[0]
        score = round(float(best.get("score") or 0.0), 4)
        if cfg.min_score is not None and score < cfg.min_score:
            continue
        word = best["word"]
        regions: tuple[Region, ...] = ()
        grid = maps.get(word) if heatmaps is not None else None
        if heatmaps is not None and word in masks:
            region = mask_region(masks[word])
            regions = (region,) if region is not None else ()
        elif grid is not None:
            rng = ranges.get(word)
            regions = tuple(heatmap_regions(grid, (height, width), cfg.region_method, cfg.tau, cfg.multi_instance,
                                            cfg.min_area, tuple(rng) if rng else None))
        out.append(ExportLabel(name, score, tuple(w["word"] for w in words), regions, grid))
    out.sort(key=lambda lab: -lab.score)
    return ExportImage(ref.id, ref.rel.replace("\\", "/"), ref.path, width, height, out[: cfg.top_k or None])


def regions_document(images: list[ExportImage], stamp: str) -> dict:
    """``regions.json``: each image's classes and boxes, for the report and for people."""
    return {"stamp": stamp, "images": {
        im.id: [{"label": lab.name, "score": lab.score, "words": list(lab.words),
                 "regions": [{"box": [round(v, 1) for v in r.box], "source": r.source, "tau": r.tau, "peak": r.peak,
                              "area": r.area} for r in lab.regions]}
                for lab in im.labels]
        for im in images}, "size": {im.id: [im.width, im.height] for im in images}}


def inputs_stamp(settings: Mapping, label_map: LabelMap, records: list[Any]) -> str:
    """A hash of what an export is made from: its settings, the label map's text, and the manifest records
    of the labels and maps it read (a redone image changes its record)."""
    blob = json.dumps({"settings": settings, "label_map": label_map.source, "records": records},
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def read_exports(run: RunDir, cfg: ExportConfig, label_map: LabelMap, state: Any, log: Any = None
                 ) -> tuple[list[ExportImage], list[dict], str]:
    """Every exportable image of a run, what was left out (with reasons), and the inputs' stamp.

    ``state(image, stage, latest)`` is the status of an image's output (``StageContext.status``).
    """
    latest = run.latest()
    images, left_out, records = [], [], []
    for ref in run.load_images():
        decode, surgery = state(ref.id, "decode", latest), state(ref.id, "surgery", latest)
        labels = read_json(run.labels(ref.id)) if decode.state == "done" else None
        if labels is None:
            why = decode.reason or decode.state if decode.state != "done" else f"labels/{ref.id}.json is unreadable"
            left_out.append({"image": ref.rel, "what": "image", "reason": f"decode {decode.state}: {why}"})
            continue
        heatmaps = read_json(run.heatmaps(ref.id)) if surgery.state == "done" else None
        if heatmaps is None:
            left_out.append({"image": ref.rel, "what": "regions",
                             "reason": f"surgery {surgery.state}" + (f": {surgery.reason}" if surgery.reason else "")})
        maps, masks = _maps_and_masks(run, ref, heatmaps, cfg)
        size = tuple(heatmaps["size"]) if heatmaps else _image_size(ref)
        if size is None:
            left_out.append({"image": ref.rel, "what": "image", "reason": "the image cannot be read for its size"})
            continue
        records.append([latest.get((ref.id, "decode")), latest.get((ref.id, "surgery")) if heatmaps else None])
        images.append(export_image(ref, size, labels["labels"], heatmaps, maps, masks, cfg, label_map))
    return images, left_out, records


def _maps_and_masks(run: RunDir, ref: ImageRef, heatmaps: dict | None, cfg: ExportConfig
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if heatmaps is None:
        return {}, {}
    maps: dict[str, np.ndarray] = {}
    if cfg.region_method in heatmaps.get("methods", []):
        prefix = f"{cfg.region_method}/"
        with np.load(run.maps(ref.id)) as npz:
            maps = {k[len(prefix):]: npz[k].astype(np.float32) for k in npz.files if k.startswith(prefix)}
    masks = {}
    for entry in heatmaps.get("labels", []):
        if entry.get("mask"):
            with Image.open(run.file(entry["mask"])) as im:
                masks[entry["word"]] = np.asarray(im.convert("L")) > 0
    return maps, masks


def _image_size(ref: ImageRef) -> tuple[int, int] | None:
    try:
        with Image.open(ref.path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def write_formats(run: RunDir, images: list[ExportImage], cfg: ExportConfig, key: str, model: str) -> list[str]:
    """Each configured format under ``export/<format>/``; the files written, relative to the run."""
    written: list[Path] = []
    for fmt in cfg.formats:
        folder = run.file(EXPORT, fmt)
        if fmt == "coco":
            written += write_coco(folder, images, f"clipsight run {run.root.name} ({model})")
        elif fmt == "labelstudio":
            written += write_labelstudio(folder, images, f"clipsight {model} {key}", cfg.path_prefix)
        elif fmt == "fiftyone":
            written += write_fiftyone(folder, images, key, cfg.path_prefix, save_png)
        elif fmt == "yolo":
            written += write_yolo(folder, images, cfg.yolo_confidence)
    return [run.rel(p) for p in written]


class ExportStage(WholeRunStage[ExportConfig]):
    """Writes ``export/regions.json``, ``export/export.json`` and ``export/<format>/`` for each of ``export.formats``."""

    name = "export"
    needs = ("decode", "surgery")

    def prepare(self, ctx: StageContext[ExportConfig]) -> None:
        """Before any work: a label map that cannot be read, or a region method surgery does not draw, is an error."""
        load_label_map(ctx.config.label_map)
        methods = (ctx.settings.config.get("surgery") or {}).get("methods", [])
        if methods and ctx.config.region_method not in methods:
            raise ConfigError(f"export.region_method: {ctx.config.region_method!r} is not among surgery.methods "
                              f"{list(methods)}; choose one of those, or add it to surgery.methods")

    def run_all(self, ctx: StageContext[ExportConfig]) -> list[str]:
        cfg, run = ctx.config, ctx.run
        label_map = load_label_map(cfg.label_map)
        images, left_out, records = read_exports(run, cfg, label_map, ctx.status)
        stamp = inputs_stamp({"export": ctx.provenance.settings.get("export"), "model": ctx.settings.model},
                             label_map, records)
        old = read_json(run.file(STAMP)) or {}
        outputs = [REGIONS, *[p for f in cfg.formats for p in old.get("files", {}).get(f, [])]]
        if (old.get("stamp") == stamp and set(cfg.formats) <= set(old.get("files", {}))
                and all(run.file(p).is_file() for p in outputs)):
            ctx.log.info("export: up to date (%d images)", len(images))
            return [STAMP, *outputs]
        key = run_key(run.root.name, stamp)
        files: dict[str, list[str]] = {}
        for fmt in cfg.formats:
            files[fmt] = write_formats(run, images, ExportConfig(**{**cfg.__dict__, "formats": (fmt,)}), key, ctx.settings.model)
        atomic_write_json(run.file(REGIONS), regions_document(images, stamp))
        regions = sum(len(lab.regions) for im in images for lab in im.labels)
        for item in left_out:
            ctx.log.warning("export left out %s of %s: %s", item["what"], item["image"], item["reason"])
        atomic_write_json(run.file(STAMP), {"stamp": stamp, "images": len(images), "regions": regions,
                                            "formats": list(cfg.formats), "files": files, "left_out": left_out})
        return [STAMP, REGIONS, *[p for f in files.values() for p in f]]


def evaluate_run(run: RunDir, truth: dict, cfg: ExportConfig, label_map: LabelMap, state: Any,
                 methods: list[str]) -> dict:
    """A run's labels and regions against a COCO truth document (``pipeline.evaluation``).

    Images are matched by their path relative to the input root (the truth's ``file_name``),
    else by file name when that is unique; truth images the run lacks are listed.
    """
    from pipeline.evaluation import EvalImage, evaluate, truth_by_file

    by_file = truth_by_file(truth)
    names: dict[str, list[str]] = {}
    for f in by_file:
        names.setdefault(Path(f).name, []).append(f)
    everything = ExportConfig(**{**cfg.__dict__, "min_score": None, "top_k": 0, "formats": ()})
    images, left_out, _ = read_exports(run, everything, label_map, state)
    matched, seen, unmatched = [], set(), []
    for im in images:
        key = im.file_name if im.file_name in by_file else (names.get(Path(im.file_name).name) or [None, None])
        key = key if isinstance(key, str) else (key[0] if len(key) == 1 else None)
        if key is None:
            unmatched.append(im.file_name)
            continue
        seen.add(key)
        kept = [lab for lab in im.labels if cfg.min_score is None or lab.score >= cfg.min_score][: cfg.top_k or None]
        maps: dict[str, dict[str, np.ndarray]] = {}
        if im.labels and any(lab.heatmap is not None for lab in im.labels):
            best = {lab.words[0]: lab.name for lab in im.labels}
            with np.load(run.maps(im.id)) as npz:
                for k in npz.files:
                    method, _, word = k.partition("/")
                    if method in methods and word in best:
                        maps.setdefault(method, {})[best[word]] = npz[k].astype(np.float32)
        matched.append(EvalImage(truth=by_file[key], scores={lab.name: lab.score for lab in im.labels},
                                 exported=[lab.name for lab in kept],
                                 boxes={lab.name: [r.box for r in lab.regions] for lab in kept},
                                 maps=maps, size=(im.height, im.width)))
    result = evaluate(matched, methods)
    result["region_method"], result["tau"] = cfg.region_method, cfg.tau
    result["min_score"], result["top_k"] = cfg.min_score, cfg.top_k
    result["missing_from_run"] = sorted(set(by_file) - seen)
    result["not_in_truth"] = unmatched
    result["left_out"] = left_out
    return result
