"""A held-out renderer of toy scenes, written apart from ``pipeline.toy.world`` and never used in training.

It draws the toy world's six shapes in its six colours with other choices than either
of the package's renderers or the training augmentation:

* OpenCV's drawing primitives, each object either anti-aliased (``LINE_AA`` with
  sub-pixel coordinates) or aliased (``LINE_8``), chosen per object;
* rings and crosses drawn as strokes of their own widths (a ring's stroke 18-45 % of
  its radius and at least 2 px, a cross's bars 22-50 % of its length), triangles with apex angles of
  50-70 degrees, diamonds 0.5-0.85 as wide as tall, squares and circles as they are;
* colour values jittered in HSV around each name (hue up to 7 degrees, saturation
  down to 70 %, value 75-105 %);
* sizes from 0.13 to 0.50 of the image side, outside the training's 0.15-0.45 at both
  ends, and placements that may run up to a tenth of the object off the image;
* its own backgrounds (flat, uniform noise, two-colour bilinear gradients, stripes
  of drawn lines), box blur and JPEG at quality 30-90.

Use it through :func:`heldout_scenes`, which returns ``pipeline.toy.world.Scene``
objects so every toy measurement accepts them, or write a folder a run reads, with its COCO truth for ``eval``:
``python tests/benchmarks/heldout.py --out DIR --count 16 --seed 23 --objects 2``. Scene ``i`` of a seed is a pure
function of the seed and ``i``.
"""

from __future__ import annotations

import colorsys
import hashlib

import cv2
import numpy as np

from pipeline.toy.world import COLOURS, SHAPES, Scene, ToyObject, caption_for

SHIFT = 4  # OpenCV's fractional bits: coordinates in 1/16 pixel


def heldout_scenes(count: int, seed: int = 7, size: int = 64, objects: int = 1) -> list[Scene]:
    """``count`` scenes of ``objects`` objects each from this renderer."""
    return [_scene(_rng(seed, i), size, objects) for i in range(count)]


def _rng(seed: int, index: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"heldout-renderer:{seed}:{index}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def _jittered(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    r, g, b = (c / 255 for c in COLOURS[name])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    h = (h + rng.uniform(-7, 7) / 360) % 1.0
    s = s * rng.uniform(0.7, 1.0)
    v = min(1.0, v * rng.uniform(0.75, 1.05))
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = lambda: np.clip(rng.uniform(50, 205) + rng.normal(0, 10, 3), 0, 255)  # noqa: E731
    kind = rng.integers(4)
    if kind == 0:
        img = np.empty((size, size, 3), np.float32)
        img[:] = grey()
    elif kind == 1:
        img = grey() + rng.uniform(-30, 30, (size, size, 3))
    elif kind == 2:
        corners = np.stack([grey(), grey(), grey(), grey()]).reshape(2, 2, 3).astype(np.float32)
        img = cv2.resize(corners, (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        a, b = grey(), grey()
        img = np.empty((size, size, 3), np.float32)
        img[:] = a
        width = int(rng.integers(2, 7))
        step = width * 2 + int(rng.integers(0, 4))
        vertical = rng.random() < 0.5
        for p in range(-size, 2 * size, step):
            ends = ((p, 0), (p + size // 3, size)) if vertical else ((0, p), (size, p + size // 3))
            cv2.line(img, ends[0], ends[1], tuple(float(c) for c in b), width)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(layer: np.ndarray, shape: str, x: float, y: float, r: float, angle: float, aa: bool,
          rng: np.random.Generator) -> None:
    """Draw ``shape`` with value 255 into the single-channel ``layer``."""
    line = cv2.LINE_AA if aa else cv2.LINE_8
    f = 1 << SHIFT
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))

    def pt(px: float, py: float) -> tuple[int, int]:
        return int(round((x + c * px - s * py) * f)), int(round((y + s * px + c * py) * f))

    def poly(points: list[tuple[float, float]]) -> None:
        cv2.fillPoly(layer, [np.array([pt(*p) for p in points], np.int32)], 255, line, SHIFT)

    if shape == "circle":
        cv2.circle(layer, pt(0, 0), int(round(r * f)), 255, -1, line, SHIFT)
    elif shape == "ring":
        stroke = max(2, int(round(r * rng.uniform(0.18, 0.45))))  # at least 2 px, so a small ring stays visible
        cv2.circle(layer, pt(0, 0), int(round((r - stroke / 2) * f)), 255, stroke, line, SHIFT)
    elif shape == "square":
        h = r * 0.72
        poly([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif shape == "diamond":
        w = r * rng.uniform(0.5, 0.85)
        poly([(0, -r), (w, 0), (0, r), (-w, 0)])
    elif shape == "triangle":
        half = np.radians(rng.uniform(50, 70) / 2)  # apex angle
        height = 1.8 * r
        base = height * np.tan(half)
        poly([(0, -0.95 * r), (base, 0.85 * r), (-base, 0.85 * r)])
    elif shape == "cross":
        bar = max(2, int(round(2 * r * rng.uniform(0.22, 0.5))))
        for a, b in (((-r + bar / 2, 0), (r - bar / 2, 0)), ((0, -r + bar / 2), (0, r - bar / 2))):
            cv2.line(layer, pt(*a), pt(*b), 255, bar, line, SHIFT)
            # square ends: a line's caps are round, so fill the bar's end squares too
        for sx, sy in ((1, 0), (0, 1)):
            hb = bar / 2
            for sign in (-1, 1):
                cx, cy = sign * (r - hb) * sx, sign * (r - hb) * sy
                poly([(cx - hb, cy - hb), (cx + hb, cy - hb), (cx + hb, cy + hb), (cx - hb, cy + hb)])
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _scene(rng: np.random.Generator, size: int, count: int) -> Scene:
    img = _background(rng, size).astype(np.float32)
    placed: list[tuple[str, str, float, float, float, np.ndarray]] = []
    for _ in range(40):
        if len(placed) == count:
            break
        d = rng.uniform(0.13, 0.50) * size
        margin = -0.1 * d
        x, y = rng.uniform(d / 2 + margin, size - d / 2 - margin, 2)
        if any(np.hypot(x - px, y - py) < (d + pd) / 2 + 1 for _, _, px, py, pd, _ in placed):
            continue
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        layer = np.zeros((size, size), np.uint8)
        _draw(layer, shape, x, y, d / 2, rng.uniform(-20, 20), bool(rng.random() < 0.5), rng)
        alpha = layer.astype(np.float32)[..., None] / 255
        img = img * (1 - alpha) + np.array(_jittered(rng, colour), np.float32) * alpha
        placed.append((colour, shape, float(x), float(y), float(d), layer >= 128))
    masks = [p[5] for p in placed]
    for i in range(len(masks)):
        for later in masks[i + 1 :]:
            masks[i] = masks[i] & ~later
    out = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        k = int(rng.integers(2, 4))
        out = cv2.blur(out, (k, k))
    if rng.random() < 0.5:
        _, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 91))])
        out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    objects = tuple(ToyObject(colour=c, shape=s, center=(x, y), size=d, mask=m)
                    for (c, s, x, y, d, _), m in zip(placed, masks))
    return Scene(image=out, objects=objects, caption=caption_for(objects), background="heldout")


def main() -> None:
    """Write held-out scenes as a folder a run reads, with their truth for ``eval``."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipeline.toy.world import TRUTH_COCO, SceneSpec, coco_truth

    ap = argparse.ArgumentParser(description="Write held-out toy scenes and their COCO truth into a folder.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--seed", type=int, default=23, help="the stream (settings are chosen on 11, measured on 23)")
    ap.add_argument("--objects", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scenes = heldout_scenes(args.count, seed=args.seed, objects=args.objects)
    names = [f"scene_{i:04d}.png" for i in range(len(scenes))]
    for name, scene in zip(names, scenes):
        Image.fromarray(scene.image).save(args.out / name)
    (args.out / TRUTH_COCO).write_text(json.dumps(coco_truth(scenes, names, SceneSpec())))
    print(args.out / TRUTH_COCO)


if __name__ == "__main__":
    main()
