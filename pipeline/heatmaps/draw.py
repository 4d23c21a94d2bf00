"""Drawing heatmaps, and turning them into point prompts: the one place a map becomes a picture.

``overlay_heatmap`` is the one place a map is drawn: the JET colormap at 0.6 over
the image at 0.4, as in the CLIP Surgery code. ``map_to_points`` is the original's
text-to-points rule for SAM. ``contact_sheet`` lays out an image and every label's
maps side by side. ``label_slug`` makes a label safe to use in a file name.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.lazy import lazy_module
from pipeline.run.images import slugify

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

def label_slug(word: str) -> str:
    """A file-name-safe, unique slug of a label. Words that slugify lossily get a short hash of the word.

    The result has no path separators, no leading dots and no non-ASCII characters,
    so it can never escape the folder it is joined to.
    """
    slug = slugify(word, max_len=40)
    if slug == word:
        return slug
    return f"{slug}-{hashlib.sha1(word.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The JET-coloured map blended over the image.

    Args:
        image: RGB uint8.
        heat: a map in [0, 1] of the same height and width.
        alpha: the map's weight; the image gets ``1 - alpha``.

    Shape:
        - image: :math:`(H, W, 3)`; heat: :math:`(H, W)`.
        - Output: :math:`(H, W, 3)` RGB uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or heat.shape != image.shape[:2]:
        raise ValueError(f"expected image [H, W, 3] and heat [H, W], got {image.shape} and {heat.shape}")
    jet = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    return np.clip(image.astype(np.float32) * (1 - alpha) + jet.astype(np.float32) * alpha, 0, 255).astype(np.uint8)


def map_to_points(grid_map: torch.Tensor, image_size: tuple[int, int], threshold: float = 0.8,
                  downsample: int = 2) -> tuple[list[list[int]], list[int]]:
    """Positive and negative point prompts from one text's map, by the original's rule.

    The grid is downsampled ``downsample`` times (bilinear) and min-max normalised.
    ``n = min(#cells >= threshold, #cells // 2)``; the ``n`` highest cells are
    positives (strongest first) and the ``n`` lowest are negatives (weakest first),
    each placed at its cell centre in image pixels. A flat map gives no points.

    Args:
        grid_map: a map or raw similarity on the token grid.
        image_size: ``(H, W)`` of the image the points are for.

    Shape:
        - grid_map: :math:`(gh, gw)`.
        - Output: ``2n`` points ``[x, y]`` and their labels (1 positive, 0 negative).
    """
    gh, gw = grid_map.shape
    small = (max(1, gh // downsample), max(1, gw // downsample))
    m = F.interpolate(grid_map.float()[None, None], size=small, mode="bilinear", align_corners=False)[0, 0]
    h, w = m.shape
    m = m.reshape(-1)
    span = m.max() - m.min()
    if not span > 0:
        return [], []
    m = (m - m.min()) / span
    n = min(int((m >= threshold).sum()), m.numel() // 2)
    order = torch.argsort(m, stable=True)  # ascending
    height, width = image_size

    def centre(idx: int) -> list[int]:
        x = min((idx % w + 0.5) * width / w, width - 1)
        y = min((idx // w + 0.5) * height / h, height - 1)
        return [int(x), int(y)]

    positives = [centre(int(i)) for i in order.flip(0)[:n]]
    negatives = [centre(int(i)) for i in order[:n]]
    return positives + negatives, [1] * n + [0] * n


def fit_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down (area filter) so its longer side is at most ``max_side``."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def upsample_map(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A grid map bilinearly resized to ``(H, W)`` (the same interpolation as ``similarity_map``)."""
    t = torch.from_numpy(np.asarray(grid_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1).numpy()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def contact_sheet(image: np.ndarray, rows: list[tuple[str, list[np.ndarray]]], columns: list[str],
                  tile: int = 160) -> np.ndarray:
    """One picture of an image and every label's maps: the image over a column of labels, one row per label.

    Args:
        image: RGB uint8, shown at the top left.
        rows: ``(label, [overlay per column])``, overlays RGB uint8 of any size.
        columns: the column titles (the methods).
        tile: the side of each square tile.

    Shape:
        - Output: :math:`(H, W, 3)` RGB uint8 with ``W = 4 + (tile + 4) * (1 + len(columns))``.
    """
    pad, head = 4, 18
    width = (1 + len(columns)) * (tile + pad) + pad
    height = head + (1 + len(rows)) * (tile + pad) + pad
    sheet = Image.new("RGB", (width, height), (245, 245, 244))
    draw = ImageDraw.Draw(sheet)
    small, big = _font(12), _font(16)

    def cell(col: int, row: int) -> tuple[int, int]:
        return pad + col * (tile + pad), head + pad + row * (tile + pad)

    def paste(img: np.ndarray, col: int, row: int) -> None:
        x, y = cell(col, row)
        h, w = img.shape[:2]
        s = tile / max(h, w)
        thumb = Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))

    for c, name in enumerate(columns, 1):
        draw.text((cell(c, 0)[0], 2), name, fill=(28, 25, 23), font=small)
    paste(image, 0, 0)
    for r, (label, overlays) in enumerate(rows, 1):
        x, y = cell(0, r)
        text = label if len(label) <= 18 else label[:17] + "…"
        draw.text((x + 4, y + tile // 2 - 9), text, fill=(28, 25, 23), font=big)
        for c, ov in enumerate(overlays, 1):
            paste(ov, c, r)
    return np.asarray(sheet)


def map_atlas(maps: dict[str, np.ndarray]) -> tuple[np.ndarray, tuple[int, int], dict[str, list[int]]]:
    """Every map of an image in one grayscale picture, so a page can draw any of them without a file each.

    Args:
        maps: per method, ``[T, gh, gw]`` maps in [0, 1] (grids may differ between methods).

    Returns:
        The atlas ``[T * H, M * W]`` uint8, a cell ``(H, W)`` per label (row) and method (column, in
        the order of ``maps``) holding the map at its top left; the cell size; each method's grid.
    """
    grids = {m: list(a.shape[1:]) for m, a in maps.items()}
    cell = (max(g[0] for g in grids.values()), max(g[1] for g in grids.values()))
    t = next(iter(maps.values())).shape[0]
    atlas = np.zeros((max(t, 1) * cell[0], len(maps) * cell[1]), np.uint8)
    for col, a in enumerate(maps.values()):
        for row in range(t):
            gh, gw = a.shape[1:]
            atlas[row * cell[0] : row * cell[0] + gh, col * cell[1] : col * cell[1] + gw] = np.round(a[row] * 255)
    return atlas, cell, grids
