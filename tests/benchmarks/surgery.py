"""Surgery speed: the stage's core against a loop like the original's, in one run; prints JSON.

    python tests/benchmarks/surgery.py [--model toy] [--device auto] [--images 16] [--labels 8]
    python tests/benchmarks/surgery.py --models toy random:ViT-B/16 --compare-methods   # every method against the default three

Both compute the same maps (raw CLIP and surgery at the model's resolution, single-text
surgery at ``--single-resolution``) for ``--labels`` words per image; neither writes files.

* original-like: per image, a fresh model load, the prompt-ensemble text features
  recomputed, one forward per method, one image at a time;
* stage: the model loaded once, text features cached across images, one forward at
  each resolution giving raw and surgery tokens together, ``--batch`` images per forward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.run.images import normalize, to_tensor  # noqa: E402
from pipeline.model.load import load_model, resolve_device  # noqa: E402
from pipeline.model.prompts import TextFeatureStore, prompt_ensemble  # noqa: E402
from pipeline.heatmaps.blocks import encode_image_tokens  # noqa: E402
from pipeline.heatmaps.similarity import feature_surgery, similarity_map  # noqa: E402
from toyeval import held_out_scenes  # noqa: E402  (beside this script)
from pipeline.toy.world import COLOURS, SHAPES  # noqa: E402
from pipeline.heatmaps.compute import compute_heatmaps  # noqa: E402
from stages.surgery import SurgeryConfig  # noqa: E402

WORDS = [*SHAPES, *COLOURS]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def original_like(name: str, dev: torch.device, picture: Image.Image, words: list[str], cfg: SurgeryConfig) -> None:
    lm = load_model(name, dev)  # the original loads CLIP inside the image loop
    model = lm.model
    text = prompt_ensemble(model, words)  # and recomputes the text features for every image
    empty = prompt_ensemble(model, [""])[0]
    base = normalize(to_tensor(picture, lm.input_resolution)[None].to(dev)).to(lm.dtype)
    raw = encode_image_tokens(model, base, 0).raw  # stock tokens
    surg = encode_image_tokens(model, base, cfg.surgery_depth).surgery  # a second forward for the surgery model
    size = (picture.height, picture.width)
    similarity_map(torch.nn.functional.normalize(raw.float(), dim=-1) @ text.T, size)
    similarity_map(feature_surgery(surg, text), size)
    big = normalize(to_tensor(picture, cfg.single_resolution)[None].to(dev)).to(lm.dtype)
    single = encode_image_tokens(model, big, cfg.surgery_depth).surgery
    for t in range(len(words)):  # one text at a time
        similarity_map(feature_surgery(single, text[t : t + 1], redundant=empty), size)
    sync(dev)


@torch.inference_mode()  # the library's cores leave the grad mode to their callers
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--labels", type=int, default=8)
    ap.add_argument("--batch", type=int, default=0, help="stage images per forward (0 = the stage's default)")
    ap.add_argument("--single-resolution", type=int, default=512)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--original-images", type=int, default=4, help="images timed with the original-like loop")
    ap.add_argument("--compare-methods", action="store_true",
                    help="instead: time the stage core with the default methods and with every method, per model")
    ap.add_argument("--models", nargs="+", help="with --compare-methods: the models, timed in this one run")
    args = ap.parse_args()
    if args.compare_methods:
        print(json.dumps([compare_methods(m, args) for m in args.models or [args.model]], indent=1))
        return
    dev = resolve_device(args.device)
    cfg = SurgeryConfig(surgery_depth=args.depth, single_resolution=args.single_resolution)
    batch = args.batch or (32 if dev.type == "cuda" else 8)
    pictures = [Image.fromarray(s.image) for s in held_out_scenes(args.images, objects=2)]
    words = [[WORDS[(i + k) % len(WORDS)] for k in range(args.labels)] for i in range(args.images)]

    t = time.time()
    lm = load_model(args.model, dev)
    store = TextFeatureStore(lm.model)
    compute_heatmaps(lm.model, normalize(to_tensor(pictures[0], lm.input_resolution)[None].to(dev)).to(lm.dtype),
                     normalize(to_tensor(pictures[0], 64)[None].to(dev)).to(lm.dtype), [["red"]], ["red"],
                     prompt_ensemble(lm.model, ["red"]), prompt_ensemble(lm.model, [""])[0], [(64, 64)],
                     SurgeryConfig(single_resolution=64))  # warm-up, outside the text cache
    sync(dev)
    load_seconds = time.time() - t
    t = time.time()
    for start in range(0, args.images, batch):
        chunk = pictures[start : start + batch]
        ws = words[start : start + batch]
        vocab = list(dict.fromkeys(w for x in ws for w in x))
        base = normalize(torch.stack([to_tensor(p, lm.input_resolution) for p in chunk]).to(dev)).to(lm.dtype)
        big = normalize(torch.stack([to_tensor(p, args.single_resolution) for p in chunk]).to(dev)).to(lm.dtype)
        compute_heatmaps(lm.model, base, big, ws, vocab, store(vocab), store([""])[0],
                         [(p.height, p.width) for p in chunk], cfg)
    sync(dev)
    stage = (time.time() - t) / args.images
    t = time.time()
    for i in range(args.original_images):
        original_like(args.model, dev, pictures[i], words[i], cfg)
    original = (time.time() - t) / args.original_images
    print(json.dumps({
        "model": args.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(lm.dtype), "images": args.images, "labels_per_image": args.labels, "stage_batch": batch,
        "single_resolution": args.single_resolution, "surgery_depth": args.depth,
        "stage_model_load_seconds": round(load_seconds, 3),
        "seconds_per_image": {"original_like": round(original, 4), "stage": round(stage, 4)},
        "speedup": round(original / stage, 2),
    }, indent=1))


def compare_methods(name: str, args) -> dict:
    """Stage-core seconds per image with the default methods and with every method, same images and labels."""
    from pipeline.heatmaps import names

    dev = resolve_device(args.device)
    lm = load_model(name, dev)
    side = args.single_resolution
    pictures = [Image.fromarray(s.image) for s in held_out_scenes(args.images, objects=2)]
    words = [[WORDS[(i + k) % len(WORDS)] for k in range(args.labels)] for i in range(args.images)]
    store = TextFeatureStore(lm.model)
    vocab = list(dict.fromkeys(w for x in words for w in x))
    text, empty = store(vocab), store([""])[0]
    base = normalize(torch.stack([to_tensor(p, lm.input_resolution) for p in pictures]).to(dev)).to(lm.dtype)
    big = normalize(torch.stack([to_tensor(p, side) for p in pictures]).to(dev)).to(lm.dtype)
    sizes = [(p.height, p.width) for p in pictures]
    out = {"model": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "images": args.images, "labels_per_image": args.labels, "single_resolution": side, "surgery_depth": args.depth}
    for label, methods in (("default", ("raw", "surgery", "single")), ("all", names())):
        cfg = SurgeryConfig(surgery_depth=args.depth, single_resolution=side, methods=methods)
        compute_heatmaps(lm.model, base[:1], big[:1], words[:1], vocab, text, empty, sizes[:1], cfg)  # warm-up
        sync(dev)
        t = time.time()
        batch = args.batch or (32 if dev.type == "cuda" else 8)
        for start in range(0, args.images, batch):
            compute_heatmaps(lm.model, base[start : start + batch], big[start : start + batch], words[start : start + batch],
                             vocab, text, empty, sizes[start : start + batch], cfg)
        sync(dev)
        out[f"{label}_seconds_per_image"] = round((time.time() - t) / args.images, 4)
        out[f"{label}_methods"] = list(methods)
    out["all_over_default"] = round(out["all_seconds_per_image"] / out["default_seconds_per_image"], 3)
    return out


if __name__ == "__main__":
    main()
