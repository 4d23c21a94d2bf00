"""Auto-labels in standard files: one in-memory label type, and one writer per format.

The export stage builds every image's ``ExportImage`` once (labels, regions, heatmaps);
each writer here only lays those out in its format, and never computes a box:

* ``write_coco``: ``instances.json`` (COCO detection, compressed-RLE masks), ``results.json``
  (an evaluation-ready results list) and ``labels.json`` (image-level labels, which COCO has
  no slot for);
* ``write_labelstudio``: ``tasks.json`` with predictions, least certain first, and the
  matching ``label_config.xml``;
* ``write_fiftyone``: ``samples.json``, one heatmap PNG per label, and ``load.py``, which
  builds a FiftyOne dataset with Classifications, Detections and a Heatmap per label rank;
* ``write_yolo``: a dataset ultralytics trains from: ``data.yaml``, ``images/`` (links or
  copies) and one ``.txt`` per image in ``labels/``, optionally split into train and val.

The label type itself, ``ExportImage``, and the label map live in ``pipeline.labels.autolabels``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Any, Iterable
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np
import yaml

from pipeline.labels.autolabels import Categories, ExportImage, ExportLabel
from pipeline.labels.brush import brush_rle
from pipeline.heatmaps.draw import label_slug
from pipeline.labels.regions import Region
from pipeline.run.rundir import atomic_path, atomic_write_text
from pipeline.run.shards import read_sample, split_sample

FORMATS: tuple[str, ...] = ("coco", "labelstudio", "fiftyone", "yolo")


def category_ids(images: Iterable[ExportImage], categories: Categories | None = None) -> dict[str, int]:
    """The COCO id of every category: 1, 2, ... over the sorted class names the export uses; or, with the user's
    ``categories``, every one of theirs with its id, then the export's other classes numbered on after the largest."""
    used = sorted({lab.name for im in images for lab in im.labels})
    if categories is None:
        return {n: i for i, n in enumerate(used, 1)}
    return categories.category_ids(used)


def class_names(images: Iterable[ExportImage], categories: Categories | None = None) -> list[str]:
    """Every category, in id order (``category_ids``): YOLO's class index is a name's place in this list."""
    ids = category_ids(images, categories)
    return sorted(ids, key=ids.__getitem__)


def image_ids(images: list[ExportImage], categories: Categories | None) -> list[int]:
    """Each image's COCO id: 1, 2, ... in order, or the user's id where the user's file lists the image, and new
    ids after the user's largest for the rest."""
    if categories is None:
        return list(range(1, len(images) + 1))
    out, after = [], max(categories.images.values(), default=0)
    for im in images:
        known = categories.image_id(im.file_name)
        if known is None:
            after += 1
        out.append(after if known is None else known)
    return out


# Label Studio serves files it reaches through a local storage under this URL, ``d`` relative to its document root.
LOCAL_FILES = "/data/local-files/?d="
LOCAL_ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"


def served_path(prefix: str, file_name: str) -> str:
    """An image's path for a tool that serves files: ``prefix`` joined to its relative path."""
    if not prefix:
        return file_name
    return prefix + file_name if prefix.endswith(("/", "=")) else f"{prefix}/{file_name}"


def local_root(prefix: str) -> str | None:
    """The document root of the ``local`` preset (``local`` or ``local:ROOT``), ``None`` for any other prefix.

    Raises:
        ValueError: ``local`` without a root, and no root in the environment.
    """
    if prefix != "local" and not prefix.startswith("local:"):
        return None
    root = prefix[len("local:"):] if prefix.startswith("local:") else os.environ.get(LOCAL_ROOT_ENV, "")
    if not root:
        raise ValueError(f"export.path_prefix 'local' needs Label Studio's document root: set {LOCAL_ROOT_ENV} "
                         "as Label Studio has it, or write local:/that/folder")
    return root


def image_url(prefix: str, im: ExportImage) -> str:
    """The image's URL in a Label Studio task.

    ``prefix`` is put before the image's path relative to the input root (a cloud storage URL such as
    ``s3://bucket/photos/``), or is the preset ``local`` / ``local:ROOT``: Label Studio's local file URL with the
    image's path relative to the document root (``ROOT``, else ``$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``).

    Raises:
        ValueError: with ``local``, an image outside the document root, or no root given.
    """
    root = local_root(prefix)
    if root is None:
        return served_path(prefix, im.file_name)
    rel = os.path.relpath(im.path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise ValueError(f"export.path_prefix {prefix!r}: {im.path} is not under Label Studio's document root {root}")
    return LOCAL_FILES + PurePosixPath(*Path(rel).parts).as_posix()


def _region_attributes(lab: ExportLabel, region: Region) -> dict:
    return {"word": lab.words[0], "label_source": lab.source, "box_source": region.source, "tau": region.tau,
            "clip_score": lab.score, "object_id": region.object,
            "peak": region.peak, "peak_similarity": region.peak_similarity,
            "evidence": [[round(v, 2) for v in box] for box in lab.evidence]}


def region_score(lab: ExportLabel, region: Region) -> float:
    """A region's own score: its label's stock-CLIP score times the map's peak inside it (1 for the component that
    holds the map's maximum, and for a SAM or a reviewer's region), so a second, weaker component ranks lower."""
    return round(lab.score * region.peak, 4)


def _rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of a mask, its counts as a string."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def coco_documents(images: list[ExportImage], description: str, categories: Categories | None = None
                   ) -> tuple[dict, list[dict], list[dict]]:
    """COCO's ``instances`` document, the results list, and the image-level labels.

    With ``categories`` (the user's COCO file), categories and images take the user's ids, and the results list
    holds only the images the user's file lists, so that it scores against that file as it is.
    """
    cat = category_ids(images, categories)
    doc: dict[str, Any] = {"info": {"description": description, "version": "1.0"}, "licenses": [],
                           "images": [], "categories": [{"id": i, "name": n, "supercategory": "clip"}
                                                        for n, i in sorted(cat.items(), key=lambda t: t[1])],
                           "annotations": []}
    results, tags = [], []
    for image_id, im in zip(image_ids(images, categories), images):
        scored = categories is None or not categories.images or categories.image_id(im.file_name) is not None
        doc["images"].append({"id": image_id, "file_name": im.file_name, "width": im.width, "height": im.height,
                              "clipsight_id": im.id})
        tags.append({"image_id": image_id, "file_name": im.file_name,
                     "labels": [{"category_id": cat[lab.name], "name": lab.name, "score": lab.score, "words": list(lab.words)}
                                for lab in im.labels]})
        for lab in im.labels:
            for region in lab.regions:
                ann = {"id": len(doc["annotations"]) + 1, "image_id": image_id, "category_id": cat[lab.name],
                       "bbox": [round(v, 2) for v in region.box], "area": region.area, "iscrowd": 0,
                       "score": region_score(lab, region), **_region_attributes(lab, region)}
                res = {"image_id": image_id, "category_id": cat[lab.name], "bbox": ann["bbox"], "score": ann["score"]}
                if region.mask is not None:
                    ann["segmentation"] = res["segmentation"] = _rle(region.mask)
                doc["annotations"].append(ann)
                if scored:
                    results.append(res)
    return doc, results, tags


def write_coco(folder: Path, images: list[ExportImage], description: str, categories: Categories | None = None
               ) -> list[Path]:
    """``instances.json``, ``results.json`` and ``labels.json`` in ``folder``."""
    doc, results, tags = coco_documents(images, description, categories)
    paths = [folder / "instances.json", folder / "results.json", folder / "labels.json"]
    for path, data in zip(paths, (doc, results, {"info": doc["info"], "categories": doc["categories"], "images": tags})):
        atomic_write_text(path, json.dumps(data, ensure_ascii=False) + "\n")
    return paths


# Label Studio: the names its labeling config and the predictions share.
LS_IMAGE, LS_CHOICES, LS_BOXES, LS_BRUSH = "image", "labels", "box", "mask"


def labelstudio_config(names: list[str]) -> str:
    """The labeling config that lists every class for choices, rectangles and brushes."""
    def labels(tag: str) -> str:
        return "".join(f'\n    <{tag} value={quoteattr(n)}/>' for n in names)

    return (f'<View>\n  <Image name="{LS_IMAGE}" value="${LS_IMAGE}"/>\n'
            f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="multiple">{labels("Choice")}\n  </Choices>\n'
            f'  <RectangleLabels name="{LS_BOXES}" toName="{LS_IMAGE}" choice="multiple">{labels("Label")}\n'
            f'  </RectangleLabels>\n'
            f'  <BrushLabels name="{LS_BRUSH}" toName="{LS_IMAGE}" choice="multiple">{labels("Label")}\n'
            f'  </BrushLabels>\n</View>\n')


def _unit(score: float) -> float:
    """A score as Label Studio takes it, in [0, 1] (a cosine can be negative)."""
    return round(min(1.0, max(0.0, float(score))), 4)


def labelstudio_task(im: ExportImage, model_version: str, prefix: str) -> dict:
    """One task: the image and CLIP's prediction (image labels, boxes in percent, brush masks)."""
    result: list[dict] = []

    def item(kind: str, name: str, value: dict, score: float, extra: dict | None = None, human: bool = False) -> dict:
        return {"id": f"r{len(result)}", "from_name": name, "to_name": LS_IMAGE, "type": kind, "value": value,
                "score": _unit(score), **(extra or {}), **({"origin": "manual"} if human else {})}

    if im.labels:  # a reviewer's labels (``import``) keep Label Studio's own mark of a person's region: origin manual
        result.append(item("choices", LS_CHOICES, {"choices": [lab.name for lab in im.labels]}, im.certainty,
                           human=all(lab.source == "human" for lab in im.labels)))
    size = {"original_width": im.width, "original_height": im.height, "image_rotation": 0}
    for members in objects(im):  # one region per object, with every label on it ("red" and "square")
        lab, region = members[0]  # the best-scored label's region gives the shape
        names = list(dict.fromkeys(m.name for m, _ in members))
        human = all(m.source == "human" for m, _ in members)
        x, y, w, h = region.box
        result.append(item("rectanglelabels", LS_BOXES,
                           {"x": 100 * x / im.width, "y": 100 * y / im.height, "width": 100 * w / im.width,
                            "height": 100 * h / im.height, "rotation": 0, "rectanglelabels": names},
                           region_score(lab, region), size, human))
        if region.mask is not None:
            rle = brush_rle(region.mask.astype(np.uint8) * 255)  # the SDK's mask2rle, vectorized (tested equal)
            result.append(item("brushlabels", LS_BRUSH, {"format": "rle", "rle": rle,
                                                         "brushlabels": names}, region_score(lab, region), size, human))
    return {"data": {LS_IMAGE: image_url(prefix, im), "clipsight_id": im.id},
            "predictions": [{"model_version": model_version, "score": _unit(im.certainty), "result": result}]}


def objects(im: ExportImage) -> list[list[tuple[ExportLabel, Region]]]:
    """An image's regions grouped by object (``Region.object``), each group best label first; a region without a
    number is an object of its own."""
    groups: dict[object, list[tuple[ExportLabel, Region]]] = {}
    for lab in im.labels:
        for k, region in enumerate(lab.regions):
            key = region.object if region.object is not None else (lab.name, k)
            groups.setdefault(key, []).append((lab, region))
    return list(groups.values())


def write_labelstudio(folder: Path, images: list[ExportImage], model_version: str, prefix: str,
                      categories: Categories | None = None) -> list[Path]:
    """``tasks.json`` (least certain first) and ``label_config.xml``."""
    order = sorted(images, key=lambda im: (im.certainty, im.file_name))
    tasks = [labelstudio_task(im, model_version, prefix) for im in order]
    paths = [folder / "tasks.json", folder / "label_config.xml"]
    atomic_write_text(paths[0], json.dumps(tasks, ensure_ascii=False) + "\n")
    atomic_write_text(paths[1], labelstudio_config(class_names(images, categories)))
    return paths


FIFTYONE_LOADER = files("pipeline") / "templates" / "fiftyone_load.py"  # copied beside the samples as load.py


def fiftyone_samples(images: list[ExportImage], run_key: str, prefix: str
                     ) -> tuple[dict, list[tuple[PurePosixPath, np.ndarray]]]:
    """``samples.json``'s data, and the heatmap and mask PNGs it names (relative paths, uint8 arrays), with
    names unique to the run."""
    samples, pngs = [], []
    plain = prefix and local_root(prefix) is None  # FiftyOne reads files: the local preset is Label Studio's
    for im in images:
        detections, heatmaps = [], []
        for rank, lab in enumerate(im.labels, 1):
            slug = label_slug(lab.name)
            for k, region in enumerate(lab.regions):
                x, y, w, h = region.box
                det = {"label": lab.name, "confidence": region_score(lab, region), "label_source": lab.source,
                       "box_source": region.source, "tau": region.tau, "index": region.object,
                       "bounding_box": [x / im.width, y / im.height, w / im.width, h / im.height],
                       "box_pixels": [int(x), int(y), int(w), int(h)],
                       "evidence": [[bx / im.width, by / im.height, bw / im.width, bh / im.height]
                                    for bx, by, bw, bh in lab.evidence]}
                if region.mask is not None:  # FiftyOne's mask is the box's: only that crop is written
                    rel = PurePosixPath("masks", f"{run_key}__{im.id}__{slug}__{k}.png")
                    bx, by, bw, bh = det["box_pixels"]
                    pngs.append((rel, region.mask[by:by + bh, bx:bx + bw].astype(np.uint8) * 255))
                    det["mask"] = str(rel)
                detections.append(det)
            if lab.heatmap is not None:
                rel = PurePosixPath("heatmaps", f"{run_key}__{im.id}__{slug}.png")
                pngs.append((rel, np.round(np.clip(lab.heatmap, 0, 1) * 255).astype(np.uint8)))
                heatmaps.append({"field": f"heatmap_{rank}", "label": lab.name, "confidence": lab.score, "map": str(rel)})
        samples.append({"id": im.id, "filepath": served_path(prefix, im.file_name) if plain else im.path,
                        "classifications": [{"label": lab.name, "confidence": lab.score} for lab in im.labels],
                        "detections": detections, "heatmaps": heatmaps})
    return {"name": f"clipsight-{run_key}", "samples": samples}, pngs


PNG_THREADS = 4  # encoding and writing release the GIL: the many small heatmap files are written side by side


def write_fiftyone(folder: Path, images: list[ExportImage], run_key: str, prefix: str) -> list[Path]:
    """``samples.json``, ``load.py`` and the heatmap (and mask) PNGs."""
    for sub in ("heatmaps", "masks"):  # an earlier export's PNGs would be stale
        for old in (folder / sub).glob("*.png") if (folder / sub).is_dir() else []:
            old.unlink()
        (folder / sub).mkdir(parents=True, exist_ok=True)
    doc, pngs = fiftyone_samples(images, run_key, prefix)
    with ThreadPoolExecutor(PNG_THREADS, thread_name_prefix="png") as pool:
        list(pool.map(lambda item: save_png(folder / item[0], item[1]), pngs))
    atomic_write_text(folder / "samples.json", json.dumps(doc, ensure_ascii=False) + "\n")
    atomic_write_text(folder / "load.py", FIFTYONE_LOADER.read_text(encoding="utf-8"))
    return [folder / "samples.json", folder / "load.py"]


YOLO_IMAGES = ("link", "copy")


def dataset_path(file_name: str) -> PurePosixPath:
    """An image's path inside a dataset folder: its path relative to the input root, without a root or ``..``
    (an image listed by absolute path keeps its folders below the root), and a folder named ``images`` renamed
    ``images_``: YOLO finds an image's label by replacing the last ``/images/`` of its path with ``/labels/``."""
    parts = [p for p in PurePosixPath(file_name).parts[:-1] if p not in ("/", "..", ".")]
    return PurePosixPath(*["images_" if p == "images" else p for p in parts], PurePosixPath(file_name).name)


def yolo_split(images: list[ExportImage], val: float, seed: int) -> dict[str, str]:
    """Each image's split, ``train`` or ``val``: ``val`` is the fraction that goes to val (at least one image, and
    at least one left to train, when there are two or more), drawn by ``seed`` from the images in name order, so
    the same run and seed always split alike; ``val`` 0 puts every image in one set, named ``""``."""
    names = sorted(im.file_name for im in images)
    if val <= 0 or len(names) < 2:
        return dict.fromkeys(names, "")
    random.Random(seed).shuffle(names)
    n_val = min(len(names) - 1, max(1, round(val * len(names))))
    return {n: "val" if i < n_val else "train" for i, n in enumerate(names)}


def place_image(source: str, target: Path, mode: str) -> str:
    """Put an image into a dataset folder as a symbolic link (``link``; a copy where the filesystem refuses links)
    or a copy (``copy``); an up-to-date one is kept. Returns how it was placed, ``link`` or ``copy``. A webdataset
    sample has no file to link to: its bytes are written out from its shard."""
    if split_sample(source) is not None:
        data = read_sample(source)
        if not target.is_symlink() and target.is_file() and target.stat().st_size == len(data):
            return "copy"
        target.unlink(missing_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return "copy"
    source = os.path.abspath(source)
    if mode == "link":
        if target.is_symlink() and os.readlink(target) == source:
            return "link"
        target.unlink(missing_ok=True)
        try:
            os.symlink(source, target)
            return "link"
        except OSError:  # a filesystem or OS without symbolic links: copy instead
            pass
    st = os.stat(source)
    if not target.is_symlink() and target.is_file():
        tt = target.stat()
        if tt.st_size == st.st_size and int(tt.st_mtime) == int(st.st_mtime):
            return "copy"
    target.unlink(missing_ok=True)
    shutil.copy2(source, target)
    return "copy"


def _prune(folder: Path, keep: set[Path]) -> None:
    """Remove what an earlier export left in ``folder`` that this one did not write, and folders left empty."""
    if not folder.is_dir():
        return
    for old in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if old.is_symlink() or old.is_file():
            if old not in keep:
                old.unlink()
        elif old.is_dir() and not any(old.iterdir()):
            old.rmdir()


def write_yolo(folder: Path, images: list[ExportImage], with_confidence: bool, categories: Categories | None = None,
               images_mode: str = "link", val: float = 0.0, seed: int = 0) -> list[Path]:
    """A dataset that ultralytics trains from as written: ``images/`` (links to the inputs, or copies) beside
    ``labels/`` (``class cx cy w h`` normalised, one ``.txt`` per image, mirroring the input folder), and
    ``data.yaml`` with the folder's absolute ``path``. With ``val`` > 0 both are split into ``train/`` and ``val/``
    (``yolo_split``). Files an earlier export left there are removed."""
    names = class_names(images, categories)
    cls = {n: i for i, n in enumerate(names)}
    split = yolo_split(images, val, seed)
    keep: set[Path] = set()
    placed = set()
    for im in images:
        lines = []
        for lab in im.labels:
            for region in lab.regions:
                x, y, w, h = region.box
                row = f"{cls[lab.name]} {(x + w / 2) / im.width:.6f} {(y + h / 2) / im.height:.6f} {w / im.width:.6f} {h / im.height:.6f}"
                lines.append(row + (f" {lab.score:.4f}" if with_confidence else ""))
        rel = dataset_path(im.file_name)
        part = split[im.file_name]
        label = folder / "labels" / part / rel.with_suffix(".txt")
        image = folder / "images" / part / rel
        label.parent.mkdir(parents=True, exist_ok=True)
        image.parent.mkdir(parents=True, exist_ok=True)
        write_plain(label, "".join(line + "\n" for line in lines).encode("utf-8"))
        placed.add(place_image(im.path, image, images_mode))
        keep.update((label, image))
    _prune(folder / "labels", keep)
    _prune(folder / "images", keep)
    sets = ("images/train", "images/val") if any(split.values()) else ("images", "images")
    data = {"path": str(folder.resolve()), "train": sets[0], "val": sets[1], "names": dict(enumerate(names)),
            "clipsight": {"images": "/".join(sorted(placed)) or images_mode, "val_fraction": val, "split_seed": seed,
                          "confidence_column": with_confidence}}
    atomic_write_text(folder / "data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return [folder / "data.yaml"]


def run_key(run_name: str, fingerprint: str) -> str:
    """A short key unique to a run and its export settings, for file names tools cache by path."""
    return f"{label_slug(run_name)}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:8]}"


def save_png(path: Path, array: np.ndarray) -> None:
    """A grayscale PNG (``[H, W]`` uint8)."""
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    write_plain(path, data.tobytes())


def write_plain(path: Path, data: bytes) -> None:
    """One of an export's thousands of small files, written in place (its folder exists): the export removes its
    stamp first and writes it last, so a kill in between leaves no stamp, and the next export redoes every file."""
    with open(path, "wb") as f:
        f.write(data)
