"""export: the run's labels and regions as files other tools read (COCO, Label Studio, FiftyOne, YOLO).

For every image whose labels are done, the pure core ``export_image`` maps the label words
to classes (``export.label_map``), keeps the best ``top_k`` at or above ``min_score``, and
gives each class its regions: the box around SAM's mask where SAM ran, else the boxes of
one heatmap method's map (``export.region_method``) by CAM's rule (``pipeline.labels.regions``).
The stage always writes ``export/regions.json`` (what the report draws), and each format
in ``export.formats`` under ``export/<format>/`` through ``pipeline.labels.exports``.

An export is redone only when its settings, its label map or an image's labels or maps
have changed since the last one (``export/export.json`` holds the stamp). Images whose
surgery is stale or missing are exported with their labels and no regions, and images
without current labels are left out; ``export.json`` lists both, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from pipeline.labels.autolabels import (ExportImage, LabelMap, LabelRules, categories_from_coco, export_one, load_categories,
                                 load_label_map, read_npz, working_picture)
from pipeline.labels.regions import region_pixels
from pipeline.run.config import ConfigError, require
from pipeline.labels.exports import (FORMATS, YOLO_IMAGES, coco_documents, local_root, run_key, write_coco, write_fiftyone, write_labelstudio,
                              write_yolo)
from pipeline.heatmaps import names
from pipeline.run.images import ImageRef
from pipeline.run.provenance import states_digest
from pipeline.run.rundir import (EXPORT, EXPORT_REGIONS as REGIONS, EXPORT_STAMP as STAMP, RunDir, atomic_write_json,
                             atomic_write_text, read_json)
from pipeline.run.stage import StageContext, WholeRunStage



@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ()  # any of coco, labelstudio, fiftyone, yolo; empty = regions.json only
    region_method: str = "single"  # the heatmap method whose maps give boxes where SAM made no mask
    tau: float = 0.5  # box threshold, a fraction of the map's maximum; `eval` reports the best on data with truth
    multi_instance: bool = False  # a box per connected component of at least min_area; off, the largest only
    min_area: float = 0.002  # with multi_instance: the smallest component kept, as a fraction of the image's area
    min_score: float | None = None  # labels whose stock-CLIP score is below this are not exported; null keeps all
    top_k: int = 0  # labels (classes) exported per image, best-scored first; 0 = all
    label_map: str | None = None  # a YAML file: map words to classes, drop words (see pipeline.labels.autolabels.LabelMap)
    min_contrast: float = 0.25  # a map whose peak stands less than this above its mean (1 - mean of the min-maxed map) gives no box
    max_box_area: float = 0.9  # a box over more than this fraction of the image is dropped: the label stays image-level
    refine: Literal["none", "pamr", "guided"] = "none"  # refine each map with its picture before CAM's rule, which also gives each region a mask. Held-out two-object scenes, single: CorLoc / mIoU 0.52 / 0.27 -> 0.70 / 0.44 with pamr (tau 0.85), 0.66 / 0.37 with guided (tau 0.75); 1,000 images of ten masks export in some 56 s (pamr) or 35-41 s (guided) against 4-9 s unrefined, on two cores: docs/benchmarks.md#regions-refined-with-the-image
    evidence_prior: bool = True  # a label that ascend's object regions (or tiles) found gets its regions inside their boxes (held-out scenes: CorLoc 0.41 -> 0.66, docs/benchmarks.md#regions-as-priors)
    categories: str | None = None  # a COCO file: its categories' names and ids (and its images' ids) are the export's
    new_categories: str = "drop"  # classes that match none of `categories`: drop, or keep with new ids after the file's
    path_prefix: str = ""  # put before each image's relative path in Label Studio and FiftyOne: s3://bucket/folder/, or local (Label Studio's local files)
    yolo_confidence: bool = False  # a sixth column with the label's score in the YOLO .txt files
    yolo_images: str = "link"  # the YOLO dataset's images/: link (symbolic links; copies where links fail) or copy
    yolo_val: float = 0.0  # the fraction of images in the YOLO dataset's val split; 0 = one set for train and val
    split_seed: int = 0  # the seed that draws the val split

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        require(not bad, f"export.formats has an unknown format {bad[0]!r}; valid: {', '.join(FORMATS)}" if bad else "")
        require(self.region_method in names(),
                f"export.region_method must be one of {list(names())}, got {self.region_method!r}")
        require(0 < self.tau <= 1, f"export.tau must be in (0, 1], got {self.tau}")
        require(0 <= self.min_area < 1, f"export.min_area must be in [0, 1) (a fraction of the image), got {self.min_area}")
        require(self.top_k >= 0, f"export.top_k must be >= 0 (0 = all), got {self.top_k}")
        require(0 <= self.min_contrast < 1, f"export.min_contrast must be in [0, 1) (0 = off), got {self.min_contrast}")
        require(0 < self.max_box_area <= 1, f"export.max_box_area must be in (0, 1] (1 = off), got {self.max_box_area}")
        require(self.new_categories in ("drop", "keep"),
                f"export.new_categories must be drop or keep, got {self.new_categories!r}")
        require(self.yolo_images in YOLO_IMAGES, f"export.yolo_images must be one of {list(YOLO_IMAGES)}, got {self.yolo_images!r}")
        require(0 <= self.yolo_val < 1, f"export.yolo_val must be in [0, 1), got {self.yolo_val}")

    @property
    def rules(self) -> LabelRules:
        return LabelRules(self.region_method, self.tau, self.multi_instance, self.min_area, self.min_score, self.top_k,
                          self.min_contrast, self.max_box_area, self.evidence_prior, self.refine)


def export_label_map(cfg: ExportConfig) -> LabelMap:
    """The export's label map, matched to the user's categories when ``export.categories`` names a file.

    Raises:
        ConfigError: a label map or categories file that cannot be read, named.
    """
    return replace(load_label_map(cfg.label_map), categories=load_categories(cfg.categories, cfg.new_categories == "keep"))


def regions_document(images: list[ExportImage], stamp: str) -> dict:
    """``regions.json``: each image's classes and boxes, for the report and for people."""
    return {"stamp": stamp, "images": {
        im.id: [{"label": lab.name, "score": lab.score, "words": list(lab.words), "source": lab.source,
                 **({"evidence": [[round(v, 1) for v in b] for b in lab.evidence]} if lab.evidence else {}),
                 "regions": [{"box": [round(v, 1) for v in r.box], "source": r.source, "tau": r.tau, "peak": r.peak,
                              "area": r.area, **({"object": r.object} if r.object else {}),
                              **({"mask": True} if r.mask is not None else {})} for r in lab.regions],
                 **({"no_region": lab.no_region} if lab.no_region else {})}
                for lab in im.labels]
        for im in images}, "size": {im.id: [im.width, im.height] for im in images}}


def inputs_stamp(settings: Mapping, label_map: LabelMap, digest: str) -> str:
    """A hash of what an export is made from: its settings, the label map's and categories' text, and the
    digest of the manifest records of the labels and maps it read (``plan_exports``' ids, ``states_digest``:
    a redone image changes its record)."""
    categories = label_map.categories.source if label_map.categories else None
    blob = json.dumps({"settings": settings, "label_map": label_map.source, "categories": categories,
                       "records": digest},
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


PARALLEL_FROM = 500  # images: a smaller run is read in this process


def effective_config(cfg: ExportConfig, surgery_methods: list[str] | tuple[str, ...]) -> ExportConfig:
    """The settings an export uses: ``region_method`` falls back to the first of ``surgery.methods`` when surgery
    does not draw it (every region names its source, and ``export.json`` the method)."""
    if surgery_methods and cfg.region_method not in surgery_methods:
        return replace(cfg, region_method=surgery_methods[0])
    return cfg


def plan_exports(run: RunDir, state: Any) -> tuple[list[tuple[ImageRef, bool]], list[dict], list]:
    """Which images an export reads, and whether with their maps; what it leaves out, with reasons; and an id of
    each manifest record it reads (a redone output has a new one), for the stamp. Reads no output file.

    ``state(image, stage, latest)`` is the status of an image's output (``StageContext.status``).
    """
    latest = run.latest()
    jobs, left_out, records = [], [], []

    def rid(image: str, stage: str) -> Any:
        rec = latest.get((image, stage)) or {}
        return rec.get("rid") or rec

    for ref in run.load_images():
        decode, surgery = state(ref.id, "decode", latest), state(ref.id, "surgery", latest)
        if decode.state != "done":
            left_out.append({"image": ref.rel, "what": "image",
                             "reason": f"decode {decode.state}" + (f": {decode.reason}" if decode.reason else "")})
            continue
        if surgery.state != "done":
            left_out.append({"image": ref.rel, "what": "regions",
                             "reason": f"surgery {surgery.state}" + (f": {surgery.reason}" if surgery.reason else "")})
        jobs.append((ref, surgery.state == "done"))
        records.append([ref.id, rid(ref.id, "decode"), rid(ref.id, "surgery") if surgery.state == "done" else None])
    return jobs, left_out, records


def build_exports(run: RunDir, jobs: list[tuple[ImageRef, bool]], cfg: ExportConfig, label_map: LabelMap,
                  workers: int | None = None) -> tuple[list[ExportImage], list[dict]]:
    """The planned images' labels and regions, and the images that could not be read, with reasons.

    From ``PARALLEL_FROM`` images on, the maps are read and the regions built on ``workers``
    processes (default: one per core).
    """
    work = partial(export_one, run.root, cfg.rules, label_map)
    n = workers or os.cpu_count() or 1
    if n > 1 and len(jobs) >= PARALLEL_FROM:
        # spawned, not forked (a fork of a process that has run torch's and OpenCV's thread pools can hang);
        # the worker's code (pipeline.labels.autolabels) imports no torch, so each starts in a fraction of a second
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(work, jobs, chunksize=max(1, min(256, len(jobs) // (4 * n)))))
    else:
        done = [work(job) for job in jobs]
    images, unreadable = [], []
    for (ref, _), (image, problem) in zip(jobs, done):
        if problem:
            unreadable.append({"image": ref.rel, "what": "image", "reason": problem})
        else:
            images.append(image)
    return images, unreadable


def read_exports(run: RunDir, cfg: ExportConfig, label_map: LabelMap, state: Any, workers: int | None = None
                 ) -> tuple[list[ExportImage], list[dict], list]:
    """``plan_exports`` then ``build_exports``: every exportable image, what was left out, the records' ids."""
    jobs, left_out, records = plan_exports(run, state)
    images, unreadable = build_exports(run, jobs, cfg, label_map, workers)
    return images, left_out + unreadable, records


def write_formats(run: RunDir, images: list[ExportImage], cfg: ExportConfig, key: str, model: str,
                  label_map: LabelMap | None = None) -> list[str]:
    """Each configured format under ``export/<format>/``; the files written, relative to the run. ``label_map``
    carries the user's categories, whose ids and order the formats take.

    Raises:
        ValueError: ``path_prefix`` is Label Studio's ``local`` preset and an image is outside its document root.
    """
    categories = label_map.categories if label_map else None
    written: list[Path] = []
    for fmt in cfg.formats:
        folder = run.file(EXPORT, fmt)
        if fmt == "coco":
            written += write_coco(folder, images, f"clipsight run {run.root.name} ({model})", categories)
        elif fmt == "labelstudio":
            written += write_labelstudio(folder, images, f"clipsight {model} {key}", cfg.path_prefix, categories)
        elif fmt == "fiftyone":
            written += write_fiftyone(folder, images, key, cfg.path_prefix)
        elif fmt == "yolo":
            written += write_yolo(folder, images, cfg.yolo_confidence, categories, cfg.yolo_images, cfg.yolo_val,
                                  cfg.split_seed)
    return [run.rel(p) for p in written]


def prefix_warning(cfg: ExportConfig) -> str:
    """What to tell a user whose Label Studio tasks would hold bare relative names, which Label Studio cannot
    show; ``""`` when the prefix is set or Label Studio is not exported."""
    if "labelstudio" not in cfg.formats or cfg.path_prefix:
        return ""
    return ("export: Label Studio tasks hold bare relative image names, which Label Studio cannot show; set "
            "export.path_prefix (--path-prefix): local for its local files (with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT "
            "set), or the storage URL of the input folder, e.g. s3://bucket/folder/")


class ExportStage(WholeRunStage[ExportConfig]):
    """Writes ``export/regions.json``, ``export/export.json`` and ``export/<format>/`` for each of ``export.formats``."""

    name = "export"
    needs = ("decode", "surgery")

    def prepare(self, ctx: StageContext[ExportConfig]) -> None:
        """Before any work: a label map or categories file that cannot be read, or a ``local`` prefix without
        Label Studio's document root, is an error."""
        export_label_map(ctx.config)
        try:
            local_root(ctx.config.path_prefix)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def run_all(self, ctx: StageContext[ExportConfig]) -> list[str]:
        cfg, run = effective_config(ctx.config, (ctx.settings.config.get("surgery") or {}).get("methods", [])), ctx.run
        if cfg.region_method != ctx.config.region_method:
            ctx.log.warning("export: surgery.methods do not include export.region_method %r; boxes come from %r",
                            ctx.config.region_method, cfg.region_method)
        label_map = export_label_map(cfg)
        warnings = [w for w in (prefix_warning(cfg),) if w]
        for warning in warnings:
            ctx.log.warning(warning)
        plan = cache(lambda: plan_exports(run, ctx.status))  # read once something needs it
        digest = ctx.read_digest(self.name, lambda: states_digest(plan()[2]))
        stamp = inputs_stamp({"export": ctx.provenance.settings.get("export"), "model": ctx.settings.model,
                              "region_method": cfg.region_method, "local_root": local_root(cfg.path_prefix),
                              "folder": str(run.root.resolve())},  # data.yaml holds it: a moved run exports anew
                             label_map, digest)
        old = read_json(run.file(STAMP)) or {}
        outputs = [REGIONS, *[p for f in cfg.formats for p in old.get("files", {}).get(f, [])]]
        if (old.get("stamp") == stamp and set(cfg.formats) <= set(old.get("files", {}))
                and all(run.file(p).is_file() for p in outputs)):
            ctx.log.info("export: up to date (%d images)", old.get("images", 0))
            return [STAMP, *outputs]
        jobs, left_out, _ = plan()
        images, unreadable = build_exports(run, jobs, cfg, label_map)
        left_out += unreadable
        key = run_key(run.root.name, stamp)
        run.file(STAMP).unlink(missing_ok=True)  # written last: a kill in between cannot leave a stamp over torn files
        files: dict[str, list[str]] = {}
        for fmt in cfg.formats:
            files[fmt] = write_formats(run, images, replace(cfg, formats=(fmt,)), key, ctx.settings.model, label_map)
        atomic_write_text(run.file(REGIONS), json.dumps(regions_document(images, stamp), ensure_ascii=False))
        regions = sum(len(lab.regions) for im in images for lab in im.labels)
        no_region = sum(bool(lab.no_region) for im in images for lab in im.labels)
        for item in left_out:
            ctx.log.warning("export left out %s of %s: %s", item["what"], item["image"], item["reason"])
        atomic_write_json(run.file(STAMP), {"stamp": stamp, "images": len(images), "regions": regions,
                                            "labels": sum(len(im.labels) for im in images),
                                            "labels_without_region": no_region,
                                            "region_method": cfg.region_method,
                                            "formats": list(cfg.formats), "files": files, "left_out": left_out,
                                            "warnings": warnings})
        return [STAMP, REGIONS, *[p for f in files.values() for p in f]]


def evaluate_run(run: RunDir, truth: dict, cfg: ExportConfig, label_map: LabelMap, state: Any,
                 methods: list[str], refiners: tuple[str, ...] = ()) -> dict:
    """A run's labels and regions against a COCO truth document (``pipeline.labels.evaluation``), with each method's
    maps also measured after each of ``refiners`` (``none`` or a name in ``pipeline.labels.refine.REFINERS``).

    Images are matched by their path relative to the input root (the truth's ``file_name``),
    else by file name when that is unique; truth images the run lacks are listed. Classes are
    matched to the truth's categories as ``export --categories`` matches them, so the COCO detection
    metrics reported here are what the export's ``results.json`` scores against the same file.
    """
    from pipeline.labels.evaluation import EvalImage, coco_detection, evaluate, truth_by_file

    by_file = truth_by_file(truth)
    everything = replace(cfg, min_score=None, top_k=0, formats=())
    categories = categories_from_coco(truth, keep_new=True)
    file_of = {i: f for f, i in categories.images.items()}  # the truth's file name of each image id
    label_map = replace(label_map, categories=categories)
    images, left_out, _ = read_exports(run, everything, label_map, state)
    matched, seen, unmatched, scored = [], set(), [], []
    for im in images:
        key = file_of.get(categories.image_id(im.file_name))  # the export's rule: the same path, else a unique name
        if key not in by_file:
            unmatched.append(im.file_name)
            continue
        seen.add(key)
        kept = [lab for lab in im.labels if cfg.min_score is None or lab.score >= cfg.min_score][: cfg.top_k or None]
        scored.append(replace(im, labels=kept))
        maps: dict[str, dict[str, np.ndarray]] = {}
        if im.labels and any(lab.heatmap is not None for lab in im.labels):
            best = {lab.words[0]: lab.name for lab in im.labels}
            for k, grid in read_npz(run.maps(im.id), "").items():  # the export's fast member reader
                method, _, word = k.partition("/")
                if method in methods and word in best:
                    maps.setdefault(method, {})[best[word]] = grid
        size = (im.height, im.width)
        matched.append(EvalImage(truth=by_file[key], scores={lab.name: lab.score for lab in im.labels},
                                 exported=[lab.name for lab in kept],
                                 boxes={lab.name: [r.box for r in lab.regions] for lab in kept},
                                 maps=maps, size=size,
                                 masks={lab.name: region_pixels(lab.regions, size) for lab in kept  # mask mIoU's
                                        if any(o.mask is not None for o in by_file[key].get(lab.name, []))},
                                 picture=working_picture(im.path, size) if refiners and maps else None))
    result = evaluate(matched, methods, tuple(refiners))
    result["region_method"], result["tau"], result["refine"] = cfg.region_method, cfg.tau, cfg.refine
    result["min_score"], result["top_k"] = cfg.min_score, cfg.top_k
    result["detection"] = coco_detection(truth, coco_documents(scored, "", categories)[1])
    result["labels_without_region"] = sum(bool(lab.no_region) for im in scored for lab in im.labels)
    result["labels_exported"] = sum(len(im.labels) for im in scored)
    result["missing_from_run"] = sorted(set(by_file) - seen)
    result["not_in_truth"] = unmatched
    result["left_out"] = left_out
    return result
