"""A batch's heatmaps: every requested method's maps, optional windows, and the points for SAM.

``compute_heatmaps`` runs the block runner once for the methods on the native input and once
for those on their own input (``single``), then turns each method's tokens into per-label
similarities by the method's own rule and into maps in [0, 1]. ``draw_heatmaps`` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipeline.lazy import lazy_module
from pipeline.model.adapter import input_resolution
from pipeline.heatmaps.blocks import MethodTokens, encode_method_tokens
from pipeline.heatmaps.draw import fit_side, map_to_points, overlay_heatmap, upsample_map
from pipeline.heatmaps.registry import method
from pipeline.heatmaps.similarity import grid_shape, similarity_map

torch = lazy_module("torch")


class HeatmapSettings(Protocol):
    """What ``compute_heatmaps`` reads (the surgery stage's config has these keys)."""

    methods: tuple[str, ...]
    surgery_depth: int
    naclip_sigma: float
    resnet_surgery: str
    feature_surgery: str
    window_side: int
    points_from: str
    point_threshold: float
    point_downsample: int


@dataclass
class HeatmapResult:
    """One image's maps: ``maps[method]`` is ``[T, gh, gw]`` in [0, 1], one row per word."""

    words: list[str]
    maps: dict[str, np.ndarray]
    points: list[tuple[list[list[int]], list[int]]]  # per word: [x, y] points and labels (1 positive, 0 negative)
    # per method, per word: the (lowest, highest) patch similarity that the map's 0 and 1 stand for, so a
    # reader can put every word of an image on one scale
    ranges: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


@dataclass
class DrawnHeatmaps:
    """One image's maps drawn for people: ``overlays[t][method]`` over ``display``, and each map's peak."""

    display: np.ndarray  # [h, w, 3] uint8: the image scaled to ``overlay_max_side``
    overlays: list[dict[str, np.ndarray]]  # per word, per method: [h, w, 3] uint8
    peaks: list[dict[str, list[float]]]  # per word, per method: the argmax cell's centre as (x, y) fractions


def compute_heatmaps(model: torch.nn.Module, images: torch.Tensor, single_images: torch.Tensor | None,
                     words: list[list[str]], vocab: list[str], text: torch.Tensor, empty: torch.Tensor,
                     image_sizes: list[tuple[int, int]], cfg: HeatmapSettings) -> list[HeatmapResult]:
    """Every label's maps for a batch of images, and the points for SAM.

    Each method's tokens (``pipeline.heatmaps.blocks``) become similarities by the method's own
    rule (``HeatmapMethod.similarity``: ``raw`` plain cosine, ``surgery`` feature surgery over the
    image's labels, ``single`` the single-text form, the others ``cfg.feature_surgery``).

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP``, or its adapter.
        images: CLIP-normalised images at the model's resolution (or ``cfg.window_side``).
        single_images: the same images at the ``single`` input's resolution (needed for such methods).
        words: each image's labels; every one must be in ``vocab``.
        vocab: the words ``text`` holds, in order.
        text: unit prompt-ensemble features of ``vocab``.
        empty: the unit prompt-ensemble feature of ``""`` (the redundant feature).
        image_sizes: ``(H, W)`` of each image, for the points.
        cfg: the settings (the surgery stage's config).

    Shape:
        - images: :math:`(B, 3, R, R)`; single_images: :math:`(B, 3, S, S)`; text: :math:`(V, D)`.
    """
    index = {w: i for i, w in enumerate(vocab)}
    text, empty = text.float(), empty.float()
    chosen = [method(m) for m in cfg.methods]
    native = tuple(m.name for m in chosen if m.input == "native")
    own = [m for m in chosen if m.input != "native"]
    resolution = input_resolution(getattr(model, "visual", model))
    windows = window_offsets(images.shape[-1], resolution) if cfg.window_side else [(0, 0)]
    settings = (cfg.surgery_depth, cfg.naclip_sigma, cfg.resnet_surgery)
    tokens, grids = {}, {}
    if native:
        tiles = torch.cat([images[..., y : y + resolution, x : x + resolution] for y, x in windows]) if cfg.window_side else images
        base = encode_method_tokens(model, tiles, native, *settings)
        if cfg.window_side:  # [W*B, N, D] window-major -> per image, its W windows
            n = len(windows)
            base = MethodTokens({m: t.view(n, len(words), *t.shape[1:]).transpose(0, 1).reshape(-1, *t.shape[1:])
                                 for m, t in base.tokens.items()}, base.grid)
        tokens.update(base.tokens)
        grids.update(dict.fromkeys(native, base.grid))
    if own:
        sources = tuple(dict.fromkeys(m.source for m in own))
        theirs = encode_method_tokens(model, single_images, sources, *settings)
        tokens.update({m.name: theirs.tokens[m.source] for m in own})
        grids.update({m.name: theirs.grid for m in own})
    results = []
    for b, image_words in enumerate(words):
        rows = torch.tensor([index[w] for w in image_words], dtype=torch.long, device=text.device)
        sims = {}  # method -> ([1, N, T] similarities, grid)
        for m in chosen:
            windowed = cfg.window_side and m.input == "native"
            w = slice(b * len(windows), (b + 1) * len(windows)) if windowed else slice(b, b + 1)
            sim = m.similarity(tokens[m.name][w], text[rows], empty, cfg.feature_surgery)
            sims[m.name] = stitch_windows(sim, windows, grids[m.name], images.shape[-1], resolution) if windowed else (sim, grids[m.name])
        maps = {m: similarity_map(sim, grid, grid)[0].permute(2, 0, 1).cpu().numpy() for m, (sim, grid) in sims.items()}
        ranges = {m: _patch_ranges(sim, grid) for m, (sim, grid) in sims.items()}
        source = maps[cfg.points_from] if cfg.points_from in maps else maps[cfg.methods[0]]  # [T, gh, gw]
        points = [map_to_points(torch.from_numpy(m), image_sizes[b], cfg.point_threshold, cfg.point_downsample)
                  for m in source]
        results.append(HeatmapResult(words=list(image_words), maps=maps, points=points, ranges=ranges))
    return results


def _patch_ranges(sim: torch.Tensor, grid: tuple[int, int]) -> list[tuple[float, float]]:
    """Per text, the lowest and highest patch similarity (the class token left out), as ``similarity_map`` scales."""
    _, _, has_cls = grid_shape(sim.shape[1], grid)
    patches = sim[0, 1:] if has_cls else sim[0]  # [gh*gw, T]
    return [(round(float(lo), 5), round(float(hi), 5)) for lo, hi in zip(patches.amin(0), patches.amax(0))]


def window_offsets(side: int, window: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of ``window``-sized windows over a ``side``-sized square at half-window stride,
    the last flush with the edge; one window when the image is no larger."""
    if side <= window:
        return [(0, 0)]
    starts = list(range(0, side - window + 1, max(1, window // 2)))
    if starts[-1] != side - window:
        starts.append(side - window)
    return [(y, x) for y in starts for x in starts]


def stitch_windows(sim: torch.Tensor, windows: list[tuple[int, int]], grid: tuple[int, int], side: int, window: int
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
    r"""Per-window patch similarities averaged into one grid over the whole image.

    Shape:
        - sim: :math:`(W, 1 + gh \cdot gw, T)`, one row block per window of ``windows``.
        - Output: :math:`(1, GH \cdot GW, T)` patches only, and ``(GH, GW)``.
    """
    gh, gw = grid
    patch = min(window, side) // gw  # pixels per grid cell
    big = (side // patch, side // patch)
    total = sim.new_zeros(big[0], big[1], sim.shape[-1])
    count = sim.new_zeros(big[0], big[1], 1)
    for (y, x), s in zip(windows, sim[:, 1:].reshape(len(windows), gh, gw, -1)):
        total[y // patch : y // patch + gh, x // patch : x // patch + gw] += s
        count[y // patch : y // patch + gh, x // patch : x // patch + gw] += 1
    return (total / count.clamp_min(1)).reshape(1, -1, sim.shape[-1]), big


def draw_heatmaps(image: np.ndarray, hm: HeatmapResult, methods: tuple[str, ...], max_side: int) -> DrawnHeatmaps:
    """Each of ``methods``' maps upsampled and drawn over the image scaled to ``max_side``, and each map's peak.

    Shape:
        - image: :math:`(H, W, 3)` RGB uint8.
    """
    display = fit_side(image, max_side)
    overlays, peaks = [], []
    for t in range(len(hm.words)):
        drawn, peak = {}, {}
        for m in methods:
            maps = hm.maps[m]
            drawn[m] = overlay_heatmap(display, upsample_map(maps[t], display.shape[:2]))
            gh, gw = maps[t].shape
            at = int(np.argmax(maps[t]))
            peak[m] = [round((at % gw + 0.5) / gw, 4), round((at // gw + 0.5) / gh, 4)]
        overlays.append(drawn)
        peaks.append(peak)
    return DrawnHeatmaps(display, overlays, peaks)
