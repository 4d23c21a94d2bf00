"""Your words: vocabulary-only labelling (``--no-ascent --words``) on held-out scenes; prints JSON.

    python tests/benchmarks/vocabulary.py [--model toy] [--scenes 24] [--objects 1 2 3]
                                          [--calibrate-seed 11] [--seed 23] [--speed-scenes 8] [--out FILE]

The vocabulary is the toy's 12 words (6 shapes, 6 colours). Scenes come from ``heldout.py``'s
renderer, which no training ever saw. The rule's one threshold, ``decode.vocabulary_z`` (a label's
z-score among the image's scores of every vocabulary text and the background prompts), is chosen on
the calibration stream (``--calibrate-seed``): the value with the best mean F1 over the object
counts. It is then measured on the other stream (``--seed``), at the chosen value and at the shipped
default, with per object count:

* recall of the true shape words and of the true colour words, and of all of them;
* precision: the share of labels that are one of the scene's true words;
* labels per image.

Speed: the CLI end to end (every stage, the demo config) on ``--speed-scenes`` toy scenes, once with
``--no-ascent --words`` and once as the demo runs, in this same process's machine, one after the other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from heldout import heldout_scenes  # noqa: E402  (beside this script)
from jsonout import emit  # noqa: E402  (beside this script)
from pipeline.model.encode import encode_images  # noqa: E402
from pipeline.model.load import load_model, resolve_device  # noqa: E402
from pipeline.model.prompts import prompt_ensemble  # noqa: E402
from pipeline.run.images import to_tensor  # noqa: E402
from pipeline.toy.world import COLOURS, SHAPES  # noqa: E402
from stages.decode import DecodeConfig, vocabulary_labels  # noqa: E402

WORDS = (*SHAPES, *COLOURS)
GRID = [round(0.1 * k, 1) for k in range(0, 21)]  # the thresholds tried on the calibration stream


def scores(scenes, labels: list[set[str]]) -> dict:
    shape = colour = every = hits = count = 0.0
    for s, words in zip(scenes, labels):
        shapes, colours = {o.shape for o in s.objects}, {o.colour for o in s.objects}
        shape += len(words & shapes) / len(shapes)
        colour += len(words & colours) / len(colours)
        every += len(words & (shapes | colours)) / len(shapes | colours)
        hits += len(words & (shapes | colours))
        count += len(words)
    n = len(scenes)
    precision = hits / count if count else 0.0
    recall = every / n
    return {"shape_recall": round(shape / n, 4), "colour_recall": round(colour / n, 4), "recall": round(recall, 4),
            "precision": round(precision, 4), "labels_per_image": round(count / n, 2),
            "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0}


def labelled(lm, scenes, z: float, cache: dict) -> list[set[str]]:
    imgs = torch.stack([to_tensor(Image.fromarray(s.image), lm.input_resolution) for s in scenes])
    with torch.no_grad():
        whole = encode_images(lm, imgs)
        found = vocabulary_labels(whole, WORDS, lambda ws: prompt_ensemble(lm.model, ws, cache), z)
    return [{d["word"] for d in labels} for labels in found]


def cli_seconds(folder: Path, out: Path, name: str, extra: list[str]) -> float:
    t = time.time()
    subprocess.run([sys.executable, str(ROOT / "runall.py"), "--input", str(folder), "--config",
                    str(ROOT / "configs" / "demo.yaml"), "--output", str(out), "--run-name", name, "--quiet", *extra],
                   check=True, capture_output=True)
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenes", type=int, default=24, help="scenes per object count")
    ap.add_argument("--objects", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--calibrate-seed", type=int, default=11, help="the stream the threshold is chosen on")
    ap.add_argument("--seed", type=int, default=23, help="the stream it is measured on")
    ap.add_argument("--speed-scenes", type=int, default=8, help="toy scenes for the end-to-end timing; 0 skips it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lm = load_model(args.model, resolve_device(args.device))
    cache: dict = {}
    default = DecodeConfig().vocabulary_z
    calib = {n: heldout_scenes(args.scenes, seed=args.calibrate_seed, objects=n) for n in args.objects}
    tried = {z: [scores(calib[n], labelled(lm, calib[n], z, cache))["f1"] for n in args.objects] for z in GRID}
    chosen = max(GRID, key=lambda z: (sum(tried[z]), -abs(z - default)))
    out: dict = {"model": args.model, "device": str(lm.device), "vocabulary": list(WORDS),
                 "calibration": {"seed": args.calibrate_seed, "mean_f1_by_z": {str(z): round(sum(f) / len(f), 4)
                                                                               for z, f in tried.items()},
                                 "chosen_z": chosen},
                 "default_z": default, "seed": args.seed, "scenes_per_count": args.scenes, "by_objects": {}}
    for n in args.objects:
        scenes = heldout_scenes(args.scenes, seed=args.seed, objects=n)
        out["by_objects"][str(n)] = {"default": scores(scenes, labelled(lm, scenes, default, cache)),
                                     "chosen": scores(scenes, labelled(lm, scenes, chosen, cache))}
    if args.speed_scenes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "scenes"
            subprocess.run([sys.executable, str(ROOT / "runall.py"), "toy", "scenes", "--out", str(folder), "--count",
                            str(args.speed_scenes), "--max-objects", "3"], check=True, capture_output=True)
            vocab = cli_seconds(folder, Path(tmp) / "out", "vocabulary", ["--no-ascent", "--words", ",".join(WORDS)])
            full = cli_seconds(folder, Path(tmp) / "out", "full", [])
        out["speed"] = {"scenes": args.speed_scenes, "no_ascent_seconds": round(vocab, 2),
                        "default_seconds": round(full, 2), "no_ascent_vs_default": round(vocab / full, 3),
                        "note": "the CLI end to end, every stage and the start-up, demo config, one after the other"}
    emit(out, args.out)


if __name__ == "__main__":
    main()
