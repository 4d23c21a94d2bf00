"""Quality on held-out toy scenes, where the truth is known: ascent recall and heatmap localisation.

Shared by the benchmarks beside it and by the tests. It sits on top of the stages'
cores (``extract_opinions``, ``compute_heatmaps``), so it lives here, not in the library.

Ascent recall is the share of single-object scenes whose decode labels contain the
true colour word (and the true shape word).

Localisation quality of the heatmaps uses the scenes' true masks.

Three measures per object and map, averaged over objects:

* pointing game: the map's argmax falls inside the object;
* score contrast: mean heat inside the object minus mean heat outside it;
* IoU of the map thresholded at 0.5 with the object's mask (mIoU when averaged).

Each object is scored on the map of its own shape word (or colour word), computed
by the surgery stage's own core, ``compute_heatmaps``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from PIL import Image

from pipeline.heatmaps.draw import upsample_map
from pipeline.run.images import normalize, to_tensor
from pipeline.model.load import LoadedModel
from pipeline.model.prompts import prompt_ensemble
from pipeline.toy.train import HELD_OUT_SEED
from pipeline.toy.world import Scene, SceneSpec, make_scene, scene_rng
from stages.ascend import AscentConfig, extract_opinions
from stages.decode import DecodeConfig, decode_labels
from pipeline.heatmaps.compute import compute_heatmaps
from stages.surgery import SurgeryConfig

MULTI_OBJECT_SEED = HELD_OUT_SEED + 2  # a held-out stream of its own; training never draws from it


def ascent_recall(lm: LoadedModel, scenes: list[Scene], cfg: AscentConfig, batch: int = 8,
                  seed: int = 0) -> dict[str, float]:
    """Recall of the true colour and shape words among the decode labels of single-object scenes.

    Scene ``i``'s ascent runs with seed ``seed * 1_000_000 + i``: another ``seed`` is the control
    for how much recall moves with the random streams alone.
    """
    hits_c = hits_s = 0
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        imgs = torch.stack([to_tensor(Image.fromarray(s.image), lm.input_resolution) for s in chunk])
        ops = extract_opinions(lm, imgs, [seed * 1_000_000 + i for i in range(start, start + len(chunk))], cfg)
        for s, op in zip(chunk, ops):
            labels = {d["word"] for d in decode_labels(op.words, DecodeConfig())}
            colour, shape = s.objects[0].words
            hits_c += colour in labels
            hits_s += shape in labels
    return {"colour": round(hits_c / len(scenes), 4), "shape": round(hits_s / len(scenes), 4)}


def held_out_scenes(count: int, objects: int = 2, style: str = "train", size: int = 64) -> list[Scene]:
    """``count`` held-out scenes with exactly ``objects`` objects, all of different shapes.

    Distinct shapes make "the map of this object's shape word" unambiguous.
    """
    spec = SceneSpec(size=size, min_objects=objects, max_objects=objects, style=style)  # type: ignore[arg-type]
    scenes, i = [], 0
    while len(scenes) < count:
        scene = make_scene(scene_rng(MULTI_OBJECT_SEED, i, spec.style), spec)
        i += 1
        shapes = [o.shape for o in scene.objects]
        if len(shapes) == objects and len(set(shapes)) == objects:
            scenes.append(scene)
    return scenes


def mask_auroc(heat: np.ndarray, mask: np.ndarray) -> float:
    """The chance that a random pixel of the object scores above a random pixel outside it (ties count half)."""
    pos, neg = int(mask.sum()), int((~mask).sum())
    if not pos or not neg:
        return 0.5
    _, inverse, counts = np.unique(heat.ravel(), return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (starts + (counts + 1) / 2)[inverse]  # average 1-based ranks, ties shared
    return float((ranks[mask.ravel()].sum() - pos * (pos + 1) / 2) / (pos * neg))


def localization_scores(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Pointing hit, score contrast, IoU at 0.5, mask AUROC and the share of map mass inside one object's mask.

    Shape:
        - heat: :math:`(H, W)` in [0, 1]; mask: :math:`(H, W)` bool.
    """
    inside = heat[mask].mean() if mask.any() else 0.0
    outside = heat[~mask].mean() if (~mask).any() else 0.0
    pred = heat >= 0.5
    union = np.logical_or(pred, mask).sum()
    total = heat.sum()
    return {"pointing": float(mask.flat[int(np.argmax(heat))]),
            "contrast": float(inside - outside),
            "iou": float(np.logical_and(pred, mask).sum() / union) if union else 0.0,
            "auroc": mask_auroc(heat, mask),
            "mass": float(heat[mask].sum() / total) if total > 0 else 0.0}


def pointing_ceiling(scenes: list[Scene], grid: int) -> float:
    """The pointing game of an ideal ``grid`` x ``grid`` map: each cell holds the share of it the object covers.

    Maps live at grid resolution and are upsampled bilinearly, so a small or thin
    object can lose the pointing game even on a perfect map. This is the most any
    method at that grid can score on ``scenes``.
    """
    hits = objects = 0
    for s in scenes:
        for o in s.objects:
            mask = torch.from_numpy(o.mask.astype(np.float32))[None, None]
            ideal = torch.nn.functional.adaptive_avg_pool2d(mask, grid)[0, 0].numpy()
            hits += localization_scores(upsample_map(ideal, o.mask.shape), o.mask)["pointing"]
            objects += 1
    return round(hits / objects, 4)


def scene_heatmaps(lm: LoadedModel, scenes: list[Scene], words: list[list[str]], vocab: list[str], text: torch.Tensor,
                   empty: torch.Tensor, cfg: SurgeryConfig) -> list:
    """The surgery stage's core, ``compute_heatmaps``, on a batch of scenes with the given words as their labels."""
    def batch(resolution: int) -> torch.Tensor:
        x = torch.stack([to_tensor(Image.fromarray(s.image), resolution) for s in scenes]).to(lm.device)
        return normalize(x).to(lm.dtype)

    single = batch(cfg.single_resolution) if "single" in cfg.methods else None
    return compute_heatmaps(lm.model, batch(lm.input_resolution), single, words, vocab, text, empty,
                            [s.image.shape[:2] for s in scenes], cfg)


@torch.inference_mode()  # the library's cores leave the grad mode to their callers
def evaluate_localization(lm: LoadedModel, scenes: list[Scene], cfg: SurgeryConfig = SurgeryConfig(),
                          word: Literal["shape", "colour"] = "shape",
                          texts: Literal["shapes", "words"] = "shapes") -> dict[str, dict[str, float]]:
    """Mean localisation scores per method over every object of ``scenes``.

    Args:
        lm: the model (the shipped toy CLIP).
        scenes: toy scenes with their masks.
        cfg: the surgery settings (methods, depth, single-text resolution).
        word: which of an object's words its map is for.
        texts: the label set of a scene: its shape words, or all its colour and shape words.
    """
    cfg = replace(cfg, points_from=cfg.methods[0])
    per_scene = []
    for s in scenes:
        ws = [o.shape for o in s.objects] if texts == "shapes" else [w for o in s.objects for w in o.words]
        per_scene.append(list(dict.fromkeys(ws)))
    vocab = sorted({w for ws in per_scene for w in ws})
    text = prompt_ensemble(lm.model, vocab)
    empty = prompt_ensemble(lm.model, [""])[0]
    totals: dict[str, dict[str, float]] = {m: dict.fromkeys(("pointing", "contrast", "iou", "auroc", "mass"), 0.0)
                                           for m in cfg.methods}
    objects = 0
    for start in range(0, len(scenes), 32):
        chunk = scenes[start : start + 32]
        results = scene_heatmaps(lm, chunk, per_scene[start : start + 32], vocab, text, empty, cfg)
        for s, ws, res in zip(chunk, per_scene[start : start + 32], results):
            size = s.image.shape[:2]
            for o in s.objects:
                t = ws.index(o.shape if word == "shape" else o.colour)
                objects += 1
                for m in cfg.methods:
                    heat = upsample_map(res.maps[m][t], size)
                    for k, v in localization_scores(heat, o.mask).items():
                        totals[m][k] += v
    return {m: {"pointing": round(v["pointing"] / objects, 4), "contrast": round(v["contrast"] / objects, 4),
                "miou": round(v["iou"] / objects, 4), "auroc": round(v["auroc"] / objects, 4),
                "mass_inside": round(v["mass"] / objects, 4), "objects": objects} for m, v in totals.items()}

