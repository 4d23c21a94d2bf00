"""Regions from heatmaps and masks: boxes (and masks where they exist) for each label of an image.

A heatmap becomes boxes by CAM's rule (Zhou et al., CVPR 2016): upsample the grid map to
the image's size, min-max it, keep the pixels at or above ``tau`` times its maximum, and
take the box around the largest connected component (or around every component of at
least ``min_area`` when ``multi_instance`` is on). A map refined with its picture first
(``pipeline.labels.refine``) follows the object's edges, so each of its regions also keeps
its component as a mask. A SAM mask becomes one box around its pixels, and keeps the mask.
Regions of different labels that cover one object share its ``object`` number (``group_objects``).
A map too flat to localise (``map_contrast`` below a floor) gives no box, and neither does a
box over nearly all the image (``too_large``): such a label stays an image-level label.
``tau`` should be chosen on held-out images: the ``eval`` command reports the best one on
data with truth (wsolevaluation, Choe et al., CVPR 2020).

These are pure functions of arrays; ``stages/export.py`` reads the run and writes the formats.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import cv2
import numpy as np


@dataclass(frozen=True)
class Region:
    """One labelled region of an image: a box in pixels, and a mask where one exists.

    ``peak`` is the map's highest value inside the region on the map's own [0, 1] scale
    (1 for the component holding the map's maximum); ``peak_similarity`` is that value put
    back on the method's similarity scale, when the map's range is known.
    """

    box: tuple[float, float, float, float]  # x, y, width, height in pixels
    area: float  # pixels covered: the component's or the mask's
    source: str  # "sam", or the heatmap method the box came from
    tau: float | None  # the threshold, as a fraction of the map's maximum (None for a SAM mask)
    peak: float
    mask: np.ndarray | None = None  # [H, W] bool, only where a mask exists (SAM, or a refined map's component)
    peak_similarity: float | None = None
    object: int | None = None  # the image's object this region is (1, 2, ...): one number for one object's labels


# Boxes are found on the map upsampled to the image's size, capped at this many pixels on the longer side and
# scaled back: a box edge is then within one working pixel (1/128 of the image) of the full-size answer, where one
# grid cell of the map is 1/14 to 1/16 of the image for real CLIPs (the toy's 64 px scenes are done at full size).
# It keeps the export of 10,000 images near a minute on two cores.
WORK_SIDE = 128


def work_size(size: tuple[int, int], side: int = WORK_SIDE) -> tuple[int, int]:
    """``(H, W)`` scaled so the longer side is at most ``side`` (unchanged when already smaller)."""
    h, w = size
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def upsample_to(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A grid map bilinearly resized to ``(H, W)`` and min-maxed to [0, 1] (a flat map stays 0).

    Shape:
        - grid_map: :math:`(gh, gw)`. Output: :math:`(H, W)` float32.
    """
    h, w = size
    up = cv2.resize(np.asarray(grid_map, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


def map_boxes(heat: np.ndarray, tau: float, multi_instance: bool = False, min_area: float = 0.0
              ) -> list[tuple[tuple[float, float, float, float], float, float]]:
    """Boxes around the thresholded map's connected components (8-connected), largest first.

    Args:
        heat: a min-maxed map at image size, in [0, 1].
        tau: keep pixels at or above ``tau * heat.max()``.
        multi_instance: every component of at least ``min_area``; off, only the largest.
        min_area: the smallest component kept, as a fraction of the image's area.

    Returns:
        ``(box, area, peak)`` per kept component: ``box`` is ``(x, y, w, h)`` in pixels, ``area``
        its pixel count, ``peak`` the map's highest value inside it.

    Shape:
        - heat: :math:`(H, W)`.
    """
    return [(box, area, peak) for box, area, peak, _ in map_components(heat, tau, multi_instance, min_area)]


def map_components(heat: np.ndarray, tau: float, multi_instance: bool = False, min_area: float = 0.0
                   ) -> list[tuple[tuple[float, float, float, float], float, float, np.ndarray]]:
    """``map_boxes``' components, each with its pixels as well: ``(box, area, peak, mask)``, ``mask`` ``[H, W]`` bool."""
    top = float(heat.max())
    if top <= 0:
        return []
    binary = (heat >= tau * top).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return []
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable") + 1
    if not multi_instance:
        order = order[:1]
    smallest = min_area * heat.shape[0] * heat.shape[1]
    out = []
    for k in order:
        x, y, w, h, area = (int(v) for v in stats[k])
        if multi_instance and area < smallest and len(out) > 0:
            continue
        mask = labels == k
        peak = float(heat[y : y + h, x : x + w][mask[y : y + h, x : x + w]].max())
        out.append(((float(x), float(y), float(w), float(h)), float(area), peak, mask))
    return out


def heatmap_regions(grid_map: np.ndarray, size: tuple[int, int], method: str, tau: float,
                    multi_instance: bool = False, min_area: float = 0.0,
                    similarity_range: tuple[float, float] | None = None,
                    prior: list[list[float]] | None = None,
                    refiner: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Region]:
    """A label's regions from its grid map by CAM's rule (see ``map_boxes``), found on the map at the image's size
    (at most ``WORK_SIDE`` on the longer side, then scaled back to the image's pixels).

    Args:
        grid_map: the label's map at grid resolution, in [0, 1].
        size: the image's ``(H, W)``.
        method: the heatmap method the map came from (the regions' ``source``).
        tau: the threshold as a fraction of the map's maximum.
        multi_instance: a region per component of at least ``min_area`` (a fraction of the image).
        similarity_range: the (lowest, highest) similarity the map's 0 and 1 stand for, to record
            the peak on the method's own scale.
        prior: boxes ``[x, y, w, h]`` as fractions of the image (the label's evidence, ascend's regions or tiles):
            the map outside all of them is set to 0 first, so the regions lie where the word was found.
        refiner: refines the map at the working size (``work_size(size)``) with the picture before CAM's rule
            (``pipeline.labels.refine.refiner_for`` of the picture at that size); each region then keeps its
            component as a mask at the image's size.

    Shape:
        - grid_map: :math:`(gh, gw)`.
    """
    h, w = size
    heat = upsample_to(grid_map, work_size(size))
    if refiner is not None and heat.max() > 0:
        heat = refiner(heat)
    if prior:
        heat = heat * prior_mask(prior, heat.shape)
    sy, sx = h / heat.shape[0], w / heat.shape[1]
    out = []
    for (x, y, bw, bh), area, peak, component in map_components(heat, tau, multi_instance, min_area):
        box = (round(x * sx, 2), round(y * sy, 2), round(bw * sx, 2), round(bh * sy, 2))
        area = round(area * sx * sy, 1)
        sim = None
        if similarity_range is not None:
            lo, hi = similarity_range
            sim = round(lo + peak * (hi - lo), 5)
        mask = None
        if refiner is not None:  # the refined map follows the picture's edges: its component is the region's mask
            mask = mask_at(component, size)
            area = float(mask.sum())
        out.append(Region(box=box, area=area, source=method, tau=tau, peak=round(peak, 4), peak_similarity=sim,
                          mask=mask))
    return out


def mask_at(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask found at the working size, at the image's ``(H, W)``: resized smoothly and cut at one half, so its
    edge is not a staircase of working pixels."""
    h, w = size
    if mask.shape == (h, w):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5


def prior_mask(boxes: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """1 inside any of ``boxes`` (fractions ``[x, y, w, h]``), 0 elsewhere, at ``(H, W)``."""
    h, w = size
    mask = np.zeros((h, w), np.float32)
    for x, y, bw, bh in boxes:
        mask[round(y * h): round((y + bh) * h), round(x * w): round((x + bw) * w)] = 1.0
    return mask


def map_contrast(grid_map: np.ndarray) -> float:
    """How far a map's peak stands above its mean, as a fraction of the map's range: ``(max - mean) / (max - min)``,
    1 minus the mean of the map min-maxed. A map with one small hot spot is near 1, even noise 0.5, a map high
    nearly everywhere (its peak barely above its mean) near 0, and a constant map 0.

    Shape:
        - grid_map: :math:`(gh, gw)`.
    """
    m = np.asarray(grid_map, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    return 0.0 if hi <= lo else float(1.0 - ((m - lo) / (hi - lo)).mean())


def too_large(region: Region, size: tuple[int, int], max_area: float) -> bool:
    """Whether a region's box covers more than ``max_area`` of the image (``size`` is ``(H, W)``)."""
    _, _, w, h = region.box
    return w * h > max_area * size[0] * size[1]


def mask_region(mask: np.ndarray) -> Region | None:
    """The region of a SAM mask: the box around its pixels, and the mask; ``None`` for an empty mask.

    Shape:
        - mask: :math:`(H, W)`, non-zero inside.
    """
    m = np.asarray(mask) > 0
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return Region(box=(float(x0), float(y0), float(x1 - x0), float(y1 - y0)), area=float(m.sum()), source="sam",
                  tau=None, peak=1.0, mask=m)


def box_iou(a: tuple[float, float, float, float], b: np.ndarray) -> np.ndarray:
    """IoU of one ``(x, y, w, h)`` box against each row of ``b`` (``[K, 4]``, the same form)."""
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax0, ay0, aw, ah = a
    ix = np.clip(np.minimum(ax0 + aw, b[:, 0] + b[:, 2]) - np.maximum(ax0, b[:, 0]), 0, None)
    iy = np.clip(np.minimum(ay0 + ah, b[:, 1] + b[:, 3]) - np.maximum(ay0, b[:, 1]), 0, None)
    inter = ix * iy
    union = aw * ah + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def region_pixels(regions: list[Region] | tuple[Region, ...], size: tuple[int, int]) -> np.ndarray:
    """The pixels a label's regions cover, ``[H, W]`` bool: each region's mask, or its filled box where it has none."""
    h, w = size
    out = np.zeros((h, w), bool)
    for r in regions:
        if r.mask is not None and r.mask.shape == (h, w):
            out |= r.mask
        else:
            x, y, bw, bh = r.box
            out[int(round(y)): int(round(y + bh)), int(round(x)): int(round(x + bw))] = True
    return out


def region_iou(a: Region, b: Region) -> float:
    """Two regions' overlap: their masks' IoU when both have one, else their boxes'."""
    if a.mask is not None and b.mask is not None and a.mask.shape == b.mask.shape:
        union = int(np.logical_or(a.mask, b.mask).sum())
        return int(np.logical_and(a.mask, b.mask).sum()) / union if union else 0.0
    return float(box_iou(a.box, np.asarray([b.box]))[0])


SAME_OBJECT_IOU = 0.5  # regions of two labels that overlap at least this much are one object


def group_objects(regions: list[list[Region]], min_iou: float = SAME_OBJECT_IOU) -> list[list[Region]]:
    """Each label's regions (one list per label, best label first) numbered by object: regions of different labels
    that overlap by at least ``min_iou`` (``region_iou``, and through each other) share one ``object``; every other
    region is an object of its own. Numbers run 1, 2, ... in the order the objects are first met.
    """
    flat = [(i, j, r) for i, rs in enumerate(regions) for j, r in enumerate(rs)]
    parent = list(range(len(flat)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a in range(len(flat)):
        for b in range(a + 1, len(flat)):
            if flat[a][0] != flat[b][0] and region_iou(flat[a][2], flat[b][2]) >= min_iou:
                parent[root(b)] = root(a)
    number: dict[int, int] = {}
    out = [list(rs) for rs in regions]
    for k, (i, j, r) in enumerate(flat):
        out[i][j] = replace(r, object=number.setdefault(root(k), len(number) + 1))
    return out
