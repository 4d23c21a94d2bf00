"""Auto-labels in memory: one type for an image's classes and regions, and building it from a run's outputs.

``ExportImage`` is what every export writer (``pipeline.labels.exports``) and ``eval`` read: an
image's classes, each with its stock-CLIP score, the words behind it, its regions
(``pipeline.labels.regions``) and the map they came from. ``export_image`` builds one from an
image's labels and maps; ``export_one`` reads those from the run directory first.
``LabelMap`` maps many model words to one class and drops words, from a YAML file, and
``Categories`` matches classes to a user's own COCO categories and ids.

This module imports no torch, so the export can read a large run on worker processes
that start in a fraction of a second.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field, replace
from functools import cache, cached_property, lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

import numpy as np
import yaml
from PIL import Image

from pipeline.run.config import ConfigError
from pipeline.run.images import ImageError, ImageRef, load_image
from pipeline.labels.refine import refiner_for
from pipeline.model.discovery import BOXED
from pipeline.labels.regions import (Region, group_objects, heatmap_regions, map_contrast, mask_region, too_large,
                                     work_size)
from pipeline.run.rundir import RunDir, read_output


@dataclass(frozen=True)
class LabelRules:
    """What an export keeps of an image's labels, and how it finds their regions (``stages.export.ExportConfig``)."""

    region_method: str = "single"
    tau: float = 0.5
    multi_instance: bool = False
    min_area: float = 0.002
    min_score: float | None = None
    top_k: int = 0
    min_contrast: float = 0.0
    max_box_area: float = 1.0
    evidence_prior: bool = False
    refine: str = "none"


@dataclass(frozen=True)
class ExportLabel:
    """One class of an image: its stock-CLIP score (the best of its words), the words behind it,
    and its regions (the best-scored word's)."""

    name: str
    score: float
    words: tuple[str, ...]
    regions: tuple[Region, ...] = ()
    heatmap: np.ndarray | None = None  # the region method's grid map of the best word, in [0, 1]
    no_region: str = ""  # why a label with a map has no region (a flat map, a box over nearly all the image)
    evidence: tuple[tuple[float, float, float, float], ...] = ()  # the regions (or tiles) that found the best word, in pixels
    source: str = "opinion"  # where the best word came from: "opinion", "vocabulary", "both" or "human"


@dataclass
class ExportImage:
    """One image's auto-labels, as every writer reads them."""

    id: str
    file_name: str  # relative to the input root, with forward slashes
    path: str  # absolute
    width: int
    height: int
    labels: list[ExportLabel] = field(default_factory=list)

    @property
    def certainty(self) -> float:
        """The best label's score (0 without labels): how sure CLIP is of this image."""
        return max((lab.score for lab in self.labels), default=0.0)


@dataclass(frozen=True)
class LabelMap:
    """Which class each model word becomes, and which words are dropped.

    The YAML file has three optional keys::

        map: {circle: round, ring: round}   # word -> class; many words may share a class
        drop: [the, a]                       # words never exported
        only_mapped: false                   # true: words the map does not name are dropped too
    """

    mapping: dict[str, str] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    only_mapped: bool = False
    source: str = ""  # the file's text, so a changed file redoes the export
    categories: "Categories | None" = None  # the user's categories, which a class is matched to by name

    def classify(self, word: str) -> str | None:
        """The class of ``word`` (the user's category name where one matches), or ``None`` when it is dropped."""
        if word in self.drop:
            return None
        name = self.mapping.get(word, None if self.only_mapped else word)
        if name is None or self.categories is None:
            return name
        return self.categories.match(name)


@dataclass(frozen=True)
class Categories:
    """A user's COCO categories and images (``export.categories``): the ids an export gives its classes and images.

    A class matches a category of the same name, else one whose name is the same but for case and surrounding
    spaces. A class that matches none gets a new id after the user's when ``keep_new``, else it is dropped.
    """

    ids: dict[str, int]  # category name -> id, as the file gives them
    images: dict[str, int] = field(default_factory=dict)  # image file_name -> id, as the file gives them
    keep_new: bool = False
    source: str = ""  # the file's text, so a changed file redoes the export

    def match(self, name: str) -> str | None:
        """The user's category name for class ``name``; ``name`` itself, or ``None``, when none matches."""
        if name in self.ids:
            return name
        return self._folded.get(name.casefold().strip(), name if self.keep_new else None)

    @cached_property
    def _folded(self) -> dict[str, str]:
        return {n.casefold().strip(): n for n in sorted(self.ids, reverse=True)}  # the first name wins a tie

    @cached_property
    def _by_base(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for f, i in self.images.items():
            base = PurePosixPath(f).name
            out[base] = None if base in out else i  # a name the file holds twice matches neither
        return out

    def category_ids(self, names: Iterable[str]) -> dict[str, int]:
        """Every category's id: the user's, then ``names`` that are not among them, numbered on after the largest."""
        out = dict(self.ids)
        after = max(out.values(), default=0)
        for n in sorted(set(names) - set(out)):
            after += 1
            out[n] = after
        return out

    def image_id(self, file_name: str) -> int | None:
        """The user's id of an image: by its path relative to the input root, else by a file name the user's file
        holds once; ``None`` when the file does not list it."""
        if file_name in self.images:
            return self.images[file_name]
        return self._by_base.get(PurePosixPath(file_name).name)


def categories_from_coco(doc: dict, keep_new: bool = False, source: str = "") -> Categories:
    """The categories and images of a COCO document (a dict).

    Raises:
        ValueError: no ``categories`` list, or an entry without an integer ``id`` and a ``name``.
    """
    cats = doc.get("categories") if isinstance(doc, dict) else None
    if not isinstance(cats, list) or not cats:
        raise ValueError("a COCO file needs a non-empty 'categories' list of {id, name}")
    ids: dict[str, int] = {}
    for c in cats:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
            raise ValueError(f"a category needs an integer 'id' and a 'name', got {c!r}")
        ids.setdefault(c["name"], c["id"])
    images = {im["file_name"]: im["id"] for im in doc.get("images") or []
              if isinstance(im, dict) and isinstance(im.get("file_name"), str) and isinstance(im.get("id"), int)}
    return Categories(ids, images, keep_new, source)


def load_categories(path: str | Path | None, keep_new: bool = False) -> Categories | None:
    """The categories of the COCO file at ``path`` (``None`` when no path is given).

    Raises:
        ConfigError: a missing file, a file that is not JSON, or one without categories; the message names the file.
    """
    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"export.categories: no file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return categories_from_coco(json.loads(text), keep_new, text)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None


def load_label_map(path: str | Path | None) -> LabelMap:
    """The label map in ``path`` (identity when ``None``).

    Raises:
        ConfigError: a missing file, bad YAML, an unknown key or a value of the wrong type; the
            message names the file and the key.
    """
    if not path:
        return LabelMap()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"export.label_map: no file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a label map is a mapping with the keys map, drop, only_mapped; got {type(data).__name__}")
    unknown = [k for k in data if k not in ("map", "drop", "only_mapped")]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} in the label map; valid keys: map, drop, only_mapped")
    mapping = data.get("map") or {}
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                for k, v in mapping.items()):
        raise ConfigError(f"{path}: 'map' must map words to class names (strings), got {mapping!r}")
    drop = data.get("drop") or []
    if not isinstance(drop, list) or not all(isinstance(w, str) for w in drop):
        raise ConfigError(f"{path}: 'drop' must be a list of words, got {drop!r}")
    only = data.get("only_mapped", False)
    if not isinstance(only, bool):
        raise ConfigError(f"{path}: 'only_mapped' must be true or false, got {only!r}")
    return LabelMap({k: v.strip() for k, v in mapping.items()}, frozenset(drop), only, text)


def export_image(ref: ImageRef, size: tuple[int, int], labels: list[dict], heatmaps: dict | None,
                 maps: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], cfg: LabelRules,
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
    @cache
    def refiner():  # export.refine: the picture's refiner at the maps' working size, made once
        if cfg.refine == "none":
            return None
        picture = working_picture(ref.path, (height, width))
        return None if picture is None else refiner_for(cfg.refine, picture)  # a broken picture: maps unrefined

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
        boxes = [e["box"] for e in best.get("evidence", ()) if e.get("kind") in BOXED]  # its regions' or tiles' boxes
        regions: tuple[Region, ...] = ()
        grid = maps.get(word) if heatmaps is not None else None
        why = ""
        if best.get("source") == "human" and best.get("boxes"):  # a reviewer drew them: they are the regions
            regions = tuple(Region(tuple(float(v) for v in b), float(b[2] * b[3]), "human", None, 1.0)
                            for b in best["boxes"])
        elif heatmaps is not None and word in masks:
            region = mask_region(masks[word])
            regions = (region,) if region is not None else ()
        elif grid is not None and (contrast := map_contrast(grid)) < cfg.min_contrast:
            why = f"flat map: contrast {contrast:.2f} < export.min_contrast {cfg.min_contrast}"
        elif grid is not None:
            rng = ranges.get(word)
            regions = tuple(heatmap_regions(grid, (height, width), cfg.region_method, cfg.tau, cfg.multi_instance,
                                            cfg.min_area, tuple(rng) if rng else None,
                                            boxes if cfg.evidence_prior else None, refiner()))
        kept = tuple(r for r in regions if r.source == "human" or not too_large(r, (height, width), cfg.max_box_area))
        if len(kept) < len(regions) and not kept:
            why = f"its box covers more than export.max_box_area ({cfg.max_box_area:g}) of the image"
        evidence = tuple((round(x * width, 2), round(y * height, 2), round(bw * width, 2), round(bh * height, 2))
                         for x, y, bw, bh in boxes)
        out.append(ExportLabel(name, score, tuple(w["word"] for w in words), kept, grid, why, evidence,
                               best.get("source", "opinion")))
    out.sort(key=lambda lab: -lab.score)
    out = out[: cfg.top_k or None]
    numbered = group_objects([list(lab.regions) for lab in out])  # "red" and "square" on one object: one number
    out = [replace(lab, regions=tuple(rs)) for lab, rs in zip(out, numbered)]
    return ExportImage(ref.id, ref.rel.replace("\\", "/"), ref.path, width, height, out)


def working_picture(path: str, size: tuple[int, int]) -> np.ndarray | None:
    """An image at the maps' working size (``work_size(size)``, ``size`` its ``(H, W)``) as ``[h, w, 3]`` uint8, what
    a refiner reads; decoded near that size (a JPEG at a fraction of its scale), then resized to it exactly.
    ``None`` when the image cannot be read."""
    h, w = work_size(size)
    try:
        return np.asarray(load_image(path, max_side=max(h, w)).resize((w, h), Image.BILINEAR))
    except ImageError:
        return None


def export_one(root: Path, cfg: LabelRules, label_map: LabelMap, job: tuple[ImageRef, bool]
                ) -> tuple[ExportImage | None, str | None]:
    """One image's export from its files, or why it cannot be exported."""
    ref, surgery_done = job
    run = RunDir(root)
    labels, why = read_output(run.labels(ref.id), root)
    if not isinstance(labels, dict) or not isinstance(labels.get("labels"), list):
        return None, f"{why or f'labels/{ref.id}.json: not a labels file'}: rerun decode"
    heatmaps, why = read_output(run.heatmaps(ref.id), root) if surgery_done else (None, None)
    if surgery_done and not isinstance(heatmaps, dict):
        return None, f"{why or f'surgery/{ref.id}.json: not a surgery output'}: rerun surgery"
    try:
        maps, masks = maps_and_masks(run, ref, heatmaps, cfg)
    except (OSError, ValueError, KeyError) as err:
        return None, f"surgery/{ref.id}.npz or a mask is unreadable ({err}): rerun surgery"
    size = tuple(heatmaps["size"]) if heatmaps else _image_size(ref)
    if size is None:
        return None, "the image cannot be read for its size"
    return export_image(ref, size, labels["labels"], heatmaps, maps, masks, cfg, label_map), None


def maps_and_masks(run: RunDir, ref: ImageRef, heatmaps: dict | None, cfg: LabelRules
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if heatmaps is None:
        return {}, {}
    maps: dict[str, np.ndarray] = {}
    if cfg.region_method in heatmaps.get("methods", []):
        maps = read_npz(run.maps(ref.id), f"{cfg.region_method}/")
    masks = {}
    for entry in heatmaps.get("labels", []):
        if entry.get("mask"):
            with Image.open(run.file(entry["mask"])) as im:
                masks[entry["word"]] = np.asarray(im.convert("L")) > 0
    return maps, masks


@lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """An .npy header's dtype, shape and order, parsed by numpy once per distinct header (they repeat)."""
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = np.lib.format._read_array_header(f, version)
    return dtype, shape, fortran


def read_npz(path: Path, prefix: str) -> dict[str, np.ndarray]:
    """The float32 arrays of an npz whose keys start with ``prefix``, keyed by the rest of the key.

    Reads the archive's members directly, with each distinct .npy header parsed once, which is
    several times faster than ``np.load`` for the many small maps of a run.
    """
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if not key.startswith(prefix):
                continue
            data = zf.read(info)
            start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
            dtype, shape, fortran = _npy_header(data[:start])
            arr = np.frombuffer(data, dtype=dtype, offset=start).reshape(shape, order="F" if fortran else "C")
            out[key[len(prefix):]] = arr.astype(np.float32)
    return out


def _image_size(ref: ImageRef) -> tuple[int, int] | None:
    try:
        with Image.open(ref.path) as im:
            return im.size
    except (OSError, ValueError):
        return None


