"""Regions from heatmaps on held-out toy scenes: pointing, CorLoc and MaxBoxAccV2 per method; prints JSON.

    python tests/benchmarks/regions.py [--scenes 200] [--depth 3] [--style train alt heldout] [--refine none pamr]

Each scene has two objects of different shapes; its labels are its true colour and shape
words, so this measures localisation given the word (what ``export`` does with CLIP's
labels). The scenes are split in two: tau is chosen on the first half (the best mean box
accuracy over IoU 0.3/0.5/0.7, as ``eval`` reports it) and CorLoc is measured with that tau
on the second half, beside CorLoc at the export's default tau. The metrics are the ones
``runall.py eval`` computes (``pipeline.labels.evaluation``); boxes come from ``pipeline.labels.regions``.

Style ``heldout`` draws the scenes with ``heldout.py``'s renderer, which no training saw, from its stream 23
(PAMR's iterations and dilations were chosen on the toy's alt style and this renderer's stream 11). Each ``--refine`` setting is measured apart:
``pamr`` refines every map with the scene's picture before CAM's rule (``export.refine``), with its own tau
chosen on the first half.
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
from pipeline.labels.refine import Pamr  # noqa: E402
from pipeline.labels.regions import heatmap_regions, work_size  # noqa: E402
from PIL import Image  # noqa: E402
from stages.export import ExportConfig  # noqa: E402
from stages.surgery import SurgeryConfig  # noqa: E402
from tests.benchmarks.jsonout import emit  # noqa: E402
from tests.benchmarks.heldout import heldout_scenes  # noqa: E402
from tests.benchmarks.toyeval import held_out_scenes, scene_heatmaps  # noqa: E402

REFINE_TAUS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)  # a refiner's tau is chosen among these on the first half


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


def eval_images(scenes, maps, methods: list[str], region_method: str, tau: float, refine: str = "none"
                ) -> list[EvalImage]:
    images = []
    for s, (words, by_method) in zip(scenes, maps):
        h, w = s.image.shape[:2]
        truth: dict[str, list[TruthObject]] = {}
        for o in s.objects:
            ys, xs = np.nonzero(o.mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
            for word in o.words:
                truth.setdefault(word, []).append(TruthObject(box, o.mask))
        refiner = None
        if refine == "pamr":
            gh, gw = work_size((h, w))
            refiner = Pamr(np.asarray(Image.fromarray(s.image).resize((gw, gh), Image.BILINEAR)))
        boxes = {word: [r.box for r in heatmap_regions(by_method[region_method][t], (h, w), region_method, tau,
                                                         refiner=refiner)]
                 for t, word in enumerate(words)}
        images.append(EvalImage(truth=truth, scores={word: 1.0 for word in words}, exported=list(words), boxes=boxes,
                                maps={m: {word: by_method[m][t] for t, word in enumerate(words)} for m in methods},
                                size=(h, w)))
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=200, help="two-object scenes per style (half choose tau, half test)")
    ap.add_argument("--depth", type=int, default=3, help="surgery depth (the demo's: 3)")
    ap.add_argument("--single-resolution", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=list(names()))
    ap.add_argument("--style", nargs="+", default=["train", "alt"], choices=["train", "alt", "varied", "heldout"])
    ap.add_argument("--refine", nargs="+", default=["none"], choices=["none", "pamr"])
    ap.add_argument("--seed", type=int, default=23, help="the held-out renderer's stream, for --style heldout")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    lm = load_model(args.model, resolve_device(args.device))
    cfg = SurgeryConfig(surgery_depth=args.depth, methods=tuple(args.methods), single_resolution=args.single_resolution)
    default_tau = ExportConfig().tau
    result: dict = {"model": args.model, "depth": args.depth, "scenes": args.scenes, "default_tau": default_tau,
                    "command": " ".join(sys.argv), "styles": {}}
    t0 = time.time()
    for style in args.style:
        scenes = (heldout_scenes(args.scenes, seed=args.seed, objects=2) if style == "heldout"
                  else held_out_scenes(args.scenes, objects=2, style=style))
        maps = scene_maps(lm, scenes, cfg)
        half = len(scenes) // 2
        tune = evaluate(eval_images(scenes[:half], maps[:half], args.methods, args.methods[0], default_tau), args.methods)
        per_method = {}
        for m in args.methods:
            chosen = tune["overall"]["methods"][m]["best_tau"]
            test_best = evaluate(eval_images(scenes[half:], maps[half:], args.methods, m, chosen), args.methods)
            test_default = evaluate(eval_images(scenes[half:], maps[half:], [m], m, default_tau), [m])
            block = test_best["overall"]["methods"][m]
            per_method[m] = {"pointing": block["pointing"], "maxboxacc_v2": block["maxboxacc_v2"],
                             "tau_chosen_on_first_half": chosen, "corloc_at_chosen_tau": test_best["overall"]["corloc"],
                             f"corloc_at_tau_{default_tau}": test_default["overall"]["corloc"],
                             "pairs": block["pairs"]}
            for refine in (r for r in args.refine if r != "none"):  # CorLoc only: MaxBoxAccV2 scores the raw map
                corloc = {tau: evaluate(eval_images(scenes[:half], maps[:half], [], m, tau, refine), [])["overall"]["corloc"]
                          for tau in REFINE_TAUS}
                best = max(REFINE_TAUS, key=lambda t: (corloc[t], -abs(t - default_tau)))
                test = evaluate(eval_images(scenes[half:], maps[half:], [], m, best, refine), [])["overall"]["corloc"]
                per_method[m][refine] = {"tau_chosen_on_first_half": best, "corloc_at_chosen_tau": test}
        result["styles"][style] = per_method
    result["seconds"] = round(time.time() - t0, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
