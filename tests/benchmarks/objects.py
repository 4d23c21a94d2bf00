"""Every object in the picture: recall of the true words by the number of objects in a scene; prints JSON.

    python tests/benchmarks/objects.py [--model toy] [--scenes 16] [--objects 1 2 3 4]
                                       [--discover whole regions tiles explain] [--seed 23] [--out FILE]

Scenes come from ``heldout.py``'s renderer, which no training and no tuning of this
project's settings ever saw (the discovery rules were chosen on its seed 11; this
script's default stream is seed 23). Each ``--discover`` setting runs the stages'
own cores, ascend (``discover_opinions``) then decode (``view_features``,
``label_opinions``), at the demo config's settings: the fast preset, decode's defaults,
four images a batch. For each setting and object count:

* recall of the scene's true shape words and, apart, of its colour words (a scene's
  recall is the share of its distinct true words among its labels);
* precision: the share of labels that are one of the scene's true words;
* labels per image;
* seconds per image of ascend + decode, and the ratio to ``whole`` (the original's
  single ascent) measured in the same run.

The closed-vocabulary oracle is the ceiling to compare with: the same model's
whole-image feature scored against the prompt ensembles of the 6 shape and 6 colour
words, keeping the top k of each with k the scene's true count of distinct words.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from heldout import heldout_scenes  # noqa: E402  (beside this script)
from jsonout import emit  # noqa: E402  (beside this script)
from pipeline.model.encode import encode_images, view_features  # noqa: E402
from pipeline.model.load import load_model, resolve_device  # noqa: E402
from pipeline.model.prompts import prompt_ensemble  # noqa: E402
from pipeline.run.images import to_tensor  # noqa: E402
from pipeline.toy.world import COLOURS, SHAPES  # noqa: E402
from stages import PRESETS  # noqa: E402
from stages.ascend import AscentConfig, discover_opinions, image_seed  # noqa: E402
from stages.decode import DecodeConfig, label_opinions  # noqa: E402

BATCH = 4  # configs/demo.yaml's ascend.batch_size


def scene_scores(scenes, labels: list[set[str]]) -> dict:
    """Shape and colour recall, precision and labels per image of ``labels`` against the scenes' truth."""
    shape = colour = hits = count = 0.0
    for s, words in zip(scenes, labels):
        shapes, colours = {o.shape for o in s.objects}, {o.colour for o in s.objects}
        shape += len(words & shapes) / len(shapes)
        colour += len(words & colours) / len(colours)
        hits += len(words & (shapes | colours))
        count += len(words)
    n = len(scenes)
    return {"shape_recall": round(shape / n, 4), "colour_recall": round(colour / n, 4),
            "precision": round(hits / count, 4) if count else None, "labels_per_image": round(count / n, 2)}


def oracle(lm, scenes, imgs: torch.Tensor, cache: dict) -> dict:
    """Recall of the whole-image top-k over the 6 shapes and the 6 colours, k the scene's true count."""
    with torch.no_grad():
        feats = encode_images(lm, imgs)
        shape_text, colour_text = prompt_ensemble(lm.model, list(SHAPES), cache), prompt_ensemble(lm.model, list(COLOURS), cache)
    picked = []
    for s, f in zip(scenes, feats):
        k_s, k_c = len({o.shape for o in s.objects}), len({o.colour for o in s.objects})
        top_s = (shape_text @ f).topk(k_s).indices.tolist()
        top_c = (colour_text @ f).topk(k_c).indices.tolist()
        picked.append({SHAPES[i] for i in top_s} | {list(COLOURS)[i] for i in top_c})
    out = scene_scores(scenes, picked)
    return {k: out[k] for k in ("shape_recall", "colour_recall")}


def run_setting(lm, imgs: torch.Tensor, cfg: AscentConfig, decode: DecodeConfig, seed: int, cache: dict
                ) -> tuple[list[set[str]], float]:
    """ascend then decode on every image, in batches of ``BATCH``; the labels and the seconds per image."""
    text = lambda ws: prompt_ensemble(lm.model, ws, cache)  # noqa: E731
    labels: list[set[str]] = []
    t = time.time()
    for start in range(0, len(imgs), BATCH):
        x = imgs[start : start + BATCH]
        seeds = [image_seed(seed, f"scene-{start + i}") for i in range(len(x))]
        ops = discover_opinions(lm, x, seeds, cfg)
        docs = [{"words": op.words, "candidates": op.candidates, "checkins": op.checkins, "views": op.views,
                 "settings": {}} for op in ops]
        with torch.no_grad():
            feats = view_features(lm, x, [op.views for op in ops])
            for lab in label_opinions(docs, feats, text, decode):
                labels.append({d["word"] for d in lab.labels})
    return labels, (time.time() - t) / len(imgs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=16, help="scenes per object count")
    ap.add_argument("--objects", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--discover", nargs="+", default=["whole", "regions", "tiles", "explain"],
                    choices=["whole", "regions", "tiles", "explain"])
    ap.add_argument("--seed", type=int, default=23, help="the held-out renderer's stream (settings were chosen on 11)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model(args.model, resolve_device(args.device))
    fast = replace(AscentConfig(), **PRESETS["fast"]["ascend"])
    out: dict = {"model": args.model, "device": str(lm.device), "preset": "fast", "scene_seed": args.seed,
                 "scenes_per_count": args.scenes, "batch": BATCH, "settings": {}, "by_objects": {}}
    for d in args.discover:
        cfg = replace(fast, discover=d)
        out["settings"][d] = {k: getattr(cfg, k) for k in ("discover", "iterations", "candidates", "regions", "tiles",
                                                             "tile_size", "tile_candidates", "tile_bank", "rounds")}
    cache: dict = {}
    discover_opinions(lm, torch.rand(1, 3, lm.input_resolution, lm.input_resolution),
                      [0], replace(fast, iterations=2, bank_size=8, views=8))  # warm-up
    for n in args.objects:
        scenes = heldout_scenes(args.scenes, seed=args.seed, objects=n)
        imgs = torch.stack([to_tensor(Image.fromarray(s.image), lm.input_resolution) for s in scenes])
        row: dict = {"oracle": oracle(lm, scenes, imgs, cache)}
        for d in args.discover:
            labels, seconds = run_setting(lm, imgs, replace(fast, discover=d), DecodeConfig(), args.seed, cache)
            row[d] = {**scene_scores(scenes, labels), "seconds_per_image": round(seconds, 3)}
        if "whole" in row:
            for d in args.discover:
                row[d]["cost_vs_whole"] = round(row[d]["seconds_per_image"] / row["whole"]["seconds_per_image"], 3)
        out["by_objects"][str(n)] = row
        emit(out, args.out, show=False)  # the figures so far
    emit(out, args.out)


if __name__ == "__main__":
    main()
