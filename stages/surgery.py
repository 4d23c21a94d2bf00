"""surgery: where in the image each label lives, as heatmaps, point prompts and optional SAM masks.

For every label of an image (from ``labels/<id>.json``) three maps, in the
original's order:

* ``raw``: stock CLIP's tokens against the label's prompt-ensemble feature;
* ``surgery``: CLIP Surgery tokens with feature surgery over all of the image's
  labels (an image with a single label uses the single-text form instead, because
  feature surgery over one text is zero everywhere);
* ``single``: CLIP Surgery tokens at ``single_resolution`` with the empty string's
  feature as the redundant feature, one label at a time.

Points for SAM come from each label's map by the original's rule. The model is
loaded once per run, and SAM (``pipeline.sam``) too when ``sam.checkpoint`` is set. See
``pipeline/surgery.py`` for the method and its paper.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ConfigError, require
from pipeline.heatmaps import (HEATMAP_METHODS, contact_sheet, fit_side, label_slug, map_atlas, map_to_points,
                               overlay_heatmap, upsample_map)
from pipeline.images import ImageError, ImageRef, load_image, normalize, to_tensor
from pipeline.rundir import atomic_write_bytes, atomic_write_json, read_output
from pipeline.sam import SamConfig, load_sam, sam_masks
from pipeline.stage import Finish, ItemResult, PerImageStage, StageContext
from pipeline.batching import writer_pool
from pipeline.adapter import input_resolution
from pipeline.maps import RESNET_METHODS, MethodTokens, encode_method_tokens
from pipeline.surgery import encode_image_tokens, feature_surgery, grid_shape, similarity_map

METHODS: tuple[str, ...] = tuple(HEATMAP_METHODS)

@dataclass(frozen=True)
class SurgeryConfig:
    """Settings of the surgery stage (defaults are the original's)."""

    surgery_depth: int = 6  # last ViT blocks that run the dual path (surgery, gem); more than the model has = all
    methods: tuple[str, ...] = ("raw", "surgery", "single")  # any of pipeline.heatmaps.HEATMAP_METHODS
    feature_surgery: Literal["multi", "single", "off"] = "multi"  # for methods other than raw, surgery and single
    naclip_sigma: float = 5.0  # NACLIP's and ResCLIP's neighbourhood, in patches
    resnet_surgery: Literal["official", "normalised"] = "official"  # the released code's plain v-v, or its unused branch
    window_side: int = 0  # > 0: resize to this side and average maps over native-size windows at half-window stride
    single_resolution: int = 512  # input side for the single-text maps
    max_labels: int = 0  # highest-scoring labels mapped per image; 0 = all
    points_from: Literal["single", "surgery", "raw"] = "single"  # the map that gives SAM its points
    point_threshold: float = 0.8  # SAM's positive points: cells at or above this (the original's rule)
    point_downsample: int = 2  # the map is pooled by this factor before points are picked (the original's rule)
    overlays: bool = True  # one PNG per label and method; off, the report draws every map from the one atlas per image
    contact_sheet: bool = True  # one PNG per image with every label's maps
    overlay_max_side: int = 512  # overlays are drawn on the image scaled to this side
    batch_size: int = 0  # images per forward; 0 = 32 on CUDA, 8 on CPU
    sam: SamConfig = field(default_factory=SamConfig)

    def __post_init__(self) -> None:
        require(self.surgery_depth >= 0, f"surgery.surgery_depth must be >= 0, got {self.surgery_depth}")
        bad = [m for m in self.methods if m not in METHODS]
        require(not bad and len(self.methods) > 0,
                f"surgery.methods must be a non-empty subset of {list(METHODS)}, got {list(self.methods)}")
        require(self.single_resolution >= 32, f"surgery.single_resolution must be >= 32, got {self.single_resolution}")
        require(self.naclip_sigma > 0, f"surgery.naclip_sigma must be > 0, got {self.naclip_sigma}")
        require(self.window_side >= 0, f"surgery.window_side must be >= 0 (0 = off), got {self.window_side}")
        require(self.max_labels >= 0, f"surgery.max_labels must be >= 0, got {self.max_labels}")
        require(0 < self.point_threshold <= 1, f"surgery.point_threshold must be in (0, 1], got {self.point_threshold}")
        require(self.point_downsample >= 1, f"surgery.point_downsample must be >= 1, got {self.point_downsample}")
        require(self.overlay_max_side >= 16, f"surgery.overlay_max_side must be >= 16, got {self.overlay_max_side}")
        require(self.batch_size >= 0, f"surgery.batch_size must be >= 0, got {self.batch_size}")


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


def _cosine(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[B, N, D] x [T, D] -> [B, N, T]`` plain cosine, as the raw CLIP maps use."""
    return F.normalize(tokens.float(), dim=-1) @ text.T


def compute_heatmaps(model: torch.nn.Module, images: torch.Tensor, single_images: torch.Tensor | None,
                     words: list[list[str]], vocab: list[str], text: torch.Tensor, empty: torch.Tensor,
                     image_sizes: list[tuple[int, int]], cfg: SurgeryConfig) -> list[HeatmapResult]:
    """Every label's maps for a batch of images, and the points for SAM.

    ``raw`` is plain cosine; ``surgery`` uses feature surgery over the image's labels (the
    single-text form for one label); ``single`` is single-text surgery at ``single_resolution``;
    every other method's tokens (``pipeline.maps``) go through ``cfg.feature_surgery``.

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP``, or its adapter.
        images: CLIP-normalised images at the model's resolution.
        single_images: the same images at ``cfg.single_resolution`` (needed for the ``single`` method).
        words: each image's labels; every one must be in ``vocab``.
        vocab: the words ``text`` holds, in order.
        text: unit prompt-ensemble features of ``vocab``.
        empty: the unit prompt-ensemble feature of ``""`` (the redundant feature).
        image_sizes: ``(H, W)`` of each image, for the points.
        cfg: the stage's settings.

    Shape:
        - images: :math:`(B, 3, R, R)`; single_images: :math:`(B, 3, S, S)`; text: :math:`(V, D)`.
    """
    index = {w: i for i, w in enumerate(vocab)}
    text, empty = text.float(), empty.float()
    native = tuple(m for m in cfg.methods if m != "single")
    resolution = input_resolution(getattr(model, "visual", model))
    windows = window_offsets(images.shape[-1], resolution) if cfg.window_side else [(0, 0)]
    if native:
        tiles = torch.cat([images[..., y : y + resolution, x : x + resolution] for y, x in windows]) if cfg.window_side else images
        base = encode_method_tokens(model, tiles, native, cfg.surgery_depth, cfg.naclip_sigma, cfg.resnet_surgery)
        if cfg.window_side:  # [W*B, N, D] window-major -> per image, its W windows
            n = len(windows)
            base = MethodTokens({m: t.view(n, len(words), *t.shape[1:]).transpose(0, 1).reshape(-1, *t.shape[1:])
                                 for m, t in base.tokens.items()}, base.grid)
    if "raw" in cfg.methods:
        raw_all = _cosine(base.tokens["raw"], text)  # [B (x windows), N, V]: one product for the whole batch
    if "single" in cfg.methods:
        single = encode_image_tokens(model, single_images, cfg.surgery_depth, cfg.resnet_surgery)
        single_all = feature_surgery(single.surgery, text, redundant=empty)  # [B, N, V]; columns are independent
    results = []
    for b, image_words in enumerate(words):
        rows = torch.tensor([index[w] for w in image_words], dtype=torch.long, device=text.device)
        redundant = None if len(image_words) >= 2 else empty  # one label: the single-text form
        sims = {}  # method -> ([1, N, T] similarities, grid)
        w = slice(b * len(windows), (b + 1) * len(windows))  # this image's windows (one without windows)
        for m in cfg.methods:
            if m == "single":
                sims[m] = single_all[b : b + 1, :, rows], single.grid
                continue
            if m == "raw":
                sim = raw_all[w, :, rows]
            elif m == "surgery" or cfg.feature_surgery == "multi":
                sim = feature_surgery(base.tokens[m][w], text[rows], redundant)
            elif cfg.feature_surgery == "single":
                sim = feature_surgery(base.tokens[m][w], text[rows], redundant=empty)
            else:
                sim = _cosine(base.tokens[m][w], text[rows])
            sims[m] = stitch_windows(sim, windows, base.grid, images.shape[-1], resolution) if cfg.window_side else (sim, base.grid)
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


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class SurgeryStage(PerImageStage[SurgeryConfig]):
    """Reads ``labels/<id>.json``; writes ``surgery/<id>.npz``, ``.json``, ``__sheet.png`` and ``surgery/<id>/`` overlays."""

    name = "surgery"
    needs = ("decode",)

    def prepare(self, ctx: StageContext[SurgeryConfig]) -> None:
        """Before any work: refuse a ViT-only method on a ResNet; load SAM once if configured, or fail clearly."""
        cfg = ctx.config
        vit_only = [m for m in cfg.methods if m not in (*RESNET_METHODS, "single")]
        if vit_only and not ctx.models.clip.is_vit:
            raise ConfigError(f"surgery.methods: {vit_only[0]!r} has no ResNet form, and model {ctx.models.clip.name} is a "
                              f"ResNet; its methods are: {', '.join((*RESNET_METHODS, 'single'))}")
        if cfg.sam.checkpoint and ctx.models.sam is None:
            ctx.models.sam = load_sam(cfg.sam, ctx.models.clip.device)
            ctx.log.info("loaded SAM %s from %s", cfg.sam.model_type, cfg.sam.checkpoint)

    def batch_size(self, ctx: StageContext[SurgeryConfig]) -> int:
        return ctx.batches.size(self.name, ctx.config.batch_size, cuda=32, cpu=8)

    def load(self, ctx: StageContext[SurgeryConfig], refs: list[ImageRef]) -> tuple:
        """Each image's labels and picture; the images that have none, with the reason."""
        cfg = ctx.config
        results: dict[str, ItemResult] = {}
        ok, pictures, words = [], [], []
        for ref in refs:
            labels, why = read_output(ctx.run.labels(ref.id), ctx.run.root)
            if not isinstance(labels, dict) or not isinstance(labels.get("labels"), list):
                why = why or f"labels/{ref.id}.json: not a labels file"
                results[ref.id] = ItemResult(error=f"{ref.rel}: {why}; the next run redoes decode, then surgery",
                                             damaged={"decode": why})
                continue
            try:
                pictures.append(load_image(ref.path, max_side=ctx.settings.max_side))
            except ImageError as err:
                results[ref.id] = ItemResult(error=f"{ref.rel}: {err}")
                continue
            ranked = sorted(labels["labels"], key=lambda d: d.get("rank", 0))
            words.append([d["word"] for d in ranked][: cfg.max_labels or None])
            ok.append(ref)
        return results, ok, pictures, words

    def process(self, ctx: StageContext[SurgeryConfig], refs: list[ImageRef], loaded: tuple) -> Finish:
        cfg, lm = ctx.config, ctx.models.clip
        results, ok, pictures, words = loaded
        images: list[np.ndarray] = []
        heatmaps: list[HeatmapResult] = []
        masks: list[list[np.ndarray | None]] = []
        if ok:
            vocab = list(dict.fromkeys(w for ws in words for w in ws))
            text = ctx.models.text_features(vocab)  # one pass for the batch's new words
            empty = ctx.models.text_features([""])[0]

            def run(a: int, b: int) -> list[HeatmapResult]:
                base = self._tensors(lm, pictures[a:b], cfg.window_side or lm.input_resolution)
                single = self._tensors(lm, pictures[a:b], cfg.single_resolution) if "single" in cfg.methods else None
                sizes = [(p.height, p.width) for p in pictures[a:b]]
                with torch.inference_mode():
                    return compute_heatmaps(lm.clip, base, single, words[a:b], vocab, text, empty, sizes, cfg)

            heatmaps = ctx.batches.run(self.name, run, len(ok))
            images = [np.asarray(p) for p in pictures]
            masks = [sam_masks(ctx.models.sam, image, hm.points) if ctx.models.sam is not None else [None] * len(hm.words)
                     for image, hm in zip(images, heatmaps)]  # SAM on the device, one image at a time

        def finish(i: int) -> ItemResult:
            ref, image, hm = ok[i], images[i], heatmaps[i]
            try:
                drawn = draw_heatmaps(image, hm, cfg.methods, cfg.overlay_max_side)
                return ItemResult(outputs=self._write(ctx, ref, image, hm, drawn, masks[i]))
            except OSError as err:
                return ItemResult(error=f"{ref.rel}: could not write the surgery outputs: {err}")

        def write() -> list[ItemResult]:  # the batch's images drawn and written side by side
            for ref, result in zip(ok, writer_pool().map(finish, range(len(ok)))):
                results[ref.id] = result
            return [results[r.id] for r in refs]

        return write

    @staticmethod
    def _tensors(lm, pictures: list[Image.Image], resolution: int) -> torch.Tensor:
        batch = torch.stack([to_tensor(p, resolution) for p in pictures])
        return normalize(batch.to(lm.device)).to(lm.dtype)

    @staticmethod
    def _write(ctx: StageContext[SurgeryConfig], ref: ImageRef, image: np.ndarray, hm: HeatmapResult,
               drawn: DrawnHeatmaps, masks: list[np.ndarray | None]) -> list[str]:
        cfg, run = ctx.config, ctx.run
        outputs: list[str] = []
        entries, sheet_rows = [], []
        for t, word in enumerate(hm.words):
            slug = label_slug(word)
            entry: dict[str, Any] = {"word": word, "slug": slug, "overlays": {},
                                     "points": hm.points[t][0], "point_labels": hm.points[t][1], "peak": drawn.peaks[t],
                                     "range": {m: list(r[t]) for m, r in hm.ranges.items()}}
            if cfg.overlays:
                for m in cfg.methods:
                    path = run.overlay(ref.id, slug, m)
                    atomic_write_bytes(path, _png(drawn.overlays[t][m]))
                    entry["overlays"][m] = run.rel(path)
                    outputs.append(run.rel(path))
            if masks[t] is not None:
                path = run.mask(ref.id, slug)
                atomic_write_bytes(path, _png(masks[t].astype(np.uint8) * 255))
                entry["mask"] = run.rel(path)
                outputs.append(run.rel(path))
            entries.append(entry)
            sheet_rows.append((word, [drawn.overlays[t][m] for m in cfg.methods]))
        atlas, cell, grids = map_atlas({m: hm.maps[m] for m in cfg.methods})
        atlas_path = run.atlas(ref.id)
        atomic_write_bytes(atlas_path, _png(atlas))
        outputs.append(run.rel(atlas_path))
        arrays = {f"{m}/{w}": hm.maps[m][t].astype(np.float16) for m in cfg.methods for t, w in enumerate(hm.words)}
        arrays["image_size"] = np.asarray(image.shape[:2], dtype=np.int32)
        npz = run.maps(ref.id)
        atomic_write_bytes(npz, _npz(arrays))
        outputs.insert(0, run.rel(npz))
        doc: dict[str, Any] = {"image": ref.id, "size": [int(image.shape[1]), int(image.shape[0])],
                               "methods": list(cfg.methods), "points_from": cfg.points_from,
                               "surgery_depth": cfg.surgery_depth, "labels": entries,
                               "atlas": {"path": run.rel(atlas_path), "cell": list(cell), "grids": grids}}
        if cfg.contact_sheet:
            sheet = run.sheet(ref.id)
            atomic_write_bytes(sheet, _png(contact_sheet(drawn.display, sheet_rows, list(cfg.methods))))
            doc["sheet"] = run.rel(sheet)
            outputs.insert(1, run.rel(sheet))
        meta = run.heatmaps(ref.id)
        atomic_write_json(meta, doc)
        outputs.insert(0, run.rel(meta))
        return outputs
