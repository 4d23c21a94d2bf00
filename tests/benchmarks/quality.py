"""Quality benchmark on held-out toy scenes; prints JSON. Not part of the default test run.

    python tests/benchmarks/quality.py [--model toy] [--scenes 500] [--ascent 0] [--preset classic]
                                       [--bank 256 64] [--seeds 0 1] [--localization 200]

* zero-shot accuracy (36-way, colour, shape) on training-style scenes, the alt renderer's, the
  varied renderer's (the training augmentation), and ``heldout.py``'s, which no training sees;
* with ``--ascent N``: recall of the true colour and shape word among the decode labels
  of N single-object scenes, with the original's ascent settings, for each of ``--methods``
  (gumbel and pez), each ``--bank`` size and each of ``--seeds`` (a second seed is the
  control for how much recall moves by chance alone);
* with ``--localization N``: pointing game, score contrast and mIoU of each heatmap method
  (raw CLIP, surgery over the scene's labels, single-text surgery) on N held-out
  two-object scenes, for each object's shape word and colour word, with the scene's
  shape words (or all its words) as the label set; and the pointing ceiling, the
  score of an ideal map at the model's grid (and at twice its resolution).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipeline.model.load import load_model, resolve_device  # noqa: E402
from heldout import heldout_scenes  # noqa: E402  (beside this script)
from toyeval import ascent_recall, evaluate_localization, held_out_scenes, pointing_ceiling  # noqa: E402  (beside this script)
from pipeline.toy.train import held_out_single_objects, zero_shot_accuracy  # noqa: E402
from stages import PRESETS  # noqa: E402
from stages.ascend import AscentConfig  # noqa: E402
from stages.surgery import SurgeryConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--ascent", type=int, default=0, help="single-object scenes for the ascent recall (0 = skip)")
    ap.add_argument("--iterations", type=int, default=None, help="ascent iterations (default: the preset's)")
    ap.add_argument("--preset", default="classic", choices=list(PRESETS), help="the run preset whose ascent settings to use")
    ap.add_argument("--methods", nargs="+", default=["gumbel", "pez"], choices=["gumbel", "pez"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bank", type=int, nargs="+", default=[None],
                    help="ascend.bank_size values to compare (default: the preset's); views stay at most the bank")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="ascent seeds; a second seed measures how much recall moves by chance alone")
    ap.add_argument("--localization", type=int, default=0, help="two-object scenes for the heatmap measures (0 = skip)")
    ap.add_argument("--depth", type=int, nargs="+", default=[2], help="surgery depths to compare")
    ap.add_argument("--single-resolution", type=int, default=64)
    ap.add_argument("--maps", nargs="+", default=["raw", "surgery", "single"],
                    help="heatmap methods to score (any of pipeline.heatmaps.names())")
    ap.add_argument("--feature-surgery", default="multi", choices=["multi", "single", "off"],
                    help="feature surgery for the methods beyond raw, surgery and single")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="toy", help="'toy' (the shipped checkpoint) or a toy checkpoint's path, e.g. from 'toy train'")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    lm = load_model(args.model, dev)
    out: dict = {"model": args.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    with torch.no_grad():
        out["zero_shot"] = {style: zero_shot_accuracy(lm.model, held_out_single_objects(args.scenes, style), dev)
                            for style in ("train", "alt", "varied")}
        out["zero_shot"]["heldout_renderer"] = zero_shot_accuracy(lm.model, heldout_scenes(args.scenes), dev)
    out["zero_shot"]["scenes"] = args.scenes
    if args.ascent:
        scenes = held_out_single_objects(args.ascent)
        out["ascent_recall"] = []
        for method, bank, seed in itertools.product(args.methods, args.bank, args.seeds):
            settings = {**PRESETS[args.preset].get("ascend", {}), "method": method}
            if args.iterations is not None:
                settings["iterations"] = args.iterations
            if bank is not None:
                settings["bank_size"] = bank
                settings["views"] = min(bank, AscentConfig(**settings).views)
            cfg = AscentConfig(**settings)
            t = time.time()
            recall = ascent_recall(lm, scenes, cfg, args.batch, seed)
            out["ascent_recall"].append({"scenes": len(scenes), "preset": args.preset, "iterations": cfg.iterations,
                                         "candidates": cfg.candidates, "bank_size": cfg.bank_size, "views": cfg.views,
                                         "seed": seed, "method": method, **recall,
                                         "seconds_per_image": round((time.time() - t) / len(scenes), 3)})
    if args.localization:
        scenes = held_out_scenes(args.localization, objects=2)
        rows = []
        for depth in args.depth:
            cfg = SurgeryConfig(surgery_depth=depth, single_resolution=args.single_resolution, methods=tuple(args.maps),
                                feature_surgery=args.feature_surgery)
            for texts in ("shapes", "words"):
                for word in ("shape", "colour"):
                    if texts == "shapes" and word == "colour":
                        continue
                    rows.append({"surgery_depth": depth, "single_resolution": args.single_resolution, "labels": texts,
                                 "feature_surgery": args.feature_surgery,
                                 "map_of": word, **evaluate_localization(lm, scenes, cfg, word=word, texts=texts)})
        grid = lm.input_resolution // lm.model.visual.conv1.stride[0]
        out["localization"] = {"scenes": len(scenes), "objects_per_scene": 2, "target": "surgery pointing >= 0.85 "
                               "for shape words", "results": rows,
                               "pointing_ceiling": {f"{g}x{g}": pointing_ceiling(scenes, g) for g in (grid, 2 * grid)}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
