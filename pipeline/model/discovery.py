"""Looking past an image's dominant concept: the views ascend looks through and decode scores on, and one
opinion from several views'.

A boxed view (a tile of a fixed grid, or the box of one object region) keeps the whole
canvas and every object at its own size and place, and fills what lies outside the box
with the image's border colour (the median of its edge pixels). It is not a crop enlarged
to the input size: a small CLIP that never saw large objects loses their shape when they
are enlarged, and no object moves.

Boxes are ``[x, y, width, height]`` as fractions of the image, so they hold at any
resolution (the model's input is the whole image resized, not cropped).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


WHOLE: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
BOXED: tuple[str, ...] = ("tile", "region")  # the kinds of view that show the image through a box


def tile_boxes(grid: int, size: float) -> list[tuple[float, float, float, float]]:
    """``grid`` x ``grid`` square tiles of side ``size`` (a fraction of the image), spread evenly edge to edge,
    row by row from the top left; ``grid`` 0 gives none.

    Example:
        >>> tile_boxes(2, 0.625)[1]
        (0.375, 0.0, 0.625, 0.625)
    """
    if grid <= 0:
        return []
    starts = [0.0] if grid == 1 else [round(i * (1 - size) / (grid - 1), 6) for i in range(grid)]
    return [(x, y, size, size) for y in starts for x in starts]


def object_boxes(patches: torch.Tensor, grid: tuple[int, int], limit: int, margin: int = 1
                 ) -> list[tuple[float, float, float, float]]:
    """Where an image's objects are, from its patch tokens, without a word: at most ``limit`` boxes, largest first.

    A patch is part of an object when its unit feature is further from the background's (the mean
    of the border patches') than Otsu's threshold over the image's patches puts it; each 4-connected
    group of such patches is one object, its box grown by ``margin`` patches on every side. A uniform
    image has none.

    Shape:
        - patches: :math:`(gh \\cdot gw, D)`, row-major over ``grid``.
    """
    gh, gw = grid
    unit = F.normalize(patches.float(), dim=-1).view(gh, gw, -1)
    border = torch.cat([unit[0], unit[-1], unit[1:-1, 0], unit[1:-1, -1]])
    away = (1 - unit @ F.normalize(border.mean(0), dim=-1)).cpu().numpy()  # [gh, gw]
    spread = float(away.max() - away.min())
    if spread < 1e-6:
        return []
    levels = np.round((away - away.min()) / spread * 255).astype(np.uint8)
    _, mask = cv2.threshold(levels, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    order = sorted(range(1, n), key=lambda k: (-stats[k, cv2.CC_STAT_AREA], k))[:limit]
    boxes = []
    for k in order:
        x, y, w, h = (int(v) for v in stats[k, :4])
        x0, y0, x1, y1 = max(x - margin, 0), max(y - margin, 0), min(x + w + margin, gw), min(y + h + margin, gh)
        boxes.append((round(x0 / gw, 6), round(y0 / gh, 6), round((x1 - x0) / gw, 6), round((y1 - y0) / gh, 6)))
    return boxes


def border_fill(images: torch.Tensor) -> torch.Tensor:
    """Each image's border colour: the per-channel median of its edge pixels.

    Shape:
        - images: :math:`(B, 3, H, W)`; Output: :math:`(B, 3, 1, 1)`.
    """
    edges = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)  # [B, 3, E]
    return edges.median(dim=-1).values[..., None, None]


def tile_views(images: torch.Tensor, boxes: list[tuple[float, float, float, float]]) -> torch.Tensor:
    """Every image seen through every box: the box's pixels kept, the rest filled with the border colour.

    Args:
        images: ``[B, 3, R, R]`` in [0, 1].
        boxes: fractions ``[x, y, w, h]``.

    Returns:
        ``[B * len(boxes), 3, R, R]``, image-major: row ``b * len(boxes) + k`` is image ``b`` through box ``k``.
    """
    B, _, H, W = images.shape
    fill = border_fill(images)
    out = fill.expand(B, -1, H, W).repeat_interleave(len(boxes), dim=0).clone()  # [B*T, 3, H, W]
    for k, (x, y, w, h) in enumerate(boxes):
        x0, y0 = round(x * W), round(y * H)
        x1, y1 = round((x + w) * W), round((y + h) * H)
        out[k :: len(boxes), :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1]
    return out


@dataclass
class Opinion:
    """One image's result: final candidates, per-word statistics, and every check-in's counts.

    With more than one view (tiles, or rounds), ``views`` holds each view's own statistics and
    box, each candidate names its view, and ``words`` and ``checkins`` add up every view's.
    """

    candidates: list[dict]  # {"text", "ids", "loss"} (+ "rescored" once scored with stock encode_text, + "view")
    words: dict[str, dict]  # word -> {"frequency", "candidates", "appearances", "first_iteration"}
    checkins: list[dict] = field(default_factory=list)  # {"iteration", "counts": {word: n}}
    views: list[dict] = field(default_factory=list)  # {"view", "kind", "box", "candidates", "checkins", "words"}


def merge_views(views: list[tuple[Opinion, dict]]) -> Opinion:
    """One opinion from its views': candidates in view order, each naming its view; word statistics and
    check-in counts added up; each view's own statistics and box in ``views``."""
    candidates = [{**c, "view": k} for k, (op, _) in enumerate(views) for c in op.candidates]
    words: dict[str, dict] = {}
    for op, _ in views:
        for w, d in op.words.items():
            m = words.setdefault(w, {"frequency": 0, "candidates": 0, "appearances": 0, "first_iteration": d["first_iteration"]})
            for key in ("frequency", "candidates", "appearances"):
                m[key] += d[key]
            m["first_iteration"] = min(m["first_iteration"], d["first_iteration"])
    checkins = []
    for cks in zip(*(op.checkins for op, _ in views)):  # every view has the same check-in iterations
        counts: Counter = Counter()
        for ck in cks:
            counts.update(ck["counts"])
        checkins.append({"iteration": cks[0]["iteration"], "counts": dict(counts)})
    return Opinion(candidates=candidates, words=dict(sorted(words.items(), key=lambda kv: (-kv[1]["frequency"], kv[0]))),
                   checkins=checkins,
                   views=[{"view": k, **meta, "candidates": len(op.candidates), "checkins": len(op.checkins), "words": op.words}
                          for k, (op, meta) in enumerate(views)])
