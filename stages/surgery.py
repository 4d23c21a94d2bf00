"""surgery: where in the image each label lives, as heatmaps, point prompts and optional SAM masks.

For every label of an image (from ``labels/<id>.json``) one map per method of
``surgery.methods`` (``pipeline/heatmaps/methods/``); by default the original's three, in its order:

* ``raw``: stock CLIP's tokens against the label's prompt-ensemble feature;
* ``surgery``: CLIP Surgery tokens with feature surgery over all of the image's
  labels (an image with a single label uses the single-text form instead, because
  feature surgery over one text is zero everywhere);
* ``single``: CLIP Surgery tokens at ``single_resolution`` with the empty string's
  feature as the redundant feature, one label at a time.

Points for SAM come from each label's map by the original's rule. The model is
loaded once per run, and SAM (``pipeline.sam``) too when ``sam.checkpoint`` is set. The maps
are computed by ``pipeline.heatmaps.compute``; this module reads and writes them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipeline.lazy import lazy_module
from pipeline.run.batching import writer_pool
from pipeline.run.config import ConfigError, require
from pipeline.heatmaps import method, names
from pipeline.heatmaps.compute import DrawnHeatmaps, HeatmapResult, compute_heatmaps, draw_heatmaps
from pipeline.heatmaps.draw import contact_sheet, label_slug, map_atlas
from pipeline.run.images import ImageError, ImageRef, load_image, normalize, to_tensor
from pipeline.run.rundir import atomic_write_bytes, atomic_write_json, read_output
from pipeline.sam import SamConfig, load_sam, sam_masks
from pipeline.run.stage import BAD_INPUT, RERUN, Finish, ItemResult, PerImageStage, StageContext

torch = lazy_module("torch")


@dataclass(frozen=True)
class SurgeryConfig:
    """Settings of the surgery stage (defaults are the original's)."""

    surgery_depth: int = 6  # last ViT blocks that run the dual path (surgery, gem); more than the model has = all
    methods: tuple[str, ...] = ("raw", "surgery", "single")  # the heatmap methods to map (docs/heatmap-methods.md)
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
        bad = [m for m in self.methods if m not in names()]
        require(not bad and len(self.methods) > 0,
                f"surgery.methods must be a non-empty subset of {list(names())}, got {list(self.methods)}")
        require(self.single_resolution >= 32, f"surgery.single_resolution must be >= 32, got {self.single_resolution}")
        require(self.naclip_sigma > 0, f"surgery.naclip_sigma must be > 0, got {self.naclip_sigma}")
        require(self.window_side >= 0, f"surgery.window_side must be >= 0 (0 = off), got {self.window_side}")
        require(self.max_labels >= 0, f"surgery.max_labels must be >= 0, got {self.max_labels}")
        require(0 < self.point_threshold <= 1, f"surgery.point_threshold must be in (0, 1], got {self.point_threshold}")
        require(self.point_downsample >= 1, f"surgery.point_downsample must be >= 1, got {self.point_downsample}")
        require(self.overlay_max_side >= 16, f"surgery.overlay_max_side must be >= 16, got {self.overlay_max_side}")
        require(self.batch_size >= 0, f"surgery.batch_size must be >= 0, got {self.batch_size}")


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
        vit_only = [m for m in cfg.methods if "resnet" not in method(m).backends]
        if vit_only and not ctx.models.clip.is_vit:
            raise ConfigError(f"surgery.methods: {vit_only[0]!r} has no ResNet form, and model {ctx.models.clip.name} is a "
                              f"ResNet; its methods are: {', '.join(names('resnet'))}")
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
                results[ref.id] = ItemResult(error=f"{ref.rel}: {why}", damaged={"decode": why},
                                             advice="the next run redoes decode, then surgery")
                continue
            try:
                pictures.append(load_image(ref.path, max_side=ctx.settings.max_side))
            except ImageError as err:
                results[ref.id] = ItemResult(error=f"{ref.rel}: {err}", advice=BAD_INPUT)
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
                own = any(method(m).input == "single" for m in cfg.methods)
                single = self._tensors(lm, pictures[a:b], cfg.single_resolution) if own else None
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
                return ItemResult(error=f"{ref.rel}: could not write the surgery outputs: {err}", advice=RERUN)

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
