"""Toy world: seeded synthetic scenes whose truth is known.

Each scene holds 1 to 3 coloured shapes on a varied background. For every object
the generator returns its words (colour and shape) and the exact pixel mask it
drew, and for the scene a caption such as ``"a red circle and a blue square."``.

The scenes train the shipped toy CLIP (``pipeline.toy.train``), feed the offline
demo, and give the quality benchmarks a ground truth to score against.

Two renderers share one vocabulary:

* ``style="train"``: hard-edged numpy rasterisation, the training distribution;
* ``style="alt"``: anti-aliased PIL drawing with other shades and backgrounds, to
  test that the model generalises to differently drawn scenes;
* ``style="varied"``: the training augmentation. Every scene draws its own choices:
  either renderer's backgrounds, supersampled anti-aliasing or hard edges, each
  shape's proportions (ring and cross widths, diamond and triangle aspect), colour
  values jittered and desaturated within each name, blur, noise and JPEG artefacts;
* ``style="mixed"``: each scene drawn by ``train`` or ``varied``, half each, so a
  model learns the varied looks without losing the training style's;
* ``style="blend"``: ``train``, ``varied`` or ``alt``, a third each: the training
  mix of a vision tower trained from scratch (``scratch-gpu``), so ``alt`` is no
  longer unseen for that model (the held-out renderer still is).

The benchmarks' held-out renderer (``tests/benchmarks/heldout.py``) is a separate
implementation that training never sees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: tuple[str, ...] = ("flat", "noise", "gradient", "stripes")
Style = Literal["train", "alt", "varied", "mixed", "blend"]


@dataclass(frozen=True)
class ToyObject:
    """One drawn object: its words and the pixels it covers."""

    colour: str
    shape: str
    center: tuple[float, float]  # (x, y) in pixels
    size: float  # outer diameter in pixels
    mask: np.ndarray = field(repr=False)  # [H, W] bool, visible pixels

    @property
    def words(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A rendered scene with its ground truth."""

    image: np.ndarray = field(repr=False)  # [H, W, 3] uint8
    objects: tuple[ToyObject, ...]
    caption: str
    background: str


@dataclass(frozen=True)
class SceneSpec:
    """What scenes to draw."""

    size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    min_scale: float = 0.15  # object diameter as a fraction of the image side
    max_scale: float = 0.40
    backgrounds: tuple[str, ...] = BACKGROUNDS
    style: Style = "train"

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 3, got {self.min_objects}..{self.max_objects}")
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if unknown:
            raise ValueError(f"unknown backgrounds {sorted(unknown)}; valid: {list(BACKGROUNDS)}")


def caption_for(objects: tuple[ToyObject, ...] | list[tuple[str, str]]) -> str:
    """Caption in the training form: ``"a red circle, a blue ring and a green cross."``."""
    pairs = [o.words if isinstance(o, ToyObject) else o for o in objects]
    parts = [f"a {c} {s}" for c, s in pairs]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def scene_rng(seed: int, index: int, style: Style = "train") -> np.random.Generator:
    """The generator for scene ``index`` of stream ``seed``: independent of every other scene."""
    digest = hashlib.sha256(f"toyworld/{style}/{seed}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def make_scene(rng: np.random.Generator, spec: SceneSpec = SceneSpec()) -> Scene:
    """Draw one scene from ``rng``.

    Args:
        rng: the random stream; the scene is a pure function of its state.
        spec: sizes, object counts, backgrounds and renderer.

    Returns:
        The scene, whose object masks are exactly the visible pixels of each object.
    """
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    placed = _place_objects(rng, spec, n)
    background = str(rng.choice(spec.backgrounds))
    style = spec.style
    if style == "mixed":
        style = "train" if rng.random() < 0.5 else "varied"
    elif style == "blend":
        style = ("train", "varied", "alt")[int(rng.integers(3))]
    if style == "train":
        image, masks = _render_train(rng, spec.size, background, placed)
    elif style == "alt":
        image, masks = _render_alt(rng, spec.size, background, placed)
    else:
        image, masks = _render_varied(rng, spec.size, background, placed)
    objects = tuple(
        ToyObject(colour=c, shape=s, center=(x, y), size=d, mask=m)
        for (c, s, x, y, d, _), m in zip(placed, masks)
    )
    return Scene(image=image, objects=objects, caption=caption_for(objects), background=background)


def make_scenes(seed: int, count: int, spec: SceneSpec = SceneSpec()) -> list[Scene]:
    """``count`` scenes of stream ``seed``; scene i never depends on ``count``."""
    return [make_scene(scene_rng(seed, i, spec.style), spec) for i in range(count)]


def write_scenes(out: Path, seed: int, count: int, spec: SceneSpec = SceneSpec()) -> Path:
    """Write ``count`` scenes as PNGs plus ``truth.json`` and its COCO form ``truth_coco.json`` into ``out``;
    return the truth file."""
    out.mkdir(parents=True, exist_ok=True)
    truth, scenes, names = [], make_scenes(seed, count, spec), []
    for i, scene in enumerate(scenes):
        name = f"scene_{i:04d}.png"
        names.append(name)
        Image.fromarray(scene.image).save(out / name)
        truth.append(
            {
                "file": name,
                "caption": scene.caption,
                "background": scene.background,
                "objects": [
                    {
                        "colour": o.colour,
                        "shape": o.shape,
                        "center": [round(o.center[0], 2), round(o.center[1], 2)],
                        "size": round(o.size, 2),
                        "bbox": _bbox(o.mask),
                    }
                    for o in scene.objects
                ],
            }
        )
    path = out / "truth.json"
    path.write_text(json.dumps({"seed": seed, "size": spec.size, "style": spec.style, "scenes": truth}, indent=1))
    (out / TRUTH_COCO).write_text(json.dumps(coco_truth(scenes, names, spec)))
    return path


TRUTH_COCO = "truth_coco.json"


def coco_categories() -> list[dict]:
    """The toy world's words as COCO categories: the shapes, then the colours, ids from 1."""
    words = [*SHAPES, *COLOURS]
    return [{"id": i, "name": w, "supercategory": "shape" if w in SHAPES else "colour"} for i, w in enumerate(words, 1)]


def coco_truth(scenes: list[Scene], names: list[str], spec: SceneSpec) -> dict:
    """Scenes' truth as a COCO document: each object twice, once under its shape and once under its colour,
    with its box and its exact mask (compressed RLE), so both kinds of word can be measured."""
    from pycocotools import mask as mask_utils

    cats = {c["name"]: c["id"] for c in coco_categories()}
    doc: dict = {"info": {"description": f"toy scenes ({spec.style} style)", "version": "1.0"}, "licenses": [],
                 "images": [], "categories": coco_categories(), "annotations": []}
    for image_id, (scene, name) in enumerate(zip(scenes, names), 1):
        h, w = scene.image.shape[:2]
        doc["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        for o in scene.objects:
            if not o.mask.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
            x0, y0, x1, y1 = _bbox(o.mask)
            for word in o.words:
                doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": image_id,
                                           "category_id": cats[word], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                           "area": int(o.mask.sum()), "iscrowd": 0,
                                           "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    return doc


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _place_objects(rng: np.random.Generator, spec: SceneSpec, n: int) -> list[tuple]:
    """Non-overlapping placements: (colour, shape, x, y, diameter, angle)."""
    size = spec.size
    placed: list[tuple] = []
    used: set[tuple[str, str]] = set()
    for _ in range(60):
        if len(placed) == n:
            break
        d = float(rng.uniform(spec.min_scale, spec.max_scale)) * size
        r = d / 2
        x = float(rng.uniform(r, size - r))
        y = float(rng.uniform(r, size - r))
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        angle = float(rng.uniform(-15, 15))
        if (colour, shape) in used:
            continue
        if any((x - px) ** 2 + (y - py) ** 2 < (r + pd / 2 + 1) ** 2 for _, _, px, py, pd, _ in placed):
            continue
        placed.append((colour, shape, x, y, d, angle))
        used.add((colour, shape))
    return placed


GEOMETRY: dict[str, float] = {"ring": 0.55, "square": 0.8, "diamond": 0.75, "cross": 0.32, "triangle": 0.5, "aspect": 1.0}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float, geo: dict[str, float] = GEOMETRY) -> np.ndarray:
    """Inside-test of ``shape`` with outer radius ``r`` in local coordinates (v points down).

    ``geo`` holds the proportions: the ring's inner radius, the square's half side, the diamond's
    half width and the cross's half arm, each as a fraction of ``r``; the triangle's inradius as
    one; and ``aspect``, the height over the width of the shape's frame.
    """
    v = v / geo["aspect"]
    if shape == "circle":
        return u**2 + v**2 <= r**2
    if shape == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (geo["ring"] * r) ** 2)
    if shape == "square":
        return (np.abs(u) <= geo["square"] * r) & (np.abs(v) <= geo["square"] * r)
    if shape == "diamond":
        return np.abs(u) / geo["diamond"] + np.abs(v) <= r
    if shape == "cross":
        arm = geo["cross"] * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for deg in (90.0, 210.0, 330.0):  # outward normals of an upward-pointing triangle
            nx, ny = np.cos(np.radians(deg)), -np.sin(np.radians(deg))
            inside &= -(nx * u + ny * v) <= geo["triangle"] * r
        return inside
    raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation background colour, far from the object palette."""
    grey = rng.uniform(40, 215)
    return np.clip(grey + rng.normal(0, 12, 3), 0, 255)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a, b = _muted(rng), _muted(rng)
    if kind == "flat":
        img = np.broadcast_to(a, (size, size, 3)).copy()
    elif kind == "noise":
        img = a + rng.normal(0, rng.uniform(8, 25), (size, size, 3))
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = (np.cos(theta) * xx + np.sin(theta) * yy) / size
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.3) * size
        t = ((np.cos(theta) * xx + np.sin(theta) * yy) / period) % 1.0 < 0.5
        img = np.where(t[..., None], a, b)
    else:
        raise ValueError(f"unknown background {kind!r}; valid: {list(BACKGROUNDS)}")
    return img.astype(np.float32)


def _object_frame(xx, yy, x, y, angle_deg):
    """Pixel coordinates in an object's frame: centred on ``(x, y)`` and turned by ``angle_deg``."""
    t = np.radians(angle_deg)
    dx, dy = xx - x, yy - y
    return np.cos(t) * dx + np.sin(t) * dy, -np.sin(t) * dx + np.cos(t) * dy


def _render_train(rng, size, background, placed):
    img = _background(rng, size, background)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    masks = []
    for colour, shape, x, y, d, angle in placed:
        u, v = _object_frame(xx, yy, x, y, angle)
        mask = _shape_mask(shape, u, v, d / 2)
        base = np.array(COLOURS[colour], np.float32) * rng.uniform(0.8, 1.12)
        rgb = np.clip(base + rng.uniform(-22, 22, 3), 0, 255)
        img[mask] = rgb
        masks.append(mask)
    if rng.random() < 0.3:  # soften edges sometimes, so hard edges are not the only look of a shape
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.4, 1.0)))
    img = img + rng.normal(0, rng.uniform(0, 6), img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), masks


def _varied_geometry(rng: np.random.Generator) -> dict[str, float]:
    return {"ring": rng.uniform(0.38, 0.72), "square": rng.uniform(0.68, 0.9), "diamond": rng.uniform(0.55, 0.9),
            "cross": rng.uniform(0.18, 0.46), "triangle": rng.uniform(0.42, 0.58), "aspect": rng.uniform(0.85, 1.15)}


def _render_varied(rng, size, background, placed):
    """Fresh rendering choices per scene and per object (the training augmentation; see the module notes)."""
    img = _background(rng, size, background) if rng.random() < 0.5 else _alt_background(rng, size, background).astype(np.float32)
    k = int(rng.choice([1, 2, 4]))  # supersampling factor: 1 draws hard edges
    fine = (np.mgrid[0:size * k, 0:size * k].astype(np.float32) + 0.5) / k
    yy, xx = fine[0], fine[1]
    covers = []
    for colour, shape, x, y, d, angle in placed:
        u, v = _object_frame(xx, yy, x, y, angle * 2)  # up to 30 degrees either way
        inside = _shape_mask(shape, u, v, d / 2, _varied_geometry(rng)).astype(np.float32)
        cover = inside.reshape(size, k, size, k).mean((1, 3))
        rgb = np.array(COLOURS[colour], np.float32) * rng.uniform(0.75, 1.12) + rng.uniform(-25, 25, 3)
        if rng.random() < 0.5:  # desaturate towards the colour's own grey
            rgb = rgb + rng.uniform(0, 0.25) * (rgb.mean() - rgb)
        img = img * (1 - cover[..., None]) + np.clip(rgb, 0, 255) * cover[..., None]
        covers.append(cover)
    masks = [c >= 0.5 for c in covers]
    for i in range(len(masks)):  # later objects occlude earlier ones
        for later in masks[i + 1 :]:
            masks[i] = masks[i] & ~later
    if rng.random() < 0.4:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, 1.2)))
    img = np.clip(img + rng.normal(0, rng.uniform(0, 8), img.shape), 0, 255).round().astype(np.uint8)
    if rng.random() < 0.5:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 96))])
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return img, masks


def _render_alt(rng, size, background, placed):
    """Anti-aliased PIL drawing at 4x, other shades, other backgrounds, downsampled."""
    k = 4
    big = size * k
    base = Image.fromarray(_alt_background(rng, big, background))
    masks = []
    for colour, shape, x, y, d, angle in placed:
        layer = Image.new("L", (big, big), 0)
        _draw_pil(ImageDraw.Draw(layer), shape, x * k, y * k, d * k / 2, angle)
        shade = np.clip(np.array(COLOURS[colour], np.float32) * rng.uniform(0.8, 1.1) + rng.uniform(-25, 25, 3), 0, 255)
        base.paste(Image.new("RGB", (big, big), tuple(int(c) for c in shade)), (0, 0), layer)
        cover = np.asarray(layer.resize((size, size), Image.BOX), dtype=np.float32) / 255
        masks.append(cover >= 0.5)
    for i in range(len(masks)):  # later objects occlude earlier ones
        for later in masks[i + 1 :]:
            masks[i] = masks[i] & ~later
    return np.asarray(base.resize((size, size), Image.LANCZOS)), masks


def _alt_background(rng, size, kind):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a, b = _muted(rng), _muted(rng)
    if kind == "flat":
        img = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    elif kind == "noise":  # blotchy low-frequency noise instead of pixel noise
        coarse = rng.normal(0, 20, (8, 8, 3)).astype(np.float32)
        up = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        img = a + (up.astype(np.float32) - 128)
    elif kind == "gradient":  # radial instead of linear
        cx, cy = rng.uniform(0, size, 2)
        t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        t = t / max(float(t.max()), 1e-6)
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif kind == "stripes":  # checkerboard instead of stripes
        cell = rng.uniform(0.06, 0.2) * size
        t = ((xx // cell) + (yy // cell)) % 2 == 0
        img = np.where(t[..., None], a, b)
    else:
        raise ValueError(f"unknown background {kind!r}; valid: {list(BACKGROUNDS)}")
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_pil(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, angle: float) -> None:
    def poly(points):
        t = np.radians(angle)
        c, s = np.cos(t), np.sin(t)
        draw.polygon([(x + c * px - s * py, y + s * px + c * py) for px, py in points], fill=255)

    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif shape == "ring":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        ri = 0.55 * r
        draw.ellipse([x - ri, y - ri, x + ri, y + ri], fill=0)
    elif shape == "square":
        h = 0.8 * r
        poly([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif shape == "diamond":
        poly([(0, -r), (0.75 * r, 0), (0, r), (-0.75 * r, 0)])
    elif shape == "triangle":
        poly([(0, -r), (r * np.cos(np.radians(30)), 0.5 * r), (-r * np.cos(np.radians(30)), 0.5 * r)])
    elif shape == "cross":
        a = 0.32 * r
        poly([(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)])
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")
