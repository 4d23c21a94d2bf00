"""Auto-labels against ground truth: image-level labels, pointing, CorLoc and MaxBoxAccV2.

Pure functions over plain data; the ``eval`` command reads a run and a COCO truth file.

* **Labels** (per image, the exported classes against the true categories): micro precision,
  recall and F1 at the export's ``min_score`` and ``top_k``, and the average precision of
  every label ranked by its stock-CLIP score (each true (image, category) pair that CLIP
  never named counts as missed).
* **Pointing game** (Zhang et al., ECCV 2016), per heatmap method: a hit when the map's
  peak falls inside an object of that category (its mask, else its box).
* **CorLoc**: the share of (image, category) pairs where an exported box reaches IoU >= 0.5
  with a true box of that category.
* **MaxBoxAccV2** (Choe et al., CVPR 2020), per method: boxes around every component of the
  map thresholded at tau, the best IoU with a true box; the best tau's box accuracy, averaged
  over IoU 0.3, 0.5 and 0.7. The tau it picks is reported, to be used on other images.
* **Per refiner** (``none`` and each of ``pipeline.labels.refine.REFINERS``), per method: the map refined with
  its picture, then at every tau the box accuracy of all its components (MaxBoxAccV2, and its tau), CorLoc of the
  largest component's box as the export draws it (and the tau that maximises it), and the mask IoU of that
  component against the category's true masks; ``by_tau`` holds the three at every tau, to choose a tau from.
* **Mask mIoU**, where the truth has masks: per category, the pixels of the exported regions' masks (a region
  without a mask counts as its filled box) against the union of the true masks, intersection over union summed
  over the images, then the mean over categories (the segmentation benchmarks' mIoU, over exported pairs).
* **Detection**: COCO's AP (pycocotools' ``COCOeval``, IoU 0.50:0.95, 0.50 and 0.75) of the
  exported boxes, each scored as the export scores it (its label's stock-CLIP score times the
  map's peak in it): what the COCO export's ``results.json`` scores against the same truth; and
  at IoU 0.5, the boxes' precision and recall as a detector's (each true object matched once,
  best-scored box first).

Localisation scores count the pairs whose category CLIP named (the only ones with a map);
``coverage`` says what share of the true pairs that is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.labels.refine import refiner_for
from pipeline.labels.regions import box_iou, map_boxes, map_components, mask_at, upsample_to, work_size

TAUS: tuple[float, ...] = tuple(round(float(t), 2) for t in np.arange(0.05, 1.0, 0.05))
IOUS: tuple[float, ...] = (0.3, 0.5, 0.7)


@dataclass
class TruthObject:
    box: tuple[float, float, float, float]  # x, y, w, h in pixels
    mask: np.ndarray | None = None  # [H, W] bool, when the truth has a segmentation


@dataclass
class EvalImage:
    """One image as ``eval`` sees it: the true objects by category, CLIP's classes and maps."""

    truth: dict[str, list[TruthObject]]
    scores: dict[str, float]  # every class CLIP named, with its score (before min_score and top_k)
    exported: list[str]  # the classes the export keeps (after min_score and top_k)
    boxes: dict[str, list[tuple[float, float, float, float]]]  # the exported regions' boxes per class
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method -> class -> grid map
    size: tuple[int, int] = (0, 0)  # (H, W)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # the exported regions' pixels per class, [H, W] bool
    picture: np.ndarray | None = None  # the image at work_size(size), [h, w, 3] uint8: what a refiner reads


def average_precision(ranked: list[bool], positives: int) -> float:
    """AP of a ranked list of hits, over ``positives`` true items in all (missed ones lower it)."""
    if positives == 0:
        return float("nan")
    hits = np.cumsum(ranked)
    precision = hits / np.arange(1, len(ranked) + 1)
    return float(np.sum(precision[np.asarray(ranked, dtype=bool)]) / positives)


def peak_point(grid_map: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """The peak cell's centre in image pixels ``(x, y)``."""
    gh, gw = grid_map.shape
    at = int(np.argmax(grid_map))
    h, w = size
    return min(w - 1, int((at % gw + 0.5) / gw * w)), min(h - 1, int((at // gw + 0.5) / gh * h))


def inside(point: tuple[int, int], obj: TruthObject) -> bool:
    x, y = point
    if obj.mask is not None:
        return bool(obj.mask[y, x])
    bx, by, bw, bh = obj.box
    return bx <= x < bx + bw and by <= y < by + bh


def box_accuracy(grid_map: np.ndarray, size: tuple[int, int], truth: list[TruthObject],
                 taus: tuple[float, ...] = TAUS) -> np.ndarray:
    """The best IoU with a true box, for the boxes of every component at each tau (found as ``heatmap_regions``
    finds them, at the image's size capped at ``WORK_SIDE``).

    Returns:
        ``[len(taus)]`` best IoU per tau.
    """
    heat = upsample_to(grid_map, work_size(size))
    scale = np.array([size[1] / heat.shape[1], size[0] / heat.shape[0]] * 2)
    gt = np.asarray([o.box for o in truth], dtype=np.float64)
    out = np.zeros(len(taus))
    for i, tau in enumerate(taus):
        boxes = map_boxes(heat, tau, multi_instance=True)
        out[i] = max((float(box_iou(tuple(np.asarray(b) * scale), gt).max()) for b, _, _ in boxes), default=0.0)
    return out


def refined_accuracy(heat: np.ndarray, size: tuple[int, int], truth: list[TruthObject],
                     taus: tuple[float, ...] = TAUS) -> np.ndarray:
    """At each tau, for a map already at the working size (and refined, or not): the best IoU of any component's box
    with a true box, whether the largest component's box reaches IoU 0.5 with one (CorLoc's hit), and that
    component's mask pixels against the true masks' union, as ``(intersection, union)`` (0, 0 without true masks).

    Returns:
        ``[len(taus), 4]``: best box IoU, hit, intersection, union.
    """
    scale = np.array([size[1] / heat.shape[1], size[0] / heat.shape[0]] * 2)
    gt = np.asarray([o.box for o in truth], dtype=np.float64)
    masks = [o.mask for o in truth if o.mask is not None]
    true = None
    if masks:
        true = np.logical_or.reduce(masks)
    out = np.zeros((len(taus), 4))
    for i, tau in enumerate(taus):
        comps = map_components(heat, tau, multi_instance=True)
        if not comps:
            out[i, 3] = true.sum() if true is not None else 0
            continue
        ious = [float(box_iou(tuple(np.asarray(b) * scale), gt).max()) for b, _, _, _ in comps]
        out[i, 0], out[i, 1] = max(ious), ious[0] >= 0.5  # the components come largest first
        if true is not None:
            pred = mask_at(comps[0][3], size)
            out[i, 2], out[i, 3] = np.logical_and(pred, true).sum(), np.logical_or(pred, true).sum()
    return out


def evaluate(images: list[EvalImage], methods: list[str], refiners: tuple[str, ...] = ()) -> dict:
    """Every metric, overall and per category (see the module docstring); ``refiners`` (names of
    ``pipeline.labels.refine.REFINERS``, or ``none``) are measured on the images that carry a ``picture``."""
    cats = sorted({c for im in images for c in im.truth})
    per: dict[str, dict] = {c: {"images": 0, "tp": 0, "fp": 0, "fn": 0, "ranked": [], "pairs": 0, "named": 0,
                                "corloc": [], "pointing": {m: [] for m in methods},
                                "ious": {m: [] for m in methods}, "mask": [0, 0],
                                "refined": {(m, r): [] for m in methods for r in refiners}} for c in cats}
    ranked: list[tuple[float, bool]] = []
    tp = fp = fn = 0
    for im in images:
        true = set(im.truth)
        refine = {r: refiner_for(r, im.picture) for r in refiners} if im.picture is not None else {}
        for c, s in im.scores.items():
            ranked.append((s, c in true))
            if c in per:  # a category CLIP named where it is absent ranks as a miss of that category
                per[c]["ranked"].append((s, c in true))
        exported = set(im.exported)
        tp += len(exported & true)
        fp += len(exported - true)
        fn += len(true - exported)
        for c in exported - true:
            if c in per:
                per[c]["fp"] += 1
        for c in true:
            row = per[c]
            row["images"] += 1
            row["tp" if c in exported else "fn"] += 1
            row["pairs"] += 1
            objs = im.truth[c]  # none for an image-level truth: counted for the labels, not for where they are
            if c in exported and objs:
                gt = np.asarray([o.box for o in objs], dtype=np.float64)
                row["corloc"].append(any(float(box_iou(b, gt).max()) >= 0.5 for b in im.boxes.get(c, [])))
                truth_masks = [o.mask for o in objs if o.mask is not None]
                if truth_masks:
                    want = np.logical_or.reduce(truth_masks)
                    got = im.masks.get(c, np.zeros_like(want))
                    row["mask"][0] += int(np.logical_and(got, want).sum())
                    row["mask"][1] += int(np.logical_or(got, want).sum())
            if c not in im.scores:
                continue
            row["named"] += 1
            for m in methods if objs else ():
                grid = im.maps.get(m, {}).get(c)
                if grid is None:
                    continue
                point = peak_point(grid, im.size)
                row["pointing"][m].append(any(inside(point, o) for o in objs))
                row["ious"][m].append(box_accuracy(grid, im.size, objs))
                if refine:
                    heat = upsample_to(grid, work_size(im.size))
                    for r, refiner in refine.items():
                        refined = refiner(heat) if refiner is not None and heat.max() > 0 else heat
                        row["refined"][(m, r)].append(refined_accuracy(refined, im.size, objs))

    def labels_block(tp_: int, fp_: int, fn_: int, pairs: list[tuple[float, bool]], positives: int) -> dict:
        p = tp_ / (tp_ + fp_) if tp_ + fp_ else float("nan")
        r = tp_ / (tp_ + fn_) if tp_ + fn_ else float("nan")
        f1 = 2 * p * r / (p + r) if tp_ and p + r else 0.0
        order = [hit for _, hit in sorted(pairs, key=lambda t: -t[0])]
        return {"precision": _r(p), "recall": _r(r), "f1": _r(f1), "ap": _r(average_precision(order, positives))}

    def refined_block(rows: list[np.ndarray], by_class: dict[str, list[np.ndarray]], detail: bool) -> dict:
        acc = np.stack(rows)  # [pairs, tau, 4]
        table = np.stack([(acc[:, :, 0] >= d).mean(0) for d in IOUS])  # [iou, tau]
        corloc = acc[:, :, 1].mean(0)
        sums = [np.stack(v)[:, :, 2:].sum(0) for v in by_class.values() if v]  # per class: [tau, (inter, union)]
        with_masks = [t for t in sums if t[:, 1].max() > 0]
        miou = np.mean([t[:, 0] / np.maximum(t[:, 1], 1) for t in with_masks], 0) if with_masks else None
        best, best_c = int(np.argmax(table.mean(0))), int(np.argmax(corloc))
        out = {"maxboxacc_v2": _r(float(table.max(1).mean())), "best_tau": float(TAUS[best]),
               "corloc_at_best_tau": _r(float(corloc[best])), "best_corloc_tau": float(TAUS[best_c]),
               "corloc_at_best_corloc_tau": _r(float(corloc[best_c])),
               "miou_at_best_corloc_tau": _r(float(miou[best_c])) if miou is not None else None}
        if detail:  # overall only: every tau's figures, to choose a tau from
            out["by_tau"] = {str(t): {"boxacc": _r(float(table.mean(0)[i])), "corloc": _r(float(corloc[i])),
                                      "miou": _r(float(miou[i])) if miou is not None else None}
                            for i, t in enumerate(TAUS)}
        return out

    def loc_block(pointing: dict, ious: dict, corloc: list, refined: dict | None = None, detail: bool = False
                  ) -> dict:
        out: dict = {"corloc": _r(np.mean(corloc)) if corloc else None, "corloc_pairs": len(corloc), "methods": {}}
        for m in methods:
            acc = np.asarray(ious[m]) if ious[m] else None
            block = {"pointing": _r(np.mean(pointing[m])) if pointing[m] else None, "pairs": len(pointing[m])}
            if acc is not None:
                table = np.stack([(acc >= d).mean(0) for d in IOUS])  # [iou, tau]
                block["maxboxacc_v2"] = _r(float(table.max(1).mean()))
                block["best_tau"] = float(TAUS[int(np.argmax(table.mean(0)))])
                block["boxacc_at_iou"] = {str(d): _r(float(table[i].max())) for i, d in enumerate(IOUS)}
            for r in refiners if refined else ():
                by_class = refined[(m, r)]
                if any(by_class.values()):
                    block.setdefault("refiners", {})[r] = refined_block(
                        [a for v in by_class.values() for a in v], by_class, detail)
            out["methods"][m] = block
        return out

    def miou_block(rows: list[list[int]]) -> dict:
        ious = [i / u for i, u in rows if u]
        return {"miou": _r(float(np.mean(ious))) if ious else None, "miou_categories": len(ious)}

    positives = sum(len(im.truth) for im in images)
    all_pointing = {m: [h for c in cats for h in per[c]["pointing"][m]] for m in methods}
    all_ious = {m: [a for c in cats for a in per[c]["ious"][m]] for m in methods}
    all_corloc = [h for c in cats for h in per[c]["corloc"]]
    all_refined = {k: {c: per[c]["refined"][k] for c in cats} for k in ((m, r) for m in methods for r in refiners)}
    overall = {"images": len(images), "pairs": positives,
               "coverage": _r(sum(per[c]["named"] for c in cats) / positives) if positives else None,
               **labels_block(tp, fp, fn, ranked, positives), **miou_block([per[c]["mask"] for c in cats]),
               **loc_block(all_pointing, all_ious, all_corloc, all_refined, detail=True)}
    categories = {}
    for c in cats:
        row = per[c]
        categories[c] = {"images": row["images"], **labels_block(row["tp"], row["fp"], row["fn"], row["ranked"], row["pairs"]),
                         **miou_block([row["mask"]]),
                         **loc_block(row["pointing"], row["ious"], row["corloc"],
                                     {k: {c: v} for k, v in row["refined"].items()})}
    return {"overall": overall, "categories": categories, "taus": list(TAUS), "ious": list(IOUS)}


def coco_detection(truth: dict, results: list[dict]) -> dict:
    """COCO's detection metrics of a results list (``[{image_id, category_id, bbox, score}]``) against a truth
    document, by pycocotools' ``COCOeval``: ``ap`` (IoU 0.50:0.95), ``ap50``, ``ap75``, and at IoU 0.5 the
    matches ``tp``, ``fp``, ``fn`` with ``precision`` and ``recall``.

    AP is COCO's, over the truth's categories only. In the counts a box whose category the truth does not have is
    a false positive, as a dataset tool's evaluator counts it (FiftyOne's ``evaluate_detections``). Metrics are
    ``None`` where the truth has no object; truth annotations without ``area`` or ``iscrowd`` get the box's area
    and 0.
    """
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    doc = copy.deepcopy(truth)
    doc["annotations"] = [a for a in doc.get("annotations", []) if a.get("bbox") is not None]  # image-level: no box
    for ann in doc["annotations"]:
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    objects = sum(not a["iscrowd"] for a in doc.get("annotations", []))
    known = {c["id"] for c in doc.get("categories", [])}
    stranger = sum(r["category_id"] not in known for r in results)
    out = dict.fromkeys(("ap", "ap50", "ap75", "precision", "recall"))
    if not objects:
        return {**out, "tp": 0, "fp": len(results), "fn": 0}
    inside = [r for r in results if r["category_id"] in known]
    if not inside:
        return {**out, "ap": 0.0, "ap50": 0.0, "ap75": 0.0, "tp": 0, "fp": stranger, "fn": objects,
                "precision": 0.0 if stranger else None, "recall": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
        gt = COCO()
        gt.dataset = doc
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(inside)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    t = ev.params.iouThrs.tolist().index(0.5)
    tp = fp = fn = 0
    for e in ev.evalImgs:  # each (category, area range, image); area range "all" counts every object once
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        matched, ignored = np.asarray(e["dtMatches"][t]) > 0, np.asarray(e["dtIgnore"][t], bool)
        tp += int((matched & ~ignored).sum())
        fp += int((~matched & ~ignored).sum())
        fn += int(((np.asarray(e["gtMatches"][t]) == 0) & ~np.asarray(e["gtIgnore"], bool)).sum())
    fp += stranger
    return {"ap": _r(max(0.0, float(ev.stats[0]))), "ap50": _r(max(0.0, float(ev.stats[1]))),
            "ap75": _r(max(0.0, float(ev.stats[2]))), "tp": tp, "fp": fp, "fn": fn,
            "precision": _r(tp / (tp + fp)) if tp + fp else None, "recall": _r(tp / (tp + fn)) if tp + fn else None}


def _r(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else round(float(x), 4)


def read_truth(path: Path) -> dict:
    """A COCO truth file, checked to have ``images``, ``annotations`` and valid ``categories``.

    Raises:
        OSError: the file cannot be read.
        ValueError: not JSON, or not a COCO file, with the reason.
    """
    from pipeline.labels.autolabels import categories_from_coco

    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise ValueError("not a COCO file: it needs 'images', 'annotations' and 'categories' lists")
    categories_from_coco(doc)  # its categories, checked before a run is read
    return doc


def truth_by_file(coco: dict) -> dict[str, dict[str, list[TruthObject]]]:
    """A COCO truth document as ``{file_name: {category name: [objects]}}`` (images without objects included).

    Masks are decoded from polygons or RLE when the image has a size. An annotation without a ``bbox`` (a
    reviewer's image-level label) makes its category present with no object.
    """
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    images = {im["id"]: im for im in coco.get("images", [])}
    out: dict[str, dict[str, list[TruthObject]]] = {im["file_name"]: {} for im in images.values()}
    for ann in coco.get("annotations", []):
        im = images.get(ann.get("image_id"))
        if im is None or ann.get("category_id") not in names:
            continue
        mask = None
        seg = ann.get("segmentation")
        if seg and im.get("height") and im.get("width"):
            from pycocotools import mask as mask_utils

            h, w = int(im["height"]), int(im["width"])
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            mask = mask_utils.decode(rle).astype(bool)
        objects = out[im["file_name"]].setdefault(names[ann["category_id"]], [])
        if ann.get("bbox") is not None:  # without one: an image-level label, present but not localised
            objects.append(TruthObject(tuple(float(v) for v in ann["bbox"]), mask))
    return out


def eval_table(result: dict, methods: list[str], region_method: str) -> list[list[str]]:
    """The short table: one row per category and one overall, as strings."""
    def fmt(x) -> str:
        return "–" if x is None else f"{x:.3f}"

    head = ["category", "images", "P", "R", "F1", "AP", "CorLoc", *[f"point:{m}" for m in methods],
            f"MaxBoxAccV2:{region_method}"]
    rows = [head]
    for name, row in [*result["categories"].items(), ("(all)", {**result["overall"], "images": result["overall"]["images"]})]:
        rows.append([name, str(row["images"]), fmt(row["precision"]), fmt(row["recall"]), fmt(row["f1"]), fmt(row["ap"]),
                     fmt(row["corloc"]), *[fmt(row["methods"][m]["pointing"]) for m in methods],
                     fmt(row["methods"].get(region_method, {}).get("maxboxacc_v2"))])
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Rows as aligned plain text (a Markdown table), readable in any terminal width and pasteable."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *[line(r) for r in rows[1:]]])
