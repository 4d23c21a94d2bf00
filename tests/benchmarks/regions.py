"""Regions from heatmaps on held-out toy scenes: pointing, CorLoc, MaxBoxAccV2 and mask mIoU per method and
refiner; prints JSON.

    python tests/benchmarks/regions.py [--scenes 200] [--depth 3] [--style heldout] [--refine none pamr guided]

Each scene has two objects of different shapes; its labels are its true colour and shape
words, so this measures localisation given the word (what ``export`` does with CLIP's
labels). The scenes are split in two. For each method and refiner, tau is chosen on the
first half (the best CorLoc of the largest component's box, as the export draws it) and
CorLoc and mask mIoU are measured with that tau on the second half; MaxBoxAccV2 (every
component's box, at its own best tau) is the second half's. ``default`` is the export's
default settings (``export.region_method``, ``tau``, ``refine``) on the second half, its
regions made as the export makes them. The metrics are the ones ``runall.py eval``
computes (``pipeline.labels.evaluation``); boxes and masks come from ``pipeline.labels.regions``.

Style ``heldout`` draws the scenes with ``heldout.py``'s renderer, which no training saw, from its stream 23
(PAMR's iterations and dilations, and the guided filter's radius and eps, were chosen on the toy's alt style and
this renderer's stream 11).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.labels.evaluation import EvalImage, TruthObject, evaluate  # noqa: E402
from pipeline.heatmaps import names  # noqa: E402
from pipeline.model.load import load_model, resolve_device  # noqa: E402
from pipeline.model.prompts import prompt_ensemble  # noqa: E402
from pipeline.labels.refine import REFINERS, refiner_for  # noqa: E402
from pipeline.labels.regions import heatmap_regions, region_pixels, work_size  # noqa: E402
from PIL import Image  # noqa: E402
from stages.export import ExportConfig  # noqa: E402
from stages.surgery import SurgeryConfig  # noqa: E402
from tests.benchmarks.jsonout import emit  # noqa: E402
from tests.benchmarks.heldout import heldout_scenes  # noqa: E402
from tests.benchmarks.toyeval import held_out_scenes, scene_heatmaps  # noqa: E402

@torch.inference_mode()
def scene_maps(lm, scenes, cfg: SurgeryConfig) -> list[tuple[list[str], dict[str, np.ndarray]]]:
    """Each scene's words and every method's maps (``[T, gh, gw]``)."""
    per_scene = [list(dict.fromkeys(w for o in s.objects for w in o.words)) for s in scenes]
    vocab = sorted({w for ws in per_scene for w in ws})
    text, empty = prompt_ensemble(lm.model, vocab), prompt_ensemble(lm.model, [""])[0]
    out = []
    for start in range(0, len(scenes), 32):
        res = scene_heatmaps(lm, scenes[start : start + 32], per_scene[start : start + 32], vocab, text, empty, cfg)
        out += [(r.words, r.maps) for r in res]
    return out


def eval_images(scenes, maps, methods: list[str], export: ExportConfig) -> list[EvalImage]:
    """Each scene as ``eval`` sees it: its true objects with masks, every method's maps, its picture at the
    working size, and the regions (boxes and masks) that ``export`` settings draw from the true words' maps."""
    images = []
    for s, (words, by_method) in zip(scenes, maps):
        h, w = s.image.shape[:2]
        truth: dict[str, list[TruthObject]] = {}
        for o in s.objects:
            ys, xs = np.nonzero(o.mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
            for word in o.words:
                truth.setdefault(word, []).append(TruthObject(box, o.mask))
        gh, gw = work_size((h, w))
        picture = np.asarray(Image.fromarray(s.image).resize((gw, gh), Image.BILINEAR))
        refiner = refiner_for(export.refine, picture)
        regions = {word: heatmap_regions(by_method[export.region_method][t], (h, w), export.region_method, export.tau,
                                         export.multi_instance, export.min_area, refiner=refiner)
                   for t, word in enumerate(words)}
        images.append(EvalImage(truth=truth, scores={word: 1.0 for word in words}, exported=list(words),
                                boxes={word: [r.box for r in rs] for word, rs in regions.items()},
                                maps={m: {word: by_method[m][t] for t, word in enumerate(words)} for m in methods},
                                size=(h, w), masks={word: region_pixels(rs, (h, w)) for word, rs in regions.items()},
                                picture=picture))
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=200, help="two-object scenes per style (half choose tau, half test)")
    ap.add_argument("--depth", type=int, default=3, help="surgery depth (the demo's: 3)")
    ap.add_argument("--single-resolution", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=list(names()))
    ap.add_argument("--style", nargs="+", default=["heldout"], choices=["train", "alt", "varied", "heldout"])
    ap.add_argument("--refine", nargs="+", default=["none", *REFINERS], choices=["none", *REFINERS])
    ap.add_argument("--seed", type=int, default=23, help="the held-out renderer's stream, for --style heldout")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    lm = load_model(args.model, resolve_device(args.device))
    cfg = SurgeryConfig(surgery_depth=args.depth, methods=tuple(args.methods), single_resolution=args.single_resolution)
    export = ExportConfig()
    result: dict = {"model": args.model, "depth": args.depth, "scenes": args.scenes,
                    "default": {"region_method": export.region_method, "tau": export.tau, "refine": export.refine,
                                "multi_instance": export.multi_instance},
                    "command": " ".join(sys.argv), "styles": {}}
    t0 = time.time()
    for style in args.style:
        scenes = (heldout_scenes(args.scenes, seed=args.seed, objects=2) if style == "heldout"
                  else held_out_scenes(args.scenes, objects=2, style=style))
        maps = scene_maps(lm, scenes, cfg)
        half = len(scenes) // 2
        refiners = tuple(args.refine)
        tune = evaluate(eval_images(scenes[:half], maps[:half], args.methods, export), args.methods, refiners)
        test = evaluate(eval_images(scenes[half:], maps[half:], args.methods, export), args.methods, refiners)
        per_method = {}
        for m in args.methods:
            first, second = tune["overall"]["methods"][m], test["overall"]["methods"][m]
            per_method[m] = {"pointing": second["pointing"], "pairs": second["pairs"]}
            for r in refiners:
                chosen = first["refiners"][r]["best_corloc_tau"]
                at = second["refiners"][r]["by_tau"][str(chosen)]
                per_method[m][r] = {"tau_chosen_on_first_half": chosen, "corloc": at["corloc"], "miou": at["miou"],
                                    "maxboxacc_v2": second["refiners"][r]["maxboxacc_v2"]}
        o = test["overall"]
        result["styles"][style] = {"methods": per_method,
                                   "default": {"corloc": o["corloc"], "miou": o["miou"], "pairs": o["corloc_pairs"]}}
    result["seconds"] = round(time.time() - t0, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
