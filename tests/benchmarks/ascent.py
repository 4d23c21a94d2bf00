"""Ascent speed: this stage against a loop faithful to the original, in one run; prints JSON.

    python tests/benchmarks/ascent.py [--model toy] [--device auto] [--images 8] [--iterations 400]
                                      [--methods gumbel pez] [--recall 0]

The faithful loop exists only here, for comparison: a fresh model load per image,
64 views re-encoded every step, the dense one-hot over all 77 positions, the full
text transformer, fp32, one image at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kornia.augmentation as K  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.images import normalize, to_tensor  # noqa: E402
from pipeline.models import load_model, resolve_device  # noqa: E402
from pipeline.tokens import vocab  # noqa: E402
from toyeval import ascent_recall  # noqa: E402  (beside this script)
from pipeline.toytrain import held_out_single_objects  # noqa: E402
from stages.ascend import AscentConfig, extract_opinions  # noqa: E402


def faithful_loop(name: str, dev: torch.device, image: torch.Tensor, iterations: int) -> None:
    """The original's per-image loop (fp32, reloaded model, dense one-hot, 64 fresh views per step)."""
    lm = load_model(name, dev, precision="fp32")
    model, v = lm.model, vocab()
    ctx = model.positional_embedding.shape[0]
    V = model.token_embedding.weight.shape[0]
    logits = torch.randn(16, 5, V, device=dev, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=5)
    aug = K.RandomAffine(degrees=10, translate=(0.1, 0.1), p=0.8)
    sot = F.one_hot(torch.tensor([v.sot], device=dev), V).float().expand(16, 1, V)
    pad = F.one_hot(torch.full((ctx - 6,), v.eot, device=dev), V).float().expand(16, ctx - 6, V)
    for _ in range(iterations):
        with torch.no_grad():
            views = F.normalize(model.encode_image(normalize(aug(image[None].expand(64, -1, -1, -1)))), dim=-1)
        y = F.gumbel_softmax(logits, tau=1000, hard=True)
        x = torch.cat([sot, y, pad], 1) @ model.token_embedding.weight + model.positional_embedding  # [16, 77, W]
        x = model.ln_final(model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        f = F.normalize(x[:, 5 + 2] @ model.text_projection, dim=-1)  # the original's second-EOT read-out
        loss = (-100 * f @ views.T).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--faithful-images", type=int, default=1, help="images timed with the faithful loop")
    ap.add_argument("--batch", type=int, default=0, help="stage batch size (0 = all images in one batch)")
    ap.add_argument("--methods", nargs="+", default=["gumbel", "pez"], choices=["gumbel", "pez"])
    ap.add_argument("--recall", type=int, default=0, help="also the true-word recall on N held-out toy scenes (toy model only)")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    lm = load_model(args.model, dev)
    res = lm.input_resolution
    imgs = torch.stack([to_tensor(Image.fromarray(s.image), res) for s in held_out_single_objects(args.images)])
    batch = args.batch or args.images
    extract_opinions(lm, imgs[:1], [0], AscentConfig(iterations=2, bank_size=16, views=8))  # warm-up
    stage = {}
    for method in args.methods:
        cfg = AscentConfig(method=method, iterations=args.iterations)
        t = time.time()
        for start in range(0, args.images, batch):
            extract_opinions(lm, imgs[start : start + batch], list(range(start, min(start + batch, args.images))), cfg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stage[method] = (time.time() - t) / args.images
    t = time.time()
    for i in range(args.faithful_images):
        faithful_loop(args.model, dev, imgs[i].to(dev), args.iterations)
    faithful = (time.time() - t) / args.faithful_images
    out = {
        "model": args.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(lm.dtype), "iterations": args.iterations, "images": args.images, "stage_batch": batch,
        "seconds_per_image": {"faithful": round(faithful, 3), **{f"stage_{m}": round(v, 3) for m, v in stage.items()}},
        "speedup": {m: round(faithful / v, 2) for m, v in stage.items()},
    }
    if args.recall:
        scenes = held_out_single_objects(args.recall)
        out["recall"] = {m: ascent_recall(lm, scenes, AscentConfig(method=m, iterations=args.iterations))
                         for m in args.methods}
        out["recall"]["scenes"] = args.recall
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
